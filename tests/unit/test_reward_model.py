"""Reward-model runtime: input formatting, truncation, the three backbone families, save/load, pipeline.

Tiny randomly initialised models (built from configs, a few KB) cover the families; one test loads the
real embedded MiniLM with a short max_length.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (AutoModelForSequenceClassification, BertConfig, LlamaConfig, PreTrainedTokenizerFast,
                          T5Config, pipeline)

from services.errors import InvalidArgument
from services.reward_model import (ATTRIBUTES, SPEC_FILE, RewardModel, RewardModelSpec, TruncationStats,
                                   default_policy_model, default_reward_model_path, encode_pairs, format_prompt,
                                   length_sorted_batches, lengths, model_family, prepare_tokenizer,
                                   resolve_model_path)
from services.schemas import ChatMessage

WORDS = [f"w{i}" for i in range(60)] + ["User:", "Assistant:", "System:", "hello", "world", "p", "r", "q"]


def _word_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: one token per word, so lengths in tests are exact."""
    special = {"bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "llama": ["<unk>", "<s>", "</s>"],
               "t5": ["<pad>", "</s>", "<unk>"]}[kind]
    vocab = {t: i for i, t in enumerate(special + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special[1] if kind == "bert" else "<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]",
                                       model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       model_input_names=["input_ids", "attention_mask"])
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_input_names=["input_ids", "attention_mask"])


def _tiny(kind: str, attributes: tuple[str, ...] = (), max_length: int = 32) -> RewardModel:
    tok = _word_tokenizer(kind)
    vocab = len(tok)
    if kind == "bert":
        cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)
    elif kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    else:
        cfg = T5Config(vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=1,
                       num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    spec = RewardModelSpec(base_model=f"tiny-{kind}", max_length=max_length, attributes=attributes)
    return RewardModel.from_config(cfg, tok, spec).eval()


def _words(prefix: str, n: int) -> str:
    return " ".join(f"w{(i % 60)}" if prefix == "w" else prefix for i in range(n))


# ---------------------------------------------------------------------------------------------
# Formatting and truncation.


def test_format_prompt_accepts_every_message_shape() -> None:
    expected = "System: be brief\n\nUser: hi\n\nAssistant: hello"
    assert format_prompt([ChatMessage("system", "be brief"), ChatMessage("user", "hi "), ChatMessage("assistant", "hello")]) == expected
    assert format_prompt([{"role": "system", "content": "be brief"}, ("user", "hi"), ("assistant", "hello")]) == expected


def test_encoder_gets_a_sentence_pair() -> None:
    tok = prepare_tokenizer(_word_tokenizer("bert"), "encoder")
    batch = encode_pairs(tok, [[("user", "hello")]], ["world"], 32, family="encoder")
    assert tok.convert_ids_to_tokens(batch["input_ids"][0].tolist()) == ["[CLS]", "User:", "hello", "[SEP]", "world", "[SEP]"]
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1]
    assert batch.truncated == 0


def test_decoder_gets_one_sequence_ending_with_eos() -> None:
    tok = prepare_tokenizer(_word_tokenizer("llama"), "decoder")
    assert tok.pad_token == tok.eos_token  # a decoder without pad token pads with EOS, as HF expects
    batch = encode_pairs(tok, [[("user", "hello")]], ["world"], 32, family="decoder")
    assert tok.convert_ids_to_tokens(batch["input_ids"][0].tolist()) == ["<s>", "User:", "hello", "Assistant:", "world", "</s>"]
    assert "token_type_ids" not in batch


def test_seq2seq_rows_always_hold_two_eos_even_with_literal_eos_in_text() -> None:
    tok = prepare_tokenizer(_word_tokenizer("t5"), "seq2seq")
    batch = encode_pairs(tok, [[("user", "hello </s> p")], [("user", "q")]], ["world </s>", "r"], 32, family="seq2seq")
    eos = tok.eos_token_id
    assert (batch["input_ids"] == eos).sum(dim=1).tolist() == [2, 2]


def test_truncation_cuts_prompt_from_the_left_and_keeps_the_response() -> None:
    tok = prepare_tokenizer(_word_tokenizer("bert"), "encoder")
    prompt = [("user", _words("w", 10)), ("assistant", "p"), ("user", "q")]  # 15 tokens rendered
    stats = TruncationStats()
    batch = encode_pairs(tok, [prompt], ["r r r"], 12, family="encoder", stats=stats)
    toks = tok.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert len(toks) == 12
    # 12 - 3 specials - 3 response tokens = 6 prompt tokens, the newest ones.
    assert toks == ["[CLS]", "w8", "w9", "Assistant:", "p", "User:", "q", "[SEP]", "r", "r", "r", "[SEP]"]
    assert (batch.truncated, batch.prompt_truncated, batch.response_truncated) == (1, 1, 0)
    assert (stats.rows, stats.truncated, stats.prompt_truncated, stats.response_truncated) == (1, 1, 1, 0)


