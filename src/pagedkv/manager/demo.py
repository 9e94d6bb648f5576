"""A block-manager-only demonstration: a shared-prefix chat workload, no model.

Requests share a few system prompts; each decodes some tokens and finishes, while
new ones arrive. The first system prompt is pinned (never evicted), the cache keeps
at most ``max_cached_blocks`` idle blocks, prompts below ``min_prefix_tokens`` and
every ``private_every``-th request (``share_prefix=False``) take no part in prefix
caching, and at the end ``evict(n)`` empties the cache on demand. The table shows what
prefix caching, paged blocks and these limits do. (Priorities are the engine's:
``Engine(preemption_policy="priority")`` chooses which *requests* give up their KV;
the manager decides which *blocks* stay cached.)
"""

from __future__ import annotations

import random

from pagedkv.manager import BlockManager


def run(
    *,
    num_requests: int = 400,
    num_system_prompts: int = 4,
    max_live: int = 32,
    decode_tokens: int = 64,
    num_blocks: int = 2048,
    block_size: int = 16,
    max_cached_blocks: int = 512,
    min_prefix_tokens: int = 64,
    private_every: int = 10,
    seed: int = 0,
) -> dict:
    """Replay the workload; print a table and return its numbers."""
    from rich.console import Console
    from rich.table import Table

    rng = random.Random(seed)
    systems = [
        [rng.randrange(32000) for _ in range(rng.randrange(256, 1024))]
        for _ in range(num_system_prompts)
    ]
    m = BlockManager(
        num_blocks, block_size, max_cached_blocks=max_cached_blocks,
        min_prefix_tokens=min_prefix_tokens,
    )  # fmt: skip
    m.pin(systems[0])  # its blocks are kept cached whatever the pressure and the cap
    live: dict[int, int] = {}
    next_id = peak_used = dense_peak = peak_cached = 0
    prompt_tokens = private = 0
    while next_id < num_requests or live:
        if next_id < num_requests and len(live) < max_live:
            if next_id % 25 == 24:  # now and then a short prompt: below min_prefix_tokens
                prompt = [rng.randrange(32000) for _ in range(rng.randrange(8, min_prefix_tokens))]
            else:
                prompt = rng.choice(systems) + [
                    rng.randrange(32000) for _ in range(rng.randrange(16, 256))
                ]
            share = next_id % private_every != private_every - 1
            m.allocate(next_id, prompt, share_prefix=share)
            private += not m.shares_prefix(next_id)
            prompt_tokens += len(prompt)
            live[next_id] = 0
            next_id += 1
        for rid in list(live):
            m.append(rid, [rng.randrange(32000)])
            live[rid] += 1
            if live[rid] == decode_tokens:
                m.free(rid)
                del live[rid]
        m.check_integrity()
        stats = m.stats()
        peak_used = max(peak_used, stats.used_blocks)
        peak_cached = max(peak_cached, stats.cached_blocks - stats.pinned_blocks)
        dense = sum(-(-m.num_tokens(r) // block_size) for r in live)
        dense_peak = max(dense_peak, dense)

    s = m.stats()
    evicted_on_demand = m.evict(s.cached_blocks)  # all but the pinned system prompt
    after = m.stats()
    m.check_integrity()
    table = Table(title="pagedkv block manager — shared-prefix workload (no model)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = {
        "requests (with a prefix hit / without)": (
            f"{num_requests} ({s.requests_with_hit} / {s.requests_without_hit})"
        ),
        "private requests (share_prefix=False or short)": private,
        "prompt tokens": prompt_tokens,
        "prefix hit rate": f"{s.hit_rate:.1%}",
        "tokens served from the prefix cache": s.hit_tokens,
        "peak blocks in use (shared)": peak_used,
        "peak blocks without sharing": dense_peak,
        f"peak idle cached blocks (max_cached_blocks={max_cached_blocks})": peak_cached,
        "pinned blocks (system prompt 1)": s.pinned_blocks,
        "blocks allocated": s.blocks_allocated,
        "evictions (policy + cap)": s.evictions,
        "copy-on-write copies": s.cow_copies,
        "evict(n) at the end: evicted, left cached": (
            f"{evicted_on_demand}, {after.cached_blocks} (pinned)"
        ),
        "pool": f"{num_blocks} blocks x {block_size} tokens",
    }
    for key, value in rows.items():
        table.add_row(key, str(value))
    Console().print(table)
    return {
        "hit_rate": s.hit_rate,
        "peak_used": peak_used,
        "dense_peak": dense_peak,
        "evictions": s.evictions,
        "peak_cached": peak_cached,
        "pinned_blocks": s.pinned_blocks,
        "private_requests": private,
        "evicted_on_demand": evicted_on_demand,
    }


if __name__ == "__main__":
    run()
