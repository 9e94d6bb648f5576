"""Latency histograms fed by the engine's per-step hook, read at scrape time.

The engine reports, once per step, the time-to-first-token of the requests that got
their first token in it and the inter-token latencies of the others
(:meth:`Engine.on_step`, a :class:`StepLatencies`-like event with ``time_to_first_token``
and ``inter_token`` sequences of seconds). A :class:`LatencyHistogram` bins them into
cumulative Prometheus buckets; nothing runs per token unless someone registered.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Seconds. TTFT spans a fast prefix hit to a long prompt queued behind others; ITL a
# decode step of a small model on a GPU to a step slowed by a large prefill chunk.
TTFT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def check_buckets(name: str, buckets: object) -> tuple[float, ...]:
    """``buckets`` as a tuple of finite upper bounds (``+Inf`` is always added); raises
    ``TypeError``/``ValueError`` naming ``name`` unless they are increasing numbers > 0."""
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Iterable):
        raise TypeError(f"{name} must be a sequence of seconds, e.g. (0.01, 0.1, 1.0)")
    bounds = list(buckets)
    if bounds and bounds[-1] == math.inf:
        bounds.pop()  # +Inf is implied
    for b in bounds:
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise TypeError(f"{name} must hold numbers of seconds, got {type(b).__name__} {b!r}")
        if not (math.isfinite(b) and b > 0):
            raise ValueError(f"{name} must hold finite seconds > 0, got {b!r}")
    if not bounds:
        raise ValueError(f"{name} must hold at least one finite upper bound")
    if any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{name} must be strictly increasing, got {bounds}")
    return tuple(float(b) for b in bounds)


@dataclass(frozen=True)
class HistogramSnapshot:
    """Cumulative counts per upper bound (the last bound is ``+Inf``), their sum and count."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return self.cumulative[-1]


class LatencyHistogram:
    """Observations binned by upper bound; safe to observe and snapshot from two threads
    (the engine's and the metrics server's)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = tuple(bounds)
        self._counts = [0] * (len(self._bounds) + 1)  # the last bin is (max bound, +Inf)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, values: Iterable[float]) -> None:
        """Add observations (seconds); ``le`` buckets include their bound."""
        bounds, counts = self._bounds, self._counts
        with self._lock:
            for v in values:
                counts[bisect.bisect_left(bounds, v)] += 1
                self._sum += v

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            counts, total = list(self._counts), self._sum
        running, cumulative = 0, []
        for c in counts:
            running += c
            cumulative.append(running)
        return HistogramSnapshot((*self._bounds, math.inf), tuple(cumulative), total)
