"""TrainerConfig validation and precedence, and the trainer's CLI commands end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, BertConfig

from prefstream.cli import build_parser, main
from services.config import ConfigError
from services.reward_model import RewardModel, RewardModelSpec, default_reward_model_path
from trainer.config import TrainerConfig, load_trainer_config, trainer_config

PAIR = {"messages": [{"role": "user", "content": "question"}, {"role": "assistant", "content": "yes , a helpful answer"}],
        "rejected_message": {"role": "assistant", "content": "no"}}


def test_defaults_validate_and_layers_apply_in_order(tmp_path) -> None:
    trainer_config().validate()
    f = tmp_path / "t.yaml"
    f.write_text("trainer:\n  batch_size: 8\n  lr: 0.001\n  attributes: helpfulness,verbosity\n")
    env = {"PREFSTREAM_TRAINER_BATCH_SIZE": "32", "PREFSTREAM_TRAINER_USE_MARGIN": "true"}
    cfg = load_trainer_config(f, overrides={"batch_size": "4", "lr": None}, env=env)
    assert cfg.optim.batch_size == 4 and cfg.optim.lr == 0.001 and cfg.reward.use_margin is True  # flag > env > file
    assert cfg.model.attributes == ("helpfulness", "verbosity")


@pytest.mark.parametrize("overrides, field", [
    ({"loss": "hinge"}, "loss"),
    ({"schedule": "cosine"}, "schedule"),
    ({"batch_size": 0}, "batch_size"),
    ({"use_gpu": True}, "use_gpu"),
    ({"checkpoint_every_records": 0, "checkpoint_every_s": 0}, "checkpoint_every_s"),
    ({"gate_tolerance": 2}, "gate_tolerance"),
    ({"replay_weight": 0}, "replay_weight"),
    ({"replay_weight": 1.5}, "replay_weight"),
    ({"attributes": "reward"}, "attributes"),
    ({"eval_data": "/nonexistent.jsonl"}, "eval_data"),
    ({"max_tokens_per_forward": 8, "max_length": 64}, "max_tokens_per_forward"),
])
def test_bad_values_name_the_field(overrides, field) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        load_trainer_config(overrides=overrides, env={})


def test_every_field_is_a_flag_of_trainer_run() -> None:
    args = build_parser().parse_args(["trainer", "run", "--num-workers", "2", "--use-gpu", "--replay-ratio", "0.25"])
    from services.config import overrides_from_args

    assert overrides_from_args(args, TrainerConfig) == {"num_workers": "2", "use_gpu": True, "replay_ratio": "0.25"}


def _tiny(tmp_path) -> str:
    tok = AutoTokenizer.from_pretrained(default_reward_model_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    out = tmp_path / "tiny"
    RewardModel.from_config(cfg, tok, RewardModelSpec(base_model="tiny", max_length=64)).save(out)
    return str(out)


def test_train_and_eval_reward_commands(tmp_path, capsys) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(PAIR) + "\n" for _ in range(8)))
    out = tmp_path / "model"
    rc = main(["--log-level", "WARNING", "train", "reward", "--data", str(data), "--out", str(out),
               "--base-model", _tiny(tmp_path), "--max-length", "32", "--batch-size", "4", "--lr", "1e-3",
               "--epochs", "3", "--loss", "pairwise", "--eval-data", str(data), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 6 and summary["records"] == 24 and summary["eval"]["pairs"] == 8
    assert json.loads((out / "prefstream_training.json").read_text())["loss"]["loss"] == "pairwise"

    assert main(["eval", "reward", "--model", str(out), "--data", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 8 and result["accuracy"] == summary["eval"]["accuracy"]
    assert main(["eval", "reward", "--model", str(out), "--data", str(data)]) == 0
    assert capsys.readouterr().out.startswith(f"accuracy {result['accuracy']:.4f}  n 8 pairs")


def test_bad_input_is_reported_with_the_field_not_a_traceback(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    rc = main(["eval", "reward", "--model", str(tmp_path), "--data", str(bad)])
    assert rc == 2
    assert "bad.jsonl:1:messages" in capsys.readouterr().err
    rc = main(["train", "reward", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err
    assert main(["train", "reward", "--data", "x", "--out", "y", "--loss", "hinge"]) == 2
    assert "loss: unknown loss 'hinge'" in capsys.readouterr().err
