"""On-policy pacing of the criteria loop (loop/pacing.py) and its per-version counters: pure parts."""

from __future__ import annotations

import asyncio

import pytest

from loop.pacing import Pacer, Quiet, TrainerBacklog, backlog, consumed_from_metrics
from loop.run import Counters

EXPOSITION = """\
# HELP prefstream_trainer_records_total Preference records consumed, by use.
# TYPE prefstream_trainer_records_total counter
prefstream_trainer_records_total{use="train"} 40.0
prefstream_trainer_records_total{use="eval"} 9.0
prefstream_trainer_records_total{use="replay"} 20.0
prefstream_trainer_records_total{use="refused"} 1.0
prefstream_trainer_records_total{use="duplicate"} 2.0
# HELP prefstream_trainer_steps_total Optimiser steps taken.
# TYPE prefstream_trainer_steps_total counter
prefstream_trainer_steps_total 6.0
"""


def test_consumed_counts_every_use_but_replay() -> None:
    assert consumed_from_metrics(EXPOSITION) == 40 + 9 + 1 + 2
    assert consumed_from_metrics("# TYPE prefstream_trainer_steps_total counter\nprefstream_trainer_steps_total 3.0\n") is None
    assert consumed_from_metrics("") is None


def test_the_real_trainer_counter_reads_back() -> None:
    """The parser reads what the trainer's own counter exports (name and label as declared)."""
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    reg = CollectorRegistry()
    c = Counter("prefstream_trainer_records", "records", ["use"], registry=reg)
    c.labels("train").inc(5)
    c.labels("replay").inc(7)
    c.labels("eval").inc(2)
    assert consumed_from_metrics(generate_latest(reg).decode()) == 7


def test_backlog_is_produced_minus_consumed_never_negative() -> None:
    assert backlog(60, 52.0) == 8
    assert backlog(10, 12.0) == 0  # re-read after a rebalance: counted twice, never a negative backlog


def test_backlog_reader_treats_an_unreadable_side_as_unknown_and_no_counter_as_nothing_consumed() -> None:
    class Fixed(TrainerBacklog):
        def produced(self) -> int:
            return 30

    assert Fixed("k", "t", "u", fetch=lambda url: EXPOSITION).read() == 0  # 52 consumed of 30: caught up
    assert Fixed("k", "t", "u", fetch=lambda url: "").read() == 30  # trainer up, nothing consumed yet

    def down(url: str) -> str:
        raise ConnectionRefusedError(url)

    assert Fixed("k", "t", "u", fetch=down).read() is None


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_pacer_holds_at_the_bound_shares_one_reading_per_interval_and_never_holds_on_unknown() -> None:
    readings = iter([20, 15, None, 3])
    calls = []

    def read() -> int | None:
        calls.append(1)
        return next(readings)

    clock = Clock()
    p = Pacer(16, read, every_s=1.0, clock=clock)
    assert p.should_hold() and p.last == 20
    clock.t = 0.5
    assert p.should_hold() and len(calls) == 1  # within the interval: the same reading
    clock.t = 1.0
    assert not p.should_hold() and p.last == 15  # below the bound
    clock.t = 2.0
    assert not p.should_hold() and p.last is None  # unknown: never held on it
    clock.t = 3.0
    assert not p.should_hold() and p.peak == 20


def test_pacing_off_never_reads() -> None:
    p = Pacer(0, lambda: pytest.fail("read with pacing off"))
    assert not p.should_hold() and p.peak is None


def test_counters_per_served_version_tell_rule_pairs_from_the_rest() -> None:
    c = Counters()
    c.answered("", [True, False, False])  # base: mixed, the pair teaches the rule
    c.answered("v000001", [True, True, True])  # every candidate passes: no rule pair
    c.answered("v000001", [False, True, True])
    assert (c.stored, c.candidates, c.candidates_passing) == (3, 9, 6)
    base, v1 = c.per_version["base"].row(), c.per_version["v000001"].row()
    assert base["requests"] == 1 and base["mixed_share"] == 1.0 and base["passing_share"] == pytest.approx(1 / 3)
    assert v1["requests"] == 2 and v1["mixed"] == 1 and v1["passing_share"] == pytest.approx(5 / 6)


def test_alone_waits_for_the_requests_in_flight_and_holds_new_ones_until_it_ends() -> None:
    async def scenario() -> list[str]:
        clock = [0.0]
        quiet, events = Quiet(clock=lambda: clock[0]), []
        release_first = asyncio.Event()

        async def app(name: str, until: asyncio.Event | None = None) -> None:
            async with quiet.request():
                events.append(f"{name} in (alone? {quiet.in_flight})")
                if until is not None:
                    await until.wait()
            events.append(f"{name} out")

        async def evaluation(name: str) -> None:
            async with quiet.alone():
                events.append(f"{name} starts with {quiet.in_flight} in flight")
                clock[0] += 5.0
                await asyncio.sleep(0)  # a request arriving now must wait
                await asyncio.sleep(0)
                events.append(f"{name} ends")

        first = asyncio.create_task(app("a", release_first))
        await asyncio.sleep(0)
        ev1 = asyncio.create_task(evaluation("eval1"))
        ev2 = asyncio.create_task(evaluation("eval2"))
        await asyncio.sleep(0)
        late = asyncio.create_task(app("b"))
        await asyncio.sleep(0)
        assert events == ["a in (alone? 1)"]  # both evaluations and the late request wait for a
        release_first.set()
        await asyncio.gather(first, ev1, ev2, late)
        assert quiet.held_s == 10.0 and quiet.in_flight == 0
        return events

    events = asyncio.run(scenario())
    assert events[:2] == ["a in (alone? 1)", "a out"]
    # The evaluations take turns, each with nothing else in flight; the late request goes after them.
    assert events[2:6] == ["eval1 starts with 0 in flight", "eval1 ends", "eval2 starts with 0 in flight", "eval2 ends"]
    assert events[6:] == ["b in (alone? 1)", "b out"]


