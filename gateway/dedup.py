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

# Compare-and-set: confirm only the marker we own (a marker that expired and was re-claimed by a
# retry belongs to that retry).
_CONFIRM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
# Compare-and-delete: release only our own marker.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
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
    """Batch claim/confirm/release of event ids in Redis (one pipeline round trip per batch)."""

    def __init__(self, client: aioredis.Redis, *, pending_ttl_s: float, done_ttl_s: float) -> None:
        self._redis = client
        self._pending_ms = int(pending_ttl_s * 1000)
        self._done_ms = int(done_ttl_s * 1000)
        self._confirm = client.register_script(_CONFIRM)
        self._release = client.register_script(_RELEASE)

    async def claim(self, keys: Sequence[str]) -> list[Claim]:
        """Try to own each key; keys already done or in flight are reported as such."""
        if not keys:
            return []
        claims = [Claim(key=k, token=b"p:" + secrets.token_hex(8).encode()) for k in keys]
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for c in claims:
                    pipe.set(c.key, c.token, nx=True, px=self._pending_ms)
                    pipe.get(c.key)
                results = await pipe.execute()
        except (redis.RedisError, OSError) as e:
            raise Unavailable(f"dedup store (Redis) is unreachable: {type(e).__name__}") from e
        for i, c in enumerate(claims):
            was_set, value = results[2 * i], results[2 * i + 1]
            if was_set:
                c.owned = True
            elif value is not None and value.startswith(b"d:"):
                c.done = json.loads(value[2:])
        return claims

    async def confirm(self, claims: Sequence[Claim], results: Sequence[dict[str, Any]]) -> None:
        """Mark owned claims as written, remembering ``results`` for later duplicates."""
        await self._run(self._confirm, [(c, [c.token, b"d:" + json.dumps(r, separators=(",", ":")).encode(), self._done_ms])
                                        for c, r in zip(claims, results) if c.owned])

    async def release(self, claims: Sequence[Claim]) -> None:
        """Give owned claims back after a failed write so a retry can write the event."""
        await self._run(self._release, [(c, [c.token]) for c in claims if c.owned])

    async def _run(self, script: Any, calls: list[tuple[Claim, list[Any]]]) -> None:
        if not calls:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for c, args in calls:
                    await script(keys=[c.key], args=args, client=pipe)
                await pipe.execute()
        except (redis.RedisError, OSError) as e:
            raise Unavailable(f"dedup store (Redis) is unreachable: {type(e).__name__}") from e
        for c, _ in calls:
            c.owned = False

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
