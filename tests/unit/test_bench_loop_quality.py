"""bench loop-quality's paired statistics, worked by hand."""

from __future__ import annotations

import math

import pytest

from bench.loop_quality import paired_stats


def test_paired_stats_average_seeds_per_pair_then_take_the_pairs_as_units() -> None:
    # pair differences averaged over 2 seeds: 0, 0.5, 0.5, 0 -> mean 0.25, sample var 1/12, se sqrt(1/48)
    diff, se = paired_stats(["1100", "1010"], ["1000", "1000"])
    assert diff == pytest.approx(0.25)
    assert se == pytest.approx(math.sqrt(1 / 48))


def test_paired_stats_of_identical_arms_is_zero() -> None:
    assert paired_stats(["0110"], ["0110"]) == (0.0, 0.0)


@pytest.mark.parametrize("live, offline", [([], []), (["10"], ["10", "01"]), (["101"], ["10"]), (["1"], ["0"])])
def test_paired_stats_refuses_mismatched_outcomes(live, offline) -> None:
    with pytest.raises(ValueError):
        paired_stats(live, offline)


def test_the_offline_arm_trains_with_the_settings_the_demo_gives_its_trainer() -> None:
    from bench.loop_quality import _offline_config
    from demo.config import load_demo_config
    from demo.run import trainer_learning_settings
    from services.config import env_vars
    from trainer.config import load_trainer_config

    demo_cfg = load_demo_config(overrides={"seed": 2, "replay_ratio": 0.5, "max_length": 96})
    env = env_vars("trainer", trainer_learning_settings(demo_cfg))
    live = load_trainer_config(env=env).to_dict()  # what `python -m trainer` builds from the demo's env
    offline = _offline_config(demo_cfg).to_dict()
    assert {k: offline[k] for k in ("seed", "replay_ratio", "max_length", "autocast")} == \
        {"seed": 2, "replay_ratio": 0.5, "max_length": 96, "autocast": "auto"}
    learning = ("batch_size", "lr", "warmup_steps", "ema_decay", "schedule", "max_grad_norm", "weight_decay",
                "replay_weight", "loss", "seed", "replay_ratio", "max_length", "autocast")
    assert {k: live[k] for k in learning} == {k: offline[k] for k in learning}
