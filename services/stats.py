"""Paired comparisons: the mean difference of two measurements taken on the same units, and its noise.

The trainer's reward guard (a version's replies against the reference policy's, prompt by prompt) and
the benchmarks' arm comparisons (two arms over the same seeds or test pairs) all ask one question:
how far apart are two paired samples, and how much of that could be noise?  They answer it here.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float | None]:
    """(mean of ``a[i] - b[i]``, its standard error ``stdev / sqrt(n)``); the error is None with one unit.

    The units (prompts, seeds, test pairs) are the pairs ``(a[i], b[i])``: pairing removes what the two
    share (a prompt's difficulty, a seed's data order) from the noise.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired difference needs the same units on both sides, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return statistics.fmean(diffs), se


__all__ = ["paired_difference"]
