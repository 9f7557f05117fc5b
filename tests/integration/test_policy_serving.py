"""Serving a policy against a real Redis registry: ready only once loaded, a published policy version
swapped in under concurrent generation (unary and streamed) with zero failures, rollback back.

The policies are tiny random LlamaForCausalLMs with SmolLM2's tokenizer and chat template, saved as
plain HF folders through ``PolicyModel.save`` and written with a manifest by ``CheckpointStore``, so
the scorer loads them exactly as it will load a DPO checkpoint from the trainer, in well under a second.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")

from scorer.client import ScorerClient, to_messages  # noqa: E402
from scorer.config import load_scorer_config  # noqa: E402
from scorer.domain import SamplingParams  # noqa: E402
from scorer.generation import GenerateQuery  # noqa: E402
from scorer.server import Scorer  # noqa: E402
from services.checkpoints import CheckpointStore  # noqa: E402
from services.errors import InvalidArgument  # noqa: E402
from services.policy_model import PolicyModel, PolicySpec, default_policy_path  # noqa: E402
from services.registry import ModelRegistry, ModelVersion  # noqa: E402
from services.reward_model import resolve_model_path  # noqa: E402

PROMPT = [{"role": "user", "content": "Name a good houseplant for a dark room."}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    folder, gguf = resolve_model_path(default_policy_path())
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


def tiny_policy(tokenizer: Any, seed: int) -> PolicyModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return PolicyModel(LlamaForCausalLM(cfg).eval(), tokenizer, PolicySpec(base_model=f"tiny-llama-{seed}"))


class Publisher:
    def __init__(self, tokenizer: Any, store: CheckpointStore, registry: ModelRegistry, name: str) -> None:
        self.tokenizer, self.store, self.registry, self.name = tokenizer, store, registry, name

    def publish(self, version: str, seed: int) -> None:
        policy = tiny_policy(self.tokenizer, seed)
        ref = self.store.write(self.name, version, lambda d: policy.save(d), {"seed": seed})
        self.registry.publish(ModelVersion(name=self.name, version=version, uri=ref.uri, kind="policy"))


@pytest.fixture
def publisher(tmp_path: Path, redis_client: Any, tokenizer: Any) -> Publisher:
    name = f"policy-{uuid.uuid4().hex[:8]}"
    return Publisher(tokenizer, CheckpointStore(str(tmp_path / "ckpt")), ModelRegistry(redis_client), name)


async def _generate_load(client: ScorerClient, name: str, stop: asyncio.Event, out: list, failures: list,
                         stream: bool) -> None:
    while not stop.is_set():
        try:
            if stream:
                chunks = [c async for c in client.generate_stream(PROMPT, model=name, sampling=GREEDY)]
                text = "".join(c.delta for c in chunks)
                usage = chunks[-1].usage
                out.append((chunks[-1].model.version, text, usage.completion_tokens if usage else -1))
            else:
                res = await client.generate(PROMPT, model=name, sampling=GREEDY)
                out.append((res.model.version, res.choices[0].text, res.usage.completion_tokens))
        except Exception as e:  # noqa: BLE001 - counted: the test asserts there are none
            failures.append(repr(e))


def test_policy_ready_at_start_then_hot_swapped_under_load_and_rolled_back(publisher: Publisher,
                                                                           redis_url: str) -> None:
    publisher.publish("v000001", seed=1)
    name = publisher.name
    cfg = load_scorer_config(overrides={
        "port": 0, "reward_models": ["reward"], "policy_models": [name], "redis_url": redis_url,
        "poll_interval_s": 0.2, "discover_models": False, "max_new_tokens": 16, "default_new_tokens": 6,
    }, env={})

    async def main() -> None:
        scorer = Scorer(cfg)
        starting = asyncio.ensure_future(scorer.start())
        while scorer.handle is None or not scorer.handle.server:
            await asyncio.sleep(0.01)
        client = ScorerClient(f"127.0.0.1:{scorer.handle.port}")
        # Readiness: whenever health says SERVING, the policy is already loaded.
        while not await client.serving():
            assert not starting.done() or starting.exception() is None
            await asyncio.sleep(0.02)
        loaded = scorer.engine.serving(name)
        await starting
        try:
            assert loaded is not None and loaded.version == "v000001"

            first = await client.generate(PROMPT, model=name, sampling=GREEDY)
            assert (first.model.name, first.model.version) == (name, "v000001")
            v1_text = first.choices[0].text

            # Bad requests name their field; a reward model cannot generate.
            with pytest.raises(InvalidArgument) as e:
                await client.generate(PROMPT, model="reward")
            assert e.value.field == "model"
            with pytest.raises(InvalidArgument) as e:
                await client.generate(PROMPT, model=name, stop=["a", "b", "c", "d", "e"])
            assert e.value.field == "stop"

            # Seeded sampling is reproducible on one version.
            seeded = SamplingParams(temperature=1.0, max_tokens=8, seed=42)
            a = await client.generate(PROMPT, model=name, sampling=seeded, n=2)
            b = await client.generate(PROMPT, model=name, sampling=seeded, n=2)
            assert [c.text for c in a.choices] == [c.text for c in b.choices]

            # A GenerateBatch decodes as a batch of its own: the same seeded batch gives the same texts,
            # whatever else is being generated when it is sent.
            batch = [GenerateQuery(to_messages([{"role": "user", "content": f"Name {k} houseplants."}], "messages"),
                     model=name, sampling=SamplingParams(temperature=1.0, max_tokens=8, seed=k)) for k in range(5)]
            first_batch = await client.generate_batch(batch)
            others = [asyncio.create_task(client.generate(PROMPT, model=name, sampling=seeded, n=3)) for _ in range(3)]
            second_batch = await client.generate_batch(batch)
            await asyncio.gather(*others)
            assert [r.choices[0].text for r in first_batch] == [r.choices[0].text for r in second_batch]
            assert {r.model.version for r in first_batch + second_batch} == {"v000001"}
            with pytest.raises(InvalidArgument) as e:
                await client.generate_batch([batch[0], dataclasses.replace(batch[1], model="reward")])
            assert e.value.field == "requests[1].model"

            # Concurrent unary and streamed generation while v000002 is published.
            stop, out, failures = asyncio.Event(), [], []
            workers = [asyncio.create_task(_generate_load(client, name, stop, out, failures, stream=i % 2 == 1))
                       for i in range(4)]
            await asyncio.sleep(1.0)
            await asyncio.get_running_loop().run_in_executor(None, publisher.publish, "v000002", 2)
            for _ in range(300):
                if any(v == "v000002" for v, _, _ in out):
                    break
                await asyncio.sleep(0.1)
            served_at = len(out)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*workers)

            assert failures == []
            versions = [v for v, _, _ in out]
            assert "v000001" in versions and "v000002" in versions
            assert len(out) > served_at  # traffic continued after the swap
            assert all(v == "v000002" for v in versions[served_at + 4:])  # later requests all on the new one
            texts = {v: {t for vv, t, _ in out if vv == v} for v in ("v000001", "v000002")}
            assert texts["v000001"] == {v1_text}  # greedy: one answer per version, streamed or not
            assert len(texts["v000002"]) == 1 and texts["v000002"] != texts["v000001"]
            assert all(1 <= n <= 6 for _, _, n in out)

            # Rollback through the admin API serves v000001 again.
            status = await client.rollback(name, "integration test")
            assert status.serving_version == "v000001"
            back = await client.generate(PROMPT, model=name, sampling=GREEDY)
            assert back.model.version == "v000001" and back.choices[0].text == v1_text
        finally:
            await client.close()
            await scorer.stop(grace_s=1)

    asyncio.run(main())
