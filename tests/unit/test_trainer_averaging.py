"""Weight averaging: the EMA rule by hand, the swap in and out, and checkpoints that keep both weights."""

from __future__ import annotations

import pytest
import torch

from services.checkpoints import CheckpointStore
from services.reward_model import RewardModel
from trainer.averaging import WeightAverage, ema_decay_at
from trainer.checkpointing import LIVE_WEIGHTS_FILE, find_resume_point
from trainer.learner import Learner
from trainer.runtime import build_learner
from trainer.stream import ListSource

from tests.unit.test_trainer_learner import _loop, config, make_records, tiny_model


def test_decay_warms_up_then_caps() -> None:
    assert ema_decay_at(0, 0.99) == pytest.approx(1 / 10)
    assert ema_decay_at(90, 0.99) == pytest.approx(91 / 100)
    assert ema_decay_at(10_000, 0.99) == 0.99
    assert ema_decay_at(10_000, 0.5) == 0.5
    with pytest.raises(ValueError):
        ema_decay_at(-1, 0.99)


def test_update_matches_hand_computed_values() -> None:
    p = torch.nn.Parameter(torch.tensor([0.0, 10.0]))
    avg = WeightAverage([p], decay=0.99)
    with torch.no_grad():
        p.copy_(torch.tensor([1.0, 0.0]))
    avg.update(0)  # decay 0.1: shadow = 0.1 * [0, 10] + 0.9 * [1, 0]
    assert torch.allclose(avg.shadow[0], torch.tensor([0.9, 1.0]))
    with torch.no_grad():
        p.copy_(torch.tensor([2.0, 2.0]))
    avg.update(1)  # decay 2/11
    assert torch.allclose(avg.shadow[0], torch.tensor([0.9 * 2 / 11 + 2 * 9 / 11, 1.0 * 2 / 11 + 2 * 9 / 11]))


def test_parameters_that_do_not_train_are_not_averaged() -> None:
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    live = torch.nn.Parameter(torch.zeros(2))
    assert WeightAverage([frozen, live], 0.9).params == [live]
    with pytest.raises(ValueError):
        WeightAverage([live], 1.0)


def test_swapped_in_restores_the_live_weights_even_after_an_error() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0]))
    avg = WeightAverage([p], 0.9)
    with torch.no_grad():
        p.fill_(5.0)
    with pytest.raises(RuntimeError), avg.swapped_in():
        assert p.item() == 1.0
        raise RuntimeError("evaluation failed")
    assert p.item() == 5.0


def test_engine_serves_the_average_and_trains_the_live_weights(tmp_path) -> None:
    cfg = config(tmp_path, tiny_model(tmp_path), ema_decay=0.9)
    learner = Learner.of(RewardModel.from_pretrained(cfg.model.base_model), cfg)
    for _ in range(5):
        learner.train(make_records(4, k=3))
    params = list(learner.model.hf_model.parameters())
    live = [p.detach().clone() for p in params]
    with learner.serving_weights():
        served = [p.detach().clone() for p in params]
    assert all(torch.equal(a, s) for a, s in zip(served, learner.average.shadow))
    assert not all(torch.equal(a, b) for a, b in zip(served, live))
    assert all(torch.equal(a, b) for a, b in zip(params, live))  # back to the live weights

    off = Learner.of(RewardModel.from_pretrained(cfg.model.base_model), config(tmp_path, cfg.model.base_model, ema_decay=0.0))
    assert off.average is None and off.live_state() is None
    with off.serving_weights():
        pass


def test_checkpoint_holds_the_average_and_an_exact_resume_gets_the_live_weights_back(tmp_path) -> None:
    cfg = config(tmp_path, tiny_model(tmp_path), ema_decay=0.9, save_optimizer_state=True, max_records=8)
    loop = _loop(cfg, ListSource(make_records(8, k=3)))
    loop.run()
    params = list(loop.learner.model.hf_model.parameters())
    live = [p.detach().clone() for p in params]
    average = [s.clone() for s in loop.learner.average.shadow]

    point = find_resume_point(cfg, CheckpointStore(cfg.checkpoint.checkpoint_url))
    assert point.live_weights_path.endswith(LIVE_WEIGHTS_FILE)
    folder = RewardModel.from_pretrained(point.model_path)  # what the scorer loads: the average
    assert all(torch.allclose(a, b) for a, b in zip(folder.hf_model.parameters(), average))

    resumed = build_learner(cfg, point)
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.hf_model.parameters(), live))
    assert all(torch.equal(a, b) for a, b in zip(resumed.average.shadow, average))

    lean = config(tmp_path, cfg.model.base_model, ema_decay=0.9)  # no exact resume: go on from the average
    assert not (point.live_weights_path and lean.checkpoint.save_optimizer_state)
    from_average = build_learner(lean, point)
    assert all(torch.allclose(a, b) for a, b in zip(from_average.model.hf_model.parameters(), average))


def test_ema_decay_is_validated(tmp_path) -> None:
    from services.config import ConfigError

    from trainer.config import TrainerConfig, trainer_config

    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="^ema_decay:"):
            trainer_config(ema_decay=bad).validate()
    trainer_config(ema_decay=0.0).validate()
