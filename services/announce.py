"""Announcers: where the model registry tells the scorers about a change it has committed.

The registry owns the interface (:class:`services.registry.Announcer`); this module has its
implementations.  :class:`KafkaAnnouncer` puts each :class:`~services.schemas.ModelUpdate` on the
model-updates topic and waits for the broker's acknowledgement, so a publish is seen by the scorers
at once rather than at their next registry poll.  :class:`RecordingAnnouncer` keeps them in memory,
for tests and for runs without Kafka that still want to see what was announced.
"""

from __future__ import annotations

from typing import Any

from services.kafka import send_sync
from services.schemas import ModelUpdate


class KafkaAnnouncer:
    """Writes each update to ``topic``, keyed by model name (one model's updates stay in order)."""

    def __init__(self, producer: Any, topic: str, *, timeout_s: float = 5.0) -> None:
        """``timeout_s`` is short: an announcement only saves the scorers a registry poll, and a
        publish must not hold up its trainer while Kafka is down (a 30 s wait per checkpoint once
        slowed a trainer to one step per 30 s)."""
        self.producer = producer
        self.topic = topic
        self.timeout_s = timeout_s

    def announce(self, update: ModelUpdate) -> None:
        """Send and wait for the ack; raises Unavailable when Kafka does not acknowledge."""
        send_sync(self.producer, self.topic, update.to_kafka(), key=update.model_name.encode(),
                  timeout_s=self.timeout_s)


class RecordingAnnouncer:
    """Keeps every update it is given, in order, in :attr:`updates`."""

    def __init__(self) -> None:
        self.updates: list[ModelUpdate] = []

    def announce(self, update: ModelUpdate) -> None:
        self.updates.append(update)


__all__ = ["KafkaAnnouncer", "RecordingAnnouncer"]
