"""Evaluating criteria on the replies of a best-of-N, combining them, and turning the result into a preference.

Everything here is a pure function: the rules need no model, and the model-backed criteria get their
numbers from callables the caller injects (the scorer passes its served reward models and policies),
so the whole path from definitions to a :class:`~services.schemas.PreferenceRecord` is unit-tested
without a server.

Scores.  Every criterion scores a reply in [0, 1]:

* a rule scores 1 (pass) or 0 (fail); a rule criterion is 1 when all its rules pass (``mode: all``)
  or the fraction that pass (``mode: mean``);
* a judge criterion is P(yes) as the judge callable returns it;
* a reward criterion with a threshold is 1 when the reward is >= the threshold, else 0; without one
  it is the logistic of the reward, sigma(r).  A reward model trained with the Bradley-Terry loss
  (Ouyang et al. 2022, eq. 1: loss = -log sigma(r(x, y_w) - r(x, y_l))) makes sigma(r) the probability
  that the reply beats one of reward 0; it is monotone, so it never reorders that model's own ranking,
  and it puts an unbounded reward on the scale of the pass/fail criteria it is combined with.

Combination is the weighted mean of the criteria's scores, sum_c w_c s_c / sum_c w_c, also in [0, 1].
Replies whose combined scores tie are ordered by the tie-breaker's score; replies that tie on both
never form a pair (:func:`preferences_from_scores`).

Results follow OpenPipe's ``criteria_results`` shape: per reply, a mapping from criterion to
``{"status": "success" | "error", "score": float, "explanation": str}``; ours adds ``passed`` (for
pass/fail criteria), ``version`` and, for rule criteria, the per-rule results
``rules: [{"rule", "score", "explanation"}]`` (:meth:`CriterionResult.to_dict`).
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from services.criteria import Criterion, JudgeSpec, RewardSpec, Rule, regex_flags
from services.kinds import FeedbackKind
from services.schemas import ChatMessage, PreferenceRecord, make_record_id

#: ``reward_fn(spec, prompt, replies)`` -> the raw reward (of ``spec.attribute`` if set) of every reply.
RewardFn = Callable[[RewardSpec, Sequence[ChatMessage], Sequence[str]], Sequence[float]]
#: ``judge_fn(spec, prompt, replies)`` -> P(yes) in [0, 1] for every reply.
JudgeFn = Callable[[JudgeSpec, Sequence[ChatMessage], Sequence[str]], Sequence[float]]

#: Combined scores closer than this are a tie (floating-point sums of equal terms differ in the last bits).
TIE_EPS = 1e-9
#: The prefix that marks a criterion reference among a record's ``source_event_ids``.
CRITERION_SOURCE_PREFIX = "criterion:"
#: What a best-of-N ranked by criteria becomes (:func:`preferences_from_scores`); the store, the CLI
#: and the gateway's validation all read this tuple.
#: Each mode with the one-line summary progress lines print (``preferences_from_scores`` documents them).
FEEDBACK_MODE_SUMMARIES: dict[str, str] = {
    "pair": "best over worst",
    "pairs": "best over worst, and best over the worst of its class",
    "matched": "one length-matched pair",
    "matched_pairs": "a length-matched pair, and the best class's own one",
    "bracket": "a length-matched pair, and its chosen reply over its class's weakest",
    "trim": "a failing reply's longest passing sentence prefix over it and over its shortest, else one length-matched pair",
    "trim_next": ("a failing reply's longest passing sentence prefix over the reply cut one sentence later and over "
                  "its shortest, else one length-matched pair"),
    "trim_bracket": ("trim_next's pairs, and the passing reply the tie breaker ranks highest over the one it ranks "
                     "lowest"),
    "trim_step": ("a failing reply's longest passing sentence prefix over the reply cut one sentence later and over "
                  "its prefix one sentence shorter, else one length-matched pair"),
    "trim_open": ("a failing reply's longest passing sentence prefix over the reply cut one sentence later going on "
                  "(not ending the turn) and over its shortest, else one length-matched pair"),
    "trim_stop": ("a failing reply's longest passing sentence prefix over the reply cut one sentence later going on, "
                  "that pair alone, else one length-matched pair"),
    "trim_word": ("a failing reply's longest passing sentence prefix over the same prefix going on with the reply's "
                  "next word, that pair alone, else one length-matched pair"),
    "ranking": "the whole ranking",
}
FEEDBACK_MODES: tuple[str, ...] = tuple(FEEDBACK_MODE_SUMMARIES)
#: The modes that cut pairs from a failing reply (they need ``trim``, :func:`prefix_trimmer`).
TRIM_MODES: tuple[str, ...] = ("trim", "trim_next", "trim_bracket", "trim_step", "trim_open", "trim_stop", "trim_word")
#: The trim modes whose first pair rejects the reply cut one sentence later, not the whole reply.
CUT_LATER_MODES: tuple[str, ...] = ("trim_next", "trim_bracket", "trim_step", "trim_open", "trim_stop", "trim_word")
#: The trim modes whose first pair's rejected reply goes on (:attr:`PreferenceRecord.unfinished`).
GOING_ON_MODES: tuple[str, ...] = ("trim_open", "trim_stop", "trim_word")
#: The trim modes that build their first pair alone.
ONE_PAIR_TRIM_MODES: tuple[str, ...] = ("trim_stop", "trim_word")
#: ``matched`` and ``matched_pairs``: two replies of one criteria class form a (tie breaker's) pair
#: only when their word counts differ by at most this share of the longer one.
MATCHED_LENGTH_TOLERANCE = 0.2
#: ``trim``: where a sentence ends (one place a reply may be cut; a line break is the other): at ``.``,
#: ``!``, ``?`` or ``…``, with any closing quotes or brackets, that whitespace follows.
_SENTENCE_END = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*(?=\s)")
#: ``trim``: the rules a cut repairs.  A reply that breaks any other rule (a pattern, a banned word) is
#: not cut: its repair is rewording, and a cut before the offending sentence teaches stopping there.
LENGTH_LIMITS = ("max_words", "max_chars")
#: A line that ends in one of these introduces what follows (``Tips:``), so it is no place to stop.
_OPEN_LINE_ENDS = (":", ",", ";", "-", "(")

SUCCESS = "success"
ERROR = "error"


# ---------------------------------------------------------------------------------------------
# Rules: one reply -> 1 (pass) or 0 (fail).


def count_words(text: str) -> int:
    """Words are runs of non-whitespace (Unicode whitespace included); text without spaces is one word."""
    return len(text.split())


def mean_words(texts: Sequence[str]) -> float:
    """Mean :func:`count_words` over ``texts`` (NaN for none): the length a policy's replies are judged by."""
    return sum(count_words(t) for t in texts) / len(texts) if texts else math.nan


