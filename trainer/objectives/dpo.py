"""The DPO objective: a causal-LM policy learns directly from the preference stream.

The same records that train the reward model train the policy, through the same continual
machinery (consumer group, replay, Learner, DDP, checkpoints, gate, registry); only this module
knows that the model is a :class:`~trainer.policy_lm.TrainablePolicy` and the loss a DPO-family one.

* **Reference log-probabilities once per record.**  When a record arrives (:meth:`admit`) every one
  of its responses is scored once by the reference (the base weights: the LoRA adapter switched
  off), and the numbers are kept with the record for as long as the replay reservoir keeps it
  (saved with each checkpoint, sent to the other DDP ranks with the step).  A step therefore costs
  one policy forward and backward, never a second reference forward.
* **Which feedback feeds which loss** (``dpo_loss``): every preference record is a ranking, best
  first.  ``plackett_luce`` trains a ranking of K as one Plackett-Luce term over its K responses
  (one forward each; K = 2 is exactly sigmoid DPO); ``sigmoid`` (optionally conservative, with
  ``label_smoothing``) and ``ipo`` train the best response against the worst.  Unpaired feedback
  (a thumbs or score with no partner) never reaches this topic as a record: the gateway's processor
  turns feedback into rankings first.  :func:`trainer.dpo_losses.kto_loss` is there for a stream of
  unpaired completions.  ``sft_weight`` > 0 adds RPO's NLL of the best response to any of them.
* **The gate** measures the implicit-reward pairwise accuracy, β·(log π − log π_ref) per response,
  through the same :func:`trainer.evaluation.pairwise_result` as reward models, so the paired,
  noise-aware rule applies unchanged.  Beside it, on held-out prompts (the held-out records', or the
  gate's own guard set fixed before training, trainer/guard_set.py), it samples replies (greedy
  or at ``guard_temperature``, fixed seeds) and records the mean per-token KL to the reference, the
  share of empty replies and the repetition rate, and how much shorter the replies are than the
  served version's (or the reference's); with ``reward_guard``, a served reward model also scores
  them against the reference policy's replies to the same prompts.  :meth:`guard` rejects a version
  past the configured bounds.
* **Checkpoints** hold a merged Hugging Face causal-LM folder (what the scorer serves, loadable with
  ``AutoModelForCausalLM`` and ``pipeline("text-generation")``) and, for LoRA, the adapter alone in
  ``adapter/`` (what a resumed trainer puts back on the base).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import statistics
import time
from itertools import accumulate
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import nn

from services.kinds import ModelKind
from services.policy_model import default_policy_path
from services.criteria_eval import count_words, mean_words
from services.errors import InvalidArgument
from services.schemas import PreferenceRecord
from services.stats import paired_difference
from trainer.config import TrainerConfig
from trainer.criteria_judge import RecordCriteria, any_broken
from trainer.dpo_losses import chosen_nll, dpo_loss, ipo_loss, plackett_luce_dpo_loss, stop_anchor_loss
from trainer.batching import flatten, response_rows
from trainer.evaluation import EvalResult, canonical_order, pairwise_result
from trainer.guard_set import GuardPrompt, load_guard_set
from trainer.objectives.base import Batch, Objective
from trainer.policy_lm import TRAIN_SPEC_FILE, LoraSettings, PolicyBatch, TrainablePolicy, predicting

if TYPE_CHECKING:
    from trainer.reward_judge import ServedReward

log = logging.getLogger(__name__)

#: Where a LoRA checkpoint keeps its adapter (beside the merged serving folder).
ADAPTER_DIR = "adapter"
#: The cached reference log-probs of the records the replay reservoir keeps.
REF_FILE = "reference_logps.json"


@dataclass
class RankingRows:
    """A micro-batch of rankings flattened to one row per response, with the cached reference."""

    rows: PolicyBatch  # (N, T) prompt + response rows
    owner: torch.Tensor  # (N,) ranking of each row
    position: torch.Tensor  # (N,) rank inside its ranking (0 = best)
    ref: torch.Tensor  # (B, Kmax) reference log-probs, 0 where masked
    mask: torch.Tensor  # (B, Kmax) bool
    weights: torch.Tensor | None  # (B,)
    #: with ``stop_anchor``: each ranking's best row, the reference's stop log-probs along it, and its
    #: positions that predict a token other than the stop (where the preferred reply goes on)
    best: torch.Tensor | None = None  # (B,) row of each ranking's best response
    ref_stops: torch.Tensor | None = None  # (B, T)
    goes_on: torch.Tensor | None = None  # (B, T) bool

    def to(self, device: torch.device) -> "RankingRows":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device) if t is not None else None

        return RankingRows(self.rows.to(device), self.owner.to(device), self.position.to(device),
                           self.ref.to(device), self.mask.to(device), move(self.weights),
                           move(self.best), move(self.ref_stops), move(self.goes_on))


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of a reply's word n-grams that repeat an earlier one (0 for replies shorter than n + 1 words)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def sampled_alike(candidate: dict[str, float], served: dict[str, float], *keys: str) -> bool:
    """Whether two versions' guard numbers ``keys`` were read from replies to the same held-out prompts,
    sampled alike (prompt count, reply budget, temperature), so that they can be compared."""
    same = ("guard_prompts", "guard_max_new_tokens")
    if any(k not in candidate or k not in served for k in (*keys, *same)):
        return False
    return all(candidate.get(k, 0.0) == served.get(k, 0.0) for k in (*same, "guard_temperature"))


def reply_shrink(candidate: dict[str, float], served: dict[str, float]) -> float | None:
    """How much shorter, as a share of the served version's mean reply length in words, the candidate's
    replies to the gate's held-out prompts are (negative: longer); None when the two were not sampled
    alike (:func:`sampled_alike`) or the served replies were empty."""
    if not sampled_alike(candidate, served, "mean_words") or served["mean_words"] <= 0:
        return None
    return 1.0 - candidate["mean_words"] / served["mean_words"]


def words_within_limits(replies: Sequence[str], limits: Sequence[int | None]) -> float:
    """Mean words of ``replies`` with each one counted at most at its word limit (None: no limit): how long a
    policy that answers as these replies do would be if it kept the limits, the length guard's bar for a
    word-limit criterion (a reply over the limit is shortened to it, one under it is left alone)."""
    if len(replies) != len(limits) or not replies:
        raise ValueError(f"{len(replies)} replies for {len(limits)} limits; give one limit (or None) per reply")
    return statistics.fmean(min(count_words(r), n) if n is not None else count_words(r)
                            for r, n in zip(replies, limits))


def criterion_rates(broken: Sequence[dict[str, bool] | None]) -> dict[str, float]:
    """Per rule criterion, from each guard reply's :meth:`~trainer.criteria_judge.RecordCriteria.broken` (None:
    its record names none), the share of the replies to prompts whose records name it that break it
    (``violation_rate[name@version]``) and how many those are (``criteria_prompts[name@version]``)."""
    counts: dict[str, list[int]] = {}
    for per_reply in broken:
        for ref, fails in (per_reply or {}).items():
            c = counts.setdefault(ref, [0, 0])
            c[0], c[1] = c[0] + int(fails), c[1] + 1
    out: dict[str, float] = {}
    for ref, (fails, n) in sorted(counts.items()):
        out[f"violation_rate[{ref}]"], out[f"criteria_prompts[{ref}]"] = fails / n, float(n)
    return out


def violation_givebacks(candidate: dict[str, float], served: dict[str, float]) -> dict[str, float]:
    """Per rule criterion (``name@version``), how much larger the share of the candidate's guard replies that
    break it is than the served version's on the same prompts (negative: smaller), worst first: a version
    that learns a new criterion must not give back an earlier one, which a share of replies breaking any of
    them would hide.  Only criteria both counted on the same prompts, sampled alike (:func:`sampled_alike`)."""
    if not sampled_alike(candidate, served):
        return {}
    out = {}
    for key, n in candidate.items():
        if key.startswith("criteria_prompts[") and served.get(key) == n:
            ref = key[len("criteria_prompts["):-1]
            out[ref] = candidate[f"violation_rate[{ref}]"] - served[f"violation_rate[{ref}]"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def rate_difference_se(rate: float, other: float, n: float) -> float:
    """Standard error of the difference of two shares ``rate`` and ``other``, each of ``n`` replies, taken as
    independent (the served version's breaks are kept as a share, not per prompt, so the pairing is lost;
    replies to the same prompts are alike, so this errs large)."""
    if n < 1:
        return 0.0
    return math.sqrt((rate * (1 - rate) + other * (1 - other)) / n)


def reward_drop(rewards: Sequence[float], reference: Sequence[float]) -> tuple[float, float]:
    """How much lower the reward of a version's replies is than the reference policy's replies to the
    same prompts, on average (negative: higher), and the standard error of that mean difference, paired
    prompt by prompt (0 with fewer than two prompts)."""
    if len(rewards) != len(reference) or not rewards:
        raise ValueError(f"{len(rewards)} rewards for {len(reference)} reference rewards; score the same prompts")
    drop, se = paired_difference(reference, rewards)
    return drop, se or 0.0


def reward_giveback(result: EvalResult, served: EvalResult | None) -> tuple[float, float] | None:
    """How much lower the reward guard's judge scores a version's guard replies than the served version's
    replies to the same prompts (negative: higher), paired prompt by prompt, and the standard error of that
    mean difference; None unless both carry one score per reply, their replies answer the same prompts with
    the same sampling (the same ``replies_key``) and the same judge version scored them (a served evaluation
    kept from before the reward model moved on is not paired with a newer judge's scores)."""
    if (served is None or not result.rewards or not result.replies_key or result.replies_key != served.replies_key
            or len(result.rewards) != len(served.rewards) or result.rewards_judge != served.rewards_judge):
        return None
    return reward_drop(result.rewards, served.rewards)


def violation_rise(breaks: Sequence[tuple[bool | None, bool | None]]) -> dict[str, float]:
    """The criteria guard's numbers from (candidate breaks, reference breaks) per guard prompt, None where the
    prompt's record names no rule criterion: the share of the candidate's replies that break them
    (``violation_rate``), the reference's (``reference_violation_rate``), their difference
    (``violation_rise``), its paired standard error (``violation_rise_se``, 0 with one prompt) and the prompts
    counted (``criteria_prompts``); {} when no prompt has a rule criterion."""
    judged = [(float(bool(a)), float(bool(b))) for a, b in breaks if a is not None and b is not None]
    if not judged:
        return {}
    violation, reference = ([x[i] for x in judged] for i in (0, 1))
    rise, se = paired_difference(violation, reference)
    return {"violation_rate": statistics.fmean(violation), "reference_violation_rate": statistics.fmean(reference),
            "violation_rise": rise, "violation_rise_se": se or 0.0,
            "criteria_prompts": float(len(judged))}


def replies_key(prompt_keys: Sequence[str], sampling: dict[str, Any]) -> str:
    """A digest of what a policy's guard replies answer: the prompts' keys and the sampling (seed included)."""
    return hashlib.sha256(json.dumps([list(prompt_keys), sampling], sort_keys=True).encode()).hexdigest()[:16]


def duplicate_reason(record: PreferenceRecord) -> str:
    """Why a ranking cannot train a policy ("" if it can): a response given twice is a tie."""
    seen: set[tuple[str, bool]] = set()
    for r, ends in zip(record.ranked_responses, record.ends):
        key = (r.strip(), ends)
        if key in seen:
            return "ranked_responses: the same response appears twice (a tie); rank distinct responses only"
        seen.add(key)
    return ""


class DPOObjective(Objective):
    """DPO-family training of a causal-LM policy (LoRA by default) against its own base as reference."""

    kind = ModelKind.POLICY

    def __init__(self, cfg: TrainerConfig) -> None:
        super().__init__(cfg)
        self.settings = cfg.dpo
        #: record_id -> reference log-prob of each response, best first
        self.reference: dict[str, tuple[float, ...]] = {}
        #: record_id -> the reference's stop log-probs along its best response (kept with ``stop_anchor`` only)
        self.reference_stops: dict[str, tuple[float, ...]] = {}
        self._eval_reference: dict[str, tuple[float, ...]] = {}
        #: the reference policy's replies to the current guard prompt set: ((prompt keys, budget, temperature), replies);
        #: the candidate and the served version are evaluated on the same set, so one entry serves both
        self._reference_replies: tuple[tuple[tuple[str, ...], int, float], list[str]] | None = None
        #: the keys of the prompts the guards reply to (:meth:`_guard_prompts`)
        self._guard_ids: list[str] = []
        #: the gate's own guard set (``guard_set``), as last read; its errors at start-up name the field
        self._guard_set = load_guard_set(self.settings.guard_set) if self.settings.guard_set else []
        #: the reward guard's judge (set by :meth:`use_registry`)
        self.judge: ServedReward | None = None
        self.criteria: RecordCriteria | None = None

    # -- the model -------------------------------------------------------------------------------

    def default_base_model(self) -> str:
        return default_policy_path()

    def _lora(self) -> LoraSettings | None:
        d = self.settings
        if d.finetune == "full":
            return None
        return LoraSettings(rank=d.lora_rank, alpha=d.lora_alpha, dropout=d.lora_dropout,
                            target_modules=tuple(d.lora_target_modules))

    def load(self, path: str) -> TrainablePolicy:
        """Our own checkpoint (adapter + the base it names), a fully fine-tuned checkpoint, or a base; its
        log-probs are read at the configured ``temperature`` (a training setting, not the checkpoint's)."""
        p = Path(path)
        m = self.cfg.model
        if (p / ADAPTER_DIR / TRAIN_SPEC_FILE).exists():
            model = TrainablePolicy.from_checkpoint(p / ADAPTER_DIR, base_model=self._base_if_moved(p / ADAPTER_DIR))
        elif (p / TRAIN_SPEC_FILE).exists() and self.settings.finetune == "full":
            model = TrainablePolicy.from_checkpoint(p, base_model=self._base_if_moved(p))
        else:
            model = TrainablePolicy.from_base(path, lora=self._lora(), dtype=m.dtype, max_length=m.max_length,
                                              max_prompt_tokens=m.max_length,
                                              max_tokens_per_forward=self.cfg.optim.max_tokens_per_forward,
                                              max_response_tokens=self.settings.max_response_tokens)
        model.logit_temperature = self.settings.temperature
        model.read_stops(self.settings.stop_anchor > 0)
        return model

    def _base_if_moved(self, folder: Path) -> str | None:
        """The configured base when the base folder recorded in a checkpoint is not on this machine."""
        recorded = json.loads((folder / TRAIN_SPEC_FILE).read_text())["spec"].get("base_model", "")
        return None if recorded and Path(recorded).exists() else self.resolved_base_model()

    def load_for_eval(self, path: str) -> TrainablePolicy:
        return self.load(path)

    def module(self, model: TrainablePolicy) -> nn.Module:
        return model.module

    def transformer(self, model: TrainablePolicy) -> nn.Module:
        return model.model

    def parameters(self, model: TrainablePolicy) -> list[nn.Parameter]:
        return model.trainable_parameters()

    def save(self, model: TrainablePolicy, directory: Path) -> None:
        model.save_merged(directory)
        if model.spec.lora is not None:
            model.save_adapter(Path(directory) / ADAPTER_DIR)

    def spec(self, model: TrainablePolicy) -> dict[str, Any]:
        return model.spec.to_dict()

    def loss_config(self) -> dict[str, Any]:
        c, d = self.cfg, self.settings
        return {
            "objective": "dpo", "dpo_loss": d.dpo_loss, "beta": d.beta, "label_smoothing": d.label_smoothing,
            "sft_weight": d.sft_weight, "stop_anchor": d.stop_anchor,
            "stop_anchor_sides": d.stop_anchor_sides, "temperature": d.temperature,
            "finetune": d.finetune, "lora_rank": d.lora_rank, "lora_alpha": d.lora_alpha,
            "lora_dropout": d.lora_dropout, "lora_target_modules": list(d.lora_target_modules),
            "lr": c.optim.lr, "schedule": c.optim.schedule, "warmup_steps": c.optim.warmup_steps,
            "ema_decay": c.optim.ema_decay, "batch_size": c.optim.batch_size,
            "replay_ratio": c.stream.replay_ratio, "replay_weight": c.stream.replay_weight,
            "max_length": c.model.max_length, "disable_dropout": c.model.disable_dropout,
        }

    # -- records ---------------------------------------------------------------------------------

    def _reference_of(self, model: TrainablePolicy, records: Sequence[PreferenceRecord],
                      cache: dict[str, tuple[float, ...]],
                      stops: dict[str, tuple[float, ...]] | None = None) -> None:
        """Fill ``cache`` for the records it lacks: one reference forward per response, ever.  With ``stops``,
        the same forward also fills it with the reference's stop log-probs along each record's best response
        (one per position that predicts one of its tokens, in order), for the stop anchor."""
        todo = [r for r in records if r.record_id not in cache or (stops is not None and r.record_id not in stops)]
        if not todo:
            return
        prompts, responses, ends = response_rows(todo)
        starts = list(accumulate((r.k for r in todo), initial=0))  # each record's first (best) row
        firsts = set(starts[:-1])
        chunk = self._rows_per_forward()
        values: list[float] = []
        along: dict[int, tuple[float, ...]] = {}  # best response's row -> its stop log-probs
        for i in range(0, len(responses), chunk):
            batch = model.encode(prompts[i:i + chunk], responses[i:i + chunk], ends[i:i + chunk])
            sums, stop_logps = model.reference_read(batch, stops=stops is not None)
            values += sums.float().cpu().tolist()
            if stop_logps is not None:
                keep = predicting(batch.response_mask).to(stop_logps.device)
                along.update({i + j: tuple(stop_logps[j][keep[j]].float().cpu().tolist())
                              for j in range(batch.rows) if i + j in firsts})
        for b, r in enumerate(todo):
            cache[r.record_id] = tuple(values[starts[b]:starts[b] + r.k])
            if stops is not None:
                stops[r.record_id] = along[starts[b]]

    def _rows_per_forward(self) -> int:
        """Rows per reference or evaluation forward: no more than a training step holds (two responses per
        record), so scoring never needs more memory than training (the vocabulary-wide log-probs of a
        49k-token LM head are most of it)."""
        return max(1, min(self.cfg.gate.eval_batch_size, 2 * self.cfg.optim.batch_size))

    def admit(self, model: TrainablePolicy, records: Sequence[PreferenceRecord]) -> dict[str, str]:
        refused: dict[str, str] = {}
        ok: list[PreferenceRecord] = []
        for rec in records:
            reason = duplicate_reason(rec)
            if not reason:
                bad = model.rejections([rec.prompt] * rec.k, list(rec.ranked_responses), rec.ends)
                if bad:
                    i, why = sorted(bad.items())[0]
                    reason = f"ranked_responses: response {i}: {why}"
            if reason:
                refused[rec.record_id] = reason
            else:
                ok.append(rec)
        self._reference_of(model, ok, self.reference, self._stops_cache())
        return refused

    def side_data(self, records: Sequence[PreferenceRecord]) -> dict[str, dict[str, tuple[float, ...]]]:
        """The cached reference readings of ``records`` (log-probs, and stop log-probs with the anchor on)."""
        return {name: {r.record_id: cache[r.record_id] for r in records if r.record_id in cache}
                for name, cache in (("logps", self.reference), ("stops", self.reference_stops))}

    def accept_side_data(self, data: Any) -> None:
        if data:
            self.reference.update(data["logps"])
            self.reference_stops.update(data["stops"])

    def batch(self, model: TrainablePolicy, records: Sequence[PreferenceRecord],
              weights: Sequence[float] | None) -> Batch:
        self._reference_of(model, records, self.reference, self._stops_cache())  # a no-op for admitted and replayed records
        kmax = max(r.k for r in records)
        prompts, responses, ends = response_rows(records)
        owner, position = flatten(records)
        ref = torch.zeros(len(records), kmax)  # (B, Kmax)
        mask = torch.zeros(len(records), kmax, dtype=torch.bool)  # (B, Kmax)
        for b, rec in enumerate(records):
            ref[b, :rec.k] = torch.tensor(self.reference[rec.record_id])
            mask[b, :rec.k] = True
        rows = model.encode(prompts, responses, ends)
        data = RankingRows(rows, torch.tensor(owner), torch.tensor(position), ref, mask,
                           torch.tensor(list(weights), dtype=torch.float32) if weights is not None else None)
        if self.settings.stop_anchor > 0:
            data.best, data.ref_stops, data.goes_on = self._stop_anchor_rows(model, records, rows, data.position)
        padded = int(rows.input_ids.shape[0] * rows.input_ids.shape[1])
        return Batch(data, records=len(records), sequences=len(responses), padded_tokens=padded)

    def _stops_cache(self) -> dict[str, tuple[float, ...]] | None:
        return self.reference_stops if self.settings.stop_anchor > 0 else None

    def _stop_anchor_rows(self, model: TrainablePolicy, records: Sequence[PreferenceRecord], rows: PolicyBatch,
                          position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each ranking's best row ``(B,)``, the reference's cached stop log-probs laid along it ``(B, T)``, and
        the positions where it goes on ``(B, T)``: they predict a reply token that is not the stop."""
        best = (position == 0).nonzero()[:, 0]  # (B,) rows are laid out ranking by ranking, best first
        ids, keep = rows.input_ids[best], predicting(rows.response_mask[best])  # (B, T)
        ref_stops = torch.zeros(ids.shape, dtype=torch.float32)
        for b, rec in enumerate(records):
            ref_stops[b, keep[b]] = torch.tensor(self.reference_stops[rec.record_id], dtype=torch.float32)
        goes_on = keep.clone()
        goes_on[:, :-1] &= ids[:, 1:] != model.stop_token
        return best, ref_stops, goes_on

    def loss(self, module: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        data: RankingRows = batch.data
        sums, counts, stops = module(data.rows.input_ids, data.rows.attention_mask, data.rows.response_mask)
        policy = torch.zeros(data.mask.shape, dtype=sums.dtype, device=sums.device)  # (B, Kmax)
        policy = policy.index_put((data.owner, data.position), sums)
        tokens = torch.ones(data.mask.shape, dtype=counts.dtype, device=counts.device)
        tokens = tokens.index_put((data.owner, data.position), counts)
        beta, d = self.settings.beta, self.settings
        b = torch.arange(data.mask.shape[0], device=sums.device)
        worst = data.mask.sum(1) - 1  # (B,) index of each ranking's last response
        if d.dpo_loss == "plackett_luce":
            out = plackett_luce_dpo_loss(policy, data.ref, data.mask, beta=beta, weights=data.weights)
            loss = out.loss
        elif d.dpo_loss == "sigmoid":
            loss = dpo_loss(policy[:, 0], policy[b, worst], data.ref[:, 0], data.ref[b, worst], beta=beta,
                            label_smoothing=d.label_smoothing, weights=data.weights).loss
        else:
            loss = ipo_loss(policy[:, 0], policy[b, worst], data.ref[:, 0], data.ref[b, worst], tokens[:, 0],
                            tokens[b, worst], beta=beta, weights=data.weights).loss
        metrics: dict[str, float] = {}
        if d.sft_weight:
            nll = chosen_nll(policy[:, 0], tokens[:, 0].clamp(min=1), weights=data.weights)
            loss = loss + d.sft_weight * nll
            metrics["chosen_nll"] = float(nll.detach())
        if d.stop_anchor:
            if stops is None or data.best is None or data.ref_stops is None or data.goes_on is None:
                raise RuntimeError("stop_anchor is on but the batch or the forward carries no stop log-probs "
                                   "(load the policy through this objective)")
            anchor = stop_anchor_loss(stops[data.best], data.ref_stops, data.goes_on, weights=data.weights,
                                      both_ways=d.stop_anchor_sides == "both")
            loss = loss + d.stop_anchor * anchor
            metrics["stop_anchor"] = float(anchor.detach())
        with torch.no_grad():
            rewards = beta * (policy.detach() - data.ref)  # (B, Kmax)
            kmax = data.mask.shape[1]
            i, j = torch.triu_indices(kmax, kmax, offset=1, device=rewards.device)
            valid = data.mask[:, i] & data.mask[:, j]  # (B, P)
            correct = (rewards[:, i] > rewards[:, j]) & valid
            accuracy = float(correct.sum()) / max(int(valid.sum()), 1)
            margin = float((rewards[:, 0] - rewards[b, worst]).mean())
        return loss, {"pair_accuracy": accuracy, "reward_margin": margin, **metrics}

    # -- checkpoint state ------------------------------------------------------------------------------

    def save_state(self, directory: Path, keep: Sequence[PreferenceRecord]) -> None:
        """The reference log-probs (and stop log-probs) of the records the reservoir keeps (the caches are
        trimmed to them)."""
        ids = {r.record_id for r in keep}
        self.reference = {k: v for k, v in self.reference.items() if k in ids}
        self.reference_stops = {k: v for k, v in self.reference_stops.items() if k in ids}
        (Path(directory) / REF_FILE).write_text(json.dumps({
            "temperature": self.settings.temperature, "logps": {k: list(v) for k, v in self.reference.items()},
            "stops": {k: list(v) for k, v in self.reference_stops.items()}}))

    def load_state(self, directory: Path) -> None:
        """The cached reference log-probs, unless they were read at another temperature than the one
        configured now (they are then recomputed, once per record, as for a new record)."""
        path = Path(directory) / REF_FILE
        if not path.exists():
            return
        saved = json.loads(path.read_text())
        if "logps" not in saved:  # written before the temperature was recorded: read at 1
            saved = {"temperature": 1.0, "logps": saved}
        if float(saved["temperature"]) != self.settings.temperature:
            log.info("reference log-probs in %s were read at temperature %s, not %s: recomputing them",
                     path, saved["temperature"], self.settings.temperature)
            return
        self.reference.update({k: tuple(float(x) for x in v) for k, v in saved["logps"].items()})
        self.reference_stops.update({k: tuple(float(x) for x in v) for k, v in saved.get("stops", {}).items()})

    # -- the gate ------------------------------------------------------------------------------------

    def implicit_rewards(self, model: TrainablePolicy, prompts: Sequence[Sequence[Any]],
                         responses: Sequence[str], ref: Sequence[float],
                         ends: Sequence[bool] | None = None) -> list[float]:
        """β·(log π − log π_ref) per response, in evaluation mode, without gradient (``ends`` as
        :meth:`TrainablePolicy.encode`)."""
        out: list[float] = []
        chunk = self._rows_per_forward()
        was = model.module.training
        model.module.eval()
        try:
            with torch.no_grad():
                for i in range(0, len(responses), chunk):
                    logps = model.logps(model.encode(prompts[i:i + chunk], responses[i:i + chunk],
                                                     None if ends is None else ends[i:i + chunk]))
                    out += logps.float().cpu().tolist()
        finally:
            model.module.train(was)
        return [self.settings.beta * (p - r) for p, r in zip(out, ref)]

    def evaluate(self, model: TrainablePolicy, records: Sequence[PreferenceRecord],
                 known: EvalResult | None = None) -> EvalResult:
        usable = [r for r in records if not duplicate_reason(r)
                  and not model.rejections([r.prompt] * r.k, list(r.ranked_responses), r.ends)]
        self._reference_of(model, usable, self._eval_reference)
        # pairwise_result scores the rows in this order, in slices under a progress bar: each slice takes its refs
        ref = iter([x for r in canonical_order(usable) for x in self._eval_reference[r.record_id]])
        started = time.perf_counter()
        metrics, spoken = self.guard_metrics(model, usable, known)
        guards_s = time.perf_counter() - started
        result = pairwise_result(usable, lambda prompts, responses, ends: self.implicit_rewards(
                                     model, prompts, responses, [next(ref) for _ in responses], ends),
                                 metrics)
        log.info("evaluation: guards %.1fs, pairwise accuracy on %d pairs %.1fs", guards_s, result.pairs,
                 time.perf_counter() - started - guards_s)
        return dataclasses.replace(result, **spoken)

    def use_registry(self, registry: Any) -> None:
        if self.settings.reward_guard and self.settings.guard_prompts:
            from trainer.reward_judge import ServedReward

            self.judge = ServedReward(registry, self.settings.reward_guard)
        # The records' rule criteria are read whenever the guards run: the criteria guard judges by them, and
        # the length guard's bar counts the reference's replies at most at a word limit they set. Without that
        # bar, a version that learnt the limit was refused as "shorter than the reference" (make loop's defaults).
        if self.settings.guard_prompts:
            self.criteria = RecordCriteria.of(registry)

    def _guard_prompts(self, records: Sequence[PreferenceRecord], n: int) -> list[GuardPrompt]:
        """The ``n`` prompts the guards reply to: the guard set's first ``n`` (read again each time, so a
        replaced file names new criteria; an unreadable one keeps the last read), or, without one, the
        held-out records' (:meth:`_held_out_prompts`)."""
        if self.settings.guard_set:
            try:
                self._guard_set = load_guard_set(self.settings.guard_set)
            except (OSError, InvalidArgument) as e:
                log.error("the guard set cannot be read now (%s); the guards reply to the %d prompts read before",
                          e, len(self._guard_set))
            kept = self._guard_set[:n]
        else:
            kept = self._held_out_prompts(records, n)
        self._guard_ids = [g.key for g in kept]
        return kept

    def _held_out_prompts(self, records: Sequence[PreferenceRecord], n: int) -> list[GuardPrompt]:
        """The prompts of ``n`` held-out records, distinct: the ones chosen before while the evaluation set
        still holds them, topped up in canonical order, so the prompts (and the reference's replies to them)
        stay put as the set grows instead of shifting with every record that sorts before them.  One prompt
        once: a best-of-N's criteria feedback is often two records."""
        by_id = {r.record_id: r for r in records}
        kept: list[GuardPrompt] = []
        prompts: set[tuple[Any, ...]] = set()
        for r in [by_id[i] for i in self._guard_ids if i in by_id] + canonical_order(records):
            if len(kept) < n and r.prompt not in prompts:
                kept.append(GuardPrompt.of_record(r))
                prompts.add(r.prompt)
        return kept

    def guard_metrics(self, model: TrainablePolicy, records: Sequence[PreferenceRecord],
                      known: EvalResult | None = None) -> tuple[dict[str, float], dict[str, Any]]:
        """Replies to the guard prompts (:meth:`_guard_prompts`; greedy or at ``guard_temperature``, fixed
        seeds): KL to the reference, empty and repetition rates, mean words, and the reference policy's mean
        words on the same prompts (what the length guard compares with while no version is served; generated
        once per prompt set); with a reward guard, the judge's mean score of the replies, how much lower it
        is than the reference's replies' and its paired standard error (:func:`reward_drop`); with the
        registry's criteria store (the criteria guard judges by these; without it they are only recorded),
        the share of the replies, and of the reference's, that break their prompt's rule criteria, over the
        prompts that name any (:func:`violation_rise`), and, when one of those criteria limits words, the
        reference's mean words counted at most at each prompt's limit (:func:`words_within_limits`, the
        length guard's bar then).

        The KL is the exact full-vocabulary KL(π‖π_ref) per token, averaged over the tokens of the
        policy's own non-empty replies and of the held-out chosen responses to the same prompts (for a
        guard-set prompt, which has none, the reference policy's reply; when those are empty too, the held-out
        records'), so it is defined even when every reply is empty (which the empty-reply guard reports).

        ``known`` (an earlier evaluation of the same version) lends its replies, and their KL, when they
        answer the same prompts with the same sampling (:func:`replies_key`); the judge's scores and the
        criteria's verdicts are taken again, as the judge's version and the prompts' criteria may have
        changed since.  Returns the metrics and the ``EvalResult`` fields that keep the replies."""
        n = self.settings.guard_prompts
        if n == 0 or not records:
            return {}, {}
        held = self._guard_prompts(records, n)
        if not held:
            return {}, {}
        prompts = [g.prompt for g in held]
        d = self.settings
        sampling = {"max_new_tokens": d.guard_max_new_tokens, "seed": self.cfg.optim.seed,
                    "temperature": d.guard_temperature}
        key = (tuple(g.key for g in held), d.guard_max_new_tokens, d.guard_temperature)
        digest = replies_key(key[0], sampling)
        started = time.perf_counter()
        reused = known is not None and known.replies_key == digest and len(known.replies) == len(prompts)
        if reused:
            replies, source = list(known.replies), "reused from its checkpoint"
        else:
            replies, source = model.generate(prompts, **sampling), "generated"
        replied_s = time.perf_counter() - started
        if self._reference_replies is None or self._reference_replies[0] != key:
            base = model.generate(prompts, **sampling, reference=True)
            self._reference_replies = (key, base)
        reference = self._reference_replies[1]
        log.info("guards: %d replies %s in %.1fs (the reference's: %.1fs)", len(replies), source, replied_s,
                 time.perf_counter() - started - replied_s)
        spoken = [(p, r) for p, r in zip(prompts, replies) if r.strip()]
        # beside the policy's own replies, a held-out record's best response, or a guard-set prompt's reference reply
        kl_rows = spoken + [(g.prompt, g.chosen or b) for g, b in zip(held, reference) if (g.chosen or b).strip()]
        if reused and kl_rows and "kl_to_ref" in known.metrics:  # the same version on the same tokens
            kl = known.metrics["kl_to_ref"]
        else:
            if not kl_rows:  # every reply to a guard set empty, the reference's too: the held-out records' best responses
                kl_rows = [(r.prompt, r.chosen) for r in canonical_order(records)[:n]]
            kl = model.token_kl([p for p, _ in kl_rows], [r for _, r in kl_rows])
        out = {
            "kl_to_ref": float(kl),
            "empty_rate": 1.0 - len(spoken) / len(replies),
            "repetition_rate": sum(repetition_rate(r) for r in replies) / len(replies),
            "mean_words": mean_words(replies),
            "guard_prompts": float(len(replies)),
            "guard_max_new_tokens": float(d.guard_max_new_tokens),
            "guard_temperature": float(d.guard_temperature),
            "reference_mean_words": mean_words(reference),
        }
        # Both sets of replies in one call, so one version of the judge scores them (a few ms for a small
        # reward model; the reference's replies are kept, their scores are not).
        kept: dict[str, Any] = {"replies": tuple(replies), "replies_key": digest}
        judged = self.judge.score(prompts * 2, replies + reference) if self.judge is not None else None
        if judged is not None:
            rewards = judged[1]
            own = tuple(rewards[:len(replies)])
            drop, se = reward_drop(own, rewards[len(replies):])
            out.update(mean_reward=statistics.fmean(own), reward_drop=drop, reward_drop_se=se)
            kept.update(rewards=own, rewards_judge=judged[0])
        if self.criteria is not None:
            broken = [self.criteria.broken(g, a) for g, a in zip(held, replies)]
            out.update(criterion_rates(broken))
            out.update(violation_rise([(any_broken(x), self.criteria.breaks(g, b))
                                       for x, g, b in zip(broken, held, reference)]))
            limits = [self.criteria.word_limit(g) for g in held]
            if any(n is not None for n in limits):
                out["reference_words_within_limit"] = words_within_limits(reference, limits)
        return out, kept

    guards = True

    def unjudged(self, result: EvalResult | None, served: EvalResult | None = None) -> str:
        if result is None or not result.pairs:  # no held-out records at all: publish_without_eval decides
            return ""
        n, d = int(result.metrics.get("guard_prompts", 0)), self.settings
        if n < d.min_guard_prompts:
            return (f"not judged yet: the guards read {n} held-out prompts, fewer than min_guard_prompts "
                    f"{d.min_guard_prompts}; training goes on and the next checkpoint is judged on more")
        failed = list(self._failures(result, served))
        if failed and all(doubtful for _, doubtful in failed):
            more = "judged afresh" if d.guard_set else "judged on more"  # a guard set's prompts stay the same
            return (f"in doubt, not judged yet: {failed[0][0]}; that is within doubt_z {d.doubt_z} standard errors of "
                    f"the tolerance, so training goes on, not rolled back, and the next checkpoint is {more}")
        return ""

    def guard(self, result: EvalResult | None, served: EvalResult | None = None) -> str:
        return next((reason for reason, doubtful in self._failures(result, served) if not doubtful), "")

    def _doubtful(self, excess: float, se: float) -> bool:
        """Whether a comparative guard's estimate, ``excess`` over its tolerance, is within ``doubt_z`` standard
        errors ``se`` of it: a difference one sampled reply per prompt can make (:meth:`unjudged` waits)."""
        return excess <= self.settings.doubt_z * se

    def _failures(self, result: EvalResult | None, served: EvalResult | None) -> Iterator[tuple[str, bool]]:
        """Each guard the version fails, in order, as (reason, whether it is in doubt); the drift, degeneration
        and length guards are never in doubt, the reward and criteria guards within ``doubt_z`` standard errors."""
        if result is None or not result.metrics:
            return
        m, d = result.metrics, self.settings
        if m.get("kl_to_ref", 0.0) > d.max_kl or not math.isfinite(m.get("kl_to_ref", 0.0)):
            yield (f"drift guard: mean per-token KL to the reference {m['kl_to_ref']:.4f} on "
                   f"{int(m.get('guard_prompts', 0))} held-out prompts exceeds max_kl {d.max_kl}"), False
        if m.get("empty_rate", 0.0) > d.max_empty_rate:
            yield (f"degeneration guard: {m['empty_rate']:.0%} of the replies to held-out prompts are empty "
                   f"(max_empty_rate {d.max_empty_rate})"), False
        if m.get("repetition_rate", 0.0) > d.max_repetition_rate:
            yield (f"degeneration guard: repetition rate {m['repetition_rate']:.2f} of the replies to held-out "
                   f"prompts exceeds max_repetition_rate {d.max_repetition_rate}"), False
        # Against the served version's replies, or the reference's when they are shorter (a served version that
        # ran long may be cut back to where the policy started) or the served ones were sampled otherwise.  With a
        # word-limit criterion, the reference's replies count at most at the limit: shortening a reply that ran
        # over it is what the criterion asks for, not a collapse.
        against, whose = (served.metrics if served is not None else {}), "the served version's"
        limited = "reference_words_within_limit" in m
        reference = m.get("reference_words_within_limit", m.get("reference_mean_words"))
        if reference is not None and (reply_shrink(m, against) is None or reference < against["mean_words"]):
            against = {**m, "mean_words": reference}
            whose = "the reference policy's (each counted at most at its word limit)" if limited else \
                "the reference policy's"
        shrink = reply_shrink(m, against)
        if shrink is not None and shrink > d.max_shrink + 1e-12:
            yield (f"length guard: the replies to {int(m.get('guard_prompts', 0))} held-out prompts average "
                   f"{m['mean_words']:.1f} words, {shrink:.0%} fewer than {whose} "
                   f"{against['mean_words']:.1f} (max_shrink {d.max_shrink})"), False
        if "reward_drop" in m and m["reward_drop"] > d.max_reward_drop + 1e-12:
            yield (f"reward guard: {d.reward_guard} scores the replies to {int(m['guard_prompts'])} held-out "
                   f"prompts {m['reward_drop']:.4f} lower than the reference policy's (mean {m['mean_reward']:.4f}, "
                   f"SE of the paired difference {m['reward_drop_se']:.4f}); max_reward_drop is {d.max_reward_drop}"), \
                self._doubtful(m["reward_drop"] - d.max_reward_drop, m["reward_drop_se"])
        # ... and against the served version's replies to the same prompts: a version may not spend the reward
        # the served one kept, a step at a time, while the bar above (the reference) still lets it through
        given = reward_giveback(result, served) if d.max_reward_giveback >= 0 else None
        if given is not None and given[0] > d.max_reward_giveback + 1e-12:
            yield (f"reward guard: {d.reward_guard} scores the replies to {len(result.rewards)} held-out prompts "
                   f"{given[0]:.4f} lower than the served version's (SE of the paired difference {given[1]:.4f}); "
                   f"max_reward_giveback is {d.max_reward_giveback}"), \
                self._doubtful(given[0] - d.max_reward_giveback, given[1])
        if not d.criteria_guard:  # the rates are recorded as gate metrics; only the criteria guard judges by them
            return
        if "violation_rise" in m and m["violation_rise"] > d.max_violation_rise + 1e-12:
            yield (f"criteria guard: {m['violation_rate']:.0%} of the replies to {int(m['criteria_prompts'])} held-out "
                   f"prompts break their records' rule criteria, against {m['reference_violation_rate']:.0%} of the "
                   f"reference policy's (SE of the paired difference {m.get('violation_rise_se', 0.0):.2f}; "
                   f"max_violation_rise {d.max_violation_rise})"), \
                self._doubtful(m["violation_rise"] - d.max_violation_rise, m.get("violation_rise_se", 0.0))
        # ... and against the served version, criterion by criterion: what an earlier version learnt is not given back
        given = violation_givebacks(m, served.metrics) if served is not None else {}
        for ref, rise in given.items():
            if rise <= d.max_violation_giveback + 1e-12:
                continue
            rate, was, n = m[f"violation_rate[{ref}]"], served.metrics[f"violation_rate[{ref}]"], m[f"criteria_prompts[{ref}]"]
            se = rate_difference_se(rate, was, n)
            yield (f"criteria guard: {rate:.0%} of the replies to {int(n)} held-out prompts break {ref}, against "
                   f"{was:.0%} of the served version's (SE of the difference {se:.2f}; max_violation_giveback "
                   f"{d.max_violation_giveback})"), self._doubtful(rise - d.max_violation_giveback, se)
