"""The model registry against the real session Redis (and Kafka for announcements).

Each test uses its own namespace, so tests share the session server without interfering.
"""

from __future__ import annotations

import threading
import uuid

import pytest
import redis

from services.errors import FailedPrecondition, NotFound
from services.announce import KafkaAnnouncer
from services.kafka import make_consumer, make_producer
from services.registry import ModelRegistry, ModelVersion
from services.schemas import ModelUpdate
from services.topics import MODEL_UPDATES

pytestmark = pytest.mark.integration


def _v(version: str, name: str = "rm", **kw: object) -> ModelVersion:
    return ModelVersion(name=name, version=version, uri=f"file:///ckpt/{name}/{version}",
                        metrics={"pairwise_accuracy": 0.61}, records_seen=1000, base_model="minilm", **kw)  # type: ignore[arg-type]


@pytest.fixture
def ns() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def test_publish_pin_rollback_on_real_redis(redis_client: redis.Redis, ns: str) -> None:
    reg = ModelRegistry(redis_client, namespace=ns)
    reg.publish(_v("v000001"))
    reg.publish(_v("v000002"))
    reg.reject(_v("v000003"), "pairwise accuracy 0.49 < 0.55")
    assert reg.target("rm").version == "v000002"
    assert reg.pin("rm", "v000001").target_version == "v000001"
    with pytest.raises(FailedPrecondition, match="rejected"):
        reg.pin("rm", "v000003")
    with pytest.raises(NotFound):
        reg.pin("rm", "v000042")
    reg.unpin("rm")
    status = reg.rollback("rm", "bad outputs in production")
    assert (status.pinned_version, status.target_version) == ("v000001", "v000001")
    assert reg.get("rm", "v000002").state == "rolled_back"
    assert [v.version for v in reg.versions("rm", include_rejected=True)] == ["v000001", "v000002", "v000003"]
    # A second client sees the same state: nothing is cached in the registry object.
    assert ModelRegistry(redis.Redis.from_url(_url(redis_client)), namespace=ns).status("rm") == reg.status("rm")


def _url(client: redis.Redis) -> str:
    """The URL of ``client``'s server, its password included (the stack's Redis requires one)."""
    kw = client.connection_pool.connection_kwargs
    auth = f":{kw['password']}@" if kw.get("password") else ""
    return f"redis://{auth}{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def test_concurrent_publishers_lose_nothing(redis_client: redis.Redis, ns: str) -> None:
    url = _url(redis_client)
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        reg = ModelRegistry(redis.Redis.from_url(url), namespace=ns)
        try:
            for i in range(10):
                reg.publish(_v(f"w{w}-{i:03d}"))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    reg = ModelRegistry(redis_client, namespace=ns)
    assert len(reg.versions("rm")) == 40
    assert reg.generation("rm") == 40 and reg.generation() == 40


def test_changes_are_announced_on_the_model_updates_topic(redis_client: redis.Redis, kafka_bootstrap: str, ns: str) -> None:
    producer = make_producer(kafka_bootstrap)
    name = f"rm-{ns}"
    consumer = make_consumer(kafka_bootstrap, group_id=None)
    from kafka import TopicPartition

    tp = TopicPartition(MODEL_UPDATES.name, 0)
    consumer.assign([tp])
    consumer.seek_to_end(tp)
    start = consumer.position(tp)
    try:
        reg = ModelRegistry(redis_client, namespace=ns, announcer=KafkaAnnouncer(producer, MODEL_UPDATES.name))
        reg.publish(_v("v000001", name=name))
        reg.publish(_v("v000002", name=name))
        reg.rollback(name, "regressed")
        consumer.seek(tp, start)
        got: list[ModelUpdate] = []
        for _ in range(20):
            for records in consumer.poll(timeout_ms=500).values():
                got += [ModelUpdate.from_kafka(r.value) for r in records]
            mine = [u for u in got if u.model_name == name]
            if len(mine) >= 4:
                break
        assert [(u.action, u.version) for u in mine] == [
            ("published", "v000001"), ("published", "v000002"), ("rolled_back", "v000002"), ("pinned", "v000001")]
        assert mine[0].uri == f"file:///ckpt/{name}/v000001" and mine[2].reason == "regressed"
    finally:
        consumer.close()
        producer.close()


def test_registry_survives_a_redis_restart(stack, redis_client: redis.Redis, ns: str) -> None:  # type: ignore[no-untyped-def]
    reg = ModelRegistry(redis_client, namespace=ns)
    reg.publish(_v("v000001"))
    reg.publish(_v("v000002"))
    reg.pin("rm", "v000001")
    before = (reg.status("rm"), reg.versions("rm"), reg.generation("rm"))

    stack.stop_component("redis")
    stack.up()  # restarts only what is down; Redis reloads its append-only file

    fresh = ModelRegistry(redis.Redis.from_url(_url(redis_client)), namespace=ns)
    assert (fresh.status("rm"), fresh.versions("rm"), fresh.generation("rm")) == before
    assert fresh.target("rm").version == "v000001"
