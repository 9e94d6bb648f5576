"""The block allocator: reference counts (per block and per hit chain), the free stack,
and the cached blocks to reclaim.

A block not in use is free (on the stack, handed out most recently freed first) or
cached: registered in the prefix index and either evictable (listed by the eviction
policy) or pinned (held by :class:`~pagedkv.manager.pins.Pins`).

Reference counts of prefix hits are shared per *chain*: the blocks a prompt found
cached (a path from the root of the prefix tree, named by its last block) hold one
reference each for all live sequences that found that same chain, counted in
``chains``. Requests that share a system prompt then take and drop that prompt's
blocks in O(1); only the first to find the chain and the last to free it touch
every block. So ``ref[b]`` = sequences holding ``b`` outside a chain + live chains
through ``b``, and a block is in use exactly when some live sequence's table holds it.

The block manager decides which blocks a sequence holds; this module keeps the
pool's side of it, one call per operation. Every registered block it drops goes
through one boundary per operation: the ghost list (evictions and expiries, for
``explain``), then ``_dropped``: the model generations' counts and, when someone
subscribes, a :class:`~pagedkv.events.BlockRemoved` event.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from pagedkv.errors import OutOfBlocks
from pagedkv.events import DEVICE, AllBlocksCleared, BlockRemoved, EventHub
from pagedkv.manager.eviction import BlockMeta, EvictionPolicy
from pagedkv.manager.generations import Generations
from pagedkv.manager.ghosts import EVICTED, EXPIRED, Ghosts
from pagedkv.manager.pins import Pins
from pagedkv.manager.prefix_index import PrefixIndex
from pagedkv.manager.stats import Counters

EvictCallback = Callable[[int, bytes], None]


class BlockAllocator:
    """The ``num_blocks`` blocks of one pool and what state each is in.

    ``ref`` (shared with the policies through ``meta``) holds each block's reference
    count, > 0 while in use; ``chains`` the holders of each held hit chain (by its
    last block); ``free`` is the free stack; ``policy`` lists evictable cached blocks;
    ``pins.blocks`` the pinned cached ones. ``ref`` and ``free`` are changed in place,
    never replaced, so a holder of either stays current. At most ``max_cached``
    blocks are evictable between operations: a release beyond it evicts the excess.
    ``ghosts`` remembers what was evicted or expired, ``generations`` counts
    registrations of earlier models, and ``events`` (set by the manager while someone
    subscribes) collects removals.
    """

    def __init__(
        self,
        meta: BlockMeta,
        prefix: PrefixIndex,
        new_policy: Callable[[], EvictionPolicy],
        counters: Counters,
        on_evict: EvictCallback | None,
        *,
        prefix_caching: bool,
        max_cached: int | None = None,
        ghosts: Ghosts,
        generations: Generations,
    ) -> None:
        self.num_blocks = len(meta.ref)
        self.prefix_caching = prefix_caching
        self.capped = max_cached is not None  # tested once per release, before len(policy)
        self.max_cached = sys.maxsize if max_cached is None else max_cached
        self.ref = meta.ref  # > 0: in use; < 0: listed by LRU (see LRUPolicy); else 0
        self.chains: dict[int, int] = {}  # last block of a held hit chain -> sequences
        self.free = list(range(self.num_blocks - 1, -1, -1))  # a stack: pops 0, 1, 2, ...
        self.pins = Pins()
        self._new_policy = new_policy
        self.policy = new_policy()
        self._prefix = prefix
        self._counters = counters
        self._on_evict = on_evict
        self.registered_at = meta.registered_at
        self.ghosts = ghosts
        self.generations = generations
        self.events: EventHub | None = None

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now: free + evictable cached."""
        return len(self.free) + len(self.policy)

    @property
    def num_used(self) -> int:
        """Blocks with ref count > 0."""
        return self.num_blocks - len(self.free) - len(self.policy) - len(self.pins.blocks)

    def out_of_blocks(self, need: int, what: str) -> OutOfBlocks:
        """The error for ``what`` needing ``need`` blocks more than :attr:`num_free`."""
        return OutOfBlocks(
            f"{what} needs {need} new block(s) but only {self.num_free} are free or "
            f"evictable ({self.num_used} of {self.num_blocks} in use, "
            f"{len(self.pins.blocks)} pinned); free or preempt a sequence, unpin prefixes, "
            f"or use a larger pool"
        )

    # ---------------------------------------------------------------- taking

    def reclaimed_by(self, hits: list[int]) -> int:
        """How many blocks :meth:`hold_chain` of ``hits`` would take out of
        :attr:`num_free` (the evictable ones of a chain nobody holds yet)."""
        if not hits or hits[-1] in self.chains:  # a held chain's blocks are all in use
            return 0
        ref, pinned = self.ref, self.pins.blocks
        return sum(1 for b in hits if ref[b] <= 0 and b not in pinned)

    def hold_chain(self, hits: list[int]) -> None:
        """One more sequence holds the prefix hit chain ``hits`` (not empty)."""
        tail, chains = hits[-1], self.chains
        if tail in chains:
            chains[tail] += 1
        else:
            chains[tail] = 1
            ref, pinned, policy = self.ref, self.pins.blocks, self.policy
            for b in hits:
                if ref[b] <= 0:
                    if b in pinned:
                        pinned.discard(b)
                    else:
                        policy.remove(b)  # leaves ref 0
                ref[b] += 1
        self.policy.on_hits(hits)

    def share(self, blocks: list[int], chain: int) -> None:
        """A fork: one more holder of a table whose first ``chain`` blocks are a chain."""
        if chain:
            self.chains[blocks[chain - 1]] += 1
        ref = self.ref
        for b in blocks[chain:]:
            ref[b] += 1

    def take(self, n: int) -> list[int]:
        """Hand out ``n`` blocks (the caller checked :attr:`num_free`), ref 1 each: free
        ones first (most recently freed first), then evicted cached ones."""
        expired = self.policy.expire()  # a hook call, not a TTL flag: () without expiry
        if expired:
            self._drop_expired(expired)
        free = self.free
        if n <= len(free):
            cut = len(free) - n
            taken = free[cut:]
            del free[cut:]
            taken.reverse()
        else:
            taken = free[::-1]
            free.clear()
            taken += self._evict(n - len(taken))
        ref = self.ref
        for b in taken:
            ref[b] = 1
        self._counters.blocks_allocated += n
        return taken

    def _evict(self, n: int) -> list[int]:
        policy, prefix, on_evict = self.policy, self._prefix, self._on_evict
        out, gone = [], []
        for _ in range(n):
            block = policy.pop()
            evicted_hash = prefix.drop(block)
            if on_evict is not None:
                on_evict(block, evicted_hash)
            out.append(block)
            gone.append(evicted_hash)
        self._counters.evictions += n
        self.ghosts.add(gone, EVICTED)
        if self.generations.active or self.events is not None:
            self._dropped(out, gone)
        return out

    def expire(self) -> int:
        """Drop the cached blocks the policy says have expired (they become free);
        returns how many."""
        expired = self.policy.expire()
        if expired:
            self._drop_expired(expired)
        return len(expired)

    def _drop_expired(self, blocks: Sequence[int]) -> None:
        drop = self._prefix.drop
        gone = [drop(block) for block in blocks]
        self.free.extend(blocks)
        self._counters.evictions += len(blocks)  # expiry counts as an eviction
        self.ghosts.add(gone, EXPIRED)
        self._dropped(blocks, gone)

    def _dropped(self, blocks: Sequence[int], hashes: list[bytes]) -> None:
        """Registered ``blocks`` (with ``hashes``) were just unregistered (the caller told
        the ghost list, if their KV existed)."""
        if self.generations.active:
            self.generations.dropped(blocks, self.registered_at)
        if self.events is not None:
            self.events.pending.append(BlockRemoved(hashes, DEVICE))

    # ------------------------------------------------------------- releasing

    def release(
        self, blocks: list[int], chain: int, unregistered: list[int], partial: bool
    ) -> None:
        """Drop one sequence's references to its table ``blocks``.

        ``blocks[:chain]`` are held through their chain; a block left unreferenced is
        cached if registered and free otherwise. Which are registered is told, not
        looked up (a look at each block's hash is a cache miss): every full block but
        those in ``unregistered`` (``partial``: the last block is not full).
        """
        ref, free = self.ref, self.free
        cached: list[int] = []
        # Tail blocks first: within one release the tail becomes least recently used,
        # so eviction takes a sequence's unique suffix before its (shared) prefix.
        for b in reversed(blocks[chain:] if chain else blocks):
            r = ref[b] - 1
            ref[b] = r
            if not r:
                cached.append(b)
        if cached and not self.prefix_caching:  # nothing is registered
            free.extend(cached)
            cached = []
        elif cached:
            if partial and cached[0] == blocks[-1]:
                free.append(cached.pop(0))
            if unregistered:
                skip = set(unregistered)
                free.extend(b for b in cached if b in skip)
                cached = [b for b in cached if b not in skip]
        if chain:
            chains, tail = self.chains, blocks[chain - 1]
            holders = chains[tail] - 1
            if holders:
                chains[tail] = holders
            else:  # the chain's last holder: its blocks drop their shared reference
                del chains[tail]
                for b in reversed(blocks[:chain]):
                    r = ref[b] - 1
                    ref[b] = r
                    if not r:
                        cached.append(b)  # a hit block is always registered
        if cached:
            if self.pins.counts:  # pinned content is held out of the policy
                cached = self.pins.hold(cached, self._prefix.hashes)
            self.policy.add_many(cached)
            if self.capped and len(self.policy) > self.max_cached:
                self.trim()

    def release_private(self, blocks: list[int]) -> None:
        """Drop a private sequence's references (no hit chain, nothing registered): a
        block left unreferenced becomes free."""
        ref, free = self.ref, self.free
        for b in reversed(blocks):
            r = ref[b] - 1
            ref[b] = r
            if not r:
                free.append(b)

    def trim(self) -> int:
        """Bring the evictable blocks down to ``max_cached``: expired ones are dropped
        first, then the policy's choice is evicted (``on_evict``). Returns how many
        blocks became free."""
        if len(self.policy) <= self.max_cached:
            return 0
        freed = self.expire()
        over = len(self.policy) - self.max_cached
        if over > 0:
            self.free.extend(self._evict(over))
            freed += over
        return freed

    def evict_cached(self, n: int) -> int:
        """Evict up to ``n`` evictable blocks by the policy (``on_evict``; they become
        free), after dropping the expired ones (not counted); returns how many."""
        self.expire()
        n = min(n, len(self.policy))
        if n:
            self.free.extend(self._evict(n))
        return n

    def unregister(self, blocks: Sequence[int]) -> None:
        """Drop the registrations of blocks in use (their content is not to be found)."""
        if blocks:
            drop = self._prefix.drop
            self._dropped(blocks, [drop(b) for b in blocks])

    # ------------------------------------------------------------ pins, reset

    def pin(self, keys: list[tuple[bytes, bytes]], salt: object = None) -> int:
        """Pin a prefix (see :meth:`Pins.pin`) after dropping expired blocks, which a pin
        must not revive."""
        self.expire()
        return self.pins.pin(keys, self._prefix, self.policy, salt)

    def unpin(self, keys: list[tuple[bytes, bytes]]) -> None:
        """Release one pin of a pinned prefix; blocks whose last pin went are evictable
        (beyond ``max_cached``, the policy's choice is evicted)."""
        self.policy.add_many(self.pins.unpin(keys, self._prefix))
        if len(self.policy) > self.max_cached:
            self.trim()

    def reset(self) -> None:
        """Forget every cached block (evictable or pinned): each becomes free. Blocks in
        use keep their references; with none in use the free stack is as when new.

        The ghost list remembers them as evicted; subscribers hear AllBlocksCleared."""
        cached = [*self.policy.order(), *self.pins.blocks]
        ref, drop = self.ref, self._prefix.drop
        self.ghosts.add([drop(b) for b in cached], EVICTED)
        for block in cached:
            ref[block] = 0  # clears an LRU stamp
        self.generations.clear()
        if self.events is not None:
            self.events.pending.append(AllBlocksCleared(DEVICE))
        if len(self.free) + len(cached) == self.num_blocks:  # nothing in use: as when new
            self.free[:] = range(self.num_blocks - 1, -1, -1)
        else:
            self.free[:] = sorted({*self.free, *cached}, reverse=True)
        self.policy = self._new_policy()
        self.pins.blocks.clear()
