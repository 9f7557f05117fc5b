"""One run's stack: reuse a running ``prefstream stack up`` or start a private one under a run folder.

The demo and the product loops (``prefstream loop ...``) start the same way: either they attach to
the stack an operator started (its run dir named), or they bring up their own under ``run_dir/stack``,
optionally after wiping what an earlier run left there.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Sequence

from services.endpoints import load_stack_endpoints
from services.stack.config import free_stack_config
from services.stack.manager import Stack
from services.stack.supervise import ServiceProcess


def open_run_stack(run_dir: Path, *, stack_run_dir: str = "", fresh: bool = True,
                   say: Callable[[str], None] = print) -> tuple[Stack | None, Path]:
    """(the stack this run started, or None when it attached to one; the stack's run dir)."""
    if stack_run_dir:
        load_stack_endpoints(stack_run_dir)  # fails clearly when nothing runs there
        return None, Path(stack_run_dir).resolve()
    stack_dir = run_dir / "stack"
    if fresh and run_dir.exists():
        stopped = Stack(free_stack_config(stack_dir)).down()  # pidfiles name what to stop, not ports
        say(f"fresh run: removing the previous run in {run_dir}"
            + (f" (stopped its {', '.join(stopped)})" if stopped else ""))
        shutil.rmtree(run_dir)
    stack = Stack(free_stack_config(stack_dir))
    say(f"starting the stack (Kafka KRaft, Redis, Ray) in {stack_dir} ...")
    stack.up()
    return stack, stack_dir


def check_running(services: Sequence[ServiceProcess]) -> None:
    """Raise with the log tail of the first service that exited."""
    for s in services:
        if not s.alive:
            raise RuntimeError(f"{s.name} exited unexpectedly; log {s.log_path}:\n{s.log_tail()}")


def stop_run(services: Sequence[ServiceProcess], stack: Stack | None, *, keep_stack: bool) -> None:
    """Stop the services (last started first), then the stack this run started unless it is kept."""
    for s in reversed(services):
        s.stop()
    if stack is not None and not keep_stack:
        stack.down()


__all__ = ["check_running", "open_run_stack", "stop_run"]
