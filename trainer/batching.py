"""Turning a batch of rankings into forward passes and the rewards back into rankings.

A batch of B rankings with K_b responses each becomes one flat list of sum(K_b) (prompt, response)
sequences: every response goes through the model exactly once (the saving InstructGPT's K-wise loss
is built on).  The flat list is split into length buckets (sorted by token count, each bucket padded
only to its own longest row, bounded in padded tokens) so short responses do not pay for long ones;
the rewards are then scattered back into a padded ``(B, Kmax)`` matrix with a mask for the losses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from services.schemas import ChatMessage, PreferenceRecord

#: encode(prompts, responses) -> right-padded {"input_ids": (N, T), "attention_mask": (N, T), ...}, one
#: row per (prompt, response): services.reward_model.RewardModel.encode.
Encoder = Callable[[Sequence[Sequence[ChatMessage]], Sequence[str]], Mapping[str, torch.Tensor]]


@dataclass
class RankingBatch:
    """Flattened rankings, ready for bucketed forward passes."""

    num_rankings: int  # B
    kmax: int
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask (+ token_type_ids): (N, T), right-padded
    owner: torch.Tensor  # (N,) ranking index b of each flat row
    position: torch.Tensor  # (N,) rank k of each row inside its ranking (0 = best)
    margins: torch.Tensor  # (B,) float
    attr_target: torch.Tensor  # (N, A) float
    attr_mask: torch.Tensor  # (N, A) bool
    buckets: list[torch.Tensor] = field(default_factory=list)  # index tensors into the N rows
    weights: torch.Tensor | None = None  # (B,) loss weight of each ranking; None = all equal

    @property
    def num_sequences(self) -> int:
        return int(self.owner.shape[0])

    @property
    def lengths(self) -> torch.Tensor:  # (N,)
        return self.inputs["attention_mask"].sum(dim=1)

    @property
    def padded_tokens(self) -> int:
        """Tokens the bucketed forward passes actually process (padding included)."""
        lengths = self.lengths
        return sum(len(idx) * max(int(lengths[idx].max()), 1) for idx in self.buckets)

    def bucket_inputs(self) -> list[dict[str, torch.Tensor]]:
        """The inputs of each bucket, trimmed to the bucket's longest row (rows are right-padded)."""
        out = []
        lengths = self.lengths
        for idx in self.buckets:
            width = max(int(lengths[idx].max()), 1)
            out.append({k: v[idx, :width] for k, v in self.inputs.items()})
        return out

    def to(self, device: torch.device | str) -> "RankingBatch":
        return RankingBatch(
            num_rankings=self.num_rankings,
            kmax=self.kmax,
            inputs={k: v.to(device) for k, v in self.inputs.items()},
            owner=self.owner.to(device),
            position=self.position.to(device),
            margins=self.margins.to(device),
            attr_target=self.attr_target.to(device),
            attr_mask=self.attr_mask.to(device),
            buckets=[b.to(device) for b in self.buckets],
            weights=self.weights.to(device) if self.weights is not None else None,
        )


def plan_buckets(lengths: Sequence[int], max_tokens: int, max_rows: int = 0) -> list[list[int]]:
    """Group row indices into buckets of similar length.

    Rows are sorted by length (longest first) and cut greedily so that ``rows × longest`` stays within
    ``max_tokens`` padded tokens (and at most ``max_rows`` rows when given).  A single row longer than
    the budget gets a bucket of its own.  Every index appears in exactly one bucket.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    buckets: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        w = max(width, int(lengths[i]), 1)
        too_many = bool(max_rows) and len(current) >= max_rows
        if current and (w * (len(current) + 1) > max_tokens or too_many):
            buckets.append(current)
            current, w = [], max(int(lengths[i]), 1)
        current.append(i)
        width = w
    if current:
        buckets.append(current)
    return buckets


def response_rows(records: Sequence[PreferenceRecord]) -> tuple[list[tuple[ChatMessage, ...]], list[str], list[bool]]:
    """Every response of ``records`` as a row, in the order of :func:`flatten`: its prompt, its text, and whether
    it ends its turn (:attr:`PreferenceRecord.unfinished`)."""
    prompts = [rec.prompt for rec in records for _ in rec.ranked_responses]
    responses = [resp for rec in records for resp in rec.ranked_responses]
    return prompts, responses, [e for rec in records for e in rec.ends]


def flatten(records: Sequence[PreferenceRecord]) -> tuple[list[int], list[int]]:
    """(owner, position) of every response when ``records`` are laid out flat, in record order."""
    owner, position = [], []
    for b, rec in enumerate(records):
        if rec.k < 2:
            raise ValueError(f"record {rec.record_id}: a ranking needs at least 2 responses, got {rec.k}")
        for k in range(rec.k):
            owner.append(b)
            position.append(k)
    return owner, position


def attribute_targets(
    records: Sequence[PreferenceRecord], attributes: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, mask) ``# (N, A)`` for the attribute heads from each response's score dict."""
    rows_t: list[list[float]] = []
    rows_m: list[list[bool]] = []
    for rec in records:
        for k in range(rec.k):
            scores = rec.response_attributes[k] if k < len(rec.response_attributes) else {}
            rows_t.append([float(scores.get(a, 0.0)) for a in attributes])
            rows_m.append([a in scores for a in attributes])
    n, a = len(rows_t), len(attributes)
    if a == 0:
        return torch.zeros(n, 0), torch.zeros(n, 0, dtype=torch.bool)
    return torch.tensor(rows_t, dtype=torch.float32), torch.tensor(rows_m, dtype=torch.bool)


