"""The model registry: which checkpoint versions exist, which one should be served, and why.

The trainer publishes (or rejects, when its eval gate fails) every checkpoint it writes; operators pin,
unpin and roll back through the scorer's admin API; scorers ask :meth:`ModelRegistry.target` what to
serve.  The registry lives in Redis (AOF-persisted, so it survives restarts) and is the source of
truth; an optional :class:`Announcer` (the registry's own interface; :mod:`services.announce` has the
Kafka one) publishes each committed change as a :class:`ModelUpdate` on the model-updates topic, and
``generation(name)`` is a counter bumped on every change so a scorer can
also poll with one cheap GET (a lost announcement then costs a poll interval, not a stale model).

Every change is one optimistic Redis transaction (WATCH / MULTI / EXEC, retried on conflict): the
state is read, a pure ``plan_*`` function computes the new state (unit-tested without Redis), and
the writes commit atomically with the generation bump.

Redis layout (``ns`` = namespace, one model's keys share the ``{name}`` hash tag):

* ``ns:models`` -- set of model names
* ``ns:generation`` -- global change counter
* ``ns:model:{name}:state`` -- hash: kind, latest, pinned, generation
* ``ns:model:{name}:versions`` -- hash: version -> ModelVersion JSON
* ``ns:model:{name}:order`` -- list of versions in the order they were recorded
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import redis

from prefstream.admin.v1.admin_pb2 import ModelStatus as ModelStatusProto
from prefstream.admin.v1.admin_pb2 import ModelVersion as ModelVersionProto
from services.checkpoints import validate_name
from services.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.kinds import ModelAction, ModelKind, VersionState
from services.redis_client import RedisErrors
from services.schemas import ModelUpdate, float_to_ts, ts_to_float

log = logging.getLogger(__name__)

_MAX_TXN_RETRIES = 50


class ModelNotFound(NotFound):
    """No model of that name has ever been published or rejected."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no model named {name!r} in the registry; list models to see what exists", field="name")


class VersionNotFound(NotFound):
    def __init__(self, name: str, version: str) -> None:
        super().__init__(f"model {name!r} has no version {version!r}; list its versions to see what exists",
                         field="version")


class RegistryConflict(FailedPrecondition):
    """The registry's state does not allow the change (pinning a rejected version, nothing to roll back to...)."""


class Announcer(Protocol):
    """Told about every change after it is committed; a failure is logged, never undoes the change."""

    def announce(self, update: ModelUpdate) -> None: ...


# ---------------------------------------------------------------------------------------------
# Domain types.


