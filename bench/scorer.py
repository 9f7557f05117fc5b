"""``prefstream bench scorer``: gRPC scoring throughput and latency against two honest baselines.

What it measures, all in one run on the same model and the same inputs (HH-RLHF helpful test prompts
with their responses, one (prompt, response) per request, cycled):

* the scorer (a real ``python -m scorer`` process) over gRPC at several client concurrency levels:
  ``throughput_rps``, ``p50_ms``, ``p99_ms`` per level;
* the scorer's serving dtype (``serving_dtype``, read from its own metrics: ``dtype: auto`` is bf16 on
  CPUs with native bf16, see scorer/precision.py);
* the usual way: ``transformers.pipeline("text-classification", batch_size=1)`` in-process in fp32,
  with one thread per core and with one thread, the faster counting (``pipeline_rps``, and ``ratio_vs_pipeline`` = best scorer rps / pipeline rps), and the same pipeline
  on the stock bf16 model, without scorer/fastpath.py (``pipeline_bf16_rps``, ``ratio_vs_pipeline_bf16``) so a bf16 scorer is also
  compared with bf16 done the simple way;
* the machine's ceiling: sustained GEMM FLOP/s measured with torch here in fp32 and bf16, and the
  model's matmul FLOPs per scored sequence computed from its linear layers and the actual token counts;
  ``fraction_of_matmul_bound`` = achieved model FLOP/s / GEMM FLOP/s **in the serving dtype** (a bf16
  scorer against the fp32 ceiling would look 3x better than it is);
* where that bound goes (``bound_breakdown``, measured by bench/scorer_bound.py, which explains each
  field): the served model in-process with the scorer's worker plan (``in_process_fraction``), the share
  of the cores its inference threads got during the best level (``inference_cpu_share``, from
  /proc per thread, beside ``server_other_cpu_cores`` and ``client_cpu_cores``), and the rest, so that
  ``fraction_of_matmul_bound = in_process_fraction x (inference_cpu_share / in_process_cpu_share)
  x serving_efficiency_per_core``; ``gemm_shape_rate_fraction`` rates the model's own Linear shapes
  against the square GEMM (single thread);
* accuracy of bf16 against fp32 on the same HH test pairs: ``bf16_vs_fp32_max_abs_diff`` / ``_mean_abs_diff``
  and ``bf16_vs_fp32_rank_agreement`` (share of (chosen, rejected) pairs ordered the same way), with
  the fp32 scores' spread and the largest fp32 gap among flipped pairs for scale;
* hot swaps under load: a scorer following a Redis registry while new checkpoints are published
  every few seconds; ``failed_requests_during_swaps`` (target 0) and ``swaps``;
* the same Score RPC driven by ghz (a Go load generator), when it can be built; otherwise the JSON
  says why it was skipped;
* policy hot swaps under generation load (bench/scorer_policy.py explains the keys): unary Generate
  and GenerateStream with fixed seeds, first without and then with policy versions published every
  few seconds; ``failed_requests_during_policy_swaps`` (target 0), ``policy_swaps``, latency p50/p99
  and tokens/s in both windows, and each swap's duration.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from bench.scorer_bound import measure_gemm_flops
from bench.scorer_process import free_port, percentile, served_dtype, start_redis, start_scorer

log = logging.getLogger(__name__)

GHZ_VERSION = "v0.120.0"
SCORE_METHOD = "prefstream.scorer.v1.ScorerService.Score"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", default=None,
                   help="comma-separated client concurrency levels (default quick 1,8,32; full 1,4,16,64)")
    p.add_argument("--duration-s", type=float, default=None, help="seconds per level (default quick 12, full 30)")
    p.add_argument("--model-path", default=None, help="reward model folder (default: the embedded MiniLM-L6)")
    p.add_argument("--no-ghz", action="store_true", help="skip the ghz run")
    p.add_argument("--no-swaps", action="store_true", help="skip the hot-swap-under-load run")
    p.add_argument("--no-policy", action="store_true", help="skip the policy hot-swap-under-generation run")
    p.add_argument("--policy-swaps", type=int, default=None, help="policy versions published under load "
                   "(default quick 3, full 6)")
    p.add_argument("--policy-max-tokens", type=int, default=8, help="max_tokens of each generation request")
    p.add_argument("--policy-clients", type=int, default=1, help="closed-loop unary Generate clients, and as many "
                   "GenerateStream clients (more decode together as one batch; the latencies reported are then "
                   "those of a shared batch)")
    p.add_argument("--policy-path", default=None, help="policy the versions are copied from (HF folder or "
                   ".gguf; default: the embedded SmolLM2)")


# ---------------------------------------------------------------------------------------------- inputs


def load_inputs(limit: int | None = None) -> list[tuple[tuple[Any, ...], str]]:
    """(prompt, response) pairs from hh_helpful_test_500: the chosen and the rejected response of each."""
    from services.data import TEST_FILE, load_openpipe_jsonl, shared_data_dir

    out = []
    for rec in load_openpipe_jsonl(shared_data_dir() / TEST_FILE):
        for resp in (rec.chosen, rec.rejected):
            out.append((rec.prompt, resp))
    return out[:limit] if limit else out


def model_flops_per_sequence(hf_model: Any, tokens: int) -> float:
    """Matmul FLOPs of one forward over ``tokens`` tokens: 2 x tokens x (weights of every Linear)
    plus attention's QK^T and AV products (4 x layers x tokens^2 x hidden).  Embedding lookups,
    norms, activations and softmax are not matmuls and are not counted (they are the overhead)."""
    import torch

    linear = sum(m.weight.numel() for m in hf_model.modules() if isinstance(m, torch.nn.Linear))
    cfg = hf_model.config
    layers = getattr(cfg, "num_hidden_layers", 0)
    hidden = getattr(cfg, "hidden_size", 0)
    return 2.0 * tokens * linear + 4.0 * layers * tokens * tokens * hidden


# ---------------------------------------------------------------------------------------------- load


async def drive(address: str, requests: Sequence[Any], concurrency: int, duration_s: float, *,
                keep_latencies: bool = False) -> dict[str, Any]:
    """``concurrency`` closed-loop clients sending Score for ``duration_s``; latency and outcomes
    (``latencies_s``, every one, with ``keep_latencies``)."""
    import grpc

    from prefstream.scorer.v1 import scorer_pb2_grpc
    from services.grpc_server import channel

    ch = channel(address, aio=True)
    stub = scorer_pb2_grpc.ScorerServiceStub(ch)
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    counter = itertools.count()
    stop_at = time.monotonic() + duration_s

    async def worker() -> None:
        while time.monotonic() < stop_at:
            req = requests[next(counter) % len(requests)]
            t0 = time.perf_counter()
            try:
                resp = await stub.Score(req, timeout=60)
            except grpc.aio.AioRpcError as e:
                failures[e.code().name] += 1
                continue
            latencies.append(time.perf_counter() - t0)
            versions[resp.model.version] += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await ch.close()
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "failed_requests": sum(failures.values()),
        "failures": dict(failures),
        "throughput_rps": round(len(latencies) / elapsed, 2),
        "p50_ms": round(1000 * (percentile(latencies, 50) or 0), 2),
        "p99_ms": round(1000 * (percentile(latencies, 99) or 0), 2),
        "versions": dict(versions),
        **({"latencies_s": latencies} if keep_latencies else {}),
    }


def _score_requests(inputs: Sequence[tuple[Any, str]]) -> list[Any]:
    from scorer.domain import ScoreQuery

    return [ScoreQuery(prompt=tuple(p), responses=(r,)).to_proto() for p, r in inputs]


def measure_bf16_agreement(reference: Any, bf16: Any, pairs: int) -> dict[str, Any]:
    """Score the first ``pairs`` HH test pairs with the fp32 and the bf16 runner's model (offline,
    length-sorted batches of 16): ``bf16_vs_fp32_*`` keys (see scorer.precision.Agreement)."""
    from scorer.precision import agreement
    from services.data import TEST_FILE, load_openpipe_jsonl, shared_data_dir

    recs = load_openpipe_jsonl(shared_data_dir() / TEST_FILE)[:pairs]
    prompts = [r.prompt for r in recs for _ in (0, 1)]
    responses = [x for r in recs for x in (r.chosen, r.rejected)]

    def scored(runner: Any) -> list[tuple[float, float]]:
        s = [x.reward for x in runner.model.score(prompts, responses, batch_size=16)]
        return list(zip(s[0::2], s[1::2]))

    return agreement(scored(reference), scored(bf16)).to_dict("bf16_vs_fp32_")


# ---------------------------------------------------------------------------------------------- baseline


def run_pipeline(runner: Any, inputs: Sequence[tuple[Any, str]], budget_s: float) -> dict[str, Any]:
    """transformers pipeline, batch_size=1, same model object and (prompt, response) text pairs."""
    from transformers import AutoTokenizer, pipeline

    from services.reward_model import format_prompt

    model = runner.model
    tok = AutoTokenizer.from_pretrained(model.tokenizer.name_or_path)
    tok.truncation_side = "left"  # keep the end of the prompt, as the scorer does
    pipe = pipeline("text-classification", model=model.hf_model, tokenizer=tok, device=-1,
                    function_to_apply="none", batch_size=1)
    encoder = model.family == "encoder"

    def example(p: Any, r: str) -> Any:
        if encoder:
            return {"text": format_prompt(p), "text_pair": r}
        return format_prompt(p) + "\n\nAssistant: " + r

    kw = {"truncation": "only_first" if encoder else True, "max_length": model.spec.max_length}
    pipe(example(*inputs[0]), **kw)  # warm-up
    scores, n, t0 = [], 0, time.perf_counter()
    for p, r in itertools.cycle(inputs):
        try:
            out = pipe(example(p, r), **kw)
        except Exception:  # noqa: BLE001 - the response alone exceeds max_length: cut both sides
            out = pipe(example(p, r), **{**kw, "truncation": True})
        if len(scores) < 20:
            scores.append(out[0]["score"] if isinstance(out, list) else out["score"])
        n += 1
        if time.perf_counter() - t0 >= budget_s:
            break
    elapsed = time.perf_counter() - t0
    return {"pipeline_rps": round(n / elapsed, 2), "pipeline_requests": n, "first_scores": scores}


def best_pipeline(runner: Any, inputs: Sequence[tuple[Any, str]], budget_s: float, threads: int) -> dict[str, Any]:
    """run_pipeline with torch's usual threads (one per core) and with one thread, half the budget each;
    the faster counts.  On a loaded box a multi-threaded forward can collapse (its OpenMP team waits
    for a preempted thread: 1.5-4 vs 17 seq/s measured here at load 6), which would flatter the scorer."""
    import torch

    runs = {}
    try:
        for t in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(t)
            runs[t] = run_pipeline(runner, inputs, budget_s=budget_s / 2)
    finally:
        torch.set_num_threads(threads)
    best_t = max(runs, key=lambda t: runs[t]["pipeline_rps"])
    return {**runs[best_t], "pipeline_threads": best_t,
            "pipeline_rps_by_threads": {str(t): r["pipeline_rps"] for t, r in runs.items()}}


# ---------------------------------------------------------------------------------------------- ghz


def find_or_build_ghz() -> tuple[str | None, str | None]:
    """(path, None) or (None, why not).  Builds with ``go install`` into ~/.cache/prefstream/bin."""
    cache_bin = Path(os.environ.get("PREFSTREAM_CACHE_DIR", Path.home() / ".cache" / "prefstream")).expanduser() / "bin"
    for cand in (cache_bin / "ghz", shutil.which("ghz")):
        if cand and Path(cand).exists():
            return str(cand), None
    go = shutil.which("go")
    if go is None:
        return None, "ghz is not installed and there is no Go toolchain to build it"
    cache_bin.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOBIN": str(cache_bin), "GOPATH": str(cache_bin.parent / "go"), "GOFLAGS": "-modcacherw"}
    try:
        out = subprocess.run([go, "install", f"github.com/bojand/ghz/cmd/ghz@{GHZ_VERSION}"], env=env,
                             capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return None, "building ghz timed out after 900s"
    if out.returncode != 0 or not (cache_bin / "ghz").exists():
        return None, f"go install ghz@{GHZ_VERSION} failed: {(out.stderr or out.stdout).strip()[-300:]}"
    return str(cache_bin / "ghz"), None


def run_ghz(ghz: str, address: str, inputs: Sequence[tuple[Any, str]], concurrency: int, duration_s: float) -> dict[str, Any]:
    from google.protobuf import json_format

    data = [json_format.MessageToDict(r, preserving_proto_field_name=True) for r in _score_requests(inputs)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(data, f)
        data_path = f.name
    try:
        proto_root = Path(__file__).resolve().parent.parent / "proto"
        cmd = [ghz, "--insecure", "--proto", str(proto_root / "prefstream/scorer/v1/scorer.proto"),
               "--import-paths", str(proto_root), "--call", SCORE_METHOD, "--data-file", data_path, "--concurrency", str(concurrency),
               "--connections", "1", "--duration", f"{int(duration_s)}s", "--timeout", "60s", "--format", "json", address]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 120)
    finally:
        os.unlink(data_path)
    if out.returncode not in (0, 1) or not out.stdout.strip():
        return {"skipped": f"ghz exited {out.returncode}: {out.stderr.strip()[-300:]}"}
    rep = json.loads(out.stdout)
    dist = {int(d["percentage"]): d["latency"] / 1e6 for d in rep.get("latencyDistribution") or []}
    codes = rep.get("statusCodeDistribution") or {}
    errors = rep.get("errorDistribution") or {}
    cut = sum(v for k, v in errors.items() if "closed network connection" in k or "context canceled" in k)
    return {
        "concurrency": concurrency,
        "throughput_rps": round(rep.get("rps", 0.0), 2),
        "p50_ms": round(dist.get(50, 0.0), 2),
        "p99_ms": round(dist.get(99, 0.0), 2),
        "requests": rep.get("count"),
        "status_codes": codes,
        # When --duration ends, ghz closes its connection under the calls still in flight (one per
        # concurrent worker): client-side "closed network connection" / "canceled" errors, not
        # server failures.  They are counted apart.
        "cut_at_end": cut,
        "failed_requests": sum(v for k, v in codes.items() if k != "OK") - cut,
        "errors": errors,
    }


# ---------------------------------------------------------------------------------------------- swaps


def run_swaps(inputs: Sequence[tuple[Any, str]], runner: Any, log_dir: Path, duration_s: float,
              every_s: float, concurrency: int) -> dict[str, Any]:
    """Load a registry-following scorer while publishing a new checkpoint every ``every_s`` seconds."""
    import torch

    from services.checkpoints import CheckpointStore
    from services.kinds import ModelKind
    from services.registry import ModelRegistry, ModelVersion

    redis_proc, client, url = start_redis()
    store = CheckpointStore(str(log_dir / "checkpoints"))
    scorer = None
    try:
        registry = ModelRegistry(client)
        model = runner.model
        head = model.hf_model.classifier if hasattr(model.hf_model, "classifier") else None

        def publish(i: int) -> None:
            # A new version: the same backbone with a shifted head bias, so answers tell versions apart.
            if head is not None:
                with torch.no_grad():
                    head.bias.add_(1.0)
            version = f"v{i:06d}"
            ref = store.write("reward", version, lambda d: model.save(d), {"bench": True, "i": i})
            registry.publish(ModelVersion(name="reward", version=version, uri=ref.uri, kind=ModelKind.REWARD))

        publish(1)
        scorer, address = start_scorer(log_dir, "scorer-swaps", {
            "PREFSTREAM_SCORER_REDIS_URL": url, "PREFSTREAM_SCORER_POLL_INTERVAL_S": "0.2",
            "PREFSTREAM_SCORER_DISCOVER_MODELS": "false",
        })
        published = [1]
        stop = threading.Event()

        def publisher() -> None:
            i = 1
            while not stop.wait(every_s):
                i += 1
                publish(i)
                published.append(i)

        th = threading.Thread(target=publisher, daemon=True)
        th.start()
        res = asyncio.run(drive(address, _score_requests(inputs), concurrency, duration_s))
        stop.set()
        th.join()
        swaps = len(res["versions"]) - 1
        return {
            "failed_requests_during_swaps": res["failed_requests"],
            "swaps": swaps,
            "published_during_load": len(published) - 1,
            "swap_load": {k: res[k] for k in ("concurrency", "requests", "throughput_rps", "p50_ms", "p99_ms", "failures")},
            "versions_answered": res["versions"],
        }
    finally:
        if scorer is not None:
            scorer.stop()
        redis_proc.terminate()
        redis_proc.wait(10)


# ---------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.scorer_bound import (
        BATCH_SEQUENCES, bound_breakdown, cpu_snapshot, cpu_use, measure_gemm_shape_fraction, measure_in_process,
    )
    from scorer.config import load_scorer_config
    from scorer.runners import configure_torch_threads, cpu_cores, load_reward, plan_workers
    from scorer.server import INFER_THREADS
    from services.reward_model import default_reward_model_path

    quick = bool(getattr(args, "quick", False))
    levels = [int(x) for x in (args.concurrency or ("1,8,32" if quick else "1,4,16,64")).split(",")]
    duration = args.duration_s or (12.0 if quick else 30.0)
    path = args.model_path or default_reward_model_path()
    threads, cores = configure_torch_threads(0), cpu_cores()
    scorer_cfg = load_scorer_config()  # what the scorer process reads too (PREFSTREAM_SCORER_* variables)
    inputs = load_inputs()
    # Shared boxes: the 1-minute load average at start and end says how much of the machine we had.
    load_start = round(os.getloadavg()[0], 2)
    result: dict[str, Any] = {"model": path, "torch_threads": threads, "inputs": len(inputs),
                              "concurrency_levels": levels, "duration_s_per_level": duration}

    # The fp32 model (the usual pipeline, the reference scores, the swap run's checkpoints) and the
    # same weights as the scorer serves them in bf16 (backbone bf16, head fp32: scorer/precision.py).
    runner = load_reward(path, device="cpu", dtype="float32", warmup=True)
    # With the scorer's own cpu_fast_path setting (config/env), so in-process bf16 runs what it serves.
    runner_bf16 = load_reward(path, device="cpu", dtype="bfloat16", warmup=True,
                              cpu_fast_path=scorer_cfg.cpu_fast_path)
    result["cpu_fast_path"] = runner_bf16.cpu_fast_path  # scorer/fastpath.py applied to the bf16 model
    # The bf16 pipeline baseline is the usual transformers model, never our fast path.
    pipe_bf16 = (load_reward(path, device="cpu", dtype="bfloat16", warmup=True, cpu_fast_path=False)
                 if runner_bf16.cpu_fast_path else runner_bf16)
    lengths = runner.model.lengths([p for p, _ in inputs], [r for _, r in inputs])
    flops = [model_flops_per_sequence(runner.model.hf_model, t) for t in lengths]
    mean_flops = statistics.fmean(flops)
    gemm_s = 3.0 if quick else 5.0
    # This box is shared: the GEMM ceilings and the pipelines are measured before AND after the scorer
    # runs, and the higher of each is used, so the reported ratios are conservative.
    gemm_before = {d: measure_gemm_flops(seconds=gemm_s, dtype=d) for d in ("float32", "bfloat16")}
    result.update({
        "mean_tokens": round(statistics.fmean(lengths), 1),
        "max_length": runner.max_length,
        "model_flops_per_sequence": round(mean_flops),
    })
    log.info("GEMM fp32 %.1f / bf16 %.1f GFLOP/s; %.2f GFLOP per sequence (mean %.0f tokens)",
             gemm_before["float32"] / 1e9, gemm_before["bfloat16"] / 1e9, mean_flops / 1e9, result["mean_tokens"])

    pipe_budget = 12.0 if quick else 30.0  # per pipeline run, split over two thread counts
    pipes = {"float32": [best_pipeline(runner, inputs, pipe_budget, threads)],
             "bfloat16": [best_pipeline(pipe_bf16, inputs, pipe_budget, threads)]}

    with tempfile.TemporaryDirectory(prefix="prefstream-bench-scorer-") as tmp:
        log_dir = Path(tmp)
        metrics_port = free_port()
        proc, address = start_scorer(log_dir, "scorer", {"PREFSTREAM_SCORER_METRICS_PORT": str(metrics_port)})
        try:
            serving = served_dtype(metrics_port)
            if serving not in ("float32", "bfloat16"):
                raise RuntimeError(f"the scorer reports serving dtype {serving!r}; this bench compares float32 and "
                                   "bfloat16 on CPU (set PREFSTREAM_SCORER_DTYPE)")
            log.info("the scorer serves in %s", serving)
            requests = _score_requests(inputs)
            asyncio.run(drive(address, requests, max(levels), 5.0))  # warm-up, not reported
            result["levels"], cpu_by_level = [], {}
            for c in levels:
                # Per-thread CPU of the scorer and this process's CPU around each level (bound_breakdown).
                before = cpu_snapshot(proc.proc.pid)
                res = asyncio.run(drive(address, requests, c, duration))
                cpu_by_level[c] = cpu_use(before, cpu_snapshot(proc.proc.pid), cores, INFER_THREADS)
                log.info("concurrency %d: %.1f req/s, p50 %.1f ms, p99 %.1f ms, %d failed; inference threads %s of "
                         "the cores", c, res["throughput_rps"], res["p50_ms"], res["p99_ms"], res["failed_requests"],
                         cpu_by_level[c]["inference_cpu_share"])
                result["levels"].append({**{k: v for k, v in res.items() if k != "versions"},
                                         "inference_cpu_share": cpu_by_level[c]["inference_cpu_share"]})
            # The scorer's scores equal the in-process model's in the same dtype (one row per batch both ways).
            first = asyncio.run(_first_scores(address, requests[:20]))
            result["pipeline_max_abs_diff"] = round(
                max(abs(a - b) for a, b in zip(first, pipes[serving][0]["first_scores"])), 6)
            if args.no_ghz:
                result["ghz"] = {"skipped": "--no-ghz"}
            else:
                ghz, why = find_or_build_ghz()
                result["ghz"] = run_ghz(ghz, address, inputs, max(levels), duration) if ghz else {"skipped": why}
        finally:
            proc.stop()
        for dtype, model_runner in (("float32", runner), ("bfloat16", pipe_bf16)):
            pipes[dtype].append(best_pipeline(model_runner, inputs, pipe_budget, threads))
        gemm_after = {d: measure_gemm_flops(seconds=gemm_s, dtype=d) for d in ("float32", "bfloat16")}
        gemm = {d: max(gemm_before[d], gemm_after[d]) for d in gemm_before}
        pipeline_rps = {d: max(p["pipeline_rps"] for p in runs) for d, runs in pipes.items()}
        best = max(result["levels"], key=lambda r: r["throughput_rps"])
        # The served model without the server, with the scorer's worker plan (see bench/scorer_bound.py).
        served = runner_bf16 if serving == "bfloat16" else runner
        # On "cpu" whatever the scorer's device: the runners here and the GEMM ceilings are the CPU's.
        workers, threads_each = plan_workers("cpu", scorer_cfg.infer_workers, scorer_cfg.torch_threads)
        in_process = measure_in_process(served, inputs, flops, workers, threads_each, cores, seconds=gemm_s + 2)
        shapes = measure_gemm_shape_fraction(runner.model.hf_model, round(BATCH_SEQUENCES * result["mean_tokens"]),
                                             serving, seconds=gemm_s)
        result.update({
            "serving_dtype": serving,
            "gemm_dtype": serving,
            "gemm_flops": round(gemm[serving]),
            "gemm_flops_fp32": round(gemm["float32"]),
            "gemm_flops_bf16": round(gemm["bfloat16"]),
            "gemm_flops_before_after": {d: [round(gemm_before[d]), round(gemm_after[d])] for d in gemm},
            "matmul_bound_rps": round(gemm[serving] / mean_flops, 2),
            "pipeline_rps_before_after": [p["pipeline_rps"] for p in pipes["float32"]],
            "pipeline_rps_by_threads_before_after": [p["pipeline_rps_by_threads"] for p in pipes["float32"]],
            "pipeline_rps": pipeline_rps["float32"],
            "pipeline_bf16_rps_before_after": [p["pipeline_rps"] for p in pipes["bfloat16"]],
            "pipeline_bf16_rps_by_threads_before_after": [p["pipeline_rps_by_threads"] for p in pipes["bfloat16"]],
            "pipeline_bf16_rps": pipeline_rps["bfloat16"],
            "throughput_rps": best["throughput_rps"],
            "p50_ms": best["p50_ms"],
            "p99_ms": best["p99_ms"],
            "best_concurrency": best["concurrency"],
            "ratio_vs_pipeline": round(best["throughput_rps"] / pipeline_rps["float32"], 2),
            "ratio_vs_pipeline_bf16": round(best["throughput_rps"] / pipeline_rps["bfloat16"], 2),
            "achieved_model_flops": round(best["throughput_rps"] * mean_flops),
            "fraction_of_matmul_bound": round(best["throughput_rps"] * mean_flops / gemm[serving], 3),
            "failed_requests": sum(r["failed_requests"] for r in result["levels"]),
        })
        # fraction_of_matmul_bound = in_process_fraction x (inference_cpu_share / in_process_cpu_share)
        #                            x serving_efficiency_per_core   (the last is solved for: the per-core rest)
        result["bound_breakdown"] = bound_breakdown(result["fraction_of_matmul_bound"], gemm[serving], in_process,
                                                    shapes, cpu_by_level[best["concurrency"]])
        log.info("bound breakdown: %s", result["bound_breakdown"])
        # Accuracy is not timed: measured after the load runs so it cannot slow them.
        result.update(measure_bf16_agreement(runner, runner_bf16, pairs=100 if quick else 500))
        log.info("bf16 vs fp32 on %d HH pairs: max |diff| %.2g, rank agreement %.3f",
                 result["bf16_vs_fp32_pairs"], result["bf16_vs_fp32_max_abs_diff"], result["bf16_vs_fp32_rank_agreement"])
        runner_bf16.close()
        if pipe_bf16 is not runner_bf16:
            pipe_bf16.close()
        if args.no_swaps:
            result.update({"failed_requests_during_swaps": None, "swaps": 0, "swap_run": "skipped (--no-swaps)"})
        else:
            result.update(run_swaps(inputs, runner, log_dir, duration_s=20.0 if quick else 45.0,
                                    every_s=4.0 if quick else 6.0, concurrency=16))
        if getattr(args, "no_policy", False):
            result.update({"failed_requests_during_policy_swaps": None, "policy_swaps": 0,
                           "policy_run": "skipped (--no-policy)"})
        else:
            from bench.scorer_policy import generation_prompts, measure_decode_batching, run_policy_swaps
            from services.data import TEST_FILE, load_openpipe_jsonl, shared_data_dir
            from services.policy_model import ensure_plain_checkpoint

            result.update(measure_decode_batching(
                str(ensure_plain_checkpoint(getattr(args, "policy_path", None))), scorer_cfg.dtype,
                generation_prompts(load_openpipe_jsonl(shared_data_dir() / TEST_FILE), 16),
                requests=2 if quick else 4, max_tokens=24 if quick else 128, singles=4 if quick else 8,
                rounds=1 if quick else 2))
            swaps = getattr(args, "policy_swaps", None) or (3 if quick else 6)
            clients = getattr(args, "policy_clients", 1)
            result.update(run_policy_swaps(
                log_dir, swaps=swaps, every_s=4.0 if quick else 6.0, steady_s=8.0 if quick else 30.0,
                max_tokens=getattr(args, "policy_max_tokens", 8), unary=clients, streams=clients,
                base_path=getattr(args, "policy_path", None), dtype=scorer_cfg.dtype))
    result["load_avg_1m_start_end"] = [load_start, round(os.getloadavg()[0], 2)]
    return result


async def _first_scores(address: str, requests: Sequence[Any]) -> list[float]:
    from prefstream.scorer.v1 import scorer_pb2_grpc
    from services.grpc_server import channel

    ch = channel(address, aio=True)
    stub = scorer_pb2_grpc.ScorerServiceStub(ch)
    out = [(await stub.Score(r, timeout=60)).scores[0].reward for r in requests]
    await ch.close()
    return out


__all__ = ["add_arguments", "drive", "measure_bf16_agreement", "model_flops_per_sequence", "run",
           "served_dtype"]
