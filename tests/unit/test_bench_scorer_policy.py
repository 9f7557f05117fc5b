"""bench/scorer_policy.py's pure parts and its load driver against a fake client (no server), plus the
report row for policy hot swaps; numbers worked out by hand, nothing timed."""

import asyncio
import itertools
from types import SimpleNamespace

import pytest
import torch

from bench.report import TARGETS, render_table
from bench.scorer_process import percentile
from bench.scorer_policy import (
    PERTURB_STEP,
    SEED_BASE,
    GenSample,
    drive_generation,
    generation_prompts,
    metric_sum,
    perturb_policy,
    publish_to_serving,
    summarize,
    swap_seconds_from_log,
)
from services.errors import Unavailable
from services.schemas import ChatMessage


def test_percentile_is_nearest_rank():
    values = [0.5, 0.1, 0.4, 0.2, 0.3]
    assert percentile(values, 50) == 0.3
    assert percentile(values, 99) == 0.5
    assert percentile(values, 0) == 0.1
    assert percentile([], 50) is None


def test_summarize_counts_failures_apart_from_latency_and_tokens():
    samples = [
        GenSample("unary", 0.0, 1.0, 8, "v1"),
        GenSample("stream", 0.0, 2.0, 6, "v1", first_token_s=0.5),
        GenSample("stream", 1.0, 3.0, 8, "v2", first_token_s=1.5),
        GenSample("unary", 2.0, 9.0, 0, "", failure="UNAVAILABLE"),
        GenSample("stream", 2.0, 9.0, 0, "", failure="mixed_versions"),
    ]
    s = summarize(samples, elapsed_s=4.0)
    assert s["requests"] == 3 and s["failed_requests"] == 2
    assert s["failures"] == {"UNAVAILABLE": 1, "mixed_versions": 1}
    assert s["completion_tokens"] == 22 and s["tokens_per_s"] == 5.5  # 22 tokens / 4 s, failures excluded
    assert s["requests_per_s"] == 0.75
    assert s["p50_ms"] == 2000.0 and s["p99_ms"] == 3000.0  # the 9 s failures do not count
    assert s["unary_p50_ms"] == 1000.0 and s["stream_p50_ms"] == 2000.0  # of (2, 3) s: index round(0.5) = 0
    assert s["stream_first_token_p50_ms"] == 500.0 and s["stream_first_token_p99_ms"] == 1500.0
    assert s["versions"] == {"v1": 2, "v2": 1}


def test_summarize_of_an_empty_window():
    s = summarize([], elapsed_s=0.0)
    assert s["requests"] == 0 and s["p50_ms"] is None and s["tokens_per_s"] is None


def test_publish_to_serving_uses_the_start_of_the_first_request_a_version_answered():
    published = {"v2": 10.0, "v3": 20.0, "v4": 30.0}
    samples = [
        GenSample("unary", 11.0, 5.0, 8, "v1"),  # v1 is not a published-in-window version
        GenSample("unary", 12.5, 4.0, 8, "v2"),
        GenSample("stream", 12.0, 6.0, 8, "v2"),  # started earlier, finished later: counts
        GenSample("unary", 21.0, 1.0, 0, "", failure="UNAVAILABLE"),
        GenSample("unary", 23.25, 1.0, 8, "v3"),
    ]
    assert publish_to_serving(published, samples) == {"v2": 2.0, "v3": 3.25, "v4": None}


LOG = """\
2026-12-03 08:47:56,852 INFO scorer.swap: swapped reward from None to base in 1.13s
2026-12-03 08:47:58,563 INFO scorer.swap: swapped bench-policy from None to v000001 in 1.71s
2026-12-03 08:48:37,307 INFO scorer.swap: swapped bench-policy from v000001 to v000002 in 3.41s
2026-12-03 08:48:38,000 INFO scorer.swap: swapped reward from base to v000002 in 0.50s
2026-12-03 08:48:40,997 INFO scorer.swap: swapped bench-policy from v000002 to v000003 in 1.95s
"""


def test_swap_seconds_from_log_keeps_swaps_of_the_named_model_only():
    assert swap_seconds_from_log(LOG, "bench-policy") == {"v000002": 3.41, "v000003": 1.95}
    assert swap_seconds_from_log(LOG, "reward") == {"v000002": 0.5}
    assert swap_seconds_from_log("", "bench-policy") == {}


METRICS = """\
# HELP prefstream_scorer_swaps_total checkpoint swaps completed
# TYPE prefstream_scorer_swaps_total counter
prefstream_scorer_swaps_total{model="bench-policy"} 3.0
prefstream_scorer_swaps_total{model="reward"} 1.0
# HELP prefstream_scorer_swap_failures_total checkpoints refused
# TYPE prefstream_scorer_swap_failures_total counter
prefstream_scorer_swap_failures_total{model="bench-policy",reason="corrupt"} 1.0
prefstream_scorer_swap_failures_total{model="bench-policy",reason="load_failed"} 2.0
"""


def test_metric_sum_filters_by_labels_and_adds_the_rest():
    assert metric_sum(METRICS, "prefstream_scorer_swaps_total", {"model": "bench-policy"}) == 3.0
    assert metric_sum(METRICS, "prefstream_scorer_swaps_total") == 4.0
    assert metric_sum(METRICS, "prefstream_scorer_swap_failures_total", {"model": "bench-policy"}) == 3.0
    assert metric_sum(METRICS, "prefstream_scorer_swaps_total", {"model": "other"}) == 0.0


