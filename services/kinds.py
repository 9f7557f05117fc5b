"""The enumerated concepts the platform distinguishes, one type each, with their one mapping to the protos.

A kind is spelled once: as a ``StrEnum`` whose values are what JSON, Redis, metrics labels and config
files carry ("reward", "choice", "published"), converted to and from the proto enums only here.  The
proto name of a member is always ``<PREFIX><MEMBER NAME>`` (``MODEL_KIND_REWARD``), so adding a value
to a proto enum and to its ``StrEnum`` is the whole change.  Because the members are strings, data
written before these types existed (lower-case strings) reads back unchanged.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeVar

from prefstream.admin.v1 import admin_pb2
from prefstream.events.v1 import events_pb2

_K = TypeVar("_K", bound="ProtoStrEnum")


class ProtoStrEnum(StrEnum):
    """A ``StrEnum`` mirrored by a proto enum; subclasses name the proto type and its value prefix."""

    @classmethod
    def _proto(cls) -> tuple[Any, str]:
        """(the generated enum wrapper, the prefix its value names carry)."""
        raise NotImplementedError

    def to_proto(self) -> int:
        enum, prefix = self._proto()
        return int(enum.Value(prefix + self.name))

    @classmethod
    def from_proto(cls: type[_K], value: int) -> _K | None:
        """The member of a proto enum number; None for UNSPECIFIED or a number this build does not know."""
        enum, prefix = cls._proto()
        try:
            name = enum.Name(int(value))
        except ValueError:
            return None
        return cls.__members__.get(name.removeprefix(prefix))

    @classmethod
    def parse(cls: type[_K], value: object, field: str) -> _K:
        """The member spelled ``value`` (any case, surrounding blanks ignored), or InvalidArgument naming ``field``."""
        from services.errors import InvalidArgument

        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise InvalidArgument(field, f"unknown value {value!r}; use one of {', '.join(cls.values())}") from None

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The string spellings, in declaration order (for error messages and CLI choices)."""
        return tuple(m.value for m in cls)


class ModelKind(ProtoStrEnum):
    """What a registered model is: a reward model (scores responses) or a policy (generates them)."""

    REWARD = "reward"
    POLICY = "policy"

    @classmethod
    def _proto(cls) -> tuple[Any, str]:
        return events_pb2.ModelKind, "MODEL_KIND_"


class FeedbackKind(ProtoStrEnum):
    """Where a preference record came from: one of the six feedback actions, a dataset import, or criteria."""

    CHOICE = "choice"
    REGENERATION = "regeneration"
    EDIT = "edit"
    RANKING = "ranking"
    SCORES = "scores"
    THUMBS = "thumbs"
    IMPORT = "import"
    CRITERIA = "criteria"

    @classmethod
    def _proto(cls) -> tuple[Any, str]:
        return events_pb2.FeedbackKind, "FEEDBACK_KIND_"


class ModelAction(ProtoStrEnum):
    """The registry change a ModelUpdate announces."""

    PUBLISHED = "published"
    REJECTED = "rejected"
    PINNED = "pinned"
    UNPINNED = "unpinned"
    ROLLED_BACK = "rolled_back"

    @classmethod
    def _proto(cls) -> tuple[Any, str]:
        return events_pb2.ModelAction, "MODEL_ACTION_"


class VersionState(ProtoStrEnum):
    """The registry's verdict on one model version; only PUBLISHED versions are ever served."""

    PUBLISHED = "published"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"

    @classmethod
    def _proto(cls) -> tuple[Any, str]:
        return admin_pb2.VersionState, "VERSION_STATE_"


class Role(ProtoStrEnum):
    """Who wrote a chat message."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"

    @classmethod
    def _proto(cls) -> tuple[Any, str]:
        return events_pb2.Role, "ROLE_"


class Split(ProtoStrEnum):
    """Whether a record trains the model or is held out to evaluate it."""

    TRAIN = "train"
    TEST = "test"

    @classmethod
    def _proto(cls) -> tuple[Any, str]:
        return events_pb2.Split, "SPLIT_"


__all__ = ["FeedbackKind", "ModelAction", "ModelKind", "ProtoStrEnum", "Role", "Split", "VersionState"]
