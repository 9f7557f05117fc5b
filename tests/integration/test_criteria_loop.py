"""The criteria loop end to end on the real stack, short: a criterion defined only in a YAML file is
created, best-of-N requests with it are stored through the gateway's OpenAI route, their criteria
feedback becomes preference records on Kafka, the continual DPO trainer publishes a policy version
built from them, the scorer serves it, and the loop measures the served policy before and after.

The policy is the unit tests' tiny random Llama over SmolLM2's tokenizer, so the run takes about a
minute; `bench criteria-loop` runs the same code on the embedded SmolLM2-135M.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.unit.test_policy_lm import smollm_tokenizer_dir, tiny_base  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration


def test_a_short_loop_publishes_a_policy_trained_on_criteria_feedback_and_serves_it(
        tmp_path: Path, tiny_base: Path, stack, redis_client) -> None:  # noqa: F811
    from loop.config import load_loop_config
    from loop.run import run_criteria_loop
    from services.checkpoints import CheckpointStore
    from services.criteria_store import CriteriaStore
    from services.registry import ModelRegistry
    from tests.integration.test_trainer import trained_ids

    tag = uuid.uuid4().hex[:6]
    name = f"short{tag}"
    (tmp_path / "short.yaml").write_text(f"name: {name}\nrules:\n  - max_words: 7\n")
    (tmp_path / "train.txt").write_text("\n".join(f"Tell me about topic {i}." for i in range(40)))
    (tmp_path / "eval.txt").write_text("\n".join(f"Explain idea {i}." for i in range(4)))
    policy = f"loop-policy-{tag}"
    cfg = load_loop_config(env={}, overrides={
        "criteria": [str(tmp_path / "short.yaml")], "prompts": str(tmp_path / "train.txt"),
        "eval_prompts": str(tmp_path / "eval.txt"), "system_prompt": "", "train_prompts": 40, "eval_count": 4,
        "phase_s": 120, "min_versions": 1, "gate_every": 0, "candidates": 4, "temperature": 1.0, "max_tokens": 10,
        "concurrency": 2, "policy_model": policy, "policy_base": str(tiny_base), "reward_checkpoint": "",
        "lr": 5e-3, "beta": 0.5, "batch_size": 4, "checkpoint_every_records": 8, "max_kl": 50.0, "max_length": 64,
        "run_dir": str(tmp_path / "run"), "stack_run_dir": str(stack.cfg.run_path),
        "topic_prefix": f"loop{tag}.", "drain_timeout_s": 120, "startup_timeout_s": 240, "project": f"p{tag}",
    })
    summary = run_criteria_loop(cfg, write_html=True)

    assert summary["failed_requests"] == 0, summary["errors"]
    assert summary["best_of_n_stored"] == summary["best_of_n_sent"] > 0
    assert summary["versions_published"] >= 1, summary["rejections"]
    final = summary["final_version"]
    assert final != "base" and summary["evaluations"][-1]["versions"] == {final: 4}  # the served version was measured
    # with the gate's verdict (gate_every 0: no held-out records, so no guard numbers beside it)
    assert summary["gate_metrics"][final]["state"] == "published"
    assert summary["evaluations"][0]["version"] == "base"
    for e in summary["evaluations"]:  # every reading has the length spread and the share max_tokens cut off
        assert set(e["words"]) == {"p10", "p50", "p90"} and 0.0 <= e["cut_off"] <= 1.0
        assert len(e["replies_digest"]) == 16 and e["eval_s"] > 0  # measured alone (eval_alone), timed
    assert summary["settings"]["eval_alone"] is True and summary["held_for_evaluation_s"] > 0
    assert 0.0 <= summary["violation_rate_base"] <= 1.0 and 0.0 <= summary["violation_rate_final"] <= 1.0
    assert Path(summary["report"]).is_file()
    # paced on the trainer's real backlog (Kafka end offsets minus its consumed counter), counted per version
    assert summary["max_backlog"] == 16 and summary["peak_trainer_backlog"] is not None
    per_version = summary["candidates_per_version"]
    assert sum(v["requests"] for v in per_version.values()) == summary["best_of_n_stored"]
    assert "base" in per_version and all(v["candidates"] == 4 * v["requests"] for v in per_version.values())

    # what the published version learnt from is criteria feedback, tagged with the criterion's version
    criterion = CriteriaStore(redis_client).get(f"p{tag}", name)
    assert summary["criteria"] == [criterion.ref]
    store = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    target = ModelRegistry(redis_client).target(policy)
    # the trainer may publish once more after the loop's last measurement (the rest of the drained stream)
    assert target is not None and target.kind == "policy" and target.version >= final
    trained = trained_ids(store, policy)
    assert trained, "the published version trained on no record"
    records = preference_records(stack, f"loop{tag}.")
    assert set(trained) <= {r.record_id for r in records}
    assert all(r.source_kind == "criteria" and f"criterion:{criterion.ref}" in r.source_event_ids for r in records)


def preference_records(stack, prefix: str) -> list:
    from demo.monitor import read_topic
    from prefstream.events.v1.events_pb2 import PreferenceRecord as PreferenceRecordProto
    from services.codec import decode_event
    from services.schemas import PreferenceRecord
    from services.topics import PREFERENCES, topic_name

    return [PreferenceRecord.from_proto(decode_event(raw, PreferenceRecordProto))
            for raw in read_topic(stack.endpoints.kafka_bootstrap, topic_name(PREFERENCES, prefix))]
