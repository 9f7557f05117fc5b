"""GatewayConfig: layered loading and start-up validation that names the field to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import GatewayConfig, load_gateway_config
from gateway.validation import Limits
from services import topics
from services.config import ConfigError


def test_defaults_env_and_overrides(tmp_path: Path) -> None:
    cfg = load_gateway_config(env={})
    assert cfg.auth_enabled and cfg.run_processor and cfg.kafka_producer_process
    f = tmp_path / "gw.yaml"
    f.write_text("gateway:\n  grpc_port: 6000\n  max_candidates: 8\n")
    cfg = load_gateway_config(file=f, env={"PREFSTREAM_GATEWAY_GRPC_PORT": "7000", "PREFSTREAM_GATEWAY_AUTH_ENABLED": "false"},
                              overrides={"max_candidates": "4", "attribute_weights": '{"helpfulness": 0.5, "verbosity": -0.1}'})
    assert cfg.grpc_port == 7000 and cfg.max_candidates == 4 and not cfg.auth_enabled
    assert cfg.attribute_weights == {"helpfulness": 0.5, "verbosity": -0.1}
    limits = Limits.from_config(cfg)
    assert limits.max_candidates == 4 and limits.weights == {"helpfulness": 0.5, "verbosity": -0.1}
    assert load_gateway_config(env={}, overrides={"topic_prefix": "staging."}).topic(topics.FEEDBACK) == "staging.prefstream.feedback"


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"grpc_port": 70000}, "grpc_port"),
        ({"http_port": -2}, "http_port"),
        ({"kafka_ack_timeout_s": 0}, "kafka_ack_timeout_s"),
        ({"kafka_compression": "brotli"}, "kafka_compression"),
        ({"kafka_ack_timeout_s": 30, "dedup_pending_ttl_s": 20}, "dedup_pending_ttl_s"),
        ({"max_candidates": 1}, "max_candidates"),
        ({"max_prompt_messages": 0}, "max_prompt_messages"),
        ({"attribute_weights": '{"humor": 1}'}, "attribute_weights"),
        ({"pending_timeout_s": 0}, "pending_timeout_s"),
        ({"scorer_timeout_s": 0}, "scorer_timeout_s"),
    ],
)
def test_invalid_values_fail_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_gateway_config(env={}, overrides=overrides)


def test_explicit_endpoints_need_no_stack() -> None:
    cfg = GatewayConfig(kafka_bootstrap="127.0.0.1:1", redis_url="redis://127.0.0.1:2/0")
    assert cfg.endpoints() == ("127.0.0.1:1", "redis://127.0.0.1:2/0")


def test_unset_endpoints_come_from_the_stack_named_by_stack_run_dir(tmp_path: Path) -> None:
    import json

    (tmp_path / "stack.json").write_text(json.dumps({"endpoints": {
        "kafka_bootstrap": "127.0.0.1:9", "redis_url": "redis://127.0.0.1:8/0", "ray_address": None}}))
    cfg = load_gateway_config(env={"PREFSTREAM_GATEWAY_STACK_RUN_DIR": str(tmp_path)},
                              overrides={"redis_url": "redis://explicit:1/0"})
    assert cfg.endpoints() == ("127.0.0.1:9", "redis://explicit:1/0")  # an explicit setting wins
    with pytest.raises(ConfigError, match=r"^kafka_bootstrap, redis_url: not set and the local stack is not up"):
        GatewayConfig(stack_run_dir=str(tmp_path / "nowhere")).endpoints()


def test_gateway_flags_cover_every_field_and_booleans_switch_off_either_way(tmp_path: Path) -> None:
    from gateway.cli import config_from_args
    from prefstream.cli import build_parser

    parse = build_parser().parse_args
    args = parse(["gateway", "serve", "--auth-enabled", "false", "--no-run-processor", "--stack-run-dir", str(tmp_path),
                  "--grpc-port", "0", "--score-attributes", "helpfulness"])
    cfg = config_from_args(args)
    assert not cfg.auth_enabled and not cfg.run_processor and cfg.kafka_producer_process
    assert cfg.stack_run_dir == str(tmp_path) and cfg.grpc_port == 0 and cfg.score_attributes == ("helpfulness",)
    assert config_from_args(parse(["keys", "list", "--kafka-linger-ms", "5"])).kafka_linger_ms == 5
    with pytest.raises(ConfigError, match="option --grpc-port: expected int"):
        config_from_args(parse(["gateway", "process", "--grpc-port", "x"]))
