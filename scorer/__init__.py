"""The scorer: reward scoring and best-of-N over gRPC, with dynamic batching and hot checkpoint swaps.

Other packages import the client API from here; the server side is ``scorer.server`` (see docs/scorer.md).
"""

from scorer.bestofn import Criterion
from scorer.client import ModelInfo, ScorerClient, VersionInfo
from scorer.domain import BestOfNResult, ModelRef, RankedCandidate, ResponseScore, SamplingParams, ScoreQuery, ScoreResult

__all__ = [
    "BestOfNResult", "Criterion", "ModelInfo", "ModelRef", "RankedCandidate", "ResponseScore", "SamplingParams",
    "ScoreQuery", "ScoreResult", "ScorerClient", "VersionInfo",
]
