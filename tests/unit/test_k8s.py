"""k8s/ stays consistent with the code: every PREFSTREAM_<SERVICE>_<FIELD> env var names a real
config field, every command runs a real module, and every kustomize resource exists."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import yaml

from services.config import leaves
from gateway.config import GatewayConfig
from scorer.config import ScorerConfig
from trainer.config import TrainerConfig

K8S = Path(__file__).resolve().parents[2] / "k8s"
CONFIGS = {"GATEWAY": GatewayConfig, "SCORER": ScorerConfig, "TRAINER": TrainerConfig}


def _docs():
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def _containers(doc):
    spec = doc.get("spec", {})
    templates = [spec.get("template")]
    templates += [spec.get("headGroupSpec", {}).get("template")]
    templates += [g.get("template") for g in spec.get("workerGroupSpecs", [])]
    for t in templates:
        if t:
            yield from t.get("spec", {}).get("containers", [])


def test_kustomization_lists_existing_files():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        assert (K8S / res).exists(), res


def test_env_vars_name_real_config_fields():
    seen = 0
    for name, doc in _docs():
        for c in _containers(doc):
            for env in c.get("env", []):
                var = env["name"]
                if not var.startswith("PREFSTREAM_"):
                    continue
                section, _, field_name = var[len("PREFSTREAM_"):].partition("_")
                cls = CONFIGS[section]
                fields = set(leaves(cls))
                assert field_name.lower() in fields, f"{name}: {var} is not a field of {cls.__name__}"
                seen += 1
    assert seen >= 10


def test_commands_run_real_modules():
    for name, doc in _docs():
        for c in _containers(doc):
            cmd = c.get("command") or []
            if cmd[:2] == ["python", "-m"]:
                assert importlib.util.find_spec(cmd[2] + ".__main__") is not None, f"{name}: no module {cmd[2]}"
