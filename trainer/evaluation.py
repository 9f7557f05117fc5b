"""Pairwise accuracy on held-out rankings (for any objective), and the set it is measured on.

The gate compares a fresh checkpoint with the served model on the same records, and the demo's
freshness budget (feedback ack -> scorer answer from a model trained on it, p50 < 30 s on 2 cores)
leaves a few seconds for that, so evaluation scores each distinct response once, in length-sorted
batches, under ``inference_mode``, and the evaluation set is bounded and fingerprinted so the served
model's accuracy can be cached instead of recomputed at every checkpoint.

Besides the accuracy, evaluation keeps each pair's outcome in a canonical order (records by
``record_id``, then the pairs (i, j), i < j, of each ranking), so two models evaluated on the same set
(same fingerprint) line up pair by pair and the gate can use the paired difference, whose noise is
far smaller than that of two independent accuracies.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from services.reward_model import RewardModel
from services.schemas import PreferenceRecord
from trainer.batching import response_rows

log = logging.getLogger(__name__)

EVAL_FILE = "eval_topic.jsonl"
#: Responses scored per progress-bar tick when a bar is shown.
PROGRESS_CHUNK = 64

_progress: contextvars.ContextVar[str | None] = contextvars.ContextVar("prefstream_eval_progress", default=None)


@contextmanager
def progress_bar(description: str):
    """``with progress_bar("eval reward"):`` evaluations inside show a tqdm bar over the responses they
    score (the CLI's ``prefstream eval``; the trainer's gate stays silent)."""
    token = _progress.set(description)
    try:
        yield
    finally:
        _progress.reset(token)


def _score_all(score: "ScoreFn", prompts: list, responses: list[str], ends: list[bool]) -> list[float]:
    description = _progress.get()
    if description is None or len(responses) <= PROGRESS_CHUNK:
        return list(score(prompts, responses, ends))
    from tqdm import tqdm

    scores: list[float] = []
    with tqdm(total=len(responses), desc=description, unit="response") as bar:
        for i in range(0, len(responses), PROGRESS_CHUNK):
            scores.extend(score(prompts[i:i + PROGRESS_CHUNK], responses[i:i + PROGRESS_CHUNK],
                                ends[i:i + PROGRESS_CHUNK]))
            bar.update(len(responses[i:i + PROGRESS_CHUNK]))
    return scores


@dataclass(frozen=True)
class EvalResult:
    """Pairwise accuracy (ties count as wrong) over every pair implied by the rankings."""

    accuracy: float
    pairs: int
    records: int
    mean_margin: float
    fingerprint: str
    # One '1' (right) or '0' (wrong) per pair, in the canonical order of :func:`canonical_order`;
    # "" when unknown (a result read from metadata written before outcomes were recorded).
    outcomes: str = ""
    # Further numbers an objective measures on the same held-out data (a policy's KL to its reference,
    # empty-reply and repetition rates); its gate guard reads them, the registry records them.
    metrics: dict[str, float] = field(default_factory=dict)
    # A policy's replies to its guard prompts, and a digest of what they answer (the prompts and the
    # sampling): a later evaluation of the same version under the same digest reuses them instead of
    # generating them again (the gate re-evaluates the served version whenever the held-out set grew).
    # Empty for objectives that generate nothing.
    replies: tuple[str, ...] = ()
    replies_key: str = ""
    # The reward guard's judge score of each of those replies, in their order (empty without the guard), and
    # the judge that gave them (name@version): the gate pairs a candidate's with the served version's, prompt
    # by prompt, when both answer the same digest and were scored by the same judge.
    rewards: tuple[float, ...] = ()
    rewards_judge: str = ""

    def to_dict(self, *, outcomes: bool = True) -> dict[str, Any]:
        """Checkpoint metadata keeps the per-pair ``outcomes`` (the gate pairs on them) and the guard
        ``replies`` (reused as above); reports drop both."""
        d: dict[str, Any] = {
            "accuracy": self.accuracy,
            "pairs": self.pairs,
            "records": self.records,
            "mean_margin": self.mean_margin,
            "eval_fingerprint": self.fingerprint,
        }
        if outcomes:
            d["outcomes"] = self.outcomes
            if self.replies_key:
                d["replies"], d["replies_key"] = list(self.replies), self.replies_key
                if self.rewards:
                    d["rewards"], d["rewards_judge"] = list(self.rewards), self.rewards_judge
        if self.metrics:
            d["metrics"] = dict(self.metrics)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalResult:
        """Read back :meth:`to_dict` (checkpoint metadata); outcomes that do not fit ``pairs`` are dropped."""
        accuracy, pairs = d.get("accuracy"), d.get("pairs")
        if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)):
            raise ValueError(f"eval accuracy must be a number, got {accuracy!r}")
        if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 0:
            raise ValueError(f"eval pairs must be a count, got {pairs!r}")
        outcomes = d.get("outcomes")
        if not (isinstance(outcomes, str) and len(outcomes) == pairs and set(outcomes) <= {"0", "1"}):
            outcomes = ""
        records, margin, fp = d.get("records"), d.get("mean_margin"), d.get("eval_fingerprint")
        raw_metrics = d.get("metrics")
        extra = {str(k): float(v) for k, v in raw_metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)} if isinstance(raw_metrics, dict) else {}
        return cls(
            accuracy=float(accuracy),
            pairs=pairs,
            records=records if isinstance(records, int) and not isinstance(records, bool) else 0,
            mean_margin=float(margin) if isinstance(margin, (int, float)) and not isinstance(margin, bool) else 0.0,
            fingerprint=fp if isinstance(fp, str) else "",
            outcomes=outcomes,
            metrics=extra,
            **_replies_of(d),
        )


def _replies_of(d: Mapping[str, Any]) -> dict[str, Any]:
    """The guard replies of checkpoint metadata (with their rewards and judge when there is one number per
    reply), or none when they are missing or malformed."""
    replies, key, rewards, judge = d.get("replies"), d.get("replies_key"), d.get("rewards"), d.get("rewards_judge")
    if not (isinstance(key, str) and key and isinstance(replies, list) and all(isinstance(r, str) for r in replies)):
        return {}
    out: dict[str, Any] = {"replies": tuple(replies), "replies_key": key}
    if (isinstance(rewards, list) and len(rewards) == len(replies)
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in rewards)):
        out["rewards"] = tuple(float(x) for x in rewards)
        out["rewards_judge"] = judge if isinstance(judge, str) else ""
    return out


def fingerprint(records: Sequence[PreferenceRecord]) -> str:
    """A short stable id of an evaluation set (record ids, order-independent)."""
    h = hashlib.sha256()
    for rid in sorted(r.record_id for r in records):
        h.update(rid.encode() + b"\x00")
    return h.hexdigest()[:16]


def canonical_order(records: Sequence[PreferenceRecord]) -> list[PreferenceRecord]:
    """The order outcomes are reported in: by record_id (then responses, for duplicate ids)."""
    return sorted(records, key=lambda r: (r.record_id, r.ranked_responses))


#: score(prompts, responses) -> one number per response, higher = better (a reward, an implicit reward).
#: ``score(prompts, responses, ends)``: one score per row; ``ends[i]`` is False for a reply that does not end
#: its turn (:attr:`PreferenceRecord.unfinished`), which only a policy's log-prob tells apart.
ScoreFn = Callable[[Sequence[Sequence[Any]], Sequence[str], Sequence[bool]], Sequence[float]]


def pairwise_result(records: Sequence[PreferenceRecord], score: ScoreFn,
                    metrics: Mapping[str, float] | None = None) -> EvalResult:
    """Score each response of ``records`` once and count, over all K(K-1)/2 pairs of each ranking,
    how often the better response gets the strictly higher score.

    ``outcomes`` lists the pairs in :func:`canonical_order`, then (i, j) with i < j within a ranking,
    whatever the order of ``records``; every objective's evaluation goes through here so that the
    gate's paired comparison means the same thing for all of them."""
    if not records:
        return EvalResult(accuracy=0.0, pairs=0, records=0, mean_margin=0.0, fingerprint=fingerprint(records),
                          metrics=dict(metrics or {}))
    ordered = canonical_order(records)
    prompts, responses, ends = response_rows(ordered)
    spans = list(zip(accumulate((r.k for r in ordered), initial=0), (r.k for r in ordered)))
    scores = _score_all(score, prompts, responses, ends)
    outcomes: list[str] = []
    margin_sum = 0.0
    for start, k in spans:
        r = scores[start:start + k]
        for i in range(k):
            for j in range(i + 1, k):
                margin = r[i] - r[j]
                outcomes.append("1" if margin > 0 else "0")
                margin_sum += margin
    pairs = len(outcomes)
    return EvalResult(
        accuracy=outcomes.count("1") / pairs,
        pairs=pairs,
        records=len(records),
        mean_margin=margin_sum / pairs,
        fingerprint=fingerprint(records),
        outcomes="".join(outcomes),
        metrics=dict(metrics or {}),
    )


