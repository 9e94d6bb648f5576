"""What one registered object contributes to a scrape: its stats, read as samples.

A source reads its object's public statistics when Prometheus scrapes (``stats()``,
``tier_stats()``, ``device_stats()``) and nothing in between; only the engine's latency
histograms are fed as the engine runs, through its per-step hook. Sources hold their
object by weak reference: registering an engine does not keep its model alive, and a
source whose object is gone reads as nothing.
"""

from __future__ import annotations

import abc
import logging
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from pagedkv.metrics.latency import LatencyHistogram

logger = logging.getLogger("pagedkv.metrics")


class Samples:
    """Samples of one scrape, by family name (see :mod:`pagedkv.metrics.specs`), each
    ``(suffix, labels, value)``; ``labels`` start with the registration's own."""

    def __init__(self, base: Mapping[str, str]) -> None:
        self.base = dict(base)
        self.by_family: dict[str, list[tuple[str, dict[str, str], float]]] = {}

    def add(self, name: str, value: float, **labels: str) -> None:
        self.by_family.setdefault(name, []).append(("", {**self.base, **labels}, float(value)))

    def histogram(self, name: str, hist: LatencyHistogram, **labels: str) -> None:
        snap = hist.snapshot()
        rows = self.by_family.setdefault(name, [])
        base = {**self.base, **labels}
        for bound, count in zip(snap.bounds, snap.cumulative):
            rows.append(("_bucket", {**base, "le": _le(bound)}, float(count)))
        rows.append(("_count", base, float(snap.count)))
        rows.append(("_sum", base, snap.sum))


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


# ------------------------------------------------------------------ KVCache


def read_cache(out: Samples, cache: Any, **labels: str) -> None:
    """A KVCache's block states, prefix-cache counters and (if it has tiers) tier series."""
    read_cache_stats(out, cache.stats(), **labels)
    read_tiers(out, cache.tier_stats(), **labels)


def read_cache_stats(out: Samples, s: Any, **labels: str) -> None:
    """:class:`~pagedkv.CacheStats` as samples."""
    evictable = s.cached_blocks - s.pinned_blocks
    for state, n in (("free", s.free_blocks), ("used", s.used_blocks), ("cached", evictable),
                     ("pinned", s.pinned_blocks)):  # fmt: skip
        out.add("cache_blocks", n, state=state, **labels)
    out.add("cache_capacity_blocks", s.num_blocks, **labels)
    out.add("cache_block_size_tokens", s.block_size, **labels)
    out.add("cache_sequences", s.num_sequences, **labels)
    out.add("prefix_query_tokens", s.query_tokens, **labels)
    out.add("prefix_hit_tokens", s.hit_tokens, **labels)
    out.add("cache_evictions", s.evictions, **labels)
    out.add("cache_cow_copies", s.cow_copies, **labels)
    out.add("cache_allocated_blocks", s.blocks_allocated, **labels)
    out.add("cache_fragmentation_ratio", s.fragmentation, **labels)
    out.add("cache_memory_pressure", int(s.pressure), **labels)
    out.add("cache_invalidated_blocks", s.invalidated_blocks, **labels)


# tier_stats() per-tier key -> family; then chain-wide keys -> family
_PER_TIER = (
    ("hits", "tier_hit_blocks"), ("puts", "tier_stored_blocks"),
    ("spilled", "tier_spilled_blocks"), ("corrupt", "tier_corrupt_entries"),
    ("errors", "tier_errors"), ("available", "tier_up"), ("entries", "tier_entries"),
    ("bytes_used", "tier_used_bytes"), ("capacity_bytes", "tier_capacity_bytes"),
)  # fmt: skip
_CHAIN = (
    ("tier_hit_tokens", "tier_hit_tokens"), ("lookups", "tier_lookup_blocks"),
    ("promoted", "tier_promoted_blocks"), ("pending_hits", "tier_pending_hits"),
    ("demoted", "tier_demoted_blocks"), ("written_through", "tier_written_through_blocks"),
    ("pending_bytes", "tier_pending_bytes"), ("swapped_sequences", "swap_sequences"),
    ("swapped_bytes", "swap_used_bytes"), ("swap_capacity_bytes", "swap_capacity_bytes"),
)  # fmt: skip


