"""Continuous-batching engine over a paged KV cache (transformers models).

The names below are imported on first use (PEP 562), so that reading the options
(``pagedkv.engine.config``, what the command line is built from) loads neither torch
nor the model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedkv._lazy import lazy_getattr

if TYPE_CHECKING:  # the names as type checkers and readers see them
    from pagedkv.engine.config import EngineConfig
    from pagedkv.engine.engine import Engine
    from pagedkv.engine.migration import Migration, MigrationResult, Migrator
    from pagedkv.engine.preemption import PreemptionPolicyError, RunningRequest
    from pagedkv.engine.request import RequestOutput, SamplingParams, StreamDelta
    from pagedkv.engine.stats import EngineStats, StepLatencies

# name -> module that defines it (below pagedkv.engine), by module.
_LAZY = {
    name: f"pagedkv.engine.{module}"
    for module, names in (
        ("config", ("EngineConfig",)),
        ("engine", ("Engine",)),
        ("migration", ("Migration", "MigrationResult", "Migrator")),
        ("preemption", ("PreemptionPolicyError", "RunningRequest")),
        ("request", ("RequestOutput", "SamplingParams", "StreamDelta")),
        ("stats", ("EngineStats", "StepLatencies")),
    )
    for name in names
}

__getattr__ = lazy_getattr(globals(), _LAZY)

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineStats",
    "Migration",
    "MigrationResult",
    "Migrator",
    "PreemptionPolicyError",
    "RequestOutput",
    "RunningRequest",
    "SamplingParams",
    "StepLatencies",
    "StreamDelta",
]
