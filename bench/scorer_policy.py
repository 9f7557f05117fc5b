"""The policy phase of ``prefstream bench scorer``: generation under load, then policy hot swaps under it.

Why it exists: the scorer now serves policies (Generate / GenerateStream) and swaps in every policy
version the trainer publishes.  A swap loads a whole causal LM beside the live one on the same cores
that decode, so the questions are whether any generation request fails while versions change, and
what the swaps cost the requests that keep arriving.  This phase answers both on one real scorer
process following a real Redis registry:

* decode batching, in this process before the scorer starts (:func:`measure_decode_batching`): the
  same concurrent requests through the policy's ``BatchDecoder`` one at a time (``max_rows`` 1, what
  the scorer did before it batched) and together, alternating which goes first, on one thread as the
  scorer decodes on 2 cores.  Keys ``decode_tokens_per_s_one_at_a_time``, ``decode_tokens_per_s_batched``
  and ``decode_batching_speedup`` (4 concurrent best-of-6 requests at 128 tokens, the criteria loop's
  load; target >= 1.5), and ``decode_batching_speedup_n1`` (8 single completions, the loop's evaluation);
* a steady window: closed-loop clients, as many unary ``Generate`` as ``GenerateStream`` (default one
  each, so latencies stay those of a request decoding alone), on short HH test
  prompts with a fixed seed per request and a short ``max_tokens`` (so it fits 2 cores), no publishes;
* a swap window: the same load while a policy version is published every few seconds, until every
  version is answered.  The versions are the base policy (default the embedded SmolLM2 as a plain HF
  folder, in the scorer's serving dtype) with its final norm scaled a little more each time
  (:func:`perturb_policy`), written through ``CheckpointStore`` and published with kind ``policy``,
  as the trainer publishes a merged DPO checkpoint.  What is measured is the swap, not the training.

Keys (``policy_*`` beside the reward ones in ``bench/results/scorer.json``):
``failed_requests_during_policy_swaps`` (target 0: an RPC error, or a stream whose chunks name more
than one version), ``policy_swaps`` (swaps the scorer completed in the window, from its
``prefstream_scorer_swaps_total``), ``policy_p50_ms`` / ``policy_p99_ms`` / ``policy_tokens_per_s``
``_steady`` and ``_during_swaps``, and per swap: ``policy_swap_seconds`` (the scorer's own verify +
load + warm-up + swap time, from its log; it exposes no finer phases), ``policy_publish_to_serving_s``
(publish to the first request the version answered, as a client sees the swap) and
``policy_checkpoint_write_s`` (writing the version on the publishing side, which shares the cores).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from bench.scorer_process import fetch_metrics, free_port, percentile, served_dtype, start_redis, start_scorer

log = logging.getLogger(__name__)

#: Registry name the bench publishes its policy versions under.
POLICY_NAME = "bench-policy"
#: Request i samples with seed SEED_BASE + i: the same request sequence in every run and window.
SEED_BASE = 1000
#: Sampling temperature of the load (sampled, not greedy, so seeds matter as in real traffic).
TEMPERATURE = 0.7
#: Relative step by which each new version scales the final norm (visible in bf16's 8-bit mantissa).
PERTURB_STEP = 0.01


# ---------------------------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class GenSample:
    """One generation request as the client saw it (times on ``time.monotonic``)."""

    mode: str  # "unary" or "stream"
    started_s: float
    latency_s: float
    tokens: int  # completion tokens the scorer reports
    version: str  # the policy version that answered ("" when it failed)
    first_token_s: float | None = None  # streams: until the first text delta
    failure: str | None = None  # gRPC status name, or "mixed_versions" for a stream naming two versions
    seed: int | None = None  # the request's sampling seed (SEED_BASE + its index)

    @property
    def finished_s(self) -> float:
        return self.started_s + self.latency_s


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000.0 * x, 1)


def summarize(samples: Sequence[GenSample], elapsed_s: float) -> dict[str, Any]:
    """Requests, failures, p50/p99 latency (ms) and completion tokens/s of one window.

    Latency is the whole request (a stream until its last chunk); failed requests count in
    ``failed_requests`` and ``failures`` only, not in latency or tokens.
    """
    ok = [s for s in samples if s.failure is None]
    failures: dict[str, int] = {}
    for s in samples:
        if s.failure is not None:
            failures[s.failure] = failures.get(s.failure, 0) + 1
    lat = [s.latency_s for s in ok]
    ttft = [s.first_token_s for s in ok if s.first_token_s is not None]
    versions: dict[str, int] = {}
    for s in ok:
        versions[s.version] = versions.get(s.version, 0) + 1
    tokens = sum(s.tokens for s in ok)
    return {
        "requests": len(ok),
        "failed_requests": len(samples) - len(ok),
        "failures": failures,
        "elapsed_s": round(elapsed_s, 2),
        "requests_per_s": round(len(ok) / elapsed_s, 3) if elapsed_s > 0 else None,
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / elapsed_s, 2) if elapsed_s > 0 else None,
        "p50_ms": _ms(percentile(lat, 50)),
        "p99_ms": _ms(percentile(lat, 99)),
        "unary_p50_ms": _ms(percentile([s.latency_s for s in ok if s.mode == "unary"], 50)),
        "stream_p50_ms": _ms(percentile([s.latency_s for s in ok if s.mode == "stream"], 50)),
        "stream_first_token_p50_ms": _ms(percentile(ttft, 50)),
        "stream_first_token_p99_ms": _ms(percentile(ttft, 99)),
        "versions": dict(sorted(versions.items())),
    }


def publish_to_serving(published: Mapping[str, float], samples: Iterable[GenSample]) -> dict[str, float | None]:
    """Seconds from each version's publish to the start of the first request it answered (None: it
    answered none).

    A request takes the live version when it arrives, so the version was serving by then: this is the
    swap as clients see it (poll interval + verify + load + warm-up), plus at most the gap until the
    next request arrived.  Finish times would add the queueing of that request instead.
    """
    first: dict[str, float] = {}
    for s in samples:
        if s.failure is None and s.version in published:
            first[s.version] = min(first.get(s.version, s.started_s), s.started_s)
    return {v: (round(first[v] - t, 3) if v in first else None) for v, t in published.items()}


_SWAPPED = re.compile(r"swapped (?P<name>\S+) from (?P<old>\S+) to (?P<new>\S+) in (?P<s>[0-9.]+)s")


def swap_seconds_from_log(text: str, name: str) -> dict[str, float]:
    """{new version: seconds} of every swap of ``name`` in a scorer log (first loads, ``from None``, left out).

    The scorer logs ``swapped NAME from OLD to NEW in 1.23s`` per swap (verify + load + warm-up + swap).
    """
    out = {}
    for m in _SWAPPED.finditer(text):
        if m["name"] == name and m["old"] != "None":
            out[m["new"]] = float(m["s"])
    return out


def metric_sum(text: str, sample: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of the Prometheus exposition ``text``'s samples named ``sample`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    want = dict(labels or {})
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in want.items()):
                total += s.value
    return total


def perturb_policy(hf_model: Any) -> str:
    """Scale the model's last ``*norm.weight`` by ``1 + PERTURB_STEP`` in place, so the next version
    differs from the one before; the parameter's name is returned.

    The final norm feeds the output head only, so each version stays a working model: its logits are
    those of the last one scaled by 1%, i.e. slightly sharper sampling.
    """
    import torch

    names = [n for n, _ in hf_model.named_parameters() if n.endswith("norm.weight")]
    if not names:
        from services.errors import InvalidArgument

        raise InvalidArgument("policy_path", "the policy has no parameter named *norm.weight to perturb; "
                              "give a Llama-style causal LM folder")
    param = dict(hf_model.named_parameters())[names[-1]]
    with torch.no_grad():
        param.mul_(1.0 + PERTURB_STEP)
    return names[-1]


def generation_prompts(records: Iterable[Any], limit: int, max_chars: int = 300) -> list[tuple[Any, ...]]:
    """The first ``limit`` record prompts (message tuples) of at most ``max_chars`` characters in all,
    so prefill stays short and the windows compare like with like."""
    out = []
    for rec in records:
        prompt = tuple(rec.prompt)
        if sum(len(m.content) for m in prompt) <= max_chars:
            out.append(prompt)
            if len(out) >= limit:
                break
    return out


# ---------------------------------------------------------------------------------------------- load


def measure_decode_batching(base_path: str, dtype: str, prompts: Sequence[Sequence[Any]], *, requests: int = 4,
                            n: int = 6, max_tokens: int = 128, singles: int = 8, rounds: int = 2) -> dict[str, Any]:
    """Tokens/s of the same concurrent requests decoded one at a time and as one batch (module docstring).

    Each round runs both arms on the same seeded requests, in alternating order; the speedup is the
    median of the rounds' ratios, so load drifting during the run cancels out of it."""
    import statistics

    import torch

    from scorer.decoding import BatchDecoder, DecodeParams
    from scorer.precision import resolve_dtype
    from services.policy_model import PolicyModel

    model = PolicyModel.from_pretrained(base_path, device="cpu", dtype=resolve_dtype(dtype, torch.device("cpu")))
    ids = [model.prompt_ids(list(p)) for p in prompts]

    def arm(jobs: Sequence[tuple[list[int], DecodeParams]], rows: int) -> tuple[float, int]:
        decoder = BatchDecoder(model.hf_model, model.tokenizer, max_rows=rows)
        t = time.perf_counter()
        futures = [decoder.submit(i, p) for i, p in jobs]
        decoder.run()
        tokens = sum(f.result().completion_tokens for f in futures)
        return time.perf_counter() - t, tokens

    def compare(width: int, count: int) -> dict[str, Any]:
        jobs = [(ids[i % len(ids)], DecodeParams(n=width, temperature=1.0, max_tokens=max_tokens, seed=SEED_BASE + i))
                for i in range(count)]
        arm(jobs[:1], 1)  # warm-up
        alone, together, ratios = [], [], []
        for r in range(rounds):
            order = (1, 64) if r % 2 == 0 else (64, 1)
            got = {rows: arm(jobs, rows) for rows in order}
            alone.append(got[1][1] / got[1][0])
            together.append(got[64][1] / got[64][0])
            ratios.append(together[-1] / alone[-1])
        return {"one_at_a_time": round(statistics.median(alone), 1), "batched": round(statistics.median(together), 1),
                "speedup": round(statistics.median(ratios), 3)}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best_of_n = compare(n, requests)
        single = compare(1, singles)
    finally:
        torch.set_num_threads(threads)
    log.info("decode batching: %d x best-of-%d %.0f -> %.0f tokens/s (%.2fx); %d x n=1 %.2fx", requests, n,
             best_of_n["one_at_a_time"], best_of_n["batched"], best_of_n["speedup"], singles, single["speedup"])
    return {
        "decode_tokens_per_s_one_at_a_time": best_of_n["one_at_a_time"],
        "decode_tokens_per_s_batched": best_of_n["batched"],
        "decode_batching_speedup": best_of_n["speedup"],
        "decode_batching_speedup_n1": single["speedup"],
        "decode_batching": {"requests": requests, "n": n, "max_tokens": max_tokens, "singles": singles,
                            "rounds": rounds, "torch_threads": 1, "best_of_n": best_of_n, "single": single},
    }


