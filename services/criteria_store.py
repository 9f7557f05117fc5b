"""Criteria in the registry's Redis: per project, versioned, and protected from deletion while in use.

The scorer resolves ``name`` or ``name@version`` here on every best-of-N that names a criterion, and
the feedback processor records which version built a preference, so a definition is never changed in
place: creating a criterion whose content differs from its latest version records a new version
(``v1``, ``v2`` ...), and creating one identical to a recorded version returns that version
(idempotent, so a CI job may re-apply its definition files).  Version numbers are never reused, even
after a delete, so ``concise@v2`` on an old record always meant one definition.

A criterion is *in use* while some holder (a scorer replica, the processor) has marked it with
:meth:`CriteriaStore.mark_in_use`, or while another criterion of the project names it as its
tie-breaker.  Deleting it is then refused with FailedPrecondition naming the users; ``force=True``
deletes anyway and appends an audit entry (who used it, why it was forced) that
:meth:`CriteriaStore.audit` lists.  A mark may carry a time to live, so a holder that died without
releasing does not block deletes forever; live holders renew their mark.

Every change is one optimistic transaction (WATCH / MULTI / EXEC, retried on conflict) around a pure
``plan_*`` function, as in :mod:`services.registry`, and bumps ``generation`` so a scorer can poll for
changes with one GET.

Redis layout (``ns`` = namespace, shared with the model registry; ``{p/n}`` = project/name hash tag):

* ``ns:criteria:{project}:names`` -- set of criterion names in the project
* ``ns:criterion:{p/n}:versions`` -- hash: version -> Criterion JSON
* ``ns:criterion:{p/n}:order`` -- list of versions, oldest first
* ``ns:criterion:{p/n}:digests`` -- hash: content digest -> version
* ``ns:criterion:{p/n}:seq`` -- the last version number handed out (kept on delete)
* ``ns:criterion:{p/n}:in_use`` -- sorted set: holder -> expiry (epoch seconds; +inf = until released)
* ``ns:criteria:audit`` -- list of JSON entries for forced deletes
* ``ns:criteria:generation`` -- change counter
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar

import redis

from services.checkpoints import validate_name
from services.criteria import Criterion, split_ref
from services.criteria_eval import FEEDBACK_MODES
from services.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.kinds import ModelKind
from services.redis_client import RedisErrors
from services.registry import ModelNotFound, ModelRegistry

log = logging.getLogger(__name__)

_MAX_TXN_RETRIES = 50
_T = TypeVar("_T")


class CriterionNotFound(NotFound):
    def __init__(self, project: str, ref: str) -> None:
        super().__init__(f"project {project!r} has no criterion {ref!r}; `prefstream criteria list` shows what exists",
                         field="criterion")


class CriterionInUse(FailedPrecondition):
    """A delete that would pull a criterion from under its users; ``force`` overrides it."""


@dataclass(frozen=True)
class CriterionSummary:
    """One criterion as listed: its latest definition, how many versions exist, who uses it."""

    latest: Criterion
    versions: tuple[str, ...]
    in_use_by: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.latest.name, "project": self.latest.project, "latest_version": self.latest.version,
                "versions": list(self.versions), "kind": self.latest.kind, "weight": self.latest.weight,
                "description": self.latest.description, "in_use_by": list(self.in_use_by)}


# ---------------------------------------------------------------------------------------------
# Pure decisions (unit-tested without Redis).


def plan_version(criterion: Criterion, digests: Mapping[str, str], seq: int) -> tuple[str, bool]:
    """(the version ``criterion`` gets, whether it is new): an identical recorded content keeps its version."""
    existing = digests.get(criterion.digest())
    if existing:
        return existing, False
    return f"v{seq + 1}", True


def plan_delete(project: str, name: str, holders: Sequence[str], dependents: Sequence[str], force: bool) -> None:
    """Refuse to delete a criterion in use unless forced; the error names every user and the override."""
    users = [f"holder {h}" for h in holders] + [f"criterion {d} (its tie-breaker)" for d in dependents]
    if users and not force:
        raise CriterionInUse(f"criterion {name!r} of project {project!r} is in use by {', '.join(users)}; stop "
                             "using it first, or delete with --force (recorded in the audit log)", field="name")


def live_holders(entries: Sequence[tuple[str, float]], now: float) -> list[str]:
    """Holders whose mark has not expired, sorted."""
    return sorted(h for h, expires in entries if expires > now)


# ---------------------------------------------------------------------------------------------
# The store.


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else ("" if value is None else str(value))


#: ``set_feedback`` name meaning every criterion of the project.
ALL = "*"


def resolve_feedback(settings: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> str | None:
    """Pure rule of :meth:`CriteriaStore.feedback_mode`: a criterion's own setting, else the project's
    (``*``), else on with ``pair``; off if any named criterion is off; the mode of the first criterion
    with a setting of its own, else the project's."""
    default = settings.get(ALL, {"enabled": True, "mode": "pair"})
    mode = None
    for name in names:
        own = settings.get(name)
        eff = own or default
        if not eff.get("enabled", True):
            return None
        if own is not None and mode is None:
            mode = own.get("mode", "pair")
    return mode or default.get("mode", "pair")