def max_words(text: str, limit: int) -> int:
    return int(count_words(text) <= limit)


def min_words(text: str, limit: int) -> int:
    return int(count_words(text) >= limit)


def max_chars(text: str, limit: int) -> int:
    """Characters are Unicode code points (``len``), not bytes."""
    return int(len(text) <= limit)


@functools.lru_cache(maxsize=512)
def _compiled(pattern: str, flags: str) -> re.Pattern[str]:
    return re.compile(pattern, regex_flags(flags))


def regex_must_match(text: str, pattern: str, flags: str = "") -> int:
    """Pass when the pattern matches anywhere in the reply (``re.search``; anchor with ^ and $)."""
    return int(_compiled(pattern, flags).search(text) is not None)


def regex_must_not_match(text: str, pattern: str, flags: str = "") -> int:
    return 1 - regex_must_match(text, pattern, flags)


def _found(text: str, needles: Sequence[str], flags: str) -> list[str]:
    if "i" in flags:
        folded = text.casefold()
        return [n for n in needles if n.casefold() in folded]
    return [n for n in needles if n in text]


def contains_any(text: str, needles: Sequence[str], flags: str = "") -> int:
    """Pass when at least one of ``needles`` is a substring (``i``: compared case-folded)."""
    return int(bool(_found(text, needles, flags)))


def contains_none(text: str, needles: Sequence[str], flags: str = "") -> int:
    return int(not _found(text, needles, flags))


def json_valid(text: str) -> int:
    """Pass when the whole reply (surrounding whitespace allowed) is one JSON value; an empty reply fails."""
    try:
        json.loads(text)
    except ValueError:
        return 0
    return 1


def check_rule(rule: Rule, text: str) -> "RuleResult":
    """One rule on one reply, with an explanation a person can act on."""
    k, v = rule.kind, rule.value
    if k == "max_words":
        n = count_words(text)
        score, why = max_words(text, v), f"{n} words (limit {v})"  # type: ignore[arg-type]
    elif k == "min_words":
        n = count_words(text)
        score, why = min_words(text, v), f"{n} words (at least {v})"  # type: ignore[arg-type]
    elif k == "max_chars":
        score, why = max_chars(text, v), f"{len(text)} characters (limit {v})"  # type: ignore[arg-type]
    elif k == "regex_must_match":
        score = regex_must_match(text, v, rule.flags)  # type: ignore[arg-type]
        why = "pattern found" if score else "pattern not found"
    elif k == "regex_must_not_match":
        score = regex_must_not_match(text, v, rule.flags)  # type: ignore[arg-type]
        why = "pattern not found" if score else "pattern found"
    elif k == "contains_any":
        hits = _found(text, v, rule.flags)  # type: ignore[arg-type]
        score, why = int(bool(hits)), (f"contains {hits[0]!r}" if hits else "contains none of them")
    elif k == "contains_none":
        hits = _found(text, v, rule.flags)  # type: ignore[arg-type]
        score, why = int(not hits), (f"contains {hits[0]!r}" if hits else "contains none of them")
    elif k == "json_valid":
        score = json_valid(text)
        why = "valid JSON" if score else "not valid JSON"
    else:  # parse_criterion admits only known rules
        raise ValueError(f"unknown rule {k!r}")
    return RuleResult(rule=rule.describe(), score=float(score), explanation=why)


