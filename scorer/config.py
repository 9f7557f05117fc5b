"""The scorer's one configuration object.

Every knob of the scorer process (where it listens, which models it serves and from where, how the
dynamic batcher forms batches, how often it looks for new checkpoints) lives in :class:`ScorerConfig`,
built by :func:`services.config.load_config` with section ``scorer``: defaults < ``--config`` file <
``PREFSTREAM_SCORER_*`` env < CLI flags.  ``validate()`` fails at start-up naming the field to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from services.config import load_config, require
from services.tls import TlsSettings
from services.topics import check_prefix

#: Registry name under which the scorer serves its reward model when nothing else is configured.
DEFAULT_REWARD_MODEL = "reward"
#: Registry name of the default policy (best-of-N sampling).
DEFAULT_POLICY_MODEL = "policy"
#: Version string reported while serving the configured base model (no published version yet).
BASE_VERSION = "base"


@dataclass(frozen=True)
class ScorerConfig(TlsSettings):
    """How one scorer process serves reward scoring and best-of-N."""

    host: str = field(default="127.0.0.1", metadata={"help": "interface the gRPC server binds"})
    port: int = field(default=50052, metadata={"help": "gRPC port (0 picks a free one)"})
    admin_token: str = field(
        default="", repr=False,
        metadata={"help": "bearer token the admin calls that change serving need (pin, unpin, rollback, criteria "
                          "create/delete/feedback); set it via PREFSTREAM_SCORER_ADMIN_TOKEN. Without one they are "
                          "served only when host is loopback"},
    )
    metrics_port: int = field(default=0, metadata={"help": "Prometheus /metrics port; 0 disables the exporter"})
    stack_run_dir: str = field(
        default="",
        metadata={"help": "run dir of `prefstream stack up` whose stack.json gives the registry's Redis when redis_url "
                          "is unset; empty = no stack (unlike the gateway and trainer, the scorer can serve base "
                          "models without one)"},
    )
    redis_url: str | None = field(
        default=None, repr=False,
        metadata={"help": "model registry Redis URL; unset: from stack_run_dir's stack.json, else serve base models only"},
    )
    kafka_bootstrap: str | None = field(
        default=None,
        metadata={"help": "Kafka bootstrap for the model-updates topic (optional: the registry poll suffices)"},
    )
    topic_prefix: str = field(
        default="",
        metadata={"help": "prefix of the model-updates topic name, the same as the gateway's and trainer's topic_prefix"},
    )
    reward_models: tuple[str, ...] = field(
        default=(DEFAULT_REWARD_MODEL,),
        metadata={"help": "reward model names served from start-up; the first is the default for requests without a model"},
    )
    reward_base_path: str | None = field(
        default=None,
        metadata={"help": "HF model dir served as version 'base' before any version is published; default embedded MiniLM-L6"},
    )
    policy_models: tuple[str, ...] = field(
        default=(DEFAULT_POLICY_MODEL,),
        metadata={"help": "policy model names for best-of-N sampling; the first is the default (empty disables sampling)"},
    )
    policy_base_path: str | None = field(
        default=None,
        metadata={"help": "HF causal LM dir (or .gguf file) served as policy version 'base'; default embedded SmolLM2-135M-Instruct"},
    )
    policy_preload: bool = field(
        default=True,
        metadata={"help": "load every policy before reporting SERVING (false: on the first request that generates)"},
    )
    discover_models: bool = field(
        default=True,
        metadata={"help": "also serve reward models that appear in the registry under other names"},
    )
    max_models: int = field(default=8, metadata={"help": "most reward models held at once (each is a full copy in memory)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto (cuda when available)"})
    dtype: str = field(
        default="auto",
        metadata={"help": "float32, bfloat16, float16 or auto: bf16 (else fp16) on GPU; bf16 on CPUs with native bf16 "
                          "(AVX512-BF16, AMX-BF16, Arm BF16), else fp32. The reward head stays fp32 (scorer/precision.py)"},
    )
    cpu_fast_path: bool = field(
        default=True,
        metadata={"help": "serve bf16 BERT encoders on CPU with fused oneDNN GEMMs and cache-sized attention "
                          "(scorer/fastpath.py); other models, dtypes and GPUs keep the stock forward either way"},
    )
    infer_workers: int = field(
        default=0,
        metadata={"help": "batches run at once, each on its own thread; 0 = auto: one per core on CPU (single-threaded "
                          "GEMMs overlap better than one batch split over cores), 1 on GPU"},
    )
    torch_threads: int = field(
        default=0, metadata={"help": "intra-op threads per inference worker on CPU; 0 = cores / infer_workers"}
    )
    max_length: int = field(
        default=0,
        metadata={"help": "tokens per (prompt, response) sequence (prompt cut from the left); 0 = each checkpoint's own, "
                          "as trained"},
    )
    max_batch_tokens: int = field(
        default=16384, metadata={"help": "padded tokens per batch (batch size x longest sequence)"}
    )
    max_batch_size: int = field(default=64, metadata={"help": "sequences per batch"})
    max_wait_ms: float = field(
        default=4.0, metadata={"help": "longest a queued sequence waits for companions before its batch runs"}
    )
    max_pad_ratio: float = field(
        default=1.5, metadata={"help": "a batch's longest sequence is at most this times its shortest (padding bound)"}
    )
    bucket_width: int = field(
        default=32, metadata={"help": "length-bucket granularity in tokens: a batch mixes lengths within few buckets"}
    )
    max_queue: int = field(
        default=4096, metadata={"help": "sequences queued per model before new requests get RESOURCE_EXHAUSTED"}
    )
    max_responses: int = field(default=64, metadata={"help": "responses per Score request / candidates per BestOfN"})
    max_text_chars: int = field(default=32768, metadata={"help": "characters per message or response"})
    max_n: int = field(default=16, metadata={"help": "largest n for best-of-N sampling"})
    max_generate_batch: int = field(default=64, metadata={"help": (
        "most requests in one GenerateBatch (decoded as a batch of their own; a long batch holds other "
        "generation back until it ends)")})
    max_new_tokens: int = field(default=256, metadata={"help": "largest max_tokens a best-of-N request may ask for"})
    default_new_tokens: int = field(default=64, metadata={"help": "max_tokens when a best-of-N request gives none"})
    decode_batch_rows: int = field(
        default=32,
        metadata={"help": "most completion rows a policy decodes together across concurrent requests (continuous "
                          "batching: a request joins between decode steps, leaves when its last row ends; "
                          "scorer/decoding.py); 1 = one request at a time"},
    )
    stream_window: int = field(default=256, metadata={"help": "ScoreStream requests in flight per stream (backpressure)"})
    poll_interval_s: float = field(default=1.0, metadata={"help": "seconds between registry generation polls"})
    discover_interval_s: float = field(default=10.0, metadata={"help": "seconds between registry model listings"})
    warmup: bool = field(default=True, metadata={"help": "run a forward pass on a new checkpoint before swapping it in"})
    swap_in_place: bool = field(
        default=True,
        metadata={"help": "keep a replaced reward model's copy and load the next version's weights into it when "
                          "its config, tokenizer and spec are unchanged (no from_pretrained, no re-conversion: "
                          "~0.3 s of CPU less per swap on the dev box); costs one more resident copy per reward model"},
    )
    drain_timeout_s: float = field(
        default=300.0, metadata={"help": (
            "longest a replaced model is kept for the requests still running on it before it is freed (freed at once "
            "when they finish); a request still running then fails UNAVAILABLE, so keep it at or above the longest a "
            "request may take: the gateway's scorer_timeout_s (300s). At 60s a criteria-loop run on 2 cores lost 4 "
            "best-of-6 requests queued behind a busy trainer at a swap (docs/scorer.md)")}
    )
    swap_wait_s: float = field(default=60.0, metadata={"help": "how long an admin pin/rollback waits for its swap"})
    grace_s: float = field(default=10.0, metadata={"help": "SIGTERM drain period for in-flight RPCs"})

    def validate(self) -> None:
        self.validate_tls()
        require(0 <= self.port <= 65535, "port", f"{self.port} is not a TCP port; use 0-65535")
        require(0 <= self.metrics_port <= 65535, "metrics_port", f"{self.metrics_port} is not a TCP port")
        require(check_prefix(self.topic_prefix) is None, "topic_prefix", str(check_prefix(self.topic_prefix)))
        require(len(self.reward_models) >= 1, "reward_models", "name at least one reward model, e.g. 'reward'")
        for name in (*self.reward_models, *self.policy_models):
            require(_valid_name(name), "reward_models/policy_models", f"{name!r} is not a model name (letters, digits, . _ -)")
        require(not set(self.reward_models) & set(self.policy_models), "policy_models",
                "a name cannot be both a reward model and a policy")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
                f"{self.device!r}: use cpu, cuda, cuda:N or auto")
        require(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype",
                f"{self.dtype!r}: use auto, float32, bfloat16 or float16")
        require(self.torch_threads >= 0, "torch_threads", "must be >= 0 (0 = cores / infer_workers)")
        require(self.infer_workers >= 0, "infer_workers", "must be >= 0 (0 = auto)")
        require(self.max_pad_ratio >= 1.0, "max_pad_ratio", "must be >= 1 (1 = only equal-length buckets share a batch)")
        require(self.max_length == 0 or 16 <= self.max_length <= 8192, "max_length",
                "must be 0 (the checkpoint's own) or within 16..8192 tokens")
        require(self.max_batch_tokens >= max(self.max_length, 16), "max_batch_tokens",
                f"must be >= max_length ({self.max_length}) so the longest sequence fits a batch")
        require(self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        require(0 <= self.max_wait_ms <= 1000, "max_wait_ms", "must be within 0..1000 ms")
        require(self.bucket_width >= 1, "bucket_width", "must be >= 1 token")
        require(self.max_queue >= self.max_batch_size, "max_queue", "must be >= max_batch_size")
        require(self.max_responses >= 1, "max_responses", "must be >= 1")
        require(self.max_text_chars >= 1, "max_text_chars", "must be >= 1")
        require(self.max_n >= 1, "max_n", "must be >= 1")
        require(self.max_generate_batch >= 1, "max_generate_batch", "must be >= 1")
        require(self.decode_batch_rows >= 1, "decode_batch_rows", "must be >= 1 (1 = one request at a time)")
        require(1 <= self.default_new_tokens <= self.max_new_tokens, "default_new_tokens",
                f"must be within 1..max_new_tokens ({self.max_new_tokens})")
        require(self.stream_window >= 1, "stream_window", "must be >= 1")
        require(self.poll_interval_s > 0, "poll_interval_s", "must be > 0 seconds")
        require(self.discover_interval_s > 0, "discover_interval_s", "must be > 0 seconds")
        require(self.max_models >= len(self.reward_models), "max_models",
                f"must be >= the number of reward_models ({len(self.reward_models)})")
        require(self.drain_timeout_s > 0, "drain_timeout_s", "must be > 0 seconds")
        require(self.grace_s >= 0, "grace_s", "must be >= 0 seconds")

    @property
    def default_reward_model(self) -> str:
        return self.reward_models[0]

    @property
    def default_policy_model(self) -> str | None:
        return self.policy_models[0] if self.policy_models else None


def _valid_name(name: str) -> bool:
    return bool(name) and len(name) <= 128 and all(c.isalnum() or c in "._-" for c in name)


def load_scorer_config(
    file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> ScorerConfig:
    """ScorerConfig from defaults < file < PREFSTREAM_SCORER_* env < overrides (None values ignored)."""
    return load_config(ScorerConfig, section="scorer", file=file, env=env, overrides=overrides)


__all__ = ["BASE_VERSION", "DEFAULT_POLICY_MODEL", "DEFAULT_REWARD_MODEL", "ScorerConfig", "load_scorer_config"]
