"""The seam between the continual machinery and what it trains: one ``Objective`` per model kind.

Everything around a training step is shared by every kind of model: the Kafka source and its
offsets, the replay reservoir, micro-batching, the optimiser, weight averaging, DDP on Ray Train,
checkpoints with a manifest written last, the gate's paired noise-aware rule, the registry and the
exactly-once commit.  What differs is owned here: which model type is loaded and saved, how records
become a batch and a loss, how a model is evaluated for the gate (pairwise accuracy with per-pair
outcomes, plus any guard of its own), and the registry kind.  ``trainer/objectives/reward.py`` is the
reward model; ``trainer/objectives/dpo.py`` the DPO policy.  A new objective is a new module here and
one entry in :func:`trainer.objectives.objective_for`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from services.kinds import ModelKind
from services.schemas import PreferenceRecord
from trainer.config import TrainerConfig
from trainer.evaluation import EvalResult


@dataclass(frozen=True)
class Batch:
    """What one step's loss needs: the objective's own tensors, plus accounting the machinery logs."""

    data: Any  # the objective's collated batch (moved to the device by ``to``)
    records: int
    sequences: int
    padded_tokens: int

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.data.to(device), self.records, self.sequences, self.padded_tokens)


class Objective(ABC):
    """How one kind of model is loaded, trained, evaluated, guarded and saved."""

    kind: ModelKind

    def __init__(self, cfg: TrainerConfig) -> None:
        self.cfg = cfg

    # -- the model -------------------------------------------------------------------------------

    @abstractmethod
    def default_base_model(self) -> str:
        """The embedded model this kind starts from when ``base_model`` is empty."""

    def resolved_base_model(self) -> str:
        return self.cfg.model.base_model or self.default_base_model()

    @abstractmethod
    def load(self, path: str) -> Any:
        """The model to train from a folder: the base model, a published version or our own checkpoint."""

    @abstractmethod
    def load_for_eval(self, path: str) -> Any:
        """A served version, loaded only to be evaluated against (the gate's comparison)."""

    @abstractmethod
    def module(self, model: Any) -> nn.Module:
        """The module whose forward the step calls (what DDP wraps)."""

    @abstractmethod
    def transformer(self, model: Any) -> nn.Module:
        """The Hugging Face model inside ``model`` (its config and attention implementation)."""

    @abstractmethod
    def parameters(self, model: Any) -> list[nn.Parameter]:
        """The parameters the optimiser updates (and the weight average tracks)."""

    @abstractmethod
    def save(self, model: Any, directory: Path) -> None:
        """The serving folder of ``model`` (what the scorer loads), written into ``directory``."""

    @abstractmethod
    def spec(self, model: Any) -> dict[str, Any]:
        """What the model is (base, lengths, heads), recorded in checkpoint metadata."""

    def base_of(self, model: Any) -> str:
        return str(self.spec(model).get("base_model", ""))

    @abstractmethod
    def loss_config(self) -> dict[str, Any]:
        """How the model was trained, recorded in checkpoint metadata."""

    # -- records and steps -----------------------------------------------------------------------

    def admit(self, model: Any, records: Sequence[PreferenceRecord]) -> dict[str, str]:
        """Per-record work done once when records arrive (e.g. reference log-probs); returns
        ``{record_id: reason}`` for records this objective cannot train on (they go to the dead letters)."""
        return {}

    def side_data(self, records: Sequence[PreferenceRecord]) -> Any:
        """What other DDP ranks need besides the records to take the same step (None: nothing)."""
        return None

    def accept_side_data(self, data: Any) -> None:
        """A rank > 0 receives :meth:`side_data` of the step it is about to take."""

    @abstractmethod
    def batch(self, model: Any, records: Sequence[PreferenceRecord], weights: Sequence[float] | None) -> Batch:
        """Collate ``records`` (loss ``weights``: None = equal) into this objective's batch."""

    @abstractmethod
    def loss(self, module: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward ``batch`` through ``module`` and return the loss and its logged parts (always with
        ``pair_accuracy``)."""

    # -- state carried by checkpoints ---------------------------------------------------------------

    def save_state(self, directory: Path, keep: Sequence[PreferenceRecord]) -> None:
        """Objective state a resumed trainer needs for the records it keeps (the replay reservoir)."""

    def load_state(self, directory: Path) -> None:
        """Read back :meth:`save_state` when resuming from a checkpoint."""

    # -- the gate ----------------------------------------------------------------------------------

    @abstractmethod
    def evaluate(self, model: Any, records: Sequence[PreferenceRecord], known: EvalResult | None = None) -> EvalResult:
        """Pairwise accuracy with per-pair outcomes in canonical order (the gate pairs on them), plus the
        numbers :meth:`guard` reads in ``EvalResult.metrics``.  ``known``: an earlier evaluation of the
        same version (its checkpoint's), whose generated replies may be reused where they still answer
        the same prompts the same way (``EvalResult.replies_key``)."""

    def use_registry(self, registry: Any) -> None:
        """The registry the gate publishes to, for guards that judge with another served model (the policy's
        reward guard); called once by the gate."""

    #: Whether :meth:`guard` can refuse a version (the learner then keeps weights to roll back to).
    guards: bool = False

    def unjudged(self, result: EvalResult | None, served: EvalResult | None = None) -> str:
        """A reason the guards cannot judge this version yet (too little held-out data, or a difference within
        its noise): it is not published and not rolled back; "" = it can be judged."""
        return ""

    def guard(self, result: EvalResult | None, served: EvalResult | None = None) -> str:
        """A reason to reject the version whatever its accuracy (drift, degeneration, shrinking replies);
        "" = none.  ``served``: the served version's evaluation on the same held-out set, when there is one."""
        return ""