# ---------------------------------------------------------------------------------------------
# Results.


@dataclass(frozen=True)
class RuleResult:
    rule: str
    score: float
    explanation: str

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "score": self.score, "explanation": self.explanation}


@dataclass(frozen=True)
class CriterionResult:
    """One criterion on one reply, in OpenPipe's ``criteria_results`` entry shape (see the module doc)."""

    criterion: str  # the name
    version: str
    status: str  # SUCCESS or ERROR (the model behind it could not score; score is then 0)
    score: float  # in [0, 1]
    explanation: str = ""
    passed: bool | None = None  # rules and thresholded rewards; None for graded scores
    rules: tuple[RuleResult, ...] = ()
    raw_score: float | None = None  # the reward before the threshold or the logistic

    @property
    def ref(self) -> str:
        return f"{self.criterion}@{self.version}" if self.version else self.criterion

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status, "score": self.score, "explanation": self.explanation,
                               "version": self.version}
        if self.passed is not None:
            out["passed"] = self.passed
        if self.rules:
            out["rules"] = [r.to_dict() for r in self.rules]
        if self.raw_score is not None:
            out["raw_score"] = self.raw_score
        return out


def criteria_results(results: Mapping[str, Sequence[CriterionResult]], index: int) -> dict[str, dict[str, Any]]:
    """The ``criteria_results`` object of reply ``index``: criterion name -> its result dict."""
    return {name: rs[index].to_dict() for name, rs in results.items()}


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _rules_result(c: Criterion, text: str) -> CriterionResult:
    parts = tuple(check_rule(r, text) for r in c.rules)
    passed = sum(1 for p in parts if p.score == 1.0)
    if c.mode == "mean":
        score = passed / len(parts)
    else:
        score = float(passed == len(parts))
    failed = [p for p in parts if p.score != 1.0]
    why = (f"{passed}/{len(parts)} rules pass" + (f"; failed: {failed[0].rule} ({failed[0].explanation})"
                                                   if failed else ""))
    return CriterionResult(criterion=c.name, version=c.version, status=SUCCESS, score=score, explanation=why,
                           passed=passed == len(parts), rules=parts)


def _checked(values: Sequence[float], n: int, what: str) -> list[float]:
    out = [float(v) for v in values]
    if len(out) != n:
        raise ValueError(f"{what} returned {len(out)} scores for {n} replies")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what} returned a score that is not a finite number")
    return out


def evaluate(
    criterion: Criterion,
    prompt: Sequence[ChatMessage],
    replies: Sequence[str],
    reward_fn: RewardFn | None = None,
    judge_fn: JudgeFn | None = None,
) -> list[CriterionResult]:
    """One :class:`CriterionResult` per reply, in reply order.

    A reward or judge criterion needs its callable; a callable that raises (the model is not served,
    it timed out) gives every reply status ``error`` and score 0, with the reason, so one failing
    criterion does not fail the request; the caller decides whether such a result may build pairs
    (:func:`usable`).
    """
    c = criterion
    if c.kind == "rules":
        return [_rules_result(c, text) for text in replies]
    n = len(replies)
    try:
        if c.reward is not None:
            if reward_fn is None:
                raise LookupError("no reward model scorer was given")
            raw = _checked(reward_fn(c.reward, prompt, replies), n, f"reward model {c.reward.model}")
            return [_reward_result(c, c.reward, r) for r in raw]
        if c.judge is None or judge_fn is None:
            raise LookupError("no judge was given")
        probs = _checked(judge_fn(c.judge, prompt, replies), n, f"judge {c.judge.model}")
        return [CriterionResult(criterion=c.name, version=c.version, status=SUCCESS, score=min(1.0, max(0.0, p)),
                                explanation=f"P(yes) = {p:.3f} for: {c.judge.question}") for p in probs]
    except Exception as e:  # noqa: BLE001 - reported per reply as OpenPipe's status "error"
        why = f"{type(e).__name__}: {e}"
        return [CriterionResult(criterion=c.name, version=c.version, status=ERROR, score=0.0, explanation=why)
                for _ in replies]


