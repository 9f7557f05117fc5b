"""Serving dtype: auto resolution, bf16 detection, the fp32 reward head, and the bf16-vs-fp32 comparison."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from scorer import precision
from scorer.precision import agreement, bf16_decision, cast_for_serving, head_linears, resolve_dtype


def test_bf16_decision_needs_the_instruction_not_just_onednn():
    assert bf16_decision(True, "x86_64", {"avx512f", "avx512_bf16"}, False) == (True, "x86 CPU with avx512_bf16")
    assert bf16_decision(True, "x86_64", {"amx_bf16"}, False)[0] is True
    assert bf16_decision(True, "x86_64", set(), True)[0] is True  # torch's cpuinfo saw it
    # Skylake-X / Cascade Lake: oneDNN says yes (AVX-512 core), but bf16 would be emulated.
    native, why = bf16_decision(True, "x86_64", {"avx512f", "avx512bw", "avx512_vnni"}, False)
    assert not native and "emulated" in why
    assert bf16_decision(False, "x86_64", {"avx512_bf16"}, True)[0] is False
    assert bf16_decision(True, "aarch64", set(), False)[0] is True
    assert bf16_decision(True, "ppc64le", set(), False)[0] is False



def test_bf16_decision_also_needs_bf16_to_be_measured_faster_than_fp32():
    from services.precision import MIN_BF16_SPEEDUP, gemm_bf16_speedup

    flags = {"avx512f", "avx512_bf16"}
    native, why = bf16_decision(True, "x86_64", flags, False, speedup=3.4)  # Zen 4: bf16 wins
    assert native and why == "x86 CPU with avx512_bf16; a bf16 GEMM ran 3.40x as fast as fp32 here"
    native, why = bf16_decision(True, "x86_64", flags, False, speedup=0.51)  # a Xeon without AMX: it loses
    assert not native and "0.51x" in why and why.endswith(": fp32")
    assert bf16_decision(True, "x86_64", flags, False, speedup=MIN_BF16_SPEEDUP)[0] is True
    assert bf16_decision(True, "aarch64", set(), False, speedup=1.0)[0] is False
    assert bf16_decision(True, "x86_64", {"avx512f"}, False, speedup=9.0)[0] is False  # never where it is emulated
    speedup = gemm_bf16_speedup(n=64, flops=1e6, rounds=1)  # the probe itself: a positive, finite ratio
    assert 0 < speedup < float("inf")


def test_auto_dtype_follows_cpu_support_and_explicit_dtypes_pass_through(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (True, "test"))
    assert resolve_dtype("auto", cpu) == "bfloat16"
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: (False, "test"))
    assert resolve_dtype("auto", cpu) == "float32"
    for explicit in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(explicit, cpu) == explicit


def _pair(model_cls, cfg):
    torch.manual_seed(0)
    ref = model_cls(cfg).eval()
    half = model_cls(cfg).eval()
    half.load_state_dict(ref.state_dict())
    return ref, cast_for_serving(half, "bfloat16")


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_bf16_serving_keeps_an_fp32_head_and_stays_close_to_fp32(family):
    if family == "bert":
        cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, num_labels=1)
        ref, half = _pair(BertForSequenceClassification, cfg)
    else:
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64, num_labels=6, pad_token_id=0)
        ref, half = _pair(LlamaForSequenceClassification, cfg)
    heads = head_linears(half)
    assert len(heads) == 1 and heads[0].weight.dtype == torch.float32
    # the head's weights are the fp32 ones, not rounded through bf16 on the way
    assert torch.equal(heads[0].weight, head_linears(ref)[0].weight)
    assert half.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = torch.randint(1, 64, (16, 12), generator=torch.Generator().manual_seed(1))  # (B, T)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask).logits  # (B, labels)
        got = half(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == torch.float32
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 0.05 * scale
    # The head's fp32 output is not quantized to bf16's 8-bit mantissa: values off the bf16 grid occur.
    assert not torch.equal(got, got.to(torch.bfloat16).float())


def test_float32_serving_is_a_no_op_cast():
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=1)
    model = cast_for_serving(BertForSequenceClassification(cfg), "float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.classifier._forward_pre_hooks


def test_agreement_worked_by_hand():
    reference = [(1.0, 0.0), (0.5, 0.4), (0.2, 0.3), (0.0, 0.0)]
    other = [(1.1, 0.0), (0.45, 0.46), (0.2, 0.3), (0.0, 0.0)]  # pair 1 flips (gap 0.1); the tie stays a tie
    a = agreement(reference, other)
    assert a.pairs == 4
    assert a.rank_agreement == pytest.approx(0.75)
    assert a.max_abs_diff == pytest.approx(0.1)
    assert a.mean_abs_diff == pytest.approx((0.1 + 0.05 + 0.06) / 8)
    assert a.reference_mean_gap == pytest.approx((1.0 + 0.1 + 0.1 + 0.0) / 4)
    assert a.max_flipped_gap == pytest.approx(0.1)
    flat = [1.0, 0.0, 0.5, 0.4, 0.2, 0.3, 0.0, 0.0]
    mean = sum(flat) / 8
    assert a.reference_std == pytest.approx((sum((x - mean) ** 2 for x in flat) / 8) ** 0.5)
    assert agreement(reference, reference).to_dict("x_")["x_rank_agreement"] == 1.0
    with pytest.raises(ValueError, match="same non-zero number"):
        agreement(reference, other[:2])


def test_load_reward_serves_minilm_in_bf16_with_fp32_rewards_close_to_fp32():
    from scorer.runners import load_reward
    from services.reward_model import default_reward_model_path
    from services.schemas import ChatMessage

    path = default_reward_model_path()
    r32 = load_reward(path, device="cpu", dtype="float32", warmup=False, max_length=32)
    r16 = load_reward(path, device="cpu", dtype="bfloat16", warmup=True, max_length=32)
    assert (r32.dtype, r16.dtype) == ("float32", "bfloat16")
    prompt = [ChatMessage("user", "How do I boil an egg?")]
    responses = ["Boil it for nine minutes.", "No.", "Put it in water, heat until it boils, wait, cool it."]
    want = [r for r, _ in r32.run_batch(r32.encode(prompt, responses))]
    got = [r for r, _ in r16.run_batch(r16.encode(prompt, responses))]
    assert all(isinstance(x, float) for x in got)
    # Same seeded base head both ways; bf16 backbone rounding stays far below the scores' own scale.
    assert got == pytest.approx(want, abs=2e-3)
