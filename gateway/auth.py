"""Per-project API keys: created once, stored only as salted HMACs in Redis, checked on every call.

A key reads ``psk_<key_id>_<secret>``.  Redis holds, under ``prefstream:apikey:<key_id>``, the project,
a random per-key salt and ``HMAC-SHA256(pepper, salt || secret)`` where the pepper is the gateway's
``auth_pepper`` secret (never stored in Redis): a copy of Redis alone does not let anyone forge or
recover a key.  ``key_id`` is public (it is what ``keys list`` shows and ``keys revoke`` takes).

The gateway caches a verified key for ``auth_cache_s`` seconds so the hot path does not ask Redis for
every event; a revoke takes effect within that time.  Missing/unknown/revoked keys are
UNAUTHENTICATED; a valid key used for another project's events is PERMISSION_DENIED.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import redis
import redis.asyncio as aioredis

from services.audit import audit
from services.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated, Unavailable

log = logging.getLogger(__name__)

KEY_PREFIX = "psk"
_REDIS_KEY = "prefstream:apikey:{}"
_PROJECT_SET = "prefstream:apikeys:{}"
MISSING_KEY_HELP = (
    "missing API key; send 'authorization: Bearer <key>' (or 'x-api-key: <key>'); "
    "create one with `prefstream keys create --project <project>`"
)


#: What a key may do: ``ingest`` (log completions and feedback, batches, imports) and ``score`` (the
#: OpenAI-compatible scoring and generation routes the gateway forwards to the scorer).  Changing what is
#: served (pin, rollback, criteria) is the scorer's admin token, not a project key.
SCOPES: tuple[str, ...] = ("ingest", "score")


def check_scopes(scopes: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise InvalidArgument("scope", f"{', '.join(unknown) or 'none given'}: a key's scopes are some of "
                              f"{', '.join(SCOPES)}")
    return tuple(sorted(set(scopes)))


@dataclass(frozen=True)
class Principal:
    """Who is calling: the project its key belongs to (None when auth is disabled: any project) and
    what the key may do."""

    project: str | None
    key_id: str = ""
    scopes: frozenset[str] = frozenset(SCOPES)

    def require(self, scope: str) -> None:
        """PERMISSION_DENIED unless the key has ``scope``."""
        if scope not in self.scopes:
            raise PermissionDenied(
                f"the API key {self.key_id or ''} may not {scope} (its scopes: {', '.join(sorted(self.scopes)) or 'none'}); "
                f"create one that may with `prefstream keys create --project {self.project} --scope {scope}`",
                field="authorization",
            )

    def authorize(self, project: str, field: str) -> None:
        """PERMISSION_DENIED unless this principal may write events of ``project``."""
        if self.project is not None and project != self.project:
            raise PermissionDenied(
                f"the API key is for project {self.project!r}, not {project!r}; use a key of {project!r}",
                field=field,
            )


ANONYMOUS = Principal(project=None)


@dataclass(frozen=True)
class KeyInfo:
    """What ``keys list`` shows about a key (never the secret)."""

    key_id: str
    project: str
    created_at: float
    label: str = ""
    revoked_at: float = 0.0
    scopes: tuple[str, ...] = SCOPES

    @property
    def active(self) -> bool:
        return not self.revoked_at


def hash_secret(secret: str, salt: bytes, pepper: str) -> str:
    """HMAC-SHA256 keyed by the pepper over salt || secret, hex."""
    return hmac.new(pepper.encode(), salt + secret.encode(), hashlib.sha256).hexdigest()


def parse_key(key: str) -> tuple[str, str]:
    """(key_id, secret) of ``psk_<key_id>_<secret>``; Unauthenticated when it is not shaped like a key."""
    prefix, _, rest = key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != KEY_PREFIX or not key_id or not secret or not all(c in "0123456789abcdef" for c in key_id):
        raise Unauthenticated("malformed API key; keys look like psk_<id>_<secret>")
    return key_id, secret


def key_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The API key in ``authorization: Bearer <key>`` or ``x-api-key: <key>`` (header names case-insensitive)."""
    lowered = {k.lower(): v for k, v in metadata.items()}
    auth = lowered.get("authorization")
    if auth:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        raise Unauthenticated("authorization header must be 'Bearer <key>'")
    key = lowered.get("x-api-key")
    return key.strip() if key and key.strip() else None


def _decode(h: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in h.items()}


# ---------------------------------------------------------------------------------------------
# Key management (sync: the CLI and tests)


def create_key(client: redis.Redis, project: str, *, pepper: str, label: str = "",
               scopes: Sequence[str] = SCOPES) -> tuple[str, KeyInfo]:
    """Create a key for ``project`` that may do ``scopes``; returns the full key (shown once) and its info."""
    from gateway.validation import Limits, check_project

    check_project(project, "project", Limits())
    scopes = check_scopes(scopes)
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    now = time.time()
    record = {
        "project": project,
        "salt": salt.hex(),
        "hash": hash_secret(secret, salt, pepper),
        "created_at": repr(now),
        "label": label,
        "revoked_at": "0",
        "scopes": ",".join(scopes),
    }
    pipe = client.pipeline(transaction=True)
    pipe.hset(_REDIS_KEY.format(key_id), mapping=record)
    pipe.sadd(_PROJECT_SET.format(project), key_id)
    pipe.execute()
    log.info("created API key %s for project %s (scopes %s)", key_id, project, ",".join(scopes))
    audit("keys.create", "cli", "OK", {"project": project, "name": key_id, "scopes": ",".join(scopes)})
    return f"{KEY_PREFIX}_{key_id}_{secret}", KeyInfo(key_id=key_id, project=project, created_at=now, label=label,
                                                      scopes=scopes)


