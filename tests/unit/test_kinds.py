"""One type per kind: the StrEnums of services.kinds, their proto mapping, and data written before them.

Stored registry hashes and Kafka events carry the kinds as lower-case strings (Redis, JSON) or proto
enum names (proto3 JSON); both must still read back, and what is written now must be byte-identical.
"""

from __future__ import annotations

import json

import pytest

from prefstream.admin.v1 import admin_pb2
from prefstream.events.v1 import events_pb2
from services.errors import InvalidArgument
from services.kinds import FeedbackKind, ModelAction, ModelKind, ProtoStrEnum, Role, Split, VersionState
from services.registry import ModelRegistry, ModelVersion
from services.schemas import ModelUpdate, PreferenceRecord
from tests.unit.test_registry_logic import FakeRedis

KINDS: list[tuple[type[ProtoStrEnum], object, str]] = [
    (ModelKind, events_pb2.ModelKind, "MODEL_KIND_"),
    (FeedbackKind, events_pb2.FeedbackKind, "FEEDBACK_KIND_"),
    (ModelAction, events_pb2.ModelAction, "MODEL_ACTION_"),
    (VersionState, admin_pb2.VersionState, "VERSION_STATE_"),
    (Role, events_pb2.Role, "ROLE_"),
    (Split, events_pb2.Split, "SPLIT_"),
]


@pytest.mark.parametrize(("kind", "proto", "prefix"), KINDS, ids=[k[0].__name__ for k in KINDS])
def test_every_proto_value_has_exactly_one_member_and_maps_back(kind, proto, prefix) -> None:
    names = [n.removeprefix(prefix) for n in proto.keys() if n != prefix + "UNSPECIFIED"]
    assert [m.name for m in kind] == names
    for member in kind:
        assert member.value == member.name.lower()
        assert proto.Name(member.to_proto()) == prefix + member.name
        assert kind.from_proto(member.to_proto()) is member
    assert kind.from_proto(0) is None and kind.from_proto(99) is None


def test_parse_accepts_any_case_and_names_the_field_when_unknown() -> None:
    assert ModelKind.parse(" Policy ", "kind") is ModelKind.POLICY
    assert FeedbackKind.parse(FeedbackKind.EDIT, "source_kind") is FeedbackKind.EDIT
    with pytest.raises(InvalidArgument) as e:
        ModelKind.parse("critic", "kind")
    assert e.value.field == "kind" and "reward, policy" in str(e.value)


def test_an_old_stored_registry_hash_reads_back_as_enums_and_is_rewritten_identically() -> None:
    """Keys and JSON exactly as the registry wrote them when kinds were plain strings."""
    r = FakeRedis()
    old_v1 = {"name": "rm", "version": "v000001", "uri": "file:///ckpt/rm/v000001", "kind": "reward",
              "state": "rolled_back", "metrics": {"acc": 0.6}, "reason": "regressed", "records_seen": 10,
              "base_model": "minilm", "created_at": 1.5}
    old_v2 = {**old_v1, "version": "v000002", "uri": "file:///ckpt/rm/v000002", "state": "published", "reason": ""}
    r.hset("t:model:{rm}:state", mapping={"kind": "reward", "latest": "v000002", "pinned": "", "generation": 3})
    for v in (old_v1, old_v2):
        r.hset("t:model:{rm}:versions", v["version"], json.dumps(v, sort_keys=True))
    r.rpush("t:model:{rm}:order", "v000001", "v000002")
    r.sadd("t:models", "rm")
    reg = ModelRegistry(r, namespace="t")

    status = reg.status("rm")
    assert status.kind is ModelKind.REWARD and status.target_version == "v000002"
    versions = reg.versions("rm")
    assert [(v.state, v.kind) for v in versions] == [(VersionState.ROLLED_BACK, ModelKind.REWARD),
                                                     (VersionState.PUBLISHED, ModelKind.REWARD)]
    assert json.loads(json.dumps(versions[1].to_dict())) == old_v2  # written back as the same strings

    reg.pin("rm", "v000002")
    state = r.hgetall("t:model:{rm}:state")
    assert state[b"kind"] == b"reward" and state[b"pinned"] == b"v000002"


def test_an_old_kafka_model_update_and_preference_record_read_back() -> None:
    """proto3 JSON as producers wrote it (enum names), including records without a source kind."""
    update = ModelUpdate.from_kafka(json.dumps({
        "model_name": "rm", "version": "v000002", "action": "MODEL_ACTION_ROLLED_BACK", "kind": "MODEL_KIND_POLICY",
        "uri": "file:///ckpt/rm/v000002", "reason": "regressed"}).encode())
    assert (update.action, update.kind) == (ModelAction.ROLLED_BACK, ModelKind.POLICY)
    assert json.loads(update.to_kafka())["kind"] == "MODEL_KIND_POLICY"
    no_kind = ModelUpdate.from_kafka(b'{"model_name": "rm", "version": "v1", "action": "MODEL_ACTION_PUBLISHED"}')
    assert no_kind.kind is ModelKind.REWARD  # UNSPECIFIED: what the registry defaulted to before policies

    base = {"record_id": "pr_1", "prompt": [{"role": "ROLE_USER", "content": "hi"}], "ranked_responses": ["a", "b"]}
    assert PreferenceRecord.from_kafka(json.dumps({**base, "source_kind": "FEEDBACK_KIND_THUMBS"}).encode()).source_kind \
        is FeedbackKind.THUMBS
    assert PreferenceRecord.from_kafka(json.dumps(base).encode()).source_kind is FeedbackKind.IMPORT
    with pytest.raises(InvalidArgument, match="action"):
        ModelUpdate.from_kafka(b'{"model_name": "rm", "version": "v1"}')


def test_dataclasses_hold_enum_members_when_given_strings() -> None:
    assert ModelVersion(name="rm", version="v1", uri="file:///x", kind="policy", state="rejected").kind is ModelKind.POLICY
    assert ModelUpdate(model_name="rm", version="v1", action="pinned").action is ModelAction.PINNED
    with pytest.raises(InvalidArgument, match="source_kind"):
        PreferenceRecord(record_id="r", prompt=(), ranked_responses=("a", "b"), source_kind="survey")
