"""services.endpoints reads the local stack's stack.json without importing the launcher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.endpoints import StackEndpoints, StackNotRunning, load_stack_endpoints, stack_run_dir


def _write_state(run_dir: Path, endpoints: object) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "stack.json").write_text(json.dumps({"version": 1, "endpoints": endpoints}))


def test_reads_the_published_endpoints(tmp_path: Path) -> None:
    _write_state(tmp_path, {"kafka_bootstrap": "127.0.0.1:1", "redis_url": "redis://127.0.0.1:2/0", "ray_address": None})
    assert load_stack_endpoints(tmp_path) == StackEndpoints("127.0.0.1:1", "redis://127.0.0.1:2/0", None)
    assert load_stack_endpoints(str(tmp_path)).redis_url == "redis://127.0.0.1:2/0"


def test_a_stack_that_is_not_up_says_how_to_start_it(tmp_path: Path) -> None:
    with pytest.raises(StackNotRunning, match=r"not up .*prefstream stack up --run-dir"):
        load_stack_endpoints(tmp_path / "nowhere")


@pytest.mark.parametrize("text", ["{not json", json.dumps({"version": 1}), json.dumps([1, 2])])
def test_unreadable_state_is_an_error_not_a_silent_default(tmp_path: Path, text: str) -> None:
    (tmp_path / "stack.json").write_text(text)
    with pytest.raises(StackNotRunning, match="stack.json"):
        load_stack_endpoints(tmp_path)


def test_an_empty_address_is_rejected(tmp_path: Path) -> None:
    _write_state(tmp_path, {"kafka_bootstrap": "", "redis_url": None, "ray_address": None})
    with pytest.raises(StackNotRunning, match="endpoints.kafka_bootstrap"):
        load_stack_endpoints(tmp_path)


def test_run_dir_defaults_to_the_env_then_dot_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFSTREAM_STACK_RUN_DIR", str(tmp_path))
    _write_state(tmp_path, {"kafka_bootstrap": "h:9", "redis_url": None, "ray_address": "127.0.0.1:3"})
    assert load_stack_endpoints().ray_address == "127.0.0.1:3"
    assert load_stack_endpoints("") == load_stack_endpoints(None)
    monkeypatch.delenv("PREFSTREAM_STACK_RUN_DIR")
    monkeypatch.chdir(tmp_path)
    assert stack_run_dir() == tmp_path.resolve() / ".run" / "stack"


def test_the_launcher_reads_through_the_same_module() -> None:
    from services.stack import Endpoints, load_endpoints

    assert Endpoints is StackEndpoints and load_endpoints is load_stack_endpoints
