"""The block manager: paged KV bookkeeping over integer block ids (no tensors here).

Every block is in exactly one state: **free** (never used or invalidated), **in
use** (ref count > 0, held by one or more sequences) or **cached** (ref count 0 with
its hash registered in the prefix index, findable by later prompts; evictable unless
its prefix is pinned). ``free + in use + cached == num_blocks`` always;
:meth:`BlockManager.check_integrity` checks it and everything else that must hold.

This module holds the sequences and the hot operations on them (allocate, append,
fork, free); the on-demand ones (share_prefix, evict, gc) are in
:mod:`~pagedkv.manager.prefix_ops`. The pool's side (reference counts, per-chain
references of prefix hits, the free stack, eviction, pins) is
:mod:`~pagedkv.manager.allocator`; the prefix index, policies, pressure and counters
have their own modules. Each is called once per operation, never per block of a loop.
KV events cost one attribute check per operation while nobody subscribes
(:mod:`~pagedkv.manager.subscriptions`); model changes are
:mod:`~pagedkv.manager.model_change`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence

from pagedkv import _resources
from pagedkv._validate import check_bool, check_callable, check_int, check_new_id
from pagedkv.events import EventHub
from pagedkv.manager.allocator import BlockAllocator, EvictCallback
from pagedkv.manager.config import ManagerConfig, bookkeeping_bytes
from pagedkv.manager.decode_append import DecodeAppends
from pagedkv.manager.eviction import BlockMeta, EvictionPolicy, make_policy
from pagedkv.manager.generations import Generations
from pagedkv.manager.ghosts import Ghosts
from pagedkv.manager.hashing import ROOT, as_token_array, chain_hashes, hash_function
from pagedkv.manager.kv_events import stored_events
from pagedkv.manager.model_change import ModelChanges
from pagedkv.manager.prefix_index import PrefixIndex
from pagedkv.manager.prefix_ops import PrefixOps
from pagedkv.manager.pressure import PressureCallback, PressureWatch
from pagedkv.manager.registration import Registration
from pagedkv.manager.sequence import SeqRecord
from pagedkv.manager.stats import Counters
from pagedkv.manager.subscriptions import EventSource
from pagedkv.manager.window import WindowOps, held_blocks

_DEFAULT = ManagerConfig()


class BlockManager(PrefixOps, WindowOps, Registration, EventSource, ModelChanges, DecodeAppends):
    """Ref-counted paged blocks with prefix caching, copy-on-write and eviction.

    Args:
        num_blocks: physical blocks in the pool (> 0).
        block_size: tokens per block (> 0).
        prefix_caching, eviction, ttl_seconds, extra_keys, hash_algo, watermarks,
        min_prefix_tokens, max_cached_blocks, ghost_bytes: the options of
            :class:`~pagedkv.manager.ManagerConfig` (same defaults; or build the manager
            with :meth:`from_config`).
        on_evict: called as ``on_evict(block_id, block_hash)`` when a cached block is
            evicted, before it is handed out again (tiers copy the bytes out there).
            It must not raise.
        clock: time source for TTL and :meth:`seq_stats`'s ``last_access`` (seconds,
            monotonic); for tests.

    Every operation is atomic: on bad input or when blocks run out it raises and
    leaves the state exactly as it was.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        prefix_caching: bool = _DEFAULT.prefix_caching,
        eviction: str = _DEFAULT.eviction,
        ttl_seconds: float | None = _DEFAULT.ttl_seconds,
        extra_keys: Sequence[object] = _DEFAULT.extra_keys,
        hash_algo: str = _DEFAULT.hash_algo,
        watermarks: tuple[float, float, float] = _DEFAULT.watermarks,
        min_prefix_tokens: int = _DEFAULT.min_prefix_tokens,
        max_cached_blocks: int | None = _DEFAULT.max_cached_blocks,
        ghost_bytes: int = _DEFAULT.ghost_bytes,
        on_evict: EvictCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_int(num_blocks, "num_blocks", minimum=1)
        check_int(block_size, "block_size", minimum=1)
        config = ManagerConfig(
            prefix_caching=prefix_caching, eviction=eviction, ttl_seconds=ttl_seconds,
            extra_keys=extra_keys, hash_algo=hash_algo, watermarks=watermarks,
            min_prefix_tokens=min_prefix_tokens, max_cached_blocks=max_cached_blocks,
            ghost_bytes=ghost_bytes,
        )  # fmt: skip
        if on_evict is not None:
            check_callable(on_evict, "on_evict", "(block_id, block_hash) -> None")
        check_callable(clock, "clock", "returning seconds (e.g. time.monotonic)")
        need = config.bookkeeping_bytes(num_blocks, block_size)
        _resources.require_memory(
            "BlockManager", "num_blocks", num_blocks, need,
            unit_bytes=need // num_blocks, detail="bookkeeping with every block in use",
        )  # fmt: skip
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = config.prefix_caching
        self._min_prefix_tokens = config.min_prefix_tokens
        self._clock = clock
        self._digest = hash_function(config.hash_algo)
        meta = BlockMeta(num_blocks)
        self._prefix = PrefixIndex(
            num_blocks, block_size, self._digest, tuple(config.extra_keys), meta
        )
        self._counters = Counters()
        self._gens = Generations(tuple(config.extra_keys))
        self._alloc = BlockAllocator(
            meta, self._prefix, lambda: self._new_policy(meta), self._counters, on_evict,
            prefix_caching=config.prefix_caching, max_cached=config.max_cached_blocks,
            ghosts=Ghosts(config.ghost_bytes, len(self._digest(b""))), generations=self._gens,
        )  # fmt: skip
        self._ref = meta.ref  # the allocator's ref counts (changed in place, never replaced)
        self._seqs: dict[Hashable, SeqRecord] = {}
        self._copies: list[tuple[int, int]] = []
        self._watch: PressureWatch | None = None  # created by the first on_pressure()
        self._events: EventHub | None = None  # while someone subscribes
        # Whether an operation has anyone to tell (pressure callbacks, KV events): the one
        # check a finished operation makes.
        self._observed = False

    @classmethod
    def from_config(
        cls,
        num_blocks: int,
        block_size: int,
        config: ManagerConfig,
        *,
        on_evict: EvictCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> BlockManager:
        """A manager of ``num_blocks`` blocks of ``block_size`` tokens with ``config``."""
        if not isinstance(config, ManagerConfig):
            raise TypeError(f"config must be a ManagerConfig, got {type(config).__name__}")
        return cls(
            num_blocks, block_size, prefix_caching=config.prefix_caching,
            eviction=config.eviction, ttl_seconds=config.ttl_seconds,
            extra_keys=config.extra_keys, hash_algo=config.hash_algo,
            watermarks=config.watermarks, min_prefix_tokens=config.min_prefix_tokens,
            max_cached_blocks=config.max_cached_blocks, ghost_bytes=config.ghost_bytes,
            on_evict=on_evict, clock=clock,
        )  # fmt: skip

    def _new_policy(self, meta: BlockMeta) -> EvictionPolicy:
        c = self.config
        return make_policy(c.eviction, meta, ttl_seconds=c.ttl_seconds, clock=self._clock)

    @staticmethod
    def bookkeeping_bytes(
        num_blocks: int, block_size: int, *, prefix_caching: bool = True, hash_algo: str = "sha256"
    ) -> int:
        """Host bytes a manager of this size holds with every block in use (an estimate;
        see :func:`pagedkv.manager.config.bookkeeping_bytes`). The constructor refuses,
        with :class:`~pagedkv.errors.ResourceError`, more than the host has available."""
        return bookkeeping_bytes(
            num_blocks, block_size, prefix_caching=prefix_caching, hash_algo=hash_algo
        )

    # -------------------------------------------------------------- allocation

    def allocate(
        self,
        seq_id: Hashable,
        token_ids: Sequence[int],
        salt: object = None,
        *,
        share_prefix: bool = True,
        whole: bool = False,
    ) -> int:
        """Start sequence ``seq_id`` with its prompt; return how many tokens are cached.

        Reserves ``ceil(len / block_size)`` blocks, reusing (with a reference) the
        longest chain of cached full blocks that match the prompt in ``salt``'s
        namespace. The result is a multiple of ``block_size`` and at most ``len - 1``:
        one token is always left to compute; ``whole=True`` reuses the last full block
        too (the result may be ``len``), for a caller that has the last position's
        output already (the engine's stored logits). Full blocks of the prompt become
        findable at once; the caller writes their KV in the same step (or drops the
        sequence with :meth:`discard` if it cannot).

        ``share_prefix=False`` (for privacy-sensitive requests), like a prompt shorter
        than ``min_prefix_tokens``, makes the sequence private: it reuses no cached
        block and none of its blocks (prompt or appended) is ever registered, so no
        other prompt can find them; they become free, never cached, when released.
        Its forks and :meth:`share_prefix` sequences are private too.

        Raises ``ValueError`` for a live ``seq_id`` or an empty prompt, ``TypeError``/
        ``ValueError`` for bad token ids or a non-bool ``share_prefix`` / ``whole``,
        :class:`OutOfBlocks` when the pool is full; nothing changes in any of these
        cases (but the ``allocation_failures`` counter).
        """
        check_new_id(self._seqs, seq_id)
        if share_prefix is not True and share_prefix is not False:
            check_bool(share_prefix, "share_prefix")
        if whole is not False and whole is not True:
            check_bool(whole, "whole")
        arr = as_token_array(token_ids)
        n = len(arr)
        if n == 0:
            raise ValueError("token_ids is empty: a prompt needs at least one token")
        prefix, alloc = self._prefix, self._alloc
        ns = prefix.namespace(salt)
        bs = self.block_size
        raw = arr.tobytes()
        private = not share_prefix or n < self._min_prefix_tokens
        shares = self.prefix_caching and not private
        hits = prefix.match(raw, ns, (n if whole else n - 1) // bs) if shares else []
        if hits:
            hits = alloc.policy.usable(hits)
        need = -(-n // bs) - len(hits)
        if need > alloc.num_free - (alloc.reclaimed_by(hits) if hits else 0):
            self._counters.allocation_failures += 1
            raise alloc.out_of_blocks(need, f"allocate({seq_id!r}, {n} tokens)")

        # Commit: nothing below can fail (on_evict must not raise).
        counters = self._counters
        if hits:
            alloc.hold_chain(hits)
            counters.requests_with_hit += 1
        else:
            counters.requests_without_hit += 1
        blocks = hits + alloc.take(need)
        parent = prefix.hashes[hits[-1]] if hits else ROOT
        seq = self._seqs[seq_id] = SeqRecord(
            blocks, arr, parent, ns, len(hits), self._gens.number, private, self._clock()
        )
        if shares:
            seq.last_hash = prefix.register_blocks(
                blocks, len(hits), n // bs, raw, 0, ns, parent, seq.anonymous
            )
        counters.query_tokens += n
        counters.hit_tokens += len(hits) * bs
        if self._observed:
            if self._events is not None and shares:
                self._events.pending += stored_events(
                    prefix, blocks, len(hits), n // bs, raw, 0, ns, parent, seq.anonymous
                )
            self._after()
        return len(hits) * bs

    def append(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
        """Reserve slots for more tokens of a live sequence.

        A shared (ref > 1), partly filled last block is copied on write first: a
        fresh block replaces it in this sequence and ``(src, dst)`` is queued for
        :meth:`take_copies`. Blocks that become full are registered for reuse.
        """
        seq = self._seqs.get(seq_id)
        if seq is None:
            seq = self._seq(seq_id)  # raises the KeyError
        arr = as_token_array(token_ids)
        k = len(arr)
        if k == 0:
            raise ValueError("token_ids is empty: append() needs at least one token")
        bs = self.block_size
        n = len(seq.tokens)
        blocks = seq.blocks
        new_blocks = -(-(n + k) // bs) - len(blocks)
        cow = n % bs != 0 and self._ref[blocks[-1]] > 1
        if new_blocks or cow:
            alloc = self._alloc
            if new_blocks + cow > alloc.num_free:
                self._counters.allocation_failures += 1
                raise alloc.out_of_blocks(new_blocks + cow, f"append({seq_id!r}, {k} tokens)")
            taken = alloc.take(new_blocks + cow)
            if cow:
                src, dst = blocks[-1], taken.pop(0)
                self._ref[src] -= 1  # was > 1: stays in use by the other holders
                blocks[-1] = dst
                self._copies.append((src, dst))
                self._counters.cow_copies += 1
            blocks.extend(taken)
            # Stamped only when the table changes: a clock read per token costs ~15 %.
            seq.last_access = self._clock()
        tokens = seq.tokens
        tokens.extend(arr)
        first, stop = n // bs, (n + k) // bs
        if stop > first and self.prefix_caching and not seq.private:
            parent = seq.last_hash
            if seq.gen != self._gens.number:  # its KV mixes models: cache none of it
                full = tokens[first * bs : stop * bs]
                seq.last_hash = chain_hashes(full, bs, seq.ns, self._digest, parent)[-1]
                seq.anonymous += blocks[first:stop]
            else:
                raw = tokens[first * bs : stop * bs].tobytes()
                seq.last_hash = self._prefix.register_blocks(
                    blocks, first, stop, raw, first, seq.ns, parent, seq.anonymous
                )
                if self._events is not None:
                    self._events.pending += stored_events(
                        self._prefix, blocks, first, stop, raw, first, seq.ns, parent,
                        seq.anonymous,
                    )  # fmt: skip
        if self._observed:
            self._after()

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Make ``child_id`` a sequence with the parent's tokens, sharing every block.

        The first append to a shared, partly filled last block copies it on write.
        A private parent has a private child.
        """
        parent = self._seq(parent_id)
        check_new_id(self._seqs, child_id, "child_id", "use a new child_id")
        self._alloc.share(held_blocks(parent), parent.chain)
        self._seqs[child_id] = parent.fork(self._clock())
        self._counters.forks += 1
        if self._observed:
            self._after()

    def free(self, seq_id: Hashable) -> None:
        """Drop the sequence's references.

        A block left unreferenced stays findable as cached (evictable) when its hash
        is registered, and becomes free otherwise. Unknown id -> ``KeyError``.
        """
        try:
            seq = self._seqs.pop(seq_id)
        except KeyError:
            raise KeyError(
                f"unknown sequence {seq_id!r}: it was never allocated or is already freed"
            ) from None
        blocks = seq.blocks if not seq.released else held_blocks(seq)
        if seq.private:
            self._alloc.release_private(blocks)
        else:
            partial = len(seq.tokens) % self.block_size != 0
            self._alloc.release(blocks, seq.chain, seq.anonymous, partial)
        self._counters.deallocations += 1
        if self._observed:
            self._after()

    def _after(self) -> None:
        """An operation finished: pressure callbacks, then the KV events it caused."""
        if self._watch is not None:
            self._watch.update(self.num_used_blocks, self.num_blocks)
        if self._events is not None:
            self._events.end()

    def discard(self, seq_id: Hashable, written: int = 0) -> None:
        """Release a sequence whose KV was never (fully) written, caching nothing of it.

        For a just-allocated sequence whose bytes could not be loaded (a failed swap-in
        or tier load), or a failed forward: the blocks it registered and holds alone
        become free and unregistered, so no later prompt can hit their garbage; its
        prefix hits, blocks other sequences hold too, and the full blocks within its
        first ``written`` tokens (KV written before) are released as :meth:`free` does.
        Unknown id -> ``KeyError``; a bad ``written`` -> ``TypeError``/``ValueError``.
        """
        seq = self._seq(seq_id)
        check_int(written, "written", minimum=0)
        if self.prefix_caching:
            ref, hashes = self._ref, self._prefix.hashes
            first = max(seq.chain or seq.released, written // self.block_size)
            own = [b for b in seq.blocks[first:] if ref[b] == 1 and hashes[b]]
            self._alloc.unregister(own)
            seq.anonymous += own  # so free() hands them back as free blocks
        self.free(seq_id)  # delivers the removals too

    def take_copies(self) -> list[tuple[int, int]]:
        """Copy-on-write copies ``(src_block, dst_block)`` owed to storage since last call.

        Storage must copy every block's KV before the caller writes into ``dst``.
        """
        copies, self._copies = self._copies, []
        return copies

    # ---------------------------------------------------------------- pressure

    def on_pressure(self, callback: PressureCallback) -> None:
        """Call ``callback(level)`` whenever the memory-pressure level changes."""
        if not callable(callback):
            raise TypeError("on_pressure() takes a callable (MemoryPressure) -> None")
        if self._watch is None:
            self._watch = PressureWatch(self.config.watermarks, self.pressure)
            self._observed = True
        self._watch.callbacks.append(callback)
        self._watch.level = self.pressure
