"""The product never imports the top of the house (demo, benchmarks) nor the local-stack launcher.

Each check runs in a fresh interpreter, because this test session has long since imported
everything; it lists the modules an import (or ``python -m <area> --help``) left in ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Module prefixes a deployable must never load: dev tooling and the demo/bench on top of the product.
FORBIDDEN = ("bench", "demo", "loop", "services.stack")

_PROBE = """
import json, runpy, sys
target = sys.argv[1]
if target.startswith("-m "):
    sys.argv = [target[3:], "--help"]
    try:
        runpy.run_module(target[3:], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        assert e.code == 0, f"--help exited with {e.code}"
else:
    for name in target.split(","):
        __import__(name)
print(json.dumps(sorted(sys.modules)))
"""


def _loaded(target: str) -> set[str]:
    """Modules loaded by importing ``target`` (comma-separated modules) or running ``-m area --help``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _PROBE, target], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def _under(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


@pytest.mark.parametrize("target", [
    "gateway.server,scorer.server,scorer.client,trainer.service,trainer.loop",
    "-m gateway",
    "-m scorer",
    "-m trainer",
])
def test_the_product_does_not_import_the_demo_the_benchmarks_or_the_launcher(target: str) -> None:
    loaded = _loaded(target)
    assert _under(loaded, FORBIDDEN) == []
    assert "prefstream.cli" not in loaded  # the deployables build their own parsers


def test_the_scorer_client_sdk_needs_neither_kafka_nor_torch() -> None:
    loaded = _loaded("scorer.client")
    assert _under(loaded, ("kafka", "torch", "transformers")) == []


def test_the_gateway_image_needs_neither_torch_nor_ray() -> None:
    """The Dockerfile's gateway target installs neither (a much smaller image); this keeps that true."""
    loaded = _loaded("gateway.server,gateway.service,gateway.processor,gateway.http,gateway.importer,"
                     "gateway.openai_compat,gateway.cli")
    assert _under(loaded, ("torch", "ray", "transformers", "peft", "accelerate", "safetensors", "boto3")) == []


def test_event_schemas_do_not_need_kafka() -> None:
    assert _under(_loaded("services.schemas"), ("kafka",)) == []


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions (read from the source)."""
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_the_runtime_part_of_services_never_imports_the_dev_tooling() -> None:
    """services/ outside services/stack is what the deployables load; the launcher and the process
    supervisor (services.stack) sit on top of it, never under it, even in a function-level import."""
    offenders = {}
    for path in sorted((ROOT / "services").rglob("*.py")):
        if path.relative_to(ROOT / "services").parts[0] == "stack":
            continue
        bad = _under(_imported_modules(path), FORBIDDEN)
        if bad:
            offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def test_every_test_module_has_a_unique_basename() -> None:
    """``tests/`` has no packages below it, so pytest imports each file by its basename: two files of
    one name in ``unit/`` and ``integration/`` stop the whole run at collection."""
    seen: dict[str, Path] = {}
    clashes = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if path.name in seen:
            clashes.append(f"{seen[path.name].relative_to(ROOT)} and {path.relative_to(ROOT)}")
        seen.setdefault(path.name, path)
    assert not clashes, "rename one of each: " + "; ".join(clashes)
