"""The trainer on Ray Train: ``TorchTrainer`` + DDP over ``num_workers`` workers, CPU or GPU.

How a continual Kafka stream feeds DDP workers while keeping offsets exact:

* Rank 0 is the only Kafka consumer (a consumer-group member), the only checkpoint writer and the only
  one that talks to the registry.  It runs exactly the in-process loop (:mod:`trainer.loop`); only its
  ``step_fn`` differs: each micro-batch (new + replayed records) is broadcast to every rank with
  ``torch.distributed.broadcast_object_list``, and every rank, rank 0 included, trains on its own
  slice (``records[rank::world]``) through the same :class:`~trainer.learner.Learner`.  DDP all-reduces
  the gradients, with per-rank loss scales that make the average equal to the whole micro-batch's
  gradient (see :func:`trainer.learner.shard`).
* Offsets therefore never leave rank 0: a checkpoint written there contains exactly the records of the
  micro-batches broadcast before it, and the commit-after-durable rule is the in-process one.
* A step accumulated over several micro-batches is the same on every rank: each ``train`` command
  carries the micro-batch's share of the step and whether to step after it; ``apply`` steps on what has
  accumulated (a slow stream's partial step).
* After each checkpoint rank 0 sends ``report`` with its numbers and every rank calls
  ``ray.train.report`` with them (Ray Train wants every worker to report, the same number of times), so
  the run's progress shows in the Ray dashboard.  Rank 0 attaches a Ray checkpoint that is only a
  pointer (``prefstream_checkpoint.json``: the version and its URI in prefstream's store, which stays
  the one place weights live): Ray Train keeps the metrics of checkpointed reports, so ``Result.metrics``
  and ``Result.checkpoint`` name the last version, and the run keeps ``RAY_POINTERS_KEPT`` pointers.
* The other ranks block in the broadcast; rank 0 sends a heartbeat while the stream is idle so the
  collective never reaches the process-group timeout, and a ``stop`` (with the run summary) at the end.
* A worker failure makes Ray Train restart the group (``ray_max_failures``); the new rank 0 resumes
  from the latest durable checkpoint as a restarted process would.
* The driver only launches the run; SIGTERM/SIGINT set a flag (a tiny named actor) that rank 0 polls,
  so it stops between steps and writes a final checkpoint; the same actor carries rank 0's run
  summary back to the driver.

Every rank loads the resume folder rank 0 chose (a shared volume in a cluster, see k8s/trainer.yaml);
DDP's initial broadcast makes the weights identical anyway.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from services.schemas import PreferenceRecord
from trainer.config import SECTION, TrainerConfig
from trainer.learner import Learner, StepStats

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Seconds of stream idleness after which rank 0 pings the other ranks (far below the 30-min timeout).
HEARTBEAT_S = 60.0
STOP_POLL_S = 1.0
#: The file of the pointer checkpoint rank 0 reports to Ray Train, and how many of them Ray keeps.
POINTER_FILE = "prefstream_checkpoint.json"
RAY_POINTERS_KEPT = 5


def report_with_pointer(metrics: dict[str, Any]) -> None:
    """Rank 0's ``ray.train.report``: the metrics plus a pointer checkpoint naming the version."""
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory(prefix="prefstream-pointer-") as d:
        pointer = {k: metrics[k] for k in ("version", "uri") if k in metrics}
        (Path(d) / POINTER_FILE).write_text(json.dumps(pointer))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


