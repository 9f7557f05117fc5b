"""A real Apache Kafka 4.1.1 cluster (KRaft, broker+controller in one JVM per node; one node by default,
``kafka_brokers`` for more) and its CLI tools.

There is no Kafka distribution on the machines we develop on, but there is a JVM and Maven, so the
pinned jars are resolved from Maven Central once into a cache outside the repo (``mvn
dependency:copy-dependencies`` over a generated pom) and every later start reuses them.  A marker
file written last says the cache is complete, so an interrupted download is redone, not trusted.

This module renders the broker's ``server.properties`` and log4j2 config (pure functions, unit
tested), formats KRaft storage, starts the JVM, and waits until the broker really takes a produce
and serves it back to a consumer.  ``kafka_tools`` runs Kafka's own CLI tools from the same jars.
"""

from __future__ import annotations

import base64
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from services.stack.config import KAFKA_VERSION, LOG4J_VERSION, SCALA_VERSION, StackConfig
from services.stack.procs import StackError, tail

log = logging.getLogger(__name__)

_MARKER = ".complete"
_HEALTH_TOPIC = "prefstream.stack-health"


# --------------------------------------------------------------------------------------------------
# Jars


def render_pom() -> str:
    """A pom whose runtime dependencies are exactly the broker, the tools and a log4j2 binding."""
    deps = [
        ("org.apache.kafka", f"kafka_{SCALA_VERSION}", KAFKA_VERSION),
        ("org.apache.kafka", "kafka-tools", KAFKA_VERSION),
        ("org.apache.logging.log4j", "log4j-core", LOG4J_VERSION),
        ("org.apache.logging.log4j", "log4j-slf4j-impl", LOG4J_VERSION),
    ]
    body = "\n".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version></dependency>"
        for g, a, v in deps
    )
    return f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.prefstream</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{KAFKA_VERSION}</version>
  <packaging>pom</packaging>
  <dependencies>
{body}
  </dependencies>
</project>
"""


def jars_ready(libs: Path) -> bool:
    return (libs / _MARKER).is_file()


def ensure_kafka_jars(cfg: StackConfig, *, mvn: str = "mvn", timeout_s: float = 900.0) -> Path:
    """The directory of Kafka jars, resolved with Maven on first use and reused after.

    Safe to call from several processes at once: they serialise on a lock file, and the first one
    to finish writes the marker the others then see.
    """
    libs = cfg.kafka_libs
    if jars_ready(libs):
        return libs
    home = cfg.kafka_home
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if jars_ready(libs):
            return libs
        if shutil.which(mvn) is None:
            raise StackError(f"kafka: Maven ({mvn}) is not on PATH; install it (apt-get install maven) to fetch Kafka {KAFKA_VERSION}")
        log.info("kafka: resolving Kafka %s jars with Maven into %s (first run only)", KAFKA_VERSION, libs)
        staging = home / f"libs.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix="prefstream-kafka-pom-") as tmp:
            (Path(tmp) / "pom.xml").write_text(render_pom())
            argv = [
                mvn, "-q", "-B", "dependency:copy-dependencies",
                f"-DoutputDirectory={staging}", "-DincludeScope=runtime",
            ]
            proc = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            out = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise StackError(f"kafka: resolving Kafka {KAFKA_VERSION} jars with Maven failed:\n{out}")
        jars = sorted(p.name for p in staging.glob("*.jar"))
        if f"kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar" not in jars:
            raise StackError(f"kafka: Maven finished but kafka_{SCALA_VERSION}-{KAFKA_VERSION}.jar is missing in {staging}")
        shutil.rmtree(libs, ignore_errors=True)
        staging.replace(libs)
        (libs / _MARKER).write_text("\n".join(jars) + "\n")
    return libs


def ensure_tools_log4j(cfg: StackConfig) -> Path:
    """A log4j2 config for CLI tools: warnings and errors to stderr, nothing else."""
    path = cfg.kafka_home / "tools-log4j2.properties"
    text = render_log4j2(None, level="WARN")
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------------
# Rendering (pure)


def render_server_properties(cfg: StackConfig, data_dir: Path, node: int = 1) -> str:
    """server.properties of Kafka node ``node`` (1-based): broker+controller in one JVM, every node a
    voter of a static KRaft quorum.  With 3 or more nodes, internal topics and defaults replicate 3 ways
    with min.insync.replicas 2 (an acks=all write survives one broker's death); one node replicates once."""
    ports = cfg.kafka_node_ports
    listener, controller = ports[node - 1]
    rf = min(3, len(ports))
    min_isr = 2 if rf >= 3 else 1
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node),
        "controller.quorum.voters": ",".join(f"{i}@127.0.0.1:{c}" for i, (_, c) in enumerate(ports, start=1)),
        "listeners": f"PLAINTEXT://127.0.0.1:{listener},CONTROLLER://127.0.0.1:{controller}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{listener}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data_dir),
        "num.partitions": "1",
        "default.replication.factor": str(rf),
        # A single node can never satisfy the default replication factor of 3 for internal topics.
        "offsets.topic.replication.factor": str(rf),
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": str(rf),
        "transaction.state.log.min.isr": str(min_isr),
        "share.coordinator.state.topic.replication.factor": str(rf),
        "share.coordinator.state.topic.min.isr": str(min_isr),
        "min.insync.replicas": str(min_isr),
        # A replica that was out of the ISR must never become leader: that would drop acked records.
        "unclean.leader.election.enable": "false",
        # A killed node loses its leaderships once the controller misses its heartbeats for this long
        # (default 9 s; on loopback 4 s is safe), so writes move to a surviving replica sooner.
        "broker.heartbeat.interval.ms": "1000",
        "broker.session.timeout.ms": "4000",
        # Consumers in tests and the demo join alone; do not make them wait 3s for company.
        "group.initial.rebalance.delay.ms": "0",
        # Topics come from services.topics only, so a misspelt name fails instead of appearing.
        "auto.create.topics.enable": "false",
        "log.retention.check.interval.ms": "60000",
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