async def _one(client: Any, mode: str, prompt: Sequence[Any], seed: int, max_tokens: int) -> GenSample:
    from scorer.domain import SamplingParams
    from services.errors import PrefstreamError

    sampling = SamplingParams(temperature=TEMPERATURE, max_tokens=max_tokens, seed=seed)
    t0 = time.monotonic()
    try:
        if mode == "unary":
            res = await client.generate(prompt, model=POLICY_NAME, sampling=sampling)
            return GenSample(mode, t0, time.monotonic() - t0, res.usage.completion_tokens, res.model.version,
                             seed=seed)
        first, versions, tokens = None, set(), 0
        async for chunk in client.generate_stream(prompt, model=POLICY_NAME, sampling=sampling):
            versions.add(chunk.model.version)
            if first is None and chunk.delta:
                first = time.monotonic() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        elapsed = time.monotonic() - t0
        if len(versions) != 1:  # a stream keeps its slot through a swap: every chunk names one version
            return GenSample(mode, t0, elapsed, 0, "", first, failure="mixed_versions", seed=seed)
        return GenSample(mode, t0, elapsed, tokens, versions.pop(), first, seed=seed)
    except PrefstreamError as e:
        return GenSample(mode, t0, time.monotonic() - t0, 0, "", failure=e.grpc_code.name, seed=seed)


