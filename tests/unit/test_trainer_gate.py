"""The paired, noise-aware evaluation gate: decide() against numbers worked out by hand, evaluate()'s
canonical pair order, and where the Gate gets the served model's per-pair outcomes.

The rule (trainer/gate.py): with b pairs only the served model gets right and c only the candidate,
over n pairs, d = (b - c) / n, SE = sqrt(b + c - (b - c)^2 / n) / n, reject iff d - z * SE > tolerance.
No Kafka or Redis: the Gate's registry is a stub that only answers ``target()``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from statistics import NormalDist

import pytest

from services.checkpoints import CheckpointStore
from services.config import ConfigError
from services.registry import ModelVersion
from services.reward_model import RewardModel
from services.schemas import ChatMessage, PreferenceRecord
from tests.unit.test_trainer_learner import tiny_model
from trainer.config import TrainerConfig, load_trainer_config, trainer_config
from trainer.evaluation import EvalResult, EvalSet, canonical_order, evaluate
from trainer.objectives import objective_for
from trainer.gate import Decision, Gate, PairedDrop, decide

Z90 = NormalDist().inv_cdf(0.9)  # 1.2816


def outcomes(both: int, served_only: int, candidate_only: int, neither: int) -> tuple[str, str]:
    """(served, candidate) per-pair outcome strings with the given agreement counts."""
    served = "1" * both + "1" * served_only + "0" * candidate_only + "0" * neither
    candidate = "1" * both + "0" * served_only + "1" * candidate_only + "0" * neither
    return served, candidate


def result(candidate: str) -> EvalResult:
    return EvalResult(accuracy=candidate.count("1") / len(candidate), pairs=len(candidate), records=len(candidate),
                      mean_margin=0.1, fingerprint="f", outcomes=candidate)


def gate(served: str, candidate: str, **kw) -> Decision:
    kw = {"tolerance": 0.02, "publish_without_eval": True, "confidence": 0.9, **kw}
    return decide(result(candidate), "v000001", served.count("1") / len(served), served_outcomes=served, **kw)


# --- decide() -----------------------------------------------------------------------------------


def test_paired_drop_by_hand() -> None:
    served, candidate = outcomes(both=40, served_only=6, candidate_only=4, neither=14)
    p = PairedDrop.of(served, candidate)
    assert (p.n, p.b, p.c) == (64, 6, 4)
    assert p.drop == pytest.approx(2 / 64)  # 46/64 - 44/64
    assert p.se == pytest.approx((10 - 4 / 64) ** 0.5 / 64)  # sqrt(9.9375)/64 = 0.049256
    assert PairedDrop.of("1111", "1111").se == 0.0  # the two models agree everywhere: no noise


def test_a_noisily_lower_candidate_on_64_pairs_is_published() -> None:
    # The demo's case: 0.6875 vs 0.7188 on 64 pairs, 2 pairs apart, which the old rule rejected.
    served, candidate = outcomes(both=40, served_only=6, candidate_only=4, neither=14)
    d = gate(served, candidate)
    # d = 0.03125, SE = 0.049256, bound = 0.03125 - 1.2816 * 0.049256 = -0.03187 <= 0.02
    assert d.publish, d.reason
    for number in ("0.6875", "0.7188", "drop 0.0312", "SE 0.0493", "lower bound -0.0319", "on 64 pairs",
                   "gate_confidence 0.9 (z=1.28)", "gate_tolerance is 0.02", "6 pairs only the served", "4 only"):
        assert number in d.reason, (number, d.reason)
    assert not gate(served, candidate, confidence=0.5).publish  # the old rule: 0.03125 > 0.02


def test_a_clearly_worse_candidate_is_rejected() -> None:
    # 1000 pairs, 0.80 -> 0.70: d = 0.1, SE = sqrt(200 - 10000/1000)/1000 = 0.013784,
    # bound = 0.1 - 1.2816 * 0.013784 = 0.08234 > 0.02
    served, candidate = outcomes(both=650, served_only=150, candidate_only=50, neither=150)
    d = gate(served, candidate)
    assert not d.publish
    assert "pairwise accuracy 0.7000 is 0.1000 below the served version v000001 (0.8000) on 1000 pairs" in d.reason
    assert "SE 0.0138" in d.reason and "lower bound 0.0823" in d.reason and "gate_tolerance is 0.02" in d.reason
    # a real regression is caught on 64 pairs too: b=10, c=0 gives d = 0.15625, SE = 0.045387, bound 0.0981
    served, candidate = outcomes(both=36, served_only=10, candidate_only=0, neither=18)
    small = gate(served, candidate)
    assert not small.publish and "lower bound 0.0981" in small.reason


def test_the_bound_sits_where_the_formula_puts_it() -> None:
    served, candidate = outcomes(both=40, served_only=6, candidate_only=4, neither=14)
    bound = 2 / 64 - Z90 * (10 - 4 / 64) ** 0.5 / 64
    assert not gate(served, candidate, tolerance=bound - 1e-6).publish
    assert gate(served, candidate, tolerance=bound + 1e-6).publish


@pytest.mark.parametrize("seed", range(5))
def test_confidence_one_half_is_the_old_rule(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        n = rng.randint(1, 80)
        served = "".join(rng.choice("01") for _ in range(n))
        candidate = "".join(rng.choice("01") for _ in range(n))
        served_acc, cand = served.count("1") / n, result(candidate)
        tolerance = rng.choice([0.0, 0.02, 0.05, 1 / 64, 2 / 64])
        old = not (served_acc - cand.accuracy > tolerance + 1e-12)
        paired = decide(cand, "v1", served_acc, served_outcomes=served, tolerance=tolerance,
                        publish_without_eval=True, confidence=0.5)
        assert paired.publish == old, (served, candidate, tolerance, paired.reason)
        assert "z=0.00" in paired.reason


def test_without_served_outcomes_the_gate_falls_back_to_the_unpaired_rule() -> None:
    served, candidate = outcomes(both=40, served_only=6, candidate_only=4, neither=14)
    cand = result(candidate)
    d = decide(cand, "v000001", 46 / 64, tolerance=0.02, publish_without_eval=True, confidence=0.9)
    assert not d.publish  # the old rule: 0.03125 > 0.02, whatever the confidence
    assert "0.0312 below the served version v000001 (0.7188) on 64 pairs" in d.reason
    assert "unpaired comparison: no per-pair outcomes of the served version" in d.reason
    ok = decide(cand, "v000001", 0.70, tolerance=0.02, publish_without_eval=True)
    assert ok.publish and "unpaired" in ok.reason and "drop 0.0125" in ok.reason
    # outcomes that do not line up with the candidate's pairs (another set, a truncated string)
    short = decide(cand, "v000001", 46 / 64, served_outcomes=served[:-1], tolerance=0.02, publish_without_eval=True)
    assert not short.publish and "do not line up" in short.reason
    # a candidate result without outcomes (built by hand, an old caller) is compared unpaired too
    bare = EvalResult(accuracy=44 / 64, pairs=64, records=64, mean_margin=0.0, fingerprint="f")
    assert "unpaired" in decide(bare, "v1", 46 / 64, served_outcomes=served, tolerance=0.02,
                                publish_without_eval=True).reason


def test_first_version_and_no_evaluation_records() -> None:
    cand = result("1101")
    first = decide(cand, "", None, tolerance=0.0, publish_without_eval=False)
    assert first.publish and first.reason == "first version (pairwise accuracy 0.7500)"
    assert decide(None, "v1", 0.7, served_outcomes="1", tolerance=0.0, publish_without_eval=True).publish
    held = decide(None, "v1", 0.7, tolerance=0.0, publish_without_eval=False)
    assert not held.publish and "no evaluation records" in held.reason
    empty = EvalResult(accuracy=0.0, pairs=0, records=0, mean_margin=0.0, fingerprint="f")
    assert not decide(empty, "v1", 0.7, tolerance=0.0, publish_without_eval=False).publish


def test_gate_confidence_is_validated() -> None:
    assert trainer_config().gate.gate_confidence == 0.9
    assert load_trainer_config(overrides={"gate_confidence": "0.5"}, env={}).gate.gate_confidence == 0.5
    for bad in ("1", "0.4", "nan"):
        with pytest.raises(ConfigError, match="^gate_confidence: .*0.5 <= gate_confidence < 1"):
            load_trainer_config(overrides={"gate_confidence": bad}, env={})


# --- evaluate(): per-pair outcomes in a canonical order ---------------------------------------------

RESPONSES = ["yes , here is a clear and helpful answer", "sure , this works well", "no", "i do not know",
             "go away", "great question , the answer is simple", "maybe later", "ask someone else"]


def eval_records(n: int, k: int = 3) -> list[PreferenceRecord]:
    rng = random.Random(1)
    return [PreferenceRecord(record_id=f"e{i:02d}", prompt=(ChatMessage("user", f"question number {i}"),),
                             ranked_responses=tuple(rng.sample(RESPONSES, k)), split="test") for i in range(n)]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> RewardModel:
    return RewardModel.from_pretrained(tiny_model(tmp_path_factory.mktemp("gate")))


def test_evaluate_outcomes_do_not_depend_on_the_order_of_the_records(model: RewardModel) -> None:
    records = eval_records(12)
    base = evaluate(model, records, batch_size=8)
    assert base.pairs == 36 and len(base.outcomes) == 36 and set(base.outcomes) <= {"0", "1"}
    assert base.accuracy == base.outcomes.count("1") / 36
    for seed in range(3):
        shuffled = records[:]
        random.Random(seed).shuffle(shuffled)
        again = evaluate(model, shuffled, batch_size=8)
        assert again.outcomes == base.outcomes and again.fingerprint == base.fingerprint
        assert again.accuracy == base.accuracy


def test_evaluate_lists_pairs_by_record_id_then_i_j(model: RewardModel) -> None:
    records = eval_records(5, k=4)
    records.reverse()
    ordered = canonical_order(records)
    assert [r.record_id for r in ordered] == ["e00", "e01", "e02", "e03", "e04"]
    rows = [(r.prompt, resp) for r in ordered for resp in r.ranked_responses]
    scores = [s.reward for s in model.score([p for p, _ in rows], [x for _, x in rows], batch_size=8)]
    expected = "".join("1" if scores[4 * n + i] > scores[4 * n + j] else "0"
                       for n in range(5) for i in range(4) for j in range(i + 1, 4))
    assert evaluate(model, records, batch_size=8).outcomes == expected


def test_eval_result_round_trips_through_metadata() -> None:
    r = EvalResult(accuracy=0.5, pairs=4, records=2, mean_margin=0.25, fingerprint="abc", outcomes="1010")
    d = json.loads(json.dumps(r.to_dict()))
    assert {"accuracy", "pairs", "records", "mean_margin", "eval_fingerprint", "outcomes"} == set(d)
    assert EvalResult.from_dict(d) == r
    old = {k: v for k, v in d.items() if k != "outcomes"}  # metadata written before outcomes existed
    assert EvalResult.from_dict(old).outcomes == ""
    assert EvalResult.from_dict({**d, "outcomes": "10"}).outcomes == ""  # does not fit pairs: dropped
    with pytest.raises(ValueError):
        EvalResult.from_dict({**d, "accuracy": "high"})
    spoken = dataclasses.replace(r, replies=("a", ""), replies_key="k1")  # a policy's guard replies travel too
    assert EvalResult.from_dict(json.loads(json.dumps(spoken.to_dict()))) == spoken
    assert EvalResult.from_dict({**spoken.to_dict(), "replies": [1, 2]}).replies == ()  # malformed: dropped
    scored = dataclasses.replace(spoken, rewards=(0.25, -1.5), rewards_judge="reward@v3")  # and the judge's scores
    assert EvalResult.from_dict(json.loads(json.dumps(scored.to_dict()))) == scored
    assert EvalResult.from_dict({**scored.to_dict(), "rewards": [0.25]}).rewards == ()  # one per reply, or none
    assert "rewards" not in scored.to_dict(outcomes=False)


# --- Gate.served(): the served model's outcomes, from metadata or by loading it ------------------------


class TargetOnly:
    """The one registry call Gate.served() makes."""

    def __init__(self, target: ModelVersion) -> None:
        self._target = target

    def target(self, name: str) -> ModelVersion:
        return self._target


def served_checkpoint(tmp_path, model: RewardModel, eval_meta: dict | None) -> tuple[TrainerConfig, ModelVersion]:
    cfg = trainer_config(model_name="gate", max_length=64, checkpoint_url=str(tmp_path / "ckpt"))
    store = CheckpointStore(cfg.checkpoint.checkpoint_url)
    ref = store.write("gate", "v000001", model.save, {"eval": eval_meta})
    return cfg, ModelVersion(name="gate", version="v000001", uri=ref.uri)


def test_served_outcomes_come_from_the_served_metadata(tmp_path, model: RewardModel) -> None:
    eval_set = EvalSet(16, eval_records(6))
    recorded = evaluate(model, eval_set.records, batch_size=8)
    # outcomes that differ from what the model would give: proof they were read, not recomputed
    flipped = "".join("0" if o == "1" else "1" for o in recorded.outcomes)
    meta = {**recorded.to_dict(), "accuracy": flipped.count("1") / recorded.pairs, "outcomes": flipped}
    cfg, target = served_checkpoint(tmp_path, model, meta)
    gate = Gate(cfg, TargetOnly(target), eval_set, objective_for(cfg))
    version, served = gate.served()
    assert version == target and served.outcomes == flipped
    assert gate.served()[1] is served  # cached with its outcomes


def test_a_grown_eval_set_evaluates_the_served_version_again_lending_it_its_own_evaluation(tmp_path,
                                                                                         model: RewardModel) -> None:
    recorded = evaluate(model, eval_records(4), batch_size=8)  # published when the held-out set was smaller
    cfg, target = served_checkpoint(tmp_path, model, recorded.to_dict())
    objective = objective_for(cfg)
    lent, real = [], objective.evaluate
    objective.evaluate = lambda m, recs, known=None: lent.append(known) or real(m, recs, known)
    grown = EvalSet(16, eval_records(6))
    _, served = Gate(cfg, TargetOnly(target), grown, objective).served()
    assert served.fingerprint == grown.fingerprint and served.pairs > recorded.pairs
    assert lent == [EvalResult.from_dict(recorded.to_dict())]  # what still holds of it may be reused


def test_metadata_without_outcomes_loads_the_served_checkpoint(tmp_path, model: RewardModel) -> None:
    eval_set = EvalSet(16, eval_records(6))
    recorded = evaluate(model, eval_set.records, batch_size=8)
    old = {k: v for k, v in recorded.to_dict().items() if k != "outcomes"}
    cfg, target = served_checkpoint(tmp_path, model, old)
    _, served = Gate(cfg, TargetOnly(target), eval_set, objective_for(cfg)).served()
    assert served.outcomes == recorded.outcomes and served.accuracy == pytest.approx(recorded.accuracy)

    # ... and when that checkpoint cannot be loaded either, the accuracy alone: decide() goes unpaired
    (tmp_path / "ckpt" / "gate" / "v000001" / "model.safetensors").write_bytes(b"corrupt")
    _, accuracy_only = Gate(cfg, TargetOnly(target), eval_set, objective_for(cfg)).served()
    assert accuracy_only.outcomes == "" and accuracy_only.accuracy == recorded.accuracy
    d = decide(recorded, "v000001", accuracy_only.accuracy, served_outcomes=accuracy_only.outcomes,
               tolerance=0.0, publish_without_eval=True)
    assert d.publish and "unpaired comparison: no per-pair outcomes of the served version" in d.reason
