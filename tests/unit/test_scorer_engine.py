"""The serving engine and model manager with fake runners: versions, atomic swaps, draining, refusals."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass

import pytest

from scorer.bestofn import Criterion
from scorer.config import load_scorer_config
from scorer.decoding import Completion, Decoded
from scorer.domain import BestOfNQuery, SamplingParams, ScoreQuery
from scorer.engine import ServingEngine
from scorer.metrics import ScorerMetrics
from scorer.runners import CheckpointRefused
from scorer.swap import ModelManager
from services.errors import NotFound, Unavailable
from services.kinds import ModelKind
from services.schemas import ChatMessage

PROMPT = (ChatMessage("user", "hi"),)


class FakeReward:
    """reward = offset + len(response); a delay makes batches overlap with swaps."""

    def __init__(self, offset: float, delay_s: float = 0.0, attributes: tuple[str, ...] = ()) -> None:
        self.offset = offset
        self.delay_s = delay_s
        self.attribute_names = attributes
        self.dtype = "bfloat16"
        self.closed = threading.Event()
        self.batches = 0

    def encode(self, prompt, responses):
        return [r for r in responses]

    def run_batch(self, rows):
        assert not self.closed.is_set(), "ran a batch on a freed model"
        self.batches += 1
        time.sleep(self.delay_s)
        return [(self.offset + len(r), {a: float(i) for i, a in enumerate(self.attribute_names)}) for r in rows]

    def close(self):
        self.closed.set()


class FakePolicy:
    dtype = "float32"

    def prompt_ids(self, prompt):
        return [0] * 5

    def submit(self, prompt_ids, params, on_delta=None, cancelled=None):
        rows = tuple(Completion(i, [0] * (i + 2), f"sample {i} " + "x" * i, finish_reason="stop")
                     for i in range(params.n))
        done = concurrent.futures.Future()
        done.set_result(Decoded(rows, prompt_tokens=len(prompt_ids)))
        return done

    def close(self):
        pass


def make_engine(**overrides):
    cfg = load_scorer_config(overrides={"max_wait_ms": 2, "drain_timeout_s": 10, **overrides}, env={})
    ex = concurrent.futures.ThreadPoolExecutor(2)
    return ServingEngine(cfg, ScorerMetrics(), infer_executor=ex, tokenize_executor=ex, judge_executor=ex), cfg


def test_score_reports_the_version_that_scored():
    async def main():
        engine, _ = make_engine()
        engine.install(engine.new_slot("reward", ModelKind.REWARD, "v1", "file:///x", FakeReward(100.0)))
        res = await engine.score(ScoreQuery(PROMPT, ("a", "bbb")))
        await engine.close()
        return res

    res = asyncio.run(main())
    assert res.rewards == [101.0, 103.0]
    assert (res.model.name, res.model.version) == ("reward", "v1")


def test_swap_under_load_fails_nothing_and_frees_the_old_model_after_draining():
    async def main():
        engine, _ = make_engine()
        old = FakeReward(100.0, delay_s=0.01)
        new = FakeReward(200.0, delay_s=0.01)
        engine.install(engine.new_slot("reward", ModelKind.REWARD, "v1", "", old))
        results = []

        async def client(i):
            for _ in range(15):
                r = await engine.score(ScoreQuery(PROMPT, ("x" * (i + 1),)))
                results.append((time.monotonic(), r.model.version, r.rewards[0], i))

        tasks = [asyncio.ensure_future(client(i)) for i in range(8)]
        await asyncio.sleep(0.1)
        swapped_at = time.monotonic()
        engine.install(engine.new_slot("reward", ModelKind.REWARD, "v2", "", new))
        await asyncio.gather(*tasks)
        await asyncio.sleep(0.05)
        freed = old.closed.is_set()
        await engine.close()
        return results, swapped_at, freed

    results, swapped_at, freed = asyncio.run(main())
    assert len(results) == 8 * 15  # zero failed requests
    for _, version, reward, i in results:  # every answer is consistent with the version it names
        assert reward == (100.0 if version == "v1" else 200.0) + i + 1
    assert {"v1", "v2"} == {v for _, v, _, _ in results}
    # After the swap every answer that started later came from v2: the last ones are all v2.
    assert all(v == "v2" for t, v, _, _ in sorted(results)[-16:])
    assert freed  # the old model was freed once its in-flight batches finished


def test_unknown_and_loading_models_are_distinguished():
    async def main():
        engine, _ = make_engine()
        with pytest.raises(Unavailable, match="still loading"):
            await engine.score(ScoreQuery(PROMPT, ("a",)))
        engine.install(engine.new_slot("reward", ModelKind.REWARD, "base", "", FakeReward(0.0)))
        with pytest.raises(NotFound, match="served reward models: reward"):
            await engine.score(ScoreQuery(PROMPT, ("a",), model="other"))
        await engine.close()

    asyncio.run(main())


def test_best_of_n_ranks_candidates_by_combined_criteria():
    async def main():
        engine, _ = make_engine()
        engine.install(engine.new_slot("reward", ModelKind.REWARD, "v1", "", FakeReward(0.0)))
        # "short" prefers short responses: reward = 10 - len via negative weight on length model.
        engine.install(engine.new_slot("length", ModelKind.REWARD, "v7", "", FakeReward(5.0)))
        q = BestOfNQuery(prompt=PROMPT, candidates=("aaaa", "a", "aa"),
                         criteria=(Criterion("reward", 1.0), Criterion("length", -2.0)))
        res = await engine.best_of_n(q)
        await engine.close()
        return res

    res = asyncio.run(main())
    # Both models are affine in length, so z-scores are identical: combined = (1 - 2) * z(len).
    assert [c.index for c in res.ranked] == [1, 2, 0]
    assert res.ranked[0].per_criterion == {"reward": 1.0, "length": 6.0}
    assert [(m.name, m.version) for m in res.reward_models] == [("reward", "v1"), ("length", "v7")]
    assert res.policy is None


def test_best_of_n_never_ranks_an_empty_reply_over_one_with_text():
    async def main():
        engine, _ = make_engine()
        engine.install(engine.new_slot("reward", ModelKind.REWARD, "v1", "", FakeReward(0.0)))
        # A negative weight prefers the shortest reply, which is the empty one.
        q = BestOfNQuery(prompt=PROMPT, candidates=("aaaa", "", "aa"), criteria=(Criterion("reward", -1.0),))
        res = await engine.best_of_n(q)
        await engine.close()
        return res

    res = asyncio.run(main())
    assert [c.index for c in res.ranked] == [2, 0, 1]
    assert res.ranked[-1].score == max(c.score for c in res.ranked)  # its score is reported as computed


def test_best_of_n_samples_from_the_policy():
    async def main():
        engine, _ = make_engine()
        engine.install(engine.new_slot("reward", ModelKind.REWARD, "v1", "", FakeReward(0.0)))
        engine.install(engine.new_slot("policy", ModelKind.POLICY, "base", "", FakePolicy()))
        res = await engine.best_of_n(BestOfNQuery(prompt=PROMPT, n=3, sampling=SamplingParams(seed=1)))
        await engine.close()
        return res

    res = asyncio.run(main())
    assert [c.index for c in res.ranked] == [2, 1, 0]  # longest sample has the highest fake reward
    assert (res.policy.name, res.policy.version) == ("policy", "base")
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (5, 2 + 3 + 4)


# ------------------------------------------------------------------------------------ manager


@dataclass
class MV:
    version: str
    uri: str
    kind: ModelKind = ModelKind.REWARD


class FakeRegistry:
    def __init__(self) -> None:
        self.targets: dict[str, MV | None] = {}
        self.gen: dict[str, int] = {}

    def publish(self, name, version, uri):
        self.targets[name] = MV(version, uri)
        self.gen[name] = self.gen.get(name, 0) + 1

    def target(self, name):
        return self.targets.get(name)

    def generation(self, name):
        return self.gen.get(name, 0)

    def list_models(self):
        return []


def test_manager_serves_base_then_follows_the_registry_and_refuses_corrupt(monkeypatch):
    loads = []

    def fake_load(self, target, path, spare=None, phases=None):
        loads.append(target.version)
        if "corrupt" in target.uri:
            raise CheckpointRefused("corrupt", f"{target.uri}: weights.safetensors does not match its sha256")
        return FakeReward({"base": 0.0, "v1": 100.0, "v3": 300.0}[target.version])

    monkeypatch.setattr(ModelManager, "_load_runner", fake_load)
    monkeypatch.setattr(ModelManager, "_open", lambda self, target: target.uri)

    async def main():
        engine, cfg = make_engine(policy_models=[], poll_interval_s=0.05)
        reg = FakeRegistry()
        ex = concurrent.futures.ThreadPoolExecutor(2)
        mgr = ModelManager(cfg, engine, engine.metrics, reg, load_executor=ex, registry_executor=ex)
        await mgr.start()
        v0 = (await engine.score(ScoreQuery(PROMPT, ("a",)))).model.version
        reg.publish("reward", "v1", "file:///ckpt/reward/v1")
        await asyncio.sleep(0.3)
        v1 = (await engine.score(ScoreQuery(PROMPT, ("a",)))).model.version
        reg.publish("reward", "v2", "file:///ckpt/reward/v2-corrupt")
        await asyncio.sleep(0.3)
        after_corrupt = await engine.score(ScoreQuery(PROMPT, ("a",)))
        reg.publish("reward", "v3", "file:///ckpt/reward/v3")
        await asyncio.sleep(0.3)
        v3 = (await engine.score(ScoreQuery(PROMPT, ("a",)))).model.version
        metrics = engine.metrics.exposition().decode()
        await mgr.stop()
        await engine.close()
        return v0, v1, after_corrupt, v3, reg, metrics

    v0, v1, after_corrupt, v3, reg, metrics = asyncio.run(main())
    assert (v0, v1, v3) == ("base", "v1", "v3")
    assert after_corrupt.model.version == "v1" and after_corrupt.rewards == [101.0]  # still serving v1
    assert loads.count("v2") == 1  # refused once, not retried on every poll
    assert 'prefstream_scorer_swap_failures_total{model="reward",reason="corrupt"} 1.0' in metrics
    assert 'prefstream_scorer_swaps_total{model="reward"} 2.0' in metrics
    assert 'prefstream_scorer_serving_version_info{dtype="bfloat16",kind="reward",model="reward",version="v3"} 1.0' in metrics
    assert 'version="v1"' not in metrics.split("prefstream_scorer_serving_version_info")[-1].split("#")[0]


class ReloadableReward(FakeReward):
    """A fake with the in-place reload of scorer/runners.RewardRunner: the offset is its "weights"."""

    signature = "same-architecture"
    reloads = 0

    def reload(self, path, *, warmup, timings=None):
        assert not self.closed.is_set()
        if "other-architecture" in path:
            from scorer.runners import NotReloadable

            raise NotReloadable(path)
        ReloadableReward.reloads += 1
        self.offset = float(path.rsplit("/", 1)[-1][1:]) * 100
        if timings is not None:
            timings.update(load=0.001, warmup=0.001)
        return self


def test_manager_loads_new_weights_into_the_retired_copy_once_it_drained(monkeypatch):
    full = []

    def fake_load(self, target, path, spare=None, phases=None):
        if spare is not None:
            try:
                return spare.reload(path, warmup=True, timings=phases)
            except Exception:
                spare.close()
        full.append(target.version)
        return ReloadableReward(float(target.version[1:]) * 100 if target.version != "base" else 0.0)

    monkeypatch.setattr(ModelManager, "_load_runner", fake_load)
    monkeypatch.setattr(ModelManager, "_open", lambda self, target: target.uri)
    ReloadableReward.reloads = 0

    async def main():
        engine, cfg = make_engine(policy_models=[], poll_interval_s=0.05)
        reg = FakeRegistry()
        ex = concurrent.futures.ThreadPoolExecutor(2)
        mgr = ModelManager(cfg, engine, engine.metrics, reg, load_executor=ex, registry_executor=ex)
        await mgr.start()
        seen = []
        for v, uri in (("v1", "/ckpt/v1"), ("v2", "/ckpt/v2"), ("v3", "/ckpt/v3"), ("v4", "/other-architecture/v4")):
            reg.publish("reward", v, uri)
            await asyncio.sleep(0.3)
            res = await engine.score(ScoreQuery(PROMPT, ("a",)))
            seen.append((res.model.version, res.rewards[0]))
        live = engine.serving("reward").runner
        await mgr.stop()
        await engine.close()
        return seen, live

    seen, live = asyncio.run(main())
    # every version answers with its own weights, whichever path loaded it
    assert seen == [("v1", 101.0), ("v2", 201.0), ("v3", 301.0), ("v4", 401.0)]
    # base and v1 load in full (no retired copy yet); v2 and v3 go into the copy v1 and v2 left behind;
    # v4 changed architecture: a full load, and the copy it could not use is closed
    assert full == ["base", "v1", "v4"] and ReloadableReward.reloads == 2
    assert live.closed.is_set()  # engine.close frees the live copy and the kept one


def test_open_published_verifies_through_the_shared_opener_and_names_the_refusal(tmp_path) -> None:
    from scorer.runners import open_published
    from services.checkpoints import CheckpointStore

    store = CheckpointStore(str(tmp_path))
    ref = store.write("reward", "v000001", lambda d: (d / "weights.bin").write_bytes(b"\x01" * 64), {})
    assert open_published(ref.uri) == str(ref.path)

    def refusal(uri: str) -> str:
        with pytest.raises(CheckpointRefused) as e:
            open_published(uri)
        return e.value.reason

    assert refusal("gs://bucket/reward/v000001") == "unsupported_uri"
    assert refusal((tmp_path / "reward" / "v000009").as_uri()) == "corrupt"  # no such directory
    (ref.path / "weights.bin").write_bytes(b"\x02" * 64)
    assert refusal(ref.uri) == "corrupt"