class Commander:
    """Rank 0's side of the protocol: broadcast a command, then do its own share (a loop Stepper)."""

    def __init__(self, learner: Learner, world_size: int,
                 report: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.learner = learner
        self.world_size = world_size
        self._report = report
        self._last = time.monotonic()

    def _send(self, command: str, payload: Any) -> None:
        if self.world_size <= 1:
            return
        import torch.distributed as dist

        dist.broadcast_object_list([(command, payload)], src=0)
        self._last = time.monotonic()

    def train(self, records: Sequence[PreferenceRecord], weights: Sequence[float] | None = None, *,
              share: float = 1.0, apply: bool = True) -> StepStats:
        self._send("train", (list(records), list(weights) if weights is not None else None,
                             self.learner.objective.side_data(records), share, apply))
        return self.learner.train(records, weights, share=share, apply=apply)

    def apply(self) -> float:
        self._send("apply", None)
        return self.learner.apply()

    def keep_weights(self) -> None:
        self._send("keep_weights", None)
        self.learner.keep_weights()

    def roll_back(self, lr_factor: float = 1.0) -> None:
        self._send("roll_back", lr_factor)
        self.learner.roll_back(lr_factor)

    def report(self, metrics: dict[str, Any]) -> None:
        self._send("report", metrics)
        if self._report is not None:
            self._report(metrics)

    def heartbeat(self) -> None:
        if time.monotonic() - self._last >= HEARTBEAT_S:
            self._send("noop", None)

    def stop(self, summary: dict[str, Any]) -> None:
        self._send("stop", summary)

    def abort(self, reason: str) -> None:
        self._send("abort", reason)


def follow(learner: Learner, report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Ranks > 0: train on every broadcast micro-batch (and report what rank 0 reports) until rank 0
    says stop."""
    import torch.distributed as dist

    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        command, payload = box[0]
        if command == "train":
            records, weights, side, share, apply = payload
            learner.objective.accept_side_data(side)
            learner.train(records, weights, share=share, apply=apply)
        elif command == "apply":
            learner.apply()
        elif command == "keep_weights":
            learner.keep_weights()
        elif command == "roll_back":
            learner.roll_back(payload)
        elif command == "report":
            if report is not None:
                report(payload)
        elif command == "stop":
            return payload
        elif command == "abort":
            raise RuntimeError(f"rank 0 failed: {payload}")


def _broadcast(obj: Any, rank: int, world_size: int) -> Any:
    if world_size <= 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def worker_main(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: every rank builds a Learner; rank 0 also runs the loop."""
    import ray
    import ray.train
    import ray.train.torch

    from services.config import load_config
    from trainer.runtime import apply_runtime_settings, build_learner, connect_services, run_leader
    from trainer.checkpointing import find_resume_point
    from trainer.objectives import objective_for

    logging.basicConfig(level=config.get("log_level", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    cfg = load_config(TrainerConfig, section=SECTION, env={}, overrides=config["trainer"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    apply_runtime_settings(cfg)

    services = connect_services(cfg) if rank == 0 else None
    objective = objective_for(cfg)
    point = find_resume_point(cfg, services.store, services.registry, objective=objective) \
        if services is not None else None
    slim = dataclasses.replace(point, replay_records=(), eval_topic_records=()) if point is not None else None
    slim = _broadcast(slim, rank, world)
    learner = build_learner(
        cfg, point if rank == 0 else slim, objective, device=ray.train.torch.get_device(),
        wrap=lambda m: ray.train.torch.prepare_model(m, parallel_strategy_kwargs={"find_unused_parameters": False}),
        rank=rank, world_size=world,
    )
    log.info("rank %d of %d on %s, training module %s", rank, world, learner.device, type(learner.module).__name__)
    if rank != 0:
        follow(learner, report=ray.train.report)
        return

    commander = Commander(learner, world, report=report_with_pointer)
    control = ray.get_actor(config["control_actor"]) if config.get("control_actor") else None
    last_check = [0.0, False]

    def should_stop() -> bool:
        if control is None:
            return False
        now = time.monotonic()
        if now - last_check[0] >= STOP_POLL_S:
            last_check[0] = now
            last_check[1] = bool(ray.get(control.stop_requested.remote()))
        return last_check[1]

    try:
        result = run_leader(cfg, services, point, learner,
                            stepper=commander, should_stop=should_stop, on_idle=commander.heartbeat,
                            report=commander.report)
    except BaseException as e:
        commander.abort(f"{type(e).__name__}")
        raise
    finally:
        services.close()
    summary = {
        "steps": result.steps, "records": result.records, "replayed": result.replayed,
        "eval_records": result.eval_records, "checkpoints": len(result.checkpoints),
        "published": len(result.published), "rejected": len(result.rejected), "seconds": result.seconds,
        "world_size": world, "last_version": result.checkpoints[-1] if result.checkpoints else "",
        "stop_reason": result.stop_reason,
    }
    commander.stop(summary)
    if control is not None:
        ray.get(control.put_summary.remote(summary))


def _run_control_class():
    import ray

    @ray.remote(num_cpus=0)
    class RunControl:
        """Driver <-> rank 0: the stop request (SIGTERM/SIGINT on the driver) and the run summary."""

        def __init__(self) -> None:
            self._stop = False
            self._summary: dict[str, Any] = {}

        def request_stop(self) -> None:
            self._stop = True

        def stop_requested(self) -> bool:
            return self._stop

        def put_summary(self, summary: dict[str, Any]) -> None:
            self._summary = dict(summary)

        def summary(self) -> dict[str, Any]:
            return self._summary

    return RunControl


def runtime_env() -> dict[str, Any]:
    """Workers import ``trainer`` and ``services`` from this checkout and never reach the HF hub."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                         "TOKENIZERS_PARALLELISM": "false"}}


def run_on_ray(cfg: TrainerConfig, *, log_level: str = "INFO") -> dict[str, Any]:
    """Launch the continual trainer as a Ray Train run and wait for it; returns rank 0's summary."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=cfg.runtime.ray_address or None, runtime_env=runtime_env(), log_to_driver=True)
    control_name = f"prefstream-trainer-control-{uuid.uuid4().hex[:8]}"
    control = _run_control_class().options(name=control_name).remote()

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: asking rank 0 to checkpoint and stop", signum)
        control.request_stop.remote()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        trainer = TorchTrainer(
            worker_main,
            train_loop_config={"trainer": cfg.to_dict(), "control_actor": control_name, "log_level": log_level},
            scaling_config=ScalingConfig(num_workers=cfg.runtime.num_workers, use_gpu=cfg.runtime.use_gpu),
            torch_config=TorchConfig(backend="nccl" if cfg.runtime.use_gpu else "gloo"),
            run_config=RunConfig(
                name=f"prefstream-trainer-{cfg.model.model_name}-{uuid.uuid4().hex[:6]}",
                storage_path=str(Path(cfg.runtime.ray_storage_path).expanduser().resolve()),
                failure_config=FailureConfig(max_failures=cfg.runtime.ray_max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=RAY_POINTERS_KEPT),
            ),
        )
        result = trainer.fit()
        summary = dict(ray.get(control.summary.remote()))
        summary["ray_metrics"] = dict(result.metrics or {})  # the last checkpoint's report
        if result.checkpoint is not None:
            with result.checkpoint.as_directory() as d:
                summary["ray_checkpoint"] = json.loads((Path(d) / POINTER_FILE).read_text())
        return summary
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        ray.kill(control)
        if started_ray:
            ray.shutdown()
