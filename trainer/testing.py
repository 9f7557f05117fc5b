"""Helpers for tests and benchmarks that need a reward model which trains in milliseconds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


def tiny_reward_model(folder: str | os.PathLike, attributes: Sequence[str] = (), max_length: int = 64) -> str:
    """Save a 2-layer, 32-wide BERT reward model (random weights, seed 0) with the embedded MiniLM
    tokenizer into ``folder``; returns its path.  For the loop's mechanics, not for accuracy."""
    import torch
    from transformers import AutoTokenizer, BertConfig

    from services.reward_model import RewardModel, RewardModelSpec, default_reward_model_path

    tok = AutoTokenizer.from_pretrained(default_reward_model_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = RewardModel.from_config(cfg, tok, RewardModelSpec(base_model="tiny", max_length=max_length,
                                                                  attributes=tuple(attributes)))
    model.save(Path(folder))
    return str(folder)
