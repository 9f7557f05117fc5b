"""The scorer: reward scoring, best-of-N and policy generation over gRPC, with dynamic batching and hot checkpoint swaps.

Other packages import the client API from here; the server side is ``scorer.server`` (see docs/scorer.md).
"""

from scorer.bestofn import Criterion
from scorer.client import ModelStatus, ModelVersion, ScorerClient
from scorer.domain import BestOfNResult, ModelRef, RankedCandidate, ResponseScore, SamplingParams, ScoreQuery, ScoreResult
from scorer.domain import Usage
from scorer.generation import GenerateChunk, GenerateQuery, GenerateResult, GenerationChoice

__all__ = [
    "BestOfNResult", "Criterion", "ModelRef", "ModelStatus", "ModelVersion", "RankedCandidate", "ResponseScore", "SamplingParams",
    "ScoreQuery", "ScoreResult", "ScorerClient", "GenerateChunk", "GenerateQuery", "GenerateResult", "GenerationChoice",
    "Usage",
]
