"""Generation: the decode loop (seeds, stop sequences, max_tokens, EOS, token counts, streamed deltas),
request validation naming the field, and the engine's unary and streamed generation with a fake policy."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from prefstream.scorer.v1 import scorer_pb2
from scorer.config import load_scorer_config
from scorer.decoding import BatchDecoder, Completion, DecodeParams, Decoded, decode, first_stop, held_back, nucleus_filter
from scorer.domain import RequestLimits, SamplingParams
from scorer.engine import ServingEngine
from services.kinds import ModelKind
from scorer.generation import GenerateBatchQuery, GenerateChunk, GenerateQuery, GenerateResult
from scorer.metrics import ScorerMetrics
from services.errors import InvalidArgument, NotFound
from services.schemas import ChatMessage

PROMPT = (ChatMessage("user", "hello w1 w2"),)


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object, list[int]]:
    """A random 2-layer Llama over a 43-word vocabulary, and a prompt's ids."""
    words = [f"w{i}" for i in range(40)] + ["User:", "Assistant:", "hello"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = tokenizer("hello w1 w2 w3")["input_ids"]
    return model, tokenizer, ids


# ------------------------------------------------------------------------------------ pure helpers


def test_nucleus_keeps_the_smallest_set_reaching_top_p() -> None:
    # probabilities 0.5, 0.3, 0.2 (logits are their logs): top_p 0.7 needs the first two (0.5 < 0.7 <= 0.8).
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    kept = torch.isfinite(nucleus_filter(logits, 0.7))
    assert kept.tolist() == [[False, True, True]]
    assert torch.isfinite(nucleus_filter(logits, 0.5)).tolist() == [[False, True, False]]
    assert torch.isfinite(nucleus_filter(logits, 0.1)).tolist() == [[False, True, False]]  # the best always stays
    assert torch.equal(nucleus_filter(logits, 1.0), logits)


def test_stop_helpers_find_and_hold_back_partial_stops() -> None:
    assert first_stop("abc END def STOP", ["STOP", "END"]) == 4
    assert first_stop("abc", ["x"]) is None
    assert held_back("hello EN", ["END"]) == 2  # "EN" may become "END": not sent yet
    assert held_back("hello E", ["END", "Eve"]) == 1
    assert held_back("hello", ["END"]) == 0


# ------------------------------------------------------------------------------------ decode loop


def test_same_seed_same_text_and_counts(tiny) -> None:
    model, tokenizer, ids = tiny
    p = DecodeParams(n=3, temperature=1.0, max_tokens=8, seed=11)
    a, b = decode(model, tokenizer, ids, p), decode(model, tokenizer, ids, p)
    assert a.texts == b.texts
    assert len(set(a.texts)) > 1  # n rows are independent samples
    torch.manual_seed(123)  # the global RNG plays no part
    c = decode(model, tokenizer, ids, p)
    assert c.texts == a.texts
    assert decode(model, tokenizer, ids, DecodeParams(n=3, temperature=1.0, max_tokens=8, seed=12)).texts != a.texts
    assert a.prompt_tokens == len(ids)
    assert a.completion_tokens == sum(len(r.token_ids) for r in a.completions)


def test_max_tokens_ends_with_length_and_counts_every_token(tiny) -> None:
    model, tokenizer, ids = tiny
    model.generation_config.eos_token_id = 2
    out = decode(model, tokenizer, ids, DecodeParams(n=2, temperature=0.0, max_tokens=5))
    assert [c.index for c in out.completions] == [0, 1]
    assert out.texts[0] == out.texts[1]  # greedy: one answer, shown n times
    for c in out.completions:
        if 2 not in c.token_ids:  # random weights could pick EOS; then it is a stop
            assert c.finish_reason == "length" and c.completion_tokens == 5
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_eos_ends_with_stop_counted_not_shown(tiny) -> None:
    model, tokenizer, ids = tiny
    first = decode(model, tokenizer, ids, DecodeParams(temperature=0.0, max_tokens=1)).completions[0].token_ids[0]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [first]  # the greedy first token is now an end of sequence
    try:
        c = decode(model, tokenizer, ids, DecodeParams(temperature=0.0, max_tokens=6)).completions[0]
    finally:
        model.generation_config.eos_token_id = saved
    assert (c.finish_reason, c.completion_tokens, c.text) == ("stop", 1, "")


def test_stop_sequence_cuts_the_text_and_is_never_streamed(tiny) -> None:
    model, tokenizer, ids = tiny
    full = decode(model, tokenizer, ids, DecodeParams(temperature=0.0, max_tokens=10)).completions[0]
    words = full.text.split()
    assert len(words) >= 4
    stop = " ".join(words[2:4])  # two tokens: the first may arrive alone and must be held back
    deltas: list[tuple[int, str]] = []
    c = decode(model, tokenizer, ids, DecodeParams(temperature=0.0, max_tokens=10, stop=(stop, "never")),
               on_delta=lambda i, d: deltas.append((i, d))).completions[0]
    assert c.finish_reason == "stop"
    assert c.text == full.text[:full.text.find(stop)]
    assert "".join(d for _, d in deltas) == c.text
    assert c.completion_tokens == 4  # up to and including the token that completed the stop sequence


def test_streamed_deltas_rebuild_every_choice(tiny) -> None:
    model, tokenizer, ids = tiny
    deltas: dict[int, list[str]] = {0: [], 1: []}
    out = decode(model, tokenizer, ids, DecodeParams(n=2, temperature=1.0, max_tokens=6, seed=3),
                 on_delta=lambda i, d: deltas[i].append(d))
    assert ["".join(deltas[i]) for i in (0, 1)] == out.texts
    assert all(len(deltas[i]) > 1 for i in (0, 1))  # text arrived step by step


def test_cancel_stops_decoding_early(tiny) -> None:
    model, tokenizer, ids = tiny
    steps = []
    out = decode(model, tokenizer, ids, DecodeParams(temperature=1.0, max_tokens=50, seed=1),
                 on_delta=lambda i, d: steps.append(d), cancelled=lambda: len(steps) >= 2)
    assert out.completions[0].completion_tokens < 50


# ------------------------------------------------------------------------------------ batched decoding


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text)["input_ids"]


