"""Model registry logic: pure transitions, and the Redis-backed registry over an in-memory fake client.

The fake implements only the redis-py calls the registry makes (hashes, lists, sets, counters and
WATCH/MULTI/EXEC pipelines, with a hook to simulate a concurrent writer); the real-Redis behaviour is
covered by tests/integration/test_registry.py.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import redis

from prefstream.admin.v1.admin_pb2 import VersionState
from services.announce import RecordingAnnouncer
from services.errors import FailedPrecondition, InvalidArgument, NotFound
from services.registry import (ModelNotFound, ModelRegistry, ModelState, ModelStatus, ModelVersion, RegistryConflict,
                               VersionNotFound, plan_pin, plan_publish, plan_reject, plan_rollback, plan_unpin)
from services.schemas import ModelUpdate


class FakeRedis:
    """Enough of redis.Redis for the registry: bytes values like a real client without decode_responses."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.versions: dict[str, int] = {}  # per-key write counter, for WATCH
        self.before_exec: Callable[[], None] | None = None

    def _touch(self, key: str) -> None:
        self.versions[key] = self.versions.get(key, 0) + 1

    @staticmethod
    def _b(v: Any) -> bytes:
        return v if isinstance(v, bytes) else str(v).encode()

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        return dict(self.data.get(key, {}))

    def hget(self, key: str, field: str) -> bytes | None:
        return self.data.get(key, {}).get(self._b(field))

    def hmget(self, key: str, fields: list[str]) -> list[bytes | None]:
        return [self.hget(key, f) for f in fields]

    def hset(self, key: str, field: str | None = None, value: Any = None, mapping: dict | None = None) -> None:
        h = self.data.setdefault(key, {})
        for k, v in ({field: value} if mapping is None else mapping).items():
            h[self._b(k)] = self._b(v)
        self._touch(key)

    def exists(self, key: str) -> int:
        return int(key in self.data)

    def lrange(self, key: str, start: int, end: int) -> list[bytes]:
        items = self.data.get(key, [])
        return items[start:] if end == -1 else items[start:end + 1]

    def rpush(self, key: str, *values: Any) -> None:
        self.data.setdefault(key, []).extend(self._b(v) for v in values)
        self._touch(key)

    def sadd(self, key: str, *values: Any) -> None:
        self.data.setdefault(key, set()).update(self._b(v) for v in values)
        self._touch(key)

    def smembers(self, key: str) -> set[bytes]:
        return set(self.data.get(key, set()))

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def incr(self, key: str) -> int:
        self.data[key] = self._b(int(self.data.get(key, b"0")) + 1)
        self._touch(key)
        return int(self.data[key])

    def pipeline(self) -> "FakePipeline":
        return FakePipeline(self)


class FakePipeline:
    def __init__(self, r: FakeRedis) -> None:
        self.r, self.watched, self.queue, self.buffering = r, {}, [], False

    def __enter__(self) -> "FakePipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.watched, self.queue = {}, []

    def watch(self, *keys: str) -> None:
        self.watched = {k: self.r.versions.get(k, 0) for k in keys}

    def unwatch(self) -> None:
        self.watched = {}

    def multi(self) -> None:
        self.buffering = True

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.r, name)
        if not self.buffering:
            return fn
        return lambda *a, **kw: self.queue.append((fn, a, kw))

    def execute(self) -> list[Any]:
        if self.r.before_exec is not None:
            hook, self.r.before_exec = self.r.before_exec, None
            hook()
        if any(self.r.versions.get(k, 0) != v for k, v in self.watched.items()):
            raise redis.WatchError("watched key changed")
        return [fn(*a, **kw) for fn, a, kw in self.queue]


def _v(version: str, name: str = "rm", **kw: Any) -> ModelVersion:
    return ModelVersion(name=name, version=version, uri=f"file:///ckpt/{name}/{version}", metrics={"acc": 0.6},
                        records_seen=100, base_model="minilm", created_at=1_700_000_000.5, **kw)


@pytest.fixture
def recorder() -> RecordingAnnouncer:
    return RecordingAnnouncer()


@pytest.fixture
def announced(recorder: RecordingAnnouncer) -> list[ModelUpdate]:
    return recorder.updates


@pytest.fixture
def reg(recorder: RecordingAnnouncer) -> ModelRegistry:
    return ModelRegistry(FakeRedis(), namespace="t", announcer=recorder)


# ---------------------------------------------------------------------------------------------
# Pure transitions.


def test_publish_moves_latest_and_bumps_generation() -> None:
    st = plan_publish(ModelState(name="rm"), _v("v000001")).state
    st = plan_publish(st, _v("v000002")).state
    assert (st.kind, st.latest, st.pinned, st.target, st.generation) == ("reward", "v000002", "", "v000002", 2)
    assert st.order == ("v000001", "v000002")