def revoke_key(client: redis.Redis, key_or_id: str) -> KeyInfo:
    """Revoke a key given its id or the full key; NotFound when there is no such key."""
    key_id = parse_key(key_or_id)[0] if key_or_id.startswith(KEY_PREFIX + "_") else key_or_id
    if not key_id or not all(c in "0123456789abcdef" for c in key_id):
        raise InvalidArgument("key", f"{key_or_id!r} is neither a key id (hex) nor a key (psk_...)")
    name = _REDIS_KEY.format(key_id)
    h = client.hgetall(name)
    if not h:
        raise NotFound(f"no API key with id {key_id}")
    client.hset(name, "revoked_at", repr(time.time()))
    info = _info(key_id, _decode(h))
    log.info("revoked API key %s of project %s", key_id, info.project)
    audit("keys.revoke", "cli", "OK", {"project": info.project, "name": key_id})
    return info


def list_keys(client: redis.Redis, project: str | None = None) -> list[KeyInfo]:
    """Keys of ``project`` (every project when None), oldest first."""
    if project is not None:
        ids = sorted(i.decode() for i in client.smembers(_PROJECT_SET.format(project)))
    else:
        ids = sorted(k.decode().rsplit(":", 1)[1] for k in client.scan_iter(match=_REDIS_KEY.format("*"), count=500))
    out = []
    for key_id in ids:
        h = client.hgetall(_REDIS_KEY.format(key_id))
        if h:
            out.append(_info(key_id, _decode(h)))
    return sorted(out, key=lambda k: (k.project, k.created_at))


def _info(key_id: str, h: Mapping[str, str]) -> KeyInfo:
    return KeyInfo(
        key_id=key_id,
        project=h.get("project", ""),
        created_at=float(h.get("created_at", 0) or 0),
        label=h.get("label", ""),
        revoked_at=float(h.get("revoked_at", 0) or 0),
        scopes=_scopes(h),
    )


def _scopes(h: Mapping[str, str]) -> tuple[str, ...]:
    """A key's scopes; keys made before scopes existed may do everything they always could."""
    raw = h.get("scopes")
    return tuple(s for s in raw.split(",") if s) if raw is not None else SCOPES


# ---------------------------------------------------------------------------------------------
# Verification (async: the gateway)


class Authenticator:
    """Turns request metadata into a :class:`Principal`, with a short cache of verified keys."""

    def __init__(self, client: aioredis.Redis | None, *, pepper: str, enabled: bool = True, cache_s: float = 5.0) -> None:
        if enabled and client is None:
            raise ValueError("auth is enabled but no Redis client was given")
        self._redis = client
        self._pepper = pepper
        self.enabled = enabled
        self._cache_s = cache_s
        self._cache: dict[str, tuple[Principal, float]] = {}

    async def authenticate(self, metadata: Mapping[str, str], scope: str | None = None) -> Principal:
        """The caller's principal; with ``scope``, PERMISSION_DENIED unless its key has that scope."""
        principal = await self._authenticate(metadata)
        if scope is not None:
            principal.require(scope)
        return principal

    async def _authenticate(self, metadata: Mapping[str, str]) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        key = key_from_metadata(metadata)
        if key is None:
            raise Unauthenticated(MISSING_KEY_HELP)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        principal = await self._verify(key)
        if self._cache_s > 0:
            if len(self._cache) > 10_000:  # bounded: drop everything rather than track LRU order
                self._cache.clear()
            self._cache[key] = (principal, now + self._cache_s)
        return principal

    async def _verify(self, key: str) -> Principal:
        key_id, secret = parse_key(key)
        if self._redis is None:  # unreachable: __init__ requires a client when auth is enabled
            raise Unavailable("API keys cannot be checked: no Redis configured")
        try:
            h = await self._redis.hgetall(_REDIS_KEY.format(key_id))
        except (redis.RedisError, OSError) as e:
            raise Unavailable(f"cannot check the API key: Redis is unreachable ({type(e).__name__})") from e
        if not h:
            raise Unauthenticated("invalid API key")
        rec = _decode(h)
        expected = hash_secret(secret, bytes.fromhex(rec.get("salt", "")), self._pepper)
        if not hmac.compare_digest(expected, rec.get("hash", "")):
            raise Unauthenticated("invalid API key")
        if float(rec.get("revoked_at", 0) or 0):
            raise Unauthenticated("this API key was revoked; create a new one with `prefstream keys create`")
        return Principal(project=rec["project"], key_id=key_id, scopes=frozenset(_scopes(rec)))