async def drive_generation(client: Any, prompts: Sequence[Sequence[Any]], unary: int, streams: int,
                           max_tokens: int, stop: asyncio.Event, counter: Iterable[int],
                           samples: list[GenSample] | None = None) -> list[GenSample]:
    """``unary`` + ``streams`` closed-loop clients until ``stop``; request i uses prompt i and seed
    SEED_BASE + i (``counter`` yields i and carries on across windows).  Samples are appended to
    ``samples`` as they finish (so a caller can watch progress) and returned."""
    samples = [] if samples is None else samples
    it = iter(counter)

    async def worker(mode: str) -> None:
        while not stop.is_set():
            i = next(it)
            samples.append(await _one(client, mode, prompts[i % len(prompts)], SEED_BASE + i, max_tokens))

    await asyncio.gather(*(worker("unary") for _ in range(unary)), *(worker("stream") for _ in range(streams)))
    return samples


# ---------------------------------------------------------------------------------------------- publishing


class PolicyPublisher:
    """Writes perturbed copies of one policy through CheckpointStore and publishes them with kind policy."""

    def __init__(self, base_path: str, dtype: str, store: Any, registry: Any) -> None:
        from services.policy_model import PolicyModel

        self.policy = PolicyModel.from_pretrained(base_path, dtype=dtype)
        self.store, self.registry = store, registry
        self.published: dict[str, float] = {}  # version -> time.monotonic() of the registry publish
        self.write_s: dict[str, float] = {}

    def publish(self, i: int) -> str:
        from services.kinds import ModelKind
        from services.registry import ModelVersion

        version = f"v{i:06d}"
        t0 = time.monotonic()
        perturbed = perturb_policy(self.policy.hf_model)
        ref = self.store.write(POLICY_NAME, version, lambda d: self.policy.save(d),
                               {"bench": True, "i": i, "perturbed": perturbed})
        self.write_s[version] = round(time.monotonic() - t0, 3)
        self.registry.publish(ModelVersion(name=POLICY_NAME, version=version, uri=ref.uri, kind=ModelKind.POLICY))
        self.published[version] = time.monotonic()
        return version


