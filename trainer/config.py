"""TrainerConfig: every knob of the reward-model trainer, typed, defaulted and documented once.

Loaded by :func:`load_trainer_config` with the project-wide precedence (defaults < ``--config`` file <
``PREFSTREAM_TRAINER_*`` env < CLI flags).  The same dataclass drives the continual service, the
offline ``prefstream train reward`` command and the benchmark, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from services.config import ConfigError, load_config, require
from services.topics import PREFERENCES

SECTION = "trainer"
LOSSES: tuple[str, ...] = ("kwise", "pairwise")
SCHEDULES: tuple[str, ...] = ("constant", "inverse_sqrt")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class TrainerConfig:
    """How the trainer builds, trains, checkpoints, gates and publishes reward models."""

    # --- model -------------------------------------------------------------------------------
    base_model: str = field(default="", metadata=_help(
        "local HF model folder (encoder, decoder-only or T5) to start from when nothing is published "
        "yet; empty = the embedded MiniLM-L6"))
    model_name: str = field(default="reward", metadata=_help("registry name of the model this trainer produces"))
    attributes: tuple[str, ...] = field(default=(), metadata=_help(
        "attribute heads trained by regression on score feedback, e.g. helpfulness,correctness,coherence,"
        "complexity,verbosity; empty = reward head only"))
    max_length: int = field(default=256, metadata=_help("tokens per (prompt, response); the prompt is cut from the left"))
    dtype: str = field(default="float32", metadata=_help("parameter dtype: float32, bfloat16 or float16"))
    autocast: str = field(default="none", metadata=_help(
        "mixed precision for the forward pass with fp32 master weights: none, bf16, or auto (bf16 where the "
        "hardware multiplies bf16 natively: CUDA with bf16, CPUs with AVX512-BF16/AMX; ~2.7x faster steps "
        "on the 2-core Zen 4 dev box, where bf16 on CPU also trains with eager attention, see "
        "trainer.engine.eager_attention_for_cpu_bf16)"))

    # --- loss --------------------------------------------------------------------------------
    loss: str = field(default="kwise", metadata=_help(
        "kwise: InstructGPT K-wise loss, every response encoded once; pairwise: each ranking expanded "
        "into K(K-1)/2 independent Bradley-Terry pairs"))
    use_margin: bool = field(default=False, metadata=_help("subtract each record's margin inside the sigmoid (Llama 2)"))
    center_rewards_coefficient: float = field(default=0.0, metadata=_help(
        "λ of the reward-centering regulariser λ·(r_c + r_r)^2 (Eisenstein et al. 2023); 0 disables"))
    attribute_loss_weight: float = field(default=1.0, metadata=_help("weight of the attribute MSE term"))

    # --- optimisation ------------------------------------------------------------------------
    lr: float = field(default=2e-5, metadata=_help("peak AdamW learning rate"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    schedule: str = field(default="constant", metadata=_help(
        "LR schedule after warm-up: constant or inverse_sqrt (no schedule needs the total step count)"))
    warmup_steps: int = field(default=10, metadata=_help("linear LR warm-up steps"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm; 0 disables"))
    ema_decay: float = field(default=0.99, metadata=_help(
        "weights are averaged (EMA, warm-up min(decay, (1+t)/(10+t))); evaluation, the gate, checkpoints and "
        "the scorer use the average, training goes on from the live weights; 0 disables"))
    disable_dropout: bool = field(default=True, metadata=_help(
        "turn dropout off while training (TRL's RewardConfig default: rewards of the pair stay comparable)"))
    batch_size: int = field(default=16, metadata=_help("new records per optimiser step (replay comes on top)"))
    max_tokens_per_forward: int = field(default=8192, metadata=_help(
        "padded tokens per forward bucket; bounds activation memory"))
    epochs: int = field(default=1, metadata=_help("passes over the data (offline training only)"))
    seed: int = field(default=0, metadata=_help("seed for initialisation, shuffling and replay sampling"))
    device: str = field(default="auto", metadata=_help("auto, cpu or cuda (in-process training)"))
    torch_threads: int = field(default=0, metadata=_help("torch intra-op threads; 0 = torch's default"))

    # --- stream ------------------------------------------------------------------------------
    kafka_bootstrap: str = field(default="", metadata=_help(
        "Kafka bootstrap servers; empty = from the local stack (stack_run_dir)"))
    topic: str = field(default=PREFERENCES.name, metadata=_help("preference topic to consume"))
    group_id: str = field(default="prefstream-trainer", metadata=_help("Kafka consumer group"))
    poll_timeout_s: float = field(default=0.5, metadata=_help("longest single Kafka poll"))
    max_batch_wait_s: float = field(default=1.0, metadata=_help(
        "train a partial micro-batch once its first record has waited this long (freshness over throughput)"))
    replay_ratio: float = field(default=0.5, metadata=_help(
        "replayed past records mixed in per new record (0 disables replay)"))
    replay_capacity: int = field(default=2000, metadata=_help("reservoir size of the replay buffer, in records"))
    replay_weight: float = field(default=0.25, metadata=_help(
        "loss weight of a replayed record relative to a new one (a weighted mean over the micro-batch); below 1, "
        "replay guards against forgetting without training a stream that does not shift a second time"))

    # --- checkpoints -------------------------------------------------------------------------
    checkpoint_url: str = field(default=".run/checkpoints", metadata=_help(
        "checkpoint store (a folder or file:// URL) shared with the scorer"))
    checkpoint_every_records: int = field(default=512, metadata=_help(
        "checkpoint after this many new records (0 = only by time)"))
    checkpoint_every_s: float = field(default=10.0, metadata=_help(
        "checkpoint when this many seconds passed since the last one and records are pending (0 = only by count)"))
    keep_checkpoints: int = field(default=50, metadata=_help(
        "checkpoints kept in the store (newest first; the served, latest and pinned versions are never deleted); "
        "0 keeps all"))
    save_optimizer_state: bool = field(default=False, metadata=_help(
        "store AdamW moments (and, with ema_decay, the live weights) in each checkpoint for an exact resume "
        "(3x the model size per checkpoint); without it a resumed trainer goes on from the averaged weights"))

    # --- evaluation gate ---------------------------------------------------------------------
    eval_data: str = field(default="", metadata=_help(
        "OpenPipe JSONL file of held-out pairs for the gate; TEST-split records from the topic are added"))
    eval_max_records: int = field(default=100, metadata=_help(
        "size cap of the evaluation set (a seeded subsample of eval_data, then topic TEST records)"))
    eval_batch_size: int = field(default=64, metadata=_help("sequences per evaluation forward pass"))
    gate_tolerance: float = field(default=0.02, metadata=_help(
        "reject a checkpoint whose pairwise accuracy is more than this below the served model's"))
    gate_confidence: float = field(default=0.9, metadata=_help(
        "how sure the gate must be (one-sided, paired over the same evaluation pairs) that a checkpoint is "
        "more than gate_tolerance below the served model before rejecting it; 0.5 compares the accuracies "
        "as they are, higher values forgive more evaluation noise"))
    publish_without_eval: bool = field(default=True, metadata=_help(
        "publish checkpoints while there are no evaluation records (else hold them as rejected)"))
    publish: bool = field(default=True, metadata=_help("gate and publish checkpoints to the registry"))

    # --- registry ----------------------------------------------------------------------------
    redis_url: str = field(default="", metadata=_help("model registry Redis; empty = from the local stack"))
    announce: bool = field(default=True, metadata=_help("announce published/rejected versions on the model-updates topic"))

    # --- Ray ---------------------------------------------------------------------------------
    num_workers: int = field(default=0, metadata=_help(
        "Ray Train DDP workers; 0 = train in this process without Ray"))
    use_gpu: bool = field(default=False, metadata=_help("one GPU per Ray worker"))
    ray_address: str = field(default="", metadata=_help("Ray cluster address; empty = from the local stack"))
    ray_max_failures: int = field(default=2, metadata=_help(
        "worker-group restarts Ray Train attempts; each restart resumes from the latest checkpoint"))
    ray_storage_path: str = field(default=".run/ray_train", metadata=_help("Ray Train run storage (logs, state)"))

    # --- run control -------------------------------------------------------------------------
    stack_run_dir: str = field(default="", metadata=_help(
        "run dir of `prefstream stack up` to read endpoints from; empty = PREFSTREAM_STACK_RUN_DIR or .run/stack"))
    max_records: int = field(default=0, metadata=_help(
        "stop once the lineage has trained this many new records, counted across restarts (0 = run for ever)"))
    idle_exit_s: float = field(default=0.0, metadata=_help(
        "stop after this many seconds without new records, checkpointing first (0 = never)"))
    metrics_port: int = field(default=0, metadata=_help("Prometheus /metrics port (0 disables)"))

    def validate(self) -> None:
        require(self.loss in LOSSES, "loss", f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        require(self.schedule in SCHEDULES, "schedule",
                f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        require(self.device in DEVICES, "device", f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        require(self.dtype in ("float32", "bfloat16", "float16"), "dtype", "use float32, bfloat16 or float16")
        require(self.autocast in ("none", "bf16", "auto"), "autocast", f"{self.autocast!r}: use none, bf16 or auto")
        require(self.max_length >= 16, "max_length", f"must be at least 16 tokens, got {self.max_length}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay} (0 disables averaging)")
        require(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.max_tokens_per_forward >= self.max_length, "max_tokens_per_forward",
                f"must be >= max_length ({self.max_length}) so one row fits a forward pass")
        require(self.epochs >= 1, "epochs", "must be >= 1")
        require(self.torch_threads >= 0, "torch_threads", "must be >= 0 (0 = torch's default)")
        require(self.center_rewards_coefficient >= 0, "center_rewards_coefficient", "must be >= 0")
        require(self.attribute_loss_weight >= 0, "attribute_loss_weight", "must be >= 0")
        require(len(set(self.attributes)) == len(self.attributes) and "reward" not in self.attributes, "attributes",
                "list each attribute once and do not name one 'reward' (logit 0 is the reward)")
        require(self.poll_timeout_s > 0, "poll_timeout_s", "must be > 0 seconds")
        require(self.max_batch_wait_s >= 0, "max_batch_wait_s", "must be >= 0 seconds")
        require(self.replay_ratio >= 0, "replay_ratio", "must be >= 0 (0 disables replay)")
        require(self.replay_capacity >= 0, "replay_capacity", "must be >= 0")
        require(0 < self.replay_weight <= 1, "replay_weight",
                "must be in (0, 1] (use replay_ratio 0 to turn replay off)")
        require(self.checkpoint_every_records >= 0 and self.checkpoint_every_s >= 0, "checkpoint_every_records",
                "checkpoint intervals must be >= 0")
        require(self.checkpoint_every_records > 0 or self.checkpoint_every_s > 0, "checkpoint_every_s",
                "set checkpoint_every_records or checkpoint_every_s > 0, or offsets would never be committed")
        require(self.keep_checkpoints >= 0, "keep_checkpoints", "must be >= 0 (0 keeps every checkpoint)")
        require(self.eval_max_records >= 0, "eval_max_records", "must be >= 0")
        require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        require(0 <= self.gate_tolerance <= 1, "gate_tolerance", "is an accuracy difference; use 0..1")
        require(0.5 <= self.gate_confidence < 1, "gate_confidence",
                f"is a confidence level, got {self.gate_confidence}; use 0.5 <= gate_confidence < 1 "
                "(0.5 = plain accuracy comparison, 0.9 = the default)")
        require(self.num_workers >= 0, "num_workers", "must be >= 0 (0 = in-process, no Ray)")
        require(not (self.use_gpu and self.num_workers == 0), "use_gpu",
                "applies to Ray workers; set num_workers >= 1, or use device=cuda for in-process training")
        require(self.ray_max_failures >= 0, "ray_max_failures", "must be >= 0")
        require(self.max_records >= 0, "max_records", "must be >= 0 (0 = unbounded)")
        require(self.idle_exit_s >= 0, "idle_exit_s", "must be >= 0 (0 = never)")
        require(bool(self.model_name) and "/" not in self.model_name, "model_name", "must be non-empty without '/'")
        if self.eval_data:
            require(Path(self.eval_data).expanduser().is_file(), "eval_data",
                    f"{self.eval_data} is not a file; give an OpenPipe JSONL file or leave it empty")

    # --- derived -----------------------------------------------------------------------------

    def resolved_base_model(self) -> str:
        from services.reward_model import default_reward_model_path

        return self.base_model or default_reward_model_path()

    def model_spec(self, base_model: str | None = None):  # -> services.reward_model.RewardModelSpec
        from services.reward_model import RewardModelSpec

        return RewardModelSpec(
            base_model=base_model or self.resolved_base_model(),
            max_length=self.max_length,
            attributes=tuple(self.attributes),
            dtype=self.dtype,
        )

    def loss_config(self) -> dict[str, Any]:
        """What a checkpoint records about how it was trained."""
        return {
            "loss": self.loss,
            "use_margin": self.use_margin,
            "center_rewards_coefficient": self.center_rewards_coefficient,
            "attribute_loss_weight": self.attribute_loss_weight,
            "attributes": list(self.attributes),
            "lr": self.lr,
            "schedule": self.schedule,
            "warmup_steps": self.warmup_steps,
            "ema_decay": self.ema_decay,
            "batch_size": self.batch_size,
            "replay_ratio": self.replay_ratio,
            "replay_weight": self.replay_weight,
            "max_length": self.max_length,
            "disable_dropout": self.disable_dropout,
        }

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attributes"] = list(self.attributes)
        return d

    def with_endpoints(self) -> "TrainerConfig":
        """A copy whose empty Kafka/Redis/Ray addresses are filled from the local stack's stack.json."""
        needed = {
            "kafka_bootstrap": not self.kafka_bootstrap,
            "redis_url": not self.redis_url and self.publish,
            "ray_address": not self.ray_address and self.num_workers > 0,
        }
        if not any(needed.values()):
            return self
        from services.stack import StackError, load_endpoints

        run_dir = self.stack_run_dir or os.environ.get("PREFSTREAM_STACK_RUN_DIR") or None
        try:
            ep = load_endpoints(run_dir)
        except StackError as e:
            missing = ", ".join(k for k, v in needed.items() if v)
            raise ConfigError(f"{missing}: not set and {e}; or pass --{missing.split(',')[0].replace('_', '-')}") from None
        changes = {}
        for name, want in needed.items():
            if want:
                value = getattr(ep, name)
                if not value:
                    raise ConfigError(f"{name}: not set and the local stack does not run that component; set it")
                changes[name] = value
        return dataclasses.replace(self, **changes)


def load_trainer_config(
    file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> TrainerConfig:
    """TrainerConfig from defaults < file < PREFSTREAM_TRAINER_* env < overrides (None ignored)."""
    return load_config(TrainerConfig, section=SECTION, file=file, env=env, overrides=overrides)
