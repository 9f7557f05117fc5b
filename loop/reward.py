"""The reward model the criteria loop serves beside the policy: the tie breaker of rule criteria and the
judge of reply quality (``quality_win_rate_vs_base``).

By default it is the embedded MiniLM reward backbone trained once on the shared HH-RLHF pairs with the
trainer's own offline path, and cached outside the repository (keyed by the data file's content and
the settings), so later runs start in seconds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from services.policy_model import default_model_cache

#: Settings of the cached reward model (the CLI defaults of `prefstream train reward`, bf16 where native).
REWARD_SETTINGS = {"model_kind": "reward", "max_length": 256, "epochs": 1, "batch_size": 16, "autocast": "auto",
                   "seed": 0}


def _key(data: str) -> str:
    h = hashlib.sha256(Path(data).read_bytes())
    h.update(json.dumps(REWARD_SETTINGS, sort_keys=True).encode())
    return h.hexdigest()[:12]


def cached_reward_model(data: str, *, say: Callable[[str], None] = print) -> Path:
    """A reward model folder trained on ``data`` (OpenPipe JSONL), trained now unless cached."""
    folder = default_model_cache() / f"reward-{Path(data).stem}-{_key(data)}"
    if (folder / "config.json").exists():
        return folder
    from services.data import load_openpipe_jsonl
    from trainer.config import trainer_config
    from trainer.offline import save_offline, train_offline

    records = load_openpipe_jsonl(data)
    say(f"training the loop's reward model on {len(records)} pairs from {data} (once; cached in {folder}) ...")
    cfg = trainer_config(**REWARD_SETTINGS)
    learner, result = train_offline(cfg, records)
    tmp = folder.with_name(folder.name + ".tmp")
    with learner.serving_weights():
        save_offline(learner, cfg, result, tmp, data)
    tmp.rename(folder)
    say(f"reward model trained in {result.seconds:.0f} s")
    return folder


def publish_reward_model(folder: Path, *, name: str, checkpoint_url: str, redis_url: str) -> str:
    """Write ``folder`` into the checkpoint store as a new version of ``name`` and publish it
    (through the trainer's own gate, with no evaluation records: it is the first version)."""
    from trainer.config import trainer_config
    from trainer.learner import Learner
    from trainer.objectives import objective_for
    from trainer.offline import OfflineResult, load_base, publish_offline

    cfg = trainer_config(model_kind="reward", base_model=str(folder), model_name=name, checkpoint_url=checkpoint_url,
                         redis_url=redis_url, announce=False, publish_without_eval=True)
    objective = objective_for(cfg)
    learner = Learner(objective, load_base(cfg, objective), cfg)
    version, verdict = publish_offline(cfg, learner, OfflineResult(), data=str(folder))
    if not verdict.startswith("published"):
        raise RuntimeError(f"the reward model {folder} was not published: {verdict}")
    return version


__all__ = ["REWARD_SETTINGS", "cached_reward_model", "publish_reward_model"]
