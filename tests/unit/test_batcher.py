"""The dynamic batcher: batch shape (buckets, token budget, size), timing, ordering and failures."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from scorer.batcher import BatchLimits, DynamicBatcher
from services.errors import ResourceExhausted, Unavailable


class Recorder:
    """A run_batch that records each batch it sees and returns ``f(item)`` per item."""

    def __init__(self, fn=lambda x: x * 10, delay_s: float = 0.0) -> None:
        self.fn = fn
        self.delay_s = delay_s
        self.batches: list[list] = []
        self.threads: set[int] = set()

    def __call__(self, items: list) -> list:
        self.threads.add(threading.get_ident())
        self.batches.append(list(items))
        if self.delay_s:
            time.sleep(self.delay_s)
        return [self.fn(x) for x in items]


class Obs:
    def __init__(self) -> None:
        self.batches: list[tuple[int, int, int, bool]] = []
        self.depths: list[int] = []

    def on_batch(self, size, real, padded, duration_s, ok):
        self.batches.append((size, real, padded, ok))

    def on_queue_depth(self, depth):
        self.depths.append(depth)


@pytest.fixture
def executor():
    ex = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    yield ex
    ex.shutdown(wait=True)


def run(coro):
    return asyncio.run(coro)


def test_bucket_len_rounds_up_to_grid():
    lim = BatchLimits(bucket_width=32)
    assert [lim.bucket_len(t) for t in (1, 31, 32, 33, 64, 65)] == [32, 32, 32, 64, 64, 96]


def test_results_return_to_their_own_requests_in_order(executor):
    rec = Recorder()

    async def main():
        b = DynamicBatcher(rec, executor=executor, limits=BatchLimits(max_wait_ms=5))
        outs = await asyncio.gather(*(b.submit([(i, 10), (i + 100, 12)]) for i in range(20)))
        await b.close()
        return outs

    outs = run(main())
    assert outs == [[i * 10, (i + 100) * 10] for i in range(20)]
    assert len(rec.threads) == 1 and threading.get_ident() not in rec.threads  # model work off the loop
    assert len(rec.batches) < 20  # concurrent requests were batched together


def test_max_batch_size_and_token_budget_are_respected(executor):
    rec = Recorder()
    lim = BatchLimits(max_batch_size=4, max_batch_tokens=256, bucket_width=32, max_wait_ms=50)

    async def main():
        b = DynamicBatcher(rec, executor=executor, limits=lim)
        # 10 items of 60 tokens -> bucket 64: at most 4 per batch by the token budget (4 x 64 = 256).
        await asyncio.gather(*(b.submit([(i, 60)]) for i in range(10)))
        # 10 items of 10 tokens -> bucket 32: the size cap (4) binds before the budget (8 x 32).
        await asyncio.gather(*(b.submit([(100 + i, 10)]) for i in range(10)))
        await b.close()

    run(main())
    assert sum(len(x) for x in rec.batches) == 20
    assert all(len(x) <= 4 for x in rec.batches)
    long_batches = [x for x in rec.batches if x[0] < 100]
    assert all(64 * len(x) <= 256 for x in long_batches)


def test_length_buckets_keep_short_and_long_sequences_apart(executor):
    rec = Recorder(delay_s=0.05)
    lim = BatchLimits(max_batch_size=64, max_batch_tokens=100_000, bucket_width=32, max_wait_ms=20, max_pad_ratio=2.0)
    lengths = {}

    async def main():
        b = DynamicBatcher(rec, executor=executor, limits=lim)
        items = []
        for i in range(24):
            n = 20 if i % 3 == 0 else (300 if i % 3 == 1 else 40)
            lengths[i] = n
            items.append((i, n))
        await asyncio.gather(*(b.submit([it]) for it in items))
        await b.close()

    run(main())
    for batch in rec.batches:
        buckets = [lim.bucket_len(lengths[i]) for i in batch]
        assert max(buckets) <= 2 * min(buckets), f"batch mixes lengths {sorted(lengths[i] for i in batch)}"
    # The 300-token items never share a batch with the 20/40-token ones.
    assert any(all(lengths[i] == 300 for i in batch) and len(batch) > 1 for batch in rec.batches)


def test_max_wait_bounds_latency_of_a_lone_request(executor):
    rec = Recorder()

    async def main():
        b = DynamicBatcher(rec, executor=executor, limits=BatchLimits(max_wait_ms=30, max_batch_size=64))
        t0 = time.perf_counter()
        out = await b.submit([(7, 5)])
        waited = time.perf_counter() - t0
        await b.close()
        return out, waited

    out, waited = run(main())
    assert out == [70]
    assert 0.025 <= waited < 0.5  # waited for companions about max_wait, then ran alone


def test_full_batch_runs_without_waiting(executor):
    rec = Recorder()

    async def main():
        b = DynamicBatcher(rec, executor=executor, limits=BatchLimits(max_wait_ms=5000, max_batch_size=8))
        t0 = time.perf_counter()
        out = await b.submit([(i, 5) for i in range(8)])
        waited = time.perf_counter() - t0
        await b.close()
        return out, waited

    out, waited = run(main())
    assert out == [i * 10 for i in range(8)]
    assert waited < 1.0  # a full batch does not wait the 5 s max_wait


def test_oldest_item_is_always_in_the_next_batch(executor):
    # While the model is busy, a long item arrives first and many short ones after it: the long one
    # must run in the very next batch, not after all short ones (no starvation).
    rec = Recorder(delay_s=0.05)
    lim = BatchLimits(max_batch_size=4, max_batch_tokens=100_000, max_wait_ms=1)

    async def main():
        b = DynamicBatcher(rec, executor=executor, limits=lim)
        blocker = asyncio.ensure_future(b.submit([("blocker", 5)]))
        await asyncio.sleep(0.01)
        long_ = asyncio.ensure_future(b.submit([("long", 400)]))
        shorts = [asyncio.ensure_future(b.submit([(f"s{i}", 5)])) for i in range(12)]
        await asyncio.gather(blocker, long_, *shorts)
        await b.close()

    rec.fn = lambda x: x
    run(main())
    assert rec.batches[0] == ["blocker"]
    assert rec.batches[1] == ["long"]


def test_batch_failure_reaches_only_that_batchs_futures(executor):
    def fn(items):
        if "bad" in items:
            raise ValueError("boom")
        return [x.upper() for x in items]

    lim = BatchLimits(max_batch_size=64, max_batch_tokens=100_000, bucket_width=32, max_wait_ms=10)

    async def main():
        b = DynamicBatcher(fn, executor=executor, limits=lim)
        # 'bad' is short and 'ok-long' is long: different buckets, so different batches.
        bad = b.submit([("bad", 5), ("x", 6)])
        good = b.submit([("ok-long", 400)])
        res = await asyncio.gather(bad, good, return_exceptions=True)
        await b.close()
        return res

    bad, good = run(main())
    assert isinstance(bad, ValueError) and str(bad) == "boom"
    assert good == ["OK-LONG"]


def test_per_item_exception_fails_only_that_item(executor):
    def fn(items):
        return [ValueError(f"bad item {x}") if x == 3 else x for x in items]

    async def main():
        b = DynamicBatcher(fn, executor=executor, limits=BatchLimits(max_wait_ms=10))
        futs = b.submit_group([(i, 5) for i in range(6)])
        res = await asyncio.gather(*futs, return_exceptions=True)
        await b.close()
        return res

    res = run(main())
    assert [r for i, r in enumerate(res) if i != 3] == [0, 1, 2, 4, 5]
    assert isinstance(res[3], ValueError) and "bad item 3" in str(res[3])


def test_queue_limit_and_closed_batcher_refuse_with_domain_errors(executor):
    async def main():
        b = DynamicBatcher(Recorder(delay_s=0.05), executor=executor,
                           limits=BatchLimits(max_queue=4, max_batch_size=2, max_wait_ms=1000))
        b.submit_group([(1, 5), (2, 5), (3, 5)])
        with pytest.raises(ResourceExhausted, match="queue is full"):
            b.submit_group([(4, 5), (5, 5)])
        await b.close()
        with pytest.raises(Unavailable):
            b.submit_group([(6, 5)])

    run(main())


def test_close_drains_queued_items(executor):
    rec = Recorder(delay_s=0.01)

    async def main():
        b = DynamicBatcher(rec, executor=executor, limits=BatchLimits(max_wait_ms=10_000, max_batch_size=2))
        futs = b.submit_group([(i, 5) for i in range(5)])
        await b.close()
        return [f.result() for f in futs]

    assert run(main()) == [0, 10, 20, 30, 40]


def test_cancelled_requests_are_not_computed(executor):
    rec = Recorder(delay_s=0.05)

    async def main():
        b = DynamicBatcher(rec, executor=executor, limits=BatchLimits(max_wait_ms=1, max_batch_size=1))
        first = asyncio.ensure_future(b.submit([("first", 5)]))
        await asyncio.sleep(0.01)  # the model is now busy with "first"
        doomed = asyncio.ensure_future(b.submit([("doomed", 5)]))
        await asyncio.sleep(0)
        doomed.cancel()
        await first
        await b.close()

    run(main())
    assert ["doomed"] not in rec.batches


def test_observer_sees_sizes_tokens_and_queue_depth(executor):
    obs = Obs()

    async def main():
        b = DynamicBatcher(Recorder(), executor=executor, limits=BatchLimits(max_wait_ms=5), observer=obs)
        await b.submit([(1, 10), (2, 30)])
        await b.close()

    run(main())
    assert obs.batches == [(2, 40, 60, True)]  # real 10 + 30; padded 2 x 30 (pad to the longest)
    assert obs.depths[0] == 2 and obs.depths[-1] == 0
