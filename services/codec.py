"""The event codec: how one event message is written as a Kafka record value, and read back.

Each Kafka record value is the proto3 JSON of one event message (field names as in the .proto,
snake_case), so producers that write JSON lines directly use the same schema as the gRPC API.

The codec is a runtime contract, not Kafka access: the domain types (:mod:`services.schemas`) and
the scorer's client SDK use it without a broker, so this module needs only protobuf and imports
nothing of kafka-python (:mod:`services.kafka` holds the producers and consumers).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
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


@functools.lru_cache(maxsize=None)
def _enum_prefix(enum: Any) -> str:
    """``ROLE_`` for Role (ROLE_UNSPECIFIED, ROLE_USER, ...): the prefix every value name shares."""
    names = [v.name for v in enum.values]
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    return prefix[: prefix.rfind("_") + 1] if "_" in prefix else ""


@functools.lru_cache(maxsize=None)
def _fields(descriptor: Any) -> dict[str, tuple[Any, Any]]:
    """A message's fields by JSON name and by proto name (proto3 JSON accepts both), each with the value
    field of its entries when it is a map (None otherwise)."""
    def entry(f: Any) -> tuple[Any, Any]:
        is_map = f.message_type is not None and f.message_type.GetOptions().map_entry
        return f, f.message_type.fields_by_name["value"] if is_map else None

    return {**{f.json_name: entry(f) for f in descriptor.fields}, **{f.name: entry(f) for f in descriptor.fields}}


_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1), FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_INT_TEXT = re.compile(r"-?[0-9]+")


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return json.dumps(value)[:40]


def _check_value(value: Any, f: Any, where: str) -> Any:
    """``value`` for field ``f`` (or for one entry of it, when it is repeated or a map), an enum as people
    say it rewritten to its proto name; InvalidArgument naming ``where`` when protobuf could not read it as
    that field or would misread it."""
    t = f.cpp_type
    if t == FieldDescriptor.CPPTYPE_STRING:
        if type(value) is not str:
            raise InvalidArgument(where, f"must be a string, got {_shown(value)}")
    elif value is None:
        raise InvalidArgument(where, "is null; leave it out or give a value")
    elif t == FieldDescriptor.CPPTYPE_MESSAGE:
        if f.message_type.full_name.startswith("google.protobuf."):
            return value  # well-known types have JSON forms of their own (a Timestamp is a string)
        if not isinstance(value, dict):
            raise InvalidArgument(where, f"must be an object, got {_shown(value)}")
        _check_message(value, f.message_type, where)
    elif t == FieldDescriptor.CPPTYPE_ENUM:
        if isinstance(value, str):
            names, short = f.enum_type.values_by_name, f"{_enum_prefix(f.enum_type)}{value.strip().upper()}"
            return short if value not in names and short in names else value  # unknown names: protobuf says so
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidArgument(where, f"must be one of {', '.join(f.enum_type.values_by_name)}, got {_shown(value)}")
    elif t == FieldDescriptor.CPPTYPE_BOOL:
        if not isinstance(value, bool):
            raise InvalidArgument(where, f"must be true or false, got {_shown(value)}")
    elif t in _INT_RANGES:
        number = int(value) if isinstance(value, str) and _INT_TEXT.fullmatch(value) else value
        if isinstance(number, float) and number.is_integer():
            number = int(number)
        if isinstance(number, bool) or not isinstance(number, int):
            raise InvalidArgument(where, f"must be an integer, got {_shown(value)}")
        lo, hi = _INT_RANGES[t]
        if not lo <= number <= hi:
            raise InvalidArgument(where, f"{number} is out of range: the field holds {lo}..{hi}")
    elif t in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not _is_number(value):
            raise InvalidArgument(where, f"must be a number, got {_shown(value)}")
    return value


def _is_number(value: int | float | str) -> bool:
    """A JSON number, or a string protobuf reads as one ("NaN", "Infinity", "1.5")."""
    try:
        float(value)
    except ValueError:
        return False
    return True


def _check_message(obj: dict, descriptor: Any, where: str) -> None:
    """Check a JSON object against ``descriptor`` before protobuf reads it (in place; see decode_event)."""
    fields = _fields(descriptor)
    oneofs: dict[str, str] = {}
    for key, value in obj.items():
        f, map_value = fields.get(key, (None, None))
        if f is None or value is None:
            continue  # an unknown name protobuf refuses by name; null is the field's default
        path = f"{where}.{f.name}" if where else f.name
        oneof = f.containing_oneof
        if oneof is not None and oneofs.setdefault(oneof.name, f.name) != f.name:
            raise InvalidArgument(f"{where}.{oneof.name}" if where else oneof.name,
                                  f"set one of {oneofs[oneof.name]} and {f.name}, not both")
        if map_value is not None:
            if not isinstance(value, dict):
                raise InvalidArgument(path, f"must be an object, got {_shown(value)}")
            for k, v in value.items():
                value[k] = _check_value(v, map_value, f"{path}[{k!r}]")
        elif f.is_repeated:
            if not isinstance(value, list):
                raise InvalidArgument(path, f"must be a list, got {_shown(value)}")
            for i, item in enumerate(value):
                if type(item) is str and f.cpp_type == FieldDescriptor.CPPTYPE_STRING:
                    continue  # the common case (candidates, outputs), without a call
                value[i] = _check_value(item, f, f"{path}[{i}]")
        else:
            obj[key] = _check_value(value, f, path)


def decode_event(data: bytes | str, cls: type[M], *, what: str | None = None) -> M:
    """Parse proto3 JSON into ``cls``; malformed input raises InvalidArgument naming the problem.

    Unknown fields are rejected (a typo must not silently drop data).
    """
    what = what or cls.DESCRIPTOR.name
    obj = load_json(data, what, kind="record is")
    if not isinstance(obj, dict):
        raise InvalidArgument(what, f"record must be a JSON object, got {type(obj).__name__}")
    # Type errors are named here, exactly (protobuf names a oneof member's field without its message, a
    # list element without its index, or nothing), and an enum given as true or 1.5 is refused (protobuf
    # reads it as the number 1).  Enums may be written as people say them ("user", "train").
    _check_message(obj, cls.DESCRIPTOR, "" if what == "body" else what)
    try:
        return json_format.ParseDict(obj, cls())
    except (json_format.ParseError, ValueError, TypeError, OverflowError) as e:
        raise InvalidArgument(what, f"does not match the {cls.DESCRIPTOR.full_name} schema: {e}") from None
