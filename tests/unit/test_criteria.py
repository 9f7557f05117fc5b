"""Criteria definitions: parsing every field, the error naming the bad one, and the dict round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.criteria import Criterion, Rule, RewardSpec, TieBreaker, parse_criterion, split_ref
from services.errors import InvalidArgument

DOCS = Path(__file__).resolve().parents[2] / "docs" / "criteria"


def _bad(data: dict, field: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match) as e:
        parse_criterion(data)
    assert e.value.field == field


def test_a_rule_criterion_parses_with_defaults() -> None:
    c = parse_criterion({"name": "concise", "rules": [{"max_words": 50}, {"regex_must_not_match": "as an ai",
                                                                            "flags": "i"}]})
    assert c == Criterion(name="concise", project="default", rules=(Rule("max_words", 50),
                                                                  Rule("regex_must_not_match", "as an ai", "i")))
    assert (c.kind, c.mode, c.weight, c.ref) == ("rules", "all", 1.0, "concise")


def test_reward_judge_and_tie_breaker_forms() -> None:
    c = parse_criterion({"name": "helpful", "reward": "helpfulness", "tie_breaker": "rm2", "weight": 2})
    assert c.reward == RewardSpec("helpfulness")
    assert c.tie_breaker == TieBreaker("reward_model", "rm2")
    assert c.models() == {"helpfulness": "reward", "rm2": "reward"}
    c = parse_criterion({"name": "polite", "judge": {"model": "smol", "question": "Is the reply polite?"},
                         "tie_breaker": {"criterion": "concise"}})
    assert c.kind == "judge" and c.models() == {"smol": "policy"}
    assert c.tie_breaker == TieBreaker("criterion", "concise")


@pytest.mark.parametrize("data,field,match", [
    ({"name": "c", "rules": [{"max_words": 5}, {"regex_must_match": "a("}]}, "rules[1].regex_must_match",
     r"bad regex 'a\(': missing \), unterminated subpattern at position 1"),
    ({"name": "c", "rules": [{"max_wrds": 5}]}, "rules[0].max_wrds", "unknown rule; known rules: max_words, min_words"),
    ({"name": "c", "rules": [{"max_words": 5, "min_words": 1}]}, "rules[0]", "exactly one rule"),
    ({"name": "c", "rules": [{"max_words": -1}]}, "rules[0].max_words", ">= 0"),
    ({"name": "c", "rules": [{"max_words": True}]}, "rules[0].max_words", "whole number"),
    ({"name": "c", "rules": [{"max_words": 5, "flags": "i"}]}, "rules[0].flags", "takes no flags"),
    ({"name": "c", "rules": [{"regex_must_match": "a", "flags": "q"}]}, "rules[0].flags", "unknown flag 'q'"),
    ({"name": "c", "rules": [{"contains_any": []}]}, "rules[0].contains_any", "non-empty list"),
    ({"name": "c", "rules": [{"contains_any": ["x"], "flags": "m"}]}, "rules[0].flags", "only the flag 'i'"),
    ({"name": "c", "rules": [{"contains_none": ["ok", ""]}]}, "rules[0].contains_none[1]", "is empty"),
    ({"name": "c", "rules": [{"json_valid": False}]}, "rules[0].json_valid", "json_valid: true"),
    ({"name": "c", "rules": "max_words: 5"}, "rules", "must be a list"),
    ({"name": "c", "rules": [{"max_words": 5}], "weight": 0}, "weight", "must be > 0"),
    ({"name": "c", "rules": [{"max_words": 5}], "weight": -1.5}, "weight", "must be > 0"),
    ({"name": "c", "rules": [{"max_words": 5}], "weight": float("nan")}, "weight", "finite"),
    ({"name": "c", "rules": [{"max_words": 5}], "mode": "any"}, "mode", "unknown mode"),
    ({"name": "c"}, "rules", "exactly one of rules, reward or judge"),
    ({"name": "c", "rules": [{"max_words": 5}], "reward": "rm"}, "reward", "exactly one of rules, reward or judge"),
    ({"name": "c", "reward": {"model": "rm", "treshold": 1}}, "reward.treshold", "unknown field"),
    ({"name": "c", "reward": {"model": "a b"}}, "reward.model", "not a valid"),
    ({"name": "c", "reward": {"model": "rm", "threshold": "high"}}, "reward.threshold", "must be a number"),
    ({"name": "c", "judge": {"model": "smol", "question": " "}}, "judge.question", "is empty"),
    ({"name": "c", "rules": [{"max_words": 5}], "tie_breaker": {"criterion": "c"}}, "tie_breaker.criterion",
     "its own ties"),
    ({"name": "c", "rules": [{"max_words": 5}], "colour": "red"}, "colour", "unknown field"),
    ({"name": "bad name", "rules": [{"max_words": 5}]}, "name", "not a valid name"),
])
def test_invalid_definitions_name_the_field(data: dict, field: str, match: str) -> None:
    _bad(data, field, match)


def test_project_from_the_caller_must_agree_with_the_file() -> None:
    assert parse_criterion({"name": "c", "rules": [{"json_valid": True}]}, project="acme").project == "acme"
    with pytest.raises(InvalidArgument) as e:
        parse_criterion({"name": "c", "project": "a", "rules": [{"json_valid": True}]}, project="b")
    assert e.value.field == "project"


def test_to_dict_round_trips_and_the_digest_ignores_version_and_description() -> None:
    data = {"name": "mixed", "project": "p", "description": "why", "mode": "mean", "weight": 0.5,
            "rules": [{"contains_any": ["Yes", "No"], "flags": "i"}, {"regex_must_match": "^[A-Z]", "flags": "ms"},
                      {"min_words": 2}, {"json_valid": True}],
            "tie_breaker": {"reward_model": "rm"}}
    c = parse_criterion(data)
    assert parse_criterion(c.to_dict()) == c
    assert Criterion.from_dict(c.to_dict()) == c
    import dataclasses

    v2 = dataclasses.replace(c, version="v2", description="reworded")
    assert parse_criterion(v2.to_dict()) == v2
    assert v2.digest() == c.digest()
    assert dataclasses.replace(c, weight=0.6).digest() != c.digest()


def test_split_ref() -> None:
    assert split_ref("concise") == ("concise", "")
    assert split_ref("concise@v12") == ("concise", "v12")
    with pytest.raises(InvalidArgument, match="v1, v2"):
        split_ref("concise@latest")
    with pytest.raises(InvalidArgument):
        split_ref("")


@pytest.mark.parametrize("path", sorted(DOCS.glob("*.yaml")), ids=lambda p: p.name)
def test_the_documented_examples_parse(path: Path) -> None:
    c = parse_criterion(yaml.safe_load(path.read_text()))
    assert parse_criterion(c.to_dict()) == c


# -- the store's pure decisions ------------------------------------------------------------------------


def test_plan_version_keeps_identical_content_and_numbers_new_content() -> None:
    from services.criteria_store import plan_version

    c = parse_criterion({"name": "c", "rules": [{"max_words": 5}]})
    assert plan_version(c, {}, 0) == ("v1", True)
    assert plan_version(c, {c.digest(): "v1"}, 1) == ("v1", False)
    changed = parse_criterion({"name": "c", "rules": [{"max_words": 6}]})
    assert plan_version(changed, {c.digest(): "v1"}, 1) == ("v2", True)
    assert plan_version(c, {}, 7) == ("v8", True)  # numbers are never reused after a delete


def test_plan_delete_names_every_user_unless_forced() -> None:
    from services.criteria_store import CriterionInUse, live_holders, plan_delete

    plan_delete("p", "c", [], [], force=False)
    with pytest.raises(CriterionInUse, match="holder scorer-0, criterion strict \\(its tie-breaker\\).*--force") as e:
        plan_delete("p", "c", ["scorer-0"], ["strict"], force=False)
    assert e.value.field == "name"
    plan_delete("p", "c", ["scorer-0"], ["strict"], force=True)
    assert live_holders([("b", float("inf")), ("a", 150.0), ("dead", 99.0)], now=100.0) == ["a", "b"]


# -- the command line (no Redis: parsing only) -----------------------------------------------------------


def test_definition_files_hold_one_a_list_or_several_documents(tmp_path: Path) -> None:
    from services.criteria_cli import read_definitions

    (tmp_path / "one.yaml").write_text("name: a\nrules: [{max_words: 5}]\n")
    (tmp_path / "docs.yaml").write_text("name: a\nrules: [{max_words: 5}]\n---\n"
                                        "name: b\nrules: [{json_valid: true}]\n")
    (tmp_path / "list.json").write_text('[{"name": "a", "rules": [{"max_words": 5}]}, {"name": "b", "reward": "rm"}]')
    assert [d["name"] for d in read_definitions(str(tmp_path / "one.yaml"))] == ["a"]
    assert [d["name"] for d in read_definitions(str(tmp_path / "docs.yaml"))] == ["a", "b"]
    assert [d["name"] for d in read_definitions(str(tmp_path / "list.json"))] == ["a", "b"]
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    cases = [("bad.json", "not valid JSON"), ("empty.yaml", "no criterion"), ("missing.yaml", "cannot read")]
    for name, match in cases:
        with pytest.raises(InvalidArgument, match=match) as e:
            read_definitions(str(tmp_path / name))
        assert e.value.field == "file"


def test_the_criteria_commands_are_registered() -> None:
    from prefstream.cli import build_parser

    args = build_parser().parse_args(["criteria", "delete", "concise", "--force", "--reason", "gone",
                                      "--project", "acme"])
    assert (args.name, args.force, args.reason, args.project) == ("concise", True, "gone", "acme")
    args = build_parser().parse_args(["criteria", "show", "concise@v2", "--json"])
    assert (args.criterion, args.json) == ("concise@v2", True)
    args = build_parser().parse_args(["criteria", "create", "f.yaml", "--skip-model-check"])
    assert (args.file, args.skip_model_check, args.project) == ("f.yaml", True, None)


def test_redis_connection_errors_become_unavailable_naming_the_store() -> None:
    import redis

    from services.criteria_store import CriteriaStore
    from services.errors import Unavailable

    class Down:
        connection_pool = type("Pool", (), {"connection_kwargs": {"host": "10.0.0.9", "port": 6379}})()

        def lindex(self, key: str, index: int) -> None:
            raise redis.ConnectionError("refused")

    with pytest.raises(Unavailable, match="criteria store: Redis at 10.0.0.9:6379 is unreachable"):
        CriteriaStore(Down()).get("acme", "concise")  # type: ignore[arg-type]
