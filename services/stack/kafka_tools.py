"""Kafka's own command-line tools (kafka-topics, kafka-console-consumer, kafka-producer-perf-test, ...).

There is no Kafka distribution with ``bin/*.sh`` scripts here, only the jars the stack caches, so
this module knows which main class each script runs and starts it with the cached classpath and a
quiet log4j config.  ``prefstream stack kafka-tool`` and the benchmarks both go through
:func:`run_kafka_tool`.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Mapping, Sequence

from services.stack.config import StackConfig
from services.stack.kafka import ensure_kafka_jars, ensure_tools_log4j, java_argv


@dataclass(frozen=True)
class KafkaTool:
    """One of Kafka's shell tools: the name of its ``bin/*.sh`` script and the main class it runs."""

    name: str
    main_class: str
    takes_bootstrap_server: bool = True


# The classes bin/<name>.sh runs in the 4.1.1 distribution (checked against the jars by the
# integration tests).  Names are given without ".sh"; the wrapper accepts either.
KAFKA_TOOLS: dict[str, KafkaTool] = {
    t.name: t
    for t in (
        KafkaTool("kafka-topics", "org.apache.kafka.tools.TopicCommand"),
        KafkaTool("kafka-console-producer", "org.apache.kafka.tools.ConsoleProducer"),
        KafkaTool("kafka-console-consumer", "org.apache.kafka.tools.consumer.ConsoleConsumer"),
        KafkaTool("kafka-producer-perf-test", "org.apache.kafka.tools.ProducerPerformance", False),
        KafkaTool("kafka-consumer-perf-test", "org.apache.kafka.tools.ConsumerPerformance"),
        KafkaTool("kafka-consumer-groups", "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"),
        KafkaTool("kafka-get-offsets", "org.apache.kafka.tools.GetOffsetShell"),
        KafkaTool("kafka-configs", "kafka.admin.ConfigCommand"),
        KafkaTool("kafka-delete-records", "org.apache.kafka.tools.DeleteRecordsCommand"),
        KafkaTool("kafka-log-dirs", "org.apache.kafka.tools.LogDirsCommand"),
        KafkaTool("kafka-metadata-quorum", "org.apache.kafka.tools.MetadataQuorumCommand"),
        KafkaTool("kafka-cluster", "org.apache.kafka.tools.ClusterTool", False),
        KafkaTool("kafka-dump-log", "kafka.tools.DumpLogSegments", False),
        KafkaTool("kafka-storage", "kafka.tools.StorageTool", False),
    )
}


def resolve_tool(name: str) -> KafkaTool:
    """The tool for ``kafka-topics``, ``kafka-topics.sh`` or ``topics``; ValueError lists the known ones."""
    key = name.removesuffix(".sh")
    if not key.startswith("kafka-"):
        key = "kafka-" + key
    try:
        return KAFKA_TOOLS[key]
    except KeyError:
        raise ValueError(f"unknown Kafka tool {name!r}; known tools: {', '.join(sorted(KAFKA_TOOLS))}") from None




def run_kafka_tool(
    tool: str,
    args: Sequence[str] = (),
    *,
    cfg: StackConfig | None = None,
    capture_output: bool = True,
    check: bool = False,
    input: str | None = None,
    stdin: int | None = subprocess.DEVNULL,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run one of Kafka's CLI tools (``kafka-topics``, ``kafka-producer-perf-test``, ...) from the cached jars.

    ``args`` are passed as on the command line, e.g.
    ``run_kafka_tool("kafka-topics", ["--bootstrap-server", b, "--list"])``.  Output is text; log4j
    is quiet (warnings to stderr).  Jars are fetched on first use.  ``check=True`` raises
    CalledProcessError on a non-zero exit.  ``stdin`` defaults to /dev/null so a tool that reads
    input never hangs a benchmark; pass ``stdin=None`` to inherit the terminal (the CLI does).
    """
    from services.stack.config import load_stack_config

    cfg = cfg or load_stack_config()
    spec = resolve_tool(tool)
    libs = ensure_kafka_jars(cfg)
    argv = java_argv(libs, spec.main_class, list(args), heap=cfg.kafka_tool_heap, log4j=ensure_tools_log4j(cfg))
    return subprocess.run(
        argv,
        capture_output=capture_output,
        text=True,
        input=input,
        timeout=timeout,
        check=check,
        env=dict(env) if env is not None else None,
        stdin=None if input is not None else stdin,
    )
