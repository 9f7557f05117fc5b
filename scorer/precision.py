"""Which number format the scorer serves in, and how a model is put into it.

Why it exists: on CPUs with native bf16 dot products (x86 AVX512-BF16 or AMX-BF16, Arm BF16) a bf16
GEMM runs ~3x faster than fp32 (measured on the 2-core Zen 4 dev box: ~270 vs ~80 GFLOP/s), and reward
models are routinely served in bf16 on GPUs anyway.  ``dtype: auto`` therefore means:

* CUDA: bf16 where the GPU supports it, else fp16 (as before);
* CPU with native bf16 that a probe GEMM also measures faster than fp32 (see :func:`cpu_bf16_support`): bf16;
* any other CPU: fp32 (bf16 there is emulated by oneDNN, or native and still slower than fp32, as on a
  2-core Xeon with AVX512-BF16 and no AMX, services/precision.py).

A half-precision model is served with its **reward head kept in fp32**: every ``nn.Linear`` whose
output width is the head's (``config.num_labels``) stays fp32 and casts its input up.  A bf16 logit
has 8 bits of mantissa, so rewards near 3.0 would come out in steps of 1/64 and close pairs would tie
or swap order; with an fp32 head the final dot product over the hidden state is exact to fp32 and
only the backbone's bf16 rounding remains (measured in ``bench/scorer.py``:
``bf16_vs_fp32_max_abs_diff`` and ``bf16_vs_fp32_rank_agreement``).

The conversion is a weight cast, not ``torch.autocast``: on the dev box both gave ~2.5x the fp32
forward, the cast ~5-15% more (autocast re-casts every weight on every call, which dominates small
batches) and half the memory; autocast's error was ~2x smaller, a difference the fp32 head makes
irrelevant to rankings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from services.precision import X86_BF16_FLAGS, bf16_decision, cpu_bf16_support  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                        "float16": torch.float16}
def resolve_dtype(dtype: str, device: torch.device) -> str:
    """The concrete dtype for ``dtype`` (``auto`` resolved as the module docstring says)."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    native, _ = cpu_bf16_support()
    return "bfloat16" if native else "float32"


def _fp32_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def head_linears(hf_model: nn.Module) -> list[nn.Linear]:
    """The Linear layers producing the logits: output width = ``config.num_labels``.

    BERT ``classifier``, Llama/SmolLM ``score``, RoBERTa ``classifier.out_proj``, T5
    ``classification_head.out_proj``.
    """
    width = int(hf_model.config.num_labels)
    hidden = int(getattr(hf_model.config, "hidden_size", 0) or getattr(hf_model.config, "d_model", 0) or 0)
    return [m for m in hf_model.modules()
            if isinstance(m, nn.Linear) and m.out_features == width and m.in_features != width
            and (not hidden or m.in_features == hidden)]


def cast_for_serving(hf_model: nn.Module, dtype: str) -> nn.Module:
    """Cast a loaded fp32 sequence-classification model to ``dtype`` for inference, in place.

    Half precision keeps the head Linear(s) in fp32 with fp32 inputs, so logits (rewards) are fp32.
    """
    target = TORCH_DTYPES[dtype]
    heads = head_linears(hf_model) if target != torch.float32 else []
    # the heads' exact weights, kept aside: a round trip through ``target`` would round them
    exact = [{k: v.detach().float().clone() for k, v in head.state_dict().items()} for head in heads]
    hf_model.to(target)
    if target == torch.float32:
        return hf_model
    if not heads:
        log.warning("%s: no head Linear with %d outputs found; logits stay %s",
                    type(hf_model).__name__, hf_model.config.num_labels, dtype)
    for head, weights in zip(heads, exact):
        head.float()
        head.load_state_dict(weights)
        head.register_forward_pre_hook(_fp32_inputs)
    return hf_model


@dataclass(frozen=True)
class Agreement:
    """How far scores in one dtype are from the reference (fp32) on the same inputs."""

    max_abs_diff: float
    mean_abs_diff: float
    #: fraction of (chosen, rejected) pairs whose order (sign of chosen - rejected) is the same.
    rank_agreement: float
    pairs: int
    #: spread of the reference scores, for scale: a diff is small or large relative to this.
    reference_std: float
    #: mean |chosen - rejected| of the reference, the gap a diff would have to close to flip an order.
    reference_mean_gap: float
    #: largest reference |chosen - rejected| among the pairs whose order changed (0 when none did):
    #: flips confined to near-ties are rounding; a large one would be a real accuracy problem.
    max_flipped_gap: float

    def to_dict(self, prefix: str = "") -> dict[str, float | int]:
        return {f"{prefix}{k}": (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def agreement(reference: Sequence[tuple[float, float]], other: Sequence[tuple[float, float]]) -> Agreement:
    """Compare (chosen, rejected) score pairs of the same inputs scored two ways.

    A pair agrees when ``sign(chosen - rejected)`` is the same both ways (a tie counts only with a tie).
    """
    if len(reference) != len(other) or not reference:
        raise ValueError(f"need the same non-zero number of pairs, got {len(reference)} and {len(other)}")
    diffs = [abs(a - b) for ref, oth in zip(reference, other) for a, b in zip(ref, oth)]

    def sign(x: float) -> int:
        return (x > 0) - (x < 0)

    flipped = [abs(rc - rr) for (rc, rr), (oc, orr) in zip(reference, other) if sign(rc - rr) != sign(oc - orr)]
    flat = [s for pair in reference for s in pair]
    mean = sum(flat) / len(flat)
    std = (sum((s - mean) ** 2 for s in flat) / len(flat)) ** 0.5
    return Agreement(
        max_abs_diff=max(diffs),
        mean_abs_diff=sum(diffs) / len(diffs),
        rank_agreement=1.0 - len(flipped) / len(reference),
        pairs=len(reference),
        reference_std=std,
        reference_mean_gap=sum(abs(c - r) for c, r in reference) / len(reference),
        max_flipped_gap=max(flipped, default=0.0),
    )


__all__ = ["Agreement", "agreement", "bf16_decision", "cast_for_serving", "cpu_bf16_support", "head_linears", "resolve_dtype"]
