"""The local stack prefstream develops, tests and demos on: real Kafka 4.1.1, Redis and a Ray head.

Other packages import from here only::

    from services.stack import Stack, StackConfig, load_endpoints, run_kafka_tool, ServiceProcess

The deployables never import this package: they read the running stack's addresses with
:mod:`services.endpoints` and the topic names from :mod:`services.topics`.

:class:`ServiceProcess` runs a deployable as a child process the way an operator would and waits
until it serves (the demo and the benchmarks use it); like the launcher it is dev tooling, so it
lives here and not in the runtime part of ``services``.

``prefstream stack up|down|status|kafka-tool`` is the command-line face (``services.stack.cli``);
docs/stack.md describes ports, files and logs.
"""

from services.stack.config import StackConfig, free_stack_config, load_stack_config
from services.stack.kafka_tools import KAFKA_TOOLS, run_kafka_tool
from services.stack.manager import ComponentStatus, Endpoints, Stack, load_endpoints
from services.stack.procs import StackError, free_port
from services.stack.session import check_running, open_run_stack, stop_run
from services.stack.supervise import ServiceFailed, ServiceProcess, grpc_serving

__all__ = [
    "KAFKA_TOOLS",
    "ComponentStatus",
    "ServiceFailed",
    "ServiceProcess",
    "Endpoints",
    "Stack",
    "StackConfig",
    "StackError",
    "free_port",
    "free_stack_config",
    "grpc_serving",
    "load_endpoints",
    "load_stack_config",
    "check_running",
    "open_run_stack",
    "stop_run",
    "run_kafka_tool",
]