def test_response_is_cut_from_the_right_only_when_it_alone_is_too_long() -> None:
    tok = prepare_tokenizer(_word_tokenizer("bert"), "encoder")
    batch = encode_pairs(tok, [[("user", "q")]], [_words("w", 20)], 12, family="encoder")
    toks = tok.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert toks == ["[CLS]", "[SEP]"] + [f"w{i}" for i in range(9)] + ["[SEP]"]
    assert (batch.prompt_truncated, batch.response_truncated) == (1, 1)


def test_decoder_truncation_keeps_assistant_cue_and_eos() -> None:
    tok = prepare_tokenizer(_word_tokenizer("llama"), "decoder")
    batch = encode_pairs(tok, [[("user", _words("w", 30))]], ["r r"], 10, family="decoder")
    toks = tok.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    # 10 - BOS - EOS - 3 response tokens = 5 prompt tokens, the newest ones.
    assert toks == ["<s>", "w25", "w26", "w27", "w28", "w29", "Assistant:", "r", "r", "</s>"]


def test_pads_to_the_longest_row_not_max_length() -> None:
    tok = prepare_tokenizer(_word_tokenizer("bert"), "encoder")
    batch = encode_pairs(tok, [[("user", "q")], [("user", "q q q")]], ["r", "r"], 200, family="encoder")
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist() == [[1] * 6 + [0, 0], [1] * 8]
    assert batch["input_ids"][0, 6:].tolist() == [tok.pad_token_id] * 2
    assert lengths(tok, [[("user", "q")], [("user", "q q q")]], ["r", "r"], 200, family="encoder") == [6, 8]


def test_length_sorted_batches_groups_similar_lengths() -> None:
    assert length_sorted_batches([3, 9, 1, 8, 2], 2) == [[1, 3], [0, 4], [2]]
    with pytest.raises(InvalidArgument, match="batch_size"):
        length_sorted_batches([1], 0)


def test_mismatched_prompt_and_response_counts_are_rejected() -> None:
    tok = prepare_tokenizer(_word_tokenizer("bert"), "encoder")
    with pytest.raises(InvalidArgument, match="responses"):
        encode_pairs(tok, [[("user", "q")]], ["a", "b"], 32, family="encoder")


def test_spec_validation_names_the_field() -> None:
    with pytest.raises(InvalidArgument, match="max_length"):
        RewardModelSpec(base_model="x", max_length=4)
    with pytest.raises(InvalidArgument, match="dtype"):
        RewardModelSpec(base_model="x", dtype="float8")
    with pytest.raises(InvalidArgument, match="attributes"):
        RewardModelSpec(base_model="x", attributes=("helpfulness", "helpfulness"))
    with pytest.raises(InvalidArgument, match="base_model"):
        RewardModel.from_pretrained("/nonexistent/model")


# ---------------------------------------------------------------------------------------------
# Families, heads, save/load.


@pytest.mark.parametrize("kind,family", [("bert", "encoder"), ("llama", "decoder"), ("t5", "seq2seq")])
def test_each_family_scores_with_attribute_head(kind: str, family: str, tmp_path: Path) -> None:
    model = _tiny(kind, attributes=ATTRIBUTES)
    assert model.family == family == model_family(model.hf_model.config)
    prompts = [[("user", "hello")], [("user", _words("w", 40))], [("user", "q"), ("assistant", "p"), ("user", "q")]]
    responses = ["world", "r r r", _words("w", 5)]
    out = model(model.encode(prompts, responses))
    assert out.rewards.shape == (3,) and out.attributes is not None and out.attributes.shape == (3, len(ATTRIBUTES))
    assert model.truncation.prompt_truncated == 1

    scores = model.score(prompts, responses, batch_size=2)
    # Length-sorted batching must return rows in input order with the same values as one full batch.
    assert [s.reward for s in scores] == pytest.approx(out.rewards.tolist(), abs=1e-5)
    assert list(scores[0].attributes) == list(ATTRIBUTES)

    model.save(tmp_path / "ckpt")
    reloaded = RewardModel.from_pretrained(tmp_path / "ckpt")
    assert reloaded.spec.attributes == ATTRIBUTES and reloaded.spec.max_length == 32
    assert reloaded.family == family
    assert [s.reward for s in reloaded.score(prompts, responses)] == pytest.approx([s.reward for s in scores], abs=1e-5)