def _reward_result(c: Criterion, spec: RewardSpec, r: float) -> CriterionResult:
    head = f"{spec.model}.{spec.attribute}" if spec.attribute else spec.model
    if spec.threshold is not None:
        ok = r >= spec.threshold
        return CriterionResult(criterion=c.name, version=c.version, status=SUCCESS, score=float(ok),
                               explanation=f"{head} reward {r:.4g} {'>=' if ok else '<'} {spec.threshold:g}",
                               passed=ok, raw_score=r)
    return CriterionResult(criterion=c.name, version=c.version, status=SUCCESS, score=_sigmoid(r),
                           explanation=f"{head} reward {r:.4g}", raw_score=r)


def usable(results: Sequence[CriterionResult]) -> bool:
    """True when every reply was scored (no ``error``): only then may the scores build preferences."""
    return all(r.status == SUCCESS for r in results)


# ---------------------------------------------------------------------------------------------
# Combination.


def combine(results_by_criterion: Mapping[str, Sequence[CriterionResult] | Sequence[float]],
            weights: Mapping[str, float]) -> list[float]:
    """Weighted mean of the criteria's scores per reply: sum_c w_c s_c / sum_c w_c.

    ``results_by_criterion[c]`` holds criterion ``c``'s result (or plain score) for every reply;
    ``weights[c]`` is its weight (> 0; a criterion missing from ``weights`` counts 1).
    """
    if not results_by_criterion:
        raise ValueError("combine needs at least one criterion")
    columns = {name: [r.score if isinstance(r, CriterionResult) else float(r) for r in rs]
               for name, rs in results_by_criterion.items()}
    n = len(next(iter(columns.values())))
    total_w = 0.0
    total = [0.0] * n
    for name, scores in columns.items():
        if len(scores) != n:
            raise ValueError(f"criterion {name} scored {len(scores)} replies, expected {n}")
        w = float(weights.get(name, 1.0))
        if not w > 0 or not math.isfinite(w):
            raise ValueError(f"criterion {name} has weight {w}; weights must be finite and > 0")
        total_w += w
        for i, s in enumerate(scores):
            total[i] += w * s
    return [t / total_w for t in total]


def rank(scores: Sequence[float], tie_break_scores: Sequence[float] | None = None) -> list[int]:
    """Reply indices best first: by score, then tie-break score; full ties keep reply order."""
    tb = tie_break_scores or [0.0] * len(scores)
    return sorted(range(len(scores)), key=lambda i: (-_q(scores[i]), -_q(tb[i]), i))


def _q(x: float) -> float:
    """``x`` on a grid of TIE_EPS, so values closer than that compare equal."""
    return round(x / TIE_EPS) * TIE_EPS


# ---------------------------------------------------------------------------------------------
# Judge criteria: the question a served policy is asked, in one place.

JUDGE_SYSTEM = "You are a strict evaluator. Read the conversation and the reply, then answer the question with yes or no."


def judge_messages(spec: JudgeSpec, prompt: Sequence[ChatMessage], reply: str) -> tuple[ChatMessage, ...]:
    """The conversation a judge policy answers: the original prompt as text, the reply, the question.

    Its P(yes) is read from the policy's next-token distribution after these messages
    (:meth:`services.policy_model.PolicyModel.yes_probability`): the probability mass of the "yes"
    spellings over that of "yes" and "no".  With the 135M default policy this judge is weak (it barely
    reads the reply); a larger served policy makes it useful."""
    convo = "\n".join(f"{m.role}: {m.content}" for m in prompt)
    return (ChatMessage("system", JUDGE_SYSTEM),
            ChatMessage("user", f"Conversation:\n{convo}\n\nReply:\n{reply}\n\nQuestion: {spec.question}\n"
                                "Answer yes or no."))


# ---------------------------------------------------------------------------------------------
# Trimming: the passing reply hidden in a failing one.


def sentence_prefixes(text: str) -> list[str]:
    """Every proper prefix of ``text`` that ends where a sentence or a line ends, shortest first.

    Prefixes lose their trailing whitespace.  Not a sentence end: the dot of a list marker or an
    initial (``1.``, ``A.``: the word before it is digits or one character).  Not a line end: a line
    that introduces what follows (it ends in ``:``, ``,``, ``;``, ``-`` or ``(``), or a blank one.
    """
    whole = text.rstrip()
    cuts: set[int] = set()
    for m in _SENTENCE_END.finditer(text):
        words = text[:m.start()].split()
        word = words[-1] if words else ""
        if word.isdigit() or len(word) <= 1:
            continue
        cuts.add(m.end())
    for m in re.finditer(r"\n", text):
        line = text[:m.start()].rstrip()
        if line and not line.endswith(_OPEN_LINE_ENDS):
            cuts.add(len(line))
    out = {text[:c].rstrip() for c in cuts}
    return sorted((p for p in out if p.strip() and len(p) < len(whole)), key=len)


