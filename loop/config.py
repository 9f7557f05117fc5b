"""The criteria loop's one configuration object (``prefstream loop criteria``, ``bench criteria-loop``).

Defaults are the embedded models, the shipped HH-RLHF prompts and the word-limit criterion of
``docs/criteria/concise.yaml``, sized so the loop fits in 20 minutes on 2 cores.  Layered like every
service: defaults < ``--config`` file < ``PREFSTREAM_LOOP_*`` env < flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from services.config import load_config, require
from trainer.config import DPOSettings, GateSettings


@dataclass(frozen=True)
class LoopConfig:
    criteria: tuple[str, ...] = field(default=("docs/criteria/concise.yaml",), metadata={"help": (
        "criteria to teach, one phase each, in order: a stored criterion (name or name@version) or a "
        "YAML/JSON definition file, which is created (or found, when unchanged) in the store first")})
    together: bool = field(default=False, metadata={"help": (
        "teach every criterion at once (one phase ranked by their weighted combination) instead of one "
        "after another")})
    keep_earlier: bool = field(default=False, metadata={"help": (
        "in phases one after another, rank each phase's best-of-N by its criterion together with the "
        "earlier phases' criteria (a replay of the earlier rules), so a later criterion's winners also "
        "keep them; retention is still measured on the first criterion")})
    prompts: str = field(default="", metadata={"help": (
        "training prompts: OpenPipe JSONL (first user turn), JSONL with 'prompt' or 'messages', or plain "
        "text, one prompt per line; default the shipped HH train set")})
    eval_prompts: str = field(default="", metadata={"help": (
        "held-out prompts the served policy is measured on (never trained on; any that also appear in "
        "prompts are dropped from training); default the shipped HH test set")})
    system_prompt: str = field(default="Answer in at most 50 words.", metadata={"help": (
        "system message put before every prompt (training and evaluation); empty = none")})
    train_prompts: int = field(default=240, metadata={"help": "training prompts per phase at most"})
    eval_count: int = field(default=32, metadata={"help": "held-out prompts in each evaluation of the served policy"})
    phase_s: float = field(default=420.0, metadata={"help": "longest a phase sends training prompts (seconds)"})
    min_versions: int = field(default=2, metadata={"help": (
        "a phase ends early once this many versions it trained were published and evaluated and its "
        "training prompts ran out; it never ends before phase_s otherwise")})
    gate_every: int = field(default=5, metadata={"help": (
        "every k-th training prompt is sent as TEST split: its criteria pairs feed the trainer's gate, "
        "never its training (0 = none; the gate then relies on its drift and degeneration guards)")})
    candidates: int = field(default=4, metadata={"help": "candidates per best-of-N request (N)"})
    temperature: float = field(default=0.7, metadata={"help": (
        "sampling temperature of the best-of-N candidates; the default is the evaluation's, so the policy learns "
        "from replies drawn as it is served. On the word-limit bench one run at 0.7 cut violations 62% at 35 words "
        "and its replicate collapsed to 21 words, as both runs at 1.0 did (16-20 words): not yet told apart from "
        "run-to-run variance (docs/loop.md)")})
    max_tokens: int = field(default=128, metadata={"help": "new tokens per reply, training and evaluation"})
    eval_temperature: float = field(default=0.7, metadata={"help": "sampling temperature when measuring the served policy (n = 1)"})
    eval_alone: bool = field(default=True, metadata={"help": (
        "measure the served policy with the app's best-of-N held and the held-out prompts sent as one "
        "GenerateBatch, which the scorer decodes as a batch of its own, so the same version with the same "
        "seeds gives the same replies; false overlaps the evaluation with the traffic: no wait for the app, "
        "but a version measured twice can differ, as seeded sampling is exact only in the same batch company "
        "(docs/scorer.md)")})
    seed: int = field(default=0, metadata={"help": "seed of the prompt order and of every evaluation reply (prompt i gets seed + i)"})
    concurrency: int = field(
        default=4, metadata={"help": "best-of-N requests in flight (the scorer decodes their candidates as one batch)"})
    topic_prefix: str = field(default="", metadata={"help": (
        "prefix of this run's Kafka topics (created if missing), so a loop on a shared stack keeps its "
        "completions, feedback and preferences to itself; empty = the stack's own topics")})
    project: str = field(default="default", metadata={"help": "project the completions and criteria belong to"})
    policy_model: str = field(default="policy", metadata={"help": "registry name of the policy the loop trains and serves"})
    policy_base: str = field(default="", metadata={"help": (
        "local HF causal-LM folder (or .gguf file) the policy starts from; empty = the embedded SmolLM2-135M-Instruct")})
    reward_model: str = field(default="reward", metadata={"help": (
        "registry name of the reward model the scorer serves (tie breaker, quality score); empty = none")})
    reward_checkpoint: str = field(default="auto", metadata={"help": (
        "reward model folder published as reward_model before the scorer starts; 'auto' = one trained "
        "once on reward_data and cached under ~/.cache/prefstream/models; empty = publish nothing")})
    reward_data: str = field(default="", metadata={"help": "pairs the 'auto' reward model is trained on; default the shipped HH train set"})
    # The policy trainer (passed as PREFSTREAM_TRAINER_* to `python -m trainer --model-kind policy`).
    lr: float = field(default=5e-4, metadata={"help": "policy learning rate (LoRA)"})
    warmup_steps: int = field(default=0, metadata={"help": (
        "optimiser steps over which the policy's learning rate rises linearly to lr (0 = none): Adam's first "
        "updates move every weight by about lr whatever its gradient's size, so a warm-up keeps the trainer's "
        "first few batches from setting the policy's direction alone")})
    beta: float = field(default=0.1, metadata={"help": "DPO beta"})
    dpo_loss: str = field(default="sigmoid", metadata={"help": "sigmoid, ipo or plackett_luce"})
    pairing: str = field(default="matched", metadata={"help": (
        "with sigmoid or ipo, what each best-of-N becomes (the criteria's feedback mode for the run): 'pair', "
        "the best reply over the worst; 'pairs', that and the best over the worst the criteria score the same "
        "(the tie breaker's preference among passing replies is taught beside the rule); 'matched', one "
        "length-matched pair: a reply of the best criteria class over the one of the worst class closest to it "
        "in words, or, when all tie, the tie breaker's widest gap among replies of similar length, so a pair's "
        "length difference teaches nothing the criteria did not ask for (the default: on the word-limit bench "
        "the only mode that kept the length through a second criterion, docs/loop.md); 'matched_pairs', that "
        "pair and, from a request with more than one class, the best class's own length-matched pair, so the tie "
        "breaker is taught at equal length beside the rule; 'bracket', the matched pair and, from a request with more than one class, its chosen reply over the best class's reply the tie breaker ranks lowest (a word limit's short passing replies are pulled back up while some replies still fail); 'trim', a failing reply's "
        "longest prefix ending at a sentence that passes every criterion over the reply itself and over its shortest such "
        "prefix, so each pair shares every token up to the earlier end and teaches where to stop (rule criteria only; else, "
        "and when no failing reply has such a prefix, the matched pair; on the word-limit bench the policy still learnt to "
        "stop sooner at every length, docs/loop.md); 'trim_next', trim with the first pair's rejected reply cut one "
        "sentence later, so both replies of every pair end the turn and only where they end differs; 'trim_bracket', "
        "trim_next's pairs and, from a request with two or more passing replies, the one the tie breaker ranks highest "
        "over the one it ranks lowest, so replies far under a limit are pulled back up; 'trim_step', trim_next with "
        "the second pair's rejected reply the chosen prefix cut one sentence shorter, so a sentence too soon is "
        "refused as a sentence too late is; 'trim_open', trim_next with the first pair's rejected reply going on past "
        "its cut instead of ending the turn there, so the pair is 'stop here' against 'go on' and lowers no later end; "
        "'trim_stop', trim_open's first pair alone (with stop_anchor, which holds the earlier ends); 'trim_word', "
        "trim_stop with the rejected reply going on by the next word only, so the pair is the end of turn against "
        "that word at one position. "
        "plackett_luce always "
        "trains on the whole ranking")})
    label_smoothing: float = field(default=0.0, metadata={"help": (
        "conservative DPO's ε (sigmoid only): each pair is taken as flipped with probability ε, so the loss has "
        "its optimum at a finite margin, β·Δ = log((1-ε)/ε), instead of pushing the chosen reply up without "
        "bound; a criterion's preference is deterministic (the shorter reply always wins a word limit), which "
        "is where DPO without it drifts without bound whatever β (Azar et al. 2023, on deterministic preferences); 0 = plain DPO")})
    sft_weight: float = field(default=1.0, metadata={"help": (
        "RPO's α: α times the NLL per token of the pairs' chosen replies (every token alike) is added to the DPO "
        "loss, so the policy moves toward the best-of-N winners instead of only away from the losers; 0 = DPO alone")})
    stop_anchor: float = field(default=0.0, metadata={"help": (
        "weight of the trainer's stop anchor: how far the end-of-turn probability has moved from the reference's, "
        "summed where a pair's chosen reply goes on, is added to the loss, so a pair that cuts a reply at a "
        "sentence end teaches the stop there and not at every earlier sentence end (trainer dpo stop_anchor); "
        "0 = off")})
    stop_anchor_sides: str = field(default="both", metadata={"help": (
        "both: the anchor prices the stop moving either way; rise: only its rise (trainer dpo stop_anchor_sides)")})
    max_backlog: int = field(default=16, metadata={"help": (
        "on-policy pacing: hold new best-of-N requests while the policy trainer has this many preference "
        "records or more it has not consumed, so the CPU goes to training when the queue is long and the pairs "
        "are sampled from a recent served version, not from a stale queue (loop/pacing.py); 0 = send as fast "
        "as the scorer answers")})
    train_temperature: float = field(default=1.0, metadata={"help": (
        "temperature the policy trainer reads log-probs at (its dpo temperature); 0 = the candidates' sampling "
        "temperature, so the NLL fits the distribution the replies were drawn from (TRL's online trainers do so). "
        "1, the model's own distribution, is the default: on the word-limit bench, distilling trimmed replies read "
        "at 0.7 shortened the policy faster than at 1 (the steps are 1/T larger), not slower (docs/loop.md)")})
    finetune: str = field(default=DPOSettings.finetune, metadata={"help": (
        "what of the policy trains: 'lora', an adapter on lora_target_modules (the reference is the same weights "
        "with it disabled), or 'full', every weight against a frozen copy")})
    lora_rank: int = field(default=DPOSettings.lora_rank, metadata={"help": "LoRA rank r of the policy's adapter"})
    lora_alpha: float = field(default=DPOSettings.lora_alpha, metadata={"help": "LoRA α (the update is scaled by α/r)"})
    lora_target_modules: tuple[str, ...] = field(default=DPOSettings.lora_target_modules, metadata={"help": (
        "linear modules (name suffixes) that get the adapter, comma-separated; SmolLM2's are q_proj, k_proj, v_proj, "
        "o_proj (attention) and gate_proj, up_proj, down_proj (MLP); a name the policy lacks is refused at start")})
    batch_size: int = field(default=8, metadata={"help": "new records per policy optimiser step"})
    replay_ratio: float = field(default=0.5, metadata={"help": (
        "share of replayed past records in each policy batch: what keeps an earlier criterion learnt")})
    replay_weight: float = field(default=0.25, metadata={"help": (
        "loss weight of a replayed record relative to a new one (the trainer's replay_weight)")})
    max_tokens_per_backward: int = field(default=2048, metadata={"help": (
        "padded policy tokens one backward keeps activations for (the trainer splits larger micro-batches): "
        "rankings of N candidates cost N rows each, and the trainer shares the machine with the scorer; "
        "a single record always trains whole; 0 = no limit")})
    checkpoint_every_records: int = field(default=32, metadata={"help": "records between policy checkpoints (each one gated, published if it passes)"})
    max_kl: float = field(default=DPOSettings.max_kl, metadata={"help": (
        "the policy gate's drift guard: mean per-token KL to the reference")})
    max_shrink: float = field(default=DPOSettings.max_shrink, metadata={"help": (
        "the policy gate's length guard: refuse a version whose replies to the gate's held-out prompts are more than "
        "this share shorter than the served version's (training then goes on from the served version's weights); "
        "1 = off")})
    reward_guard: bool = field(default=False, metadata={"help": (
        "the policy gate's reward guard: refuse a version whose replies to the gate's held-out prompts (sampled at "
        "eval_temperature, as the evaluation samples) the served reward model (reward_model) scores lower on average "
        "than the base policy's replies to the same prompts by more than max_reward_drop; a refused version sends "
        "training back to the served weights, as the length guard's does (off while no reward model is served). Off "
        "by default: on the word-limit bench it refused versions the evaluation confirmed worse, yet passed others "
        "that were (24 prompts cannot see a 0.03 drop), and its refusals slowed the cut (docs/loop.md)")})
    max_reward_drop: float = field(default=0.02, metadata={"help": (
        "the reward guard's tolerance, in the reward model's units: on the word-limit bench the HH reward model's "
        "mean over 48 held-out replies fell 0.06-0.13 in versions that lost the quality target, and a version's mean "
        "over the guard's prompts has a standard error of about 0.03")})
    max_reward_giveback: float = field(default=DPOSettings.max_reward_giveback, metadata={"help": (
        "the reward guard's bar against the served version (with reward_guard): how much lower than the served "
        "version's replies to the same gate prompts a version's may score on average, paired prompt by prompt, "
        "so a run does not spend the reward its served version kept a step at a time; negative = off")})
    criteria_guard: bool = field(default=False, metadata={"help": (
        "the policy gate's criteria guard: refuse a version whose replies to the gate's held-out prompts break the "
        "rule criteria of the loop more often than the base policy's replies to the same prompts, by more than "
        "max_violation_rise; a refused version sends training back to the served weights. On the word-limit bench "
        "with best-of-12 a version broke the limit in 88% of its replies (the base: 50%) and was served without it. "
        "With max_violation_giveback below 1 it also bars a version that gives back what the served one learnt. "
        "Off by default in the loop, on in the bench (docs/loop.md)")})
    max_violation_rise: float = field(default=0.0, metadata={"help": (
        "the criteria guard's tolerance: the share of the gate's prompts by which the version may break the rules "
        "more often than the base policy")})
    max_violation_giveback: float = field(default=1.0, metadata={"help": (
        "the criteria guard's bar against the served version (with criteria_guard): the share of the gate's prompts "
        "by which a version may break one criterion more often than the served version's replies to the same prompts, "
        "criterion by criterion, so a later phase cannot give back what an earlier version learnt of an earlier "
        "criterion while it learns its own; one reply per prompt, so two versions "
        "alike differ by about 0.15 on 20 prompts; 1 = off")})
    doubt_z: float = field(default=DPOSettings.doubt_z, metadata={"help": (
        "the reward and criteria guards' doubt band, in standard errors (the trainer's doubt_z): a version over a "
        "tolerance by less than this many standard errors is neither served nor rolled back, and the next "
        "checkpoint is judged on more prompts; 0 = refuse on the mean alone")})
    rollback_lr_factor: float = field(default=GateSettings.rollback_lr_factor, metadata={"help": (
        "what a version a guard refuses does to the policy trainer's learning rate from then on (the trainer's "
        "rollback_lr_factor; 1 = unchanged). Each refusal also sends training back to the served weights, or to the "
        "base policy's while nothing is served, so on the word-limit bench refusals before the first publication "
        "compounded to an eighth of the rate and a first version that was the base policy again (docs/loop.md)")})
    min_guard_prompts: int = field(default=0, metadata={"help": (
        "a policy version judged by the guards on fewer held-out prompts than this is not published yet (nor rolled "
        "back): without guard_set the held-out set fills one best-of-N in gate_every, and the first version of a fresh "
        "loop was judged on 2-3 prompts; 0 = judge on whatever there is")})
    guard_prompts: int = field(default=24, metadata={"help": (
        "held-out prompts the policy gate's guards reply to (KL, length, reward, degeneration): more cost a few "
        "seconds each per checkpoint and make the guards' means less noisy")})
    guard_set: bool = field(default=True, metadata={"help": (
        "give the gate its own guard_prompts prompts (with gate_every > 0: the gate judges only while it has held-out "
        "records), set aside from the training file before training starts "
        "(never trained on, never evaluation prompts) and named with the criteria taught so far, so the first "
        "versions are judged on as many prompts as the last; false = the prompts of the held-out records as they "
        "arrive (one best-of-N in gate_every), on which the first versions were judged on 6-8 (docs/loop.md)")})
    guard_max_new_tokens: int = field(default=96, metadata={"help": (
        "tokens of the greedy replies the gate's guards read (KL, length, degeneration); long enough that a reply "
        "over the word limit is seen whole")})
    max_length: int = field(default=256, metadata={"help": "tokens per (prompt, response) in training"})
    # Where it runs.
    run_dir: Path = field(default=Path(".run/loop"), metadata={"help": "stack, checkpoints and service logs"})
    fresh: bool = field(default=True, metadata={"help": "start from an empty run_dir (stop and wipe a previous run there)"})
    stack_run_dir: str = field(default="", metadata={"help": (
        "run dir of a running `prefstream stack up` to use instead of starting one; empty = start a stack "
        "under run_dir")})
    report_dir: Path | None = field(default=None, metadata={"help": "report folder; default reports/loop-<time>"})
    keep_stack: bool = field(default=False, metadata={"help": "leave the stack running at the end (services are always stopped)"})
    startup_timeout_s: float = field(default=300.0, metadata={"help": "how long services get to become ready"})
    drain_timeout_s: float = field(default=180.0, metadata={"help": (
        "after a phase's prompts are sent, how long to wait for the trainer to publish what they taught; as long "
        "again while a checkpoint it wrote still waits for the gate's verdict")})
    progress_every_s: float = field(default=5.0, metadata={"help": "seconds between progress lines"})

    def validate(self) -> None:
        require(len(self.criteria) >= 1, "criteria", "name at least one criterion (a name, name@version or a YAML file)")
        require(not (self.together and self.keep_earlier), "keep_earlier",
                "applies to phases one after another; drop it or drop together")
        require(self.train_prompts >= 1, "train_prompts", "must be >= 1")
        require(self.eval_count >= 1, "eval_count", "must be >= 1")
        require(self.phase_s > 0, "phase_s", "must be > 0 seconds")
        require(self.gate_every >= 0 and self.gate_every != 1, "gate_every", "must be 0 (none) or >= 2")
        require(2 <= self.candidates <= 16, "candidates", "must be within 2..16")
        require(0 < self.temperature <= 2, "temperature", "must be within (0, 2]: best-of-N needs different candidates")
        require(0 <= self.eval_temperature <= 2, "eval_temperature", "must be within 0..2 (0 = greedy)")
        require(1 <= self.max_tokens <= 1024, "max_tokens", "must be within 1..1024")
        require(self.concurrency >= 1, "concurrency", "must be >= 1")
        require(0 < self.replay_weight <= 1, "replay_weight", "must be within (0, 1]")
        require(self.max_backlog >= 0, "max_backlog", "must be >= 0 records (0 = no pacing)")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0 optimiser steps (0 = none)")
        require(0 <= self.train_temperature <= 10, "train_temperature", "must be within 0..10 (0 = the sampling temperature)")
        from services.criteria_eval import FEEDBACK_MODES

        pair_modes = [m for m in FEEDBACK_MODES if m != "ranking"]
        require(self.pairing in pair_modes, "pairing", f"must be one of {', '.join(pair_modes)}, got {self.pairing!r} "
                "(the whole ranking is what dpo_loss plackett_luce trains on)")
        # The DPO leaves go to the trainer: checked here, before any service starts, by the trainer's own rules.
        DPOSettings(dpo_loss=self.dpo_loss, beta=self.beta, label_smoothing=self.label_smoothing,
                    sft_weight=self.sft_weight, stop_anchor=self.stop_anchor, stop_anchor_sides=self.stop_anchor_sides,
                    temperature=self.trainer_temperature,
                    finetune=self.finetune,
                    lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                    lora_target_modules=self.lora_target_modules, max_kl=self.max_kl, max_shrink=self.max_shrink,
                    guard_max_new_tokens=self.guard_max_new_tokens, guard_prompts=self.guard_prompts,
                    guard_temperature=self.eval_temperature,
                    max_reward_drop=self.max_reward_drop, max_reward_giveback=self.max_reward_giveback,
                    criteria_guard=self.criteria_guard,
                    max_violation_rise=self.max_violation_rise, max_violation_giveback=self.max_violation_giveback,
                    min_guard_prompts=self.min_guard_prompts, doubt_z=self.doubt_z,
                    reward_guard=self.reward_model if self.reward_guard else "").validate()
        GateSettings(rollback_lr_factor=self.rollback_lr_factor).validate()
        require(self.checkpoint_every_records >= 1, "checkpoint_every_records", "must be >= 1")
        require(self.max_tokens_per_backward >= 0, "max_tokens_per_backward", "must be >= 0 (0 = no limit)")
        require(self.min_versions >= 0, "min_versions", "must be >= 0")
        from services.topics import check_prefix

        require(check_prefix(self.topic_prefix) is None, "topic_prefix", str(check_prefix(self.topic_prefix)))

    @property
    def trainer_temperature(self) -> float:
        """The policy trainer's ``temperature``: train_temperature, or the candidates' sampling one."""
        return self.train_temperature or self.temperature


def load_loop_config(
    file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> LoopConfig:
    return load_config(LoopConfig, section="loop", file=file, env=env, overrides=overrides)


__all__ = ["LoopConfig", "load_loop_config"]
