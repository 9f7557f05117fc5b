"""The event codec: how one event message is written as a Kafka record value, and read back.

Each Kafka record value is the proto3 JSON of one event message (field names as in the .proto,
snake_case), so producers that write JSON lines directly use the same schema as the gRPC API.

The codec is a runtime contract, not Kafka access: the domain types (:mod:`services.schemas`) and
the scorer's client SDK use it without a broker, so this module needs only protobuf and imports
nothing of kafka-python (:mod:`services.kafka` holds the producers and consumers).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from services.errors import InvalidArgument

M = TypeVar("M", bound=Message)


def encode_event(message: Message) -> bytes:
    """The proto3 JSON (snake_case field names, compact) of ``message``, UTF-8 encoded."""
    as_dict = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return json.dumps(as_dict, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


#: The deepest JSON an untrusted body, record or header may nest (events need about 6 levels).
MAX_JSON_DEPTH = 64
#: Integers JSON may carry: what fits a uint64 or an int64 (protobuf's widest).
MAX_JSON_INT = 2**64 - 1


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows; send a finite number")


def load_json(data: bytes | str, what: str, *, kind: str = "is") -> Any:
    """Parse untrusted JSON; anything a JSON parser or the code after it could choke on is refused with
    InvalidArgument naming the place: bytes that are not UTF-8, invalid JSON, NaN or Infinity,
    nesting deeper than ``MAX_JSON_DEPTH``, integers no protobuf field can hold, and strings with
    lone UTF-16 surrogates (which cannot be written as UTF-8).  ``what`` names the whole value
    (``body``, ``op-criteria``, a record); errors inside it name the path (``events[2].seq``).
    """
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as e:
        raise InvalidArgument(what, f"{kind} not UTF-8 ({e.reason} at byte {e.start}); send UTF-8 text") from None
    try:
        obj = json.loads(text, parse_constant=_constant)
    except json.JSONDecodeError as e:
        raise InvalidArgument(what, f"{kind} not valid JSON ({e.msg} at position {e.pos})") from None
    except RecursionError:
        raise InvalidArgument(what, f"nests deeper than {MAX_JSON_DEPTH} levels; flatten it") from None
    except ValueError as e:  # NaN / Infinity, or an integer literal longer than Python reads
        raise InvalidArgument(what, f"{kind} not valid JSON: {e}") from None
    check_json(obj, what)
    return obj


def check_json(obj: Any, what: str) -> None:
    """The checks of :func:`load_json` on an already parsed value (iterative: depth cannot hurt it)."""
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        where = ".".join(p for p in (what if what != "body" else "", path) if p).replace(".[", "[") or what
        if isinstance(value, dict):
            if depth >= MAX_JSON_DEPTH:
                raise InvalidArgument(where, f"nests deeper than {MAX_JSON_DEPTH} levels; flatten it")
            for k, v in value.items():
                _check_text(k, where, "has a key")
                stack.append((v, f"{path}.{k}" if path else str(k), depth + 1))
        elif isinstance(value, list):
            if depth >= MAX_JSON_DEPTH:
                raise InvalidArgument(where, f"nests deeper than {MAX_JSON_DEPTH} levels; flatten it")
            for i, v in enumerate(value):
                stack.append((v, f"{path}[{i}]", depth + 1))
        elif isinstance(value, str):
            _check_text(value, where, "is a string")
        elif isinstance(value, int) and not isinstance(value, bool) and not -MAX_JSON_INT <= value <= MAX_JSON_INT:
            raise InvalidArgument(where, f"is an integer of {len(str(abs(value)))} digits; the largest accepted is "
                                         f"{MAX_JSON_INT} (2^64 - 1)")


def _check_text(value: str, where: str, what: str) -> None:
    if value.isascii():  # the common case: nothing to check
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgument(where, f"{what} with a lone UTF-16 surrogate at character {e.start}; "
                                     "send valid Unicode (pair surrogates or use the character itself)") from None


def _enum_prefix(enum: Any) -> str:
    """``ROLE_`` for Role (ROLE_UNSPECIFIED, ROLE_USER, ...): the prefix every value name shares."""
    names = [v.name for v in enum.values]
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    return prefix[: prefix.rfind("_") + 1] if "_" in prefix else ""


def _short_enum_names(obj: Any, descriptor: Any) -> None:
    """Let people write enums as they say them (``"user"``, ``"assistant"``, ``"train"``) beside the
    proto names (``"ROLE_USER"``): in place, a string that is no value name becomes ``PREFIX_VALUE``
    when that is one.  Anything else is left for protobuf to refuse with its own message."""
    if not isinstance(obj, dict):
        return
    fields = {**{f.json_name: f for f in descriptor.fields}, **{f.name: f for f in descriptor.fields}}
    for key, value in obj.items():
        f = fields.get(key)
        if f is None:
            continue
        values = value if isinstance(value, list) else [value]
        if f.message_type is not None:
            if f.message_type.GetOptions().map_entry:
                continue
            for item in values:
                _short_enum_names(item, f.message_type)
        elif f.enum_type is not None:
            names, prefix = f.enum_type.values_by_name, _enum_prefix(f.enum_type)
            fixed = [f"{prefix}{v.strip().upper()}"
                     if isinstance(v, str) and v not in names and f"{prefix}{v.strip().upper()}" in names
                     else v for v in values]
            obj[key] = fixed if isinstance(value, list) else fixed[0]


def decode_event(data: bytes | str, cls: type[M], *, what: str | None = None) -> M:
    """Parse proto3 JSON into ``cls``; malformed input raises InvalidArgument naming the problem.

    Unknown fields are rejected (a typo must not silently drop data).
    """
    what = what or cls.DESCRIPTOR.name
    obj = load_json(data, what, kind="record is")
    if not isinstance(obj, dict):
        raise InvalidArgument(what, f"record must be a JSON object, got {type(obj).__name__}")
    _short_enum_names(obj, cls.DESCRIPTOR)
    try:
        return json_format.ParseDict(obj, cls())
    except (json_format.ParseError, ValueError, TypeError, OverflowError) as e:
        raise InvalidArgument(what, f"does not match the {cls.DESCRIPTOR.full_name} schema: {e}") from None
