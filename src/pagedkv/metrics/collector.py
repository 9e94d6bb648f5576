"""The Prometheus collector: one per (registry, namespace), merging registered objects.

Prometheus wants one family per name in a scrape, so every pagedkv object registered in
one registry under one namespace is read by the same collector, which merges their
samples family by family; the objects are told apart by their ``labels=``. The collector
describes its whole table of names to the registry, so a name clash with another
collector is found when the first object is registered.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from pagedkv._extras import optional_imports, require
from pagedkv.metrics.latency import ITL_BUCKETS, TTFT_BUCKETS, check_buckets
from pagedkv.metrics.sources import EngineSource, Samples, Source, source_class
from pagedkv.metrics.specs import ALL, COUNTER, RESERVED_LABELS

FEATURE = "pagedkv.metrics"
prometheus_client = require("prometheus_client", feature=FEATURE)
with optional_imports(FEATURE):
    from prometheus_client.core import Metric
    from prometheus_client.registry import CollectorRegistry

logger = logging.getLogger("pagedkv.metrics")

_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Reads of stats() from the server's thread may meet a dict or set being changed by the
# thread that runs the cache (pagedkv objects take no locks): "dictionary changed size
# during iteration", "dictionary keys changed during iteration". Such a read is repeated.
_RACE = "during iteration"
_READ_ATTEMPTS = 5


class _Entry:
    def __init__(self, source: Source, labels: dict[str, str]) -> None:
        self.source, self.labels = source, labels


class PagedKVCollector:
    """Reads every registered object's stats at scrape time (nothing in between)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._entries: list[_Entry] = []
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return [Metric(f"{self.namespace}_{s.name}", s.help, s.kind) for s in ALL.values()]

    def collect(self) -> list[Metric]:
        with self._lock:
            entries = list(self._entries)
        families: dict[str, list] = {}
        for entry in entries:
            samples = _read(entry)
            if samples is None:  # the object was collected: forget it
                self._remove(entry)
                continue
            for name, rows in samples.by_family.items():
                families.setdefault(name, []).extend(rows)
        assert families.keys() <= ALL.keys(), f"not in specs.py: {families.keys() - ALL.keys()}"
        out = []
        for spec in ALL.values():  # families without samples are left out
            rows = families.get(spec.name, [])
            if not rows:
                continue
            full = f"{self.namespace}_{spec.name}"
            metric = Metric(full, spec.help, spec.kind)
            tail = "_total" if spec.kind == COUNTER else ""
            for suffix, labels, value in rows:
                metric.add_sample(full + (suffix or tail), labels, value)
            out.append(metric)
        return out

    def _add(self, entry: _Entry) -> None:
        with self._lock:
            self._entries.append(entry)

    def _remove(self, entry: _Entry) -> bool:
        with self._lock:
            if entry not in self._entries:
                return False
            self._entries.remove(entry)
            return True

    def _live(self) -> list[_Entry]:
        with self._lock:
            return list(self._entries)


def _read(entry: _Entry) -> Samples | None:
    """The entry's samples, ``None`` if its object is gone."""
    attempt = 1
    while True:
        samples = Samples(entry.labels)
        try:
            return samples if entry.source.read(samples) else None
        except RuntimeError as e:
            if _RACE not in str(e) or attempt == _READ_ATTEMPTS:
                raise
            attempt += 1


