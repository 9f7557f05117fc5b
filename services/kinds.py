"""The kinds the platform distinguishes, one type each, with their one mapping to the proto enums.

A kind is spelled once: as a ``StrEnum`` whose values are what JSON, Redis and config files carry
("reward", "policy"), converted to and from the ``prefstream.events.v1`` enums only here.
"""

from __future__ import annotations

from enum import StrEnum

from prefstream.events.v1 import events_pb2


class ModelKind(StrEnum):
    """What a registered model is: a reward model (scores responses) or a policy (generates them)."""

    REWARD = "reward"
    POLICY = "policy"

    def to_proto(self) -> int:
        return events_pb2.ModelKind.Value("MODEL_KIND_" + self.name)

    @classmethod
    def from_proto(cls, value: int) -> "ModelKind | None":
        """The kind of a proto enum number; None for UNSPECIFIED (or a number this build does not know)."""
        try:
            name = events_pb2.ModelKind.Name(int(value))
        except ValueError:
            return None
        return cls.__members__.get(name.removeprefix("MODEL_KIND_"))

    @classmethod
    def parse(cls, value: "str | ModelKind", field: str = "kind") -> "ModelKind":
        """A kind from its string spelling, or InvalidArgument naming ``field`` and the choices."""
        from services.errors import InvalidArgument

        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise InvalidArgument(field, f"unknown model kind {value!r}; use one of "
                                  f"{', '.join(k.value for k in cls)}") from None
