"""``prefstream.admin.v1.ModelAdminService``: list, pin, unpin and roll back models, served by the scorer.

Why it lives in the scorer: an operator's pin or rollback must change what is *served*, and report
it.  Each call changes the registry (the source of truth every scorer follows), then asks this
scorer's :class:`~scorer.swap.ModelManager` to sync now and waits for it (up to ``swap_wait_s``), so
the returned ``ModelStatus.serving_version`` shows the effect.  The swap itself takes the same
verified, zero-downtime path as a trainer publish; other scorers pick the change up on their next
registry poll.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import grpc

from prefstream.admin.v1 import admin_pb2_grpc
from prefstream.admin.v1.admin_pb2 import ListModelsRequest as ListModelsRequestProto
from prefstream.admin.v1.admin_pb2 import ListModelsResponse as ListModelsResponseProto
from prefstream.admin.v1.admin_pb2 import ListVersionsRequest as ListVersionsRequestProto
from prefstream.admin.v1.admin_pb2 import ListVersionsResponse as ListVersionsResponseProto
from prefstream.admin.v1.admin_pb2 import ModelStatus as ModelStatusProto
from prefstream.admin.v1.admin_pb2 import PinVersionRequest as PinVersionRequestProto
from prefstream.admin.v1.admin_pb2 import RollbackRequest as RollbackRequestProto
from prefstream.admin.v1.admin_pb2 import UnpinRequest as UnpinRequestProto
from prefstream.admin.v1 import admin_pb2
from scorer.engine import ServingEngine
from scorer.swap import ModelManager
from services.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

def _name(value: str, field: str = "name") -> str:
    if not value:
        raise InvalidArgument(field, "is empty; give the model name (see ListModels)")
    if len(value) > 128 or not all(c.isalnum() or c in "._-" for c in value):
        raise InvalidArgument(field, f"{value[:40]!r} is not a model name (letters, digits, . _ -)")
    return value


#: The admin calls that change what is served or how feedback is made: they need the admin token.
MUTATING_METHODS: tuple[str, ...] = tuple(
    f"/{admin_pb2.DESCRIPTOR.services_by_name['ModelAdminService'].full_name}/{m}"
    for m in ("PinVersion", "Unpin", "Rollback", "CreateCriterion", "DeleteCriterion", "SetCriteriaFeedback"))


class ModelAdminServicer(admin_pb2_grpc.ModelAdminServiceServicer):
    """Registry-backed admin calls whose effect is applied through the scorer's swap path."""

    def __init__(self, engine: ServingEngine, manager: ModelManager, registry: Any | None, *, swap_wait_s: float) -> None:
        self.engine = engine
        self.manager = manager
        self.registry = registry
        self.swap_wait_s = swap_wait_s

    def _need_registry(self) -> Any:
        if self.registry is None:
            raise FailedPrecondition("this scorer runs without a model registry (no redis_url); "
                                     "start it with --redis-url or --stack-run-dir to pin, unpin or roll back")
        return self.registry

    async def _call(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def _serving(self, name: str) -> str:
        slot = self.engine.serving(name)
        return slot.version if slot is not None else ""

    def _status_proto(self, status: Any) -> ModelStatusProto:
        msg = status.to_proto()
        msg.serving_version = self._serving(msg.name)
        return msg

    async def _apply(self, name: str) -> None:
        """Sync this scorer now; a slow load keeps going in the background after swap_wait_s."""
        task = asyncio.ensure_future(self.manager.sync(name))
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=self.swap_wait_s)
        except TimeoutError:
            log.info("swap of %s still loading after %.0fs; ModelStatus reports the old version", name, self.swap_wait_s)

    async def ListModels(self, request: ListModelsRequestProto, context: grpc.aio.ServicerContext) -> ListModelsResponseProto:
        out: dict[str, ModelStatusProto] = {}
        if self.registry is not None:
            for st in await self._call(self.registry.list_models):
                msg = self._status_proto(st)
                out[msg.name] = msg
        for slot in self.engine.served():
            if slot.name not in out:
                out[slot.name] = ModelStatusProto(
                    name=slot.name, kind=slot.kind.to_proto(), serving_version=slot.version,
                    target_version=slot.version,
                )
        for name, kind in self.manager.known().items():  # configured, loaded on first use
            if name not in out:
                out[name] = ModelStatusProto(name=name, kind=kind.to_proto())
        return ListModelsResponseProto(models=[out[k] for k in sorted(out)])

    async def ListVersions(self, request: ListVersionsRequestProto, context: grpc.aio.ServicerContext) -> ListVersionsResponseProto:
        name = _name(request.name)
        registry = self._need_registry()
        versions = await self._call(registry.versions, name, request.include_rejected)
        return ListVersionsResponseProto(versions=[v.to_proto() for v in versions])

    async def PinVersion(self, request: PinVersionRequestProto, context: grpc.aio.ServicerContext) -> ModelStatusProto:
        name = _name(request.name)
        if not request.version:
            raise InvalidArgument("version", "is empty; give the version to pin (see ListVersions)")
        registry = self._need_registry()
        await self._call(registry.pin, name, request.version)
        log.info("pinned %s to %s", name, request.version)
        await self._apply(name)
        return self._status_proto(await self._call(registry.status, name))

    async def Unpin(self, request: UnpinRequestProto, context: grpc.aio.ServicerContext) -> ModelStatusProto:
        name = _name(request.name)
        registry = self._need_registry()
        await self._call(registry.unpin, name)
        log.info("unpinned %s", name)
        await self._apply(name)
        return self._status_proto(await self._call(registry.status, name))

    async def Rollback(self, request: RollbackRequestProto, context: grpc.aio.ServicerContext) -> ModelStatusProto:
        name = _name(request.name)
        if len(request.reason) > 1000:
            raise InvalidArgument("reason", f"is {len(request.reason)} characters; the limit is 1000")
        if not request.reason.strip():
            raise InvalidArgument("reason", "is empty; say why the version is rolled back (it is kept in its history)")
        registry = self._need_registry()
        await self._call(registry.rollback, name, request.reason)
        log.info("rolled back %s", name)
        await self._apply(name)
        return self._status_proto(await self._call(registry.status, name))

    # -- criteria ----------------------------------------------------------------------------------

    def _criteria(self, *, check_models: bool = True) -> Any:
        store = self.engine.criteria.definitions
        if store is None:
            raise FailedPrecondition("this scorer runs without Redis (no redis_url), so it has no criteria store; "
                                     "start it with --redis-url or --stack-run-dir")
        if check_models:
            return store
        from services.criteria_store import CriteriaStore

        return CriteriaStore(store.redis, namespace=store.namespace)

    @staticmethod
    def _info(c: Any, *, created: bool = False, in_use_by: Any = ()) -> admin_pb2.CriterionInfo:
        import json

        return admin_pb2.CriterionInfo(project=c.project, name=c.name, version=c.version,
                                       definition_json=json.dumps(c.to_dict(), sort_keys=True), created=created,
                                       in_use_by=list(in_use_by))

    async def CreateCriterion(self, request: admin_pb2.CreateCriterionRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.CriterionInfo:
        from services.codec import load_json
        from services.criteria import parse_criterion

        data = load_json(request.definition_json, "definition_json")
        if not isinstance(data, dict):
            raise InvalidArgument("definition_json", "must be a JSON object (one criterion definition)")
        project = request.project or data.get("project") or "default"
        if data.get("project") not in (None, project):
            raise InvalidArgument("definition_json.project", f"says {data['project']!r} but the request's project is "
                                                             f"{project!r}; make them agree or leave one out")
        criterion = parse_criterion(data, project=project)
        store = self._criteria(check_models=not request.skip_model_check)
        stored, created = await self._call(store.create, criterion)
        log.info("criterion %s/%s %s", stored.project, stored.ref, "created" if created else "unchanged")
        return self._info(stored, created=created)

    async def ListCriteria(self, request: admin_pb2.ListCriteriaRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.ListCriteriaResponse:
        rows = await self._call(self._criteria().list, request.project or "default")
        return admin_pb2.ListCriteriaResponse(criteria=[self._info(r.latest, in_use_by=r.in_use_by) for r in rows])

    async def GetCriterion(self, request: admin_pb2.GetCriterionRequest,
                           context: grpc.aio.ServicerContext) -> admin_pb2.CriterionInfo:
        if not request.criterion:
            raise InvalidArgument("criterion", "is empty; give name or name@version (see ListCriteria)")
        store = self._criteria()
        project = request.project or "default"
        c = await self._call(store.get, project, request.criterion)
        return self._info(c, in_use_by=await self._call(store.in_use, project, c.name))

    async def DeleteCriterion(self, request: admin_pb2.DeleteCriterionRequest,
                              context: grpc.aio.ServicerContext) -> admin_pb2.DeleteCriterionResponse:
        if len(request.reason) > 1000:
            raise InvalidArgument("reason", f"is {len(request.reason)} characters; the limit is 1000")
        deleted = await self._call(lambda: self._criteria().delete(
            request.project or "default", request.name, force=request.force, reason=request.reason, actor="admin-rpc"))
        return admin_pb2.DeleteCriterionResponse(deleted_versions=deleted)

    async def SetCriteriaFeedback(self, request: admin_pb2.SetCriteriaFeedbackRequest,
                                  context: grpc.aio.ServicerContext) -> admin_pb2.CriteriaFeedbackSettings:
        from services.criteria_store import ALL

        criteria = self._criteria()
        project = request.project or "default"
        name = request.name or ALL
        if name != ALL:
            await self._call(criteria.get, project, name)  # a switch for a criterion that does not exist is a typo
        await self._call(lambda: criteria.set_feedback(project, name, enabled=request.enabled, mode=request.mode or "pair"))
        settings = await self._call(criteria.feedback_settings, project)
        return admin_pb2.CriteriaFeedbackSettings(project=project, settings={
            k: admin_pb2.CriteriaFeedbackSetting(enabled=v.get("enabled", True), mode=v.get("mode", "pair"))
            for k, v in settings.items()})


__all__ = ["ModelAdminServicer"]
