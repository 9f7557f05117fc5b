"""The trainable policy: serving's formatting, LoRA vs its disabled reference, saving and resuming.

A tiny random Llama with the real SmolLM2 tokenizer (its chat template and EOS) stands in for the
policy; one slow test converts the real SmolLM2 GGUF.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from services.errors import InvalidArgument
from services.policy_model import PolicyModel, default_policy_path, ensure_plain_checkpoint
from services.schemas import ChatMessage
from trainer.policy_lm import (
    LoraSettings,
    PolicyTrainingSpec,
    RejectedResponses,
    TrainablePolicy,
    predicting,
    sub_batches,
)

PROMPTS = [
    [ChatMessage("user", "What is the capital of France?")],
    [ChatMessage("system", "Be brief."), ChatMessage("user", "Name a colour.")],
    [ChatMessage("user", "hi")],
]
CHOSEN = ["Paris is the capital of France.", "Blue.", "Hello! How can I help you today?"]
REJECTED = ["I do not know.", "A colour is a property of light that we see in many ways.", "Go away."]


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SmolLM2 tokenizer, read from the embedded GGUF once per session and saved as a plain folder."""
    gguf = Path(default_policy_path())
    d = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_base(smollm_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama over the SmolLM2 vocabulary, saved with the tokenizer as a plain HF folder."""
    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _dpo_step(policy: TrainablePolicy, optimizer: torch.optim.Optimizer, ref_chosen: torch.Tensor,
              ref_rejected: torch.Tensor, beta: float = 0.5) -> float:
    chosen = policy.logps(policy.encode(PROMPTS, CHOSEN))  # (B,)
    rejected = policy.logps(policy.encode(PROMPTS, REJECTED))  # (B,)
    loss = -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _trained(tiny_base: Path, steps: int = 1, **kw: object) -> tuple[TrainablePolicy, list[float]]:
    policy = TrainablePolicy.from_base(tiny_base, max_length=128, **kw)  # type: ignore[arg-type]
    policy.module.train()
    ref_c = policy.reference_logps(policy.encode(PROMPTS, CHOSEN))
    ref_r = policy.reference_logps(policy.encode(PROMPTS, REJECTED))
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    losses = [_dpo_step(policy, opt, ref_c, ref_r) for _ in range(steps)]
    return policy, losses


def test_a_fresh_adapter_scores_exactly_like_the_reference(tiny_base: Path) -> None:
    policy = TrainablePolicy.from_base(tiny_base, max_length=128)
    policy.module.train()  # adapter dropout on: B = 0 still adds exactly nothing
    batch = policy.encode(PROMPTS, CHOSEN)
    logps, ref = policy.logps(batch), policy.reference_logps(batch)
    assert logps.shape == (3,) and torch.equal(logps.detach(), ref)
    assert logps.requires_grad and not ref.requires_grad
    assert policy.token_kl(PROMPTS, CHOSEN) == pytest.approx(0.0, abs=1e-7)


def test_a_dpo_step_moves_only_the_adapter_and_the_loss_falls(tiny_base: Path) -> None:
    policy = TrainablePolicy.from_base(tiny_base, max_length=128)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ref_c = policy.reference_logps(policy.encode(PROMPTS, CHOSEN))
    ref_r = policy.reference_logps(policy.encode(PROMPTS, REJECTED))
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    losses = [_dpo_step(policy, opt, ref_c, ref_r) for _ in range(4)]
    assert losses[-1] < losses[0]
    changed = {n for n, p in policy.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable
    batch = policy.encode(PROMPTS, CHOSEN)
    assert not torch.allclose(policy.logps(batch).detach(), policy.reference_logps(batch))
    assert torch.equal(policy.reference_logps(batch), ref_c)  # the reference is still the base
    assert policy.token_kl(PROMPTS, CHOSEN) > 0


def test_the_kl_reads_the_reply_positions_alone_and_equals_the_full_logits_kl(tiny_base: Path, monkeypatch) -> None:
    """token_kl projects to the vocabulary only where a reply token is predicted (logits_to_keep); an
    architecture without it gets the full logits, masked, and the same number."""
    from trainer import policy_lm
    from trainer.dpo_losses import mean_token_kl

    policy = TrainablePolicy.from_base(tiny_base, max_length=128)
    torch.manual_seed(0)
    for name, p in policy.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    batch = policy.encode(PROMPTS, CHOSEN)
    policy.model.eval()  # token_kl reads in eval mode: no adapter dropout
    with torch.no_grad():
        full = policy.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        with policy.model.disable_adapter():
            ref = policy.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    expected = float(mean_token_kl(full, ref, batch.response_mask[:, 1:]))
    assert expected > 0 and policy.token_kl(PROMPTS, CHOSEN) == pytest.approx(expected, rel=1e-5)
    monkeypatch.setattr(policy_lm, "packed_logits", lambda *a: None)  # no logits_to_keep
    assert policy.token_kl(PROMPTS, CHOSEN) == pytest.approx(expected, rel=1e-5)


def test_the_response_mask_covers_exactly_the_assistant_turn(tiny_base: Path) -> None:
    policy = TrainablePolicy.from_base(tiny_base, max_length=128)
    tok = policy.tokenizer
    batch = policy.encode(PROMPTS, CHOSEN)
    serving = PolicyModel.from_pretrained(tiny_base)
    for i, (prompt, response) in enumerate(zip(PROMPTS, CHOSEN)):
        n = int(batch.attention_mask[i].sum())
        ids = batch.input_ids[i, :n]
        mask = batch.response_mask[i]
        assert not mask[n:].any()
        start = int(mask.nonzero()[0])
        assert mask[start:n].all()  # one contiguous span to the end of the row
        # The prompt part is exactly what the scorer feeds its policy.
        assert ids[:start].tolist() == serving._encode([prompt])["input_ids"][0].tolist()
        assert tok.decode(ids[start:]) == response + tok.eos_token
    assert batch.prompt_truncated == 0
    assert batch.response_tokens.tolist() == [len(tok(r + tok.eos_token)["input_ids"]) for r in CHOSEN]


def test_a_reply_that_goes_on_is_read_without_its_end_of_turn(tiny_base: Path) -> None:
    policy = TrainablePolicy.from_base(tiny_base, max_length=128)
    tok = policy.tokenizer
    ended, going = policy.encode(PROMPTS, CHOSEN), policy.encode(PROMPTS, CHOSEN, [False] * len(CHOSEN))
    for i, response in enumerate(CHOSEN):
        assert tok.decode(going.input_ids[i][going.response_mask[i]]) == response  # no EOS
        n = int(going.attention_mask[i].sum())
        assert going.input_ids[i, :n].tolist() == ended.input_ids[i, :n].tolist()  # the same tokens up to it
    assert (ended.response_tokens - going.response_tokens).tolist() == [1] * len(CHOSEN)
    # log p(reply, end) = log p(reply going on) + log p(end | reply): the pair differs by the stop alone
    ended_sums, stops = policy.reference_read(ended, stops=True)
    last = ended.attention_mask.sum(1) - 2  # the position that predicts the EOS, the row's last token
    stop_at_end = stops[torch.arange(len(CHOSEN)), last]
    torch.testing.assert_close(ended_sums, policy.reference_logps(going) + stop_at_end, atol=1e-4, rtol=1e-5)
    mixed = policy.encode(PROMPTS, CHOSEN, [True, False, True])
    assert (ended.response_tokens - mixed.response_tokens).tolist() == [0, 1, 0]
    with pytest.raises(InvalidArgument, match="ends"):
        policy.encode(PROMPTS, CHOSEN, [True])


def test_without_a_chat_template_the_reply_follows_the_assistant_cue(tiny_base: Path) -> None:
    policy = TrainablePolicy.from_base(tiny_base, max_length=128)
    policy.tokenizer.chat_template = None
    batch = policy.encode(PROMPTS[1:2], CHOSEN[1:2])
    ids, mask = batch.input_ids[0], batch.response_mask[0]
    serving = PolicyModel(policy.model, policy.tokenizer, policy._serving.spec)
    assert ids[~mask].tolist() == serving._encode(PROMPTS[1:2])["input_ids"][0].tolist()
    assert policy.tokenizer.decode(ids[~mask]) == "System: Be brief.\n\nUser: Name a colour.\n\nAssistant:"
    assert policy.tokenizer.decode(ids[mask]) == " Blue." + policy.tokenizer.eos_token
    with pytest.raises(InvalidArgument, match="prompts"):
        policy.encode([], [])


def test_long_prompts_lose_their_oldest_tokens_and_keep_the_response(tiny_base: Path) -> None:
    policy = TrainablePolicy.from_base(tiny_base, max_length=40)
    long_prompt = [ChatMessage("user", "word " * 200 + "final question?")]
    batch = policy.encode([long_prompt], ["Short answer."])
    assert batch.input_ids.shape == (1, 40) and batch.prompt_truncated == 1
    text = policy.tokenizer.decode(batch.input_ids[0])
    assert text.endswith("final question?<|im_end|>\n<|im_start|>assistant\nShort answer.<|im_end|>")


def test_untrainable_responses_are_refused_row_by_row(tiny_base: Path) -> None:
    policy = TrainablePolicy.from_base(tiny_base, max_length=16, max_response_tokens=30)
    responses = ["fine", "", "word " * 40]
    reasons = policy.rejections(PROMPTS, responses)
    assert sorted(reasons) == [1, 2] and "empty" in reasons[1] and "max_response_tokens=30" in reasons[2]
    with pytest.raises(RejectedResponses) as err:
        policy.encode(PROMPTS, responses)
    assert err.value.field == "responses" and err.value.reasons == reasons
    assert isinstance(err.value, InvalidArgument)
    with pytest.raises(InvalidArgument, match="responses"):
        policy.encode(PROMPTS, ["one"])


def test_a_response_over_max_length_keeps_its_beginning_and_some_prompt(tiny_base: Path) -> None:
    policy = TrainablePolicy.from_base(tiny_base, max_length=40)
    batch = policy.encode([PROMPTS[0]], ["word " * 60])
    assert int(batch.response_mask.sum()) == policy.response_room == 30  # 40 less a quarter for the prompt
    assert int(batch.attention_mask.sum()) == 40
    assert policy.tokenizer.decode(batch.input_ids[0][batch.response_mask[0]]).startswith("word word")


def test_a_lora_target_the_model_lacks_is_refused_naming_the_field(tiny_base: Path) -> None:
    with pytest.raises(InvalidArgument) as err:
        TrainablePolicy.from_base(tiny_base, lora=LoraSettings(target_modules=("q_proj", "c_attn")))
    assert err.value.field == "lora_target_modules"
    assert "c_attn" in err.value.message and "gate_proj" in err.value.message
    with pytest.raises(InvalidArgument, match="lora_rank"):
        LoraSettings(rank=0)


def test_sub_batches_give_the_same_logps_as_one_forward(tiny_base: Path) -> None:
    assert sub_batches([3, 9, 5, 9], 18) == [[1, 3], [2, 0]]
    assert sub_batches([50, 2], 10) == [[0], [1]]  # a row over the bound runs alone
    whole = TrainablePolicy.from_base(tiny_base, max_length=64, max_tokens_per_forward=4096)
    split = TrainablePolicy.from_base(tiny_base, max_length=64, max_tokens_per_forward=64)
    batch = whole.encode(PROMPTS, REJECTED)
    torch.testing.assert_close(whole.logps(batch), split.logps(batch), atol=1e-5, rtol=1e-5)
    with pytest.raises(InvalidArgument, match="max_tokens_per_forward"):
        PolicyTrainingSpec(base_model=str(tiny_base), max_length=128, max_tokens_per_forward=64)


def test_the_forward_reads_the_stop_token_at_every_reply_position_when_asked(tiny_base: Path) -> None:
    """With a stop token the training forward also returns log P(EOS) where each reply token is predicted
    (the full logits' column there, 0 elsewhere), across sub-batches, and its sums are unchanged."""
    policy = TrainablePolicy.from_base(tiny_base, max_length=64, max_tokens_per_forward=64)
    batch = policy.encode(PROMPTS, REJECTED)
    plain = policy.module(batch.input_ids, batch.attention_mask, batch.response_mask)
    assert plain[2] is None
    policy.read_stops(True)
    sums, _, stops = policy.module(batch.input_ids, batch.attention_mask, batch.response_mask)
    torch.testing.assert_close(sums, plain[0])
    keep = predicting(batch.response_mask)
    with torch.no_grad():
        full = torch.log_softmax(policy.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                                 .logits.float(), dim=-1)[..., policy.stop_token]  # (B, T)
    torch.testing.assert_close(stops[keep], full[keep], atol=1e-5, rtol=1e-5)
    assert torch.all(stops[~keep] == 0) and stops.requires_grad
    # A fresh adapter reads the reference's stops.
    ref_sums, ref_stops = policy.reference_read(batch, stops=True)
    torch.testing.assert_close(ref_stops, stops.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ref_sums, policy.reference_logps(batch))
    policy.read_stops(False)
    assert policy.module(batch.input_ids, batch.attention_mask, batch.response_mask)[2] is None


def test_save_merged_is_a_plain_causal_lm_with_the_live_logits(tiny_base: Path, tmp_path: Path) -> None:
    from transformers import pipeline

    policy, _ = _trained(tiny_base)
    policy.module.eval()
    batch = policy.encode(PROMPTS, CHOSEN)
    with torch.no_grad():
        live = policy.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    d = policy.save_merged(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(d).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        out = merged(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(out, live, atol=1e-4, rtol=1e-4)
    # The live model keeps its adapter and goes on training.
    assert any("lora_" in n for n, _ in policy.model.named_parameters()) and policy.trainable_parameters()
    gen = pipeline("text-generation", model=str(d))
    assert isinstance(gen("Hello", max_new_tokens=3, do_sample=False)[0]["generated_text"], str)
    assert PolicyModel.from_pretrained(d).spec.max_prompt_tokens == policy.spec.max_prompt_tokens


def test_save_adapter_and_from_checkpoint_resume_the_same_policy(tiny_base: Path, tmp_path: Path) -> None:
    policy, _ = _trained(tiny_base)
    policy.module.eval()
    batch = policy.encode(PROMPTS, CHOSEN)
    expected = policy.logps(batch).detach()
    d = policy.save_adapter(tmp_path / "adapter")
    assert (d / "adapter_model.safetensors").exists() and not (d / "model.safetensors").exists()
    resumed = TrainablePolicy.from_checkpoint(d)
    resumed.module.eval()
    assert resumed.spec == policy.spec
    torch.testing.assert_close(resumed.logps(batch).detach(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(resumed.reference_logps(batch), policy.reference_logps(batch))
    assert resumed.trainable_parameters() and all(p.requires_grad for p in resumed.trainable_parameters())


def test_full_fine_tuning_keeps_a_frozen_reference_and_resumes_from_its_merged_folder(
        tiny_base: Path, tmp_path: Path) -> None:
    policy, losses = _trained(tiny_base, steps=2, lora=None)
    assert losses[-1] < losses[0]
    batch = policy.encode(PROMPTS, CHOSEN)
    base = TrainablePolicy.from_base(tiny_base, max_length=128)
    torch.testing.assert_close(policy.reference_logps(batch), base.reference_logps(batch))
    assert not torch.allclose(policy.logps(batch).detach(), policy.reference_logps(batch))
    with pytest.raises(InvalidArgument, match="lora"):
        policy.save_adapter(tmp_path / "nope")
    resumed = TrainablePolicy.from_checkpoint(policy.save_merged(tmp_path / "full"))
    policy.module.eval()
    resumed.module.eval()
    torch.testing.assert_close(resumed.logps(batch).detach(), policy.logps(batch).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(resumed.reference_logps(batch), base.reference_logps(batch))


def test_generate_answers_every_prompt_greedily_and_reproducibly(tiny_base: Path) -> None:
    policy = TrainablePolicy.from_base(tiny_base, max_length=128)
    policy.module.train()
    a = policy.generate(PROMPTS, max_new_tokens=4)
    assert len(a) == 3 and a == policy.generate(PROMPTS, max_new_tokens=4)
    s = policy.generate(PROMPTS, max_new_tokens=4, seed=3, temperature=1.0)
    assert s == policy.generate(PROMPTS, max_new_tokens=4, seed=3, temperature=1.0)
    assert policy.module.training  # generation ran in eval mode and restored the mode


@pytest.mark.parametrize("lora", [LoraSettings(rank=4, alpha=8.0), None], ids=["lora", "full"])
def test_generate_from_the_reference_answers_as_the_base_does_after_training(tiny_base: Path, lora) -> None:
    torch.manual_seed(0)  # the adapter's start: a few steps move six sampled tokens from some starts only
    policy, _ = _trained(tiny_base, steps=3, lora=lora)
    sampled = dict(max_new_tokens=6, seed=3, temperature=1.0)  # the tiny random model's greedy replies are empty
    base = TrainablePolicy.from_base(tiny_base, max_length=128).generate(PROMPTS, **sampled)
    assert any(base) and policy.generate(PROMPTS, reference=True, **sampled) == base
    assert policy.generate(PROMPTS, **sampled) != base  # the live policy moved
    assert policy.module.training


def test_an_hf_folder_is_used_as_it_is(tiny_base: Path, tmp_path: Path) -> None:
    assert ensure_plain_checkpoint(tiny_base, cache_dir=tmp_path) == tiny_base
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_smollm2_gguf_converts_once_to_a_plain_folder(tmp_path: Path) -> None:
    d = ensure_plain_checkpoint(cache_dir=tmp_path)
    assert d.parent == tmp_path and [p.name for p in tmp_path.iterdir()] == [d.name]  # no temp folder left
    weights = d / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    model = AutoModelForCausalLM.from_pretrained(d)
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    assert AutoTokenizer.from_pretrained(d).chat_template
    assert ensure_plain_checkpoint(cache_dir=tmp_path) == d and weights.stat().st_mtime_ns == stamp
    policy = TrainablePolicy.from_base(d, max_length=64)  # peft accepts it
    assert policy.trainable_parameters()
