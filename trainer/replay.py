"""A bounded reservoir of past preference records, mixed into new micro-batches.

Training only on the newest feedback makes a reward model forget what it learnt earlier (catastrophic
forgetting).  Experience replay (Rolnick et al. 2019, "Experience Replay for Continual Learning")
counters it by mixing a uniform sample of the past into every update.  A reservoir (Vitter 1985,
Algorithm R) keeps that sample uniform over the whole stream in bounded memory, and is small enough
to travel inside every checkpoint so a restarted trainer replays the same past.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Generic, Iterable, TypeVar

from services.schemas import PreferenceRecord

T = TypeVar("T")

REPLAY_FILE = "replay.jsonl"


class ReservoirBuffer(Generic[T]):
    """Uniform sample of at most ``capacity`` items out of everything ever added."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._items: list[T] = []
        self._seen = 0
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def seen(self) -> int:
        """How many items were ever offered to the buffer."""
        return self._seen

    def items(self) -> list[T]:
        return list(self._items)

    def add(self, item: T) -> None:
        """Algorithm R: the n-th item replaces a random slot with probability capacity / n."""
        self._seen += 1
        if self.capacity == 0:
            return
        if len(self._items) < self.capacity:
            self._items.append(item)
            return
        slot = self._rng.randrange(self._seen)
        if slot < self.capacity:
            self._items[slot] = item

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.add(item)

    def sample(self, n: int) -> list[T]:
        """Up to ``n`` distinct items, uniformly at random (fewer when the buffer holds fewer)."""
        if n <= 0 or not self._items:
            return []
        return self._rng.sample(self._items, min(n, len(self._items)))

    def restore(self, items: Iterable[T], seen: int) -> None:
        """Replace the contents with a saved state (``seen`` keeps future replacement odds right)."""
        self._items = list(items)[: self.capacity]
        self._seen = max(int(seen), len(self._items))


def replay_count(new_records: int, ratio: float) -> int:
    """Replay records to mix into a batch of ``new_records``: ``round(new * ratio)``.

    ``ratio`` is replayed records per new record (0 disables replay, 1.0 doubles each batch).
    """
    if ratio < 0:
        raise ValueError(f"replay ratio must be >= 0, got {ratio}")
    return int(round(new_records * ratio))


def save_records(buffer: ReservoirBuffer[PreferenceRecord], directory: Path) -> dict[str, int]:
    """Write the buffer as proto-JSON lines into ``directory``; returns the state for metadata."""
    path = Path(directory) / REPLAY_FILE
    with open(path, "wb") as f:
        for rec in buffer.items():
            f.write(rec.to_kafka() + b"\n")
    return {"size": len(buffer), "seen": buffer.seen}


def load_records(directory: Path) -> list[PreferenceRecord]:
    """The records saved by :func:`save_records` (empty when the checkpoint has none)."""
    path = Path(directory) / REPLAY_FILE
    if not path.exists():
        return []
    out = []
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                out.append(PreferenceRecord.from_kafka(line))
    return out