def test_concurrent_requests_decode_as_one_batch_and_each_gets_what_it_gets_alone(tiny) -> None:
    model, tokenizer, _ = tiny
    jobs = [(_ids(tokenizer, "hello w1 w2 w3"), DecodeParams(n=3, temperature=1.0, max_tokens=9, seed=1)),
            (_ids(tokenizer, "hello w5 w6 w7 w8 w9 w10 w11"), DecodeParams(n=2, temperature=0.8, max_tokens=6, seed=2)),
            (_ids(tokenizer, "w4"), DecodeParams(n=2, temperature=0.0, max_tokens=7))]
    alone = [decode(model, tokenizer, ids, p) for ids, p in jobs]
    decoder = BatchDecoder(model, tokenizer, max_rows=16)
    futures = [decoder.submit(ids, p) for ids, p in jobs]
    decoder.run()
    together = [f.result() for f in futures]
    assert decoder.peak_rows == 3 + 2 + 1  # one step decoded every row (greedy: one row shown twice)
    for a, b in zip(alone, together):  # different prompt lengths: left-padded, positions kept
        assert b.texts == a.texts
        assert [c.token_ids for c in b.completions] == [c.token_ids for c in a.completions]
        assert [c.finish_reason for c in b.completions] == [c.finish_reason for c in a.completions]
        assert b.prompt_tokens == a.prompt_tokens


def test_a_request_joins_a_running_batch_between_steps(tiny) -> None:
    model, tokenizer, ids = tiny
    first = DecodeParams(n=2, temperature=1.0, max_tokens=12, seed=5)
    late = (_ids(tokenizer, "hello w9 w8 w7 w6 w5"), DecodeParams(n=2, temperature=1.0, max_tokens=8, seed=6))
    decoder = BatchDecoder(model, tokenizer, max_rows=16)
    a = decoder.submit(ids, first)
    for _ in range(4):  # the first request is 4 tokens in when the second arrives
        decoder._tick()
    b = decoder.submit(*late)
    decoder.run()
    assert decoder.peak_rows == 4
    assert a.result().texts == decode(model, tokenizer, ids, first).texts
    assert b.result().texts == decode(model, tokenizer, *late).texts


