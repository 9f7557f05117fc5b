"""Exactly-once-per-event-id writes across client retries, without ever faking an acknowledgement.

A client that retries an event (same ``event_id``) must not get it written twice, and a write that
failed must not be remembered as done.  Each event id therefore goes through three states in Redis
(key ``prefstream:dedup:<project>:<event_id>``):

1. **claim**: ``SET key "p:<token>" NX PX pending_ttl`` -- only one writer at a time owns the id.  The
   short TTL (longer than the Kafka ack timeout) frees the id if the gateway dies mid-write.
2. **confirm** after Kafka acknowledged: a compare-and-set turns our pending marker into
   ``"d:<result json>"`` with the long dedup TTL; a retry now answers "duplicate" with the original
   result (completion id, ack time).
3. **release** when the write failed: a compare-and-delete removes our marker only, so the client's
   retry writes it again.

A retry that finds another attempt's pending marker waits (bounded) for it to confirm or release.
The one window left is a crash after Kafka acked and before the confirm: the id is freed when the
pending marker expires and a retry writes the event a second time.  Downstream that is harmless:
the processor derives records with deterministic ids from event ids, so the duplicate maps onto the
same preference records (documented in docs/gateway.md).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import redis
import redis.asyncio as aioredis

from services.errors import Unavailable

_KEY = "prefstream:dedup:{}:{}"

# Every script works on a whole batch in one round trip (a per-key command costs more in redis-py
# than the write itself).  Keys of one batch must live on one Redis node (no cluster slots here).

# Claim each key with a pending marker unless it exists; answer "" (claimed) or the value found.
_CLAIM = """
local out = {}
for i, k in ipairs(KEYS) do
  if redis.call('SET', k, ARGV[1] .. i, 'NX', 'PX', ARGV[2]) then
    out[i] = ''
  else
    out[i] = redis.call('GET', k) or ''
  end
end
return out
"""
# Compare-and-set: turn our own pending markers into "done" (a marker that expired and was re-claimed
# by a retry belongs to that retry); then plain SETs of extra keys (ARGV: n, done_ms, extra_ms,
# token_1, value_1, ..., token_n, value_n, extra values...).
_CONFIRM = """
local n = tonumber(ARGV[1])
for i = 1, n do
  if redis.call('GET', KEYS[i]) == ARGV[2 + 2 * i] then
    redis.call('SET', KEYS[i], ARGV[3 + 2 * i], 'PX', ARGV[2])
  end
end
for j = n + 1, #KEYS do
  redis.call('SET', KEYS[j], ARGV[3 + 2 * n + (j - n)], 'PX', ARGV[3])
end
return n
"""
# Compare-and-delete: release only our own markers.
_RELEASE = """
local released = 0
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[i] then
    released = released + redis.call('DEL', k)
  end
end
return released
"""


def dedup_key(project: str, event_id: str) -> str:
    return _KEY.format(project, event_id)


@dataclass
class Claim:
    """The outcome of claiming one event id.

    ``owned``: we hold the pending marker and must write then confirm or release.  Otherwise
    ``done`` holds the earlier write's result (a duplicate), or neither is set: another attempt is
    in flight (see :meth:`Deduper.wait`).
    """

    key: str
    token: bytes
    owned: bool = False
    done: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Deduper:
    """Batch claim/confirm/release of event ids in Redis: one script call per batch and step."""

    def __init__(self, client: aioredis.Redis, *, pending_ttl_s: float, done_ttl_s: float) -> None:
        self._redis = client
        self._pending_ms = int(pending_ttl_s * 1000)
        self._done_ms = int(done_ttl_s * 1000)
        self._claim = client.register_script(_CLAIM)
        self._confirm = client.register_script(_CONFIRM)
        self._release = client.register_script(_RELEASE)

    async def claim(self, keys: Sequence[str]) -> list[Claim]:
        """Try to own each key; keys already done or in flight are reported as such."""
        if not keys:
            return []
        prefix = "p:" + secrets.token_hex(8) + ":"
        try:
            values = await self._claim(keys=list(keys), args=[prefix, self._pending_ms])
        except (redis.RedisError, OSError) as e:
            raise Unavailable(f"dedup store (Redis) is unreachable: {type(e).__name__}") from e
        claims = []
        for i, (k, value) in enumerate(zip(keys, values), start=1):
            c = Claim(key=k, token=f"{prefix}{i}".encode())
            if value == b"":
                c.owned = True
            elif value.startswith(b"d:"):
                c.done = json.loads(value[2:])
            claims.append(c)
        return claims

    async def confirm(
        self,
        claims: Sequence[Claim],
        results: Sequence[dict[str, Any]],
        *,
        also_set: Sequence[tuple[str, bytes | str]] = (),
        also_set_ms: int = 0,
    ) -> None:
        """Mark owned claims as written, remembering ``results`` for later duplicates.

        ``also_set`` are extra (key, value) pairs written in the same round trip with TTL ``also_set_ms``.
        """
        owned = [(c, r) for c, r in zip(claims, results) if c.owned]
        if not owned and not also_set:
            return
        keys = [c.key for c, _ in owned] + [k for k, _ in also_set]
        args: list[Any] = [len(owned), self._done_ms, also_set_ms or self._done_ms]
        for c, r in owned:
            args += [c.token, b"d:" + json.dumps(r, separators=(",", ":")).encode()]
        args += [v for _, v in also_set]
        await self._call(self._confirm, keys, args)
        for c, _ in owned:
            c.owned = False

    async def release(self, claims: Sequence[Claim]) -> None:
        """Give owned claims back after a failed write so a retry can write the event."""
        owned = [c for c in claims if c.owned]
        if not owned:
            return
        await self._call(self._release, [c.key for c in owned], [c.token for c in owned])
        for c in owned:
            c.owned = False

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> None:
        try:
            await script(keys=keys, args=args)
        except (redis.RedisError, OSError) as e:
            raise Unavailable(f"dedup store (Redis) is unreachable: {type(e).__name__}") from e

    async def wait(self, claim: Claim, timeout_s: float, poll_s: float = 0.02) -> Claim:
        """Wait for another attempt's pending marker on ``claim.key`` to be confirmed or released.

        Returns a Claim that is ``done`` (a duplicate) or ``owned`` (the other attempt failed and we
        now own the id); raises Unavailable if the other attempt is still in flight at the deadline.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            (c,) = await self.claim([claim.key])
            if c.owned or c.done is not None:
                return c
            if time.monotonic() >= deadline:
                raise Unavailable("an earlier attempt with this event_id is still being written; retry shortly")
            await asyncio.sleep(poll_s)