# Registry -> namespace -> collector. Keyed weakly: a registry that is dropped takes its
# collectors along, so tests with their own registries never see each other's.
_COLLECTORS: weakref.WeakKeyDictionary[Any, dict[str, PagedKVCollector]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()


class Registration:
    """The handle :func:`register` returns: ``unregister()`` (idempotent) removes the
    object's series from the registry; also a context manager.

    ``latency_histograms`` says whether the engine's hook feeds time-to-first-token and
    inter-token-latency histograms (False for a cache, a group, or an engine without
    the ``on_step`` hook).
    """

    def __init__(
        self, registry: CollectorRegistry, collector: PagedKVCollector, entry: _Entry
    ) -> None:
        self.registry, self.namespace = registry, collector.namespace
        self.labels = dict(entry.labels)
        self._collector, self._entry = collector, entry
        source = entry.source
        self.latency_histograms = isinstance(source, EngineSource) and source.latency is not None

    def unregister(self) -> None:
        with _LOCK:
            if self._collector._remove(self._entry):
                self._entry.source.close()
            # The last one out (or one whose object is gone) takes the collector along.
            by_ns = _COLLECTORS.get(self.registry, {})
            if not self._collector._live() and by_ns.get(self.namespace) is self._collector:
                self.registry.unregister(self._collector)
                del by_ns[self.namespace]

    @property
    def registered(self) -> bool:
        """Registered and its object still alive."""
        return self._entry in self._collector._live() and bool(self._entry.source.covers())

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unregister()

    def __repr__(self) -> str:
        state = "registered" if self.registered else "unregistered"
        return f"Registration(namespace={self.namespace!r}, labels={self.labels}, {state})"


def register(
    obj: object,
    registry: CollectorRegistry | None = None,
    *,
    namespace: str = "pagedkv",
    labels: Mapping[str, str] | None = None,
    ttft_buckets: Sequence[float] = TTFT_BUCKETS,
    itl_buckets: Sequence[float] = ITL_BUCKETS,
) -> Registration:
    """Export a ``KVCache``, an ``Engine`` (its cache included, and its ``snapshot_store``
    when that is a ``SnapshotStore`` object), a ``KVCacheGroup`` (each member labelled
    ``member=<name>``) or a ``SnapshotStore`` to Prometheus; returns the handle to
    unregister.

    ``registry``: default prometheus_client's global ``REGISTRY``. Its stats are read when
    the registry is collected (a scrape), never in between; an engine with the
    ``on_step`` hook also feeds the latency histograms (``ttft_buckets`` /
    ``itl_buckets``: upper bounds in seconds, ``+Inf`` added). ``namespace``: the metric
    name prefix. ``labels``: constant labels of every series of this object (str to str),
    needed to tell several objects in one registry apart — the same label names for all
    of them, a different value set for each.

    The object is held by weak reference (registering an engine does not keep its model
    alive): keep your own reference; once it is collected its series disappear.

    Raises ``TypeError``/``ValueError`` (registering nothing) for an object of another
    kind, a bad name or bucket, an object (or the cache of an engine, a member of a group)
    already registered in this registry, labels equal to another object's or with other
    names, or metric names another collector of the registry already exports.
    """
    cls = source_class(obj)
    if registry is None:
        registry = prometheus_client.REGISTRY
    if not isinstance(registry, CollectorRegistry):
        raise TypeError(f"registry must be a prometheus_client CollectorRegistry, got {registry!r}")
    if not isinstance(namespace, str) or not _NAME.fullmatch(namespace):
        raise ValueError(f"namespace must match [a-zA-Z_][a-zA-Z0-9_]*, got {namespace!r}")
    const = _check_labels(labels)
    ttft = check_buckets("ttft_buckets", ttft_buckets)
    itl = check_buckets("itl_buckets", itl_buckets)
    with _LOCK:
        by_ns = _COLLECTORS.setdefault(registry, {})
        _check_unique(cls.covered(obj), obj, const, by_ns, namespace)
        # An engine's source subscribes to its hook: built before anything is registered.
        source = EngineSource(obj, ttft, itl) if cls is EngineSource else cls(obj)
        collector = by_ns.get(namespace)
        if collector is None:
            collector = PagedKVCollector(namespace)
            try:
                registry.register(collector)
            except ValueError as e:  # prometheus_client's DuplicateTimeseries
                source.close()
                raise ValueError(
                    f"cannot register pagedkv metrics in this registry: {e}; another collector "
                    f"exports names under namespace {namespace!r}: pass another namespace="
                ) from None
            by_ns[namespace] = collector
        entry = _Entry(source, const)
        collector._add(entry)
    return Registration(registry, collector, entry)


def _check_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise TypeError(f"labels must be a dict of str to str, got {type(labels).__name__}")
    for name, value in labels.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name.startswith("__"):
            raise ValueError(
                f"label name {name!r} is not valid: [a-zA-Z_][a-zA-Z0-9_]*, not starting with __"
            )
        if name in RESERVED_LABELS:
            raise ValueError(
                f"label name {name!r} is set by pagedkv itself; reserved: {sorted(RESERVED_LABELS)}"
            )
        if not isinstance(value, str):
            raise TypeError(f"label {name!r} must have a str value, got {type(value).__name__}")
    return dict(labels)


def _check_unique(
    mine: list[object], obj: object, const: dict[str, str],
    by_ns: dict[str, PagedKVCollector], ns: str,
) -> None:  # fmt: skip
    """``ValueError`` if ``obj`` or what it covers (``mine``) is registered in the registry
    already, or its labels would collide with another object's series under ``ns``."""
    for namespace, collector in by_ns.items():
        for entry in collector._live():
            theirs = entry.source.covers()
            for o in mine:
                if any(o is t for t in theirs):
                    what = "this object" if o is obj else f"its {type(o).__name__}"
                    raise ValueError(
                        f"{what} is already registered in this registry (namespace "
                        f"{namespace!r}, labels {entry.labels}): unregister() its handle first"
                    )
    if ns in by_ns:
        for entry in by_ns[ns]._live():
            if set(entry.labels) != set(const):
                raise ValueError(
                    f"every pagedkv object in one registry and namespace needs the same label "
                    f"names: {sorted(entry.labels)} are registered, got {sorted(const)}"
                )
            if entry.labels == const:
                raise ValueError(
                    f"another pagedkv object is registered here with labels {const}: give each "
                    "its own, e.g. labels={'cache': 'b'}"
                )