def test_a_short_request_resolves_while_a_long_one_still_decodes(tiny) -> None:
    model, tokenizer, ids = tiny
    decoder = BatchDecoder(model, tokenizer, max_rows=16)
    long = decoder.submit(ids, DecodeParams(n=2, temperature=1.0, max_tokens=40, seed=1))
    short = decoder.submit(ids, DecodeParams(n=2, temperature=1.0, max_tokens=3, seed=2))
    steps = 0
    while not short.done():
        decoder._tick()
        steps += 1
    assert steps <= 3 and not long.done()  # rows leave the batch when they end
    assert all(c.completion_tokens <= 3 for c in short.result().completions)
    decoder.run()
    assert long.result().completions[0].completion_tokens > 3


def test_cancelling_one_request_leaves_the_others_decoding(tiny) -> None:
    model, tokenizer, ids = tiny
    decoder = BatchDecoder(model, tokenizer, max_rows=16)
    stop = threading.Event()
    p = DecodeParams(n=1, temperature=1.0, max_tokens=30, seed=3)
    gone = decoder.submit(ids, p, on_delta=lambda i, d: stop.set(), cancelled=stop.is_set)
    kept = decoder.submit(ids, p)
    decoder.run()
    assert gone.result().completions[0].completion_tokens < kept.result().completions[0].completion_tokens
    assert kept.result().texts == decode(model, tokenizer, ids, p).texts


def test_max_rows_caps_the_batch_and_a_wider_request_runs_alone(tiny) -> None:
    model, tokenizer, ids = tiny
    decoder = BatchDecoder(model, tokenizer, max_rows=4)
    p = DecodeParams(n=3, temperature=1.0, max_tokens=5, seed=1)
    wide = DecodeParams(n=6, temperature=1.0, max_tokens=5, seed=1)
    futures = [decoder.submit(ids, p), decoder.submit(ids, p), decoder.submit(ids, wide)]
    decoder.run()
    assert decoder.peak_rows == 6  # 3 + 3 > 4: one request at a time; the 6-row one alone
    assert [len(f.result().completions) for f in futures] == [3, 3, 6]
    with pytest.raises(ValueError, match="max_rows"):
        BatchDecoder(model, tokenizer, max_rows=0)


def test_the_decoder_thread_serves_concurrent_callers_and_close_fails_what_is_left(tiny) -> None:
    model, tokenizer, ids = tiny
    decoder = BatchDecoder(model, tokenizer, max_rows=16, name="decode_test").start()
    p = DecodeParams(n=2, temperature=1.0, max_tokens=6, seed=9)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: decoder.submit(ids, p).result(timeout=60), range(4)))
    assert all(r.texts == results[0].texts for r in results)  # same seed, same prompt: same rows
    decoder.close()
    with pytest.raises(RuntimeError, match="closed"):
        decoder.submit(ids, p)


def test_a_request_still_decoding_when_its_policy_is_freed_fails_unavailable_and_retryable(tiny) -> None:
    from services.errors import Unavailable

    model, tokenizer, ids = tiny
    decoder = BatchDecoder(model, tokenizer, max_rows=16, name="decode_test").start()
    running = decoder.submit(ids, DecodeParams(n=2, temperature=1.0, max_tokens=400, seed=9))
    decoder.close()  # what the scorer does to a replaced version still busy after drain_timeout_s
    with pytest.raises(Unavailable, match="freed before it finished.*retry"):
        running.result(timeout=60)


def test_a_group_decodes_as_a_batch_of_its_own_and_the_same_group_returns_the_same_tokens(tiny) -> None:
    model, tokenizer, ids = tiny
    group = [(_ids(tokenizer, "hello w1 w2 w3"), DecodeParams(n=2, temperature=1.0, max_tokens=6, seed=1)),
             (_ids(tokenizer, "hello w5 w6 w7 w8 w9"), DecodeParams(n=1, temperature=0.8, max_tokens=6, seed=2)),
             (_ids(tokenizer, "w4"), DecodeParams(n=1, temperature=0.9, max_tokens=6, seed=3, stop=("w7",)))]
    decoder = BatchDecoder(model, tokenizer, max_rows=16)
    long = decoder.submit(ids, DecodeParams(n=3, temperature=1.0, max_tokens=10, seed=4))
    for _ in range(3):  # a request is decoding when the group arrives
        decoder._tick()
    first = decoder.submit_group(group)
    late = decoder.submit(ids, DecodeParams(n=3, temperature=1.0, max_tokens=6, seed=5))
    decoder.run()
    # The group waited for the running request and nothing joined it: 3 rows, then 4, then 3, never 7.
    assert decoder.peak_rows == 4
    assert long.result().completions[0].completion_tokens == 10 and late.done()
    again = BatchDecoder(model, tokenizer, max_rows=16)
    second = again.submit_group(group)
    again.run()
    a, b = [f.result() for f in first], [f.result() for f in second]
    assert [[c.token_ids for c in d.completions] for d in a] == [[c.token_ids for c in d.completions] for d in b]
    assert [len(d.completions) for d in a] == [2, 1, 1] and all("w7" not in t for t in a[2].texts)


