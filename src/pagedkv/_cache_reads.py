"""KVCache's reads: queries that change nothing, attention over the pool, the audit.

:class:`CacheReads` is the read-only half of :class:`~pagedkv.KVCache` (which
subclasses it and sets the attributes declared below); every method that changes the
cache is in :mod:`pagedkv.cache`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from pagedkv import _cache_checks, ops
from pagedkv._forward import read_through
from pagedkv._validate import check_int, unhashable_id, unknown_sequence
from pagedkv.errors import CacheIntegrityError
from pagedkv.events import Subscriber
from pagedkv.explain import ChainProbe, PrefixReport, explain_prefix
from pagedkv.manager import BlockManager, CacheStats, PromptMatch
from pagedkv.manager.stats import SeqStats
from pagedkv.storage import KVLayout, KVPool

if TYPE_CHECKING:
    from pagedkv._cache_compress import CompressedArea, CompressionStats
    from pagedkv.tiers import TieredStore


class Swapped(NamedTuple):
    """A swapped-out sequence: what it held, where the tiers keep its bytes, and the
    model generation its KV was computed in (``manager.generation``)."""

    tokens: list[int]
    salt: object
    key: str
    generation: int = 0
    released: int = 0  # leading blocks released outside the window (not swapped out)
    private: bool = False  # allocated with share_prefix=False (or below min_prefix_tokens)


@dataclasses.dataclass(frozen=True)
class GcStats:
    """What one :meth:`KVCache.gc <pagedkv.KVCache.gc>` pass freed.

    ``blocks_freed``: device blocks that became free (expired, or evicted over
    ``max_cached_blocks``); ``bytes_freed``: their KV bytes; ``tier_entries_freed``:
    entries deleted from the tiers (over a tier's capacity); ``seconds``: how long the
    pass took (wall time).
    """

    blocks_freed: int
    bytes_freed: int
    tier_entries_freed: int
    seconds: float


class CacheReads:
    """Queries over a KV cache (see :class:`~pagedkv.KVCache`)."""

    layout: KVLayout
    model_fingerprint: str
    fingerprint: str
    manager: BlockManager
    pool: KVPool
    device: torch.device
    backend: str | None
    tiers: TieredStore | None
    _salts: dict[Hashable, object]
    _swapped: dict[Hashable, Swapped]
    _evicted: list[tuple[int, bytes]]
    _tier_hit_tokens: int
    _compressed: CompressedArea

    # ------------------------------------------------------------------- basics

    block_size: int = read_through("layout.block_size")
    num_blocks: int = read_through("manager.num_blocks")
    num_free_blocks: int = read_through("manager.num_free_blocks")

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a new sequence of ``num_tokens`` fits without prefix hits."""
        return self.manager.can_allocate(num_tokens)

    def lookup(self, token_ids: Sequence[int], salt: object = None) -> int:
        """Tokens of ``token_ids`` a new :meth:`allocate` would find in the device's prefix
        cache (tier hits are not counted); changes nothing, allowed while paused."""
        return self.manager.lookup(token_ids, salt)

    def prompt_match(self, token_ids: Sequence[int], salt: object = None) -> PromptMatch | None:
        """Whether every full block of ``token_ids`` is in the device's prefix cache, and
        which cached KV that is (see :meth:`BlockManager.prompt_match`); changes nothing,
        allowed while paused."""
        return self.manager.prompt_match(token_ids, salt)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self.manager

    def seq_ids(self) -> list:
        """Live sequences (resident on the device), oldest first."""
        return self.manager.seq_ids()

    # Reads of a live sequence raise KeyError for any other id; one that is swapped out
    # gets a message saying so (built only on that error path).

    def block_table(self, seq_id: Hashable) -> list[int]:
        try:
            return self.manager.block_table(seq_id)
        except KeyError:
            raise self._not_live(seq_id) from None

    def slot_mapping(self, seq_id: Hashable, start: int = 0, stop: int | None = None) -> list[int]:
        try:
            return self.manager.slot_mapping(seq_id, start, stop)
        except KeyError:
            raise self._not_live(seq_id) from None

    def num_released(self, seq_id: Hashable) -> int:
        """Leading blocks of a live sequence released by :meth:`KVCache.release_before`."""
        try:
            return self.manager.num_released(seq_id)
        except KeyError:
            raise self._not_live(seq_id) from None

    def num_tokens(self, seq_id: Hashable) -> int:
        try:
            return self.manager.num_tokens(seq_id)
        except KeyError:
            raise self._not_live(seq_id) from None

    def token_ids(self, seq_id: Hashable) -> list[int]:
        try:
            return self.manager.token_ids(seq_id)
        except KeyError:
            raise self._not_live(seq_id) from None

    def salt(self, seq_id: Hashable) -> object:
        """The salt the sequence was allocated with."""
        self.num_tokens(seq_id)  # KeyError for an id that is not live
        return self._salts.get(seq_id)

    def _not_live(self, seq_id: Hashable) -> KeyError:
        """The KeyError for an id that is not a live sequence, saying if it is swapped out."""
        try:
            swapped = seq_id in self._swapped
        except TypeError:
            return KeyError(f"seq_id must be hashable, got {type(seq_id).__name__}")
        if swapped:
            return KeyError(f"sequence {seq_id!r} is swapped out; swap_in() it first")
        fmt = self._compressed.where.get(seq_id)
        if fmt is not None:
            return KeyError(
                f"sequence {seq_id!r} is compressed ({str(fmt).removeprefix('torch.')}); "
                "decompress() it, or use it through compressed(kv_dtype)"
            )
        return unknown_sequence(seq_id)

    def _swapped_out(self, seq_id: Hashable, name: str) -> bool:
        """Whether ``seq_id`` is swapped out; ``TypeError`` naming ``name`` if unhashable."""
        try:
            return seq_id in self._swapped
        except TypeError:
            raise unhashable_id(seq_id, name) from None

    def explain(self, token_ids: Sequence[int], salt: object = None) -> PrefixReport:
        """Why ``token_ids`` would (not) hit: each full block's status (``"device"``,
        ``"tier:<name>"``, ``"evicted"``, ``"expired"``, ``"never_seen"``), the first
        block a request would compute, and the tokens it would get from the device and
        each tier (see :mod:`pagedkv.explain`). Computed only from ``salt``'s namespace;
        changes nothing (it waits for pending write-backs to land in the tiers)."""
        probe = None if self.tiers is None else ChainProbe(self.tiers)
        return explain_prefix(self.manager, token_ids, salt, tiers=probe)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(events)`` with the KV events of each operation (see
        :mod:`pagedkv.events`); returns a function that unsubscribes. Subscribers see
        the token ids of every salt's prompts: an operator-side feed. The tiers report
        theirs (``medium`` ``"cpu"``, ...) with the next batch, or at :meth:`flush`."""
        unsubscribe = self.manager.subscribe(callback)
        tiers, manager = self.tiers, self.manager
        if tiers is None:
            return unsubscribe
        tiers.set_event_sink(manager.publish_events)

        def unsubscribe_all() -> None:
            unsubscribe()
            if not manager.subscribers:  # the last one: the levels stop reporting
                tiers.set_event_sink(None)

        return unsubscribe_all

    def stats(self) -> CacheStats:
        return self.manager.stats()

    def seq_stats(self, seq_id: Hashable) -> SeqStats:
        """The manager's :meth:`~pagedkv.manager.BlockManager.seq_stats` of a live
        sequence, with ``bytes`` = its blocks × the layout's bytes per block."""
        try:
            s = self.manager.seq_stats(seq_id)
        except KeyError:
            raise self._not_live(seq_id) from None
        return dataclasses.replace(s, bytes=s.blocks * self.layout.bytes_per_block)

    def tier_stats(self) -> dict:
        """Hits, demotions and bytes per tier (empty without tiers)."""
        if self.tiers is None:
            return {}
        return {"tier_hit_tokens": self._tier_hit_tokens, **self.tiers.stats()}

    def check_integrity(self) -> None:
        """Raise :class:`CacheIntegrityError` when any bookkeeping disagrees.

        Checks the manager, the tiers, and what ties them together: no sequence both
        live and swapped out, one swap-area entry per swapped-out sequence, a salt
        recorded for exactly the live sequences, the pool as large as the manager, and
        no eviction left undemoted between operations.
        """
        self.manager.check_integrity()
        problems = _cache_checks.violations(
            self.manager, self.pool, self.tiers, self._swapped, self._salts, self._evicted
        )
        if problems:
            raise CacheIntegrityError("KVCache: " + "; ".join(problems))
        if self.tiers is not None:
            self.tiers.check_integrity()
        problems = self._compressed.violations(set(self.manager.seq_ids()), self._swapped)
        if problems:
            raise CacheIntegrityError("KVCache: " + "; ".join(problems))
        for side in self._compressed.caches.values():
            side.check_integrity()

    def fingerprint_for(self, layout: KVLayout) -> str:
        """The fingerprint a cache of this model would have with ``layout`` (a snapshot
        saved from the same model in a compressed format checks against it)."""
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a KVLayout, got {type(layout).__name__}")
        return _cache_checks.fingerprint(layout, self.model_fingerprint)

    def swapped_ids(self) -> list:
        """Sequences currently swapped out."""
        return list(self._swapped)

    # -------------------------------------------------------------- compression

    def compressed_ids(self) -> list:
        """Sequences currently compressed (in a side cache), oldest first."""
        return list(self._compressed.where)

    def compression_stats(self) -> CompressionStats:
        """Sequences held compressed, bytes saved, ratio and mean seconds per compress()
        (:class:`~pagedkv._cache_compress.CompressionStats`)."""
        return self._compressed.stats(self.layout)

    # ------------------------------------------------------------------ tensors

    def block_tables_tensor(
        self, seq_ids: Sequence[Hashable], width: int | None = None
    ) -> torch.Tensor:
        """Block tables of ``seq_ids`` as int32 ``[B, width]`` on the cache's device (0-padded)."""
        try:
            tables = [self.manager.block_table(s) for s in seq_ids]
        except KeyError:
            bad = next(s for s in seq_ids if s not in self.manager)
            raise self._not_live(bad) from None
        longest = max((len(t) for t in tables), default=0)
        width = longest if width is None else check_int(width, "width", minimum=0)
        if width < longest:
            raise ValueError(f"width={width} is smaller than the longest block table ({longest})")
        width = max(width, 1)
        rows = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(rows, dtype=torch.int32).reshape(len(rows), width).to(self.device)

    def decode(
        self,
        q: torch.Tensor,
        layer: int,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Paged decode attention over ``layer`` (see :func:`pagedkv.ops.paged_decode`)."""
        return ops.paged_decode(
            q, self.pool, layer, block_tables, seq_lens, scale, backend=self.backend
        )

    def prefill(
        self,
        q: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        layer: int,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Paged causal prefill over ``layer`` (see :func:`pagedkv.ops.paged_prefill`)."""
        return ops.paged_prefill(
            q, cu_seqlens_q, self.pool, layer, block_tables, seq_lens, scale, backend=self.backend
        )

    def read_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Bytes of blocks as uint8 ``[n, bytes_per_block]`` on the CPU."""
        return self.pool.read_blocks(block_ids)

    def __repr__(self) -> str:
        return (
            f"KVCache({self.layout}, num_blocks={self.num_blocks}, device={self.device}, "
            f"tiers={0 if self.tiers is None else len(self.tiers.tiers)})"
        )