@dataclass(frozen=True)
class ModelVersion:
    """One checkpoint the trainer produced, with the registry's verdict on it."""

    name: str
    version: str
    uri: str
    kind: ModelKind = ModelKind.REWARD
    state: VersionState = VersionState.PUBLISHED
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    records_seen: int = 0
    base_model: str = ""
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        # Stored JSON and callers spell these as strings; hold the enum members (unknown ones fail here).
        object.__setattr__(self, "kind", ModelKind.parse(self.kind, "kind"))
        object.__setattr__(self, "state", VersionState.parse(self.state, "state"))

    def validate(self) -> "ModelVersion":
        validate_name(self.name, "name")
        validate_name(self.version, "version")
        if not self.uri:
            raise InvalidArgument("uri", "is empty; give the checkpoint URI (file:///... from the checkpoint store)")
        for k, v in self.metrics.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise InvalidArgument(f"metrics.{k}", f"must be a finite number, got {v!r}")
        if self.records_seen < 0:
            raise InvalidArgument("records_seen", f"must be >= 0, got {self.records_seen}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelVersion":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_proto(self) -> ModelVersionProto:
        return ModelVersionProto(
            version=self.version,
            uri=self.uri,
            kind=self.kind.to_proto(),
            state=self.state.to_proto(),
            metrics={k: float(v) for k, v in self.metrics.items()},
            reason=self.reason,
            records_seen=self.records_seen,
            base_model=self.base_model,
            created_at=float_to_ts(self.created_at),
        )

    @classmethod
    def from_proto(cls, msg: ModelVersionProto, name: str) -> "ModelVersion":
        """The proto carries no name (it is listed under its model), so the caller supplies it."""
        return cls(
            name=name,
            version=msg.version,
            uri=msg.uri,
            kind=ModelKind.from_proto(msg.kind) or ModelKind.REWARD,
            state=VersionState.from_proto(msg.state) or VersionState.PUBLISHED,
            metrics=dict(msg.metrics),
            reason=msg.reason,
            records_seen=msg.records_seen,
            base_model=msg.base_model,
            created_at=ts_to_float(msg.created_at),
        )

    def update(self, action: ModelAction, reason: str | None = None) -> ModelUpdate:
        return ModelUpdate(model_name=self.name, version=self.version, action=action, kind=self.kind, uri=self.uri,
                           metrics=dict(self.metrics), records_seen=self.records_seen,
                           reason=self.reason if reason is None else reason)


@dataclass(frozen=True)
class ModelStatus:
    """What the registry says about one model; ``serving_version`` is filled in by a scorer."""

    name: str
    kind: ModelKind
    latest_version: str = ""
    pinned_version: str = ""
    target_version: str = ""
    serving_version: str = ""
    generation: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ModelKind.parse(self.kind, "kind"))

    def to_proto(self) -> ModelStatusProto:
        return ModelStatusProto(name=self.name, kind=self.kind.to_proto(), latest_version=self.latest_version,
                                pinned_version=self.pinned_version, target_version=self.target_version,
                                serving_version=self.serving_version)

    @classmethod
    def from_proto(cls, msg: ModelStatusProto) -> "ModelStatus":
        return cls(name=msg.name, kind=ModelKind.from_proto(msg.kind) or ModelKind.REWARD,
                   latest_version=msg.latest_version,
                   pinned_version=msg.pinned_version, target_version=msg.target_version,
                   serving_version=msg.serving_version)


# ---------------------------------------------------------------------------------------------
# Pure state transitions.


@dataclass(frozen=True)
class ModelState:
    """One model's registry state as read inside a transaction."""

    name: str
    kind: ModelKind | None = None  # None until the first version is recorded
    latest: str = ""
    pinned: str = ""
    generation: int = 0
    order: tuple[str, ...] = ()
    versions: Mapping[str, ModelVersion] = field(default_factory=dict)
    #: versions a scorer could not serve (checksum, load or warm-up failed), with why
    refused: Mapping[str, str] = field(default_factory=dict)

    @property
    def exists(self) -> bool:
        return self.kind is not None

    @property
    def target(self) -> str:
        return self.pinned or self.latest

    def status(self) -> ModelStatus:
        if self.kind is None:
            raise ModelNotFound(self.name)
        return ModelStatus(name=self.name, kind=self.kind, latest_version=self.latest, pinned_version=self.pinned,
                           target_version=self.target, generation=self.generation)

    def newest_published(self, before: str | None = None, *, servable: bool = False) -> str:
        """The most recently recorded published version (strictly before ``before`` in order, if given);
        with ``servable``, skipping versions serving refused."""
        order = list(self.order)
        if before is not None and before in order:
            order = order[: order.index(before)]
        for v in reversed(order):
            if self.versions[v].state == VersionState.PUBLISHED and not (servable and v in self.refused):
                return v
        return ""


@dataclass(frozen=True)
class Plan:
    """The result of a transition: the new state, versions to (re)write, events to announce."""

    state: ModelState
    writes: tuple[ModelVersion, ...] = ()
    appended: tuple[str, ...] = ()
    updates: tuple[ModelUpdate, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.writes or self.updates)


def _with(state: ModelState, writes: Sequence[ModelVersion], appended: Sequence[str] = (),
          updates: Sequence[ModelUpdate] = (), **changes: Any) -> Plan:
    versions = {**state.versions, **{v.version: v for v in writes}}
    new = dataclasses.replace(state, versions=versions, order=state.order + tuple(appended),
                              generation=state.generation + 1, **changes)
    return Plan(state=new, writes=tuple(writes), appended=tuple(appended), updates=tuple(updates))


