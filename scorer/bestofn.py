"""Best-of-N selection: combine several reward models' scores into one ranking (OpenPipe criteria).

Reward models are not on a common scale (one may output -3..3, another 10..40), so adding raw
rewards would let the widest-ranging model decide alone.  Each criterion's rewards are therefore
standardized across the candidates of one request (z-scores: subtract the mean, divide by the
standard deviation) and the combined score is the weighted sum of those z-scores:

    score_i = sum_m  w_m * (r_{m,i} - mean_m) / std_m

A criterion whose rewards are all equal carries no preference and contributes 0.  Ranking is by
combined score, best first; ties keep the candidates' original order, so results are deterministic.
These are pure functions, unit-tested by hand in tests/unit/test_scorer_bestofn.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from services.codec import load_json
from services.errors import InvalidArgument

#: Standard deviations below this count as "all candidates scored the same".
_STD_EPS = 1e-9


@dataclass(frozen=True)
class Criterion:
    """One reward model used as a selection criterion, with its weight in the combined score."""

    model: str
    weight: float = 1.0


def standardize(values: Sequence[float]) -> list[float]:
    """Z-scores of ``values`` (population std); all zeros when they do not vary (or n < 2)."""
    n = len(values)
    if n == 0:
        return []
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / n
    std = math.sqrt(var)
    if std < _STD_EPS:
        return [0.0] * n
    return [(v - mean) / std for v in values]


def combine(rewards: Mapping[str, Sequence[float]], criteria: Sequence[Criterion]) -> list[float]:
    """Weighted sum of standardized rewards, one combined score per candidate.

    ``rewards[model]`` holds that model's raw reward for every candidate, in candidate order.
    """
    if not criteria:
        raise ValueError("combine needs at least one criterion")
    n = len(rewards[criteria[0].model])
    total = [0.0] * n
    for c in criteria:
        r = rewards[c.model]
        if len(r) != n:
            raise ValueError(f"criterion {c.model} scored {len(r)} candidates, expected {n}")
        for i, z in enumerate(standardize(r)):
            total[i] += c.weight * z
    return total


def rank(scores: Sequence[float]) -> list[int]:
    """Candidate indices best first; equal scores keep their original order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def is_empty_reply(text: str) -> bool:
    """Whether a reply has no text (whitespace only): a policy may end a sample at its first token."""
    return not text.strip()


def empties_last(order: Sequence[int], texts: Sequence[str]) -> list[int]:
    """``order`` with the empty replies moved after the others, each group keeping its order.

    An empty reply is no answer, yet a word limit passes it and a reward model may score it anywhere,
    so best-of-N never ranks it over a reply with text.  With empties last, the replies with text are
    a prefix of the ranking, which is what a stored best-of-N keeps (gateway/openai_compat.py).
    """
    return sorted(order, key=lambda i: is_empty_reply(texts[i]))


def validate_criteria(criteria: Sequence[Criterion], field: str = "criteria") -> list[Criterion]:
    """Check names and weights; the error names the offending entry."""
    seen: set[str] = set()
    out = []
    for i, c in enumerate(criteria):
        where = f"{field}[{i}]"
        if not c.model or not all(ch.isalnum() or ch in "._-" for ch in c.model):
            raise InvalidArgument(f"{where}.model", f"{c.model!r} is not a reward model name (letters, digits, . _ -)")
        if not math.isfinite(c.weight):
            raise InvalidArgument(f"{where}.weight", f"must be a finite number, got {c.weight!r}")
        if c.model in seen:
            raise InvalidArgument(f"{where}.model", f"{c.model!r} is listed twice; give each reward model once")
        seen.add(c.model)
        out.append(c)
    if out and all(c.weight == 0 for c in out):
        raise InvalidArgument(field, "all weights are 0, which ranks nothing; give at least one non-zero weight")
    return out


