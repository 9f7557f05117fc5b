"""Redis connections with the timeouts and retry policy every service uses.

Both the sync client (trainer, CLI tools) and the asyncio client (gateway, scorer handlers) come from
here so timeouts are the same everywhere and a down Redis surfaces as Unavailable, not a hang.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from services.errors import Unavailable

_COMMON = {
    "socket_timeout": 5.0,
    "socket_connect_timeout": 5.0,
    "health_check_interval": 30,
    "decode_responses": False,
}


def connect(url: str, *, decode_responses: bool = False) -> redis.Redis:
    """A sync client for ``redis://host:port/db``, retrying transient connection errors briefly."""
    return redis.Redis.from_url(
        url,
        **{**_COMMON, "decode_responses": decode_responses},
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def connect_async(url: str, *, decode_responses: bool = False) -> aioredis.Redis:
    """An asyncio client with the same settings."""
    from redis.asyncio.retry import Retry as AsyncRetry

    return aioredis.Redis.from_url(
        url,
        **{**_COMMON, "decode_responses": decode_responses},
        retry=AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def ping(client: redis.Redis) -> None:
    """Raise Unavailable naming the address when Redis does not answer."""
    try:
        client.ping()
    except redis.RedisError as e:
        kw = client.connection_pool.connection_kwargs
        raise Unavailable(f"Redis at {kw.get('host')}:{kw.get('port')} is unreachable: {type(e).__name__}") from e


class RedisErrors:
    """Context manager turning Redis connection failures into Unavailable naming ``what`` and the address."""

    def __init__(self, client: Any, what: str) -> None:
        self._client = client
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is not None and isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            kw = getattr(getattr(self._client, "connection_pool", None), "connection_kwargs", {}) or {}
            raise Unavailable(f"{self._what}: Redis at {kw.get('host', '?')}:{kw.get('port', '?')} is unreachable "
                              f"({type(exc).__name__}); retry when it is back") from exc
        return False