def test_a_group_wider_than_max_rows_decodes_in_chunks_of_whole_requests_in_order(tiny) -> None:
    model, tokenizer, ids = tiny
    p = [DecodeParams(n=2, temperature=1.0, max_tokens=5, seed=s) for s in range(3)]
    decoder = BatchDecoder(model, tokenizer, max_rows=4)
    futures = decoder.submit_group([(ids, q) for q in p])
    decoder.run()
    assert decoder.peak_rows == 4  # [2 + 2] then [2]
    assert [f.result().texts for f in futures] == [decode(model, tokenizer, ids, q).texts for q in p]
    assert decoder.submit_group([]) == []


def test_close_fails_a_group_still_queued(tiny) -> None:
    model, tokenizer, ids = tiny
    decoder = BatchDecoder(model, tokenizer, max_rows=16, name="decode_test").start()
    running = decoder.submit(ids, DecodeParams(n=1, temperature=1.0, max_tokens=400, seed=1))
    queued = decoder.submit_group([(ids, DecodeParams(n=1, temperature=1.0, max_tokens=5, seed=2))])
    decoder.close()
    for f in (running, *queued):
        with pytest.raises(Exception, match="freed before it finished"):
            f.result(timeout=60)


# ------------------------------------------------------------------------------------ validation


def _request(**kw) -> scorer_pb2.GenerateRequest:
    msg = scorer_pb2.GenerateRequest(messages=[PROMPT[0].to_proto()], **kw)
    return msg


@pytest.mark.parametrize(("kw", "field"), [
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ["a", ""]}, "stop[1]"),
    ({"stop": ["x" * 65]}, "stop[0]"),
    ({"sampling": scorer_pb2.SamplingParams(max_tokens=0)}, "sampling.max_tokens"),
    ({"sampling": scorer_pb2.SamplingParams(max_tokens=257)}, "sampling.max_tokens"),
    ({"sampling": scorer_pb2.SamplingParams(temperature=math.nan)}, "sampling.temperature"),
    ({"n": 17}, "n"),
    ({"model": "no spaces"}, "model"),
])
def test_bad_generate_fields_are_named(kw, field) -> None:
    with pytest.raises(InvalidArgument) as e:
        GenerateQuery.from_proto(_request(**kw), RequestLimits(max_n=16, max_new_tokens=256))
    assert e.value.field == field


def test_bad_generate_batch_fields_are_named() -> None:
    ok = _request()
    cases = [
        (scorer_pb2.GenerateBatchRequest(), "requests"),
        (scorer_pb2.GenerateBatchRequest(requests=[ok] * 3), "requests"),  # over max_generate_batch=2
        (scorer_pb2.GenerateBatchRequest(requests=[ok, _request(n=17)]), "requests[1].n"),
        (scorer_pb2.GenerateBatchRequest(requests=[ok, _request(model="other")]), "requests[1].model"),
    ]
    for msg, field in cases:
        with pytest.raises(InvalidArgument) as e:
            GenerateBatchQuery.from_proto(msg, RequestLimits(max_generate_batch=2))
        assert e.value.field == field, (field, e.value)
    q = GenerateBatchQuery.from_proto(scorer_pb2.GenerateBatchRequest(requests=[ok, _request(n=2)]))
    assert [x.n for x in q.queries] == [1, 2] and q.model == ""