def test_requests_run_together_when_nothing_is_measured() -> None:
    async def scenario() -> int:
        quiet, peak = Quiet(), 0
        gate = asyncio.Event()

        async def app() -> None:
            nonlocal peak
            async with quiet.request():
                peak = max(peak, quiet.in_flight)
                await gate.wait()

        tasks = [asyncio.create_task(app()) for _ in range(4)]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)
        assert quiet.held_s == 0.0
        return peak

    assert asyncio.run(scenario()) == 4


def test_an_evaluation_a_hot_swap_split_between_two_versions_is_taken_again() -> None:
    # the short loop's integration test once measured v000002 on 1 prompt and v000003 on 3
    from types import SimpleNamespace

    from loop.run import MIXED_RETRIES, CriteriaLoop

    readings = [(["a b", "c"], {"v000002": 1, "v000003": 1}, 0.0), (["a", "c d"], {"v000003": 2}, 0.5)]

    loop = object.__new__(CriteriaLoop)
    loop.cfg = SimpleNamespace(eval_alone=True, policy_model="policy")
    loop.quiet, loop.t0, loop.phase, loop.evaluations, loop._evaluated = Quiet(), 0.0, 0, [], set()
    loop.registry = SimpleNamespace(get=lambda name, version: SimpleNamespace(metrics={"kl_to_ref": 0.1}))

    async def generate(scorer):
        return readings.pop(0)

    async def judge(scorer, replies):
        return {"brief@v1": [SimpleNamespace(status="success", passed=True) for _ in replies]}

    async def rewards(scorer, replies):
        return [0.5 for _ in replies]

    loop._generate_eval, loop.judge, loop._rewards = generate, judge, rewards
    ev = asyncio.run(loop.evaluate_served(None, "after v000003"))
    assert ev.versions == {"v000003": 2} and ev.replies == ["a", "c d"] and ev.cut_off == 0.5 and not readings
    assert ev.violation == {"brief@v1": 0.0} and loop.evaluations == [ev]
    # a swap at every try: the last reading is kept, its versions recorded
    readings.extend([(["a"], {"v1": 1, "v2": 1}, 0.0)] * (MIXED_RETRIES + 1))
    ev = asyncio.run(loop.evaluate_served(None, "after v2"))
    assert ev.versions == {"v1": 1, "v2": 1} and not readings


def test_a_phase_ends_after_the_gate_s_verdict_on_a_checkpoint_it_is_still_judging(tmp_path, monkeypatch) -> None:
    import asyncio
    from types import SimpleNamespace

    import loop.run
    from loop.run import CriteriaLoop
    from services.checkpoints import CheckpointStore

    monkeypatch.setattr(loop.run, "DRAIN_POLL_S", 0.02)
    store = CheckpointStore(str(tmp_path))
    for v in ("v000001", "v000002"):
        store.write("policy", v, lambda d: (d / "w.bin").write_bytes(b"w"), {})
    registry = {"published": ["v000001"], "rejected": []}
    crit = object.__new__(CriteriaLoop)
    crit.cfg = SimpleNamespace(policy_model="policy", drain_timeout_s=1.0, min_versions=2)
    crit.procs = SimpleNamespace(checkpoints=tmp_path)
    crit.versions = lambda: (list(registry["published"]), list(registry["rejected"]))
    assert crit.awaiting_verdict(crit.versions()) == ["v000002"]  # written, not judged yet

    async def drain(verdict_after: float | None = None) -> float:
        async def verdict() -> None:
            await asyncio.sleep(verdict_after)
            registry["rejected"].append(("v000002", "length guard: ..."))

        started = asyncio.get_running_loop().time()
        pending = [asyncio.create_task(verdict())] if verdict_after is not None else []
        await crit._drain(published_before=0)
        await asyncio.gather(*pending)
        return asyncio.get_running_loop().time() - started

    took = asyncio.run(drain())  # the verdict never comes: drain_timeout_s, then as long again, no longer
    assert 2.0 <= took < 3.0
    took = asyncio.run(drain(verdict_after=1.3))  # it comes past drain_timeout_s: the phase waits for it
    assert 1.3 <= took < 1.9 and crit.awaiting_verdict(crit.versions()) == []
    took = asyncio.run(drain())  # nothing awaiting a verdict: drain_timeout_s alone
    assert 1.0 <= took < 1.9