def test_perturb_policy_scales_the_final_norm_only():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert perturb_policy(model) == "model.norm.weight"
    assert perturb_policy(model) == "model.norm.weight"
    after = dict(model.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed == ["model.norm.weight"]
    assert torch.allclose(after["model.norm.weight"], before["model.norm.weight"] * (1 + PERTURB_STEP) ** 2)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(model(ids).logits).all()


def test_perturb_policy_names_the_field_when_there_is_no_norm():
    from services.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as e:
        perturb_policy(torch.nn.Linear(2, 2))
    assert e.value.field == "policy_path"


def test_generation_prompts_keeps_short_prompts_up_to_the_limit():
    def rec(*texts):
        return SimpleNamespace(prompt=[ChatMessage("user", t) for t in texts])

    records = [rec("a" * 10), rec("b" * 700), rec("c" * 300, "d" * 300), rec("e" * 5), rec("f")]
    prompts = generation_prompts(records, limit=3, max_chars=600)
    assert [tuple(m.content[0] for m in p) for p in prompts] == [("a",), ("c", "d"), ("e",)]


# ---------------------------------------------------------------------------------------------- load driver


class FakeClient:
    """Answers like ScorerClient: a unary result, or stream chunks; scripted versions and failures."""

    def __init__(self, stop: asyncio.Event, requests: int) -> None:
        self.stop, self.left = stop, requests
        self.calls: list[tuple[str, str, int, int]] = []

    def _tick(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.stop.set()

    async def generate(self, prompt, *, model, sampling):
        self.calls.append(("unary", prompt[0].content, sampling.seed, sampling.max_tokens))
        self._tick()
        await asyncio.sleep(0)
        if sampling.seed % 5 == 0:
            raise Unavailable("policy still loading")
        return SimpleNamespace(usage=SimpleNamespace(completion_tokens=sampling.max_tokens),
                               model=SimpleNamespace(version="v1"))

    async def generate_stream(self, prompt, *, model, sampling):
        self.calls.append(("stream", prompt[0].content, sampling.seed, sampling.max_tokens))
        self._tick()
        mixed = sampling.seed % 3 == 0
        for version, delta in (("v1", "Hel"), ("v2" if mixed else "v1", "lo")):
            await asyncio.sleep(0)
            yield SimpleNamespace(model=SimpleNamespace(version=version), delta=delta, usage=None)
        yield SimpleNamespace(model=SimpleNamespace(version="v1"), delta="",
                              usage=SimpleNamespace(completion_tokens=2))


def test_drive_generation_sends_fixed_seeds_and_counts_failures_and_mixed_streams():
    async def main():
        stop = asyncio.Event()
        client = FakeClient(stop, requests=12)
        prompts = [(ChatMessage("user", f"p{i}"),) for i in range(4)]
        seen: list[GenSample] = []
        samples = await drive_generation(client, prompts, unary=1, streams=1, max_tokens=8, stop=stop,
                                         counter=itertools.count(), samples=seen)
        return client, samples, seen

    client, samples, seen = asyncio.run(main())
    assert samples is seen and len(samples) == len(client.calls) == 12
    # Request i: prompt i mod 4 and seed SEED_BASE + i, whichever worker took it.
    assert sorted(seed for _, _, seed, _ in client.calls) == [SEED_BASE + i for i in range(12)]
    assert all(text == f"p{(seed - SEED_BASE) % 4}" and mt == 8 for _, text, seed, mt in client.calls)
    mode_of = {seed: mode for mode, _, seed, _ in client.calls}
    for s in samples:
        assert s.mode == mode_of[s.seed]
        if s.mode == "unary" and s.seed % 5 == 0:
            assert s.failure == "UNAVAILABLE" and s.tokens == 0 and s.version == ""
        elif s.mode == "stream" and s.seed % 3 == 0:
            assert s.failure == "mixed_versions" and s.tokens == 0
        elif s.mode == "stream":
            assert (s.failure, s.tokens, s.version) == (None, 2, "v1") and s.first_token_s is not None
        else:
            assert (s.failure, s.tokens, s.version, s.first_token_s) == (None, 8, "v1", None)
    assert {s.mode for s in samples} == {"unary", "stream"}
    assert any(s.failure for s in samples) and any(s.failure is None for s in samples)


# ---------------------------------------------------------------------------------------------- report row


ROW = "zero failed generation requests during policy hot swaps"


def _row(result):
    table = render_table({"scorer": {"mode": "quick", "machine": {"cpu_model": "X"}, **result}})
    return next(line for line in table.splitlines() if ROW in line)


def test_report_row_for_policy_hot_swaps():
    assert any(t.description == ROW and t.benchmark == "scorer" for t in TARGETS)
    met = _row({"failed_requests_during_policy_swaps": 0, "policy_swaps": 6,
                "policy_p99_ms_steady": 2100.0, "policy_p99_ms_during_swaps": 3400.0})
    assert met.rstrip(" |").endswith("yes")
    assert "0 over 6 swaps (generation p99 2.1 s steady, 3.4 s during swaps)" in met
    assert "**no**" in _row({"failed_requests_during_policy_swaps": 2, "policy_swaps": 6})
    # zero failures over zero swaps proves nothing
    assert "**no**" in _row({"failed_requests_during_policy_swaps": 0, "policy_swaps": 0})
    missing = _row({})
    assert missing.rstrip(" |").endswith("n/a") and "not in this result" in missing
