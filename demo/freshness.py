"""Freshness, the loop's own figure: feedback acknowledged -> first response from a model trained on it.

For each feedback event we know when the gateway acknowledged it (``source_acked_at`` on the
preference record, and the ack time the simulated app saw).  Each checkpoint's metadata lists the
records it added since the previous one, so the first version containing an event is known from the
trainer's own records, not guessed.  Versions are cumulative (every checkpoint warm-starts from the
previous one), so an event is served by the first scorer response whose version is that version or
any later one.  Pure functions: the demo, the benchmark and the tests share them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class VersionContents:
    """A checkpoint version, its order, and the record keys it added since the previous one."""

    version: str
    order: int
    added: tuple[str, ...]
    published: bool = True


@dataclass(frozen=True)
class FreshnessSample:
    key: str
    acked_at: float
    version: str
    served_at: float

    @property
    def seconds(self) -> float:
        return self.served_at - self.acked_at


def first_served_times(responses: Iterable[tuple[float, str]]) -> dict[str, float]:
    """(response time, version) pairs of successful scorer responses -> first time each version served."""
    first: dict[str, float] = {}
    for t, version in responses:
        if version and (version not in first or t < first[version]):
            first[version] = t
    return first


def compute(
    acked_at: Mapping[str, float],
    versions: Sequence[VersionContents],
    first_served: Mapping[str, float],
) -> tuple[list[FreshnessSample], list[str]]:
    """Freshness samples for every acked key, plus the keys not (yet) served by any trained version.

    A key's containing version is the first version (by ``order``) whose ``added`` lists it; it is
    served at the earliest first-served time of that version or any later *published* one.
    """
    ordered = sorted(versions, key=lambda v: v.order)
    # earliest serve time at or after each position, scanning from the newest version backwards
    serve_from: list[float] = [math.inf] * len(ordered)
    best = math.inf
    for i in range(len(ordered) - 1, -1, -1):
        v = ordered[i]
        if v.published and v.version in first_served:
            best = min(best, first_served[v.version])
        serve_from[i] = best
    contained_in: dict[str, int] = {}
    for i, v in enumerate(ordered):
        for key in v.added:
            contained_in.setdefault(key, i)
    samples, unserved = [], []
    for key, t_ack in acked_at.items():
        i = contained_in.get(key)
        if i is None or math.isinf(serve_from[i]):
            unserved.append(key)
            continue
        served_version = next(
            ordered[j].version for j in range(i, len(ordered))
            if ordered[j].published and first_served.get(ordered[j].version) == serve_from[i]
        )
        samples.append(FreshnessSample(key, t_ack, served_version, serve_from[i]))
    return samples, unserved


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples: Sequence[FreshnessSample]) -> dict[str, float | int | None]:
    secs = [s.seconds for s in samples]
    return {
        "freshness_p50_s": percentile(secs, 50),
        "freshness_p99_s": percentile(secs, 99),
        "freshness_max_s": max(secs) if secs else None,
        "freshness_samples": len(secs),
    }


# ------------------------------------------------------------------------------------------------
# convergence: publish -> every scorer replica serving it


def convergence(published: Mapping[str, float],
                first_seen: Mapping[int, Mapping[str, float]]) -> tuple[dict[str, float], list[str]]:
    """Seconds from each version's publish until the last replica served it.

    ``published``: version -> publish time; ``first_seen``: replica -> version -> first time that
    replica reported serving it.  A replica that went straight past a version (a newer one was published
    before it swapped) counts from the first time it served that version or a later published one.
    Returns ({version: seconds}, [versions some replica never reached]), versions in publish order.
    """
    from services.checkpoints import version_sort_key

    out: dict[str, float] = {}
    never: list[str] = []
    for v, t_pub in sorted(published.items(), key=lambda kv: version_sort_key(kv[0])):
        key = version_sort_key(v)
        per_replica = []
        for seen in first_seen.values():
            times = [t for sv, t in seen.items() if sv in published and version_sort_key(sv) >= key]
            per_replica.append(min(times) if times else None)
        if not per_replica or any(t is None for t in per_replica):
            never.append(v)
        else:
            out[v] = max(0.0, max(per_replica) - t_pub)  # type: ignore[type-var]
    return out, never


def summarize_convergence(published: Mapping[str, float], first_seen: Mapping[int, Mapping[str, float]]) -> dict:
    by_version, never = convergence(published, first_seen)
    secs = list(by_version.values())
    return {
        "convergence_p50_s": percentile(secs, 50),
        "convergence_p99_s": percentile(secs, 99),
        "convergence_max_s": max(secs) if secs else None,
        "convergence_by_version": {v: round(s, 3) for v, s in by_version.items()},
        "unconverged_versions": never,
    }
