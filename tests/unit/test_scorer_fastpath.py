"""The CPU bf16 fast path (scorer/fastpath.py): same scores as the stock bf16 forward, padding-invariant
(padded batches run packed, on their real tokens only), applied only to bf16 BERT encoders on CPU, and
invisible to the state dict."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from scorer import fastpath
from scorer.fastpath import apply_cpu_fast_path, fast_path_refusal, revert_cpu_fast_path
from scorer.precision import cast_for_serving

VOCAB = 100


def _bert(**overrides) -> BertForSequenceClassification:
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=3, **overrides)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    # Wider weights than the 0.02 init, so attention is far from uniform and a masking bug would show.
    with torch.no_grad():
        for p in model.bert.encoder.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
        model.classifier.weight.normal_(0.0, 0.5)  # logits ~O(1)
    return model


def _served(fast: bool, dtype: str = "bfloat16", **overrides) -> BertForSequenceClassification:
    model = cast_for_serving(_bert(**overrides), dtype)
    if fast:
        assert apply_cpu_fast_path(model)
    return model


def _batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask, as the scorer collates them."""
    width = max(lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=torch.Generator().manual_seed(seed))  # (B, T)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    return ids * mask, mask


def _logits(model, ids, mask) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits.float()  # (B, labels)


needs_onednn = pytest.mark.skipif(not fastpath._onednn_ops_available(), reason="no oneDNN bf16 ops in this torch")