def test_empty_messages_are_refused_and_n_defaults_to_one() -> None:
    with pytest.raises(InvalidArgument) as e:
        GenerateQuery.from_proto(scorer_pb2.GenerateRequest())
    assert e.value.field == "messages"
    q = GenerateQuery.from_proto(_request(stop=["\n\n"]))
    assert (q.n, q.stop, q.messages) == (1, ("\n\n",), PROMPT)
    assert GenerateQuery.from_proto(q.to_proto()) == q


# ------------------------------------------------------------------------------------ engine


class FakePolicy:
    """Answers "a b c" for each row, one word per step, through the on_delta callback."""

    dtype = "float32"

    def __init__(self, wait_for_cancel_s: float = 0.0) -> None:
        self.cancelled_seen = False
        # > 0: after its first token the decode waits (up to this long) for the caller to cancel, like a
        # slow model; otherwise a fast fake can finish every token before the client closes its stream.
        self.wait_for_cancel_s = wait_for_cancel_s
        self._decoder = concurrent.futures.ThreadPoolExecutor(1)  # stands in for the decoder thread

    def prompt_ids(self, prompt):
        return [1, 2, 3, 4]

    def submit(self, prompt_ids, params, on_delta=None, cancelled=None):
        return self._decoder.submit(self.sample, prompt_ids, params, on_delta, cancelled)

    def submit_group(self, requests):
        return [self.submit(ids, params) for ids, params in requests]

    def sample(self, prompt, params, on_delta=None, cancelled=None):
        rows = []
        for i in range(params.n):
            for w in ("a", " b", " c"):
                if cancelled is not None and cancelled():
                    self.cancelled_seen = True
                    break
                if on_delta is not None:
                    on_delta(i, w)
                deadline = time.monotonic() + self.wait_for_cancel_s
                while cancelled is not None and not cancelled() and time.monotonic() < deadline:
                    time.sleep(0.005)
            rows.append(Completion(i, [7] * 3, "a b c", finish_reason="length"))
        return Decoded(tuple(rows), prompt_tokens=4)

    def close(self) -> None:
        pass


class _Reward:
    dtype = "float32"
    attribute_names = ()

    def run_batch(self, rows):
        return [(0.0, {}) for _ in rows]

    def close(self) -> None:
        pass


def _engine() -> Engine:
    cfg = load_scorer_config(overrides={"policy_models": ["policy"], "default_new_tokens": 3}, env={})
    ex = concurrent.futures.ThreadPoolExecutor(2)
    return ServingEngine(cfg, ScorerMetrics(), infer_executor=ex, tokenize_executor=ex, judge_executor=ex)


