"""The demo's one configuration object (``prefstream demo``, ``make demo``, ``bench freshness``).

Defaults are the embedded models and the shipped HH-RLHF data, sized to finish in well under 15
minutes on a 2-core machine.  Layered like every service: defaults < --config file <
``PREFSTREAM_DEMO_*`` env < flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from services.config import load_config, require


@dataclass(frozen=True)
class DemoConfig:
    run_dir: Path = field(default=Path(".run/demo"), metadata={"help": "stack, checkpoints and service logs"})
    fresh: bool = field(default=True, metadata={"help": (
        "start from an empty run_dir: stop a stack left running there and delete a previous demo's topics, "
        "checkpoints and registry, so the figures describe this run only; false resumes them (the trainer "
        "then first works off whatever that run left unconsumed)")})
    report_dir: Path | None = field(default=None, metadata={"help": "report folder; default reports/demo-<time>"})
    stack_run_dir: str = field(
        default="", metadata={"help": "run dir of a running `prefstream stack up` to use instead of starting one; "
                                      "empty = start a stack under run_dir"}
    )
    train_file: str = field(default="", metadata={"help": "preference pairs streamed as live feedback; default the shipped HH train set"})
    eval_file: str = field(default="", metadata={"help": "held-out pairs for accuracy; default the shipped HH test set"})
    events: int = field(default=2000, metadata={"help": "preference pairs to stream (each is a completion + a choice)"})
    rate: float = field(default=3.0, metadata={"help": "pairs per second the simulated app sends"})
    app_concurrency: int = field(default=8, metadata={"help": "app calls in flight"})
    load_rate: float = field(default=1.0, metadata={"help": "best-of-N requests per second against the scorer"})
    candidates: int = field(default=4, metadata={"help": "candidates per best-of-N request"})
    project: str = field(default="demo", metadata={"help": "project the app logs under (gets its own API key)"})
    gateway_replicas: int = field(default=1, metadata={"help": "gateway processes (each with its feedback processor, one consumer group); the app spreads its calls over them"})
    scorer_replicas: int = field(default=1, metadata={"help": "scorer processes serving the same model; the best-of-N load goes round-robin over them"})
    trainer_workers: int = field(default=0, metadata={"help": "Ray Train workers for the trainer (0 = in-process, fastest on 2 cores)"})
    checkpoint_every_s: float = field(default=1.0, metadata={"help": "trainer checkpoint (and publish) interval: 1 s "
                                                                  "checkpoints after every trained batch (a checkpoint "
                                                                  "with its gate takes 2-4 s here), the freshest loop"})
    checkpoint_every_records: int = field(default=256, metadata={"help": "trainer checkpoint interval in records"})
    eval_max_records: int = field(default=64, metadata={"help": "held-out pairs the trainer's gate evaluates each checkpoint on"})
    max_length: int = field(default=128, metadata={"help": "tokens per (prompt, response) for training and scoring"})
    replay_ratio: float = field(default=0.25, metadata={"help": "share of replayed past records in each trainer batch"})
    final_eval_records: int = field(default=500, metadata={"help": "held-out pairs for the final base-vs-served accuracy (0 skips)"})
    heldout_points: int = field(default=2, metadata={"help": "served versions between the start and the final one "
                                                             "also judged on those held-out pairs, for the report's "
                                                             "accuracy plot (copied when first served; about 25 s "
                                                             "each to judge on 2 cores)"})
    keep_checkpoints: int = field(default=40, metadata={"help": "checkpoints the trainer keeps (~90 MB each); the "
                                                                "demo reads every checkpoint's metadata as it appears, "
                                                                "so history survives their removal"})
    drain_timeout_s: float = field(default=150.0, metadata={"help": "after the app finishes, how long to wait for the last events to be trained and served"})
    startup_timeout_s: float = field(default=240.0, metadata={"help": "how long services get to become ready"})
    progress_every_s: float = field(default=3.0, metadata={"help": "seconds between progress lines"})
    keep_stack: bool = field(default=False, metadata={"help": "leave the stack running at the end (services are always stopped)"})
    seed: int = field(default=0, metadata={"help": "seed for candidate order and the load's prompts"})

    def validate(self) -> None:
        require(self.events >= 1, "events", "must be >= 1")
        require(self.rate > 0, "rate", "must be > 0 pairs per second")
        require(self.load_rate > 0, "load_rate", "must be > 0 requests per second")
        require(2 <= self.candidates <= 16, "candidates", "must be within 2..16")
        require(self.trainer_workers >= 0, "trainer_workers", "must be >= 0")
        require(1 <= self.gateway_replicas <= 8, "gateway_replicas", "must be within 1..8")
        require(1 <= self.scorer_replicas <= 8, "scorer_replicas", "must be within 1..8")
        require(self.checkpoint_every_s > 0, "checkpoint_every_s", "must be > 0 seconds")
        require(self.eval_max_records >= 1, "eval_max_records", "must be >= 1")
        require(self.final_eval_records >= 0, "final_eval_records", "must be >= 0")
        require(self.heldout_points >= 0, "heldout_points", "must be >= 0")
        require(self.keep_checkpoints >= 5, "keep_checkpoints",
                "keep at least 5, so the demo reads each checkpoint's metadata before it is removed")


def load_demo_config(
    file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> DemoConfig:
    return load_config(DemoConfig, section="demo", file=file, env=env, overrides=overrides)
