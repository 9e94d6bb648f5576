"""Every metric pagedkv exports: its name, type, help text and labels, in one table.

Names follow Prometheus' conventions: units in the name (``_bytes``, ``_seconds``,
``_tokens``, ``_blocks``), counters exposed with ``_total`` (the names below omit it,
as prometheus_client's families do), the namespace (``pagedkv`` by default) in front.
The table is what the collector describes to the registry and what docs/METRICS.md
lists; a sample of a name not in it cannot be emitted.
"""

from __future__ import annotations

from dataclasses import dataclass

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"


@dataclass(frozen=True)
class Spec:
    """One metric family; ``labels``: the label names its samples add to the
    registration's own (``member`` is added for the members of a KVCacheGroup)."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()


def _specs(*specs: Spec) -> dict[str, Spec]:
    return {s.name: s for s in specs}


# Label names the collector sets itself (a registration's labels= may not use them).
RESERVED_LABELS = frozenset({"state", "tier", "member", "direction", "le", "quantile"})

CACHE = _specs(
    Spec("cache_blocks", GAUGE,
         "KV blocks of the device pool by state: free (unused), used (held by a sequence), "
         "cached (prefix blocks nobody holds, evictable), pinned (cached prefix blocks kept "
         "from eviction). The states partition the pool: they sum to "
         "cache_capacity_blocks; CacheStats.cached_blocks = cached + pinned.", ("state",)),
    Spec("cache_capacity_blocks", GAUGE, "KV blocks in the device pool."),
    Spec("cache_block_size_tokens", GAUGE, "Tokens per KV block."),
    Spec("cache_sequences", GAUGE, "Sequences live in the device pool."),
    Spec("prefix_query_tokens", COUNTER,
         "Prompt tokens looked up in the device prefix cache (the hit rate's denominator)."),
    Spec("prefix_hit_tokens", COUNTER,
         "Prompt tokens served from the device prefix cache; hit rate = "
         "rate(prefix_hit_tokens_total) / rate(prefix_query_tokens_total)."),
    Spec("cache_evictions", COUNTER, "Cached blocks evicted from the device pool for reuse."),
    Spec("cache_cow_copies", COUNTER, "Copy-on-write block copies."),
    Spec("cache_allocated_blocks", COUNTER, "Blocks handed out to sequences."),
    Spec("cache_fragmentation_ratio", GAUGE,
         "Unused token slots in used blocks / token slots in used blocks."),
    Spec("cache_memory_pressure", GAUGE,
         "Memory pressure of blocks in use: 0 low, 1 medium, 2 high, 3 critical."),
    Spec("cache_invalidated_blocks", GAUGE,
         "Blocks still registered under an earlier model fingerprint (never hit again; "
         "evicted lazily)."),
)  # fmt: skip

TIERS = _specs(
    Spec("tier_hit_tokens", COUNTER,
         "Prompt tokens loaded back from the offload tiers (after the device prefix hit)."),
    Spec("tier_hit_blocks", COUNTER, "Blocks promoted to the device from this tier.", ("tier",)),
    Spec("tier_stored_blocks", COUNTER, "Blocks stored into this tier.", ("tier",)),
    Spec("tier_spilled_blocks", COUNTER,
         "Blocks this tier pushed down to the next one to make room.", ("tier",)),
    Spec("tier_corrupt_entries", COUNTER,
         "Entries of this tier that failed verification (served as misses).", ("tier",)),
    Spec("tier_errors", COUNTER, "Failed I/O or network operations of this tier.", ("tier",)),
    Spec("tier_up", GAUGE, "1 while this tier is in use, 0 while it backs off after errors.",
         ("tier",)),
    Spec("tier_entries", GAUGE,
         "Entries held by this tier (absent where it cannot know cheaply, e.g. Redis).",
         ("tier",)),
    Spec("tier_used_bytes", GAUGE,
         "Value bytes held by this tier (absent where it cannot know cheaply).", ("tier",)),
    Spec("tier_capacity_bytes", GAUGE, "Capacity of this tier in bytes.", ("tier",)),
    Spec("tier_lookup_blocks", COUNTER, "Blocks looked up in the tiers."),
    Spec("tier_promoted_blocks", COUNTER, "Blocks loaded from the tiers into the device pool."),
    Spec("tier_pending_hits", COUNTER,
         "Blocks served from the write-back queue before they reached the first tier."),
    Spec("tier_demoted_blocks", COUNTER, "Evicted device blocks written down to the tiers."),
    Spec("tier_written_through_blocks", COUNTER,
         "Shared device blocks also written down at once (write_through=True)."),
    Spec("tier_pending_bytes", GAUGE, "Bytes waiting in the write-back queue."),
    Spec("swap_sequences", GAUGE, "Sequences swapped out to the first tier."),
    Spec("swap_used_bytes", GAUGE, "Bytes of swapped-out sequences."),
    Spec("swap_capacity_bytes", GAUGE, "Bytes the swap area may hold."),
)  # fmt: skip

ENGINE = _specs(
    Spec("engine_requests", COUNTER, "Requests submitted to the engine."),
    Spec("engine_prompt_tokens", COUNTER, "Prompt tokens of admitted requests."),
    Spec("engine_cached_tokens", COUNTER,
         "Prompt tokens served from the cache at admission (prefix cache, tiers, snapshots)."),
    Spec("engine_prefill_tokens", COUNTER,
         "Prompt tokens computed (recomputes after preemption included)."),
    Spec("engine_generated_tokens", COUNTER, "Tokens generated."),
    Spec("engine_step_seconds", COUNTER, "Seconds spent in Engine.step."),
    Spec("engine_steps", COUNTER, "Engine steps run."),
    Spec("engine_preemptions", COUNTER, "Requests preempted for lack of KV blocks."),
    Spec("engine_blocks_in_use", GAUGE, "KV blocks not free (used or cached)."),
    Spec("engine_blocks_peak", GAUGE, "Most KV blocks held by requests at once."),
    Spec("engine_retained_sequences", GAUGE,
         "Finished requests kept in the cache (retain=True) until snapshotted or released."),
    Spec("engine_running_requests", GAUGE, "Requests being served (prefill or decode)."),
    Spec("engine_waiting_requests", GAUGE,
         "Requests waiting for admission (preempted and swapped-out ones included)."),
    Spec("engine_time_to_first_token_seconds", HISTOGRAM,
         "Seconds from a request's submission to its first generated token."),
    Spec("engine_inter_token_latency_seconds", HISTOGRAM,
         "Seconds between consecutive generated tokens of a request."),
)  # fmt: skip

GROUP = _specs(
    Spec("group_placements", COUNTER, "Sequences the group placed on this member.", ("member",)),
    Spec("group_prefix_hits", COUNTER,
         "Placements on this member that found a cached prefix there.", ("member",)),
    Spec("group_prefix_hit_tokens", COUNTER,
         "Prompt tokens those placements found cached.", ("member",)),
    Spec("group_moves", COUNTER, "Sequences moved into (direction=in) or out of this member.",
         ("member", "direction")),
    Spec("group_copied_blocks", COUNTER, "Blocks moves into this member copied.", ("member",)),
    Spec("group_reused_blocks", COUNTER,
         "Blocks moves into this member found already there.", ("member",)),
)  # fmt: skip

SNAPSHOTS = _specs(
    Spec("snapshot_saves", COUNTER, "Snapshots saved through this SnapshotStore object."),
    Spec("snapshot_loads", COUNTER, "Snapshots loaded through this SnapshotStore object."),
    Spec("snapshot_written_bytes", COUNTER,
         "Page bytes the saves added to the store (pages already there are not written)."),
    Spec("snapshot_read_bytes", COUNTER, "Page bytes the loads read and verified."),
    Spec("snapshot_save_seconds", COUNTER, "Seconds spent in saves."),
    Spec("snapshot_load_seconds", COUNTER, "Seconds spent in loads."),
)  # fmt: skip

ALL: dict[str, Spec] = {**CACHE, **TIERS, **ENGINE, **GROUP, **SNAPSHOTS}
