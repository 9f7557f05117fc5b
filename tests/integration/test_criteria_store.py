"""The criteria store against the real session Redis: versions, lookups, references and delete protection.

Each test uses its own namespace, so tests share the session server without interfering.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from services.criteria import parse_criterion
from services.criteria_store import CriteriaStore, CriterionInUse, CriterionNotFound
from services.errors import InvalidArgument
from services.registry import ModelRegistry, ModelVersion

pytestmark = pytest.mark.integration

CONCISE = {"name": "concise", "project": "acme", "rules": [{"max_words": 50}]}


@pytest.fixture
def store(redis_client: redis.Redis) -> CriteriaStore:
    return CriteriaStore(redis_client, namespace=f"test-{uuid.uuid4().hex[:8]}")


def test_versions_change_with_content_only(store: CriteriaStore) -> None:
    v1, new = store.create(parse_criterion(CONCISE))
    assert (v1.ref, new) == ("concise@v1", True)
    again, new = store.create(parse_criterion({**CONCISE, "description": "reworded"}))
    assert (again, new) == (v1, False)  # same content: same version, nothing written
    v2, new = store.create(parse_criterion({**CONCISE, "rules": [{"max_words": 40}]}))
    assert (v2.ref, new) == ("concise@v2", True)
    back, new = store.create(parse_criterion(CONCISE))
    assert (back.version, new) == ("v1", False)  # returning to old content reuses its version
    assert store.get("acme", "concise") == v2  # the latest recorded
    assert store.get("acme", "concise@v1") == v1
    assert [c.version for c in store.versions("acme", "concise")] == ["v1", "v2"]
    with pytest.raises(CriterionNotFound):
        store.get("acme", "concise@v9")
    with pytest.raises(CriterionNotFound):
        store.get("other-project", "concise")


def test_list_per_project(store: CriteriaStore) -> None:
    store.create(parse_criterion(CONCISE))
    store.create(parse_criterion({"name": "json", "project": "acme", "rules": [{"json_valid": True}], "weight": 2}))
    store.create(parse_criterion({"name": "elsewhere", "project": "beta", "rules": [{"json_valid": True}]}))
    listed = store.list("acme")
    assert [(s.latest.name, s.versions, s.latest.weight) for s in listed] == [("concise", ("v1",), 1.0),
                                                                              ("json", ("v1",), 2.0)]
    assert listed[0].to_dict()["kind"] == "rules"
    assert store.names("beta") == ["elsewhere"]


def test_delete_is_refused_while_in_use_and_forcing_is_recorded(store: CriteriaStore) -> None:
    store.create(parse_criterion(CONCISE))
    gen = store.generation()
    store.mark_in_use("acme", "concise", "scorer-0")
    with pytest.raises(CriterionInUse, match="scorer-0"):
        store.delete("acme", "concise")
    assert store.get("acme", "concise").version == "v1"  # nothing was deleted
    store.release("acme", "concise", "scorer-0")
    store.mark_in_use("acme", "concise", "processor", ttl_s=0.01)  # a holder that died without releasing
    time.sleep(0.05)  # ... and whose mark expired: it does not block
    assert store.delete("acme", "concise") == ["v1"]
    assert store.generation() == gen + 1
    with pytest.raises(CriterionNotFound):
        store.get("acme", "concise")
    assert store.audit() == []  # an unused criterion's delete needs no audit entry

    store.create(parse_criterion(CONCISE))  # version numbers are not reused after a delete
    assert store.get("acme", "concise").version == "v2"
    store.mark_in_use("acme", "concise", "scorer-1")
    assert store.delete("acme", "concise", force=True, reason="replaced by brief", actor="ops") == ["v2"]
    [entry] = store.audit()
    assert {k: entry[k] for k in ("project", "name", "versions", "in_use_by", "reason", "actor")} == {
        "project": "acme", "name": "concise", "versions": ["v2"], "in_use_by": ["scorer-1"],
        "reason": "replaced by brief", "actor": "ops"}
    assert store.in_use("acme", "concise") == []


def test_tie_breaker_references_are_checked_and_protect_the_target(store: CriteriaStore) -> None:
    strict = {"name": "strict", "project": "acme", "rules": [{"json_valid": True}],
              "tie_breaker": {"criterion": "concise"}}
    with pytest.raises(InvalidArgument) as e:
        store.create(parse_criterion(strict))
    assert e.value.field == "tie_breaker.criterion"
    store.create(parse_criterion(CONCISE))
    store.create(parse_criterion(strict))
    with pytest.raises(CriterionInUse, match="criterion strict"):
        store.delete("acme", "concise")
    store.delete("acme", "strict")
    store.delete("acme", "concise")


def test_models_are_checked_against_the_registry(redis_client: redis.Redis) -> None:
    ns = f"test-{uuid.uuid4().hex[:8]}"
    registry = ModelRegistry(redis_client, namespace=ns)
    registry.publish(ModelVersion(name="rm", version="v000001", uri="file:///ckpt/rm/v000001"))
    registry.publish(ModelVersion(name="smol", version="v000001", uri="file:///ckpt/smol/v000001", kind="policy"))
    store = CriteriaStore(redis_client, namespace=ns, registry=registry)
    assert store.create(parse_criterion({"name": "helpful", "reward": {"model": "rm", "threshold": 0}}))[1]
    assert store.create(parse_criterion({"name": "polite", "judge": {"model": "smol", "question": "Polite?"}}))[1]
    for data, field in [({"name": "x", "reward": "missing"}, "reward.model"),
                        ({"name": "x", "reward": "smol"}, "reward.model"),
                        ({"name": "x", "judge": {"model": "rm", "question": "Polite?"}}, "judge.model"),
                        ({"name": "x", "rules": [{"max_words": 3}], "tie_breaker": "nope"},
                         "tie_breaker.reward_model")]:
        with pytest.raises(InvalidArgument) as e:
            store.create(parse_criterion(data))
        assert e.value.field == field


def test_concurrent_creates_of_one_definition_make_one_version(store: CriteriaStore, redis_url: str) -> None:
    url = redis_url
    results: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def create(i: int) -> None:
        own = CriteriaStore(redis.Redis.from_url(url), namespace=store.namespace)
        c, new = own.create(parse_criterion({**CONCISE, "rules": [{"max_words": 10 + i % 2}]}))
        with lock:
            results.append((c.version, new))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(new for _, new in results).count(True) == 2  # two distinct definitions, two versions
    assert sorted(c.version for c in store.versions("acme", "concise")) == ["v1", "v2"]


def test_the_cli_creates_lists_shows_and_deletes(redis_url: str, capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    from prefstream.cli import main

    ns = f"test-{uuid.uuid4().hex[:8]}"
    common = ["--redis-url", redis_url, "--namespace", ns]
    example = str(Path(__file__).resolve().parents[2] / "docs" / "criteria" / "no-boilerplate.yaml")
    assert main(["criteria", "create", example, *common]) == 0
    assert main(["criteria", "create", example, *common]) == 0
    assert capsys.readouterr().out.splitlines() == ["created default/no-boilerplate@v1",
                                                    "unchanged default/no-boilerplate@v1"]
    assert main(["criteria", "list", "--json", *common]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["name"], row["latest_version"], row["weight"]) == ("no-boilerplate", "v1", 2.0)
    assert main(["criteria", "show", "no-boilerplate@v1", "--json", *common]) == 0
    assert json.loads(capsys.readouterr().out)["rules"][1] == {"contains_none": ["I apologize", "I'm sorry"],
                                                               "flags": "i"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrules: [{regex_must_match: 'a('}]\n")
    assert main(["criteria", "create", str(bad), *common]) == 2
    assert "rules[0].regex_must_match: bad regex" in capsys.readouterr().err
    CriteriaStore(redis.Redis.from_url(redis_url), namespace=ns).mark_in_use("default", "no-boilerplate", "scorer-0")
    assert main(["criteria", "delete", "no-boilerplate", *common]) == 2
    assert "in use by holder scorer-0" in capsys.readouterr().err
    assert main(["criteria", "delete", "no-boilerplate", "--force", "--reason", "test", *common]) == 0
    assert main(["criteria", "list", *common]) == 0
    assert "no criteria in project default" in capsys.readouterr().out


def test_the_loop_sets_the_feedback_its_loss_needs_and_gives_back_the_old_settings(store: CriteriaStore) -> None:
    from loop.run import FeedbackModes, feedback_mode_for

    assert feedback_mode_for("plackett_luce") == "ranking"
    assert feedback_mode_for("sigmoid") == feedback_mode_for("ipo") == "pair"
    assert feedback_mode_for("sigmoid", "pairs") == "pairs"
    assert feedback_mode_for("sigmoid", "matched") == feedback_mode_for("ipo", "matched") == "matched"
    assert feedback_mode_for("plackett_luce", "matched") == "ranking"
    concise, _ = store.create(parse_criterion(CONCISE))
    tone, _ = store.create(parse_criterion({"name": "tone", "project": "acme",
                                            "rules": [{"regex_must_not_match": "you"}]}))
    store.set_feedback("acme", "tone", enabled=True, mode="pair")  # an explicit setting of the user's
    with FeedbackModes(store, [concise, tone], "plackett_luce") as modes:
        assert modes.mode == "ranking"
        assert store.feedback_mode("acme", ["concise"]) == store.feedback_mode("acme", ["tone"]) == "ranking"
    assert store.feedback_settings("acme") == {"tone": {"enabled": True, "mode": "pair"}}  # concise had none

    store.set_feedback("acme", "concise", enabled=False)
    with pytest.raises(InvalidArgument, match="criteria feedback on --name concise"):
        with FeedbackModes(store, [tone, concise], "plackett_luce"):
            pass
    assert store.feedback_settings("acme") == {"tone": {"enabled": True, "mode": "pair"},  # a refused run
                                               "concise": {"enabled": False, "mode": "pair"}}  # changes nothing