def _record(state: ModelState, version: ModelVersion) -> ModelVersion | None:
    """Checks shared by publish and reject; returns an identical existing record (idempotent retry)."""
    if state.exists and version.kind != state.kind:
        raise RegistryConflict(f"model {state.name!r} is a {state.kind} model; a {version.kind} version cannot "
                               "join it (use another model name)", field="kind")
    existing = state.versions.get(version.version)
    if existing is None:
        return None
    if (existing.uri, existing.state) == (version.uri, version.state):
        return existing
    raise RegistryConflict(f"model {state.name!r} already has version {version.version!r} ({existing.state}, "
                           f"{existing.uri}); publish a new version instead", field="version")


def plan_publish(state: ModelState, version: ModelVersion) -> Plan:
    """Record a published version and move ``latest`` to it (a pin, if any, stays in force)."""
    version = dataclasses.replace(version, state=VersionState.PUBLISHED, reason=version.reason).validate()
    if _record(state, version) is not None:
        return Plan(state=state)
    return _with(state, [version], [version.version], [version.update(ModelAction.PUBLISHED)],
                 kind=version.kind, latest=version.version)


def plan_reject(state: ModelState, version: ModelVersion, reason: str) -> Plan:
    """Record a version the eval gate refused, with why; it never becomes latest or pinned."""
    if not reason.strip():
        raise InvalidArgument("reason", "say why the version is rejected (e.g. the failing eval metric)")
    version = dataclasses.replace(version, state=VersionState.REJECTED, reason=reason).validate()
    if _record(state, version) is not None:
        return Plan(state=state)
    return _with(state, [version], [version.version], [version.update(ModelAction.REJECTED)], kind=version.kind)


def _require(state: ModelState) -> None:
    if not state.exists:
        raise ModelNotFound(state.name)


def plan_pin(state: ModelState, version: str) -> Plan:
    _require(state)
    v = state.versions.get(version)
    if v is None:
        raise VersionNotFound(state.name, version)
    if v.state != VersionState.PUBLISHED:
        raise RegistryConflict(f"version {version!r} of {state.name!r} is {v.state} ({v.reason or 'no reason given'}); "
                               "only published versions can be pinned", field="version")
    if version in state.refused:
        raise RegistryConflict(f"version {version!r} of {state.name!r} was refused by serving ({state.refused[version]}); "
                               "pin another version or publish a fixed one", field="version")
    if state.pinned == version:
        return Plan(state=state)
    return _with(state, [], updates=[v.update(ModelAction.PINNED, reason="")], pinned=version)


def plan_unpin(state: ModelState) -> Plan:
    _require(state)
    if not state.pinned:
        return Plan(state=state)
    latest = state.versions.get(state.latest)
    update = (latest.update(ModelAction.UNPINNED, reason="") if latest is not None else
              ModelUpdate(model_name=state.name, version="", action=ModelAction.UNPINNED,
                          kind=state.kind or ModelKind.REWARD))
    return _with(state, [], updates=[update], pinned="")


def plan_rollback(state: ModelState, reason: str) -> Plan:
    """Mark the current target rolled_back and pin the published version recorded before it."""
    _require(state)
    if not reason.strip():
        raise InvalidArgument("reason", "say why the version is rolled back (it is kept in the version history)")
    current = state.target
    if not current:
        raise RegistryConflict(f"model {state.name!r} has no published version to roll back", field="name")
    previous = state.newest_published(before=current, servable=True)
    if not previous:
        raise RegistryConflict(f"model {state.name!r} has no published version before {current!r} to roll back to "
                               "(versions serving refused do not count)", field="name")
    bad = dataclasses.replace(state.versions[current], state=VersionState.ROLLED_BACK, reason=reason)
    # latest only ever names a published version, so unpinning later cannot bring the bad one back.
    after = dataclasses.replace(state, versions={**state.versions, current: bad})
    updates = [bad.update(ModelAction.ROLLED_BACK), state.versions[previous].update(ModelAction.PINNED, reason="")]
    return _with(state, [bad], updates=updates, pinned=previous, latest=after.newest_published())


