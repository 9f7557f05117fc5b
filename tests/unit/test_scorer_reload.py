"""Hot swaps without a full reload: a new version's weights copied into a retired copy of the same
model serve exactly what a fresh load of that version serves; anything else needs a full load."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from scorer.runners import (
    CheckpointRefused,
    NotReloadable,
    checkpoint_signature,
    load_reward,
    load_weights_in_place,
    open_published,
)
from services.checkpoints import CheckpointStore
from services.reward_model import SPEC_FILE, RewardModel
from services.schemas import ChatMessage

PROMPT = [ChatMessage("user", "How do I keep basil alive indoors?")]
REPLIES = ["Give it a sunny window and water when the soil is dry.", "No idea.", "Basil " * 40]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Three checkpoints of one model (different weights), their store and the base model."""
    store = CheckpointStore(str(tmp_path_factory.mktemp("ckpt")))
    model = RewardModel.from_pretrained(max_length=128)
    uris = []
    torch.manual_seed(0)
    for i in range(3):
        with torch.no_grad():  # a different head and a different first layer each time
            model.hf_model.classifier.bias.fill_(float(i))
            for p in model.hf_model.base_model.encoder.layer[0].parameters():
                p.add_(0.01 * torch.randn_like(p))
        uris.append(store.write("reward", f"v{i}", lambda d: model.save(d), {}).uri)
    return store, uris, model


def scores(runner):
    return [reward for reward, _ in runner.run_batch(runner.encode(PROMPT, REPLIES))]


def load(uri):
    return load_reward(open_published(uri), device="cpu", dtype="auto", warmup=True, max_length=128)


def test_reloaded_weights_score_exactly_as_a_fresh_load(published):
    _, uris, _ = published
    runner = load(uris[0])
    first = scores(runner)
    timings: dict[str, float] = {}
    assert runner.reload(open_published(uris[1]), warmup=True, timings=timings) is runner
    assert set(timings) == {"load", "warmup"}
    fresh = load(uris[1])
    assert scores(runner) == scores(fresh)  # bit-equal, fast path (re-packed weights) included
    assert scores(runner) != first
    assert runner.cpu_fast_path == fresh.cpu_fast_path
    runner.reload(open_published(uris[2]), warmup=True)  # and again: the copy can be reused forever
    assert scores(runner) == scores(load(uris[2]))


def test_the_signature_ignores_weights_and_manifest_only(published, tmp_path):
    store, uris, model = published
    a, b = (open_published(u) for u in uris[:2])
    assert checkpoint_signature(a) == checkpoint_signature(b)
    other = tmp_path / "other"
    model.save(other)
    spec = json.loads((other / SPEC_FILE).read_text())
    spec["spec"]["max_length"] = 64
    (other / SPEC_FILE).write_text(json.dumps(spec))
    assert checkpoint_signature(other) != checkpoint_signature(a)
    runner = load(uris[0])
    with pytest.raises(NotReloadable, match="config, tokenizer or spec"):
        runner.reload(str(other), warmup=True)


def test_tensors_that_do_not_match_are_refused_before_anything_is_copied(published, tmp_path):
    from safetensors.torch import load_file, save_file

    _, uris, _ = published
    src = open_published(uris[1])
    runner = load(uris[0])
    before = scores(runner)
    weights = load_file(f"{src}/model.safetensors")

    def attempt(tensors):
        d = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"))
        with pytest.raises(NotReloadable):
            load_weights_in_place(runner.model.hf_model, d)

    attempt({**weights, "extra.weight": torch.zeros(2)})  # a tensor the model does not have
    attempt({k: v for k, v in weights.items() if not k.startswith("classifier")})  # the head is missing
    attempt({**weights, "classifier.bias": torch.zeros(7)})  # another shape
    assert scores(runner) == before  # nothing was copied


def test_non_finite_weights_are_refused_by_the_warm_up(published, tmp_path):
    store, uris, model = published
    runner = load(uris[0])
    with torch.no_grad():
        model.hf_model.classifier.bias.fill_(float("nan"))
    bad = store.write("reward", "nan", lambda d: model.save(d), {}).uri
    with pytest.raises(CheckpointRefused) as e:
        runner.reload(open_published(bad), warmup=True)
    assert e.value.reason == "nonfinite"


def test_a_closed_model_is_freed_at_once_without_a_garbage_collection(published):
    """Why runners never call gc.collect() (a ~0.2 s GIL hold in a serving process)."""
    _, uris, _ = published
    runner = load(uris[0])
    model, param = weakref.ref(runner.model.hf_model), weakref.ref(next(runner.model.hf_model.parameters()))
    gc.disable()
    try:
        runner.close()
        assert model() is None and param() is None  # no reference cycle keeps it alive
    finally:
        gc.enable()


def test_trainer_checkpoints_reload_in_place_despite_their_per_checkpoint_state(published, tmp_path):
    """A trainer's checkpoints differ in metadata, replay and live weights every time; only the model
    files decide (and live_weights.safetensors is never taken for the served weights)."""
    from safetensors.torch import save_file

    store, uris, model = published
    folders = []
    for i in range(2):
        d = tmp_path / f"trainer-v{i}"
        with torch.no_grad():
            model.hf_model.classifier.bias.fill_(10.0 + i)
        model.save(d)
        (d / "metadata.json").write_text(json.dumps({"step": i, "records": [{"record_id": f"r{i}"}]}))
        (d / "replay.jsonl").write_text(f'{{"n": {i}}}\n')
        # live weights with the model's own names: were they loaded, the bias below would be served
        save_file({k: torch.full_like(v, 99.0) for k, v in model.hf_model.state_dict().items()},
                  str(d / "live_weights.safetensors"))
        folders.append(d)
    assert checkpoint_signature(folders[0]) == checkpoint_signature(folders[1])
    runner = load_reward(str(folders[0]), device="cpu", dtype="auto", warmup=True, max_length=128)
    runner.reload(str(folders[1]), warmup=True)
    assert scores(runner) == scores(load_reward(str(folders[1]), device="cpu", dtype="auto", warmup=True, max_length=128))


def test_the_scorer_ignores_exactly_the_files_the_trainer_writes_as_training_state():
    from services.checkpoints import METADATA, TRAINING_STATE_FILES
    from trainer.checkpointing import LIVE_WEIGHTS_FILE, OPTIMIZER_FILE
    from trainer.evaluation import EVAL_FILE
    from trainer.offline import TRAINING_FILE
    from trainer.replay import REPLAY_COUNTS_FILE, REPLAY_FILE

    assert TRAINING_STATE_FILES == {METADATA, OPTIMIZER_FILE, LIVE_WEIGHTS_FILE, EVAL_FILE, TRAINING_FILE,
                                    REPLAY_FILE, REPLAY_COUNTS_FILE}
