"""Where the scorer's matmul bound goes: the ``bound_breakdown`` object of ``prefstream bench scorer``.

Why it exists: ``fraction_of_matmul_bound`` alone (0.55-0.59 on the 2-core dev box, against a 0.8
target) does not say whether the model's own forward, the share of the cores that reaches the model,
or the serving path is short.  Measured in the same run, on the same model and inputs, it splits as

    fraction_of_matmul_bound = in_process_fraction
                               x (inference_cpu_share / in_process_cpu_share)
                               x serving_efficiency_per_core

* ``in_process_fraction``: the served model (same dtype, same ``cpu_fast_path``) run by the scorer's
  worker plan (``scorer.runners.plan_workers``: N threads x torch threads each) over length-sorted
  batches of the bench inputs, no gRPC: achieved model FLOP/s / the same GEMM ceiling as
  ``fraction_of_matmul_bound``.  ``in_process_cpu_share``: CPU time of those worker threads /
  (wall x cores), ~1 on a quiet box; below 1 when other work on the machine takes cores from them.
* ``inference_cpu_share``: during the best concurrency level, CPU time of the scorer process's
  inference threads (OS names ``infer_N``, read from ``/proc/<pid>/task/<tid>/stat``) / (wall x
  cores); beside it ``server_other_cpu_cores`` (the scorer's other threads: event loop, tokenizer,
  gRPC) and ``client_cpu_cores`` (this process: the load generator).  Linux only; null with a reason
  elsewhere.
* ``serving_efficiency_per_core`` = (fraction_of_matmul_bound / inference_cpu_share) /
  (in_process_fraction / in_process_cpu_share): model FLOPs per CPU-second of the inference threads
  in the server relative to in-process; below 1 when the server's batches are worse shaped, or its
  other threads evict the caches or hold the GIL the inference threads need.
* ``gemm_shape_rate_fraction``: context for ``in_process_fraction``: the single-thread rate of the
  model's own Linear GEMM shapes (M = a batch's tokens; K = 384 is small for MiniLM), FLOP-weighted,
  / the single-thread square-GEMM rate.  The model's Linear layers cannot beat it; the rest of the
  gap to ``in_process_fraction`` is the work that is not a Linear GEMM (attention, norms, gathers).
"""

from __future__ import annotations

import itertools
import os
import resource
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Hashable, Mapping, NamedTuple, Sequence

#: Sequences per batch of the in-process run and the token count of the GEMM-shape run (x mean tokens):
#: about what the scorer's batcher forms at high concurrency on the HH inputs.
BATCH_SEQUENCES = 24


# ---------------------------------------------------------------------------------------------- GEMM shapes


def linear_shapes(model: Any) -> Counter[tuple[int, int]]:
    """(in_features, out_features) of every ``nn.Linear`` in ``model``, with how many layers have it."""
    import torch

    return Counter((m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear))


def flop_weighted_rate(flops: Mapping[Hashable, float], rates: Mapping[Hashable, float]) -> float:
    """FLOP/s over a mix of GEMMs: total FLOPs / total time, where each part takes flops / its rate."""
    return sum(flops.values()) / sum(f / rates[k] for k, f in flops.items())


def measure_gemm_flops(seconds: float = 3.0, n: int = 2048, dtype: str = "float32") -> float:
    """Sustained GEMM FLOP/s in ``dtype`` on this machine with torch's threads (an n x n x n matmul loop)."""
    import torch

    from scorer.precision import TORCH_DTYPES

    a, b = torch.randn(n, n).to(TORCH_DTYPES[dtype]), torch.randn(n, n).to(TORCH_DTYPES[dtype])
    for _ in range(3):
        a @ b
    it, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        it += 1
    return 2.0 * n ** 3 * it / (time.perf_counter() - t0)


def measure_linear_flops(in_features: int, out_features: int, tokens: int, dtype: str, seconds: float) -> float:
    """Sustained FLOP/s of ``F.linear`` (with bias) on (tokens, in_features) in ``dtype``, torch's threads."""
    import torch
    import torch.nn.functional as F

    from scorer.precision import TORCH_DTYPES

    dt = TORCH_DTYPES[dtype]
    x = torch.randn(tokens, in_features).to(dt)  # (M, K)
    w, b = torch.randn(out_features, in_features).to(dt), torch.randn(out_features).to(dt)  # (N, K), (N,)
    with torch.inference_mode():
        for _ in range(3):
            F.linear(x, w, b)
        it, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            F.linear(x, w, b)
            it += 1
    return 2.0 * tokens * in_features * out_features * it / (time.perf_counter() - t0)


