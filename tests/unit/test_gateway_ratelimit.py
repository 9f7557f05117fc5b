"""Per-project token buckets: burst, refill, isolation between projects, and the error's words."""

from __future__ import annotations

from gateway.ratelimit import RateLimiter
from services.errors import ResourceExhausted


def test_a_project_gets_its_burst_then_the_rate_and_another_project_is_untouched() -> None:
    now = [100.0]
    limiter = RateLimiter(rate=2.0, burst=3.0, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(3)] == [None, None, None]
    over = limiter.take("a", "feedback.project")
    assert isinstance(over, ResourceExhausted) and over.field == "feedback.project" and over.http_status == 429
    assert "'a'" in over.message and "2 events/s" in over.message and "retry in 0.5 s" in over.message
    assert limiter.take("b") is None  # buckets are per project
    now[0] += 0.5  # one token back at 2/s
    assert limiter.take("a") is None and limiter.take("a") is not None
    now[0] += 60  # never more than the burst
    assert [limiter.take("a") for _ in range(4)].count(None) == 3


def test_no_rate_means_no_limit() -> None:
    limiter = RateLimiter(rate=0.0, burst=0.0)
    assert not limiter.enabled and all(limiter.take("a") is None for _ in range(10_000))
