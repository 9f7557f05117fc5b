"""services.config: precedence defaults < file < env < overrides, coercion, and clear errors."""

from dataclasses import dataclass, field

import pytest

from services.config import ConfigError, load_config, require


@dataclass(frozen=True)
class DemoConfig:
    port: int = field(default=50051, metadata={"help": "gRPC port"})
    ratio: float = 0.5
    enabled: bool = True
    topics: tuple[str, ...] = ("a",)
    name: str | None = None

    def validate(self) -> None:
        require(0 <= self.ratio <= 1, "ratio", f"must be within [0, 1], got {self.ratio}")


def test_defaults():
    cfg = load_config(DemoConfig, section="demo", env={})
    assert cfg == DemoConfig()


def test_precedence_file_env_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("demo:\n  port: 1\n  ratio: 0.1\n  topics: [x, y]\n")
    env = {"PREFSTREAM_DEMO_PORT": "2", "PREFSTREAM_DEMO_ENABLED": "false"}
    cfg = load_config(DemoConfig, section="demo", file=f, env=env, overrides={"port": 3, "name": None})
    assert cfg.port == 3  # flag beats env beats file
    assert cfg.ratio == 0.1  # from file
    assert cfg.enabled is False  # from env
    assert cfg.topics == ("x", "y")
    assert cfg.name is None


def test_env_list_and_optional():
    cfg = load_config(DemoConfig, section="demo", env={"PREFSTREAM_DEMO_TOPICS": "p, q", "PREFSTREAM_DEMO_NAME": "n"})
    assert cfg.topics == ("p", "q") and cfg.name == "n"


def test_bad_values_name_the_source_and_field(tmp_path):
    with pytest.raises(ConfigError, match="PREFSTREAM_DEMO_PORT.*expected int"):
        load_config(DemoConfig, section="demo", env={"PREFSTREAM_DEMO_PORT": "abc"})
    with pytest.raises(ConfigError, match="ratio: must be within"):
        load_config(DemoConfig, section="demo", env={}, overrides={"ratio": 2})
    f = tmp_path / "c.yaml"
    f.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match="unknown field demo.prot"):
        load_config(DemoConfig, section="demo", file=f, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DemoConfig, section="demo", file=tmp_path / "missing.yaml", env={})
    with pytest.raises(ConfigError, match="expected true/false"):
        load_config(DemoConfig, section="demo", env={"PREFSTREAM_DEMO_ENABLED": "maybe"})


def _parse(argv: list[str]):
    import argparse

    from services.config import add_config_flags

    parser = argparse.ArgumentParser()
    add_config_flags(parser, DemoConfig)
    return parser.parse_args(argv)


def test_flags_are_overrides_and_booleans_read_three_ways():
    from services.config import overrides_from_args

    assert overrides_from_args(_parse([]), DemoConfig) == {}  # nothing given: file and env stay in force
    assert overrides_from_args(_parse(["--port", "7", "--topics", "p,q"]), DemoConfig) == {"port": "7", "topics": "p,q"}
    for argv, enabled in ((["--enabled"], True), (["--no-enabled"], False), (["--enabled", "false"], False),
                          (["--enabled", "yes"], True)):
        cfg = load_config(DemoConfig, section="demo", env={"PREFSTREAM_DEMO_ENABLED": str(not enabled)},
                          overrides=overrides_from_args(_parse(argv), DemoConfig))
        assert cfg.enabled is enabled, argv
    with pytest.raises(ConfigError, match="option --enabled: expected true/false"):
        load_config(DemoConfig, section="demo", env={}, overrides=overrides_from_args(_parse(["--enabled", "maybe"]), DemoConfig))
    with pytest.raises(SystemExit):
        _parse(["--no-enabled", "false"])


def _stack_json(run_dir, **endpoints):
    import json

    run_dir.mkdir(parents=True, exist_ok=True)
    ep = {"kafka_bootstrap": None, "redis_url": None, "ray_address": None, **endpoints}
    (run_dir / "stack.json").write_text(json.dumps({"endpoints": ep}))


@dataclass(frozen=True)
class _Endpoints:
    kafka_bootstrap: str = ""
    redis_url: str | None = None


def test_fill_endpoints_takes_only_what_is_needed_from_the_stack(tmp_path):
    from services.config import fill_endpoints

    _stack_json(tmp_path, kafka_bootstrap="127.0.0.1:9", redis_url="redis://127.0.0.1:8/0")
    cfg = _Endpoints(kafka_bootstrap="explicit:1")
    assert fill_endpoints(cfg, {"kafka_bootstrap": False, "redis_url": True}, tmp_path) == _Endpoints(
        "explicit:1", "redis://127.0.0.1:8/0")
    assert fill_endpoints(cfg, {"redis_url": False}, tmp_path / "nowhere") is cfg  # nothing wanted: no stack read


def test_fill_endpoints_names_the_setting_and_its_flag(tmp_path, monkeypatch):
    from services.config import fill_endpoints

    with pytest.raises(ConfigError, match=r"^redis_url: not set and the local stack is not up .*or pass --redis-url"):
        fill_endpoints(_Endpoints(), {"redis_url": True}, tmp_path / "nowhere")
    _stack_json(tmp_path, kafka_bootstrap="127.0.0.1:9")
    with pytest.raises(ConfigError, match="^redis_url: .*does not run that component; pass --redis-url"):
        fill_endpoints(_Endpoints(), {"redis_url": True}, tmp_path)
    monkeypatch.setenv("PREFSTREAM_STACK_RUN_DIR", str(tmp_path))  # empty stack_run_dir: the env's
    assert fill_endpoints(_Endpoints(), {"kafka_bootstrap": True}, "").kafka_bootstrap == "127.0.0.1:9"
