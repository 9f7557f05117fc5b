"""The Kafka topics prefstream uses: names, partition counts and configs, and the one prefix rule.

Every service, the local stack and the benchmarks take topic names from here instead of spelling
string literals; ``prefstream stack up`` and the k8s topic job create exactly these topics
(auto-creation is disabled on the broker, so a typo in a topic name fails loudly instead of
creating a stray topic).

Prefix: a deployment or an isolated test run puts all of its topics under one ``topic_prefix``
(``"staging."``), and :func:`topic_name` is the only way a service turns a base topic into the name
it produces to or consumes from, so the gateway, trainer and scorer of one run always meet on the
same names, model-updates included.

Partitioning: feedback and preferences are keyed by prompt/conversation id and consumed by a group
of trainer workers, so they get several partitions; model-updates must be totally ordered (every
scorer applies versions in order), so it has exactly one; the dead-letter topic is low volume.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

log = logging.getLogger(__name__)

_DAY_MS = 24 * 60 * 60 * 1000


@dataclass(frozen=True)
class TopicSpec:
    """One Kafka topic: its name, partition count, replication factor and topic-level configs."""

    name: str
    partitions: int
    configs: Mapping[str, str] = field(default_factory=dict)
    # 0: the cluster's own: 3 copies with min.insync.replicas 2 on a cluster of 3 or more brokers (an
    # acks=all write then survives a broker's death), 1 on a smaller one.
    replication_factor: int = 0
    doc: str = ""


COMPLETIONS = TopicSpec(
    name="prefstream.completions",
    partitions=4,
    configs={"retention.ms": str(7 * _DAY_MS), "cleanup.policy": "delete", "compression.type": "producer"},
    doc="every LLM completion the gateway served (prompt, response, model), keyed by completion id",
)
FEEDBACK = TopicSpec(
    name="prefstream.feedback",
    partitions=4,
    configs={"retention.ms": str(30 * _DAY_MS), "cleanup.policy": "delete"},
    doc="raw user feedback (thumbs, ratings, edits) on a completion, keyed by completion id",
)
PREFERENCES = TopicSpec(
    name="prefstream.preferences",
    partitions=4,
    configs={"retention.ms": str(30 * _DAY_MS), "cleanup.policy": "delete"},
    doc="(prompt, chosen, rejected) pairs the trainer learns from, keyed by prompt id",
)
DEAD_LETTER = TopicSpec(
    name="prefstream.dead-letter",
    partitions=1,
    configs={"retention.ms": str(14 * _DAY_MS), "cleanup.policy": "delete"},
    doc="events any consumer could not parse or process, with the error, for inspection and replay",
)
MODEL_UPDATES = TopicSpec(
    name="prefstream.model-updates",
    partitions=1,
    configs={"retention.ms": str(7 * _DAY_MS), "cleanup.policy": "delete", "min.insync.replicas": "1"},
    doc="announcements of new model versions; one partition so every scorer sees them in order",
)

TOPICS: tuple[TopicSpec, ...] = (COMPLETIONS, FEEDBACK, PREFERENCES, DEAD_LETTER, MODEL_UPDATES)
TOPIC_NAMES: tuple[str, ...] = tuple(t.name for t in TOPICS)


# Kafka's own rule for topic names: at most 249 characters of ASCII letters, digits, '.', '_', '-'.
_LEGAL = re.compile(r"[A-Za-z0-9._-]*")
_MAX_NAME = 249


def check_prefix(prefix: str) -> str | None:
    """Why ``prefix`` cannot prefix the project's topic names, or None when it can."""
    if not isinstance(prefix, str) or not _LEGAL.fullmatch(prefix):
        return f"{prefix!r} may hold only ASCII letters, digits, '.', '_' and '-' (Kafka's topic name rule)"
    longest = max(len(t.name) for t in TOPICS)
    if len(prefix) + longest > _MAX_NAME:
        return f"{prefix!r} is too long: prefixed topic names must stay within {_MAX_NAME} characters"
    return None


def topic_name(spec: TopicSpec, prefix: str = "") -> str:
    """The real name of the topic ``spec`` under ``topic_prefix`` ``prefix`` (the one prefix rule)."""
    why = check_prefix(prefix)
    if why is not None:
        raise ValueError(f"topic_prefix: {why}")
    return prefix + spec.name


def prefixed(specs: Iterable[TopicSpec], prefix: str) -> tuple[TopicSpec, ...]:
    """``specs`` renamed under ``prefix``, same partitions and configs (to create a run's own topics)."""
    return tuple(dataclasses.replace(s, name=topic_name(s, prefix)) for s in specs)


def topic(name: str) -> TopicSpec:
    """The spec of the project topic ``name``; KeyError names the known topics."""
    for t in TOPICS:
        if t.name == name:
            return t
    raise KeyError(f"unknown topic {name!r}; known topics: {', '.join(TOPIC_NAMES)}")


def creation_settings(spec: TopicSpec, brokers: int) -> dict:
    """How ``spec`` is created on a cluster of ``brokers`` brokers (see ``TopicSpec.replication_factor``)."""
    rf = spec.replication_factor or min(3, brokers)
    configs = dict(spec.configs)
    if rf >= 3:
        configs.setdefault("min.insync.replicas", "2")
    return {"num_partitions": spec.partitions, "replication_factor": rf, "configs": configs}


def ensure_topics(
    bootstrap: str,
    specs: Iterable[TopicSpec] = TOPICS,
    *,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the topics in ``specs`` that do not exist yet; return the names created.

    Idempotent: existing topics are left as they are (their configs are not altered).
    """
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError, TopicAlreadyExistsError, for_code

    specs = list(specs)
    timeout_ms = int(timeout_s * 1000)
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="prefstream-topics",
        request_timeout_ms=timeout_ms,
    )
    created: list[str] = []
    try:
        existing = set(admin.list_topics())
        brokers = len(admin.describe_cluster().get("brokers") or []) or 1
        missing = {s.name: creation_settings(s, brokers) for s in specs if s.name not in existing}
        if missing:
            result = admin.create_topics(missing, timeout_ms=timeout_ms, raise_errors=False)
            for t in result["topics"]:
                err = for_code(t["error_code"])
                if t["error_code"] == 0:
                    created.append(t["name"])
                elif err is not TopicAlreadyExistsError:  # another `up` raced us: fine
                    raise KafkaError(f"creating topic {t['name']} failed: {err.__name__} {t.get('error_message') or ''}")
        # Creation is acknowledged before every partition has a leader; producers want leaders.
        admin.wait_for_topics([s.name for s in specs], timeout_ms=timeout_ms)
    finally:
        admin.close()
    if created:
        log.info("created Kafka topics %s", ", ".join(created))
    return created