def test_decoder_pools_the_last_real_token_regardless_of_padding() -> None:
    model = _tiny("llama")
    alone = model(model.encode([[("user", "hello")]], ["world"])).rewards
    padded = model(model.encode([[("user", "hello")], [("user", _words("w", 20))]], ["world", "r"])).rewards
    assert padded[0].item() == pytest.approx(alone[0].item(), abs=1e-5)


def test_scalar_head_has_no_attributes_and_one_label() -> None:
    model = _tiny("bert")
    assert model.hf_model.config.num_labels == 1 and model.hf_model.config.id2label == {0: "reward"}
    out = model(model.encode([[("user", "q")]], ["r"]))
    assert out.attributes is None and out.rewards.shape == (1,)
    assert model.score([[("user", "q")]], ["r"])[0].attributes == {}


def test_checkpoint_loads_with_plain_auto_class_and_pipeline(tmp_path: Path) -> None:
    model = _tiny("bert", attributes=("helpfulness", "verbosity"))
    d = model.save(tmp_path / "rm")
    assert json.loads((d / SPEC_FILE).read_text())["spec"]["attributes"] == ["helpfulness", "verbosity"]
    assert any(p.suffix == ".safetensors" for p in d.iterdir())

    plain = AutoModelForSequenceClassification.from_pretrained(d)
    assert plain.config.id2label == {0: "reward", 1: "helpfulness", 2: "verbosity"}

    ours = model.score([[("user", "hello")]], ["world"])[0]
    pipe = pipeline("text-classification", model=str(d), function_to_apply="none", top_k=None)
    got = {r["label"]: r["score"] for r in pipe({"text": "User: hello", "text_pair": "world"})}
    assert got["reward"] == pytest.approx(ours.reward, abs=1e-4)
    assert got["verbosity"] == pytest.approx(ours.attributes["verbosity"], abs=1e-4)


def test_changing_attributes_of_a_checkpoint_gives_a_fresh_head(tmp_path: Path) -> None:
    d = _tiny("bert").save(tmp_path / "scalar")
    model = RewardModel.from_pretrained(d, attributes=("helpfulness",))
    assert model.spec.attributes == ("helpfulness",) and model.hf_model.config.num_labels == 2
    assert model.hf_model.config.id2label == {0: "reward", 1: "helpfulness"}


# ---------------------------------------------------------------------------------------------
# Embedded defaults.


def test_default_model_paths_point_at_the_embedded_models() -> None:
    assert (Path(default_reward_model_path()) / "config.json").exists()
    folder, gguf = default_policy_model()
    assert gguf.endswith(".gguf") and (Path(folder) / gguf).exists()
    assert resolve_model_path(Path(folder) / gguf) == (folder, gguf)
    assert resolve_model_path(f"file://{default_reward_model_path()}") == (default_reward_model_path(), None)


def test_real_minilm_scores_with_a_fresh_attribute_head(tmp_path: Path) -> None:
    model = RewardModel.from_pretrained(max_length=48, attributes=ATTRIBUTES)
    assert model.family == "encoder" and model.spec.base_model == default_reward_model_path()
    prompts = [[ChatMessage("user", "How do I boil an egg?")], [ChatMessage("user", "long " * 100)]]
    batch = model.encode(prompts, ["Put it in boiling water for nine minutes.", "ok"])
    assert batch["input_ids"].shape[1] == 48 and batch.prompt_truncated == 1
    scores = model.score(prompts, ["Put it in boiling water for nine minutes.", "ok"], batch_size=2)
    assert len(scores) == 2 and all(torch.isfinite(torch.tensor(s.reward)) for s in scores)
    assert set(scores[0].attributes) == set(ATTRIBUTES)


def test_decoder_and_t5_checkpoints_run_in_a_pipeline(tmp_path: Path) -> None:
    llama = _tiny("llama", attributes=("helpfulness",))
    d = llama.save(tmp_path / "llama")
    pipe = pipeline("text-classification", model=str(d), function_to_apply="none", top_k=None)
    # HF pools the last non-pad token; with pad == eos that is the last response token, so the plain
    # rendered text scores exactly as prefstream's encoding does.
    got = {r["label"]: r["score"] for r in pipe(["User: hello\n\nAssistant: world"])[0]}
    assert got["reward"] == pytest.approx(llama.score([[("user", "hello")]], ["world"])[0].reward, abs=1e-4)

    d5 = _tiny("t5").save(tmp_path / "t5")
    out = pipeline("text-classification", model=str(d5), function_to_apply="none", top_k=None)(["User: hello"])[0]
    assert [r["label"] for r in out] == ["reward"]