def passing_prefixes(text: str, passes: Callable[[str], bool]) -> list[str]:
    """The :func:`sentence_prefixes` that ``passes``, shortest first (empty when none does)."""
    return [p for p in sentence_prefixes(text) if passes(p)]


def prefix_trimmer(criteria: Sequence[Criterion]) -> Callable[[str], list[str]] | None:
    """``trim(reply)``: the reply's sentence prefixes that pass every one of ``criteria``, shortest first.

    None when a criterion is not a rule criterion: a reward model or a judge would have to score the
    prefix, which only the scorer can, so mode ``trim`` then builds its length-matched pair instead.
    A passing prefix scores 1 on every rule criterion (in ``mode: mean`` too), so its combined score
    is 1 whatever the weights.  Empty for a reply that breaks a rule other than a length limit
    (:data:`LENGTH_LIMITS`): a cut is how a reply too long is repaired, not one that says the wrong
    thing; cutting before its offending sentence teaches the policy to stop there (docs/loop.md).
    """
    if not criteria or any(c.kind != "rules" for c in criteria):
        return None
    content = [r for c in criteria for r in c.rules if r.kind not in LENGTH_LIMITS]

    def passes(text: str) -> bool:
        return all(_rules_result(c, text).score == 1.0 for c in criteria)

    def trim(text: str) -> list[str]:
        if any(check_rule(r, text).score != 1.0 for r in content):
            return []
        return passing_prefixes(text, passes)

    return trim


# ---------------------------------------------------------------------------------------------
# From scores to a preference record.


def criterion_source(ref: str) -> str:
    """How a criterion ``name@version`` is recorded among a record's ``source_event_ids``."""
    return CRITERION_SOURCE_PREFIX + ref


def record_criteria(source_event_ids: Sequence[str]) -> list[str]:
    """The ``name@version`` refs of the criteria that built a record (:func:`criterion_source`'s inverse)."""
    return [s[len(CRITERION_SOURCE_PREFIX):] for s in source_event_ids if s.startswith(CRITERION_SOURCE_PREFIX)]


def matched_pair(order: Sequence[int], keys: Sequence[tuple[float, float]], words: Sequence[int],
                 tolerance: float = MATCHED_LENGTH_TOLERANCE) -> tuple[int, int] | None:
    """The length-matched pair of ``mode="matched"``, as positions (chosen, rejected) in ``order``.

    ``order`` lists replies best first, ``keys[k]`` is reply ``order[k]``'s (combined score, tie-break
    score) on the TIE_EPS grid and ``words[k]`` its word count.  With more than one criteria class the
    chosen reply is from the best class and the rejected one from the worst, the two closest in words
    (relative difference |a - b| / max(a, b)), then the widest tie-break gap, then rank order.  With one
    class, the pair with the widest tie-break gap among pairs within ``tolerance``; None when there is
    no such pair or every reply ties on both scores.
    """
    n = len(order)
    if n < 2:
        return None

    def gap(a: int, b: int) -> float:
        return abs(words[a] - words[b]) / max(words[a], words[b], 1)

    top = [k for k in range(n) if keys[k][0] == keys[0][0]]
    if len(top) < n:
        bottom = [k for k in range(n) if keys[k][0] == keys[-1][0]]
        return min(((a, b) for a in top for b in bottom), key=lambda ab: (gap(*ab), keys[ab[1]][1] - keys[ab[0]][1], ab))
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)
             if keys[a][1] > keys[b][1] and gap(a, b) <= tolerance + TIE_EPS]
    if not pairs:
        return None
    return min(pairs, key=lambda ab: (keys[ab[1]][1] - keys[ab[0]][1], gap(*ab), ab))


def _trimmed(ranked: Sequence[int], key: Mapping[int, tuple[float, float]], replies: Sequence[str],
             trim: Callable[[str], list[str]] | None) -> tuple[int, list[str]] | None:
    """Mode ``trim``'s cut: (reply, its passing prefixes) for the best-ranked failing reply that has any."""
    if trim is None:
        return None
    for i in ranked:
        if key[i][0] < _q(1.0):
            prefixes = trim(replies[i])
            if prefixes:
                return i, prefixes
    return None