def render_log4j2(log_file: Path | None, *, level: str = "INFO") -> str:
    """log4j2 properties: everything at ``level`` to ``log_file`` (rolling), or to stderr when None."""
    if log_file is None:
        appender = [
            "appender.out.type = Console",
            "appender.out.name = OUT",
            "appender.out.target = SYSTEM_ERR",
            "appender.out.layout.type = PatternLayout",
            "appender.out.layout.pattern = [%d] %p %m (%c)%n",
        ]
        ref = "OUT"
    else:
        appender = [
            "appender.file.type = RollingFile",
            "appender.file.name = FILE",
            f"appender.file.fileName = {log_file}",
            f"appender.file.filePattern = {log_file}.%i",
            "appender.file.layout.type = PatternLayout",
            "appender.file.layout.pattern = [%d] %p %m (%c)%n",
            "appender.file.policies.type = Policies",
            "appender.file.policies.size.type = SizeBasedTriggeringPolicy",
            "appender.file.policies.size.size = 50MB",
            "appender.file.strategy.type = DefaultRolloverStrategy",
            "appender.file.strategy.max = 3",
        ]
        ref = "FILE"
    lines = [
        "status = warn",
        *appender,
        f"rootLogger.level = {level}",
        f"rootLogger.appenderRef.main.ref = {ref}",
        # The state-change logger is chatty at INFO and useless on one node.
        "logger.state.name = state.change.logger",
        "logger.state.level = WARN",
    ]
    return "\n".join(lines) + "\n"


def java_argv(libs: Path, main_class: str, args: Sequence[str], *, heap: str, log4j: Path) -> list[str]:
    java = shutil.which("java")
    if java is None:
        raise StackError("kafka: no `java` on PATH; install OpenJDK 17 (apt-get install openjdk-17-jre-headless)")
    return [
        java,
        f"-Xmx{heap}",
        "-Xms64m",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        f"{libs}/*",
        main_class,
        *args,
    ]


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID in Kafka's url-safe base64 form (22 characters).

    Never one that starts with "-": kafka-storage's argument parser would read it as an option and fail
    with "argument --cluster-id/-t: expected one argument" (1 id in 64; Kafka's own Uuid.randomUuid
    redraws for the same reason).
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


# --------------------------------------------------------------------------------------------------
# Broker lifecycle


@dataclass(frozen=True)
class KafkaLayout:
    """Where one broker's files live inside the run dir."""

    root: Path

    @property
    def properties(self) -> Path:
        return self.root / "server.properties"

    @property
    def log4j(self) -> Path:
        return self.root / "log4j2.properties"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def server_log(self) -> Path:
        return self.root / "logs" / "server.log"

    @property
    def stdout_log(self) -> Path:
        return self.root / "logs" / "kafka.out"

    @property
    def pidfile(self) -> Path:
        return self.root / "kafka.pid"