def collate(
    records: Sequence[PreferenceRecord],
    encode: Encoder,
    *,
    attributes: Sequence[str] = (),
    max_tokens_per_forward: int = 8192,
    max_rows_per_forward: int = 0,
    weights: Sequence[float] | None = None,
) -> RankingBatch:
    """Tokenize every response of every ranking once and plan the length buckets; ``weights`` are
    the rankings' loss weights (one per record)."""
    if not records:
        raise ValueError("cannot collate an empty batch")
    if weights is not None and len(weights) != len(records):
        raise ValueError(f"{len(weights)} weights for {len(records)} records")
    owner, position = flatten(records)
    prompts, responses, _ = response_rows(records)  # a reward model reads only the text
    enc = encode(prompts, responses)  # right-padded (N, T) tensors
    inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    plan = plan_buckets(lengths, max_tokens_per_forward, max_rows_per_forward)
    target, mask = attribute_targets(records, attributes)
    return RankingBatch(
        num_rankings=len(records),
        kmax=max(r.k for r in records),
        inputs=inputs,
        owner=torch.tensor(owner, dtype=torch.long),
        position=torch.tensor(position, dtype=torch.long),
        margins=torch.tensor([float(r.margin) for r in records], dtype=torch.float32),
        attr_target=target,
        attr_mask=mask,
        buckets=[torch.tensor(b, dtype=torch.long) for b in plan],
        weights=torch.tensor([float(w) for w in weights], dtype=torch.float32) if weights is not None else None,
    )


def unbucket(bucket_outputs: Sequence[torch.Tensor], buckets: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """Put per-bucket outputs ``# (n_b, D)`` back in flat row order ``# (N, D)`` (differentiable)."""
    if not bucket_outputs:
        raise ValueError("no bucket outputs")
    d = bucket_outputs[0].shape[1:]
    out = bucket_outputs[0].new_zeros((n, *d))
    for idx, values in zip(buckets, bucket_outputs):
        out = out.index_copy(0, idx.to(out.device), values)
    return out


def regroup(
    flat: torch.Tensor, owner: torch.Tensor, position: torch.Tensor, num_rankings: int, kmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter flat per-response rewards ``# (N,)`` into ``# (B, Kmax)`` rewards and a bool mask."""
    rewards = flat.new_zeros((num_rankings, kmax)).index_put((owner, position), flat)  # (B, Kmax)
    mask = torch.zeros((num_rankings, kmax), dtype=torch.bool, device=flat.device)
    mask[owner, position] = True
    return rewards, mask


def expand_rankings_to_pairs(records: Sequence[PreferenceRecord]) -> list[PreferenceRecord]:
    """Each K-ranking as K(K-1)/2 independent K=2 records (the baseline the K-wise loss is measured
    against: every response is then encoded once per pair it appears in)."""
    out = []
    for rec in records:
        pairs = [(i, j) for i in range(rec.k) for j in range(i + 1, rec.k)]  # the order of rec.pairs()
        for n, pair in enumerate(pairs):
            out.append(
                dataclasses.replace(
                    rec,
                    record_id=f"{rec.record_id}#{n}",
                    ranked_responses=tuple(rec.ranked_responses[i] for i in pair),
                    response_attributes=(),
                    unfinished=tuple(x for x, i in enumerate(pair) if not rec.ends_turn(i)),
                )
            )
    return out
