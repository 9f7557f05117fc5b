"""Per-project rate limits on ingest: a token bucket per project, in this gateway process.

``rate_limit_events_per_s`` tokens flow into each project's bucket every second, up to
``rate_limit_burst``; every event takes one.  An event that finds the bucket empty is answered
RESOURCE_EXHAUSTED (HTTP 429) naming the project, the limit and when to retry, and is not written: a
batch keeps its events in order, so the first ones that fit are accepted and the rest are refused one
by one.  The limit holds per gateway replica (N replicas admit up to N times the rate); a limit shared
through Redis is a later step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from services.errors import ResourceExhausted


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimiter:
    """Token buckets per project; ``rate <= 0`` means no limit."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, project: str, field: str = "project") -> ResourceExhausted | None:
        """Take one token for ``project``: None when it had one, else the error to answer."""
        if not self.enabled:
            return None
        now = self.clock()
        b = self._buckets.get(project)
        if b is None:
            b = self._buckets[project] = _Bucket(tokens=self.burst, at=now)
        b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
        b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return None
        wait = (1.0 - b.tokens) / self.rate
        return ResourceExhausted(
            f"project {project!r} is over its ingest limit of {self.rate:g} events/s (burst {self.burst:g}); "
            f"retry in {max(0.001, math.ceil(wait * 1000) / 1000):g} s", field=field)