def evaluate(model: RewardModel, records: Sequence[PreferenceRecord], batch_size: int = 64) -> EvalResult:
    """Pairwise accuracy of a reward model: its reward is the score."""
    return pairwise_result(
        records, lambda prompts, responses, _ends: [s.reward for s in model.score(prompts, responses,
                                                                                   batch_size=batch_size)])


class EvalSet:
    """The gate's evaluation records: a seeded subsample of a file, topped up with TEST-split records
    from the stream (first come, up to the cap), persisted with each checkpoint."""

    def __init__(self, max_records: int, file_records: Sequence[PreferenceRecord] = (), seed: int = 0) -> None:
        self.max_records = max_records
        fixed = list(file_records)
        if len(fixed) > max_records:
            fixed = random.Random(seed).sample(fixed, max_records)
        self._fixed = fixed
        self._topic: list[PreferenceRecord] = []
        self._ids = {r.record_id for r in fixed}
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self._fixed) + len(self._topic)

    @property
    def records(self) -> list[PreferenceRecord]:
        return self._fixed + self._topic

    @property
    def topic_records(self) -> list[PreferenceRecord]:
        return list(self._topic)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.records)
        return self._fingerprint

    def offer(self, record: PreferenceRecord) -> bool:
        """Add a TEST record from the stream if there is room; True when it was added."""
        if len(self) >= self.max_records or record.record_id in self._ids:
            return False
        self._topic.append(record)
        self._ids.add(record.record_id)
        self._fingerprint = None
        return True

    def restore_topic_records(self, records: Sequence[PreferenceRecord]) -> None:
        for rec in records:
            self.offer(rec)

    def save(self, directory: Path) -> int:
        """Write the stream's TEST records (the file part is re-read from the file) into a checkpoint."""
        with open(Path(directory) / EVAL_FILE, "wb") as f:
            for rec in self._topic:
                f.write(rec.to_kafka() + b"\n")
        return len(self._topic)

    @staticmethod
    def load_topic_records(directory: Path) -> list[PreferenceRecord]:
        path = Path(directory) / EVAL_FILE
        if not path.exists():
            return []
        with open(path, "rb") as f:
            return [PreferenceRecord.from_kafka(line) for line in f if line.strip()]
