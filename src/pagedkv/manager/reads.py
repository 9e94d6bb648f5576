"""The block manager's reads: queries that change nothing, statistics, the audit.

:class:`ManagerReads` is the read-only half of
:class:`~pagedkv.manager.BlockManager` (which subclasses it and sets the attributes
declared below); every method that changes state is in :mod:`block_manager`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

from pagedkv._forward import read_through
from pagedkv._validate import check_int, unknown_sequence
from pagedkv.errors import CacheIntegrityError
from pagedkv.manager import integrity
from pagedkv.manager.allocator import BlockAllocator
from pagedkv.manager.config import ManagerConfig
from pagedkv.manager.generations import Generations
from pagedkv.manager.hashing import as_token_array, chain_hashes
from pagedkv.manager.prefix_index import PrefixIndex, PromptMatch
from pagedkv.manager.pressure import MemoryPressure, pressure_level
from pagedkv.manager.sequence import SeqRecord, full_block_range, slot_mapping
from pagedkv.manager.stats import CacheStats, Counters, SeqStats, unused_slots


class DevicePrefix(NamedTuple):
    """What the device holds of a prompt's full blocks (:meth:`ManagerReads.device_prefix`).

    ``hashes``: each full block's chained hash in the salt's namespace; ``statuses``:
    ``"device"`` (registered, matchable), ``"expired"`` (registered but idle past the
    TTL, or expired lately), ``"evicted"`` (evicted lately) or ``None`` (not seen, as far
    as the ghost list remembers); ``hit_blocks``: the leading blocks a new
    :meth:`~pagedkv.manager.BlockManager.allocate` would reuse.
    """

    hashes: list[bytes]
    statuses: list[str | None]
    hit_blocks: int


class ManagerReads:
    """Queries over a block manager's state (see :class:`~pagedkv.manager.BlockManager`)."""

    config: ManagerConfig
    num_blocks: int
    block_size: int
    prefix_caching: bool
    _min_prefix_tokens: int
    _clock: Callable[[], float]
    _digest: Callable[[bytes], bytes]
    _ref: list[int]
    _seqs: dict[Hashable, SeqRecord]
    _alloc: BlockAllocator
    _prefix: PrefixIndex
    _counters: Counters
    _gens: Generations

    # The manager's settings, read through from ``config`` (read-only properties).
    eviction: str = read_through("config.eviction", "The eviction policy's name (lower case).")
    ttl_seconds: float | None = read_through(
        "config.ttl_seconds", "Idle time after which a cached block expires (``None``: never)."
    )
    hash_algo: str = read_through(
        "config.hash_algo", 'The block hash (``"sha256"`` or ``"xxh3_128"``).'
    )
    watermarks: tuple[float, float, float] = read_through(
        "config.watermarks", "Used fractions at which pressure turns MEDIUM, HIGH, CRITICAL."
    )
    min_prefix_tokens: int = read_through(
        "config.min_prefix_tokens",
        "Prompts shorter than this are private (no hit, nothing registered).",
    )
    max_cached_blocks: int | None = read_through(
        "config.max_cached_blocks", "Cap on evictable cached blocks (``None``: none)."
    )

    # ------------------------------------------------------------------ queries

    num_free_blocks: int = read_through(
        "_alloc.num_free", "Blocks that can be handed out now: never used + evictable cached."
    )
    num_used_blocks: int = read_through("_alloc.num_used", "Blocks with ref count > 0.")

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence of ``num_tokens`` fits without prefix hits."""
        check_int(num_tokens, "num_tokens", minimum=0)
        return -(-num_tokens // self.block_size) <= self.num_free_blocks

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def seq_ids(self) -> list[Hashable]:
        """Live sequence ids, oldest first."""
        return list(self._seqs)

    def _seq(self, seq_id: Hashable) -> SeqRecord:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise unknown_sequence(seq_id) from None

    def block_table(self, seq_id: Hashable) -> list[int]:
        """Physical block of each logical block of the sequence (a copy)."""
        return list(self._seq(seq_id).blocks)

    def num_tokens(self, seq_id: Hashable) -> int:
        """Tokens the sequence holds slots for."""
        return len(self._seq(seq_id).tokens)

    def token_ids(self, seq_id: Hashable) -> list[int]:
        """Every token id of the sequence."""
        return self._seq(seq_id).tokens.tolist()

    def block_hashes(
        self, seq_id: Hashable, start: int = 0, stop: int | None = None
    ) -> list[bytes]:
        """Chained hash of full blocks ``start..stop`` (default: all of them; empty
        without prefix caching and for a private sequence)."""
        seq = self._seq(seq_id)
        start, stop = full_block_range(seq, self.block_size, start, stop)
        if not self.prefix_caching or seq.private or start >= stop:
            return []
        if start < seq.released:  # placeholders hold no hash: from the tokens
            return chain_hashes(seq.tokens, self.block_size, seq.ns, self._digest)[start:stop]
        return self._prefix.block_hashes(seq, start, stop)

    def shares_prefix(self, seq_id: Hashable) -> bool:
        """Whether the sequence takes part in prefix caching: False for a private one
        (``share_prefix=False``, a prompt below ``min_prefix_tokens``, or forked from
        one) and when prefix caching is off."""
        return self.prefix_caching and not self._seq(seq_id).private

    def seq_stats(self, seq_id: Hashable) -> SeqStats:
        """Blocks, shared blocks, tokens, fill and last access of a live sequence
        (:class:`SeqStats`; ``bytes`` is ``None`` here, see ``KVCache.seq_stats``)."""
        seq = self._seq(seq_id)
        ref, chain, released = self._ref, seq.chain, seq.released
        blocks = seq.blocks[released:]  # released ones (sliding window) are not held
        shared = sum(1 for b in blocks[chain:] if ref[b] > 1)
        if chain:  # one reference per chain, whatever its holders (then released == 0)
            others = self._alloc.chains[blocks[chain - 1]] > 1
            shared += sum(1 for b in blocks[:chain] if others or ref[b] > 1)
        n = len(seq.tokens)
        held = n - released * self.block_size
        return SeqStats(
            blocks=len(blocks),
            shared_blocks=shared,
            tokens=n,
            bytes=None,
            utilization=held / (len(blocks) * self.block_size) if blocks else 1.0,
            last_access=seq.last_access,
        )

    def slot_mapping(self, seq_id: Hashable, start: int = 0, stop: int | None = None) -> list[int]:
        """``block_id * block_size + offset`` of tokens ``start..stop`` of the sequence."""
        return slot_mapping(self._seq(seq_id), self.block_size, start, stop)

    def hash_blocks(self, token_ids: Sequence[int], salt: object = None) -> list[bytes]:
        """Chained hashes of the full blocks of ``token_ids`` in ``salt``'s namespace."""
        return [h for _, h in self._prefix.prefix_keys(token_ids, salt)]

    def lookup(self, token_ids: Sequence[int], salt: object = None) -> int:
        """Tokens a new :meth:`allocate` of ``token_ids`` would find cached (no change;
        0 for a prompt shorter than ``min_prefix_tokens``)."""
        arr = as_token_array(token_ids)
        ns = self._prefix.namespace(salt)
        if not self.prefix_caching or not arr or len(arr) < self._min_prefix_tokens:
            return 0
        hits = self._prefix.match(arr.tobytes(), ns, (len(arr) - 1) // self.block_size)
        return len(self._alloc.policy.usable(hits) if hits else hits) * self.block_size

    def prompt_match(self, token_ids: Sequence[int], salt: object = None) -> PromptMatch | None:
        """Whether every full block of ``token_ids`` is cached in ``salt``'s namespace, and
        if so which cached KV that is (:class:`~pagedkv.manager.prefix_index.PromptMatch`:
        the whole prompt's chained hash and each block's registration number). ``None``
        when a full block is not cached, and for a prompt that is never shared (prefix
        caching off, shorter than ``min_prefix_tokens``). Changes nothing.

        For a caller that keeps results of whole prompts (the engine's stored logits):
        equal matches mean the same tokens over the same cached KV.
        """
        arr = as_token_array(token_ids)
        if not self.prefix_caching or not arr or len(arr) < self._min_prefix_tokens:
            return None
        prefix = self._prefix
        return prefix.prompt_match(arr.tobytes(), prefix.namespace(salt), self._alloc.policy.usable)

    def device_prefix(self, token_ids: Sequence[int], salt: object = None) -> DevicePrefix:
        """Where each full block of ``token_ids`` stands on the device (changes nothing).

        Computed from ``salt``'s namespace alone: blocks, ghosts and hashes of other salts
        are never looked at, so it tells nothing about other tenants' prompts.
        """
        keys = self._prefix.prefix_keys(token_ids, salt)  # validates tokens and salt
        hashes = [h for _, h in keys]
        statuses: list[str | None] = [None] * len(keys)
        if self.prefix_caching:
            by_key, usable = self._prefix.by_key, self._alloc.policy.usable
            for i, (key, _) in enumerate(keys):
                block = by_key.get(key)
                if block is not None:
                    statuses[i] = "device" if usable([block]) else "expired"
        unknown = [i for i, s in enumerate(statuses) if s is None]
        for i, reason in zip(unknown, self._alloc.ghosts.reasons([hashes[i] for i in unknown])):
            statuses[i] = reason
        return DevicePrefix(hashes, statuses, self.lookup(token_ids, salt) // self.block_size)

    @property
    def pressure(self) -> MemoryPressure:
        """Current level from the fraction of blocks in use."""
        return pressure_level(self.num_used_blocks, self.num_blocks, self.config.watermarks)

    def stats(self) -> CacheStats:
        """Counters and occupancy (see :class:`CacheStats`)."""
        used, bs, c = self.num_used_blocks, self.block_size, self._counters
        pinned = len(self._alloc.pins.blocks)
        return CacheStats(
            num_blocks=self.num_blocks,
            block_size=bs,
            used_blocks=used,
            cached_blocks=len(self._alloc.policy) + pinned,
            free_blocks=len(self._alloc.free),
            pinned_blocks=pinned,
            num_sequences=len(self._seqs),
            query_tokens=c.query_tokens,
            hit_tokens=c.hit_tokens,
            hit_rate=c.hit_tokens / c.query_tokens if c.query_tokens else 0.0,
            evictions=c.evictions,
            cow_copies=c.cow_copies,
            blocks_allocated=c.blocks_allocated,
            utilization=used / self.num_blocks,
            fragmentation=unused_slots(self._seqs.values(), bs) / (used * bs) if used else 0.0,
            pressure=self.pressure,
            allocation_failures=c.allocation_failures,
            deallocations=c.deallocations,
            requests_with_hit=c.requests_with_hit,
            requests_without_hit=c.requests_without_hit,
            invalidated_blocks=self._gens.invalidated(),
        )

    def eviction_order(self) -> list[int]:
        """Evictable cached blocks in the order they would be evicted."""
        return self._alloc.policy.order()

    def cached_blocks(self) -> list[tuple[int, bytes]]:
        """``(block id, block hash)`` of every cached block (registered, ref count 0):
        the evictable ones in :meth:`eviction_order`, then the pinned ones by block id.
        Blocks in use by live sequences are not included (the KV of their newest slots
        may not be written yet). What ``KVCache.close(persist=True)`` writes."""
        hashes, refs = self._prefix.hashes, self._ref
        evictable = self.eviction_order()
        held = set(evictable)
        pinned = [b for b, h in enumerate(hashes) if h and refs[b] == 0 and b not in held]
        return [(b, hashes[b]) for b in [*evictable, *pinned]]

    def check_integrity(self) -> None:
        """Raise :class:`CacheIntegrityError` naming the numbers that disagree."""
        state = integrity.ManagerState(
            num_blocks=self.num_blocks, block_size=self.block_size,
            prefix_caching=self.prefix_caching, digest=self._digest, free=self._alloc.free,
            refs=self._ref, chains=self._alloc.chains, seqs=self._seqs, policy=self._alloc.policy,
            pins=self._alloc.pins, prefix=self._prefix, max_cached=self._alloc.max_cached,
            counters=self._counters, now=self._clock(), ghosts=self._alloc.ghosts,
            generations=self._gens, registered_at=self._alloc.registered_at,
        )  # fmt: skip
        problems = integrity.violations(state)
        if problems:
            raise CacheIntegrityError("; ".join(problems))

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"BlockManager(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"used={s.used_blocks}, cached={s.cached_blocks}, free={s.free_blocks}, "
            f"sequences={s.num_sequences})"
        )