def test_republishing_the_same_record_is_a_no_op_but_a_different_one_conflicts() -> None:
    st = plan_publish(ModelState(name="rm"), _v("v000001")).state
    assert not plan_publish(st, _v("v000001")).changed
    with pytest.raises(RegistryConflict, match="already has version"):
        plan_publish(st, ModelVersion(name="rm", version="v000001", uri="file:///elsewhere"))
    with pytest.raises(RegistryConflict, match="reward model"):
        plan_publish(st, _v("v000002", kind="policy"))


def test_rejected_version_never_becomes_current_or_pinnable() -> None:
    st = plan_publish(ModelState(name="rm"), _v("v000001")).state
    plan = plan_reject(st, _v("v000002"), "pairwise accuracy 0.48 < 0.55")
    st = plan.state
    assert st.latest == "v000001" and st.versions["v000002"].state == "rejected"
    assert st.versions["v000002"].reason == "pairwise accuracy 0.48 < 0.55"
    assert [u.action for u in plan.updates] == ["rejected"]
    with pytest.raises(RegistryConflict, match="only published versions can be pinned") as e:
        plan_pin(st, "v000002")
    assert e.value.field == "version"
    with pytest.raises(InvalidArgument, match="reason"):
        plan_reject(st, _v("v000003"), "  ")


def test_pin_and_unpin() -> None:
    st = ModelState(name="rm")
    for v in ("v000001", "v000002", "v000003"):
        st = plan_publish(st, _v(v)).state
    st = plan_pin(st, "v000001").state
    assert (st.target, st.pinned, st.latest) == ("v000001", "v000001", "v000003")
    st = plan_publish(st, _v("v000004")).state  # the pin holds whatever the trainer publishes
    assert st.target == "v000001" and st.latest == "v000004"
    assert not plan_pin(st, "v000001").changed
    st = plan_unpin(st).state
    assert st.target == "v000004"
    assert not plan_unpin(st).changed
    with pytest.raises(VersionNotFound, match="v000009"):
        plan_pin(st, "v000009")
    with pytest.raises(ModelNotFound):
        plan_pin(ModelState(name="nope"), "v000001")


def test_rollback_marks_current_and_pins_the_previous_published() -> None:
    st = ModelState(name="rm")
    st = plan_publish(st, _v("v000001")).state
    st = plan_reject(st, _v("v000002"), "worse").state
    st = plan_publish(st, _v("v000003")).state
    plan = plan_rollback(st, "users complain")
    st = plan.state
    assert st.pinned == "v000001" and st.target == "v000001"  # skips the rejected v000002
    assert st.versions["v000003"].state == "rolled_back" and st.versions["v000003"].reason == "users complain"
    assert st.latest == "v000001"  # unpinning later cannot bring back the rolled-back version
    assert [(u.action, u.version) for u in plan.updates] == [("rolled_back", "v000003"), ("pinned", "v000001")]
    with pytest.raises(RegistryConflict, match="no published version before 'v000001'"):
        plan_rollback(st, "again")


def test_rollback_needs_a_published_target_and_a_reason() -> None:
    st = plan_reject(ModelState(name="rm"), _v("v000001"), "bad").state
    with pytest.raises(RegistryConflict, match="no published version to roll back"):
        plan_rollback(st, "x")
    with pytest.raises(InvalidArgument, match="reason"):
        plan_rollback(st, "")


def test_versions_serving_refused_are_never_pinned_nor_rolled_back_to() -> None:
    import dataclasses

    st = ModelState(name="rm")
    for v in ("v000001", "v000002", "v000003", "v000004"):
        st = plan_publish(st, _v(v)).state
    st = dataclasses.replace(st, refused={"v000003": "corrupt: checksum mismatch", "v000004": "nonfinite"})
    with pytest.raises(RegistryConflict, match="refused by serving .corrupt"):
        plan_pin(st, "v000003")
    assert st.newest_published() == "v000004" and st.newest_published(servable=True) == "v000002"
    rolled = plan_rollback(st, "v000004 is broken").state
    assert rolled.pinned == "v000002" and rolled.versions["v000004"].state == "rolled_back"


def test_version_validation_names_the_field() -> None:
    with pytest.raises(InvalidArgument, match="uri"):
        plan_publish(ModelState(name="rm"), ModelVersion(name="rm", version="v1", uri=""))
    with pytest.raises(InvalidArgument, match="metrics.acc"):
        plan_publish(ModelState(name="rm"), ModelVersion(name="rm", version="v1", uri="file:///x", metrics={"acc": float("nan")}))
    with pytest.raises(InvalidArgument, match="kind"):
        plan_publish(ModelState(name="rm"), ModelVersion(name="rm", version="v1", uri="file:///x", kind="critic"))
    with pytest.raises(InvalidArgument, match="version"):
        plan_publish(ModelState(name="rm"), ModelVersion(name="rm", version="a b", uri="file:///x"))


# ---------------------------------------------------------------------------------------------
# Protos.


def test_model_version_and_status_round_trip_through_protos() -> None:
    v = _v("v000007", state="rolled_back", reason="regressed")
    msg = v.to_proto()
    assert msg.state == VersionState.VERSION_STATE_ROLLED_BACK and msg.metrics["acc"] == pytest.approx(0.6)
    assert ModelVersion.from_proto(msg, name="rm") == v
    s = ModelStatus(name="rm", kind="policy", latest_version="v2", pinned_version="v1", target_version="v1",
                    serving_version="v1")
    assert ModelStatus.from_proto(s.to_proto()) == s


