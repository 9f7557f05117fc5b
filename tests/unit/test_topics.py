"""services.topics: one prefix rule turns a base topic into the name every service uses."""

from __future__ import annotations

import pytest

from services import topics
from services.topics import MODEL_UPDATES, PREFERENCES, TOPICS, check_prefix, prefixed, topic_name


def test_the_prefix_goes_in_front_of_every_topic_model_updates_included() -> None:
    assert topic_name(MODEL_UPDATES) == "prefstream.model-updates"
    assert topic_name(MODEL_UPDATES, "staging.") == "staging.prefstream.model-updates"
    assert topic_name(PREFERENCES, "t1.") == "t1.prefstream.preferences"


def test_prefixed_specs_keep_partitions_and_configs() -> None:
    specs = prefixed(TOPICS, "run-7.")
    assert [s.name for s in specs] == ["run-7." + t.name for t in TOPICS]
    assert [(s.partitions, dict(s.configs)) for s in specs] == [(t.partitions, dict(t.configs)) for t in TOPICS]
    assert next(s for s in specs if s.name.endswith("model-updates")).partitions == 1


@pytest.mark.parametrize("bad", ["has space.", "slash/", "ü.", "x" * 240])
def test_a_prefix_kafka_would_refuse_is_rejected_naming_the_field(bad: str) -> None:
    assert check_prefix(bad) is not None
    with pytest.raises(ValueError, match="topic_prefix"):
        topic_name(MODEL_UPDATES, bad)


def test_gateway_and_scorer_configs_validate_the_prefix() -> None:
    from gateway.config import load_gateway_config
    from scorer.config import load_scorer_config
    from services.config import ConfigError

    assert load_gateway_config(env={}, overrides={"topic_prefix": "a."}).topic(topics.MODEL_UPDATES) == "a.prefstream.model-updates"
    with pytest.raises(ConfigError, match="topic_prefix"):
        load_gateway_config(env={}, overrides={"topic_prefix": "bad prefix"})
    assert load_scorer_config(env={}, overrides={"topic_prefix": "a."}).topic_prefix == "a."
    with pytest.raises(ConfigError, match="topic_prefix"):
        load_scorer_config(env={}, overrides={"topic_prefix": "bad/prefix"})


def test_topics_replicate_three_ways_with_two_in_sync_on_a_cluster_of_three() -> None:
    from services.topics import FEEDBACK, MODEL_UPDATES, creation_settings

    assert creation_settings(FEEDBACK, 1)["replication_factor"] == 1
    assert "min.insync.replicas" not in creation_settings(FEEDBACK, 1)["configs"]
    three = creation_settings(FEEDBACK, 3)
    assert three["replication_factor"] == 3 and three["configs"]["min.insync.replicas"] == "2"
    assert creation_settings(FEEDBACK, 5)["replication_factor"] == 3
    assert creation_settings(MODEL_UPDATES, 3)["configs"]["min.insync.replicas"] == "1"  # its own setting wins
