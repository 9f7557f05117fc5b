"""The served reward model, as the policy gate's judge of reply quality (the reward guard).

A policy trainer reads the registry for the version of a reward model that is served now, loads that
checkpoint once (again when the registry serves another version) and scores the replies the gate's
guards sampled.  The judge is the reward model users already trust to pick best-of-N winners, so a
policy version it calls worse than the base policy is not served (``DPOSettings.reward_guard``).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from services.checkpoints import CorruptCheckpointError, open_checkpoint
from services.errors import PrefstreamError
from services.registry import ModelRegistry

log = logging.getLogger(__name__)


class ServedReward:
    """``score(prompts, replies)``: the served version of reward model ``name`` and its score of each reply."""

    def __init__(self, registry: ModelRegistry, name: str) -> None:
        self.registry = registry
        self.name = name
        self._loaded: tuple[str, Any] | None = None  # (version, RewardModel)
        self._warned = ""

    def _warn_once(self, message: str) -> None:
        if message != self._warned:
            log.warning("reward guard off for now: %s", message)
            self._warned = message

    def _model(self) -> tuple[str, Any] | None:
        try:
            target = self.registry.target(self.name)
        except (OSError, PrefstreamError, ConnectionError) as e:
            self._warn_once(f"the registry cannot be read ({e})")
            return None
        if target is None:
            self._warn_once(f"no version of the reward model {self.name!r} is served")
            return None
        if self._loaded is None or self._loaded[0] != target.version:
            from services.reward_model import RewardModel

            try:
                path = open_checkpoint(target.uri)
                model = RewardModel.from_pretrained(str(path), dtype="float32")
            except (CorruptCheckpointError, OSError, ValueError) as e:
                self._warn_once(f"the served reward model {self.name}@{target.version} cannot be loaded ({e})")
                return None
            self._loaded = (target.version, model)
            log.info("reward guard: judging replies with %s@%s", self.name, target.version)
        return self._loaded

    def score(self, prompts: Sequence[Sequence[Any]], replies: Sequence[str]) -> tuple[str, list[float]] | None:
        """(``name@version``, one score per reply), or None while no version can judge (logged once)."""
        loaded = self._model()
        if loaded is None:
            return None
        version, model = loaded
        return f"{self.name}@{version}", [s.reward for s in model.score(prompts, replies)]


__all__ = ["ServedReward"]
