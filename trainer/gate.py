"""The evaluation gate: publish a checkpoint, or reject it with the reason, in the model registry.

A candidate is compared with the model the registry currently serves, on the same evaluation set.
The served model's accuracy is cached per (version, evaluation-set fingerprint): it is taken from the
served checkpoint's own metadata when that was measured on the same set (the usual case, since the
served model is normally this trainer's previous publication) and only otherwise recomputed by
loading the served checkpoint.  Publishing and rejecting go through
:class:`services.registry.ModelRegistry`, whose ``announce`` hook puts a ModelUpdate on the
model-updates topic.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from services.checkpoints import CheckpointRef, CorruptCheckpointError, open_checkpoint, path_from_uri
from services.registry import ModelRegistry, ModelVersion
from services.reward_model import RewardModel
from trainer import metrics
from trainer.config import TrainerConfig
from trainer.evaluation import EvalResult, EvalSet, evaluate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    publish: bool
    reason: str
    served_version: str = ""
    served_accuracy: float | None = None


def decide(
    candidate: EvalResult | None,
    served_version: str,
    served_accuracy: float | None,
    *,
    tolerance: float,
    publish_without_eval: bool,
) -> Decision:
    """The gate rule: reject when the candidate is more than ``tolerance`` below the served model."""
    if candidate is None or candidate.pairs == 0:
        if publish_without_eval:
            return Decision(True, "no evaluation records yet; published without a gate", served_version, served_accuracy)
        return Decision(False, "no evaluation records to gate on (set eval_data or send TEST-split records)",
                        served_version, served_accuracy)
    if not served_version or served_accuracy is None:
        return Decision(True, f"first version (pairwise accuracy {candidate.accuracy:.4f})", served_version, None)
    drop = served_accuracy - candidate.accuracy
    if drop > tolerance + 1e-12:
        return Decision(
            False,
            f"pairwise accuracy {candidate.accuracy:.4f} is {drop:.4f} below the served version {served_version} "
            f"({served_accuracy:.4f}) on {candidate.pairs} pairs; gate_tolerance is {tolerance}",
            served_version, served_accuracy,
        )
    return Decision(True, f"pairwise accuracy {candidate.accuracy:.4f} vs served {served_version} "
                    f"{served_accuracy:.4f} (tolerance {tolerance})", served_version, served_accuracy)


def kafka_announcer(producer: Any, topic: str) -> Callable[[Any], None]:
    """A registry ``announce`` hook that writes each ModelUpdate to ``topic`` and waits for the ack."""
    from services.kafka import send_sync

    def announce(update: Any) -> None:
        send_sync(producer, topic, update.to_kafka(), key=update.model_name.encode())

    return announce


class Gate:
    """Evaluates checkpoints against the served model and records the verdict in the registry."""

    def __init__(self, cfg: TrainerConfig, registry: ModelRegistry, eval_set: EvalSet) -> None:
        self.cfg = cfg
        self.registry = registry
        self.eval_set = eval_set
        self._served_cache: dict[tuple[str, str], float] = {}

    def remember(self, version: str, result: EvalResult) -> None:
        self._served_cache[(version, result.fingerprint)] = result.accuracy

    def served(self) -> tuple[ModelVersion | None, float | None]:
        """The registry's target and its accuracy on the current evaluation set (cached)."""
        target = self.registry.target(self.cfg.model_name)  # None for a model never published
        if target is None or len(self.eval_set) == 0:
            return target, None
        fp = self.eval_set.fingerprint
        key = (target.version, fp)
        if key in self._served_cache:
            return target, self._served_cache[key]
        acc = self._accuracy_from_metadata(target.uri, fp)
        if acc is None:
            acc = self._evaluate_served(target)
        if acc is not None:
            self._served_cache[key] = acc
            metrics.EVAL_ACCURACY.labels("served").set(acc)
        return target, acc

    def _accuracy_from_metadata(self, uri: str, fp: str) -> float | None:
        try:
            meta = json.loads((path_from_uri(uri) / "metadata.json").read_text())
        except (OSError, ValueError):
            return None
        ev = meta.get("eval") if isinstance(meta, dict) else None
        if isinstance(ev, dict) and ev.get("eval_fingerprint") == fp and isinstance(ev.get("accuracy"), (int, float)):
            return float(ev["accuracy"])
        return None

    def _evaluate_served(self, target: ModelVersion) -> float | None:
        started = time.perf_counter()
        try:
            path = open_checkpoint(target.uri)
            model = RewardModel.from_pretrained(path, max_length=self.cfg.max_length)
        except (CorruptCheckpointError, OSError, ValueError) as e:
            log.error("cannot load the served version %s (%s) to gate against it: %s", target.version, target.uri, e)
            return None
        result = evaluate(model, self.eval_set.records, self.cfg.eval_batch_size)
        metrics.EVAL_SECONDS.observe(time.perf_counter() - started)
        log.info("served version %s: pairwise accuracy %.4f on %d pairs (%.1fs)", target.version, result.accuracy,
                 result.pairs, time.perf_counter() - started)
        return result.accuracy

    def judge(self, ref: CheckpointRef, result: EvalResult | None, *, records_seen: int, base_model: str,
              extra_metrics: dict[str, float] | None = None) -> Decision:
        """Decide on a durable checkpoint and record the verdict (published or rejected) in the registry."""
        target, served_acc = self.served()
        decision = decide(
            result, target.version if target else "", served_acc,
            tolerance=self.cfg.gate_tolerance, publish_without_eval=self.cfg.publish_without_eval,
        )
        numbers: dict[str, float] = dict(extra_metrics or {})
        if result is not None and result.pairs:
            numbers.update({"accuracy": result.accuracy, "eval_pairs": float(result.pairs),
                            "mean_margin": result.mean_margin})
        if served_acc is not None:
            numbers["served_accuracy"] = served_acc
        version = ModelVersion(
            name=self.cfg.model_name, version=ref.version, uri=ref.uri, kind="reward", metrics=numbers,
            reason=decision.reason, records_seen=records_seen, base_model=base_model,
        )
        if decision.publish:
            self.registry.publish(version)
            if result is not None and result.pairs:
                self.remember(ref.version, result)
            metrics.CHECKPOINTS.labels("published").inc()
            log.info("published %s/%s: %s", self.cfg.model_name, ref.version, decision.reason)
        else:
            self.registry.reject(version, decision.reason)
            metrics.CHECKPOINTS.labels("rejected").inc()
            log.warning("rejected %s/%s: %s", self.cfg.model_name, ref.version, decision.reason)
        return decision

    def protected_versions(self) -> set[str]:
        """Versions the registry points at (latest, pinned, target): never garbage-collected."""
        from services.errors import NotFound

        try:
            st = self.registry.status(self.cfg.model_name)
        except NotFound:
            return set()
        return {v for v in (st.latest_version, st.pinned_version, st.target_version) if v}

    def recorded(self, version: str) -> bool:
        """Whether the registry already has a verdict on ``version`` (resume after a crash)."""
        from services.errors import NotFound

        try:
            self.registry.get(self.cfg.model_name, version)
            return True
        except NotFound:
            return False