def read_tiers(out: Samples, ts: Any, **labels: str) -> None:
    """``KVCache.tier_stats()`` as samples; nothing for a cache without tiers.

    Read by key (``ts["tiers"]["cpu"]["hits"]``) so a mapping or a dataclass with mapping
    access both work. Values a tier cannot know (``None``) are left out.
    """
    if not ts:
        return
    for name, tier in ts["tiers"].items():
        for key, family in _PER_TIER:
            value = tier[key]
            if value is not None:
                out.add(family, int(value), tier=str(name), **labels)
    for key, family in _CHAIN:
        out.add(family, ts[key], **labels)


# ------------------------------------------------------------------ Engine

_ENGINE = (
    ("requests", "engine_requests"), ("prompt_tokens", "engine_prompt_tokens"),
    ("cached_tokens", "engine_cached_tokens"), ("prefill_tokens", "engine_prefill_tokens"),
    ("generated_tokens", "engine_generated_tokens"), ("step_seconds", "engine_step_seconds"),
    ("steps", "engine_steps"), ("preemptions", "engine_preemptions"),
    ("blocks_in_use", "engine_blocks_in_use"), ("blocks_peak", "engine_blocks_peak"),
    ("retained_seqs", "engine_retained_sequences"),
)  # fmt: skip
# EngineStats fields that come with the engine hook (read when the engine has them)
_ENGINE_OPTIONAL = (
    ("running_requests", "engine_running_requests"),
    ("waiting_requests", "engine_waiting_requests"),
)


class Source(abc.ABC):
    """One registered object. ``read(out)`` adds its samples and returns whether the
    object is still alive; ``covers()``: the objects it reads (an engine covers its
    cache), for the one-registration-per-object check; ``close()`` detaches hooks."""

    def __init__(self, obj: object) -> None:
        self._ref = weakref.ref(obj)

    def read(self, out: Samples) -> bool:
        obj = self._ref()
        if obj is None:
            return False
        self._read(out, obj)
        return True

    def covers(self) -> list[object]:
        obj = self._ref()
        return [] if obj is None else self.covered(obj)

    def close(self) -> None:
        return None

    @abc.abstractmethod
    def _read(self, out: Samples, obj: Any) -> None:
        """Add the samples of the live object ``obj`` to ``out`` (each kind of source)."""

    @staticmethod
    def covered(obj: Any) -> list[object]:
        """The objects a source of ``obj`` reads."""
        return [obj]


class CacheSource(Source):
    """A :class:`~pagedkv.KVCache`."""

    def _read(self, out: Samples, cache: Any) -> None:
        read_cache(out, cache)


_SNAPSHOT = (
    ("saves", "snapshot_saves"), ("loads", "snapshot_loads"),
    ("written_bytes", "snapshot_written_bytes"), ("read_bytes", "snapshot_read_bytes"),
    ("save_seconds", "snapshot_save_seconds"), ("load_seconds", "snapshot_load_seconds"),
)  # fmt: skip


def read_snapshot_store(out: Samples, s: Any, **labels: str) -> None:
    """:class:`~pagedkv.snapshot.SnapshotStoreStats` as samples."""
    for key, family in _SNAPSHOT:
        out.add(family, getattr(s, key), **labels)


def _is_snapshot_store(obj: object) -> bool:
    return callable(getattr(obj, "stats", None)) and callable(getattr(obj, "manifest", None))


class SnapshotSource(Source):
    """A :class:`~pagedkv.SnapshotStore` object: its saves, loads and bytes."""

    def _read(self, out: Samples, store: Any) -> None:
        read_snapshot_store(out, store.stats())


