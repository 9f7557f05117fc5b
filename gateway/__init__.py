"""The gateway: durable ingestion of completions and feedback, and the processor that turns them into
preference records.  What other packages may use is exported here (imported lazily, so importing
``gateway.cli`` for the ``prefstream`` command does not pull in gRPC servers and Kafka clients)::

    from gateway import Gateway, GatewayClient, GatewayConfig, load_gateway_config, create_key
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Gateway": "gateway.service",
    "serve": "gateway.service",
    "GatewayConfig": "gateway.config",
    "load_gateway_config": "gateway.config",
    "GatewayClient": "gateway.client",
    "EventResult": "gateway.client",
    "create_key": "gateway.auth",
    "revoke_key": "gateway.auth",
    "list_keys": "gateway.auth",
    "completion_id_for": "gateway.events",
    "import_file": "gateway.importer",
    "Processor": "gateway.processor",
    "GatewayHarness": "gateway.testing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
