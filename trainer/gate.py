"""The evaluation gate: publish a checkpoint, or reject it with the reason, in the model registry.

A candidate is compared with the model the registry currently serves, on the same evaluation set.
Evaluation sets are small (64 pairs in the demo, where one pair is 1.6 points), so comparing the two
accuracies directly rejects good checkpoints on noise.  Both models answer the same pairs, so the gate
uses the paired difference (McNemar): it rejects only when it is ``gate_confidence`` sure that the
candidate is more than ``gate_tolerance`` worse (see :func:`decide`).

The served model's evaluation (accuracy and per-pair outcomes) is cached per (version,
evaluation-set fingerprint): it is taken from the served checkpoint's own metadata when that was
measured on the same set (the usual case, since the served model is normally this trainer's previous
publication) and only otherwise recomputed by loading the served checkpoint.  Publishing and
rejecting go through :class:`services.registry.ModelRegistry`, whose announcer
(:class:`services.announce.KafkaAnnouncer`) puts a ModelUpdate on the model-updates topic.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable

from services.checkpoints import CheckpointRef, CorruptCheckpointError, open_checkpoint, read_checkpoint_metadata
from services.errors import PrefstreamError
from services.registry import ModelRegistry, ModelVersion
from trainer import metrics
from trainer.config import TrainerConfig
from trainer.evaluation import EvalResult, EvalSet
from trainer.objectives import Objective

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    publish: bool
    reason: str
    served_version: str = ""
    served_accuracy: float | None = None
    #: rejected by the objective's guard (drift, degeneration, length), not by its accuracy
    guarded: bool = False


@dataclass(frozen=True)
class PairedDrop:
    """The candidate's accuracy drop against the served model on the same n pairs, with its noise.

    b = pairs only the served model gets right, c = pairs only the candidate gets right.  The drop
    d = (b - c) / n is the difference of the two accuracies; its standard error, from the variance
    of the per-pair difference (McNemar), is SE = sqrt(b + c - (b - c)^2 / n) / n.
    """

    n: int
    b: int
    c: int

    @classmethod
    def of(cls, served_outcomes: str, candidate_outcomes: str) -> PairedDrop:
        if len(served_outcomes) != len(candidate_outcomes):
            raise ValueError(f"{len(served_outcomes)} served outcomes for {len(candidate_outcomes)} candidate pairs")
        b = sum(s == "1" and c == "0" for s, c in zip(served_outcomes, candidate_outcomes))
        c = sum(s == "0" and c == "1" for s, c in zip(served_outcomes, candidate_outcomes))
        return cls(n=len(candidate_outcomes), b=b, c=c)

    @property
    def drop(self) -> float:
        return (self.b - self.c) / self.n

    @property
    def se(self) -> float:
        # max(): b + c >= (b - c)^2 / n holds exactly, rounding could dip below 0 by an ulp
        return math.sqrt(max(self.b + self.c - (self.b - self.c) ** 2 / self.n, 0.0)) / self.n


def decide(
    candidate: EvalResult | None,
    served_version: str,
    served_accuracy: float | None,
    *,
    tolerance: float,
    publish_without_eval: bool,
    served_outcomes: str = "",
    confidence: float = 0.9,
) -> Decision:
    """The gate rule: reject when the candidate is, with ``confidence``, more than ``tolerance`` below
    the served model: d - z * SE > tolerance, z = the standard normal quantile of ``confidence``.

    ``served_outcomes`` are the served model's per-pair outcomes on the candidate's evaluation set (same
    canonical order).  Without them (or when they do not line up with the candidate's) the rule falls
    back to the unpaired comparison ``served_accuracy - candidate.accuracy > tolerance``; so does
    ``confidence`` 0.5 (z = 0) with them.
    """
    if candidate is None or candidate.pairs == 0:
        if publish_without_eval:
            return Decision(True, "no evaluation records yet; published without a gate", served_version, served_accuracy)
        return Decision(False, "no evaluation records to gate on (set eval_data or send TEST-split records)",
                        served_version, served_accuracy)
    if not served_version or served_accuracy is None:
        return Decision(True, f"first version (pairwise accuracy {candidate.accuracy:.4f})", served_version, None)
    n = candidate.pairs
    if served_outcomes and len(served_outcomes) == len(candidate.outcomes) == n:
        paired = PairedDrop.of(served_outcomes, candidate.outcomes)
        z = NormalDist().inv_cdf(confidence)
        drop, bound = paired.drop, paired.drop - z * paired.se
        noise = (f"SE {paired.se:.4f} (paired: {paired.b} pairs only the served version gets right, {paired.c} only "
                 f"the candidate), lower bound {bound:.4f} at gate_confidence {confidence} (z={z:.2f})")
    else:
        drop = bound = served_accuracy - candidate.accuracy
        missing = ("no per-pair outcomes of the served version" if not served_outcomes
                   else "the served and candidate per-pair outcomes do not line up")
        noise = f"unpaired comparison: {missing}, gate_confidence not applied"
    if bound > tolerance + 1e-12:
        return Decision(
            False,
            f"pairwise accuracy {candidate.accuracy:.4f} is {drop:.4f} below the served version {served_version} "
            f"({served_accuracy:.4f}) on {n} pairs: {noise}; gate_tolerance is {tolerance}",
            served_version, served_accuracy,
        )
    return Decision(True, f"pairwise accuracy {candidate.accuracy:.4f} vs served {served_version} "
                    f"{served_accuracy:.4f} on {n} pairs: drop {drop:.4f}, {noise}; gate_tolerance is {tolerance}",
                    served_version, served_accuracy)


class Gate:
    """Evaluates checkpoints against the served model and records the verdict in the registry."""

    def __init__(self, cfg: TrainerConfig, registry: ModelRegistry, eval_set: EvalSet, objective: Objective,
                 precision: Callable[[], AbstractContextManager[Any]] = nullcontext) -> None:
        """``precision()``: the context the candidates were evaluated in (Learner.precision), so that the
        served version, when it has to be evaluated here, is scored the same way for the paired rule."""
        self.cfg = cfg
        self.objective = objective
        self.precision = precision
        self.registry = registry
        self.eval_set = eval_set
        self._served_cache: dict[tuple[str, str], EvalResult] = {}
        objective.use_registry(registry)

    def remember(self, version: str, result: EvalResult) -> None:
        self._served_cache[(version, result.fingerprint)] = result

    def served(self) -> tuple[ModelVersion | None, EvalResult | None]:
        """The registry's target and its evaluation on the current evaluation set (cached).

        The evaluation's ``outcomes`` are "" when its metadata predates them and the served checkpoint
        cannot be loaded; the gate then falls back to comparing accuracies."""
        target = self.registry.target(self.cfg.model.model_name)  # None for a model never published
        if target is None or len(self.eval_set) == 0:
            return target, None
        fp = self.eval_set.fingerprint
        key = (target.version, fp)
        if key in self._served_cache:
            return target, self._served_cache[key]
        own = self._metadata_eval(target.uri)
        result = own if own is not None and own.fingerprint == fp else None
        if result is None or not result.outcomes:
            result = self._evaluate_served(target, own) or result
        if result is not None:
            self._served_cache[key] = result
            metrics.EVAL_ACCURACY.labels("served").set(result.accuracy)
        return target, result

    def _metadata_eval(self, uri: str) -> EvalResult | None:
        """The evaluation a checkpoint was published with (on the held-out set of its day), if readable."""
        try:
            meta = read_checkpoint_metadata(uri)
        except (OSError, ValueError, PrefstreamError):
            return None
        ev = meta.get("eval") if isinstance(meta, dict) else None
        if not isinstance(ev, dict):
            return None
        try:
            return EvalResult.from_dict(ev)
        except ValueError as e:
            log.warning("ignoring the eval metadata of %s: %s", uri, e)
            return None

    def _evaluate_served(self, target: ModelVersion, own: EvalResult | None = None) -> EvalResult | None:
        """The served version evaluated on the current held-out set; ``own`` (its checkpoint's evaluation)
        lends what still holds, such as its replies to an unchanged guard set."""
        started = time.perf_counter()
        try:
            path = open_checkpoint(target.uri)
            model = self.objective.load_for_eval(str(path))
        except (CorruptCheckpointError, OSError, ValueError) as e:
            log.error("cannot load the served version %s (%s) to gate against it: %s", target.version, target.uri, e)
            return None
        with self.precision():
            result = self.objective.evaluate(model, self.eval_set.records, own)
        metrics.EVAL_SECONDS.observe(time.perf_counter() - started)
        log.info("served version %s: pairwise accuracy %.4f on %d pairs (%.1fs)", target.version, result.accuracy,
                 result.pairs, time.perf_counter() - started)
        return result

    def judge(self, ref: CheckpointRef, result: EvalResult | None, *, records_seen: int, base_model: str,
              extra_metrics: dict[str, float] | None = None) -> Decision:
        """Decide on a durable checkpoint and record the verdict (published or rejected) in the registry."""
        target, served = self.served()
        served_acc = served.accuracy if served is not None else None
        decision = decide(
            result, target.version if target else "", served_acc,
            served_outcomes=served.outcomes if served is not None else "",
            tolerance=self.cfg.gate.gate_tolerance, confidence=self.cfg.gate.gate_confidence,
            publish_without_eval=self.cfg.gate.publish_without_eval,
        )
        wait = self.objective.unjudged(result, served) if decision.publish else ""
        guard = self.objective.guard(result, served) if not wait else ""
        if wait:
            decision = Decision(False, wait, decision.served_version, decision.served_accuracy)
        elif guard:
            reason = guard if decision.publish else f"{decision.reason}; {guard}"
            decision = Decision(False, reason, decision.served_version, decision.served_accuracy, guarded=True)
        numbers: dict[str, float] = dict(extra_metrics or {})
        if result is not None and result.pairs:
            numbers.update({"accuracy": result.accuracy, "eval_pairs": float(result.pairs),
                            "mean_margin": result.mean_margin, **result.metrics})
        if served_acc is not None:
            numbers["served_accuracy"] = served_acc
        version = ModelVersion(
            name=self.cfg.model.model_name, version=ref.version, uri=ref.uri, kind=self.objective.kind.value,
            metrics=numbers,
            reason=decision.reason, records_seen=records_seen, base_model=base_model,
        )
        if decision.publish:
            self.registry.publish(version)
            if result is not None and result.pairs:
                self.remember(ref.version, result)
            metrics.CHECKPOINTS.labels("published").inc()
            log.info("published %s/%s: %s", self.cfg.model.model_name, ref.version, decision.reason)
        else:
            self.registry.reject(version, decision.reason)
            metrics.CHECKPOINTS.labels("rejected").inc()
            log.warning("rejected %s/%s: %s", self.cfg.model.model_name, ref.version, decision.reason)
        return decision

    def protected_versions(self) -> set[str]:
        """Versions the registry points at (latest, pinned, target): never garbage-collected."""
        from services.errors import NotFound

        try:
            st = self.registry.status(self.cfg.model.model_name)
        except NotFound:
            return set()
        return {v for v in (st.latest_version, st.pinned_version, st.target_version) if v}

    def recorded(self, version: str) -> bool:
        """Whether the registry already has a verdict on ``version`` (resume after a crash)."""
        from services.errors import NotFound

        try:
            self.registry.get(self.cfg.model.model_name, version)
            return True
        except NotFound:
            return False