def _batch_matching_each_sequence_alone(model, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score a right-padded batch of ``lengths`` and assert that every row equals its sequence scored on
    its own, unpadded (relative 1e-2); returns (ids, mask, the batch's logits (B, labels))."""
    ids, mask = _batch(lengths)
    batched = _logits(model, ids, mask)
    alone = torch.cat([_logits(model, ids[i:i + 1, :n], mask[i:i + 1, :n]) for i, n in enumerate(lengths)])
    assert (batched - alone).abs().max().item() <= 1e-2 * batched.abs().max().item()
    return ids, mask, batched


@needs_onednn
def test_fast_path_matches_the_stock_bf16_forward_on_padded_batches():
    ids, mask = _batch([40, 33, 40, 7, 21, 1])
    reference = _logits(cast_for_serving(_bert(), "float32"), ids, mask)
    stock = _logits(_served(fast=False), ids, mask)
    fast = _logits(_served(fast=True), ids, mask)
    stock_err = (stock - reference).abs().max().item()
    fast_err = (fast - reference).abs().max().item()
    assert fast_err <= 2 * stock_err + 1e-3, (fast_err, stock_err)
    assert (fast - stock).abs().max().item() <= 2 * stock_err + 1e-3
    assert reference.std().item() > 20 * fast_err  # the scores are not all noise


@needs_onednn
def test_padding_does_not_change_a_sequence_score():
    model = _served(fast=True)
    ids, mask, batched = _batch_matching_each_sequence_alone(model, [40, 33, 12, 5])
    # Garbage in the padding must not leak into the real tokens either.
    noisy = ids.clone()
    noisy[mask == 0] = torch.randint(1, VOCAB, (int((mask == 0).sum()),), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_logits(model, noisy, mask), batched)


@needs_onednn
def test_masks_other_than_right_padding_still_score_like_the_stock_forward():
    stock, fast = _served(fast=False), _served(fast=True)
    ids, mask = _batch([30, 30, 30])
    mask[0, :10] = 0  # left padding
    mask[1, 5:8] = 0  # a hole
    assert (_logits(fast, ids, mask) - _logits(stock, ids, mask)).abs().max().item() <= 2e-2
    no_mask = torch.ones_like(mask)
    assert (_logits(fast, ids, no_mask) - _logits(stock, ids, no_mask)).abs().max().item() <= 2e-2


@needs_onednn
def test_state_dict_is_unchanged_and_grad_mode_runs_the_stock_forward():
    stock, fast = _served(fast=False), _served(fast=True)
    assert list(fast.state_dict()) == list(stock.state_dict())
    assert type(fast.bert.encoder.layer[0].intermediate).__name__ == "FastBertIntermediate"
    ids, mask = _batch([20, 11])
    with torch.enable_grad():
        got = fast(input_ids=ids, attention_mask=mask).logits
        want = stock(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    revert_cpu_fast_path(fast)
    assert type(fast.bert.encoder.layer[0].intermediate).__name__ == "BertIntermediate"
    assert fast.config._attn_implementation == "sdpa"
    assert torch.equal(_logits(fast, ids, mask), _logits(stock, ids, mask))


@needs_onednn
def test_a_changed_weight_is_repacked():
    model = _served(fast=True)
    ids, mask = _batch([25, 9])
    before = _logits(model, ids, mask)
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.weight.mul_(2.0)
        model.bert.encoder.layer[1].attention.self.query.weight.mul_(-1.0)
    after = _logits(model, ids, mask)
    fastpath._set_enabled(model, False)
    stock_after = _logits(model, ids, mask)
    assert (after - stock_after).abs().max().item() <= 0.1 * (after - before).abs().max().item()


@needs_onednn
def test_a_failed_self_check_leaves_the_stock_model(monkeypatch):
    monkeypatch.setattr(fastpath, "_CHECK_MAX_DIFF", -1.0)
    model = _served(fast=False)
    assert not apply_cpu_fast_path(model)
    assert type(model.bert.encoder.layer[0].attention.self).__name__ == "BertSelfAttention"
    assert model.config._attn_implementation == "sdpa"


def test_not_applied_outside_bf16_bert_encoders():
    fp32 = cast_for_serving(_bert(), "float32")
    assert not apply_cpu_fast_path(fp32) and "bf16" in fast_path_refusal(fp32)
    assert type(fp32.bert.encoder.layer[0].attention.self).__name__ == "BertSelfAttention"
    decoder = cast_for_serving(_bert(is_decoder=True), "bfloat16")
    assert not apply_cpu_fast_path(decoder) and "decoder" in fast_path_refusal(decoder)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, num_labels=1, pad_token_id=0)
    llama = cast_for_serving(LlamaForSequenceClassification(cfg).eval(), "bfloat16")
    assert not apply_cpu_fast_path(llama) and "not a BERT encoder" in fast_path_refusal(llama)
    assert llama.config._attn_implementation != fastpath.ATTN_IMPLEMENTATION


@needs_onednn
def test_unsupported_activation_keeps_the_stock_intermediate():
    model = _served(fast=True, hidden_act="relu")
    layer = model.bert.encoder.layer[0]
    assert type(layer.intermediate).__name__ == "BertIntermediate"
    assert type(layer.attention.self).__name__ == "FastBertSelfAttention"


# ---------------------------------------------------------------------------------------------- packed encoder


def _hidden(model, ids, mask, **kwargs):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask, **kwargs)


@pytest.fixture
def packed_calls(monkeypatch) -> list[list[int]]:
    """The real-token counts of every batch the packed encoder ran."""
    calls: list[list[int]] = []
    packed = fastpath.FastBertEncoder._packed

    def spy(self, hidden_states, counts):
        calls.append(list(counts))
        return packed(self, hidden_states, counts)

    monkeypatch.setattr(fastpath.FastBertEncoder, "_packed", spy)
    return calls


@needs_onednn
@pytest.mark.parametrize("scores_bytes", [2 << 20, 1], ids=["l2-groups", "one-sequence-groups"])
@pytest.mark.parametrize("threads", [1, 2])
def test_packed_encoder_matches_the_stock_forward_on_real_tokens(packed_calls, monkeypatch, scores_bytes, threads):
    monkeypatch.setattr(fastpath, "_SCORES_BYTES", scores_bytes)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stock, fast = _served(fast=False), _served(fast=True)
        assert type(fast.bert.encoder).__name__ == "FastBertEncoder"
        packed_calls.clear()  # the self-check's
        lengths = [64, 1, 40, 33, 40, 7, 2, 21]  # max_position_embeddings and a single token
        ids, mask = _batch(lengths)
        want, got = _hidden(stock.bert, ids, mask), _hidden(fast.bert, ids, mask)
    finally:
        torch.set_num_threads(before)
    assert packed_calls == [lengths]
    real = mask.bool()
    diff = (got.last_hidden_state.float() - want.last_hidden_state.float())[real].abs().max().item()
    assert diff <= fastpath._CHECK_MAX_DIFF / 4, diff
    assert torch.count_nonzero(got.last_hidden_state[~real]) == 0  # padded positions are zeros
    assert (got.pooler_output.float() - want.pooler_output.float()).abs().max().item() <= 2e-2
    assert (_logits(fast, ids, mask) - _logits(stock, ids, mask)).abs().max().item() <= 2e-2


@needs_onednn
def test_packed_scores_equal_the_padded_fast_path_and_each_sequence_alone(packed_calls):
    model = _served(fast=True)
    lengths = [30, 1, 12, 29]
    ids, mask, packed = _batch_matching_each_sequence_alone(model, lengths)
    assert [c for c in packed_calls if c == lengths] == [lengths]  # alone: no padding, not packed
    model.bert.encoder._prefstream_fast = False  # the layers' padded fast modules only
    padded = _logits(model, ids, mask)
    assert (packed - padded).abs().max().item() <= 1e-2 * packed.abs().max().item()


@needs_onednn
def test_requests_the_packed_encoder_cannot_serve_fall_back(packed_calls):
    stock, fast = _served(fast=False), _served(fast=True)
    packed_calls.clear()
    ids, mask = _batch([30, 12, 5])
    # Per-layer hidden states and attentions: the stock loop (over the padded fast modules), same values.
    want = _hidden(stock, ids, mask, output_hidden_states=True, output_attentions=True)
    got = _hidden(fast, ids, mask, output_hidden_states=True, output_attentions=True)
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for g, w in zip(got.hidden_states, want.hidden_states):
        assert g.shape == w.shape and (g.float() - w.float())[mask.bool()].abs().max().item() <= 5e-2
    assert len(got.attentions) == len(want.attentions)  # none: sdpa returns no weights
    # Gradients: the stock forward, bit for bit.
    with torch.enable_grad():
        assert torch.equal(fast(input_ids=ids, attention_mask=mask).logits,
                           stock(input_ids=ids, attention_mask=mask).logits)
    # No padding: nothing to pack.
    full = torch.ones_like(mask)
    assert (_logits(fast, ids, full) - _logits(stock, ids, full)).abs().max().item() <= 2e-2
    assert packed_calls == []
    # The packed path is still on afterwards.
    _logits(fast, ids, mask)
    assert packed_calls == [[30, 12, 5]]


@needs_onednn
def test_revert_restores_the_stock_encoder():
    stock, fast = _served(fast=False), _served(fast=True)
    revert_cpu_fast_path(fast)
    assert type(fast.bert.encoder) is fastpath.bert.BertEncoder
    assert not any(type(m).__name__.startswith("Fast") or "_prefstream_fast" in m.__dict__ for m in fast.modules())
    ids, mask = _batch([30, 12, 5])
    fast_hidden, stock_hidden = _hidden(fast.bert, ids, mask), _hidden(stock.bert, ids, mask)
    assert torch.equal(fast_hidden.last_hidden_state, stock_hidden.last_hidden_state)


@needs_onednn
def test_the_self_check_runs_the_packed_encoder(monkeypatch, packed_calls):
    model = _served(fast=True)
    assert len(packed_calls) == 1 and len(set(packed_calls[0])) == len(packed_calls[0]) > 2  # very different lengths
    # A packed attention that mixes up sequences (the padded path is untouched) is caught at load.
    attention = fastpath._packed_attention
    monkeypatch.setattr(fastpath, "_packed_attention", lambda a, x, p: attention(a, x.flip(0), p).flip(0))
    model = _served(fast=False)
    assert not apply_cpu_fast_path(model)
    assert type(model.bert.encoder) is fastpath.bert.BertEncoder
