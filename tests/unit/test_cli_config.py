"""Every service's command line comes from one builder: a flag per config field, booleans on/off either way."""

from __future__ import annotations

import argparse

import pytest

from demo.config import DemoConfig
from gateway.config import GatewayConfig
from prefstream.cli import build_parser
from scorer.config import ScorerConfig
from services.config import ConfigError, leaves
from trainer.config import TrainerConfig


def _flags(*command: str) -> set[str]:
    parser = build_parser()
    for word in command:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[word]
    return {o for a in parser._actions for o in a.option_strings}


@pytest.mark.parametrize("command, cls", [
    (("gateway", "serve"), GatewayConfig),
    (("keys", "create"), GatewayConfig),
    (("scorer", "serve"), ScorerConfig),
    (("trainer", "run"), TrainerConfig),
    (("demo",), DemoConfig),
])
def test_every_leaf_is_a_flag_and_every_boolean_has_a_no_form(command: tuple[str, ...], cls: type) -> None:
    flags = _flags(*command)
    for name, leaf in leaves(cls).items():
        flag = "--" + name.replace("_", "-")
        assert flag in flags, f"{' '.join(command)} lacks {flag}"
        if leaf.annotation is bool:
            assert "--no-" + flag[2:] in flags, f"{' '.join(command)} lacks --no-{flag[2:]}"


def test_scorer_flags_override_env_and_name_the_option(tmp_path) -> None:
    from scorer.cli import config_from_args

    parse = build_parser().parse_args
    cfg = config_from_args(parse(["scorer", "serve", "--no-warmup", "--stack-run-dir", str(tmp_path),
                                  "--reward-models", "a,b", "--max-models", "2"]))
    assert not cfg.warmup and cfg.policy_preload and cfg.stack_run_dir == str(tmp_path)
    assert cfg.reward_models == ("a", "b") and cfg.max_models == 2
    assert config_from_args(parse(["scorer", "serve", "--warmup", "false"])).warmup is False
    with pytest.raises(ConfigError, match="^port: 70000 is not a TCP port"):
        config_from_args(parse(["scorer", "serve", "--port", "70000"]))


def test_demo_flags_switch_booleans_both_ways() -> None:
    from demo.config import load_demo_config
    from services.config import overrides_from_args

    parse = build_parser().parse_args
    args = parse(["demo", "--fresh", "false", "--keep-stack", "--events", "10", "--stack-run-dir", "/tmp/s"])
    cfg = load_demo_config(args.config, overrides=overrides_from_args(args, DemoConfig), env={})
    assert not cfg.fresh and cfg.keep_stack and cfg.events == 10 and cfg.stack_run_dir == "/tmp/s"
    args = parse(["demo", "--no-fresh", "--json"])
    assert args.json and load_demo_config(overrides=overrides_from_args(args, DemoConfig), env={}).fresh is False
