"""Policy runtime: batched sampling, seeds, greedy decoding, save/load; one run of the real SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from services.errors import InvalidArgument
from services.policy_model import SPEC_FILE, PolicyModel, PolicySpec, SamplingParams
from services.schemas import ChatMessage


def _tiny_policy() -> PolicyModel:
    words = [f"w{i}" for i in range(40)] + ["User:", "Assistant:", "hello"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return PolicyModel(model, tokenizer, PolicySpec(base_model="tiny-llama", max_prompt_tokens=16))


def test_sampling_is_batched_and_seeded() -> None:
    policy = _tiny_policy()
    prompt = [ChatMessage("user", "hello w1 w2")]
    a = policy.generate(prompt, n=4, temperature=1.0, max_tokens=6, seed=7)
    b = policy.generate(prompt, n=4, temperature=1.0, max_tokens=6, seed=7)
    c = policy.generate(prompt, n=4, temperature=1.0, max_tokens=6, seed=8)
    assert len(a) == 4 and a == b and a != c
    assert len(set(a)) > 1  # a random 43-token model samples different continuations


def test_greedy_at_temperature_zero_repeats_one_answer() -> None:
    policy = _tiny_policy()
    out = policy.generate([("user", "hello")], n=3, temperature=0.0, max_tokens=5)
    assert len(out) == 3 and len(set(out)) == 1 and out[0]


def test_generate_batch_groups_by_prompt_and_truncates_long_prompts() -> None:
    policy = _tiny_policy()
    long_prompt = [("user", " ".join(f"w{i % 40}" for i in range(50)))]
    out = policy.generate_batch([[("user", "hello")], long_prompt], SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=1))
    assert [len(g) for g in out] == [2, 2]
    assert policy.prompts_truncated == 1


def test_sampling_params_name_the_bad_field() -> None:
    for kw, field in [({"n": 0}, "n"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                      ({"max_tokens": 0}, "max_tokens")]:
        with pytest.raises(InvalidArgument, match=field):
            SamplingParams(**kw)
    with pytest.raises(InvalidArgument, match="messages"):
        _tiny_policy().generate([])


def test_save_and_reload_gives_the_same_greedy_output(tmp_path: Path) -> None:
    policy = _tiny_policy()
    expected = policy.generate([("user", "hello w3")], temperature=0.0, max_tokens=5)
    d = policy.save(tmp_path / "policy")
    assert (d / SPEC_FILE).exists() and any(p.suffix == ".safetensors" for p in d.iterdir())
    reloaded = PolicyModel.from_pretrained(d)
    assert reloaded.spec.max_prompt_tokens == 16 and reloaded.spec.base_model == "tiny-llama"
    assert reloaded.generate([("user", "hello w3")], temperature=0.0, max_tokens=5) == expected


@pytest.mark.slow
def test_real_smollm2_gguf_answers_with_its_chat_template() -> None:
    policy = PolicyModel.from_pretrained()
    assert policy.tokenizer.chat_template
    assert "<|im_start|>assistant" in policy.render([ChatMessage("user", "hi")])
    out = policy.generate([ChatMessage("user", "What is the capital of France?")], n=2, temperature=0.0, max_tokens=8)
    assert len(out) == 2 and out[0] == out[1] and "Paris" in out[0]