# ---------------------------------------------------------------------------------------------
# Redis-backed registry.


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else ("" if value is None else str(value))


class ModelRegistry:
    """Model versions and serving pointers in Redis; see the module docstring for the layout."""

    def __init__(self, redis_client: redis.Redis, namespace: str = "prefstream",
                 announcer: Announcer | None = None) -> None:
        self._r = redis_client
        self.namespace = namespace
        self._announcer = announcer

    @property
    def redis(self) -> redis.Redis:
        """The Redis client the registry reads and writes (the criteria store shares it)."""
        return self._r

    # -- keys --------------------------------------------------------------------------------------

    def _key(self, name: str, part: str) -> str:
        return f"{self.namespace}:model:{{{name}}}:{part}"

    @property
    def _models_key(self) -> str:
        return f"{self.namespace}:models"

    @property
    def _generation_key(self) -> str:
        return f"{self.namespace}:generation"

    # -- reading -----------------------------------------------------------------------------------

    def _load(self, client: Any, name: str) -> ModelState:
        raw = {_s(k): _s(v) for k, v in client.hgetall(self._key(name, "state")).items()}
        if not raw:
            return ModelState(name=name)
        versions = {_s(k): ModelVersion.from_dict(json.loads(v)) for k, v in client.hgetall(self._key(name, "versions")).items()}
        order = tuple(_s(v) for v in client.lrange(self._key(name, "order"), 0, -1))
        kind = ModelKind.parse(raw["kind"], "kind") if raw.get("kind") else None
        refused = {_s(k): _s(v) for k, v in client.hgetall(self._key(name, "refused")).items()}
        return ModelState(name=name, kind=kind, latest=raw.get("latest", ""), pinned=raw.get("pinned", ""),
                          generation=int(raw.get("generation", "0") or 0), order=order, versions=versions,
                          refused=refused)

    def _state(self, name: str) -> ModelState:
        validate_name(name, "name")
        with self._errors():
            return self._load(self._r, name)

    def versions(self, name: str, include_rejected: bool = False) -> list[ModelVersion]:
        """Every recorded version, oldest first (rejected ones only on request)."""
        st = self._state(name)
        _require(st)
        return [st.versions[v] for v in st.order if include_rejected or st.versions[v].state != VersionState.REJECTED]

    def get(self, name: str, version: str) -> ModelVersion:
        validate_name(name, "name")
        validate_name(version, "version")
        with self._errors():
            raw = self._r.hget(self._key(name, "versions"), version)
            if raw is None and not self._r.exists(self._key(name, "state")):
                raise ModelNotFound(name)
        if raw is None:
            raise VersionNotFound(name, version)
        return ModelVersion.from_dict(json.loads(raw))

    def status(self, name: str) -> ModelStatus:
        st = self._state(name)
        _require(st)
        return st.status()

    def target(self, name: str) -> ModelVersion | None:
        """What should be served: the pinned version if any, else the latest published; None if neither."""
        validate_name(name, "name")
        with self._errors():
            pinned, latest = (_s(x) for x in self._r.hmget(self._key(name, "state"), ["pinned", "latest"]))
            current = pinned or latest
            raw = self._r.hget(self._key(name, "versions"), current) if current else None
        return ModelVersion.from_dict(json.loads(raw)) if raw else None

    def refused(self, name: str) -> dict[str, str]:
        """Versions serving refused (version -> reason), as scorers reported them."""
        return dict(self._state(name).refused)

    def servable(self, name: str, excluding: Sequence[str] = ()) -> list[ModelVersion]:
        """Published versions no scorer refused, newest first, leaving out ``excluding`` (a scorer's
        start-up fallback when its target cannot be served)."""
        st = self._state(name)
        return [st.versions[v] for v in reversed(st.order) if st.versions[v].state == VersionState.PUBLISHED
                and v not in st.refused and v not in excluding]

    def list_models(self) -> list[ModelStatus]:
        with self._errors():
            names = sorted(_s(n) for n in self._r.smembers(self._models_key))
        return [self._state(n).status() for n in names]

    def generation(self, name: str | None = None) -> int:
        """Change counter of one model (0 if unknown), or of the whole registry when ``name`` is None."""
        with self._errors():
            if name is None:
                raw = self._r.get(self._generation_key)
            else:
                raw = self._r.hget(self._key(validate_name(name, "name"), "state"), "generation")
        return int(_s(raw) or 0)

    # -- writing -----------------------------------------------------------------------------------

    def publish(self, version: ModelVersion) -> ModelStatus:
        """Add a published version and point ``latest`` at it; re-publishing the same record is a no-op."""
        return self._apply(version.name, lambda st: plan_publish(st, version))

    def reject(self, version: ModelVersion, reason: str) -> ModelStatus:
        """Record a version that failed the gate; it is listed (include_rejected) but never served."""
        return self._apply(version.name, lambda st: plan_reject(st, version, reason))

    def pin(self, name: str, version: str) -> ModelStatus:
        """Serve exactly ``version`` until unpinned (must exist and be published)."""
        validate_name(version, "version")
        return self._apply(name, lambda st: plan_pin(st, version))

    def unpin(self, name: str) -> ModelStatus:
        return self._apply(name, plan_unpin)

    def rollback(self, name: str, reason: str) -> ModelStatus:
        """Mark the current target rolled_back and pin the previous published version."""
        return self._apply(name, lambda st: plan_rollback(st, reason))

    def note_refused(self, name: str, version: str, reason: str) -> None:
        """Record that serving refused ``version`` (pins and rollbacks then avoid it).  Not a transition:
        what scorers serve does not change, so the generation stays."""
        validate_name(name, "name")
        validate_name(version, "version")
        with self._errors():
            self._r.hset(self._key(name, "refused"), version, reason[:500] or "refused")

    def _apply(self, name: str, transition: Callable[[ModelState], Plan]) -> ModelStatus:
        validate_name(name, "name")
        keys = [self._key(name, p) for p in ("state", "versions", "order", "refused")]
        with self._errors():
            for _ in range(_MAX_TXN_RETRIES):
                with self._r.pipeline() as pipe:
                    try:
                        pipe.watch(*keys)
                        plan = transition(self._load(pipe, name))
                        if not plan.changed:
                            pipe.unwatch()
                            return plan.state.status()
                        st = plan.state
                        pipe.multi()
                        pipe.hset(keys[0], mapping={"kind": st.kind or "", "latest": st.latest, "pinned": st.pinned,
                                                    "generation": st.generation})
                        for v in plan.writes:
                            pipe.hset(keys[1], v.version, json.dumps(v.to_dict(), sort_keys=True))
                        if plan.appended:
                            pipe.rpush(keys[2], *plan.appended)
                        pipe.sadd(self._models_key, name)
                        pipe.incr(self._generation_key)
                        pipe.execute()
                        break
                    except redis.WatchError:
                        continue
            else:
                raise Unavailable(f"model registry: too much contention on {name!r}; retry")
        for update in plan.updates:
            log.info("registry %s %s/%s%s", update.action, update.model_name, update.version,
                     f" ({update.reason})" if update.reason else "")
            self._emit(update)
        return plan.state.status()

    def _emit(self, update: ModelUpdate) -> None:
        if self._announcer is None:
            return
        try:
            self._announcer.announce(update)
        except Exception:  # noqa: BLE001 - the change is committed; scorers still see it via generation()
            log.exception("could not announce %s of %s/%s; scorers will pick it up by polling the registry",
                          update.action, update.model_name, update.version)

    def _errors(self) -> RedisErrors:
        return RedisErrors(self._r, "model registry")
