"""What a trainer checkpoint holds, how it is written, and where a (re)started trainer begins.

A checkpoint is the serving folder the objective writes (a reward model's or a policy's HF folder)
plus the trainer's state: the replay reservoir, the TEST records taken from the stream, optionally the
AdamW moments and the live weights (the model folder holds the weight average, see
trainer/averaging.py), and ``metadata.json`` with the Kafka offsets its weights include.  The store
writes the manifest last, so "durable" means "has a manifest": offsets are committed to Kafka only
after that, and a restarted trainer seeks to the offsets of its latest durable checkpoint (never to
the group's committed offsets, which can only lag behind it).

Metadata keys (``FORMAT`` = 1), read by the demo, the scorer's admin views and tests:

* ``step``, ``records_seen`` (new records trained on, cumulative), ``replayed_records``
* ``offsets``: ``{partition: next offset}`` of ``trainer.topic``; everything before is in the weights
* ``records``: ``[{record_id, source_acked_at, partition, offset}]`` trained since the previous
  checkpoint (its ``records_count`` and ``max_source_acked_at`` alongside)
* ``eval``: ``{accuracy, pairs, records, mean_margin, eval_fingerprint, outcomes}`` or null;
  ``outcomes`` is one '1'/'0' per pair in evaluation's canonical order (the gate pairs a later
  candidate's outcomes with these); checkpoints written before it have no ``outcomes``
* ``kind`` (reward or policy), ``base_model``, ``spec``, ``loss``, ``parent`` (what this lineage warm-started from),
  ``previous_version``, ``trainer`` (topic, group_id, world_size), ``created_at``
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from services.checkpoints import CheckpointRef, CheckpointStore, CorruptCheckpointError, open_checkpoint
from services.schemas import PreferenceRecord
from trainer.config import TrainerConfig
from trainer.evaluation import EvalResult, EvalSet
from trainer.objectives import Objective, objective_for
from trainer.replay import ReservoirBuffer, load_records, load_replay_counts, save_records
from trainer.stream import StreamItem, validate_offsets

log = logging.getLogger(__name__)

FORMAT = 1
OPTIMIZER_FILE = "optimizer.pt"
#: the live (training) weights when the model folder holds their average; with ``save_optimizer_state``
LIVE_WEIGHTS_FILE = "live_weights.safetensors"


@dataclass(frozen=True)
class ResumePoint:
    """Where training starts: a model folder and, when resuming our own lineage, its state."""

    source: str  # "checkpoint" (own lineage), "published" (registry target) or "base"
    model_path: str
    version: str = ""
    uri: str = ""
    step: int = 0
    records_seen: int = 0
    replayed_records: int = 0
    records_count: int = 0
    offsets: dict[int, int] = field(default_factory=dict)
    replay_records: tuple[PreferenceRecord, ...] = ()
    replay_seen: int = 0
    replay_counts: tuple[int, ...] = ()
    eval_topic_records: tuple[PreferenceRecord, ...] = ()
    optimizer_path: str = ""
    live_weights_path: str = ""
    parent: dict[str, Any] = field(default_factory=dict)
    base_model: str = ""
    #: ids trained by this lineage's newest checkpoints, oldest first (``stream.dedup_window`` at most)
    recent_record_ids: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.source == "checkpoint":
            return (f"resuming own checkpoint {self.version} (step {self.step}, {self.records_seen} records, "
                    f"offsets {self.offsets})")
        if self.source == "published":
            return f"warm-starting from published version {self.version} ({self.uri})"
        return f"starting from base model {self.model_path}"


def _same_lineage(meta: dict[str, Any], cfg: TrainerConfig) -> bool:
    trainer = meta.get("trainer") or {}
    return meta.get("format") == FORMAT and trainer.get("topic") == cfg.stream.topic and trainer.get("group_id") == cfg.stream.group_id


def _recent_ids(store: CheckpointStore, refs: Sequence[CheckpointRef], newest: dict[str, Any], window: int) -> tuple[str, ...]:
    """The record ids the newest checkpoints of ``refs`` (oldest first, ``newest``'s metadata last) say
    they trained, up to ``window`` of them, oldest first.  Older checkpoints that cannot be read end the walk."""
    chunks: list[list[str]] = []
    total = 0
    for i, ref in enumerate(reversed(refs)):
        if total >= window:
            break
        try:
            meta = newest if i == 0 else store.read_metadata(ref)
        except Exception as e:  # noqa: BLE001 - a garbage-collected or unreadable older checkpoint
            log.warning("duplicate check: stopped at %s (%s)", ref.version, e)
            break
        ids = [str(e["record_id"]) for e in meta.get("records", []) if e.get("record_id")]
        chunks.append(ids)
        total += len(ids)
    flat = [i for chunk in reversed(chunks) for i in chunk]
    return tuple(flat[-window:]) if window else ()


def find_resume_point(cfg: TrainerConfig, store: CheckpointStore | None, registry: Any = None, *,
                      objective: Objective | None = None) -> ResumePoint:
    """Own latest durable checkpoint of this topic/group > the registry's served version > base model."""
    if store is not None:
        refs = store.list(cfg.model.model_name)
        for n, ref in reversed(list(enumerate(refs))):
            try:
                store.verify(ref)
                meta = store.read_metadata(ref)
            except CorruptCheckpointError as e:
                log.error("skipping checkpoint that fails verification: %s", e)
                continue
            if not _same_lineage(meta, cfg):
                continue
            path = ref.path
            return ResumePoint(
                source="checkpoint",
                model_path=str(path),
                version=ref.version,
                uri=ref.uri,
                step=int(meta.get("step", 0)),
                records_seen=int(meta.get("records_seen", 0)),
                replayed_records=int(meta.get("replayed_records", 0)),
                records_count=int(meta.get("records_count", 0)),
                offsets=validate_offsets(meta.get("offsets", {}), f"{ref.uri}: metadata.offsets"),
                replay_records=tuple(load_records(path)),
                replay_counts=tuple(load_replay_counts(path)),
                replay_seen=int((meta.get("replay") or {}).get("seen", 0)),
                eval_topic_records=tuple(EvalSet.load_topic_records(path)),
                optimizer_path=str(path / OPTIMIZER_FILE) if (path / OPTIMIZER_FILE).exists() else "",
                live_weights_path=str(path / LIVE_WEIGHTS_FILE) if (path / LIVE_WEIGHTS_FILE).exists() else "",
                parent=dict(meta.get("parent") or {}),
                base_model=str(meta.get("base_model", "")),
                recent_record_ids=_recent_ids(store, refs[: n + 1], meta, cfg.stream.dedup_window),
            )
    if registry is not None:
        target = registry.target(cfg.model.model_name)  # None for a model never published
        if target is not None:
            path = open_checkpoint(target.uri)
            return ResumePoint(
                source="published", model_path=str(path), version=target.version, uri=target.uri,
                parent={"source": "published", "version": target.version, "uri": target.uri},
                base_model=target.base_model or str(path),
            )
    base = (objective or objective_for(cfg)).resolved_base_model()
    return ResumePoint(source="base", model_path=base, parent={"source": "base", "path": base}, base_model=base)


def load_live_weights(point: ResumePoint) -> dict[str, torch.Tensor] | None:
    """The live weights a resumed checkpoint saved beside its averaged model folder, if any."""
    return load_file(point.live_weights_path) if point.live_weights_path else None


@dataclass
class LineageState:
    """Counters carried from checkpoint to checkpoint."""

    step: int = 0
    records_seen: int = 0
    replayed_records: int = 0
    previous_version: str = ""
    parent: dict[str, Any] = field(default_factory=dict)
    base_model: str = ""


def record_entries(items: Sequence[StreamItem]) -> list[dict[str, Any]]:
    return [
        {
            "record_id": i.record.record_id,
            "source_acked_at": i.record.source_acked_at,
            "partition": i.partition,
            "offset": i.offset,
        }
        for i in items
    ]


def build_metadata(
    cfg: TrainerConfig,
    *,
    objective: Objective,
    model: Any,
    lineage: LineageState,
    offsets: dict[int, int],
    trained: Sequence[StreamItem],
    eval_result: EvalResult | None,
    replay: ReservoirBuffer,
    eval_set: EvalSet,
    world_size: int,
    train_summary: dict[str, float],
) -> dict[str, Any]:
    acked = [i.record.source_acked_at for i in trained if i.record.source_acked_at]
    return {
        "format": FORMAT,
        "kind": objective.kind.value,
        "model_name": cfg.model.model_name,
        "base_model": lineage.base_model or objective.base_of(model),
        "spec": objective.spec(model),
        "loss": objective.loss_config(),
        "parent": lineage.parent,
        "previous_version": lineage.previous_version,
        "step": lineage.step,
        "records_seen": lineage.records_seen,
        "replayed_records": lineage.replayed_records,
        "offsets": {str(p): int(o) for p, o in sorted(offsets.items())},
        "records": record_entries(trained),
        "records_count": len(trained),
        "max_source_acked_at": max(acked) if acked else 0.0,
        "eval": eval_result.to_dict() if eval_result is not None else None,
        "train": train_summary,
        "replay": {"size": len(replay), "seen": replay.seen, "capacity": replay.capacity},
        "eval_topic_records": len(eval_set.topic_records),
        "trainer": {"topic": cfg.stream.topic, "group_id": cfg.stream.group_id, "world_size": world_size},
        "created_at": time.time(),
    }


def write_checkpoint(
    store: CheckpointStore,
    cfg: TrainerConfig,
    *,
    objective: Objective,
    model: Any,
    metadata: dict[str, Any],
    replay: ReservoirBuffer,
    eval_set: EvalSet,
    optimizer_state: dict[str, Any] | None = None,
    live_weights: dict[str, torch.Tensor] | None = None,
) -> CheckpointRef:
    """Write model + trainer state under the next version; returns once the manifest is durable.

    ``model`` must hold the weights to serve (the average); ``live_weights`` are the training ones."""

    def writer(d: Path) -> None:
        objective.save(model, d)
        objective.save_state(d, replay.items())
        save_records(replay, d)
        eval_set.save(d)
        if optimizer_state is not None:
            torch.save(optimizer_state, d / OPTIMIZER_FILE)
        if live_weights is not None:
            save_file(live_weights, str(d / LIVE_WEIGHTS_FILE))

    version = store.next_version(cfg.model.model_name)
    return store.write(cfg.model.model_name, version, writer, metadata)
