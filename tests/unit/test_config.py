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
