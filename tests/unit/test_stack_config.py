"""StackConfig: defaults are valid, bad values fail naming the field, precedence and derived paths hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.config import ConfigError
from services.stack.config import StackConfig, load_stack_config, _parse_heap


def test_defaults_validate() -> None:
    cfg = load_stack_config(env={})
    assert cfg.components == ("kafka", "redis", "ray")
    assert (cfg.kafka_port, cfg.kafka_controller_port, cfg.redis_port) == (9092, 9093, 6379)
    assert cfg.kafka_heap == "512m"
    assert cfg.kafka_bootstrap == "127.0.0.1:9092"
    assert cfg.redis_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"components": "kafka,zookeeper"}, "components"),
        ({"components": "kafka,kafka"}, "components"),
        ({"kafka_port": 70000}, "kafka_port"),
        ({"kafka_heap": "lots"}, "kafka_heap"),
        ({"ray_object_store_mb": 10}, "ray_object_store_mb"),
        ({"start_timeout_s": 0}, "start_timeout_s"),
        ({"ray_num_cpus": -1}, "ray_num_cpus"),
    ],
)
def test_bad_values_name_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_stack_config(overrides=overrides, env={})


def test_port_clash_is_refused_only_between_started_components() -> None:
    with pytest.raises(ConfigError, match="redis_port"):
        load_stack_config(overrides={"redis_port": 9092}, env={})
    cfg = load_stack_config(overrides={"redis_port": 9092, "components": "redis,ray"}, env={})
    assert cfg.redis_port == 9092


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    f = tmp_path / "stack.yaml"
    f.write_text("stack:\n  kafka_port: 19092\n  redis_port: 16379\n  ray_port: 16380\n")
    env = {"PREFSTREAM_STACK_REDIS_PORT": "26379", "PREFSTREAM_STACK_RAY_PORT": "26380"}
    cfg = load_stack_config(file=f, env=env, overrides={"ray_port": 36380, "kafka_heap": None})
    assert (cfg.kafka_port, cfg.redis_port, cfg.ray_port) == (19092, 26379, 36380)
    assert cfg.kafka_heap == "512m"


def test_cache_dir_follows_prefstream_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PREFSTREAM_CACHE_DIR", str(tmp_path))
    cfg = StackConfig()
    assert cfg.kafka_libs == tmp_path.resolve() / "kafka-4.1.1" / "libs"


def test_relative_run_dir_resolves_against_cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = StackConfig()
    assert cfg.run_path == tmp_path.resolve() / ".run" / "stack"
    assert cfg.state_file == cfg.run_path / "stack.json"


def test_ray_temp_dir_stays_short_for_long_run_dirs(tmp_path: Path) -> None:
    short = StackConfig(run_dir=Path("/tmp/s"))
    assert short.ray_temp_dir == Path("/tmp/s/ray/tmp")
    long_dir = tmp_path / ("x" * 80)
    cfg = StackConfig(run_dir=long_dir)
    assert str(cfg.ray_temp_dir).startswith("/tmp/prefstream-ray-")
    assert len(str(cfg.ray_temp_dir)) <= 40
    # Stable per run dir, different between run dirs.
    assert StackConfig(run_dir=long_dir).ray_temp_dir == cfg.ray_temp_dir
    assert StackConfig(run_dir=tmp_path / ("y" * 80)).ray_temp_dir != cfg.ray_temp_dir


@pytest.mark.parametrize(("text", "expected"), [("512m", 512 << 20), ("1g", 1 << 30), ("65536k", 64 << 20), ("1024", 1024), ("0m", None), ("m", None), ("1.5g", None)])
def test_parse_heap(text: str, expected: int | None) -> None:
    assert _parse_heap(text) == expected
