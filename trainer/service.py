"""Running the continual trainer as a service: endpoints, metrics, signals, and the choice of path.

``num_workers = 0`` trains in this process; ``num_workers >= 1`` launches the same loop as a Ray Train
run (:mod:`trainer.ray_train`).  SIGTERM / SIGINT stop it between steps with a final checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from services.metrics import serve_metrics
from trainer.config import TrainerConfig

log = logging.getLogger(__name__)


def serve(cfg: TrainerConfig, *, log_level: str = "INFO") -> int:
    """Run until stopped (or until max_records / idle_exit_s); returns a process exit code."""
    cfg = cfg.with_endpoints()
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("kafka").setLevel(logging.WARNING)  # per-connection INFO chatter
    log.info("trainer %s: topic %s, group %s, kafka %s, store %s, %s", cfg.model.model_name, cfg.stream.topic, cfg.stream.group_id,
             cfg.stream.kafka_bootstrap, cfg.checkpoint.checkpoint_url,
             f"Ray Train with {cfg.runtime.num_workers} worker(s) at {cfg.runtime.ray_address}" if cfg.runtime.num_workers else "in-process")
    if cfg.runtime.num_workers:
        from trainer.ray_train import run_on_ray

        summary: Any = run_on_ray(cfg, log_level=log_level)
        log.info("Ray Train run finished: %s", summary)
        return 0
    from trainer.runtime import run_in_process

    serve_metrics(cfg.runtime.metrics_port, cfg.runtime.metrics_host)
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping after the current step (with a final checkpoint)", signum)
        stop.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        run_in_process(cfg, should_stop=stop.is_set)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
