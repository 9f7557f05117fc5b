"""The trainer's step works for every backbone family services.reward_model supports.

Decoder-only (Llama: last-token pooling) and T5 (encoder-decoder classification head) models, tiny and
built from configs with word-level tokenizers, train through the same Learner as the MiniLM default.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, PreTrainedTokenizerFast, T5Config

from services.reward_model import RewardModel, RewardModelSpec
from services.schemas import ChatMessage, PreferenceRecord
from trainer.config import TrainerConfig, trainer_config
from trainer.learner import Learner

WORDS = ["User:", "Assistant:", "question", "yes", "good", "answer", "no", "bad", "maybe", "okay"]


def word_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    special = {"llama": ["<unk>", "<s>", "</s>"], "t5": ["<pad>", "</s>", "<unk>"]}[kind]
    vocab = {t: i for i, t in enumerate(special + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       model_input_names=["input_ids", "attention_mask"])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])


def tiny(kind: str) -> RewardModel:
    tok = word_tokenizer(kind)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                          bos_token_id=1, eos_token_id=2)
    else:
        cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=1,
                       num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return RewardModel.from_config(cfg, tok, RewardModelSpec(base_model=kind, max_length=32))


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_engine_trains_decoder_and_t5_backbones(kind: str, tmp_path) -> None:
    model = tiny(kind)
    cfg = trainer_config(base_model=str(tmp_path), max_length=32, lr=3e-3, warmup_steps=0, batch_size=4)
    learner = Learner.of(model, cfg)
    before = [p.detach().clone() for p in model.hf_model.parameters()]
    records = [PreferenceRecord(record_id=f"{kind}{i}", prompt=(ChatMessage("user", "question " * (i + 1)),),
                                ranked_responses=("yes good answer", "maybe okay", "no bad"))
               for i in range(4)]  # K=3 rankings, prompts of different lengths
    losses = [learner.train(records).loss for _ in range(12)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.hf_model.parameters()))
    out = model.save(tmp_path / kind)
    reloaded = RewardModel.from_pretrained(out)
    assert reloaded.family == ("decoder" if kind == "llama" else "seq2seq")