def node_component(node: int) -> str:
    """The run-dir component (and pidfile owner) of Kafka node ``node``: kafka, kafka-2, kafka-3..."""
    return "kafka" if node == 1 else f"kafka-{node}"


def cluster_id(cfg: StackConfig) -> str:
    """The KRaft cluster id every node of this run dir is formatted with (made once, kept)."""
    path = cfg.component_dir("kafka") / "cluster.id"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Node 1 of a run dir from before this file existed was formatted with an id of its own: keep it.
        meta = KafkaLayout(cfg.component_dir("kafka")).data / "meta.properties"
        found = [line.split("=", 1)[1] for line in meta.read_text().splitlines()
                 if line.startswith("cluster.id=")] if meta.exists() else []
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(found[0].strip() if found else new_cluster_id())
        tmp.replace(path)
    return path.read_text().strip()


def prepare_broker(cfg: StackConfig, node: int = 1) -> tuple[list[str], KafkaLayout]:
    """Write node ``node``'s configs, format its storage when new; return its argv and file layout."""
    libs = ensure_kafka_jars(cfg)
    lay = KafkaLayout(cfg.component_dir(node_component(node)))
    lay.data.mkdir(parents=True, exist_ok=True)
    lay.server_log.parent.mkdir(parents=True, exist_ok=True)
    lay.properties.write_text(render_server_properties(cfg, lay.data, node))
    lay.log4j.write_text(render_log4j2(lay.server_log))
    if not (lay.data / "meta.properties").exists():
        argv = java_argv(
            libs, "kafka.tools.StorageTool",
            ["format", "-t", cluster_id(cfg), "-c", str(lay.properties)],
            heap=cfg.kafka_tool_heap, log4j=ensure_tools_log4j(cfg),
        )
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise StackError(f"kafka: formatting KRaft storage in {lay.data} failed:\n{proc.stdout}{proc.stderr}")
    argv = java_argv(libs, "kafka.Kafka", [str(lay.properties)], heap=cfg.kafka_heap, log4j=lay.log4j)
    return argv, lay


def log_tail(lay: KafkaLayout, lines: int = 30) -> str:
    return f"--- {lay.stdout_log}\n{tail(lay.stdout_log, 10)}\n--- {lay.server_log}\n{tail(lay.server_log, lines)}"


def probe(bootstrap: str, timeout_s: float = 3.0) -> bool:
    """Cheap liveness: the broker answers a metadata request."""
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000),
            client_id="prefstream-stack-probe",
        )
    except Exception:  # noqa: BLE001 - any failure to connect means "not healthy"
        return False
    try:
        admin.list_topics()
        return True
    except Exception:  # noqa: BLE001
        return False
    finally:
        admin.close()


def produce_consume_check(bootstrap: str, timeout_s: float = 30.0) -> None:
    """Produce one record with acks=all and read it back; raise if either side fails."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from services.topics import TopicSpec, ensure_topics

    ensure_topics(bootstrap, [TopicSpec(_HEALTH_TOPIC, 1, {"retention.ms": "3600000"})], timeout_s=timeout_s)
    token = uuid.uuid4().hex.encode()
    request_ms = int(min(timeout_s, 30.0) * 1000)
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", request_timeout_ms=request_ms, delivery_timeout_ms=request_ms + 5000
    )
    try:
        meta = producer.send(_HEALTH_TOPIC, value=token).get(timeout=timeout_s)
    finally:
        producer.close()
    tp = TopicPartition(_HEALTH_TOPIC, meta.partition)
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=1000)
    try:
        consumer.assign([tp])
        consumer.seek(tp, meta.offset)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                if any(r.value == token for r in records):
                    return
    finally:
        consumer.close()
    raise StackError(f"kafka: produced a record to {_HEALTH_TOPIC} at offset {meta.offset} but could not consume it back")


@dataclass(frozen=True)
class PartitionState:
    leader: int  # node id, -1 while none is elected
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


def describe_partitions(bootstrap: str, topic: str, timeout_s: float = 10.0) -> dict[int, PartitionState]:
    """Leader, replicas and in-sync replicas of every partition of ``topic`` (chaos tests pick whom to kill)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000),
                             client_id="prefstream-stack-describe")
    try:
        out = {}
        for t in admin.describe_topics([topic]):
            for p in t["partitions"]:
                out[int(p["partition_index"])] = PartitionState(int(p["leader_id"]), tuple(sorted(p["replica_nodes"])),
                                                                tuple(sorted(p["isr_nodes"])))
        return out
    finally:
        admin.close()
