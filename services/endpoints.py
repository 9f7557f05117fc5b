"""Where the local stack's Kafka, Redis and Ray listen, read from the ``stack.json`` it publishes.

A deployable started without explicit addresses fills them from the local stack (the demo, the
integration tests and a developer's shell all rely on it).  Reading that file is a runtime concern,
while starting the stack is a dev tool (:mod:`services.stack`), so the reader lives here and imports
nothing of the launcher: a gateway, trainer or scorer never pulls the launcher in.

``stack.json`` is written by ``prefstream stack up`` in its run dir (``--run-dir``, default
``PREFSTREAM_STACK_RUN_DIR`` or ``.run/stack``); its ``endpoints`` object holds the three addresses,
each null when the stack does not run that component.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

#: The environment variable naming the stack's run dir, and the run dir when it is unset.
RUN_DIR_ENV = "PREFSTREAM_STACK_RUN_DIR"
DEFAULT_RUN_DIR = ".run/stack"
STATE_FILE = "stack.json"


class StackNotRunning(RuntimeError):
    """No readable ``stack.json`` in the run dir; the message says how to start the stack."""


@dataclass(frozen=True)
class StackEndpoints:
    """How to reach a running local stack; a field is None when that component is not part of it."""

    kafka_bootstrap: str | None
    redis_url: str | None
    ray_address: str | None


def stack_run_dir(run_dir: str | os.PathLike | None = None) -> Path:
    """The absolute run dir: ``run_dir``, else ``$PREFSTREAM_STACK_RUN_DIR``, else ``.run/stack``."""
    if run_dir is None or str(run_dir) == "":
        run_dir = os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR
    return Path(run_dir).expanduser().resolve()


def load_stack_endpoints(run_dir: str | os.PathLike | None = None) -> StackEndpoints:
    """The endpoints the stack in ``run_dir`` published (see :func:`stack_run_dir` for the default).

    Raises :class:`StackNotRunning` naming the file and the command to run when the stack is not up
    (no ``stack.json``) or its state is unreadable.
    """
    root = stack_run_dir(run_dir)
    path = root / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StackNotRunning(
            f"the local stack is not up (no {path}); start it with `prefstream stack up --run-dir {root}` "
            "or set the addresses explicitly"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise StackNotRunning(f"stack state {path} is unreadable ({e}); run `prefstream stack down` then `up`") from None
    ep = data.get("endpoints") if isinstance(data, dict) else None
    if not isinstance(ep, dict):
        raise StackNotRunning(f"stack state {path} has no endpoints; run `prefstream stack up --run-dir {root}` again")
    return StackEndpoints(
        kafka_bootstrap=_address(ep, "kafka_bootstrap", path),
        redis_url=_address(ep, "redis_url", path),
        ray_address=_address(ep, "ray_address", path),
    )


def _address(ep: dict, key: str, path: Path) -> str | None:
    value = ep.get(key)
    if value is None or (isinstance(value, str) and value):
        return value
    raise StackNotRunning(f"stack state {path}: endpoints.{key} must be a non-empty string or null, got {value!r}")
