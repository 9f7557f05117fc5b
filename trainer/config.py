"""TrainerConfig: every knob of the trainer, typed, defaulted and documented once, in sections.

One trainer process trains one model of one kind (``model_kind``: a reward model or a DPO policy)
through the objective of that kind (:mod:`trainer.objectives`).  The settings are grouped the way TRL
pairs configs with trainers: what the model is (``model``), how each objective's loss is computed
(``reward``, ``dpo``), how the optimiser steps (``optim``), where records come from (``stream``),
when checkpoints are written (``checkpoint``), what the gate and the registry do (``gate``) and how
the process runs (``runtime``).

Every leaf keeps one flat name, unique across sections, so precedence and spelling are unchanged:
defaults < ``--config`` file (flat keys, or grouped by section) < ``PREFSTREAM_TRAINER_<FIELD>`` env <
``--field`` flags (:func:`services.config.load_config`).  In code a value is read through its section
(``cfg.optim.lr``); ``services.config.replace(cfg, lr=...)`` changes leaves by flat name.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from services.checkpoints import is_valid_name
from services.config import fill_endpoints, flat_dict, load_config, require
from services.kinds import ModelKind
from services.topics import PREFERENCES, check_prefix, topic_name

SECTION = "trainer"
LOSSES: tuple[str, ...] = ("kwise", "pairwise")
DPO_LOSSES: tuple[str, ...] = ("plackett_luce", "sigmoid", "ipo")
FINETUNE_MODES: tuple[str, ...] = ("lora", "full")
STOP_ANCHOR_SIDES: tuple[str, ...] = ("both", "rise")
SCHEDULES: tuple[str, ...] = ("constant", "inverse_sqrt")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
#: The learning rate an objective trains with when ``lr`` is left at 0.
DEFAULT_LR: dict[ModelKind, float] = {ModelKind.REWARD: 2e-5, ModelKind.POLICY: 5e-5}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ModelSettings:
    """What is trained: the kind, the base weights, the name it is registered under, precision."""

    model_kind: str = field(default="reward", metadata=_help(
        "reward (a reward model, scored by the scorer) or policy (a causal LM trained with DPO, sampled by "
        "best-of-N and the chat completions route)"))
    base_model: str = field(default="", metadata=_help(
        "local HF model folder (or a .gguf file for a policy) to start from when nothing is published yet; "
        "empty = the embedded default of the kind (MiniLM-L6 reward backbone, SmolLM2-135M-Instruct policy)"))
    model_name: str = field(default="", metadata=_help(
        "registry name of the model this trainer produces; empty = the kind (reward or policy)"))
    attributes: tuple[str, ...] = field(default=(), metadata=_help(
        "reward models: attribute heads trained by regression on score feedback, e.g. helpfulness,correctness,"
        "coherence,complexity,verbosity; empty = reward head only"))
    max_length: int = field(default=256, metadata=_help(
        "tokens per (prompt, response); the prompt is cut from the left"))
    dtype: str = field(default="float32", metadata=_help("parameter dtype: float32, bfloat16 or float16"))
    autocast: str = field(default="auto", metadata=_help(
        "mixed precision for the forward passes (training and the gate's evaluation) with fp32 master weights: "
        "none, bf16, or auto (bf16 where the hardware multiplies bf16 natively: CUDA with bf16, CPUs with "
        "AVX512-BF16/AMX; ~2.7x faster steps and 1.7x faster evaluation on the 2-core Zen 4 dev box, where bf16 "
        "on CPU also trains with eager attention, see trainer.learner.eager_attention_for_cpu_bf16; fp32 "
        "elsewhere)"))
    disable_dropout: bool = field(default=True, metadata=_help(
        "turn dropout off while training (rewards of a pair, and policy and reference log-probs, stay comparable)"))

    @property
    def kind(self) -> ModelKind:
        return ModelKind(self.model_kind)

    def validate(self) -> None:
        require(self.model_kind in tuple(ModelKind), "model_kind",
                f"unknown kind {self.model_kind!r}; use {' or '.join(ModelKind)}")
        require(self.dtype in ("float32", "bfloat16", "float16"), "dtype", "use float32, bfloat16 or float16")
        require(self.autocast in ("none", "bf16", "auto"), "autocast", f"{self.autocast!r}: use none, bf16 or auto")
        require(self.max_length >= 16, "max_length", f"must be at least 16 tokens, got {self.max_length}")
        require("/" not in self.model_name, "model_name", "must not contain '/'")
        require(len(set(self.attributes)) == len(self.attributes) and "reward" not in self.attributes, "attributes",
                "list each attribute once and do not name one 'reward' (logit 0 is the reward)")
        require(not (self.attributes and self.model_kind == ModelKind.POLICY), "attributes",
                "attribute heads belong to reward models; leave attributes empty with model_kind=policy")


@dataclass(frozen=True)
class RewardLossSettings:
    """How a reward model's loss is computed (model_kind=reward)."""

    loss: str = field(default="kwise", metadata=_help(
        "kwise: InstructGPT K-wise loss, every response encoded once; pairwise: each ranking expanded "
        "into K(K-1)/2 independent Bradley-Terry pairs"))
    use_margin: bool = field(default=False, metadata=_help("subtract each record's margin inside the sigmoid (Llama 2)"))
    center_rewards_coefficient: float = field(default=0.0, metadata=_help(
        "λ of the reward-centering regulariser λ·(r_c + r_r)^2 (Eisenstein et al. 2023); 0 disables"))
    attribute_loss_weight: float = field(default=1.0, metadata=_help("weight of the attribute MSE term"))

    def validate(self) -> None:
        require(self.loss in LOSSES, "loss", f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        require(self.center_rewards_coefficient >= 0, "center_rewards_coefficient", "must be >= 0")
        require(self.attribute_loss_weight >= 0, "attribute_loss_weight", "must be >= 0")


@dataclass(frozen=True)
class DPOSettings:
    """How a policy learns from preferences (model_kind=policy), and what its gate guards."""

    dpo_loss: str = field(default="plackett_luce", metadata=_help(
        "plackett_luce: a ranking of K trains as the Plackett-Luce DPO loss, one forward per response (K=2 is "
        "exactly sigmoid DPO); sigmoid: DPO (Rafailov et al. 2023) on best vs worst of each ranking; ipo: IPO "
        "(Azar et al. 2023) on best vs worst"))
    beta: float = field(default=0.1, metadata=_help(
        "β: strength of the KL anchor to the reference policy (IPO: its τ)"))
    label_smoothing: float = field(default=0.0, metadata=_help(
        "conservative DPO: the probability ε that a preference label is flipped (with dpo_loss=sigmoid); "
        "0 = plain DPO"))
    sft_weight: float = field(default=0.0, metadata=_help(
        "α of RPO (Pang et al. 2024): α times the NLL per token of the preferred responses (one mean over all their "
        "tokens, so a short response's tokens weigh no more than a long one's) is added to the DPO-family loss, so "
        "the policy moves toward the replies it is shown rather than only away from the rejected ones; 0 = the loss "
        "alone"))
    stop_anchor: float = field(default=0.0, metadata=_help(
        "weight of a penalty on the policy's end-of-turn probability moving where a preferred reply goes on: at "
        "every position of the chosen reply that is not its end, its distance from the reference's "
        "(trainer.dpo_losses.stop_anchor_loss), summed over the reply and averaged over the records. A pair that "
        "prefers a reply cut short then teaches the stop where it was cut, not at every earlier sentence end; 0 = off"))
    stop_anchor_sides: str = field(default="both", metadata=_help(
        "both: the anchor prices the stop moving either way; rise: only its rise over the reference's (lowering it "
        "costs nothing; on the criteria loop the policy then went long, docs/loop.md)"))
    temperature: float = field(default=1.0, metadata=_help(
        "the temperature the trained replies were sampled at: every log-prob (policy and reference, so the DPO "
        "margin and the NLL term) is read from softmax(logits / temperature), as TRL's online trainers read them at "
        "their sampling temperature, so fitting the NLL to replies sampled at T < 1 does not sharpen the policy round after "
        "round. Its gradient steps are 1/T larger: on the criteria loop, distilling replies read at 0.7 shortened the "
        "policy faster than at 1, not slower (docs/loop.md); 1 = the model's own distribution"))
    finetune: str = field(default="lora", metadata=_help(
        "lora: train a LoRA adapter; the reference policy is the same weights with the adapter disabled (no "
        "second model in memory); full: train every weight against a frozen copy of the start weights"))
    lora_rank: int = field(default=16, metadata=_help("LoRA rank r"))
    lora_alpha: float = field(default=32.0, metadata=_help("LoRA scaling α (the update is scaled by α/r)"))
    lora_dropout: float = field(default=0.0, metadata=_help("dropout on the LoRA branch"))
    lora_target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"), metadata=_help(
        "module names (suffixes) that get a LoRA adapter; each must exist in the model"))
    max_response_tokens: int = field(default=2048, metadata=_help(
        "a response longer than this many tokens is bad input: its record goes to the dead-letter topic; shorter "
        "responses that do not fit max_length keep their first tokens (three quarters of max_length)"))
    max_kl: float = field(default=0.5, metadata=_help(
        "gate drift guard: reject a version whose mean per-token KL to the reference on held-out prompts "
        "exceeds this (nats)"))
    guard_prompts: int = field(default=8, metadata=_help(
        "held-out prompts the gate samples replies for (KL, empty replies, repetition); 0 disables the guards"))
    guard_set: str = field(default="", metadata=_help(
        "a JSONL file of the prompts the guards reply to, fixed before training starts, each with the rule criteria "
        "its replies are judged by (trainer/guard_set.py; read at every evaluation, so it may be replaced); the guards "
        "reply to its first guard_prompts. Empty = the prompts of the held-out records as they arrive, so the first "
        "versions of a fresh stream are judged on the few that came before them"))
    guard_max_new_tokens: int = field(default=48, metadata=_help("reply length the gate samples, in tokens"))
    guard_temperature: float = field(default=0.0, metadata=_help(
        "temperature of the guard's replies (one per prompt, fixed seeds; the reference's are drawn alike); 0 = greedy. "
        "Set it to the temperature the policy is served at so the guards see the replies users get: on the criteria "
        "loop a version's greedy replies kept 36 words and the reference's reward while its replies sampled at 0.7 "
        "fell to 28 words and lost a sixth of it (docs/loop.md)"))
    max_empty_rate: float = field(default=0.25, metadata=_help(
        "gate degeneration guard: reject when more than this share of the sampled replies is empty"))
    max_repetition_rate: float = field(default=0.5, metadata=_help(
        "gate degeneration guard: reject when the mean share of repeated 3-grams in the replies exceeds this"))
    max_shrink: float = field(default=0.3, metadata=_help(
        "gate length guard: reject a version whose replies to the held-out prompts are, on average, more than this "
        "share shorter in words than the served version's replies to the same prompts (than the reference policy's, "
        "when those are shorter: a version that ran long may be cut back; with the criteria guard and a max_words "
        "criterion, each reference reply counts at most at its limit, since cutting a reply that ran over is what "
        "the criterion asks). Saying less is DPO's cheap way "
        "to satisfy a preference: on the criteria loop one version cut the replies from 35 to 20 words and lost the "
        "reward model's quality (docs/loop.md); a slower cut, version by version, passes. 1 disables"))
    reward_guard: str = field(default="", metadata=_help(
        "gate reward guard: the registry name of a reward model. The version of it the registry serves scores the "
        "guard's replies and the reference policy's replies to the same prompts, and a version whose mean score is "
        "more than max_reward_drop below the reference's is refused, so no drift is served that the reward model "
        "calls worse than where the policy started, however slowly it came; empty = off (also while no version of "
        "that model is served)"))
    max_reward_drop: float = field(default=0.0, metadata=_help(
        "gate reward guard: the largest drop of the mean reward below the reference policy's replies that is "
        "tolerated, in the reward model's own units (with reward_guard). The rule reads the mean, not a confidence "
        "bound: its noise (the paired standard error, in the registry as reward_drop_se) is what this margin is for; "
        "a bound would let a drop as large as the one it is meant to stop through on a few prompts (doubt_z decides only "
        "whether a version over it waits or is rolled back)"))
    max_reward_giveback: float = field(default=-1.0, metadata=_help(
        "gate reward guard: the largest drop of the mean reward below the served version's replies to the same guard "
        "prompts that is tolerated (with reward_guard; paired prompt by prompt, the SE in the refusal). The bar "
        "against the reference (max_reward_drop) bounds where a run may end up; this one bounds each step, so a "
        "version does not spend what the served one kept (on the criteria loop a version 0.021 below the served one "
        "and 0.019 below the reference was served, and lost the quality target, docs/loop.md). Two versions a few "
        "steps apart sample alike replies under the same seeds, so their difference is read more tightly than "
        "either's against the reference. Negative disables (the default)"))
    criteria_guard: bool = field(default=False, metadata=_help(
        "gate criteria guard: the rule criteria a held-out record names (criteria feedback records carry "
        "criterion:name@version) judge the guard's reply to its prompt and the reference policy's, and a version "
        "whose replies break them more often than the reference's, by more than max_violation_rise, is refused: the "
        "criteria the policy is trained on must not get worse than where it started (on the criteria loop a version "
        "broke the word limit in 88% of its replies against the base's 50% and was served, docs/loop.md). Reward and "
        "judge criteria need a served model and are not read here"))
    max_violation_rise: float = field(default=0.0, metadata=_help(
        "gate criteria guard: the largest rise, as a share of the guard prompts, of the replies that break their "
        "record's rule criteria over the reference policy's replies (with criteria_guard)"))
    max_violation_giveback: float = field(default=1.0, metadata=_help(
        "gate criteria guard: the largest rise, as a share of the guard prompts that name it, of the replies that break "
        "one rule criterion over the served version's replies to the same prompts, criterion by criterion (with "
        "criteria_guard; a share breaking any of them would let a version trade an earlier criterion for a new one), so a "
        "later version does not give back what an earlier one learnt (on the criteria loop a second phase took the "
        "word limit's violations from 31% back to 50%, docs/loop.md). The rule reads one reply per prompt, so two "
        "versions alike differ by about 0.15 on 20 prompts; 1 disables"))
    doubt_z: float = field(default=0.0, metadata=_help(
        "gate reward and criteria guards: a version whose mean drop (or rise) exceeds the tolerance by no more than "
        "doubt_z standard errors of it is in doubt: not published and not rolled back, like one judged on too few "
        "prompts; training goes on and the next checkpoint is judged on more. Only one beyond that is refused and "
        "rolled back. Nothing the tolerance bars is served either way: what changes is that a difference one sampled "
        "reply per prompt can make no longer sends training back to the served weights (on the criteria loop, "
        "refusals within the noise before a first version was served sent every checkpoint back to the base policy, "
        "docs/loop.md). 0 = refuse on the mean alone"))
    min_guard_prompts: int = field(default=0, metadata=_help(
        "a version whose guards read fewer distinct held-out prompts than this is not published yet, and not rolled "
        "back: training goes on and the next checkpoint is judged on more. The first checkpoints of a fresh stream "
        "see a held-out set of a few records (the criteria loop's first version was judged on 2-3 prompts); "
        "0 = judge on whatever there is"))

    def validate(self) -> None:
        require(self.dpo_loss in DPO_LOSSES, "dpo_loss",
                f"unknown loss {self.dpo_loss!r}; choose one of {', '.join(DPO_LOSSES)}")
        require(self.beta > 0, "beta", f"must be > 0, got {self.beta} (it scales the implicit reward)")
        require(0 <= self.label_smoothing < 0.5, "label_smoothing", "is a flip probability; use 0 <= ε < 0.5")
        require(self.label_smoothing == 0 or self.dpo_loss == "sigmoid", "label_smoothing",
                f"applies to dpo_loss=sigmoid (conservative DPO), not to {self.dpo_loss}; set it to 0 or use sigmoid")
        require(self.sft_weight >= 0 and math.isfinite(self.sft_weight), "sft_weight",
                f"must be a finite number >= 0, got {self.sft_weight} (0 turns the NLL term off)")
        require(self.stop_anchor >= 0 and math.isfinite(self.stop_anchor), "stop_anchor",
                f"must be a finite number >= 0, got {self.stop_anchor} (0 turns the anchor off)")
        require(self.stop_anchor_sides in STOP_ANCHOR_SIDES, "stop_anchor_sides",
                f"use one of {', '.join(STOP_ANCHOR_SIDES)}, got {self.stop_anchor_sides!r}")
        require(0 < self.temperature <= 10 and math.isfinite(self.temperature), "temperature",
                f"must be within (0, 10], got {self.temperature} (the sampling temperature of the trained replies; "
                "greedy replies have none: use 1)")
        require(self.finetune in FINETUNE_MODES, "finetune", f"use one of {', '.join(FINETUNE_MODES)}")
        require(self.lora_rank >= 1, "lora_rank", f"must be >= 1, got {self.lora_rank}")
        require(self.lora_alpha > 0, "lora_alpha", "must be > 0")
        require(0 <= self.lora_dropout < 1, "lora_dropout", "is a probability; use 0 <= p < 1")
        require(bool(self.lora_target_modules), "lora_target_modules", "name at least one module, e.g. q_proj,v_proj")
        require(self.max_response_tokens >= 1, "max_response_tokens", "must be >= 1")
        require(self.max_kl > 0, "max_kl", "must be > 0 nats")
        require(self.guard_prompts >= 0, "guard_prompts", "must be >= 0 (0 disables the guards)")
        require(self.guard_max_new_tokens >= 1, "guard_max_new_tokens", "must be >= 1")
        require(math.isfinite(self.guard_temperature) and 0 <= self.guard_temperature <= 2, "guard_temperature",
                f"must be within [0, 2], got {self.guard_temperature} (0 = greedy replies)")
        require(0 <= self.max_empty_rate <= 1, "max_empty_rate", "is a share; use 0..1")
        require(0 <= self.max_repetition_rate <= 1, "max_repetition_rate", "is a share; use 0..1")
        require(0 < self.max_shrink <= 1, "max_shrink",
                f"is a share of the served version's reply length, got {self.max_shrink}; use 0 < max_shrink <= 1 "
                "(1 disables the length guard)")
        require(math.isfinite(self.max_violation_rise) and 0 <= self.max_violation_rise <= 1, "max_violation_rise",
                f"is a share of the guard prompts, got {self.max_violation_rise}; use 0 <= max_violation_rise <= 1")
        require(math.isfinite(self.max_violation_giveback) and 0 <= self.max_violation_giveback <= 1,
                "max_violation_giveback", f"is a share of the guard prompts, got {self.max_violation_giveback}; use "
                "0 <= max_violation_giveback <= 1 (1 disables)")
        require(math.isfinite(self.doubt_z) and 0 <= self.doubt_z <= 10, "doubt_z",
                f"is a number of standard errors, got {self.doubt_z}; use 0 <= doubt_z <= 10 (0 = off)")
        require(0 <= self.min_guard_prompts <= self.guard_prompts, "min_guard_prompts",
                f"must be within [0, guard_prompts={self.guard_prompts}], got {self.min_guard_prompts} (the guards "
                "never read more prompts than guard_prompts)")
        require(math.isfinite(self.max_reward_drop) and self.max_reward_drop >= 0, "max_reward_drop",
                f"must be a finite number >= 0 in the reward model's units, got {self.max_reward_drop}")
        require(math.isfinite(self.max_reward_giveback), "max_reward_giveback",
                f"must be a finite number in the reward model's units (negative disables), got {self.max_reward_giveback}")
        require(not self.reward_guard or is_valid_name(self.reward_guard), "reward_guard",
                f"{self.reward_guard!r} is not a model name; give the registry name of a served reward model "
                "(letters, digits, '.', '_' or '-') or leave it empty to turn the reward guard off")