# ---------------------------------------------------------------------------------------------
# The registry over the fake client.


def test_registry_publish_pin_rollback_and_announcements(reg: ModelRegistry, announced: list[ModelUpdate]) -> None:
    assert reg.target("rm") is None and reg.generation("rm") == 0
    reg.publish(_v("v000001"))
    reg.publish(_v("v000002"))
    reg.reject(_v("v000003"), "accuracy fell")
    assert reg.target("rm").version == "v000002"
    assert [v.version for v in reg.versions("rm")] == ["v000001", "v000002"]
    assert [v.version for v in reg.versions("rm", include_rejected=True)] == ["v000001", "v000002", "v000003"]
    assert reg.get("rm", "v000003").reason == "accuracy fell"
    g = reg.generation("rm")

    status = reg.rollback("rm", "bad outputs")
    assert (status.pinned_version, status.target_version, status.latest_version) == ("v000001", "v000001", "v000001")
    assert reg.generation("rm") == g + 1 and reg.generation() == 4
    assert reg.get("rm", "v000002").state == "rolled_back"
    assert [(u.action, u.version) for u in announced] == [
        ("published", "v000001"), ("published", "v000002"), ("rejected", "v000003"),
        ("rolled_back", "v000002"), ("pinned", "v000001")]

    reg.publish(_v("v000004"))
    assert reg.target("rm").version == "v000001"
    assert reg.unpin("rm").target_version == "v000004"
    assert [m.name for m in reg.list_models()] == ["rm"]
    assert reg.status("rm").kind == "reward"


def test_registry_errors_map_to_not_found_and_failed_precondition(reg: ModelRegistry) -> None:
    with pytest.raises(NotFound, match="no model named 'ghost'"):
        reg.status("ghost")
    with pytest.raises(NotFound):
        reg.get("ghost", "v1")
    reg.publish(_v("v000001"))
    with pytest.raises(NotFound, match="no version 'v9'"):
        reg.get("rm", "v9")
    with pytest.raises(FailedPrecondition, match="no published version before"):
        reg.rollback("rm", "nothing earlier")


def test_registry_retries_when_a_concurrent_writer_interleaves(reg: ModelRegistry) -> None:
    reg.publish(_v("v000001"))
    fake: FakeRedis = reg._r  # type: ignore[assignment]
    other = ModelRegistry(fake, namespace="t")
    fake.before_exec = lambda: other.publish(_v("v000002"))
    reg.publish(_v("v000003"))
    assert [v.version for v in reg.versions("rm")] == ["v000001", "v000002", "v000003"]
    assert reg.status("rm").latest_version == "v000003" and reg.generation("rm") == 3


def test_a_failing_announce_does_not_undo_the_change() -> None:
    class Broken:
        def announce(self, update: ModelUpdate) -> None:
            raise ConnectionError("kafka down")

    reg = ModelRegistry(FakeRedis(), namespace="t", announcer=Broken())
    reg.publish(_v("v000001"))
    assert reg.target("rm").version == "v000001"


def test_redis_connection_errors_become_unavailable() -> None:
    from services.errors import Unavailable

    class Down(FakeRedis):
        def hgetall(self, key: str) -> dict:
            raise redis.ConnectionError("refused")

    with pytest.raises(Unavailable, match="unreachable"):
        ModelRegistry(Down()).status("rm")


def test_the_recording_announcer_sees_each_committed_change_once() -> None:
    recorder = RecordingAnnouncer()
    reg = ModelRegistry(FakeRedis(), namespace="t", announcer=recorder)
    reg.publish(_v("v000001"))
    reg.publish(_v("v000001"))  # an idempotent retry commits nothing, so announces nothing
    reg.pin("rm", "v000001")
    assert [(u.action, u.version, u.kind) for u in recorder.updates] == [
        ("published", "v000001", "reward"), ("pinned", "v000001", "reward")]


def test_the_kafka_announcer_sends_the_update_keyed_by_model_and_waits_for_the_ack() -> None:
    from services.announce import KafkaAnnouncer

    class Acked:
        def __init__(self) -> None:
            self.waited: float | None = None

        def get(self, timeout: float) -> str:
            self.waited = timeout
            return "meta"

    class Producer:
        def __init__(self) -> None:
            self.sent: list[tuple[str, bytes, bytes | None]] = []
            self.future = Acked()

        def send(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None) -> Acked:
            self.sent.append((topic, value, key))
            return self.future

    producer = Producer()
    reg = ModelRegistry(FakeRedis(), namespace="t", announcer=KafkaAnnouncer(producer, "updates", timeout_s=5.0))
    reg.publish(_v("v000001"))
    [(topic, value, key)] = producer.sent
    assert (topic, key, producer.future.waited) == ("updates", b"rm", 5.0)
    assert ModelUpdate.from_kafka(value).action == "published"