def measure_gemm_shape_fraction(model: Any, tokens: int, dtype: str, seconds: float) -> dict[str, Any]:
    """Single-thread rate of ``model``'s Linear shapes (FLOP-weighted) / single-thread square-GEMM rate.

    ``seconds`` is shared by the shapes and the square GEMM; torch's thread count is restored after.
    """
    import torch

    shapes = linear_shapes(model)
    share = seconds / (len(shapes) + 1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rates = {s: measure_linear_flops(*s, tokens, dtype, share) for s in shapes}
        square = measure_gemm_flops(seconds=share, dtype=dtype)
    finally:
        torch.set_num_threads(before)
    rate = flop_weighted_rate({s: n * s[0] * s[1] for s, n in shapes.items()}, rates)
    return {
        "gemm_shape_rate_fraction": round(rate / square, 3),
        "gemm_shape_flops_1thread": round(rate),
        "gemm_flops_1thread": round(square),
        "gemm_shape_tokens": tokens,
        "gemm_shapes": {f"{i}x{o}": n for (i, o), n in sorted(shapes.items())},
    }


# ---------------------------------------------------------------------------------------------- in-process


def measure_in_process(runner: Any, inputs: Sequence[tuple[Any, str]], flops: Sequence[float], workers: int,
                       threads_each: int, cores: int, seconds: float) -> dict[str, Any]:
    """The runner driven like the scorer's inference pool, without the server.

    ``workers`` threads with ``threads_each`` torch threads each take length-sorted batches of
    ``BATCH_SEQUENCES`` bench inputs in turn for ``seconds``.  Each thread's rate is its FLOPs over its
    own time (so the last batch of one thread does not count as idle time of the other); they add up.
    ``flops[i]`` is the model FLOPs of ``inputs[i]``.  Torch's thread count is restored after.
    """
    import torch

    from services.reward_model import length_sorted_batches

    rows = [runner.encode(p, [r])[0] for p, r in inputs]
    batches = length_sorted_batches([len(r) for r in rows], BATCH_SEQUENCES)
    turn = itertools.count()
    start = threading.Barrier(workers)
    done: list[tuple[float, float, float]] = [(0.0, 1.0, 0.0)] * workers  # (FLOPs, wall s, CPU s) per worker
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            torch.set_num_threads(threads_each)  # as the scorer's workers run (scorer/runners.py)
            runner.run_batch([rows[j] for j in batches[i % len(batches)]])  # warm this thread
            start.wait()
            t0, c0, total = time.perf_counter(), time.thread_time(), 0.0
            while time.perf_counter() - t0 < seconds:
                batch = batches[next(turn) % len(batches)]
                runner.run_batch([rows[j] for j in batch])
                total += sum(flops[j] for j in batch)
            done[i] = (total, time.perf_counter() - t0, time.thread_time() - c0)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller's thread below
            errors.append(e)
            start.abort()  # the other workers stop waiting

    before = torch.get_num_threads()
    pool = [threading.Thread(target=work, args=(i,), name=f"in-process-{i}") for i in range(workers)]
    try:
        for th in pool:
            th.start()
        for th in pool:
            th.join()
    finally:
        torch.set_num_threads(before)
    if errors:
        raise errors[0]
    return {
        "in_process_flops": round(sum(f / wall for f, wall, _ in done)),
        "in_process_cpu_share": round(sum(cpu / wall for _, wall, cpu in done) / cores, 3),
        "in_process_workers": workers,
        "in_process_torch_threads": threads_each,
        "in_process_batch_sequences": BATCH_SEQUENCES,
    }


# ---------------------------------------------------------------------------------------------- CPU by thread


def parse_task_stat(text: str) -> tuple[str, float]:
    """(OS name, user + system CPU clock ticks) from a ``/proc/<pid>/task/<tid>/stat`` line (proc(5))."""
    end = text.rindex(")")  # the name is parenthesised and may itself hold spaces or parentheses
    fields = text[end + 2:].split()  # fields[0] is the state, field 3 of proc(5)
    return text[text.index("(") + 1:end], float(int(fields[11]) + int(fields[12]))  # utime, stime: fields 14, 15


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]] | None:
    """{tid: (OS name, CPU seconds)} of every thread of ``pid``; None where /proc does not list it
    (not Linux, or the process is gone)."""
    root = Path(f"/proc/{pid}/task")
    if not root.is_dir():
        return None
    tick = float(os.sysconf("SC_CLK_TCK"))
    out = {}
    for task in root.iterdir():
        try:
            name, ticks = parse_task_stat((task / "stat").read_text())
        except (FileNotFoundError, ProcessLookupError):  # the thread exited since the listing
            continue
        out[int(task.name)] = (name, ticks / tick)
    return out


