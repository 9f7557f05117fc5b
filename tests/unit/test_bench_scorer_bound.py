"""bench/scorer_bound.py's pure parts: /proc parsing, CPU per thread name, the FLOP-weighted GEMM rate
and the decomposition of fraction_of_matmul_bound; numbers worked out by hand, nothing timed."""

import math
import os
import sys
import threading

import pytest
import torch
from torch import nn

import bench.scorer_bound
from bench.scorer_bound import (
    CpuSnapshot,
    bound_breakdown,
    cpu_cores_by_name,
    cpu_use,
    flop_weighted_rate,
    linear_shapes,
    measure_gemm_shape_fraction,
    measure_in_process,
    parse_task_stat,
    thread_cpu_seconds,
)


def test_parse_task_stat_takes_the_name_between_the_outer_parentheses():
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    line = "4242 (in fer) 0) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0 12345\n"
    assert parse_task_stat(line) == ("in fer) 0", 12.0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_thread_cpu_seconds_lists_this_thread_by_its_os_name():
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
        name = f.read().strip()
    threads = thread_cpu_seconds(os.getpid())
    assert threads[threading.get_native_id()][0] == name
    assert all(cpu >= 0 for _, cpu in threads.values())


def test_thread_cpu_seconds_is_none_for_a_missing_process():
    assert thread_cpu_seconds(-1) is None


BEFORE = {1: ("infer_0", 10.0), 2: ("infer_1", 4.0), 3: ("python", 1.0), 5: ("informer", 0.0)}
# thread 4 was born in between (counts from 0); thread 5 ended in between (not seen)
AFTER = {1: ("infer_0", 18.0), 2: ("infer_1", 12.0), 3: ("python", 1.5), 4: ("python", 0.5)}


def test_cpu_cores_by_name_sums_threads_of_one_name():
    cores = cpu_cores_by_name(BEFORE, AFTER, wall_s=10.0)
    assert cores == pytest.approx({"infer_0": 0.8, "infer_1": 0.8, "python": 0.1})


def test_cpu_use_splits_inference_threads_from_the_rest():
    before = CpuSnapshot(wall_s=100.0, server_threads=BEFORE, client_cpu_s=3.0)
    after = CpuSnapshot(wall_s=110.0, server_threads={**AFTER, 6: ("informer", 2.0)}, client_cpu_s=3.3)
    use = cpu_use(before, after, cores=2, infer_prefix="infer")
    assert use["inference_cpu_share"] == pytest.approx(0.8)  # (0.8 + 0.8) cores of 2
    assert use["server_other_cpu_cores"] == pytest.approx(0.3)  # python 0.1 + informer 0.2
    assert use["client_cpu_cores"] == pytest.approx(0.03)
    assert use["server_cpu_cores_by_thread"]["informer"] == pytest.approx(0.2)


def test_cpu_use_without_per_thread_times_says_why():
    use = cpu_use(CpuSnapshot(0.0, None, 1.0), CpuSnapshot(2.0, None, 1.5), cores=2, infer_prefix="infer")
    assert use["inference_cpu_share"] is None and use["server_other_cpu_cores"] is None
    assert use["client_cpu_cores"] == 0.25
    assert "Linux" in use["cpu_share_skipped"]


def test_linear_shapes_counts_each_in_out_pair():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 8))
    assert linear_shapes(model) == {(4, 8): 2, (8, 4): 1}


def test_flop_weighted_rate_is_total_flops_over_total_time():
    # 100 FLOPs at 100 FLOP/s (1 s) and 100 at 50 FLOP/s (2 s): 200 FLOPs in 3 s
    assert flop_weighted_rate({"a": 100.0, "b": 100.0}, {"a": 100.0, "b": 50.0}) == pytest.approx(200 / 3)


def test_bound_breakdown_multiplies_back_to_the_fraction():
    in_process = {"in_process_flops": 0.72 * 800e9, "in_process_cpu_share": 0.98}
    cpu = {"inference_cpu_share": 0.85, "server_other_cpu_cores": 0.15, "client_cpu_cores": 0.03}
    out = bound_breakdown(0.576, 800e9, in_process, {"gemm_shape_rate_fraction": 0.84}, cpu)
    assert out["in_process_fraction"] == pytest.approx(0.72)
    assert out["serving_efficiency_per_core"] == pytest.approx((0.576 / 0.85) / (0.72 / 0.98), abs=1e-3)
    parts = out["in_process_fraction"] * out["inference_cpu_share"] / out["in_process_cpu_share"]
    assert math.isclose(parts * out["serving_efficiency_per_core"], 0.576, rel_tol=2e-3)
    assert out["gemm_shape_rate_fraction"] == 0.84 and out["client_cpu_cores"] == 0.03


def test_bound_breakdown_without_cpu_share_has_no_efficiency():
    in_process = {"in_process_flops": 500e9, "in_process_cpu_share": 1.0}
    out = bound_breakdown(0.5, 800e9, in_process, {}, {"inference_cpu_share": None, "cpu_share_skipped": "why"})
    assert out["serving_efficiency_per_core"] is None and out["cpu_share_skipped"] == "why"


class _FakeRunner:
    """encode -> one row whose len() is the response's length; run_batch -> one score per row."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def encode(self, prompt, responses):
        return [list(responses[0])]

    def run_batch(self, rows):
        self.batch_sizes.append(len(rows))
        return [(0.0, {}) for _ in rows]


def test_measure_in_process_runs_the_worker_plan_and_restores_torch_threads():
    inputs = [((), "x" * n) for n in range(1, 61)]
    runner, threads = _FakeRunner(), torch.get_num_threads()
    out = measure_in_process(runner, inputs, [1.0] * len(inputs), workers=2, threads_each=1, cores=2, seconds=0.02)
    assert torch.get_num_threads() == threads
    assert out["in_process_flops"] > 0 and out["in_process_cpu_share"] >= 0
    assert (out["in_process_workers"], out["in_process_torch_threads"]) == (2, 1)
    assert max(runner.batch_sizes) == out["in_process_batch_sequences"]


def test_measure_in_process_raises_a_worker_failure():
    class Broken(_FakeRunner):
        def run_batch(self, rows):
            raise ValueError("broken weights")

    with pytest.raises(ValueError, match="broken weights"):
        measure_in_process(Broken(), [((), "x")] * 4, [1.0] * 4, workers=2, threads_each=1, cores=2, seconds=0.02)


def test_gemm_shape_fraction_rates_each_shape_against_the_square_gemm(monkeypatch):
    monkeypatch.setattr(bench.scorer_bound, "measure_gemm_flops", lambda seconds, dtype: 1e15)  # no 2048^3 GEMMs here
    threads = torch.get_num_threads()
    out = measure_gemm_shape_fraction(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8)), 4, "float32", 0.03)
    assert torch.get_num_threads() == threads
    assert out["gemm_shapes"] == {"8x16": 1, "16x8": 1} and out["gemm_flops_1thread"] == 1e15
    assert out["gemm_shape_rate_fraction"] == pytest.approx(out["gemm_shape_flops_1thread"] / 1e15, abs=1e-3)
