"""``prefstream stack up | down | status | kafka-tool``: the local stack from the command line.

Registered into the ``prefstream`` command by :mod:`prefstream.cli`.  Every subcommand takes the
same ``--run-dir``, ``--config`` and port flags, which become overrides on top of the config file
and ``PREFSTREAM_STACK_*`` environment variables (see services.config for the precedence).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from services.config import add_config_flags, overrides_from_args
from services.stack.config import StackConfig, load_stack_config

#: The StackConfig fields every subcommand takes as flags (all default None so lower layers win).
_FIELD_FLAGS: tuple[str, ...] = (
    "run_dir", "components", "kafka_port", "kafka_controller_port", "kafka_brokers", "kafka_heap", "redis_port", "ray_port",
    "ray_client_port", "ray_dashboard_port", "ray_dashboard_agent_port", "ray_num_cpus", "start_timeout_s",
)


def _common_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("stack options")
    g.add_argument("--config", default=None, help="YAML/JSON config file (keys at top level or under `stack:`)")
    add_config_flags(g, StackConfig, _FIELD_FLAGS)
    return common


def config_from_args(args: argparse.Namespace) -> StackConfig:
    return load_stack_config(file=args.config, overrides=overrides_from_args(args, StackConfig, _FIELD_FLAGS))


def _quiet_clients() -> None:
    # kafka-python logs every connection at INFO; the user wants our lines, not its.
    logging.getLogger("kafka").setLevel(logging.WARNING)


def cmd_up(args: argparse.Namespace) -> int:
    import time

    from services.stack.manager import Stack
    from services.stack.procs import StackError

    _quiet_clients()
    cfg = config_from_args(args)
    t0 = time.monotonic()
    try:
        ep = Stack(cfg).up()
    except StackError as e:
        print(f"prefstream stack up: {e}", file=sys.stderr)
        return 1
    print(f"stack up in {time.monotonic() - t0:.1f}s (run dir {cfg.run_path})")
    print(f"  kafka_bootstrap  {ep.kafka_bootstrap}")
    print(f"  redis_url        {ep.redis_url}")
    print(f"  ray_address      {ep.ray_address}")
    print(f"state: {cfg.state_file}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from services.stack.manager import Stack
    from services.stack.procs import StackError

    cfg = config_from_args(args)
    try:
        stopped = Stack(cfg).down()
    except StackError as e:
        print(f"prefstream stack down: {e}", file=sys.stderr)
        return 1
    print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'} (run dir {cfg.run_path})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from services.stack.manager import Stack, status_as_dicts

    _quiet_clients()
    cfg = config_from_args(args)
    statuses = Stack(cfg).status()
    if args.json:
        print(json.dumps({"run_dir": str(cfg.run_path), "components": status_as_dicts(statuses)}, indent=2))
    else:
        print(f"run dir {cfg.run_path}")
        print(f"{'component':<10} {'health':<9} {'pid':>8}  {'address':<28} log")
        for s in statuses:
            health = "healthy" if s.healthy else ("unhealthy" if s.running else "stopped")
            print(f"{s.name:<10} {health:<9} {s.pid or '-':>8}  {s.address:<28} {s.log}")
    return 0 if all(s.healthy for s in statuses) else 1


def cmd_kafka_tool(args: argparse.Namespace) -> int:
    from services.endpoints import StackNotRunning, load_stack_endpoints
    from services.stack.kafka_tools import resolve_tool, run_kafka_tool

    cfg = config_from_args(args)
    try:
        spec = resolve_tool(args.tool)
    except ValueError as e:
        print(f"prefstream stack kafka-tool: {e}", file=sys.stderr)
        return 2
    tool_args = list(args.tool_args)
    if tool_args[:1] == ["--"]:
        tool_args = tool_args[1:]
    # Point the tool at the running stack unless the user chose a server themselves.
    wants_server = not any(a.startswith(("--bootstrap-server", "--bootstrap-controller", "--help")) for a in tool_args)
    if spec.takes_bootstrap_server and wants_server:
        try:
            bootstrap = load_stack_endpoints(cfg.run_path).kafka_bootstrap
        except StackNotRunning:
            bootstrap = cfg.kafka_bootstrap
        if bootstrap:
            tool_args = ["--bootstrap-server", bootstrap, *tool_args]
    proc = run_kafka_tool(spec.name, tool_args, cfg=cfg, capture_output=False, stdin=None)
    return proc.returncode


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``stack`` and its subcommands to the ``prefstream`` parser."""
    common = _common_flags()
    stack = subparsers.add_parser(
        "stack",
        help="run the local Kafka, Redis and Ray stack",
        description="Run a real local Kafka 4.1.1, Redis and Ray head for development, tests and the demo.",
    )
    sub = stack.add_subparsers(dest="stack_command", metavar="SUBCOMMAND")
    stack.set_defaults(handler=lambda _args: (stack.print_help(), 2)[1])

    up = sub.add_parser("up", parents=[common], help="start the stack (idempotent) and wait until healthy")
    up.set_defaults(handler=cmd_up)

    down = sub.add_parser("down", parents=[common], help="stop everything `up` started in the run dir")
    down.set_defaults(handler=cmd_down)

    status = sub.add_parser("status", parents=[common], help="show each component's address, pid, log and health")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status)

    tool = sub.add_parser(
        "kafka-tool",
        parents=[common],
        help="run one of Kafka's CLI tools (kafka-topics, kafka-console-consumer, ...) from the cached jars",
        description=(
            "Run a Kafka 4.1.1 tool. --bootstrap-server of the running stack is added for tools that "
            "take one unless given. Put stack options before TOOL; everything after TOOL goes to the tool. "
            "Example: prefstream stack kafka-tool kafka-topics --describe --topic prefstream.preferences"
        ),
    )
    tool.add_argument("tool", metavar="TOOL", help="kafka-topics, kafka-console-producer, kafka-console-consumer, "
                      "kafka-producer-perf-test, kafka-consumer-perf-test, kafka-consumer-groups, kafka-get-offsets, ...")
    tool.add_argument("tool_args", metavar="ARGS", nargs=argparse.REMAINDER, help="arguments for the tool")
    tool.set_defaults(handler=cmd_kafka_tool)
