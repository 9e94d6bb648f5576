"""The block manager's invariants, as an executable check.

Kept apart from :mod:`block_manager` so the hot paths read without it. The manager
hands its tables over as a :class:`ManagerState` (by reference; nothing here writes
them), so this module imports nothing of the manager itself. Each component checks
its own bookkeeping (the policy, the prefix index, the pins: their ``violations()``);
this module checks what ties them together. Every check has a test that plants the
damage it guards against and watches it fire (``tests/test_integrity_mutations.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

from pagedkv.manager.eviction import EvictionPolicy
from pagedkv.manager.generations import Generations
from pagedkv.manager.ghosts import Ghosts
from pagedkv.manager.hashing import ROOT, chain_hashes
from pagedkv.manager.pins import Pins
from pagedkv.manager.prefix_index import PrefixIndex
from pagedkv.manager.sequence import NULL_BLOCK, SeqRecord
from pagedkv.manager.stats import Counters


@dataclass(frozen=True)
class ManagerState:
    """What the checker reads of a block manager: its size and its tables."""

    num_blocks: int
    block_size: int
    prefix_caching: bool
    digest: Callable[[bytes], bytes]
    free: Sequence[int]  # the free stack
    refs: Sequence[int]  # per block: > 0 in use, < 0 an LRU stamp, else 0
    chains: Mapping[int, int]  # tail block of a held hit chain -> holders
    seqs: Mapping[Hashable, SeqRecord]
    policy: EvictionPolicy
    pins: Pins
    prefix: PrefixIndex
    max_cached: int  # cap on evictable blocks (sys.maxsize: none)
    counters: Counters
    now: float  # the manager's clock when the check started
    ghosts: Ghosts
    generations: Generations
    registered_at: Sequence[int]  # registration stamp of each block (its generation)


def violations(m: ManagerState) -> list[str]:
    """Every violated invariant, each naming the numbers that disagree (empty: all hold)."""
    problems: list[str] = []
    n = m.num_blocks
    free = _free_blocks(m, problems)
    evictable = _policy_blocks(m, problems)
    pinned = m.pins.blocks
    expected = [0] * n  # references the block tables imply
    chains: dict[int, tuple[int, list[int]]] = {}  # tail -> (holders, chain blocks)
    for sid, seq in m.seqs.items():
        if not _sequence_ok(m, sid, seq, problems):
            continue
        for b in seq.blocks[seq.chain or seq.released :]:
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
    if counted != dict(m.chains):
        problems.append(f"chain holders {dict(m.chains)} disagree with the tables' {counted}")

    refs = [max(r, 0) for r in m.refs]  # < 0: an LRU stamp on a cached block
    if expected != refs:
        bad = [b for b in range(n) if expected[b] != refs[b]][:5]
        problems.append(
            "ref counts disagree with block tables at blocks "
            + ", ".join(f"{b} (ref {m.refs[b]}, tables {expected[b]})" for b in bad)
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
    if free & evictable or free & pinned or evictable & pinned:
        problems.append("a block is in two of free / evictable / pinned")
    hashes = m.prefix.hashes
    if any(hashes[b] for b in free):
        problems.append("a free block still has a registered hash")
    if any(not hashes[b] for b in evictable | pinned):
        problems.append("a cached block has no registered hash")
    if len(evictable) > m.max_cached:
        problems.append(
            f"{len(evictable)} evictable cached blocks exceed max_cached_blocks ({m.max_cached})"
        )
    problems += m.pins.violations(hashes, evictable, m.block_size)
    problems += m.prefix.violations(m.prefix_caching)
    problems += m.counters.violations(len(m.seqs), m.block_size)
    problems += m.ghosts.violations()
    problems += m.generations.violations(hashes, m.registered_at)
    return problems


def _free_blocks(m: ManagerState, problems: list[str]) -> set[int]:
    """The free stack as a set (ids outside the pool dropped and reported)."""
    n = m.num_blocks
    free = set(m.free)
    if len(free) != len(m.free):
        problems.append(
            f"free stack holds duplicates ({len(m.free)} entries, {len(free)} distinct)"
        )
    outside = [b for b in free if not (type(b) is int and 0 <= b < n)]
    if outside:
        problems.append(f"free stack holds block ids outside [0, {n}): {outside[:5]}")
        free -= set(outside)
    return free


def _policy_blocks(m: ManagerState, problems: list[str]) -> set[int]:
    """The evictable blocks, after the policy checked its own bookkeeping."""
    order = m.policy.order()
    evictable = set(order)
    if len(order) != len(evictable):
        problems.append(f"eviction policy lists a block twice ({len(order)} entries)")
    if len(evictable) != len(m.policy):
        problems.append(f"policy lists {len(evictable)} blocks but counts {len(m.policy)}")
    problems += m.policy.violations()
    return evictable


def _sequence_ok(m: ManagerState, sid: object, seq: SeqRecord, problems: list[str]) -> bool:
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
    released = _released_violations(sid, seq, bs)
    if released:
        problems += released
        return False
    held = seq.blocks[seq.released :]
    if len(set(held)) != len(held):
        problems.append(f"seq {sid!r} lists a block twice")
    if not 0 <= seq.chain <= min(len(seq.blocks), (len(seq.tokens) - 1) // bs):
        problems.append(
            f"seq {sid!r}: a hit chain of {seq.chain} blocks over {len(seq.tokens)} tokens "
            "(a hit leaves at least one token to compute)"
        )
        return False
    stamp = seq.last_access
    if not isinstance(stamp, (int, float)) or not stamp <= m.now:  # NaN fails too
        problems.append(f"seq {sid!r}: last_access {stamp!r} is not a clock time <= now ({m.now})")
    if seq.private:
        _private_ok(m, sid, seq, problems)
        return True
    gens = m.generations
    if not -1 <= seq.gen <= gens.number:
        problems.append(f"seq {sid!r}: generation {seq.gen} outside [-1, {gens.number}]")
    if not m.prefix_caching:
        return True
    # A sequence registers only in its own generation and hits only what was registered
    # by then: no block it holds was registered later (-1: it holds none registered).
    later = [
        b for b in seq.blocks[seq.released :]  # (not the placeholders of released blocks)
        if m.prefix.hashes[b] and gens.generation_of(m.registered_at[b]) > seq.gen
    ]  # fmt: skip
    if later:
        problems.append(
            f"seq {sid!r} of generation {seq.gen} holds blocks {later[:5]} registered in a "
            "later one"
        )
    chain = chain_hashes(seq.tokens, bs, seq.ns, m.digest)
    if seq.last_hash != (chain[-1] if chain else ROOT):
        problems.append(f"seq {sid!r}: its last block hash is not its tokens' hash")
    anonymous = set(seq.anonymous)
    if not anonymous <= set(seq.blocks[seq.chain or seq.released : len(chain)]):
        problems.append(
            f"seq {sid!r}: anonymous blocks {sorted(anonymous)[:5]} are not among its own "
            "full blocks"
        )
    hashes = m.prefix.hashes
    for i in range(seq.released, min(len(chain), len(seq.blocks))):
        b = seq.blocks[i]
        h = hashes[b]
        if (not h) != (b in anonymous) or (h and h != chain[i]):
            problems.append(
                f"seq {sid!r}: full block {i} (block {b}) is "
                + ("registered under another hash" if h else "unregistered")
                + (" but listed anonymous" if b in anonymous else "")
            )
            break
    if len(seq.blocks) > len(chain) and hashes[seq.blocks[-1]]:
        problems.append(f"seq {sid!r}: its partial last block {seq.blocks[-1]} is registered")
    return True


def _private_ok(m: ManagerState, sid: object, seq: SeqRecord, problems: list[str]) -> None:
    """A private sequence takes no part in prefix caching: no hit chain, no registered
    block, no hash chain."""
    hashes = m.prefix.hashes
    registered = [b for b in seq.blocks[seq.released :] if hashes[b]]
    if seq.chain or registered or seq.anonymous or seq.last_hash != ROOT:
        problems.append(
            f"seq {sid!r} is private but has a hit chain of {seq.chain}, registered blocks "
            f"{registered[:5]}, {len(seq.anonymous)} anonymous ones or a last block hash"
        )


def _released_violations(sid: object, seq: SeqRecord, block_size: int) -> list[str]:
    """What is wrong with ``seq``'s released prefix (empty: all holds)."""
    released, n = seq.released, len(seq.tokens)
    if type(released) is not int or not 0 <= released <= n // block_size:
        return [f"seq {sid!r}: released={released!r} is not in [0, {n // block_size}]"]
    if not released:
        return []
    problems = []
    if seq.chain:
        problems.append(f"seq {sid!r}: {released} released blocks but a hit chain of {seq.chain}")
    if any(b != NULL_BLOCK for b in seq.blocks[:released]):
        problems.append(
            f"seq {sid!r}: a released entry of its table is not NULL_BLOCK ({NULL_BLOCK})"
        )
    return problems