def test_engine_generates_and_streams_from_one_version() -> None:
    async def main() -> tuple[GenerateResult, list[GenerateChunk], int]:
        engine = _engine()
        slot = engine.new_slot("policy", ModelKind.POLICY, "v3", "", FakePolicy())
        engine.install(slot)
        res = await engine.generate_text(GenerateQuery(PROMPT, n=2, request_id="r1"))
        chunks = [c async for c in engine.generate_stream(GenerateQuery(PROMPT, n=2, request_id="r2"))]
        refs = slot.refs
        await engine.close()
        return res, chunks, refs

    res, chunks, refs = asyncio.run(main())
    assert [c.text for c in res.choices] == ["a b c", "a b c"]
    assert (res.model.name, res.model.version, res.request_id) == ("policy", "v3", "r1")
    assert (res.usage.prompt_tokens, res.usage.completion_tokens, res.usage.total_tokens) == (4, 6, 10)
    assert all(c.model.version == "v3" and c.request_id == "r2" for c in chunks)
    for i in (0, 1):
        assert "".join(c.delta for c in chunks if c.index == i) == "a b c"
        assert [c.finish_reason for c in chunks if c.index == i and c.finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert refs == 0  # released


def test_engine_decodes_a_batch_on_one_version_and_answers_in_request_order() -> None:
    async def main() -> tuple[list[GenerateResult], int]:
        engine = _engine()
        slot = engine.new_slot("policy", ModelKind.POLICY, "v2", "", FakePolicy())
        engine.install(slot)
        res = await engine.generate_batch(GenerateBatchQuery((GenerateQuery(PROMPT, n=1, request_id="a"),
                                                              GenerateQuery(PROMPT, n=3, request_id="b"))))
        refs = slot.refs
        await engine.close()
        return res, refs

    res, refs = asyncio.run(main())
    assert [r.request_id for r in res] == ["a", "b"] and [len(r.choices) for r in res] == [1, 3]
    assert {r.model.version for r in res} == {"v2"} and res[1].usage.completion_tokens == 9
    assert refs == 0


def test_engine_batch_whose_caller_goes_away_holds_the_version_until_the_group_ends() -> None:
    class HeldPolicy(FakePolicy):
        def submit_group(self, requests):
            self.futures = [concurrent.futures.Future() for _ in requests]
            return self.futures

    async def main() -> tuple[int, int]:
        engine = _engine()
        policy = HeldPolicy()
        slot = engine.new_slot("policy", ModelKind.POLICY, "v1", "", policy)
        engine.install(slot)
        task = asyncio.ensure_future(engine.generate_batch(GenerateBatchQuery((GenerateQuery(PROMPT),))))
        while not getattr(policy, "futures", None):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        held = slot.refs  # the group still decodes on this version
        policy.futures[0].set_result(Decoded((Completion(0, [7], "a", finish_reason="stop"),), prompt_tokens=4))
        for _ in range(300):
            if slot.refs == 0:
                break
            await asyncio.sleep(0.01)
        refs = slot.refs
        await engine.close()
        return held, refs

    held, refs = asyncio.run(main())
    assert held == 1 and refs == 0


def test_engine_stream_closed_early_stops_and_releases() -> None:
    async def main() -> tuple[int, bool]:
        engine = _engine()
        policy = FakePolicy(wait_for_cancel_s=30.0)
        slot = engine.new_slot("policy", ModelKind.POLICY, "v1", "", policy)
        engine.install(slot)
        stream = engine.generate_stream(GenerateQuery(PROMPT, n=4))
        first = await stream.__anext__()
        assert first.delta == "a"
        await stream.aclose()
        for _ in range(3000):  # the generation thread notices the cancel at its next token (a loaded box: seconds)
            if slot.refs == 0:
                break
            await asyncio.sleep(0.01)
        refs = slot.refs
        await engine.close()
        return refs, policy.cancelled_seen

    refs, cancelled = asyncio.run(main())
    assert refs == 0 and cancelled


def test_engine_generation_whose_caller_is_cancelled_leaves_the_decoder() -> None:
    """No thread waits per request: the loop awaits the decoder's future, and a cancelled caller (a
    client that went away) makes its rows stop at the decoder's next step."""
    async def main() -> tuple[int, bool, bool]:
        engine = _engine()
        policy = FakePolicy(wait_for_cancel_s=30.0)
        slot = engine.new_slot("policy", ModelKind.POLICY, "v1", "", policy)
        engine.install(slot)
        task = asyncio.ensure_future(engine.generate_text(GenerateQuery(PROMPT, n=1)))
        while slot.refs == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # decoding: waiting for a cancel
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(3000):
            if policy.cancelled_seen:
                break
            await asyncio.sleep(0.01)
        refs = slot.refs
        await engine.close()
        return refs, policy.cancelled_seen, task.cancelled()

    refs, seen, cancelled = asyncio.run(main())
    assert refs == 0 and seen and cancelled


def test_engine_refuses_a_reward_model_and_unknown_names() -> None:
    async def main() -> None:
        engine = _engine()
        engine.install(engine.new_slot("reward", ModelKind.REWARD, "base", "", _Reward()))
        engine.install(engine.new_slot("policy", ModelKind.POLICY, "base", "", FakePolicy()))
        with pytest.raises(InvalidArgument) as e:
            await engine.generate_text(GenerateQuery(PROMPT, model="reward"))
        assert e.value.field == "model" and "policy" in e.value.message
        with pytest.raises(NotFound):
            await engine.generate_text(GenerateQuery(PROMPT, model="nope"))
        await engine.close()

    asyncio.run(main())


def test_unset_sampling_falls_back_to_scorer_defaults() -> None:
    engine = _engine()
    p = engine._decode_params(SamplingParams(seed=5), n=2, stop=("x",))
    assert (p.n, p.temperature, p.top_p, p.max_tokens, p.seed, p.stop) == (2, 0.7, 1.0, 3, 5, ("x",))