@dataclass(frozen=True)
class OptimSettings:
    """How one optimiser step is taken."""

    lr: float = field(default=0.0, metadata=_help(
        "peak AdamW learning rate; 0 = the objective's default (2e-5 reward model, 5e-5 policy)"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    schedule: str = field(default="constant", metadata=_help(
        "LR schedule after warm-up: constant or inverse_sqrt (no schedule needs the total step count)"))
    warmup_steps: int = field(default=10, metadata=_help("linear LR warm-up steps"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm; 0 disables"))
    ema_decay: float = field(default=0.99, metadata=_help(
        "weights are averaged (EMA, warm-up min(decay, (1+t)/(10+t))); evaluation, the gate, checkpoints and "
        "the scorer use the average, training goes on from the live weights; 0 disables"))
    batch_size: int = field(default=16, metadata=_help("new records per optimiser step (replay comes on top)"))
    max_tokens_per_forward: int = field(default=8192, metadata=_help(
        "padded tokens per forward bucket (rows of similar length padded together); bounds the memory of "
        "evaluation, while in training every bucket's activations live until the backward (see "
        "max_tokens_per_backward)"))
    max_tokens_per_backward: int = field(default=0, metadata=_help(
        "padded tokens whose activations one backward keeps: a micro-batch over it is trained in pieces of its "
        "records, each piece's backward before the next piece's forward, their losses weighted by their share "
        "of the records, so the gradient is the micro-batch's and training memory stays bounded (SmolLM2-135M "
        "under CPU bf16 autocast peaks near 6 GB at 2048 padded tokens; a micro-batch of rankings of 6 replies "
        "at 256 tokens can hold 12k); 0 = the whole micro-batch at once"))
    epochs: int = field(default=1, metadata=_help("passes over the data (offline training only)"))
    seed: int = field(default=0, metadata=_help("seed for initialisation, shuffling and replay sampling"))
    device: str = field(default="auto", metadata=_help("auto, cpu or cuda (in-process training)"))
    torch_threads: int = field(default=0, metadata=_help("torch intra-op threads; 0 = torch's default"))

    def validate(self) -> None:
        require(self.lr >= 0, "lr", f"must be > 0 (or 0 for the objective's default), got {self.lr}")
        require(self.schedule in SCHEDULES, "schedule",
                f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        require(self.device in DEVICES, "device", f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay} (0 disables averaging)")
        require(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.max_tokens_per_backward >= 0, "max_tokens_per_backward",
                f"must be >= 0 (0 = no limit), got {self.max_tokens_per_backward}")
        require(self.epochs >= 1, "epochs", "must be >= 1")
        require(self.torch_threads >= 0, "torch_threads", "must be >= 0 (0 = torch's default)")


@dataclass(frozen=True)
class StreamSettings:
    """Where records come from and how the continual loop mixes in the past."""

    kafka_bootstrap: str = field(default="", metadata=_help(
        "Kafka bootstrap servers; empty = from the local stack (stack_run_dir)"))
    topic_prefix: str = field(default="", metadata=_help(
        "prefix of every topic name (e.g. 'staging.'), the same as the gateway's and scorer's topic_prefix; the "
        "names come from services/topics.py"))
    topic: str = field(default="", metadata=_help(
        "preference topic to consume; empty = prefstream.preferences under topic_prefix"))
    group_id: str = field(default="", metadata=_help(
        "Kafka consumer group; empty = prefstream-trainer for reward models, prefstream-trainer-<kind> "
        "otherwise, so a reward trainer and a policy trainer on the same topic keep independent offsets"))
    poll_timeout_s: float = field(default=0.5, metadata=_help("longest single Kafka poll"))
    max_batch_wait_s: float = field(default=1.0, metadata=_help(
        "train a partial micro-batch once its first record has waited this long (freshness over throughput)"))
    max_step_wait_s: float = field(default=10.0, metadata=_help(
        "an optimiser step takes batch_size new records: the gradients of smaller micro-batches are accumulated "
        "until that many have arrived, so the timing of arrivals does not change what is learned (a step is the "
        "offline trainer's step).  Once the step's first record has waited this long, the step is taken with what "
        "has arrived, so a slow stream still reaches serving.  0 = step on every micro-batch, whatever its size"))
    replay_ratio: float = field(default=0.5, metadata=_help(
        "replayed past records mixed in per new record (0 disables replay)"))
    replay_capacity: int = field(default=2000, metadata=_help("reservoir size of the replay buffer, in records"))
    dedup_window: int = field(default=100_000, metadata=_help(
        "record ids remembered (the newest trained, restored from the lineage's checkpoints on resume); a record "
        "whose id is among them is skipped: the processor delivers at least once with deterministic ids, so a "
        "replayed batch (e.g. after Redis lost its last second of writes) is never trained twice.  0 = off"))
    replay_weight: float = field(default=0.25, metadata=_help(
        "loss weight of a replayed record relative to a new one (a weighted mean over the micro-batch); below 1, "
        "replay guards against forgetting without training a stream that does not shift a second time"))

    def validate(self) -> None:
        require(check_prefix(self.topic_prefix) is None, "topic_prefix", str(check_prefix(self.topic_prefix)))
        require(self.poll_timeout_s > 0, "poll_timeout_s", "must be > 0 seconds")
        require(self.max_batch_wait_s >= 0, "max_batch_wait_s", "must be >= 0 seconds")
        require(self.max_step_wait_s >= 0, "max_step_wait_s", "must be >= 0 seconds (0 = no accumulation)")
        require(self.replay_ratio >= 0, "replay_ratio", "must be >= 0 (0 disables replay)")
        require(self.replay_capacity >= 0, "replay_capacity", "must be >= 0")
        require(self.dedup_window >= 0, "dedup_window", "must be >= 0 (0 turns the duplicate check off)")
        require(0 < self.replay_weight <= 1, "replay_weight",
                "must be in (0, 1] (use replay_ratio 0 to turn replay off)")


@dataclass(frozen=True)
class CheckpointSettings:
    """When and where checkpoints are written."""

    checkpoint_url: str = field(default=".run/checkpoints", metadata=_help(
        "checkpoint store shared with the scorer: a folder, a file:// URL, or s3://<bucket>/<prefix> (endpoint "
        "and credentials from AWS_ENDPOINT_URL_S3 / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"))
    checkpoint_every_records: int = field(default=512, metadata=_help(
        "checkpoint after this many new records (0 = only by time)"))
    checkpoint_every_s: float = field(default=10.0, metadata=_help(
        "checkpoint when this many seconds passed since the last one and records are pending (0 = only by count)"))
    keep_checkpoints: int = field(default=50, metadata=_help(
        "checkpoints kept in the store (newest first; the served, latest and pinned versions are never deleted); "
        "0 keeps all"))
    save_optimizer_state: bool = field(default=False, metadata=_help(
        "store AdamW moments (and, with ema_decay, the live weights) in each checkpoint for an exact resume "
        "(3x the trained weights per checkpoint); without it a resumed trainer goes on from the averaged weights"))

    def validate(self) -> None:
        require(self.checkpoint_every_records >= 0 and self.checkpoint_every_s >= 0, "checkpoint_every_records",
                "checkpoint intervals must be >= 0")
        require(self.checkpoint_every_records > 0 or self.checkpoint_every_s > 0, "checkpoint_every_s",
                "set checkpoint_every_records or checkpoint_every_s > 0, or offsets would never be committed")
        require(self.keep_checkpoints >= 0, "keep_checkpoints", "must be >= 0 (0 keeps every checkpoint)")


@dataclass(frozen=True)
class GateSettings:
    """What a checkpoint is judged on before it is published, and where the verdict goes."""

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
    redis_url: str = field(default="", repr=False, metadata=_help("model registry Redis; empty = from the local stack"))
    announce: bool = field(default=True, metadata=_help(
        "announce published/rejected versions on the model-updates topic"))
    rollback_on_guard: bool = field(default=True, metadata=_help(
        "when the objective's guard (a policy's drift, degeneration or length guard) rejects a version, training goes "
        "on from the last published version's weights, weight average and optimizer moments (the start's until one "
        "is published) instead of from the weights the guard refused; the records trained since stay in the replay "
        "reservoir. Costs one copy of the trainable weights and their optimizer moments in memory (a LoRA adapter's "
        "are small); objectives without a guard keep none"))
    rollback_lr_factor: float = field(default=0.5, metadata=_help(
        "each rollback also scales the learning rate by this from then on (OPT-175B's logbook: restart from before "
        "the divergence at a lower rate), so steps that overshot once are not retaken at the same size; a restarted "
        "trainer starts again from the configured lr; 1 = unchanged"))

    def validate(self) -> None:
        require(self.eval_max_records >= 0, "eval_max_records", "must be >= 0")
        require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1")
        require(0 <= self.gate_tolerance <= 1, "gate_tolerance", "is an accuracy difference; use 0..1")
        require(0.5 <= self.gate_confidence < 1, "gate_confidence",
                f"is a confidence level, got {self.gate_confidence}; use 0.5 <= gate_confidence < 1 "
                "(0.5 = plain accuracy comparison, 0.9 = the default)")
        require(0 < self.rollback_lr_factor <= 1, "rollback_lr_factor",
                f"scales the learning rate after a rollback, got {self.rollback_lr_factor}; use 0 < factor <= 1 "
                "(1 = unchanged)")
        if self.eval_data:
            require(Path(self.eval_data).expanduser().is_file(), "eval_data",
                    f"{self.eval_data} is not a file; give an OpenPipe JSONL file or leave it empty")


@dataclass(frozen=True)
class RuntimeSettings:
    """How the process runs: in-process or on Ray Train, endpoints, when to stop, metrics."""

    num_workers: int = field(default=0, metadata=_help(
        "Ray Train DDP workers; 0 = train in this process without Ray"))
    use_gpu: bool = field(default=False, metadata=_help("one GPU per Ray worker (DDP over NCCL instead of gloo)"))
    ray_address: str = field(default="", metadata=_help("Ray cluster address; empty = from the local stack"))
    ray_max_failures: int = field(default=2, metadata=_help(
        "worker-group restarts Ray Train attempts; each restart resumes from the latest checkpoint"))
    ray_storage_path: str = field(default=".run/ray_train", metadata=_help("Ray Train run storage (logs, state)"))
    stack_run_dir: str = field(default="", metadata=_help(
        "run dir of `prefstream stack up` to read endpoints from; empty = PREFSTREAM_STACK_RUN_DIR or .run/stack"))
    max_records: int = field(default=0, metadata=_help(
        "stop once the lineage has trained this many new records, counted across restarts (0 = run for ever)"))
    idle_exit_s: float = field(default=0.0, metadata=_help(
        "stop after this many seconds without new records, checkpointing first (0 = never)"))
    metrics_port: int = field(default=0, metadata=_help("Prometheus /metrics port (0 disables)"))
    metrics_host: str = field(default="127.0.0.1", metadata=_help(
        "interface the /metrics exporter binds (0.0.0.0 in a pod, so Prometheus can scrape it)"))

    def validate(self) -> None:
        require(self.num_workers >= 0, "num_workers", "must be >= 0 (0 = in-process, no Ray)")
        require(not (self.use_gpu and self.num_workers == 0), "use_gpu",
                "applies to Ray workers; set num_workers >= 1, or use device=cuda for in-process training")
        require(self.ray_max_failures >= 0, "ray_max_failures", "must be >= 0")
        require(self.max_records >= 0, "max_records", "must be >= 0 (0 = unbounded)")
        require(self.idle_exit_s >= 0, "idle_exit_s", "must be >= 0 (0 = never)")


@dataclass(frozen=True)
class TrainerConfig:
    """How the trainer builds, trains, checkpoints, gates and publishes one model."""

    model: ModelSettings = field(default_factory=ModelSettings)
    reward: RewardLossSettings = field(default_factory=RewardLossSettings)
    dpo: DPOSettings = field(default_factory=DPOSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    stream: StreamSettings = field(default_factory=StreamSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    def __post_init__(self) -> None:
        # Defaults that depend on the kind are resolved once, here, so every reader sees final values.
        kind = self.model.model_kind
        if not self.model.model_name and kind in tuple(ModelKind):
            object.__setattr__(self, "model", dataclasses.replace(self.model, model_name=kind))
        if not self.stream.topic and check_prefix(self.stream.topic_prefix) is None:
            topic = topic_name(PREFERENCES, self.stream.topic_prefix)
            object.__setattr__(self, "stream", dataclasses.replace(self.stream, topic=topic))
        if not self.stream.group_id and kind in tuple(ModelKind):
            group = "prefstream-trainer" if kind == ModelKind.REWARD else f"prefstream-trainer-{kind}"
            object.__setattr__(self, "stream", dataclasses.replace(self.stream, group_id=group))
        if self.optim.lr == 0 and kind in tuple(ModelKind):
            object.__setattr__(self, "optim", dataclasses.replace(self.optim, lr=DEFAULT_LR[ModelKind(kind)]))

    def validate(self) -> None:
        """Checks that span sections (each section validates its own fields first)."""
        for section in (self.model, self.reward, self.dpo, self.optim, self.stream, self.checkpoint, self.gate,
                        self.runtime):
            section.validate()
        require(self.optim.max_tokens_per_forward >= self.model.max_length, "max_tokens_per_forward",
                f"must be >= max_length ({self.model.max_length}) so one row fits a forward pass")

    def to_dict(self) -> dict[str, Any]:
        """Every leaf by flat name (what ``load_trainer_config(overrides=...)`` takes back, e.g. on Ray workers)."""
        return flat_dict(self)

    def with_endpoints(self) -> "TrainerConfig":
        """A copy whose empty Kafka/Redis/Ray addresses are filled from the local stack's stack.json."""
        return fill_endpoints(self, {
            "kafka_bootstrap": not self.stream.kafka_bootstrap,
            "redis_url": not self.gate.redis_url and self.gate.publish,
            "ray_address": not self.runtime.ray_address and self.runtime.num_workers > 0,
        }, self.runtime.stack_run_dir)


def load_trainer_config(
    file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> TrainerConfig:
    """TrainerConfig from defaults < file < PREFSTREAM_TRAINER_* env < overrides (None ignored)."""
    return load_config(TrainerConfig, section=SECTION, file=file, env=env, overrides=overrides)


def trainer_config(**leaves: Any) -> TrainerConfig:
    """The defaults with ``leaves`` set by flat name, validated (no file, no env): for code and tests."""
    return load_config(TrainerConfig, section=SECTION, env={}, overrides=leaves)
