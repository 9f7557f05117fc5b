"""k8s/ renders, validates and stays consistent with the code.

Every overlay is rendered with kustomize and checked offline by ``scripts/k8s_check.py`` (kubeconform
-strict against the Kubernetes and the vendored Strimzi/KubeRay/prometheus-operator schemas, kube-score,
hadolint on the Dockerfile).  On the rendered resources: every ``PREFSTREAM_<SERVICE>_<FIELD>`` names a
real config field, every entrypoint runs a real module, the KafkaTopics are services/topics.py's, every
pod runs restricted, nothing under an HPA pins its replicas, every selector selects pods, and every
Secret a pod reads is documented in docs/deploy.md.

Under ``make test`` (PREFSTREAM_REQUIRE_K8S_TOOLS=1) a missing tool fails; elsewhere it skips.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from gateway.config import GatewayConfig
from scorer.config import ScorerConfig
from services.config import leaves
from services.topics import TOPICS, creation_settings
from trainer.config import TrainerConfig

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import k8s_check  # noqa: E402

CONFIGS = {"GATEWAY": GatewayConfig, "SCORER": ScorerConfig, "TRAINER": TrainerConfig}
OVERLAYS = k8s_check.overlays()
WORKLOADS = ("Deployment", "StatefulSet")


def _require_tools() -> None:
    try:
        for name in ("kustomize", "kubeconform", "kube-score", "hadolint"):
            k8s_check.tool(name)
    except FileNotFoundError as e:
        if os.environ.get("PREFSTREAM_REQUIRE_K8S_TOOLS") == "1":
            raise
        pytest.skip(str(e))


@lru_cache(maxsize=None)
def _rendered(overlay: str) -> tuple[dict, ...]:
    _require_tools()
    return tuple(d for d in yaml.safe_load_all(k8s_check.render(overlay)) if d)


def _pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    templates = [spec.get("template"), spec.get("headGroupSpec", {}).get("template")]
    templates += [g.get("template") for g in spec.get("workerGroupSpecs", [])]
    return [t["spec"] for t in templates if t]


def _containers(doc: dict) -> list[dict]:
    return [c for p in _pod_specs(doc) for c in p.get("containers", [])]


def _env(doc: dict) -> list[tuple[str, str]]:
    """(name, value) of every environment variable a resource sets, RayJob runtime envs included."""
    out = [(e["name"], str(e.get("value", ""))) for c in _containers(doc) for e in c.get("env", [])]
    if doc["kind"] == "RayJob":
        env_vars = (yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}") or {}).get("env_vars", {})
        out += [(k, str(v)) for k, v in env_vars.items()]
    if doc["kind"] == "ConfigMap":
        out += [(k, str(v)) for k, v in (doc.get("data") or {}).items()]
    return out


def test_there_is_a_laptop_and_a_production_overlay() -> None:
    assert {"local", "production"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly_and_passes_the_linters(overlay: str) -> None:
    _require_tools()
    results = k8s_check.check([overlay])
    failed = {what: out for what, (ok, out) in results.items() if not ok}
    assert not failed, "\n\n".join(f"{w}:\n{o}" for w, o in failed.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_vars_name_real_config_fields(overlay: str) -> None:
    seen = 0
    for doc in _rendered(overlay):
        for var, _ in _env(doc):
            if not var.startswith("PREFSTREAM_") or var.split("_")[1] not in CONFIGS:
                continue
            section, _, field_name = var[len("PREFSTREAM_"):].partition("_")
            cls = CONFIGS[section]
            assert field_name.lower() in set(leaves(cls)), f"{doc['kind']}/{doc['metadata']['name']}: {var} is not a field of {cls.__name__}"
            seen += 1
    assert seen >= 20


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_entrypoints_run_real_modules(overlay: str) -> None:
    modules = set()
    for doc in _rendered(overlay):
        commands = [c.get("command") or [] for c in _containers(doc)]
        if doc["kind"] == "RayJob":
            commands.append(doc["spec"]["entrypoint"].split())
        for cmd in commands:
            if cmd[:2] == ["python", "-m"]:
                assert importlib.util.find_spec(cmd[2] + ".__main__") is not None, f"no module {cmd[2]}"
                modules.add(cmd[2])
    assert "trainer" in modules
    # The gateway and scorer images start their module themselves (Dockerfile ENTRYPOINT).
    dockerfile = (ROOT / "Dockerfile").read_text()
    for area in ("gateway", "scorer"):
        assert f'ENTRYPOINT ["python", "-m", "{area}"]' in dockerfile
        assert importlib.util.find_spec(area + ".__main__") is not None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kafka_topics_are_the_projects(overlay: str) -> None:
    topics = {d["spec"]["topicName"]: d["spec"] for d in _rendered(overlay) if d["kind"] == "KafkaTopic"}
    assert set(topics) == {t.name for t in TOPICS}
    brokers = next(d["spec"]["replicas"] for d in _rendered(overlay) if d["kind"] == "KafkaNodePool")
    for t in TOPICS:
        want = creation_settings(t, brokers)
        got = topics[t.name]
        assert got["partitions"] == t.partitions and got["replicas"] == want["replication_factor"], t.name
        for key, value in want["configs"].items():
            assert str(got["config"].get(key)) == str(value), f"{t.name}: {key}"
    assert not [d for d in _rendered(overlay) if d["kind"] in ("Job", "CronJob")], "topics and trainers are not Jobs"


def test_production_replicates_kafka_three_ways_and_pins_images_by_digest() -> None:
    docs = _rendered("production")
    assert next(d for d in docs if d["kind"] == "KafkaNodePool")["spec"]["replicas"] == 3
    kafka = next(d for d in docs if d["kind"] == "Kafka")["spec"]["kafka"]["config"]
    assert (kafka["default.replication.factor"], kafka["min.insync.replicas"]) == (3, 2)
    images = {c["image"] for d in docs for c in _containers(d)}
    ours = {i for i in images if "prefstream" in i}
    assert ours and all("@sha256:" in i for i in ours), ours


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_restricted(overlay: str) -> None:
    for doc in _rendered(overlay):
        for pod in _pod_specs(doc):
            where = f"{doc['kind']}/{doc['metadata']['name']}"
            sc = pod.get("securityContext", {})
            assert sc.get("runAsNonRoot") is True and sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            assert pod.get("automountServiceAccountToken") is False, where
            for c in pod["containers"]:
                csc = c.get("securityContext", {})
                assert csc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
                assert csc.get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}"
                assert csc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}"
                assert any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])), f"{where}/{c['name']}: no writable /tmp"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nothing_under_an_hpa_pins_its_replicas(overlay: str) -> None:
    docs = _rendered(overlay)
    scaled = {(h["spec"]["scaleTargetRef"]["kind"], h["spec"]["scaleTargetRef"]["name"])
              for h in docs if h["kind"] == "HorizontalPodAutoscaler"}
    assert {("Deployment", "gateway"), ("Deployment", "scorer")} <= scaled
    for d in docs:
        if (d["kind"], d["metadata"]["name"]) in scaled:
            assert "replicas" not in d["spec"], f"{d['kind']}/{d['metadata']['name']}"
    scorer_hpa = next(h for h in docs if h["kind"] == "HorizontalPodAutoscaler" and h["metadata"]["name"] == "scorer")
    assert scorer_hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "prefstream_scorer_requests_in_flight"


def _pod_label_sets(docs: tuple[dict, ...]) -> list[dict]:
    """Labels of every pod the manifests make, with those KubeRay puts on a RayCluster's pods."""
    out = []
    for d in docs:
        if d["kind"] in WORKLOADS:
            out.append(d["spec"]["template"]["metadata"].get("labels", {}))
        if d["kind"] == "RayCluster":
            name = d["metadata"]["name"]
            out.append({**d["spec"]["headGroupSpec"]["template"]["metadata"].get("labels", {}),
                        "ray.io/cluster": name, "ray.io/node-type": "head"})
            for g in d["spec"]["workerGroupSpecs"]:
                out.append({**g["template"]["metadata"].get("labels", {}), "ray.io/cluster": name,
                            "ray.io/node-type": "worker", "ray.io/group": g["groupName"]})
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_selector_selects_pods(overlay: str) -> None:
    docs = _rendered(overlay)
    pods = _pod_label_sets(docs)

    def selects(selector: dict) -> bool:
        return any(all(labels.get(k) == v for k, v in selector.items()) for labels in pods)

    for d in docs:
        where = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "Service":
            assert selects(d["spec"]["selector"]), where
        if d["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            sel = d["spec"]["podSelector" if d["kind"] == "NetworkPolicy" else "selector"].get("matchLabels", {})
            assert not sel or selects(sel), where
            for rule in d["spec"].get("ingress", []):
                for peer in rule.get("from", []):
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        assert selects(peer["podSelector"]["matchLabels"]), f"{where}: peer {peer}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_a_pod_reads_is_documented(overlay: str) -> None:
    deploy_doc = (ROOT / "docs" / "deploy.md").read_text()
    secrets = {e["valueFrom"]["secretKeyRef"]["name"]
               for d in _rendered(overlay) for c in _containers(d) for e in c.get("env", [])
               if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"prefstream-redis", "prefstream-gateway", "prefstream-scorer", "prefstream-s3"} <= secrets
    for s in secrets:
        assert f"`{s}`" in deploy_doc, f"docs/deploy.md does not say how to create the Secret {s}"
