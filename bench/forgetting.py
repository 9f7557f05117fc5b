"""Forgetting on a shifting stream: what replay buys a continual reward model, and what it costs.

The stationary benchmark (hh_helpful_train_2k in random order) cannot show why the trainer replays:
there every record is like the next, replay only trains the stream a second time, and a reward model
over-fits a second pass.  Production feedback shifts (a new feature, a new kind of user), so this part
streams the same 2000 pairs **topic by topic**:

* the prompts are split into two topics by spherical 2-means over the base encoder's mean-pooled
  embedding of the first user turn (initialised on the leading singular vector, so the split is
  deterministic; on HH helpful it separates practical how-to requests from factual and opinion
  questions, about 1000 pairs each); test pairs go to the nearer centroid;
* the larger topic streams first (phase 1), then the other (phase 2), through the same continual loop
  as the streaming arm (:func:`bench.arms.stream_phases`);
* after each phase every arm is evaluated on each topic's test pairs.  ``forgetting`` is the accuracy
  on topic 1's test pairs right after phase 1 minus at the end: the same pairs, the same model lineage,
  so only what phase 2 undid.  ``accuracy`` is the end accuracy on all test pairs.

Arms differ only in their replay settings (``replay_ratio``, ``replay_weight``); one of them is the
trainer's defaults.
"""

from __future__ import annotations

import dataclasses
import logging
from statistics import fmean
from typing import Any, Sequence

import torch

from services.config import replace as config_replace
from bench.arms import paired_diff, stream_phases

log = logging.getLogger(__name__)


def first_user_turn(record: Any) -> str:
    fallback = record.prompt[0].content if record.prompt else ""
    return next((m.content for m in record.prompt if m.role == "user"), fallback)


@torch.inference_mode()
def embed_prompts(model_path: str, records: Sequence[Any], batch_size: int = 64, max_length: int = 64) -> torch.Tensor:
    """Unit-length mean-pooled hidden states of each record's first user turn, ``# (N, H)``."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModel.from_pretrained(model_path).eval()
    encoder = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model
    out = []
    for i in range(0, len(records), batch_size):
        enc = tok([first_user_turn(r) for r in records[i:i + batch_size]], truncation=True, max_length=max_length,
                  padding=True, return_tensors="pt")
        out_b = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        hidden = out_b.last_hidden_state  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))  # (B, H)
    return torch.cat(out).float()


def two_means(points: torch.Tensor, iterations: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical 2-means of unit vectors ``# (N, H)``: (labels ``# (N,)`` in {0, 1}, centroids ``# (2, H)``).

    Initialised by the sign of the projection on the leading singular vector of the centred points
    (an exact SVD, so the same data always gives the same split), then Lloyd iterations on cosine
    similarity until no label changes.  Label 0 is the larger cluster.
    """
    if points.dim() != 2 or points.shape[0] < 2:
        raise ValueError(f"need (N >= 2, H) points, got {tuple(points.shape)}")
    centred = points - points.mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]  # (H,)
    labels = (centred @ direction > 0).long()
    centroids = points.new_zeros(2, points.shape[1])
    for _ in range(iterations):
        for k in (0, 1):
            members = points[labels == k]
            centroids[k] = torch.nn.functional.normalize(members.mean(0), dim=0) if len(members) else -centroids[1 - k]
        new = (points @ centroids.T).argmax(1)
        if torch.equal(new, labels):
            break
        labels = new
    if int((labels == 1).sum()) > int((labels == 0).sum()):
        labels, centroids = 1 - labels, centroids.flip(0)
    return labels, centroids


def nearest(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the most similar centroid for each unit vector, ``# (N,)``."""
    return (points @ centroids.T).argmax(1)


def topic_split(model_path: str, train: Sequence[Any], test: Sequence[Any]) -> dict[str, Any]:
    """Train records as [topic 1, topic 2] phases (stream order kept within each), test records likewise."""
    train_labels, centroids = two_means(embed_prompts(model_path, train))
    test_labels = nearest(embed_prompts(model_path, test), centroids)
    phases = [[r for r, t in zip(train, train_labels.tolist()) if t == k] for k in (0, 1)]
    tests = [[r for r, t in zip(test, test_labels.tolist()) if t == k] for k in (0, 1)]
    return {"phases": phases, "tests": tests,
            "examples": [[first_user_turn(r)[:80] for r in p[:3]] for p in phases]}


def run_arm(cfg: Any, phases: Sequence[Sequence[Any]], tests: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """Stream ``phases`` one after the other; accuracy on each topic's tests after each phase."""
    from trainer.evaluation import evaluate

    after: list[list[float]] = []

    def evaluate_topics(learner: Any) -> None:
        with learner.serving_weights():
            after.append([evaluate(learner.model, t, cfg.gate.eval_batch_size).accuracy for t in tests])

    learner, stats = stream_phases(cfg, phases, after_phase=evaluate_topics)
    sizes = [len(t) for t in tests]
    end = sum(a * n for a, n in zip(after[-1], sizes)) / sum(sizes)
    return {"accuracy": end, "accuracy_by_topic_after_phase": after, "forgetting": after[0][0] - after[-1][0],
            **stats}


def run(cfg: Any, train: Sequence[Any], test: Sequence[Any], arms: dict[str, dict[str, Any]],
        seeds: Sequence[int]) -> dict[str, Any]:
    """Every arm (name -> config overrides) on every seed, over the same topic split."""
    split = topic_split(cfg.resolved_base_model(), train, test)
    log.info("topic split: train %s, test %s; e.g. %s", [len(p) for p in split["phases"]],
             [len(t) for t in split["tests"]], split["examples"])
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in arms}
    for seed in seeds:
        for name, overrides in arms.items():
            res = run_arm(config_replace(cfg, seed=seed, **overrides), split["phases"], split["tests"])
            log.info("shift %s seed %d: accuracy %.4f, forgetting %+.4f", name, seed, res["accuracy"],
                     res["forgetting"])
            runs[name].append(dict(res, seed=seed))

    def per_seed(name: str, key: str) -> list[float]:
        return [r[key] for r in runs[name]]

    summary = {name: {"settings": arms[name], "accuracy": fmean(per_seed(name, "accuracy")),
                      "forgetting": fmean(per_seed(name, "forgetting")),
                      "forgetting_per_seed": per_seed(name, "forgetting"), "runs": rs} for name, rs in runs.items()}
    first, *others = list(arms)
    paired = {f"{a}_minus_{first}": {key: paired_diff(per_seed(a, key), per_seed(first, key))
                                     for key in ("accuracy", "forgetting")} for a in others}
    return {"train_per_phase": [len(p) for p in split["phases"]], "test_per_topic": [len(t) for t in split["tests"]],
            "examples": split["examples"], "arms": summary, "paired": paired}