# ---------------------------------------------------------------------------------------------- the phase


def run_policy_swaps(log_dir: Path, *, swaps: int, every_s: float, steady_s: float, max_tokens: int,
                     unary: int = 1, streams: int = 1, base_path: str | None = None,
                     dtype: str = "auto", prompts_limit: int = 64) -> dict[str, Any]:
    """The whole phase (module docstring): a registry, a scorer serving the policy, two windows."""
    import torch

    from scorer.client import ScorerClient
    from scorer.precision import resolve_dtype
    from services.checkpoints import CheckpointStore
    from services.data import TEST_FILE, load_openpipe_jsonl, shared_data_dir
    from services.policy_model import ensure_plain_checkpoint
    from services.registry import ModelRegistry

    base = str(ensure_plain_checkpoint(base_path))  # the GGUF converted once into a plain HF folder (cached)
    serving_dtype = resolve_dtype(dtype, torch.device("cpu"))  # versions written as the scorer will serve them
    prompts = generation_prompts(load_openpipe_jsonl(shared_data_dir() / TEST_FILE), prompts_limit)
    redis_proc, redis, url = start_redis()
    scorer = None
    try:
        publisher = PolicyPublisher(base, serving_dtype, CheckpointStore(str(log_dir / "policy-checkpoints")),
                                    ModelRegistry(redis))
        publisher.publish(1)  # served from start-up, so the first swap is between two published versions
        metrics_port = free_port()
        scorer, address = start_scorer(log_dir, "scorer-policy", {
            "PREFSTREAM_SCORER_REDIS_URL": url, "PREFSTREAM_SCORER_POLL_INTERVAL_S": "0.2",
            "PREFSTREAM_SCORER_DISCOVER_MODELS": "false", "PREFSTREAM_SCORER_POLICY_MODELS": POLICY_NAME,
            "PREFSTREAM_SCORER_METRICS_PORT": str(metrics_port), "PREFSTREAM_SCORER_DTYPE": dtype,
        })
        served = served_dtype(metrics_port, POLICY_NAME)
        swaps_metric = {"model": POLICY_NAME}

        async def main() -> dict[str, Any]:
            counter = itertools.count()
            async with ScorerClient(address, timeout_s=120.0) as client:
                await client.wait_ready()
                warm = asyncio.Event()
                asyncio.get_running_loop().call_later(2.0, warm.set)
                await drive_generation(client, prompts, unary, streams, max_tokens, warm, counter)  # not reported

                stop = asyncio.Event()
                t0 = time.monotonic()
                asyncio.get_running_loop().call_later(steady_s, stop.set)
                steady = await drive_generation(client, prompts, unary, streams, max_tokens, stop, counter)
                steady_elapsed = time.monotonic() - t0

                before = fetch_metrics(metrics_port)
                stop, during = asyncio.Event(), []
                t0 = time.monotonic()
                load = asyncio.create_task(
                    drive_generation(client, prompts, unary, streams, max_tokens, stop, counter, during))
                last = await asyncio.to_thread(_publish_every, publisher, swaps, every_s)
                # Until the last version answers (or 120 s), then a short tail on it.
                deadline = time.monotonic() + 120.0
                while time.monotonic() < deadline and not any(s.version == last for s in during):
                    await asyncio.sleep(0.2)
                await asyncio.sleep(2.0)
                stop.set()
                await load
                during_elapsed = time.monotonic() - t0
                after = fetch_metrics(metrics_port)
            return {"steady": (steady, steady_elapsed), "during": (during, during_elapsed),
                    "swaps_total": metric_sum(after, "prefstream_scorer_swaps_total", swaps_metric)
                    - metric_sum(before, "prefstream_scorer_swaps_total", swaps_metric),
                    "refusals": metric_sum(after, "prefstream_scorer_swap_failures_total", swaps_metric)
                    - metric_sum(before, "prefstream_scorer_swap_failures_total", swaps_metric)}

        out = asyncio.run(main())
    finally:
        if scorer is not None:
            scorer.stop()
        redis_proc.terminate()
        redis_proc.wait(10)

    steady = summarize(*out["steady"])
    during = summarize(*out["during"])
    published = {v: t for v, t in publisher.published.items() if v != "v000001"}
    swap_s = swap_seconds_from_log(scorer.log_path.read_text(), POLICY_NAME)
    to_serving = publish_to_serving(published, out["during"][0])
    return {
        "failed_requests_during_policy_swaps": during["failed_requests"],
        "policy_swaps": int(out["swaps_total"]),
        "policy_published_during_load": len(published),
        "policy_swap_refusals": int(out["refusals"]),
        "policy_p50_ms_steady": steady["p50_ms"],
        "policy_p99_ms_steady": steady["p99_ms"],
        "policy_p50_ms_during_swaps": during["p50_ms"],
        "policy_p99_ms_during_swaps": during["p99_ms"],
        "policy_tokens_per_s_steady": steady["tokens_per_s"],
        "policy_tokens_per_s_during_swaps": during["tokens_per_s"],
        "policy_swap_seconds": swap_s,
        "policy_swap_seconds_p50": percentile(list(swap_s.values()), 50),
        "policy_swap_seconds_max": max(swap_s.values(), default=None),
        "policy_swap_phases": "not exposed: the scorer reports verify + load + warm-up + swap as one duration",
        "policy_publish_to_serving_s": to_serving,
        "policy_checkpoint_write_s": {v: publisher.write_s[v] for v in published},
        "policy_load": {"steady": steady, "during_swaps": during, "unary_clients": unary, "stream_clients": streams,
                        "max_tokens": max_tokens, "temperature": TEMPERATURE, "prompts": len(prompts),
                        "every_s": every_s},
        "policy_base": base,
        "policy_serving_dtype": served,
    }


def _publish_every(publisher: PolicyPublisher, swaps: int, every_s: float) -> str:
    """Publish versions 2 .. swaps + 1, one every ``every_s`` seconds; the last version."""
    version = ""
    for i in range(2, swaps + 2):
        time.sleep(every_s)
        version = publisher.publish(i)
        log.info("published policy %s (%d of %d)", version, i - 1, swaps)
    return version


__all__ = ["GenSample", "POLICY_NAME", "PolicyPublisher", "drive_generation", "generation_prompts", "metric_sum",
           "perturb_policy", "publish_to_serving", "run_policy_swaps", "summarize",
           "swap_seconds_from_log"]
