"""The trainer honours topic_prefix: the topic it consumes, its dead letters and its model updates."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.config import ConfigError
from trainer import runtime
from trainer.config import load_trainer_config, trainer_config


def test_the_consumed_topic_defaults_to_the_preferences_topic_under_the_prefix() -> None:
    assert trainer_config().stream.topic == "prefstream.preferences"
    cfg = load_trainer_config(env={"PREFSTREAM_TRAINER_TOPIC_PREFIX": "staging."})
    assert cfg.stream.topic_prefix == "staging." and cfg.stream.topic == "staging.prefstream.preferences"
    assert trainer_config(topic_prefix="staging.", topic="mine").stream.topic == "mine"  # an explicit topic is taken as is
    assert trainer_config(**cfg.to_dict()) == cfg  # what Ray workers rebuild from
    with pytest.raises(ConfigError, match="^topic_prefix: 'a b' may hold only"):
        trainer_config(topic_prefix="a b")


class _Recorded(Exception):
    pass


def test_dead_letters_and_model_updates_go_to_the_prefixed_topics(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import services.announce
    import services.kafka
    import services.redis_client

    cfg = trainer_config(topic_prefix="run7-", kafka_bootstrap="k:1", redis_url="redis://r:2/0",
                         checkpoint_url=str(tmp_path))
    announced: list[str] = []
    monkeypatch.setattr(services.kafka, "make_producer", lambda bootstrap: SimpleNamespace(close=lambda timeout: None))
    monkeypatch.setattr(services.redis_client, "connect", lambda url: object())
    monkeypatch.setattr(services.redis_client, "ping", lambda client: None)
    monkeypatch.setattr(services.announce, "KafkaAnnouncer", lambda producer, topic: announced.append(topic))
    services = runtime.connect_services(cfg)
    assert announced == ["run7-prefstream.model-updates"]

    consumed: dict = {}

    def source(bootstrap: str, topic: str, group_id: str, **kw: object) -> None:
        consumed.update(kw, topic=topic)
        raise _Recorded

    monkeypatch.setattr(runtime, "KafkaSource", source)
    point = SimpleNamespace(step=0, replay_records=(), eval_topic_records=(), source="base", records_count=0, offsets={})
    with pytest.raises(_Recorded):
        runtime.run_leader(cfg, _without_registry(services), point, learner=None)  # type: ignore[arg-type]
    assert consumed["topic"] == "run7-prefstream.preferences"
    assert consumed["dead_letter_topic"] == "run7-prefstream.dead-letter"


def _without_registry(services: runtime.Services) -> runtime.Services:
    """The same services without the registry, so run_leader builds no gate."""
    return runtime.Services(store=services.store, registry=None, producer=services.producer)
