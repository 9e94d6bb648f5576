"""Continuous-batching engine over a paged KV cache (transformers models)."""

from pagedkv.engine.config import EngineConfig
from pagedkv.engine.engine import Engine, EngineStats
from pagedkv.engine.preemption import PreemptionPolicyError, RunningRequest
from pagedkv.engine.request import RequestOutput, SamplingParams, StreamDelta

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "PreemptionPolicyError",
    "RequestOutput",
    "RunningRequest",
    "SamplingParams",
    "StreamDelta",
]