class GroupSource(Source):
    """A :class:`~pagedkv.KVCacheGroup`: each member's cache series, labelled
    ``member=<name>``, and the group's placement and move counters."""

    def _read(self, out: Samples, group: Any) -> None:
        members = group.members()
        for name, d in group.device_stats().items():
            member = str(name)
            read_cache_stats(out, d.cache, member=member)
            read_tiers(out, members[name].tier_stats(), member=member)
            out.add("group_placements", d.placements, member=member)
            out.add("group_prefix_hits", d.prefix_hits, member=member)
            out.add("group_prefix_hit_tokens", d.prefix_hit_tokens, member=member)
            out.add("group_moves", d.moves_in, member=member, direction="in")
            out.add("group_moves", d.moves_out, member=member, direction="out")
            out.add("group_copied_blocks", d.blocks_copied_in, member=member)
            out.add("group_reused_blocks", d.blocks_reused_in, member=member)

    @staticmethod
    def covered(group: Any) -> list[object]:
        return [group, *group.members().values()]


class EngineLatency:
    """The engine hook's subscriber: bins each step's latencies."""

    def __init__(self, ttft: tuple[float, ...], itl: tuple[float, ...]) -> None:
        self.ttft, self.itl = LatencyHistogram(ttft), LatencyHistogram(itl)

    def __call__(self, event: Any) -> None:
        self.ttft.observe(event.time_to_first_token)
        self.itl.observe(event.inter_token)


class EngineSource(Source):
    """An :class:`~pagedkv.Engine` and its cache, with latency histograms while the
    engine offers the hook ``on_step(callback) -> unsubscribe`` (without it there are
    none; everything else is still exported)."""

    def __init__(self, engine: Any, ttft: tuple[float, ...], itl: tuple[float, ...]) -> None:
        super().__init__(engine)
        self.latency: EngineLatency | None = None
        self._unsubscribe: Callable[[], None] | None = None
        subscribe = getattr(engine, "on_step", None)
        if callable(subscribe):
            latency = EngineLatency(ttft, itl)
            self._unsubscribe = subscribe(latency)
            self.latency = latency
        else:
            logger.info(
                "%s has no on_step hook: no time-to-first-token / inter-token latency "
                "histograms", type(engine).__name__,
            )  # fmt: skip

    def _read(self, out: Samples, engine: Any) -> None:
        s = engine.stats()
        for key, family in _ENGINE:
            out.add(family, getattr(s, key))
        for key, family in _ENGINE_OPTIONAL:
            value = getattr(s, key, None)
            if value is not None:
                out.add(family, value)
        if self.latency is not None:
            out.histogram("engine_time_to_first_token_seconds", self.latency.ttft)
            out.histogram("engine_inter_token_latency_seconds", self.latency.itl)
        read_cache(out, engine.cache)
        store: Any = getattr(engine, "snapshot_store", None)
        if _is_snapshot_store(store):  # (a path is opened per call: nothing to count)
            read_snapshot_store(out, store.stats())

    @staticmethod
    def covered(engine: Any) -> list[object]:
        store = getattr(engine, "snapshot_store", None)
        return [engine, engine.cache, *([store] if _is_snapshot_store(store) else [])]

    def close(self) -> None:
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None and self._ref() is not None:
            unsubscribe()


def source_class(obj: object) -> type[Source]:
    """The source for ``obj`` by what it offers; ``TypeError`` for anything else."""
    if _is_snapshot_store(obj):
        return SnapshotSource
    if callable(getattr(obj, "device_stats", None)) and callable(getattr(obj, "members", None)):
        return GroupSource
    cache = getattr(obj, "cache", None)
    if callable(getattr(obj, "stats", None)) and callable(getattr(cache, "tier_stats", None)):
        return EngineSource
    if callable(getattr(obj, "stats", None)) and callable(getattr(obj, "tier_stats", None)):
        return CacheSource
    raise TypeError(
        "pagedkv.metrics.register() takes a KVCache, an Engine, a KVCacheGroup or a "
        f"SnapshotStore, got {type(obj).__name__}"
    )
