"""Prometheus metrics of a KVCache, an Engine or a KVCacheGroup (the ``[metrics]`` extra).

::

    from pagedkv import metrics

    handle = metrics.register(engine)            # into prometheus_client's REGISTRY
    server = metrics.serve(9400)                 # http://127.0.0.1:9400/metrics
    ...
    server.close(); handle.unregister()

    with metrics.serve_for(engine, 0) as server:  # both at once (the demo's --metrics-port)
        print(server.url)

A registered object costs nothing until scraped: its ``stats()`` are read then, by a
custom collector (no background thread, no counters kept twice). Only an engine's latency
histograms are fed as it runs, once per step, through the engine's ``on_step`` hook.
Metric names, types and help texts: :mod:`pagedkv.metrics.specs` (and docs/METRICS.md);
the prefix hit rate is ``rate(pagedkv_prefix_hit_tokens_total) /
rate(pagedkv_prefix_query_tokens_total)``. Label values are pagedkv's own names (block
states, tier names such as ``cpu``/``disk``/``redis``, group member names) and the
``labels=`` you pass; never a URL, a path or a key.

Without prometheus-client installed, importing this module raises one line:
``pagedkv.metrics needs prometheus-client: pip install "pagedkv[metrics]"``.
"""

from __future__ import annotations

from pagedkv.metrics.collector import PagedKVCollector, Registration, register
from pagedkv.metrics.latency import ITL_BUCKETS, TTFT_BUCKETS
from pagedkv.metrics.server import MetricsServer, serve, serve_for

__all__ = [
    "ITL_BUCKETS",
    "TTFT_BUCKETS",
    "MetricsServer",
    "PagedKVCollector",
    "Registration",
    "register",
    "serve",
    "serve_for",
]
