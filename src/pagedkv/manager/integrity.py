"""The block manager's invariants, as an executable check.

Kept apart from :mod:`block_manager` so the hot paths read without it; it reads the
manager's private state on purpose (it is the manager's own audit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedkv.manager.hashing import ROOT, chain_hashes

if TYPE_CHECKING:
    from pagedkv.manager.block_manager import BlockManager


def violations(m: BlockManager) -> list[str]:
    """Every violated invariant, each naming the numbers that disagree (empty: all hold)."""
    problems = []
    n = m.num_blocks
    free, evictable, pinned = set(m._free), set(m._policy.order()), m._pinned
    if len(free) != len(m._free):
        problems.append(
            f"free stack holds duplicates ({len(m._free)} entries, {len(free)} distinct)"
        )
    if len(evictable) != len(m._policy):
        problems.append(f"policy lists {len(evictable)} blocks but counts {len(m._policy)}")
    expected = [0] * n
    chains: dict[int, tuple[int, list[int]]] = {}  # tail -> (holders, chain blocks)
    for sid, seq in m._seqs.items():
        for b in seq.blocks[seq.chain :]:
            expected[b] += 1
        if seq.chain:
            prefix = seq.blocks[: seq.chain]
            holders, blocks = chains.get(prefix[-1], (0, prefix))
            if blocks != prefix:
                problems.append(f"seq {sid!r}: its hit chain differs from another's with that tail")
            chains[prefix[-1]] = (holders + 1, blocks)
    for _, blocks in chains.values():
        for b in blocks:
            expected[b] += 1
    counted = {tail: holders for tail, (holders, _) in chains.items()}
    if counted != m._chains:
        problems.append(f"chain holders {m._chains} disagree with the tables' {counted}")
        want = -(-len(seq.tokens) // m.block_size)
        if len(seq.blocks) != want:
            problems.append(
                f"seq {sid!r}: {len(seq.blocks)} blocks for {len(seq.tokens)} tokens (want {want})"
            )
        if len(set(seq.blocks)) != len(seq.blocks):
            problems.append(f"seq {sid!r} lists a block twice")
        if m.prefix_caching:
            chain = chain_hashes(seq.tokens, m.block_size, seq.ns, m._digest)
            if seq.last_hash != (chain[-1] if chain else ROOT):
                problems.append(f"seq {sid!r}: its last block hash is not its tokens' hash")
    refs = [max(r, 0) for r in m._ref]  # < 0: an LRU stamp on a cached block
    if expected != refs:
        bad = [b for b in range(n) if expected[b] != refs[b]][:5]
        problems.append(
            "ref counts disagree with block tables at blocks "
            + ", ".join(f"{b} (ref {m._ref[b]}, tables {expected[b]})" for b in bad)
        )
    in_use = sum(1 for r in refs if r > 0)
    if len(free) + in_use + len(evictable) + len(pinned) != n:
        problems.append(
            f"free({len(free)}) + in_use({in_use}) + cached({len(evictable)}"
            f"+{len(pinned)} pinned) != num_blocks({n})"
        )
    for name, group in (("free", free), ("evictable", evictable), ("pinned", pinned)):
        if any(refs[b] for b in group):
            problems.append(f"a {name} block has ref > 0")
    if any(m._ref[b] < 0 for b in free | pinned) or (
        m.eviction != "lru" and any(r < 0 for r in m._ref)
    ):
        problems.append("a block not listed by the LRU policy holds an LRU stamp")
    if free & evictable or free & pinned or evictable & pinned:
        problems.append("a block is in two of free / evictable / pinned")
    if any(m._hash[b] is not None for b in free):
        problems.append("a free block still has a registered hash")
    if any(m._hash[b] is None for b in evictable | pinned):
        problems.append("a cached block has no registered hash")
    if any(m._hash[b] not in m._pins for b in pinned):
        problems.append("a block is held pinned but its hash is not pinned")
    if any(m._hash[b] in m._pins for b in evictable):
        problems.append("a pinned prefix block is evictable")
    registered = sum(1 for h in m._hash if h is not None)
    if registered != len(m._index):
        problems.append(f"index has {len(m._index)} entries but {registered} blocks are registered")
    for key, b in m._index.items():
        if m._key[b] != key:
            problems.append(f"index entry for block {b} does not match the block's key")
            break
    return problems