class CpuSnapshot(NamedTuple):
    """What :func:`cpu_use` compares: wall time, the server's threads, this process's CPU seconds."""

    wall_s: float
    server_threads: dict[int, tuple[str, float]] | None
    client_cpu_s: float


def cpu_snapshot(server_pid: int) -> CpuSnapshot:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return CpuSnapshot(time.perf_counter(), thread_cpu_seconds(server_pid), ru.ru_utime + ru.ru_stime)


def cpu_cores_by_name(before: Mapping[int, tuple[str, float]], after: Mapping[int, tuple[str, float]],
                      wall_s: float) -> dict[str, float]:
    """Cores each OS thread name used between two snapshots, summed over the threads of that name.

    A thread born in between counts from 0; the CPU of one that ended in between is not seen.
    """
    cores: dict[str, float] = {}
    for tid, (name, cpu_s) in after.items():
        cores[name] = cores.get(name, 0.0) + (cpu_s - before.get(tid, (name, 0.0))[1]) / wall_s
    return cores


def cpu_use(before: CpuSnapshot, after: CpuSnapshot, cores: int, infer_prefix: str) -> dict[str, Any]:
    """Where the cores went between two snapshots: the server's inference threads (OS names
    ``<infer_prefix>_N``) as a share of all cores, its other threads and this process in cores."""
    wall = after.wall_s - before.wall_s
    client = round((after.client_cpu_s - before.client_cpu_s) / wall, 3)
    if before.server_threads is None or after.server_threads is None:
        return {"inference_cpu_share": None, "server_other_cpu_cores": None, "client_cpu_cores": client,
                "cpu_share_skipped": "per-thread CPU time needs Linux /proc/<pid>/task"}
    by_name = cpu_cores_by_name(before.server_threads, after.server_threads, wall)
    infer = sum(c for n, c in by_name.items() if n.startswith(f"{infer_prefix}_"))
    return {
        "inference_cpu_share": round(infer / cores, 3),
        "server_other_cpu_cores": round(sum(by_name.values()) - infer, 3),
        "client_cpu_cores": client,
        "server_cpu_cores_by_thread": {n: round(c, 3) for n, c in sorted(by_name.items()) if c >= 0.001},
    }


# ---------------------------------------------------------------------------------------------- breakdown


def serving_efficiency_per_core(fraction: float, in_process_fraction: float, inference_cpu_share: float,
                                in_process_cpu_share: float) -> float:
    """(fraction / inference_cpu_share) / (in_process_fraction / in_process_cpu_share): the bound's
    fraction per share of the cores the inference threads got, served over in-process."""
    return (fraction / inference_cpu_share) / (in_process_fraction / in_process_cpu_share)


def bound_breakdown(fraction: float, gemm_flops: float, in_process: Mapping[str, Any], shapes: Mapping[str, Any],
                    cpu: Mapping[str, Any]) -> dict[str, Any]:
    """The ``bound_breakdown`` object (module docstring) from the three measurements and the headline
    ``fraction_of_matmul_bound`` against the ceiling ``gemm_flops``."""
    in_fraction = in_process["in_process_flops"] / gemm_flops
    out = {**shapes, **in_process, "in_process_fraction": round(in_fraction, 3), **cpu}
    share, in_share = cpu.get("inference_cpu_share"), in_process["in_process_cpu_share"]
    out["serving_efficiency_per_core"] = (
        round(serving_efficiency_per_core(fraction, in_fraction, share, in_share), 3) if share and in_share else None)
    return out


__all__ = ["BATCH_SEQUENCES", "CpuSnapshot", "bound_breakdown", "cpu_cores_by_name", "cpu_snapshot", "cpu_use",
           "flop_weighted_rate", "linear_shapes", "measure_gemm_flops", "measure_gemm_shape_fraction", "measure_in_process",
           "parse_task_stat", "serving_efficiency_per_core", "thread_cpu_seconds"]
