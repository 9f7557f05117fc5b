"""The event codec: how one event message is written as a Kafka record value, and read back.

Each Kafka record value is the proto3 JSON of one event message (field names as in the .proto,
snake_case), so producers that write JSON lines directly use the same schema as the gRPC API.

The codec is a runtime contract, not Kafka access: the domain types (:mod:`services.schemas`) and
the scorer's client SDK use it without a broker, so this module needs only protobuf and imports
nothing of kafka-python (:mod:`services.kafka` holds the producers and consumers).
"""

from __future__ import annotations

import json
from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from services.errors import InvalidArgument

M = TypeVar("M", bound=Message)


def encode_event(message: Message) -> bytes:
    """The proto3 JSON (snake_case field names, compact) of ``message``, UTF-8 encoded."""
    as_dict = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return json.dumps(as_dict, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode_event(data: bytes | str, cls: type[M], *, what: str | None = None) -> M:
    """Parse proto3 JSON into ``cls``; malformed input raises InvalidArgument naming the problem.

    Unknown fields are rejected (a typo must not silently drop data).
    """
    what = what or cls.DESCRIPTOR.name
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as e:
        raise InvalidArgument(what, f"record is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(what, f"record is not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(obj, dict):
        raise InvalidArgument(what, f"record must be a JSON object, got {type(obj).__name__}")
    try:
        return json_format.ParseDict(obj, cls())
    except json_format.ParseError as e:
        raise InvalidArgument(what, f"does not match the {cls.DESCRIPTOR.full_name} schema: {e}") from None
