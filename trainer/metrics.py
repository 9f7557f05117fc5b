"""Prometheus metrics of the trainer: what it consumed, how fast it trains, what the gate decided.

Names carry their units; labels are small closed sets.  Exposed by ``serve_metrics`` when
``metrics_port`` is set (rank 0 only under Ray).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.metrics import LATENCY_BUCKETS_S

RECORDS = Counter(
    "prefstream_trainer_records_total",
    "Preference records consumed, by use (train, eval, replay, dead_letter, refused, duplicate: its id was trained already).",
    ["use"],
)
STEPS = Counter("prefstream_trainer_steps_total", "Optimiser steps taken.")
STEP_SECONDS = Histogram(
    "prefstream_trainer_step_seconds", "Wall time of one optimiser step (collate, forward, backward, update).",
    buckets=LATENCY_BUCKETS_S,
)
LOSS = Gauge("prefstream_trainer_loss", "Training loss of the latest step.")
LEARNING_RATE = Gauge("prefstream_trainer_learning_rate", "Learning rate of the latest step.")
CHECKPOINTS = Counter(
    "prefstream_trainer_checkpoints_total",
    "Checkpoints written, by gate outcome (published, rejected, held: not gated).",
    ["outcome"],
)
ROLLBACKS = Counter(
    "prefstream_trainer_rollbacks_total",
    "Versions the objective's guard refused, after which training went back to the last published weights.",
)
CHECKPOINT_STORE_FULL = Counter(
    "prefstream_trainer_checkpoint_store_full_total",
    "Checkpoint writes refused by a full store (the trainer pauses, nothing is published, it retries).",
)
CHECKPOINT_SECONDS = Histogram(
    "prefstream_trainer_checkpoint_seconds", "Time to evaluate, write and commit one checkpoint.",
    buckets=LATENCY_BUCKETS_S,
)
EVAL_SECONDS = Histogram(
    "prefstream_trainer_eval_seconds", "Time to evaluate one model on the evaluation set.", buckets=LATENCY_BUCKETS_S,
)
EVAL_ACCURACY = Gauge(
    "prefstream_trainer_eval_accuracy", "Pairwise accuracy on the evaluation set (candidate or served model).",
    ["model"],
)
RECORDS_SEEN = Gauge("prefstream_trainer_records_seen", "New records trained on since the lineage started.")
FRESHNESS_SECONDS = Histogram(
    "prefstream_trainer_ack_to_checkpoint_seconds",
    "From the gateway's ack of a record's feedback to the durable checkpoint containing it.",
    buckets=LATENCY_BUCKETS_S,
)