def preferences_from_scores(
    prompt: Sequence[ChatMessage],
    replies: Sequence[str],
    scores: Sequence[float],
    tie_break_scores: Sequence[float] | None = None,
    *,
    mode: str = "pair",
    criteria: Sequence[str] = (),
    project: str = "default",
    completion_id: str = "",
    source_event_ids: Sequence[str] = (),
    split: str = "train",
    attributes: Sequence[Mapping[str, float]] | None = None,
    now: float | None = None,
    acked_at: float = 0.0,
    trim: Callable[[str], list[str]] | None = None,
) -> list[PreferenceRecord]:
    """The preference records scored replies state (none when every reply ties).

    ``mode="pair"``: the best reply over the worst.  ``mode="ranking"``: every distinct reply best
    first, for the Plackett-Luce loss.  ``mode="pairs"``: the best over the worst, and also the best
    over the worst reply of its own class, the replies with the best's combined criteria score (for
    a rule, the other passing replies): the first pair teaches the criteria, the second what the
    tie breaker prefers among replies the criteria cannot tell apart.  Why: with only the first, every
    pair of a word limit has a shorter chosen reply than its rejected one, and DPO learns "shorter"
    without bound (measured: replies fell from 51 to 12 words and the reward model's score by two
    thirds); the second pair, whose chosen reply the reward model prefers among passing ones, pulls
    the other way.  It is skipped when it would repeat the first (every reply in one class).
    ``mode="matched"``: one length-matched pair (:func:`matched_pair`): a reply of the best criteria
    class over the reply of the worst class closest to it in words; when every reply is in one class,
    the tie breaker's widest gap among replies within MATCHED_LENGTH_TOLERANCE of each other in words.
    Why: in both other pair modes the pair's length difference is whatever the ranking happens to
    pick, and a policy learns it as surely as the criterion: a word limit's best-vs-worst pair teaches
    "shorter" without bound, and a tie breaker that likes long replies (the HH reward model does)
    teaches "longer" once most replies pass, undoing the rule (docs/loop.md measures both).
    ``mode="matched_pairs"``: the matched pair and, when the replies span more than one criteria
    class, also the best class's own length-matched pair (the tie breaker's widest gap among its
    replies within the tolerance), so a request that teaches the rule also teaches what the tie
    breaker prefers at equal length; ``matched`` teaches that only from requests all in one class.
    ``mode="bracket"``: the matched pair and, when the replies span more than one class, also its
    chosen reply over the reply of the same (best) class that the tie breaker ranks lowest, when the
    tie breaker ranks the chosen one above it.  The chosen reply is then bracketed from both sides:
    it beats the worst class's reply nearest to it in words on the criteria, and its own class's
    weakest reply on the tie breaker.  Why: with a word limit every matched pair's chosen reply is
    the shorter, and DPO moves the whole length distribution down (docs/loop.md); the second pair's
    rejected reply is usually a much shorter passing one (the HH reward model prefers longer
    replies), so it pulls replies far under the limit back up, and only while some replies still
    break it: a request whose replies all pass gives the plain matched pair.
    ``mode="trim"``: two pairs cut from one reply, the best-ranked reply that does not pass every
    criterion (combined score below 1).  ``trim(reply)`` lists its prefixes that end at a sentence
    and pass (:func:`prefix_trimmer` builds it from rule criteria); the longest is chosen over the
    reply itself (stop here, where the criteria still pass, rather than run on) and over the
    shortest (do not stop sooner than that: the repair keeps as much of the reply as the criteria
    allow; margin 0, a preference the criteria do not make).  The replies of a pair share every
    token up to the earlier of their two ends, so in DPO's margin all before it cancels and the
    pairs teach where to stop, from both sides, instead of moving every reply's length as pairs of
    two sampled replies do; with only the first pair, DPO learnt to stop after the first sentence
    (docs/loop.md).  One pair when the reply has one passing prefix.  When no failing reply has
    one, or ``trim`` is None (a reward or judge criterion, which only the scorer can score), the
    ``matched`` pair.
    ``mode="trim_next"``: ``trim`` with the first pair's rejected reply cut one sentence later (the
    reply's shortest sentence prefix longer than the chosen one; the reply itself when it has none),
    so every pair compares two ends of one reply, both ending the turn, and differs only in where.
    Why: in ``trim``'s first pair only the chosen reply ends there, so raising the end-of-turn
    probability after every sentence alike wins it, and that is what the policy learnt (docs/loop.md);
    here that uniform rise lifts both ends of every pair and cancels, so what is left to learn is
    where an end is better, that is, one that depends on the length.  The later cut is not scored
    (its ``response_attributes`` are empty); its combined score is taken as the reply's.

    ``mode="trim_bracket"``: ``trim_next``'s pairs (or, with no reply to cut, its length-matched pair),
    and from a request with two or more passing replies (combined score 1) the one the tie breaker
    ranks highest over the one it ranks lowest.  Why: ``trim_next`` teaches where to stop and nothing
    else, and the policies it trained still shortened at every length, losing the reward model's
    quality (docs/loop.md); the second pair, two replies that both keep every rule, is a preference
    the criteria leave to the tie breaker, and with the HH reward model it mostly prefers the fuller
    reply, so replies far under a word limit are pulled back up while a cut stops them running over.

    ``mode="trim_step"``: ``trim_next`` with the second pair's rejected reply the chosen one's prefix one
    sentence shorter (the reply's longest passing prefix but one) instead of its shortest, so the two pairs
    bracket one end, the last sentence that fits, a sentence either side.  Why: in ``trim_next`` the end
    after the longest passing prefix is lifted in both pairs and the only sooner end it lowers is the
    first sentence's, and its policies stopped after two or three sentences at every length, losing the
    reward model's quality (docs/loop.md); here a sentence too soon is refused as a sentence too late is.

    ``mode="trim_open"``: ``trim_next`` with the first pair's rejected reply marked unfinished
    (:attr:`PreferenceRecord.unfinished`): it goes on past its last sentence instead of ending the turn there, so
    the pair is "stop here" against "go on" at one place, and nothing in it says where else to stop.  Why: in
    ``trim_next`` the rejected reply ends its turn one sentence later, so the pair also lowers an end there, and
    held to the chosen reply's earlier stops (the trainer's ``stop_anchor``) that lowering won and the replies
    ran longer (docs/loop.md).  With no later sentence prefix, the reply itself, unfinished as well.

    ``mode="trim_stop"``: ``trim_open``'s first pair alone, "stop here" against "go on" where a failing reply
    crosses the criteria.  Why: ``trim_open``'s second pair (the longest prefix over the shortest) lowers the
    end after the first sentence, and a policy learns that as a lower end after every sentence; with the
    trainer's ``stop_anchor`` holding the chosen reply's earlier ends, this pair says only where the tail
    should end (docs/loop.md).  Meant for use with ``stop_anchor``: alone it is ``trim``'s first pair, which
    taught "stop after the first sentence".

    ``mode="trim_word"``: ``trim_stop`` with the rejected reply going on by one word, the reply's next after the
    prefix (and the whitespace before it), not by a sentence.  Its margin is then the end of turn against the
    next word at one position, and no other token's probability is in it.  Why: ``trim_stop``'s rejected reply
    carries a whole next sentence, and DPO lowers every token of it; on the criteria loop that moved the policy
    far (KL 0.15 in 9 steps) without moving its length (docs/loop.md).

    Identical reply texts collapse to their first occurrence.  Two replies whose score AND tie-break
    score are equal (within TIE_EPS) never form a pair: in a pair the best and worst must differ; in
    a ranking only the first reply of each tied group is kept, so the ranking asserts no order the
    criteria did not see.

    ``criteria`` are the ``name@version`` refs that produced the scores; they are recorded in
    ``source_event_ids`` as ``criterion:name@version`` (after the completion's event ids), so the
    record says which definition made it without a new field, and they enter the record id, which is
    deterministic: the same completion scored by the same criteria gives the same ids.
    ``attributes`` (per reply, e.g. each criterion's score) travel as ``response_attributes``;
    ``margin`` is the chosen reply's combined score minus the rejected one's.
    """
    if mode not in FEEDBACK_MODES:
        raise ValueError(f"mode must be one of {', '.join(FEEDBACK_MODES)}, got {mode!r}")
    n = len(replies)
    if len(scores) != n or (tie_break_scores is not None and len(tie_break_scores) != n):
        raise ValueError(f"{n} replies need {n} scores and tie-break scores")
    if attributes is not None and len(attributes) != n:
        raise ValueError(f"{n} replies need {n} attribute maps")
    tb = list(tie_break_scores) if tie_break_scores is not None else [0.0] * n
    texts, combined = list(replies), list(scores)
    attrs = [dict(a) for a in attributes] if attributes is not None else None
    first: dict[str, int] = {}
    for i, text in enumerate(replies):
        first.setdefault(text, i)
    distinct = sorted(first.values())
    order = rank([scores[i] for i in distinct], [tb[i] for i in distinct])
    ranked = [distinct[j] for j in order]
    key = {i: (_q(scores[i]), _q(tb[i])) for i in ranked}
    groups: list[list[int]] = []
    going_on: set[int] = set()  # the texts that do not end the turn (trim_open's later cut)
    if mode == "ranking":
        chosen, seen = [], set()
        for i in ranked:
            if key[i] not in seen:
                seen.add(key[i])
                chosen.append(i)
        groups.append(chosen)
    elif mode in TRIM_MODES and (cut := _trimmed(ranked, key, replies, trim)) is not None:
        reply, prefixes = cut
        # the longest, then the shortest (trim_step: the one a sentence shorter than the longest)
        earlier = prefixes[-2] if mode == "trim_step" and len(prefixes) > 1 else prefixes[0]
        for prefix in {prefixes[-1]: None, earlier: None}:
            texts.append(prefix)  # a passing prefix scores 1 on every criterion, so 1 combined
            combined.append(1.0)
            if attrs is not None:
                attrs.append({k: 1.0 for k in attrs[reply]})
        later, cut_later = reply, None
        if mode == "trim_word" and (word := re.match(r"\s+\S+", replies[reply][len(prefixes[-1]):])) is not None:
            cut_later = prefixes[-1] + word.group()
        elif mode in CUT_LATER_MODES:
            cut_later = next((p for p in sentence_prefixes(replies[reply]) if len(p) > len(prefixes[-1])), None)
        if cut_later is not None:  # not scored: its attributes are empty, its combined score the reply's
            later = len(texts)
            texts.append(cut_later)
            combined.append(combined[reply])
            if attrs is not None:
                attrs.append({})
        if mode in GOING_ON_MODES:
            going_on.add(later)
        groups.append([n, later])
        if len(prefixes) > 1 and mode not in ONE_PAIR_TRIM_MODES:
            groups.append([n, n + 1])
    elif mode in ("matched", "matched_pairs", "bracket", *TRIM_MODES):
        keys, words = [key[i] for i in ranked], [count_words(replies[i]) for i in ranked]
        pair = matched_pair(ranked, keys, words)
        if pair is not None:
            groups.append([ranked[pair[0]], ranked[pair[1]]])
        top = [k for k in range(len(ranked)) if keys[k][0] == keys[0][0]]
        mixed = pair is not None and len(top) < len(ranked)  # the replies span more than one class
        if mode == "matched_pairs" and mixed:
            within = matched_pair([ranked[k] for k in top], [keys[k] for k in top], [words[k] for k in top])
            if within is not None:
                groups.append([ranked[top[within[0]]], ranked[top[within[1]]]])
        if mode == "bracket" and mixed:
            weakest = min((k for k in top if k != pair[0]), key=lambda k: (keys[k][1], -k), default=None)
            if weakest is not None and keys[pair[0]][1] > keys[weakest][1]:
                groups.append([ranked[pair[0]], ranked[weakest]])
    if mode == "trim_bracket":
        passing = [i for i in ranked if key[i][0] == _q(1.0)]  # best first: by the tie breaker
        if len(passing) >= 2 and key[passing[0]][1] > key[passing[-1]][1] and \
                [passing[0], passing[-1]] not in groups:
            groups.append([passing[0], passing[-1]])
    elif mode in ("pair", "pairs") and len(ranked) >= 2:
        best, worst = ranked[0], ranked[-1]
        if key[best] != key[worst]:
            groups.append([best, worst])
        if mode == "pairs":
            same = [i for i in ranked if key[i][0] == key[best][0]]
            if same[-1] != worst and key[same[-1]] != key[best]:
                groups.append([best, same[-1]])
    sources = tuple(source_event_ids) + tuple(criterion_source(c) for c in criteria)
    out = []
    for chosen in groups:
        if len(chosen) < 2:
            continue
        ranked_texts = tuple(texts[i] for i in chosen)
        unfinished = tuple(k for k, i in enumerate(chosen) if i in going_on)
        out.append(PreferenceRecord(
            record_id=make_record_id(sources, ranked_texts, unfinished),
            prompt=tuple(prompt),
            ranked_responses=ranked_texts,
            source_kind=FeedbackKind.CRITERIA,
            project=project,
            source_event_ids=sources,
            completion_id=completion_id,
            split=split,
            response_attributes=tuple(dict(attrs[i]) for i in chosen) if attrs is not None else (),
            margin=float(combined[chosen[0]] - combined[chosen[-1]]),
            created_at=time.time() if now is None else now,
            source_acked_at=acked_at,
            unfinished=unfinished,
        ))
    return out


__all__ = [
    "CRITERION_SOURCE_PREFIX", "CUT_LATER_MODES", "GOING_ON_MODES", "ONE_PAIR_TRIM_MODES", "CriterionResult", "ERROR", "FEEDBACK_MODES", "FEEDBACK_MODE_SUMMARIES", "LENGTH_LIMITS", "MATCHED_LENGTH_TOLERANCE", "TRIM_MODES", "JudgeFn", "RewardFn", "RuleResult", "SUCCESS",
    "check_rule", "combine", "contains_any", "contains_none", "count_words", "criteria_results", "criterion_source", "record_criteria",
    "evaluate", "judge_messages", "json_valid", "matched_pair", "max_chars", "max_words", "mean_words", "min_words", "preferences_from_scores",
    "prefix_trimmer", "rank", "regex_must_match", "regex_must_not_match", "sentence_prefixes", "passing_prefixes", "usable",
]
