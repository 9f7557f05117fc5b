"""A producer that stops acknowledging is replaced for the next write (services.kafka.RenewingProducer)."""

from __future__ import annotations

import pytest
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

import services.kafka as kafka_module
from services.errors import Unavailable
from services.kafka import RenewingProducer, send_sync


class _Future:
    def __init__(self, error: Exception | None) -> None:
        self.error = error

    def succeeded(self) -> bool:
        return self.error is None

    def get(self, timeout: float) -> str:
        if self.error is not None:
            raise self.error
        return "acked"


class FakeProducer:
    """Acknowledges, or (``stuck``) never does, as kafka-python's did after every broker died at once."""

    made: list["FakeProducer"] = []

    def __init__(self, stuck: bool) -> None:
        self.stuck, self.closed, self.sent = stuck, False, []
        FakeProducer.made.append(self)

    def send(self, topic, value=None, key=None):
        if value == b"too big":
            raise MessageSizeTooLargeError("too big")
        self.sent.append((topic, value))
        return _Future(KafkaTimeoutError("Timeout after waiting for 5 secs.") if self.stuck else None)

    def close(self, timeout=None):
        self.closed = True

    def flush(self, timeout=None):
        pass


def test_a_stalled_producer_is_replaced_and_the_next_write_goes_through(monkeypatch) -> None:
    FakeProducer.made = []
    monkeypatch.setattr(kafka_module, "make_producer", lambda bootstrap, **kw: FakeProducer(stuck=not FakeProducer.made))
    producer = RenewingProducer("127.0.0.1:9")
    with pytest.raises(Unavailable, match="did not acknowledge"):
        send_sync(producer, "t", b"a", timeout_s=0.01)
    first, second = FakeProducer.made
    assert producer.renewed == 1 and first.closed and not second.closed
    assert send_sync(producer, "t", b"b") == "acked" and second.sent == [("t", b"b")]
    # a write Kafka refuses outright is the caller's problem, not a stalled producer: no renewal
    with pytest.raises(Unavailable, match="rejected"):
        send_sync(producer, "t", b"too big")
    assert producer.renewed == 1


def test_without_a_broker_to_connect_to_the_old_producer_is_kept(monkeypatch) -> None:
    FakeProducer.made = []
    monkeypatch.setattr(kafka_module, "make_producer", lambda bootstrap, **kw: FakeProducer(stuck=True))
    producer = RenewingProducer("127.0.0.1:9")

    def unreachable(bootstrap, **kw):
        raise Unavailable("Kafka at 127.0.0.1:9 is unreachable")

    monkeypatch.setattr(kafka_module, "make_producer", unreachable)
    with pytest.raises(Unavailable):
        send_sync(producer, "t", b"a", timeout_s=0.01)
    assert producer.renewed == 0 and not FakeProducer.made[0].closed


def test_a_batch_left_unacknowledged_renews_the_producer_for_the_next_batch(monkeypatch) -> None:
    FakeProducer.made = []
    monkeypatch.setattr(kafka_module, "make_producer", lambda bootstrap, **kw: FakeProducer(stuck=not FakeProducer.made))
    producer = RenewingProducer("127.0.0.1:9")
    batch = [("prefs", b"k1", b"a"), ("dead", None, b"b")]
    assert producer.send_all(batch, timeout=0.01) == 2  # the caller reports the batch failed and retries it
    first, second = FakeProducer.made
    assert producer.renewed == 1 and first.closed
    assert producer.send_all(batch, timeout=0.01) == 0 and second.sent == [("prefs", b"a"), ("dead", b"b")]
    assert producer.renewed == 1
