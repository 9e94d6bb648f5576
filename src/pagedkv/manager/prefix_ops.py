"""The block manager's on-demand operations over its prefix cache and sequences.

:class:`PrefixOps` is the part of :class:`~pagedkv.manager.BlockManager` (which
subclasses it) that no request's hot path calls: a new sequence sharing a prefix of
another (``share_prefix``), pins, eviction on demand (``evict``), a collection pass
(``gc``) and ``reset_prefix_cache`` (forced too). Each works through the allocator and
the prefix index, once per call, and ends as every operation does: pressure callbacks
and the KV events it caused (blocks evicted, expired or unregistered) go out once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

from pagedkv._validate import check_bool, check_int, check_new_id
from pagedkv.events import EventHub
from pagedkv.manager.hashing import ROOT, chain_hashes
from pagedkv.manager.pressure import PressureWatch
from pagedkv.manager.reads import ManagerReads
from pagedkv.manager.sequence import SeqRecord


class PrefixOps(ManagerReads):
    """share_prefix, evict, gc (see :class:`~pagedkv.manager.BlockManager`)."""

    _copies: list[tuple[int, int]]
    _watch: PressureWatch | None
    _events: EventHub | None
    _observed: bool
    _after: Callable[[], None]
    fork: Callable[[Hashable, Hashable], None]

    def share_prefix(self, src_id: Hashable, dst_id: Hashable, num_tokens: int) -> None:
        """Make ``dst_id`` a new sequence holding the first ``num_tokens`` tokens of ``src_id``.

        Its full blocks are the source's, shared and ref-counted as a fork shares them.
        When ``num_tokens`` is not a multiple of ``block_size`` the block holding its
        last tokens is copied into a fresh block (``(src_block, dst_block)`` is queued
        for :meth:`take_copies`; storage copies it before ``dst`` is written), so two
        sequences never share a partly filled block they fill differently.
        ``num_tokens == num_tokens(src_id)`` is :meth:`fork`. ``dst`` has the source's
        namespace (salt) and privacy; later appends to either are independent.

        Raises ``KeyError`` for an unknown ``src_id``, ``ValueError`` for a live
        ``dst_id``, ``TypeError``/``ValueError`` unless ``0 < num_tokens <=
        num_tokens(src_id)``, :class:`OutOfBlocks` when the copy finds no block;
        nothing changes in any of these cases (but ``allocation_failures``).
        """
        src = self._seq(src_id)
        check_new_id(self._seqs, dst_id, "dst_id", "use a new dst_id")
        check_int(num_tokens, "num_tokens", minimum=1)
        n = len(src.tokens)
        if num_tokens > n:
            raise ValueError(
                f"num_tokens={num_tokens} is more than sequence {src_id!r} holds ({n} tokens)"
            )
        if num_tokens == n:
            self.fork(src_id, dst_id)
            return
        bs, alloc = self.block_size, self._alloc
        full, rest = divmod(num_tokens, bs)
        released = src.released  # leading blocks released outside a sliding window
        if full < released or (full == released and not rest and released):
            raise ValueError(
                f"num_tokens={num_tokens}: sequence {src_id!r} released its blocks before "
                f"token {released * bs} (sliding window); share more of it than that"
            )
        if rest and not alloc.num_free:
            self._counters.allocation_failures += 1
            raise alloc.out_of_blocks(1, f"share_prefix({src_id!r}, {dst_id!r}, {num_tokens})")
        shared = src.blocks[:full]
        # The source's hit chain is kept if dst holds all of it and a token more (as any
        # hit leaves one token); else dst holds its blocks with per-block references.
        chain = src.chain if src.chain <= (num_tokens - 1) // bs else 0
        last_hash = ROOT
        if full and self.prefix_caching and not src.private:
            if full > released:
                last_hash = self._prefix.block_hashes(src, full - 1, full)[0]
            else:  # that block was released: its table entry is a placeholder
                last_hash = chain_hashes(src.tokens[: full * bs], bs, src.ns, self._digest)[-1]
        alloc.share(shared[released:], chain)  # (chain is 0 when blocks were released)
        blocks = list(shared)
        if rest:
            (copy,) = alloc.take(1)
            self._copies.append((src.blocks[full], copy))
            self._counters.cow_copies += 1
            blocks.append(copy)
        seq = SeqRecord(
            blocks, src.tokens[:num_tokens], last_hash, src.ns, chain, src.gen, src.private,
            self._clock(),
        )  # fmt: skip
        if src.anonymous:
            # by block id, so not over released positions: their placeholder 0 is also
            # the id of a real block, which src may hold anonymously further on
            mine = set(shared[released:])
            seq.anonymous = [b for b in src.anonymous if b in mine]
        seq.released = released
        self._seqs[dst_id] = seq
        self._counters.forks += 1
        if self._observed:  # it registers nothing; blocks it took may have been evicted
            self._after()

    # ------------------------------------------------------------- pins, reset

    def pin(self, token_ids: Sequence[int], salt: object = None) -> int:
        """Keep the cached blocks of this prefix from eviction until :meth:`unpin`.

        Pins are by content: blocks of the prefix registered later are protected
        too. Pins nest (pin twice, unpin twice). Returns how many of the prefix's
        full blocks are resident (cached or in use) now.
        """
        keys = self._prefix.prefix_keys(token_ids, salt)
        if not keys:
            raise ValueError(
                f"token_ids has no full block (block_size={self.block_size}); "
                "only full blocks are cached and can be pinned"
            )
        resident = self._alloc.pin(keys, salt)
        if self._events is not None:  # expired blocks were dropped first
            self._events.end()
        return resident

    def unpin(self, token_ids: Sequence[int], salt: object = None) -> int:
        """Undo one :meth:`pin` of this prefix; returns the number of blocks unpinned.

        Raises ``ValueError`` (and changes nothing) if the prefix is not pinned.
        """
        keys = self._prefix.prefix_keys(token_ids, salt)
        if not self._alloc.pins.is_pinned(keys):
            raise ValueError(
                "token_ids: this prefix is not pinned (pin() it first, with the same salt)"
            )
        self._alloc.unpin(keys)
        if self._events is not None:  # over max_cached_blocks, some were evicted
            self._events.end()
        return len(keys)

    def reset_prefix_cache(self, *, force: bool = False) -> bool:
        """Forget every cached block: cached blocks (pinned ones too) become free and no
        prompt finds anything registered before. Pins are kept (they protect content
        registered later). Neither ``on_evict`` is called (tiers keep what they hold)
        nor are the counters reset.

        While any block is in use this returns False and changes nothing, unless
        ``force=True``: then the blocks in use are kept, with their KV, by their
        sequences, which go on unchanged, but they are unregistered — no prompt finds
        them, and they become free, not cached, when released; blocks those sequences
        fill later are registered as usual. Returns True when it reset.
        """
        check_bool(force, "force")
        if self.num_used_blocks:
            if not force:
                return False
            self._unregister_in_use()
        self._alloc.reset()
        if self._observed:
            self._after()
        return True

    def _unregister_in_use(self) -> None:
        """Make every block in use unregistered (recorded anonymous by its holders)."""
        alloc, ref, bs = self._alloc, self._ref, self.block_size
        # Hit chains must be registered (their last holder releases them as cached), so
        # each chain's shared reference becomes one reference per holder.
        seen: set[int] = set()
        for seq in self._seqs.values():
            if seq.chain:
                tail = seq.blocks[seq.chain - 1]
                if tail not in seen:
                    seen.add(tail)
                    extra = alloc.chains[tail] - 1
                    for b in seq.blocks[: seq.chain]:
                        ref[b] += extra
                seq.chain = 0
        alloc.chains.clear()
        hashes = self._prefix.hashes
        registered = {
            b
            for seq in self._seqs.values()
            for b in seq.blocks[seq.released : len(seq.tokens) // bs]
            if hashes[b]
        }
        for seq in self._seqs.values():
            full = seq.blocks[seq.released : len(seq.tokens) // bs]
            seq.anonymous += [b for b in full if b in registered]
        alloc.unregister(list(registered))

    def evict(self, n: int) -> int:
        """Evict up to ``n`` cached blocks, in the policy's order; returns how many.

        Each becomes free (unregistered), ``on_evict`` is called for it (tiers demote
        it); pinned blocks and blocks in use are never evicted. Expired blocks (TTL)
        are dropped first, as before any block is handed out, and are not counted.
        """
        check_int(n, "n", minimum=0)
        evicted = self._alloc.evict_cached(n)
        if self._observed:
            self._after()
        return evicted

    def gc(self) -> int:
        """A collection pass: drop the expired cached blocks (TTL) and evict those over
        ``max_cached_blocks`` (both are otherwise done lazily, when blocks are handed
        out or released). Returns how many blocks became free."""
        freed = self._alloc.expire() + self._alloc.trim()
        if self._observed:
            self._after()
        return freed
