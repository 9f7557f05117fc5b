"""The continual training loop: micro-batches from the stream, replay, checkpoints, gate, commit.

One iteration: collect a micro-batch of new records (up to what the current step still needs, or
fewer once the first has waited ``max_batch_wait_s``), send TEST-split records to the evaluation set,
mix in ``replay_ratio`` past records from the reservoir, accumulate the micro-batch's gradient, then
add the new records to the reservoir.  The optimiser step is taken once ``batch_size`` new records
are in (or ``max_step_wait_s`` after the step's first one), so every step is the offline trainer's
step on ``batch_size`` records whether they arrived together or one by one: the timing of arrivals
changes when the model learns, not what it learns.  Every ``checkpoint_every_records`` records or
``checkpoint_every_s`` seconds, between steps: evaluate, write the checkpoint (manifest last), commit
the offsets it includes, then let the gate publish or reject it.

Exactly-once effect: a record's offset is committed only after a durable checkpoint includes it, and
a restart seeks to the offsets of the latest durable checkpoint, so every record ends up in exactly
one checkpoint's ``records`` list whatever the crash point.  Checkpoints happen only between steps,
when every record handed out by the source has been trained on (or put in the evaluation set) and no
accumulated gradient is waiting for its step.

The loop does not know whether the step runs in this process or on a group of DDP workers: it calls
a :class:`Stepper` (the :class:`~trainer.learner.Learner` itself, or ``trainer.ray_train``'s Commander,
which shards each micro-batch over the workers).  ``report(metrics)`` receives each checkpoint's
numbers (the Ray path hands them to ``ray.train.report`` for the Ray dashboard).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from services.checkpoints import CheckpointStore, is_store_full
from services.errors import Unavailable
from services.schemas import PreferenceRecord
from trainer import metrics
from trainer.checkpointing import LineageState, build_metadata, write_checkpoint
from trainer.config import TrainerConfig
from trainer.learner import Learner, StepStats
from trainer.evaluation import EvalResult, EvalSet
from trainer.gate import Gate
from trainer.replay import ReservoirBuffer, replay_count
from trainer.stream import RecentIds, Source, StreamItem

log = logging.getLogger(__name__)

class Stepper(Protocol):
    """What trains: :class:`~trainer.learner.Learner` in-process, the Commander on Ray (same signature)."""

    def train(self, records: Sequence[PreferenceRecord], weights: Sequence[float] | None = None, *,
              share: float = 1.0, apply: bool = True) -> StepStats: ...

    def apply(self) -> float: ...

    def keep_weights(self) -> None: ...

    def roll_back(self, lr_factor: float = 1.0) -> None: ...


#: First wait after a checkpoint write refused by a full store; doubles up to 30 s.
FULL_STORE_FIRST_RETRY_S = 1.0


@dataclass
class RunSummary:
    """What a run of the loop did (returned by :meth:`ContinualTrainer.run`)."""

    steps: int = 0
    records: int = 0
    replayed: int = 0
    refused: int = 0
    duplicates: int = 0  # records skipped because their id was trained already
    eval_records: int = 0
    checkpoints: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)  # rejected by the guard; training went back before them
    seconds: float = 0.0
    stop_reason: str = ""


class ContinualTrainer:
    """Runs the loop over a Source; checkpoints need a store, publishing needs a gate."""

    def __init__(
        self,
        cfg: TrainerConfig,
        learner: Learner,
        source: Source,
        *,
        lineage: LineageState,
        replay: ReservoirBuffer,
        eval_set: EvalSet,
        store: CheckpointStore | None = None,
        gate: Gate | None = None,
        stepper: Stepper | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        on_idle: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        recent_ids: Sequence[str] = (),
        report: Callable[[dict[str, float | str]], None] = lambda metrics: None,
    ) -> None:
        self.cfg = cfg
        self.learner = learner
        self.source = source
        self.lineage = lineage
        self.replay = replay
        self.eval_set = eval_set
        self.store = store
        self.gate = gate
        self.stepper: Stepper = stepper or learner
        self.report = report
        self.should_stop = should_stop
        self.on_idle = on_idle
        self.clock = clock
        self.summary = RunSummary()
        #: ids of the newest records trained (this run and, on resume, the lineage's last checkpoints)
        self.recent = RecentIds(cfg.stream.dedup_window, recent_ids)
        self._pending: list[StreamItem] = []  # trained since the last checkpoint
        self._checkpointed_positions = dict(source.positions())
        self._last_checkpoint_at = clock()
        #: since the last checkpoint: loss, pair_accuracy and the objective's own terms (chosen_nll, stop_anchor, ...)
        self._sums: dict[str, float] = {}
        self._micro_batches_since = 0
        self._accumulated = 0  # new records whose gradient waits for the step
        self._step_started_at = 0.0  # when the first of them was trained
        #: a version the objective's guard refuses is rolled back to the last published one (or the start)
        self._rollback = gate is not None and cfg.gate.rollback_on_guard and learner.objective.guards
        self._kept_version = lineage.previous_version

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> RunSummary:
        if self.store is not None:  # this loop is the model's one writer: a crash's partial writes go
            self.store.discard_unfinished(self.cfg.model.model_name)
        started = self.clock()
        idle_since = self.clock()
        if self._rollback:
            self.stepper.keep_weights()
        while True:
            if self.should_stop():
                self.summary.stop_reason = "stop requested"
                break
            if self.cfg.runtime.max_records and self.lineage.records_seen >= self.cfg.runtime.max_records:
                self.summary.stop_reason = f"max_records={self.cfg.runtime.max_records} reached"
                break
            if self.source.revoked() and (self._pending or self._has_unsaved_offsets()):
                self.checkpoint(reason="partitions revoked")
            train_items = self._collect()
            if train_items:
                self.train(train_items)
                idle_since = self.clock()
            else:
                self.on_idle()
            if self._accumulated and self.clock() - self._step_started_at >= self.cfg.stream.max_step_wait_s:
                self.apply_step()  # a slow stream: step with what arrived
            if self._checkpoint_due():
                self.checkpoint(reason="interval")
            if self.cfg.runtime.idle_exit_s and not train_items and self.clock() - idle_since >= self.cfg.runtime.idle_exit_s:
                self.summary.stop_reason = f"idle for {self.cfg.runtime.idle_exit_s:g}s"
                break
        # Only a clean stop gets here: after an exception the polled-but-untrained records must be read
        # again, which is exactly what resuming from the last durable checkpoint does.
        if self._pending or self._has_unsaved_offsets():
            self.checkpoint(reason="shutdown")
        self.summary.seconds = self.clock() - started
        log.info("trainer stopped (%s): %d steps, %d records, %d checkpoints", self.summary.stop_reason,
                 self.summary.steps, self.summary.records, len(self.summary.checkpoints))
        return self.summary

    def _collect(self) -> list[StreamItem]:
        """Up to the TRAIN records the current step still needs; TEST records go to the evaluation set."""
        batch: list[StreamItem] = []
        first_at: float | None = None
        wanted = self.cfg.optim.batch_size - self._accumulated
        while len(batch) < wanted:
            budget = wanted - len(batch)
            if self.cfg.runtime.max_records:
                budget = min(budget, self.cfg.runtime.max_records - self.lineage.records_seen - len(batch))
                if budget <= 0:
                    break
            wait = self.cfg.stream.poll_timeout_s
            if first_at is not None:
                wait = min(wait, max(self.cfg.stream.max_batch_wait_s - (self.clock() - first_at), 0.0))
            items = self.source.poll(budget, wait)
            for item in items:
                if item.record.is_eval:
                    self.summary.eval_records += 1
                    metrics.RECORDS.labels("eval").inc()
                    if not self.eval_set.offer(item.record):
                        log.debug("evaluation set full; TEST record %s not kept", item.record.record_id)
                elif item.record.record_id in self.recent:
                    # delivered again (at least once, same id): its offset advances, it is not trained twice
                    self.summary.duplicates += 1
                    metrics.RECORDS.labels("duplicate").inc()
                    log.debug("record %s was trained already; skipped", item.record.record_id)
                else:
                    self.recent.add(item.record.record_id)
                    batch.append(item)
            if batch and first_at is None:
                first_at = self.clock()
            if not items and (not batch or self.clock() - first_at >= self.cfg.stream.max_batch_wait_s):
                break
            if batch and self.clock() - first_at >= self.cfg.stream.max_batch_wait_s:
                break
            if self.should_stop():
                break
        return batch

    def admit(self, items: Sequence[StreamItem]) -> list[StreamItem]:
        """The items the objective can train on; the others go to the dead letters with its reason.  Their
        offsets advance with the rest (the next checkpoint commits them), so a refused record is neither
        retried for ever nor lost silently."""
        refused = self.learner.admit([i.record for i in items])
        if not refused:
            return list(items)
        kept = []
        for item in items:
            reason = refused.get(item.record.record_id)
            if reason is None:
                kept.append(item)
                continue
            field, _, text = reason.partition(": ")
            self.source.reject(item, text or reason, field if text else "record")
            self.summary.refused += 1
            metrics.RECORDS.labels("refused").inc()
            log.warning("record %s cannot be trained on: %s", item.record.record_id, reason)
        return kept

    def train(self, items: Sequence[StreamItem]) -> StepStats | None:
        """Accumulate the gradient of ``items`` plus replayed records, stepping once the step has its
        ``batch_size`` new records (at once without accumulation); then the new ones join the reservoir."""
        items = self.admit(items)
        if not items:
            return None
        new = [i.record for i in items]
        replayed = self.replay.sample(replay_count(len(new), self.cfg.stream.replay_ratio))
        weights = [1.0] * len(new) + [self.cfg.stream.replay_weight] * len(replayed) if replayed else None
        batch_size = self.cfg.optim.batch_size
        if self.cfg.stream.max_step_wait_s > 0:  # this micro-batch's share of the step's mean loss
            share, apply = len(new) / batch_size, self._accumulated + len(new) >= batch_size
        else:
            share, apply = 1.0, True
        if not self._accumulated:
            self._step_started_at = self.clock()
        stats = self.stepper.train(new + replayed, weights, share=share, apply=apply)
        self.replay.extend(new)
        self._pending.extend(items)
        self._accumulated += len(new)
        if apply:
            self._stepped()
        self.lineage.records_seen += len(new)
        self.lineage.replayed_records += len(replayed)
        self.summary.records += len(new)
        self.summary.replayed += len(replayed)
        for name, value in {"loss": stats.loss, "pair_accuracy": stats.pair_accuracy, **stats.parts}.items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._micro_batches_since += 1
        metrics.STEP_SECONDS.observe(stats.seconds)
        metrics.LOSS.set(stats.loss)
        metrics.LEARNING_RATE.set(stats.lr)
        metrics.RECORDS.labels("train").inc(len(new))
        metrics.RECORDS.labels("replay").inc(len(replayed))
        metrics.RECORDS_SEEN.set(self.lineage.records_seen)
        log.debug("step %d%s: loss %.4f acc %.3f lr %.2e, %d new + %d replayed, %.2fs", self.lineage.step,
                  "" if apply else " (accumulating)", stats.loss, stats.pair_accuracy, stats.lr, len(new),
                  len(replayed), stats.seconds)
        return stats

    def apply_step(self) -> None:
        """Take the optimiser step on what has accumulated (a partial step: its gradient is the mean
        loss's scaled by the share of ``batch_size`` that arrived, so a record's weight in the update
        does not depend on when it came)."""
        if self._accumulated:
            self.stepper.apply()
            self._stepped()

    def _stepped(self) -> None:
        self._accumulated = 0
        self.lineage.step += 1
        self.summary.steps += 1
        metrics.STEPS.inc()

    # -- checkpoints ------------------------------------------------------------------------------

    def _has_unsaved_offsets(self) -> bool:
        return self.source.positions() != self._checkpointed_positions

    def _checkpoint_due(self) -> bool:
        if not self._pending or self._accumulated:  # a checkpoint waits for the step its records are in
            return False
        if self.cfg.checkpoint.checkpoint_every_records and len(self._pending) >= self.cfg.checkpoint.checkpoint_every_records:
            return True
        return bool(self.cfg.checkpoint.checkpoint_every_s) and self.clock() - self._last_checkpoint_at >= self.cfg.checkpoint.checkpoint_every_s

    def evaluate(self) -> EvalResult | None:
        """Accuracy of the weights the model holds now (checkpoint() swaps the average in first)."""
        if len(self.eval_set) == 0:
            return None
        started = time.perf_counter()
        result = self.learner.evaluate(self.eval_set.records)
        metrics.EVAL_SECONDS.observe(time.perf_counter() - started)
        metrics.EVAL_ACCURACY.labels("candidate").set(result.accuracy)
        return result

    def checkpoint(self, reason: str) -> str | None:
        """Evaluate, write (durable), commit offsets, then gate; returns the version (None without a store)."""
        self.apply_step()  # records are checkpointed with the step they are in, never before it
        if self.store is None:
            self._pending.clear()
            self._checkpointed_positions = dict(self.source.positions())
            self._last_checkpoint_at = self.clock()
            return None
        started = time.perf_counter()
        positions = self.source.positions()
        trained = list(self._pending)
        n = self._micro_batches_since
        sums = {"loss": 0.0, "pair_accuracy": 0.0, **self._sums}
        summary = {
            **{f"{name}_avg": total / n if n else 0.0 for name, total in sorted(sums.items())},
            "micro_batches": float(n),
            "lr": self.learner.lr,
        }
        exact = self.cfg.checkpoint.save_optimizer_state
        live = self.learner.live_state() if exact else None  # the training weights, read before the swap
        with self.learner.serving_weights():  # evaluate and save the weight average, one swap
            result = self.evaluate()
            meta = build_metadata(
                self.cfg, objective=self.learner.objective, model=self.learner.model, lineage=self.lineage, offsets=positions, trained=trained,
                eval_result=result, replay=self.replay, eval_set=self.eval_set,
                world_size=self.learner.world_size, train_summary=summary,
            )
            ref = self._write_when_there_is_room(lambda: write_checkpoint(
                self.store, self.cfg, objective=self.learner.objective, model=self.learner.model, metadata=meta, replay=self.replay,
                eval_set=self.eval_set, optimizer_state=self.learner.optimizer_state() if exact else None,
                live_weights=live,
            ))
        # Durable: only now may Kafka forget these records.
        self.source.commit(positions)
        self._checkpointed_positions = dict(positions)
        self._pending.clear()
        self._sums = {}
        self._micro_batches_since = 0
        self._last_checkpoint_at = self.clock()
        self.lineage.previous_version = ref.version
        self.summary.checkpoints.append(ref.version)
        now = time.time()
        for item in trained:
            if item.record.source_acked_at:
                metrics.FRESHNESS_SECONDS.observe(max(now - item.record.source_acked_at, 0.0))
        log.info("checkpoint %s (%s): step %d, %d records (+%d), accuracy %s, %.2fs", ref.version, reason,
                 self.lineage.step, self.lineage.records_seen, len(trained),
                 f"{result.accuracy:.4f}" if result else "n/a", time.perf_counter() - started)
        if self.gate is not None and self.cfg.gate.publish and trained:
            try:
                decision = self.gate.judge(
                    ref, result, records_seen=self.lineage.records_seen, base_model=meta["base_model"],
                    extra_metrics={"step": float(self.lineage.step), "records_seen": float(self.lineage.records_seen)},
                )
                (self.summary.published if decision.publish else self.summary.rejected).append(ref.version)
                if self._rollback and decision.publish:
                    self.stepper.keep_weights()
                    self._kept_version = ref.version
                elif self._rollback and decision.guarded:
                    self.roll_back(ref.version)
            except Unavailable as e:
                # The checkpoint is durable and its offsets committed; the next one gets gated instead.
                log.error("could not gate %s: %s; training goes on", ref.version, e)
                metrics.CHECKPOINTS.labels("held").inc()
        else:
            metrics.CHECKPOINTS.labels("held").inc()
        metrics.CHECKPOINT_SECONDS.observe(time.perf_counter() - started)
        report = {
            "version": ref.version, "uri": ref.uri, "step": self.lineage.step, "records_seen": self.lineage.records_seen,
            "records": len(trained), "loss_avg": summary["loss_avg"], "lr": summary["lr"],
            "published": int(ref.version in self.summary.published), "checkpoint_s": time.perf_counter() - started,
            "rolled_back": int(ref.version in self.summary.rolled_back),
        }
        if result is not None:
            report["eval_accuracy"] = result.accuracy
        self.report(report)
        self._collect_garbage(ref.version)
        return ref.version

    def roll_back(self, refused: str) -> None:
        """Train on from the last published version's weights (or the start's) instead of ``refused``'s.

        The records trained since stay in the replay reservoir and their offsets stay committed: the next
        checkpoint is written from the kept weights, with the kept version as its previous version.  A
        crash before that checkpoint resumes from ``refused``'s weights, the newest checkpoint's: the
        guard still keeps them from being served, but the rollback then only returns to them."""
        self.stepper.roll_back(self.cfg.gate.rollback_lr_factor)
        self.summary.rolled_back.append(refused)
        self.lineage.previous_version = self._kept_version
        metrics.ROLLBACKS.inc()
        log.warning("training goes on from %s's weights, not %s's, at learning rate %.3g", self._kept_version or "the start",
                    refused, self.learner.lr)

    def _write_when_there_is_room(self, write: Callable[[], Any]) -> Any:
        """``write()``; while the store is full, pause training and retry (1 s, doubling to 30 s).

        A full store leaves no trace (the store removes a partial write; nothing is committed or
        published), so a retry writes the same checkpoint.  Kafka keeps the group membership meanwhile
        (the consumer heartbeats on its own thread; ``on_idle`` runs between tries).  A stop request
        while paused raises: the records since the last checkpoint are then trained again by the next
        run, never twice into the lineage.
        """
        delay = FULL_STORE_FIRST_RETRY_S
        while True:
            try:
                return write()
            except Exception as e:
                if not is_store_full(e) or self.should_stop():
                    raise
                metrics.CHECKPOINT_STORE_FULL.inc()
                log.error("checkpoint store is full (%s): training paused, nothing published; retrying in %.0fs", e, delay)
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and not self.should_stop():
                self.on_idle()
                time.sleep(min(0.5, delay))
            delay = min(delay * 2, 30.0)

    def _collect_garbage(self, newest: str) -> None:
        """Keep the newest ``keep_checkpoints`` plus whatever the registry may serve."""
        if not self.cfg.checkpoint.keep_checkpoints or self.store is None:
            return
        protected = {newest}
        if self.gate is not None:
            try:
                protected |= self.gate.protected_versions()
            except Unavailable as e:
                log.warning("skipping checkpoint clean-up, the registry is unreachable: %s", e)
                return
        removed = self.store.gc(self.cfg.model.model_name, self.cfg.checkpoint.keep_checkpoints, protected=protected)
        if removed:
            log.info("removed old checkpoints %s (keep_checkpoints=%d)", ", ".join(removed), self.cfg.checkpoint.keep_checkpoints)
