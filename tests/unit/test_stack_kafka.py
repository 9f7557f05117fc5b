"""Pure parts of the Kafka launcher: rendered configs, the pinned pom, tool-name mapping."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from services.config import ConfigError
from services.stack.config import StackConfig, load_stack_config
from services.stack.kafka import jars_ready, new_cluster_id, render_log4j2, render_pom, render_server_properties
from services.stack.kafka_tools import KAFKA_TOOLS, resolve_tool


def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_server_properties_single_node_kraft(tmp_path: Path) -> None:
    cfg = StackConfig(kafka_port=19092, kafka_controller_port=19093)
    p = _props(render_server_properties(cfg, tmp_path / "data"))
    assert p["process.roles"] == "broker,controller"
    assert p["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert p["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert p["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert p["log.dirs"] == str(tmp_path / "data")
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor",
                "transaction.state.log.min.isr", "min.insync.replicas"):
        assert p[key] == "1", key
    assert p["group.initial.rebalance.delay.ms"] == "0"
    assert p["auto.create.topics.enable"] == "false"


def test_log4j2_to_file_and_quiet_console(tmp_path: Path) -> None:
    to_file = render_log4j2(tmp_path / "server.log")
    assert f"appender.file.fileName = {tmp_path / 'server.log'}" in to_file
    assert "rootLogger.level = INFO" in to_file
    quiet = render_log4j2(None, level="WARN")
    assert "SYSTEM_ERR" in quiet and "rootLogger.level = WARN" in quiet


def test_pom_pins_kafka_4_1_1_tools_and_a_log4j2_binding() -> None:
    pom = render_pom()
    deps = re.findall(r"<artifactId>([^<]+)</artifactId><version>([^<]+)</version>", pom)
    assert ("kafka_2.13", "4.1.1") in deps
    assert ("kafka-tools", "4.1.1") in deps
    assert any(a == "log4j-slf4j-impl" for a, _ in deps)


@pytest.mark.parametrize(
    ("name", "main_class"),
    [
        ("kafka-topics", "org.apache.kafka.tools.TopicCommand"),
        ("kafka-topics.sh", "org.apache.kafka.tools.TopicCommand"),
        ("topics", "org.apache.kafka.tools.TopicCommand"),
        ("kafka-console-producer", "org.apache.kafka.tools.ConsoleProducer"),
        ("kafka-console-consumer", "org.apache.kafka.tools.consumer.ConsoleConsumer"),
        ("kafka-producer-perf-test", "org.apache.kafka.tools.ProducerPerformance"),
        ("kafka-consumer-groups", "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand"),
    ],
)
def test_tool_names_map_to_main_classes(name: str, main_class: str) -> None:
    assert resolve_tool(name).main_class == main_class


def test_unknown_tool_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="kafka-topics"):
        resolve_tool("kafka-zookeeper-shell")


def test_perf_test_takes_no_bootstrap_flag() -> None:
    assert not KAFKA_TOOLS["kafka-producer-perf-test"].takes_bootstrap_server
    assert KAFKA_TOOLS["kafka-topics"].takes_bootstrap_server


def test_cluster_id_is_kafka_shaped() -> None:
    ids = {new_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", i) for i in ids)
    # kafka-storage would parse "-..." as an option; 1 draw in 64 starts with "-", ~31 of these 2000
    assert not any(i.startswith("-") for i in ids)


def test_jar_cache_is_trusted_only_with_its_marker(tmp_path: Path) -> None:
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / "kafka_2.13-4.1.1.jar").write_bytes(b"")
    assert not jars_ready(libs)
    (libs / ".complete").write_text("kafka_2.13-4.1.1.jar\n")
    assert jars_ready(libs)


def test_cached_jars_are_not_fetched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.stack import kafka

    cfg = StackConfig(cache_dir=tmp_path)
    cfg.kafka_libs.mkdir(parents=True)
    (cfg.kafka_libs / ".complete").write_text("")

    def no_maven(*a, **k):
        raise AssertionError("mvn must not run when the cache is complete")

    monkeypatch.setattr(subprocess, "run", no_maven)
    assert kafka.ensure_kafka_jars(cfg) == cfg.kafka_libs


def test_three_nodes_form_one_quorum_and_replicate_three_ways(tmp_path) -> None:
    cfg = load_stack_config(overrides={"run_dir": str(tmp_path), "kafka_brokers": 3,
                                       "kafka_extra_ports": "9200,9201,9300,9301"}, env={})
    assert cfg.kafka_node_ports == ((9092, 9093), (9200, 9201), (9300, 9301))
    assert cfg.kafka_bootstrap == "127.0.0.1:9092,127.0.0.1:9200,127.0.0.1:9300"
    p2 = _props(render_server_properties(cfg, tmp_path / "d2", 2))
    assert p2["node.id"] == "2"
    assert p2["controller.quorum.voters"] == "1@127.0.0.1:9093,2@127.0.0.1:9201,3@127.0.0.1:9301"
    assert p2["listeners"] == "PLAINTEXT://127.0.0.1:9200,CONTROLLER://127.0.0.1:9201"
    assert (p2["default.replication.factor"], p2["min.insync.replicas"], p2["offsets.topic.replication.factor"]) == ("3", "2", "3")
    assert p2["unclean.leader.election.enable"] == "false"
    # default ports: kafka_port + 2k, kafka_controller_port + 2k
    d = load_stack_config(overrides={"run_dir": str(tmp_path), "kafka_brokers": 3}, env={})
    assert d.kafka_node_ports == ((9092, 9093), (9094, 9095), (9096, 9097))
    with pytest.raises(ConfigError, match="kafka_extra_ports"):
        load_stack_config(overrides={"run_dir": str(tmp_path), "kafka_brokers": 3, "kafka_extra_ports": "9200"}, env={})
