"""Best-of-N ranked by named criteria (docs/criteria.md): resolve the refs, score, combine, rank.

A request's ``criteria_refs`` name stored criteria of its project (``name`` = newest version,
``name@version``); a plain name that is no stored criterion but a served reward model stands for that
model as a graded criterion (sigma of its reward).  When no ref is a stored criterion the request is
the old reward-model weighting with weights 1 and the engine ranks it exactly as before
(:meth:`NamedCriteria.resolve` returns None).

Scoring is :func:`services.criteria_eval.evaluate` with the engine's served models behind its two
callables: reward criteria (and a ``reward_model`` tie breaker) read one Score call per model, judge
criteria one P(yes) pass of the judge policy.  Replies are ranked by the weighted mean of the criteria
(:func:`~services.criteria_eval.combine`) and, on ties, by the tie breaker of the first criterion that
has one.  Criteria a scorer ranks with are marked in use in the store (renewed at most every
``ttl / 3``), so nobody deletes them from under a live app without ``--force``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Sequence

from services.criteria import Criterion, JudgeSpec, parse_criterion, split_ref
from services.criteria_eval import CriterionResult, combine, evaluate, rank
from services.errors import NotFound
from services.schemas import ChatMessage

#: How long a "this scorer uses the criterion" mark lives without renewal.
IN_USE_TTL_S = 300.0

ScoreFn = Callable[[str, Sequence[ChatMessage], Sequence[str]], Awaitable[list[tuple[float, dict[str, float]]]]]
JudgeProbFn = Callable[[JudgeSpec, Sequence[ChatMessage], Sequence[str]], Awaitable[list[float]]]


@dataclass(frozen=True)
class CriteriaRanking:
    """The outcome for one request: replies best first with every criterion's verdict."""

    order: list[int]
    combined: list[float]
    tie_break: list[float] | None
    results: dict[str, list[CriterionResult]]  # criterion name -> one result per reply
    refs: tuple[str, ...]  # name@version, in request order


class NamedCriteria:
    """Resolves ``criteria_refs`` against the criteria store and ranks replies by them."""

    def __init__(self, definitions: Any | None, holder: str, ttl_s: float = IN_USE_TTL_S) -> None:
        self.definitions = definitions  # the CriteriaStore; None without Redis (no named criteria)
        self.holder = holder
        self.ttl_s = ttl_s
        self._marked: dict[tuple[str, str], float] = {}

    def resolve(self, project: str, refs: Sequence[str], is_reward_model: Callable[[str], bool]) -> list[Criterion] | None:
        """The criteria ``refs`` name, or None when none is a stored criterion (plain reward weighting)."""
        project = project or "default"
        out: list[Criterion] = []
        stored = False
        for i, ref in enumerate(refs):
            name, version = split_ref(ref, f"criteria_refs[{i}]")
            criterion = self._lookup(project, ref)
            if criterion is not None:
                stored = True
                out.append(criterion)
            elif not version and is_reward_model(name):
                out.append(parse_criterion({"name": name, "reward": {"model": name}}, project=project))
            else:
                raise NotFound(f"{ref!r} is neither a criterion of project {project!r} nor a served reward model; "
                               "create it with `prefstream criteria create FILE` or name a served model",
                               field=f"criteria_refs[{i}]")
        if not stored:
            return None
        for c in out:
            if c.version:
                self._mark(c.project, c.name)
        return out

    def _lookup(self, project: str, ref: str) -> Criterion | None:
        if self.definitions is None:
            return None
        try:
            return self.definitions.get(project, ref)
        except NotFound:
            return None

    def _mark(self, project: str, name: str) -> None:
        now = time.monotonic()
        if now - self._marked.get((project, name), -1e9) < self.ttl_s / 3:
            return
        self.definitions.mark_in_use(project, name, self.holder, ttl_s=self.ttl_s)
        self._marked[(project, name)] = now

    async def rank(self, criteria: Sequence[Criterion], prompt: Sequence[ChatMessage], replies: Sequence[str],
                   score: ScoreFn, judge: JudgeProbFn) -> CriteriaRanking:
        """Every criterion on every reply, combined and ranked (ties by the tie breaker)."""
        models = {c.reward.model for c in criteria if c.reward is not None}
        tb_spec = next((c.tie_breaker for c in criteria if c.tie_breaker is not None), None)
        tb_criterion: Criterion | None = None
        if tb_spec is not None and tb_spec.kind == "reward_model":
            models.add(tb_spec.name)
        elif tb_spec is not None:
            tb_criterion = self._lookup(criteria[0].project, tb_spec.name)
            if tb_criterion is None:
                raise NotFound(f"criterion {tb_spec.name!r} (the tie breaker of {criteria[0].ref}) is not stored any "
                               "more; create it again or change the tie breaker", field="tie_breaker")
            if tb_criterion.reward is not None:
                models.add(tb_criterion.reward.model)
        scored: dict[str, list[tuple[float, dict[str, float]]]] = {m: await score(m, prompt, replies) for m in sorted(models)}
        judged: dict[str, list[float]] = {}
        for c in [*criteria, *([tb_criterion] if tb_criterion else [])]:
            if c.judge is not None and c.name not in judged:
                judged[c.name] = await judge(c.judge, prompt, replies)

        def reward_fn(spec: Any, _prompt: Any, _replies: Any) -> list[float]:
            rows = scored[spec.model]
            if spec.attribute:
                missing = [i for i, (_, attrs) in enumerate(rows) if spec.attribute not in attrs]
                if missing:
                    raise LookupError(f"reward model {spec.model} has no attribute head {spec.attribute!r}")
                return [attrs[spec.attribute] for _, attrs in rows]
            return [r for r, _ in rows]

        def judge_fn_for(name: str) -> Callable[..., list[float]]:
            return lambda _spec, _prompt, _replies: judged[name]

        results = {c.name: evaluate(c, prompt, replies, reward_fn, judge_fn_for(c.name)) for c in criteria}
        combined = combine(results, {c.name: c.weight for c in criteria})
        tie_break: list[float] | None = None
        if tb_spec is not None and tb_spec.kind == "reward_model":
            tie_break = [r for r, _ in scored[tb_spec.name]]
        elif tb_criterion is not None:
            tie_break = [r.score for r in evaluate(tb_criterion, prompt, replies, reward_fn, judge_fn_for(tb_criterion.name))]
        return CriteriaRanking(order=rank(combined, tie_break), combined=combined, tie_break=tie_break, results=results,
                               refs=tuple(c.ref for c in criteria))


def per_reply(results: Mapping[str, Sequence[CriterionResult]], index: int) -> dict[str, CriterionResult]:
    return {name: rs[index] for name, rs in results.items()}


__all__ = ["CriteriaRanking", "IN_USE_TTL_S", "NamedCriteria", "per_reply"]
