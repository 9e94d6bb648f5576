"""The block manager's invariants, as an executable check.

Kept apart from :mod:`block_manager` so the hot paths read without it; it reads the
manager's private state on purpose (it is the manager's own audit). Every check
below has a test that plants the damage it guards against and watches it fire
(``tests/test_integrity_mutations.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedkv.manager.eviction import LRUPolicy
from pagedkv.manager.hashing import ROOT, chain_hashes

if TYPE_CHECKING:
    from pagedkv.manager.block_manager import BlockManager, _Seq


def violations(m: BlockManager) -> list[str]:
    """Every violated invariant, each naming the numbers that disagree (empty: all hold)."""
    problems: list[str] = []
    n = m.num_blocks
    free = _free_blocks(m, problems)
    evictable = _policy_blocks(m, problems)
    pinned = m._pinned
    expected = [0] * n  # references the block tables imply
    chains: dict[int, tuple[int, list[int]]] = {}  # tail -> (holders, chain blocks)
    for sid, seq in m._seqs.items():
        if not _sequence_ok(m, sid, seq, problems):
            continue
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
        busy = sorted(b for b in group if refs[b])
        if busy:
            problems.append(f"{name} blocks {busy[:5]} have ref > 0")
    stamped = [b for b in range(n) if m._ref[b] < 0]
    if m.eviction != "lru" or not set(stamped) <= evictable:
        stray = [b for b in stamped if m.eviction != "lru" or b not in evictable]
        if stray:
            problems.append(
                f"blocks {stray[:5]} hold an LRU stamp (ref < 0) but the LRU policy "
                "does not list them"
            )
    if free & evictable or free & pinned or evictable & pinned:
        problems.append("a block is in two of free / evictable / pinned")
    _registration_problems(m, free, evictable, pinned, problems)
    return problems


def _free_blocks(m: BlockManager, problems: list[str]) -> set[int]:
    """The free stack as a set (ids outside the pool dropped and reported)."""
    n = m.num_blocks
    free = set(m._free)
    if len(free) != len(m._free):
        problems.append(
            f"free stack holds duplicates ({len(m._free)} entries, {len(free)} distinct)"
        )
    outside = [b for b in free if not (type(b) is int and 0 <= b < n)]
    if outside:
        problems.append(f"free stack holds block ids outside [0, {n}): {outside[:5]}")
        free -= set(outside)
    return free


def _policy_blocks(m: BlockManager, problems: list[str]) -> set[int]:
    """The evictable blocks, after checking the policy's own bookkeeping."""
    order = m._policy.order()
    evictable = set(order)
    if len(order) != len(evictable):
        problems.append(f"eviction policy lists a block twice ({len(order)} entries)")
    if len(evictable) != len(m._policy):
        problems.append(f"policy lists {len(evictable)} blocks but counts {len(m._policy)}")
    p = m._policy
    if isinstance(p, LRUPolicy):
        held = sum(len(blocks) for _, blocks in p._batches) - p._pos
        if held != p._entries:
            problems.append(f"LRU holds {held} batch entries but counts {p._entries}")
        stamps = [stamp for stamp, _ in p._batches]
        if stamps != sorted(set(stamps)) or (stamps and stamps[-1] > p._stamp):
            problems.append(
                f"LRU batch stamps {stamps[:5]}... are not increasing up to the last ({p._stamp})"
            )
    return evictable


def _sequence_ok(m: BlockManager, sid: object, seq: _Seq, problems: list[str]) -> bool:
    """Check one sequence's table against its tokens; False if its ids are unusable."""
    n, bs = m.num_blocks, m.block_size
    if any(not (type(b) is int and 0 <= b < n) for b in seq.blocks):
        problems.append(f"seq {sid!r} lists block ids outside [0, {n})")
        return False
    want = -(-len(seq.tokens) // bs)
    if len(seq.blocks) != want:
        problems.append(
            f"seq {sid!r}: {len(seq.blocks)} blocks for {len(seq.tokens)} tokens (want {want})"
        )
    if len(set(seq.blocks)) != len(seq.blocks):
        problems.append(f"seq {sid!r} lists a block twice")
    if not 0 <= seq.chain <= min(len(seq.blocks), (len(seq.tokens) - 1) // bs):
        problems.append(
            f"seq {sid!r}: a hit chain of {seq.chain} blocks over {len(seq.tokens)} tokens "
            "(a hit leaves at least one token to compute)"
        )
        return False
    if not m.prefix_caching:
        return True
    chain = chain_hashes(seq.tokens, bs, seq.ns, m._digest)
    if seq.last_hash != (chain[-1] if chain else ROOT):
        problems.append(f"seq {sid!r}: its last block hash is not its tokens' hash")
    anonymous = set(seq.anonymous)
    if not anonymous <= set(seq.blocks[seq.chain : len(chain)]):
        problems.append(
            f"seq {sid!r}: anonymous blocks {sorted(anonymous)[:5]} are not among its own "
            "full blocks"
        )
    for i, b in enumerate(seq.blocks[: len(chain)]):
        h = m._hash[b]
        if (h is None) != (b in anonymous) or (h is not None and h != chain[i]):
            problems.append(
                f"seq {sid!r}: full block {i} (block {b}) is "
                + ("registered under another hash" if h is not None else "unregistered")
                + (" but listed anonymous" if b in anonymous else "")
            )
            break
    if len(seq.blocks) > len(chain) and m._hash[seq.blocks[-1]] is not None:
        problems.append(f"seq {sid!r}: its partial last block {seq.blocks[-1]} is registered")
    return True


def _registration_problems(
    m: BlockManager, free: set[int], evictable: set[int], pinned: set[int], problems: list[str]
) -> None:
    if any(m._hash[b] is not None for b in free):
        problems.append("a free block still has a registered hash")
    if any(m._hash[b] is None for b in evictable | pinned):
        problems.append("a cached block has no registered hash")
    if any(m._hash[b] not in m._pins for b in pinned):
        problems.append("a block is held pinned but its hash is not pinned")
    if any(m._hash[b] in m._pins for b in evictable):
        problems.append("a pinned prefix block is evictable")
    if any(count < 1 for count in m._pins.values()):
        problems.append(f"pin counts must be >= 1, got {sorted(set(m._pins.values()))[:5]}")
    registered = [b for b, h in enumerate(m._hash) if h is not None]
    if registered and not m.prefix_caching:
        problems.append(f"prefix caching is off but {len(registered)} blocks are registered")
    if len(registered) != len(m._index):
        problems.append(
            f"index has {len(m._index)} entries but {len(registered)} blocks are registered"
        )
    for key, b in m._index.items():
        if m._key[b] != key:
            problems.append(f"index entry for block {b} does not match the block's key")
            break
    for b in registered:
        if m._key[b] is None or m._digest(m._key[b]) != m._hash[b]:
            problems.append(f"block {b}: its registered hash is not the digest of its index key")
            break