def _weight(raw: object, where: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise InvalidArgument(where, f"weight must be a number, got {raw!r}")
    try:
        return float(raw)
    except ValueError:
        raise InvalidArgument(where, f"weight must be a number, got {raw!r}") from None


def parse_criteria(value: str, field: str = "op-criteria") -> list[Criterion]:
    """Parse an ``op-criteria`` header value into criteria.

    Accepted forms (weights default to 1):
      * a JSON list of names: ``["helpfulness", "safety"]``
      * a JSON list of objects: ``[{"model": "helpfulness", "weight": 2}, {"name": "safety"}]``
      * a JSON object of weights: ``{"helpfulness": 2, "safety": 1}``
      * comma-separated names with optional weights: ``helpfulness:2, safety`` (``=`` also works)
    """
    text = value.strip()
    if not text:
        raise InvalidArgument(field, "is empty; list reward model names, e.g. [\"reward\"] or reward:1,safety:0.5")
    items: list[Criterion] = []
    if text[0] in "[{":
        data = load_json(text, field)
        if isinstance(data, dict):
            items = [Criterion(str(k), _weight(v, f"{field}.{k}")) for k, v in data.items()]
        elif isinstance(data, list):
            for i, entry in enumerate(data):
                where = f"{field}[{i}]"
                if isinstance(entry, str):
                    items.append(Criterion(entry.strip()))
                elif isinstance(entry, dict):
                    name = entry.get("model", entry.get("name"))
                    if not isinstance(name, str):
                        raise InvalidArgument(f"{where}.model", "each object needs a string \"model\" (or \"name\")")
                    unknown = set(entry) - {"model", "name", "weight"}
                    if unknown:
                        raise InvalidArgument(where, f"unknown keys {sorted(unknown)}; use model and weight")
                    items.append(Criterion(name.strip(), _weight(entry.get("weight", 1.0), f"{where}.weight")))
                else:
                    raise InvalidArgument(where, "must be a model name or an object with model and weight")
        else:
            raise InvalidArgument(field, "must be a JSON list or object of reward model names")
    else:
        for i, part in enumerate(p.strip() for p in text.split(",")):
            if not part:
                continue
            name, sep, w = part.replace("=", ":").partition(":")
            items.append(Criterion(name.strip(), _weight(w.strip(), f"{field}[{i}].weight") if sep else 1.0))
    if not items:
        raise InvalidArgument(field, "lists no reward model")
    return validate_criteria(items, field)


def parse_criteria_header(value: str, field: str = "op-criteria") -> tuple[list[Criterion], list[str]]:
    """(weighted reward models, named criteria refs) of an ``op-criteria`` header; one of them is empty.

    Plain names -- a JSON list of strings, or comma-separated names without weights -- are refs:
    ``["concise", "no-boilerplate@v2"]`` or ``concise, helpful``.  The scorer looks each up among the
    project's stored criteria (``name@version`` pins a version) and takes a name that is no criterion
    for a served reward model, so a list of reward model names ranks exactly as before.  Any weight
    (``reward:2``, ``{"model": ..., "weight": ...}``, a JSON object) makes it the reward-model form of
    :func:`parse_criteria`, where names are models only.
    """
    text = value.strip()
    names: list[str] | None = None
    if text.startswith("["):
        try:
            data = load_json(text, field)
        except InvalidArgument:
            data = None  # parse_criteria names what is wrong
        if isinstance(data, list) and data and all(isinstance(x, str) for x in data):
            names = [x.strip() for x in data]
    elif text and text[0] != "{" and ":" not in text and "=" not in text:
        names = [p.strip() for p in text.split(",") if p.strip()]
    if names is None:
        return parse_criteria(value, field), []
    from services.criteria import split_ref

    for i, name in enumerate(names):
        split_ref(name, f"{field}[{i}]")
    if len(set(names)) != len(names):
        raise InvalidArgument(field, "names a criterion twice")
    if not names:
        raise InvalidArgument(field, "lists no criterion")
    return [], names


__all__ = ["Criterion", "combine", "empties_last", "is_empty_reply", "parse_criteria", "parse_criteria_header", "rank", "standardize", "validate_criteria"]