class CriteriaStore:
    """Criterion definitions in Redis; see the module docstring for the layout and the rules.

    ``registry`` (optional) lets :meth:`create` refuse a definition naming a model that was never
    published, or one of the wrong kind (a policy as a reward model).
    """

    def __init__(self, redis_client: redis.Redis, namespace: str = "prefstream",
                 registry: ModelRegistry | None = None) -> None:
        self._r = redis_client
        self.namespace = namespace
        self._registry = registry

    @property
    def redis(self) -> redis.Redis:
        return self._r

    # -- keys ----------------------------------------------------------------------------------------

    def _key(self, project: str, name: str, part: str) -> str:
        return f"{self.namespace}:criterion:{{{project}/{name}}}:{part}"

    def _names_key(self, project: str) -> str:
        return f"{self.namespace}:criteria:{{{project}}}:names"

    @property
    def _audit_key(self) -> str:
        return f"{self.namespace}:criteria:audit"

    @property
    def _generation_key(self) -> str:
        return f"{self.namespace}:criteria:generation"

    # -- reading -------------------------------------------------------------------------------------

    def generation(self) -> int:
        """Bumped on every create and delete: a scorer polls it to know when to re-resolve criteria."""
        with self._errors():
            return int(_s(self._r.get(self._generation_key)) or 0)

    def get(self, project: str, ref: str) -> Criterion:
        """``name`` (the latest version) or ``name@version``."""
        validate_name(project, "project")
        name, version = split_ref(ref)
        with self._errors():
            if not version:
                last = self._r.lindex(self._key(project, name, "order"), -1)
                if last is None:
                    raise CriterionNotFound(project, ref)
                version = _s(last)
            raw = self._r.hget(self._key(project, name, "versions"), version)
        if raw is None:
            raise CriterionNotFound(project, ref)
        return Criterion.from_dict(json.loads(raw))

    def versions(self, project: str, name: str) -> list[Criterion]:
        """Every recorded version, oldest first."""
        validate_name(project, "project")
        validate_name(name, "name")
        with self._errors():
            return self._versions(self._r, project, name)

    def _versions(self, client: Any, project: str, name: str) -> list[Criterion]:
        order = [_s(v) for v in client.lrange(self._key(project, name, "order"), 0, -1)]
        if not order:
            raise CriterionNotFound(project, name)
        raw = client.hmget(self._key(project, name, "versions"), order)
        return [Criterion.from_dict(json.loads(r)) for r in raw if r is not None]

    def names(self, project: str) -> list[str]:
        validate_name(project, "project")
        with self._errors():
            return sorted(_s(n) for n in self._r.smembers(self._names_key(project)))

    def list(self, project: str) -> list[CriterionSummary]:
        """Every criterion of the project with its latest version, sorted by name."""
        out = []
        for name in self.names(project):
            try:
                versions = self.versions(project, name)
            except CriterionNotFound:  # deleted between the two reads
                continue
            out.append(CriterionSummary(latest=versions[-1], versions=tuple(c.version for c in versions),
                                        in_use_by=tuple(self.in_use(project, name))))
        return out

    def in_use(self, project: str, name: str, *, now: float | None = None) -> list[str]:
        """The holders whose mark on ``name`` is live."""
        with self._errors():
            entries = self._r.zrange(self._key(project, name, "in_use"), 0, -1, withscores=True)
        return live_holders([(_s(h), float(s)) for h, s in entries], time.time() if now is None else now)

    def dependents(self, project: str, name: str) -> list[str]:
        """Criteria of the project whose latest version names ``name`` as its tie-breaker."""
        with self._errors():
            return self._dependents(self._r, project, name)

    def _dependents(self, client: Any, project: str, name: str) -> list[str]:
        out = []
        for other in sorted(_s(n) for n in client.smembers(self._names_key(project))):
            if other == name:
                continue
            last = client.lindex(self._key(project, other, "order"), -1)
            raw = client.hget(self._key(project, other, "versions"), _s(last)) if last is not None else None
            tie = json.loads(raw).get("tie_breaker") if raw is not None else None
            if tie == {"criterion": name}:
                out.append(other)
        return out

    def audit(self) -> list[dict[str, Any]]:
        """Forced deletes, oldest first."""
        with self._errors():
            return [json.loads(e) for e in self._r.lrange(self._audit_key, 0, -1)]

    # -- writing -------------------------------------------------------------------------------------

    def create(self, criterion: Criterion) -> tuple[Criterion, bool]:
        """Record ``criterion``: (the stored definition with its version, whether a new version was made).

        A ``version`` written in the definition is ignored (the store assigns versions).  Refused
        with InvalidArgument naming the field when a model or a tie-break criterion does not exist.
        """
        c = dataclasses.replace(criterion, version="")
        self._check_references(c)
        keys = [self._key(c.project, c.name, p) for p in ("order", "digests", "seq", "versions")]

        def txn(pipe: Any) -> tuple[Criterion, bool] | Callable[[], tuple[Criterion, bool]]:
            digests = {_s(k): _s(v) for k, v in pipe.hgetall(keys[1]).items()}
            seq = int(_s(pipe.get(keys[2])) or 0)
            version, new = plan_version(c, digests, seq)
            stored = dataclasses.replace(c, version=version)
            if not new:
                order = [_s(v) for v in pipe.lrange(keys[0], 0, -1)]
                if version in order:
                    return Criterion.from_dict(json.loads(pipe.hget(keys[3], version))), False
                # Its digest survived a delete (digests are dropped with the versions; defensive).
                version, new = f"v{seq + 1}", True
                stored = dataclasses.replace(c, version=version)
            pipe.multi()
            pipe.hset(keys[3], version, json.dumps(stored.to_dict(), sort_keys=True))
            pipe.rpush(keys[0], version)
            pipe.hset(keys[1], c.digest(), version)
            pipe.set(keys[2], int(version[1:]))
            pipe.sadd(self._names_key(c.project), c.name)
            pipe.incr(self._generation_key)
            return lambda: (stored, True)

        stored, new = self._transact(keys, txn)
        if new:
            log.info("criterion %s/%s recorded", stored.project, stored.ref)
        return stored, new

    def _check_references(self, c: Criterion) -> None:
        if c.tie_breaker is not None and c.tie_breaker.kind == "criterion":
            with self._errors():
                known = self._r.sismember(self._names_key(c.project), c.tie_breaker.name)
            if not known:
                raise InvalidArgument("tie_breaker.criterion", f"project {c.project!r} has no criterion "
                                      f"{c.tie_breaker.name!r}; create it first")
        if self._registry is None:
            return
        refs: list[tuple[str, str, ModelKind]] = []
        if c.reward is not None:
            refs.append(("reward.model", c.reward.model, ModelKind.REWARD))
        if c.judge is not None:
            refs.append(("judge.model", c.judge.model, ModelKind.POLICY))
        if c.tie_breaker is not None and c.tie_breaker.kind == "reward_model":
            refs.append(("tie_breaker.reward_model", c.tie_breaker.name, ModelKind.REWARD))
        for where, model, kind in refs:
            try:
                status = self._registry.status(model)
            except ModelNotFound:
                raise InvalidArgument(where, f"no model named {model!r} in the registry; publish it first "
                                      "or fix the name") from None
            if status.kind != kind:
                raise InvalidArgument(where, f"{model!r} is a {status.kind} model; a {kind} model is needed here")

    def delete(self, project: str, name: str, *, force: bool = False, reason: str = "",
               actor: str = "") -> list[str]:
        """Delete every version of ``name``; the deleted versions.  Refused while in use unless ``force``."""
        validate_name(project, "project")
        validate_name(name, "name")
        if force and not reason.strip():
            reason = "forced without a reason"
        keys = [self._key(project, name, p) for p in ("order", "versions", "digests", "in_use")]
        now = time.time()

        def txn(pipe: Any) -> Callable[[], list[str]]:
            order = [_s(v) for v in pipe.lrange(keys[0], 0, -1)]
            if not order:
                raise CriterionNotFound(project, name)
            holders = live_holders([(_s(h), float(s)) for h, s in pipe.zrange(keys[3], 0, -1, withscores=True)],
                                   now)
            dependents = self._dependents(pipe, project, name)
            plan_delete(project, name, holders, dependents, force)
            pipe.multi()
            pipe.delete(*keys)
            pipe.srem(self._names_key(project), name)
            if holders or dependents:
                entry = {"at": now, "project": project, "name": name, "versions": order, "in_use_by": holders,
                         "tie_breaker_of": dependents, "reason": reason, "actor": actor}
                pipe.rpush(self._audit_key, json.dumps(entry, sort_keys=True))
                log.warning("criterion %s/%s force-deleted while in use by %s (%s)", project, name,
                            holders + dependents, reason)
            pipe.incr(self._generation_key)
            return lambda: order

        return self._transact([*keys, self._names_key(project)], txn)

    def mark_in_use(self, project: str, name: str, holder: str, *, ttl_s: float | None = None) -> None:
        """Mark ``name`` as used by ``holder`` (renew with the same call); ``ttl_s`` None = until released."""
        validate_name(project, "project")
        validate_name(name, "name")
        if not holder:
            raise InvalidArgument("holder", "is empty; name the user (e.g. scorer-0)")
        if ttl_s is not None and not (ttl_s > 0 and math.isfinite(ttl_s)):
            raise InvalidArgument("ttl_s", f"must be > 0 seconds, got {ttl_s!r}")
        expires = math.inf if ttl_s is None else time.time() + ttl_s
        with self._errors():
            self._r.zadd(self._key(project, name, "in_use"), {holder: expires})

    def release(self, project: str, name: str, holder: str) -> None:
        with self._errors():
            self._r.zrem(self._key(project, name, "in_use"), holder)

    # -- criteria feedback switch --------------------------------------------------------------------

    def _feedback_key(self, project: str) -> str:
        return f"{self.namespace}:criteria:{{{project}}}:feedback"

    def set_feedback(self, project: str, name: str = ALL, *, enabled: bool, mode: str = "pair") -> None:
        """Switch criteria feedback on or off for one criterion of ``project`` (``name``) or for all of
        them (``ALL``), and choose what it builds (one of FEEDBACK_MODES: ``pair``, best vs worst;
        ``pairs``, that and best vs the worst of its class; ``matched``, one length-matched pair;
        ``matched_pairs``, that and the best class's own length-matched pair; ``bracket``, that and the matched
        pair's chosen reply over its class's tie-breaker-weakest one; ``trim``, a failing reply's longest passing sentence prefix
        over it and over its shortest one; ``trim_next``, the same with the first pair's rejected reply cut one
        sentence later; ``trim_bracket``, those and the tie breaker's best passing reply over its worst;
        ``trim_step``, ``trim_next`` with the second pair's rejected reply the prefix one sentence shorter;
        ``trim_open``, ``trim_next`` with the first pair's rejected reply going on (not ending the turn);
        ``trim_stop``, ``trim_open``'s first pair alone; ``trim_word``, that pair going on by one word;
        ``ranking``, every distinct reply, for the Plackett-Luce loss; see
        :func:`services.criteria_eval.preferences_from_scores`).  A criterion's own setting wins over the project's."""
        validate_name(project, "project")
        if name != ALL:
            validate_name(name, "name")
        if mode not in FEEDBACK_MODES:
            raise InvalidArgument("mode", f"must be one of {', '.join(FEEDBACK_MODES)}, got {mode!r}")
        with self._errors():
            self._r.hset(self._feedback_key(project), name, json.dumps({"enabled": bool(enabled), "mode": mode}))

    def clear_feedback(self, project: str, name: str = ALL) -> None:
        """Drop the explicit setting of one criterion (or the project's ``*``): the default applies again."""
        validate_name(project, "project")
        if name != ALL:
            validate_name(name, "name")
        with self._errors():
            self._r.hdel(self._feedback_key(project), name)

    def feedback_settings(self, project: str) -> dict[str, dict[str, Any]]:
        """Every explicit setting of ``project``: name (or ``*``) -> {"enabled", "mode"}."""
        with self._errors():
            raw = self._r.hgetall(self._feedback_key(project))
        return {_s(k): json.loads(_s(v)) for k, v in raw.items()}

    def feedback_mode(self, project: str, names: Sequence[str]) -> str | None:
        """What criteria feedback a best-of-N ranked by ``names`` builds (one of FEEDBACK_MODES), or None
        when it is switched off for the project or for any of the criteria.  Default: on, ``pair``."""
        return resolve_feedback(self.feedback_settings(project), names)

    # -- plumbing ------------------------------------------------------------------------------------

    def _transact(self, keys: Sequence[str], txn: Callable[[Any], Any]) -> Any:
        """Run ``txn`` under WATCH; it returns a value (nothing to write) or a thunk after queueing writes."""
        with self._errors():
            for _ in range(_MAX_TXN_RETRIES):
                with self._r.pipeline() as pipe:
                    try:
                        pipe.watch(*keys)
                        out = txn(pipe)
                        if not callable(out):
                            pipe.unwatch()
                            return out
                        pipe.execute()
                        return out()
                    except redis.WatchError:
                        continue
        raise Unavailable("criteria store: too much contention; retry")

    def _errors(self) -> RedisErrors:
        return RedisErrors(self._r, "criteria store")


__all__ = ["CriteriaStore", "CriterionInUse", "CriterionNotFound", "CriterionSummary", "live_holders", "plan_delete",
           "plan_version"]
