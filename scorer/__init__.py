"""The scorer: reward scoring and best-of-N over gRPC, with dynamic batching and hot checkpoint swaps.

Other packages import the client API from here; the server side is ``scorer.server`` (see docs/scorer.md).
"""

from scorer.bestofn import Criterion
from scorer.client import ModelStatus, ModelVersion, ScorerClient
from scorer.domain import BestOfNResult, ModelRef, RankedCandidate, ResponseScore, SamplingParams, ScoreQuery, ScoreResult

__all__ = [
    "BestOfNResult", "Criterion", "ModelRef", "ModelStatus", "ModelVersion", "RankedCandidate", "ResponseScore", "SamplingParams",
    "ScoreQuery", "ScoreResult", "ScorerClient",
]
