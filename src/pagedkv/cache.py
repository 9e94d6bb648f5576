"""KVCache: the facade users hold — a BlockManager, a KVPool and optional offload tiers.

The manager decides (which blocks, what is shared, what must be copied); the pool
holds the bytes and executes. KVCache keeps the two in step so users never see the
manager's copy-on-write copies or evictions: each operation runs the copies it owes
before returning, and evicted blocks are demoted to the tiers before anyone can
overwrite them.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Hashable, Mapping, Sequence

import torch

from pagedkv import _cache_checks, _cache_compress, _resources
from pagedkv._cache_compress import CompressionStats
from pagedkv._cache_limits import CacheLimits
from pagedkv._cache_reads import Swapped
from pagedkv._pausing import Pausable
from pagedkv._validate import check_bool, unhashable_id
from pagedkv.errors import PagedKVError
from pagedkv.manager import BlockManager, ManagerConfig
from pagedkv.storage import KVLayout, KVPool
from pagedkv.tiers import CPUTier, DiskTier, RedisTier, TieredStore

__all__ = ["CompressionStats", "KVCache"]


class KVCache(CacheLimits, _cache_compress.CompressionMethods, Pausable):
    """Paged KV cache of one model on one device.

    Args:
        layout: shape and dtype of the KV (:class:`KVLayout`).
        num_blocks: physical blocks in the pool.
        device: torch device of the pool.
        model_fingerprint: identity of the model's weights (architecture, weight
            version, adapter). Folded into every block hash and into tier keys, so KV
            from another model or weight version is never served.
        tiers: offload tiers, e.g. ``[CPUTier(8 << 30), DiskTier(path, 64 << 30)]``:
            evicted blocks are demoted there and later prompts find them again.
        write_through: also write blocks hit more than once down to the tiers at once.
        backend: kernel backend of :mod:`pagedkv.ops` (``None``: chosen per device).
        manager: the block manager's options (:class:`~pagedkv.manager.ManagerConfig`;
            its ``extra_keys`` stay empty: the cache folds ``model_fingerprint`` in).
        prefix_caching, eviction, ttl_seconds, hash_algo, watermarks, min_prefix_tokens,
        max_cached_blocks: override the same fields of ``manager`` (``None``: as
            there, by default as in :class:`~pagedkv.manager.ManagerConfig`; so a cap
            the ``manager`` config sets cannot be lifted here).
        compressed_blocks: side caches for :meth:`compress`, ``{kv_dtype: num_blocks}``
            (e.g. ``{"fp8": 4096}``): one KVCache per quantized format on the same device,
            same geometry, model and manager options (:mod:`pagedkv._cache_compress`).

    Before allocating anything the constructor resolves ``device`` and checks that the
    pool, the block bookkeeping and the CPU tiers fit in the free device and host
    memory together; if not it raises :class:`~pagedkv.errors.ResourceError` (a
    ``ValueError``) naming ``num_blocks``, the bytes asked for and the bytes available.
    """

    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        *,
        device: torch.device | str = "cpu",
        model_fingerprint: str = "",
        tiers: Sequence[CPUTier | DiskTier | RedisTier] | None = None,
        write_through: bool = False,
        backend: str | None = None,
        manager: ManagerConfig | None = None,
        prefix_caching: bool | None = None,
        eviction: str | None = None,
        ttl_seconds: float | None = None,
        hash_algo: str | None = None,
        watermarks: tuple[float, float, float] | None = None,
        min_prefix_tokens: int | None = None,
        max_cached_blocks: int | None = None,
        compressed_blocks: Mapping[str | torch.dtype, int] | None = None,
    ) -> None:
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a KVLayout, got {type(layout).__name__}")
        if not isinstance(model_fingerprint, str):
            raise TypeError("model_fingerprint must be a str (e.g. 'llama-3-8b@rev2')")
        check_bool(write_through, "write_through")
        if manager is None:
            manager = ManagerConfig()
        elif not isinstance(manager, ManagerConfig):
            raise TypeError(f"manager must be a ManagerConfig, got {type(manager).__name__}")
        if manager.extra_keys:
            raise ValueError(
                "KVCache sets the manager's extra_keys itself; pass model_fingerprint instead"
            )
        config = manager.override(
            prefix_caching=prefix_caching, eviction=eviction, ttl_seconds=ttl_seconds,
            hash_algo=hash_algo, watermarks=watermarks, min_prefix_tokens=min_prefix_tokens,
            max_cached_blocks=max_cached_blocks,
        )  # fmt: skip
        side_specs = _cache_compress.parse_specs(compressed_blocks, layout)
        device = _resources.resolve_device(device)
        sides = _cache_compress.side_layouts(layout, side_specs)
        _cache_checks.check_fits(layout, num_blocks, device, tiers, config, sides)
        self.layout = layout
        self.model_fingerprint = model_fingerprint
        self.fingerprint = _cache_checks.fingerprint(layout, model_fingerprint)
        self._evicted: list[tuple[int, bytes]] = []
        self.manager = BlockManager.from_config(
            num_blocks,
            layout.block_size,
            dataclasses.replace(config, extra_keys=(self.fingerprint,)),
            on_evict=self._note_eviction if tiers else None,
        )
        self.pool = KVPool(layout, num_blocks, device, backend=backend)
        self.device = self.pool.device
        self.backend = backend
        self._salts: dict[Hashable, object] = {}
        self._swapped: dict[Hashable, Swapped] = {}
        self._paused = 0
        self.tiers: TieredStore | None = None
        self.write_through = write_through
        self._tier_hit_tokens = 0
        if tiers:
            self.tiers = TieredStore(list(tiers), layout, self.fingerprint)
            self.tiers.attach(self.pool)
        self._compressed = _cache_compress.CompressedArea(
            {
                lay.kv_dtype: KVCache(
                    lay,
                    n,
                    device=self.device,
                    model_fingerprint=model_fingerprint,
                    backend=backend,
                    manager=config,
                )  # fmt: skip
                for lay, n in sides
            }
        )

    # ----------------------------------------------------------- sequences

    def allocate(
        self,
        seq_id: Hashable,
        token_ids: Sequence[int],
        salt: object = None,
        *,
        share_prefix: bool = True,
        whole: bool = False,
    ) -> int:
        """Start a sequence; return how many prompt tokens already have their KV.

        Counts blocks shared from the device's prefix cache and blocks loaded back
        from the tiers; the caller computes (and writes) the KV of the rest. If loading
        from the tiers fails the sequence is not created (and nothing it registered
        stays cached) before the error propagates. Subscribers get its KV events as one
        batch (a failed load's removals included).

        ``share_prefix=False`` (or a prompt shorter than ``min_prefix_tokens``): a
        private sequence — no device or tier hit, none of its blocks ever registered,
        cached or demoted to the tiers (see :meth:`BlockManager.allocate`); it stays
        private across swap-out / swap-in. ``whole=True``: the last full block is reused
        too, so the result may be ``len(token_ids)`` (see :meth:`BlockManager.allocate`).
        """
        if self.manager.subscribers:
            with self.manager.event_batch():
                return self._allocate(seq_id, token_ids, salt, share_prefix, whole)
        return self._allocate(seq_id, token_ids, salt, share_prefix, whole)

    def _allocate(
        self, seq_id: Hashable, token_ids: Sequence[int], salt: object, share_prefix: bool,
        whole: bool,
    ) -> int:  # fmt: skip
        self._check_not_paused("allocate()")
        if self._swapped_out(seq_id, "seq_id"):
            raise ValueError(f"sequence {seq_id!r} is swapped out; swap_in() it or free() it")
        if self._compressed.holds(seq_id):
            raise ValueError(f"sequence {seq_id!r} is compressed; decompress() it or free() it")
        cached = self.manager.allocate(
            seq_id, token_ids, salt, share_prefix=share_prefix, whole=whole
        )
        try:
            self._flush_evictions()
            if self.tiers is not None and self.manager.shares_prefix(seq_id):
                cached += self._tier_exchange(self.tiers, seq_id, cached, whole)
        except BaseException:
            self.manager.discard(seq_id)  # its fresh blocks hold no KV: cache none of them
            raise
        self._salts[seq_id] = salt
        return cached

    def append(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
        """Reserve slots for more tokens; runs any copy-on-write copy it needs."""
        self._check_not_paused("append()")
        try:
            self.manager.append(seq_id, token_ids)
        except KeyError:
            raise self._not_live(seq_id) from None
        self._flush_evictions()
        copies = self.manager.take_copies()
        if copies:
            self.pool.copy_blocks(copies)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """The child shares all of the parent's blocks; copy-on-write happens later.

        ``parent_id`` must be live (``KeyError``), ``child_id`` neither live nor
        swapped out (``ValueError``); nothing changes on error.
        """
        self._check_not_paused("fork()")
        if self._swapped_out(child_id, "child_id") or self._compressed.holds(child_id):
            raise ValueError(
                f"sequence {child_id!r} is swapped out or compressed; fork into a new id "
                "(or free() that one first)"
            )
        try:
            self.manager.fork(parent_id, child_id)
        except KeyError:
            raise self._not_live(parent_id) from None
        self._salts[child_id] = self._salts.get(parent_id)

    def free(self, seq_id: Hashable) -> None:
        """Release a live sequence, or discard a swapped-out or compressed one."""
        self._check_not_paused("free()")
        if self._swapped_out(seq_id, "seq_id"):
            key = self._swapped.pop(seq_id).key
            assert self.tiers is not None  # a sequence is swapped out only into tiers
            self.tiers.discard_swap(key)
            return
        if self._compressed.holds(seq_id):
            self._compressed.free(seq_id)
            return
        self.manager.free(seq_id)
        self._salts.pop(seq_id, None)
        self._flush_evictions()  # blocks over max_cached_blocks were evicted

    def discard(self, seq_id: Hashable, written: int = 0) -> None:
        """Release a live sequence whose KV was never (fully) written, caching none of it.

        For a caller whose write of a sequence failed: the blocks it alone held become
        free instead of cached (but the full blocks within its first ``written`` tokens),
        so no later prompt is served their garbage (see :meth:`BlockManager.discard`).
        ``KeyError`` unless live.
        """
        self._check_not_paused("discard()")
        try:
            self.manager.discard(seq_id, written)
        except KeyError:
            raise self._not_live(seq_id) from None
        self._salts.pop(seq_id, None)
        self._flush_evictions()

    # ------------------------------------------------------------- swapping

    def swap_out(self, seq_id: Hashable) -> None:
        """Move a live sequence's KV to the first tier (a CPUTier) and free its blocks.

        Bit-exact: :meth:`swap_in` restores the same bytes. Needs ``tiers``.
        """
        self._check_not_paused("swap_out()")
        if self.tiers is None:
            raise PagedKVError("swap_out() needs tiers=[CPUTier(...), ...] on the KVCache")
        tokens = self.token_ids(seq_id)  # KeyError unless live (says so if swapped out)
        key = f"swap-{uuid.uuid4().hex}"
        released = self.manager.num_released(seq_id)  # only the held blocks are copied
        self.tiers.swap_out(key, self.manager.block_table(seq_id)[released:])
        salt = self._salts.get(seq_id)
        private = not self.manager.shares_prefix(seq_id) and self.manager.prefix_caching
        generation = self.manager.generation_of(seq_id)
        self.manager.free(seq_id)
        self._salts.pop(seq_id, None)
        self._swapped[seq_id] = Swapped(tokens, salt, key, generation, released, private)
        self._flush_evictions()

    def swap_in(self, seq_id: Hashable) -> None:
        """Bring a swapped-out sequence back into fresh device blocks, bit-exact.

        Raises :class:`OutOfBlocks` (and stays swapped out) when the pool is full; if
        the copy from the tiers fails it stays swapped out too, and the blocks it was
        given are released without caching any of them. A sequence swapped out before a
        :meth:`set_model_fingerprint` comes back on blocks that share nothing.
        """
        self._check_not_paused("swap_in()")
        try:
            tokens, salt, key, generation, released, private = self._swapped[seq_id]
        except KeyError:
            state = "live" if seq_id in self.manager else "unknown"
            raise KeyError(f"sequence {seq_id!r} is not swapped out (it is {state})") from None
        except TypeError:
            raise unhashable_id(seq_id) from None
        assert self.tiers is not None  # a sequence is swapped out only into tiers
        if generation == self.manager.generation:
            cached = self._allocate_held(seq_id, tokens, salt, released, private)
        else:  # its KV is an earlier model's: it must neither reuse nor be reused
            self.manager.allocate_unshared(seq_id, tokens, salt)
            if released:  # the tiers hold only its blocks from `released` on
                self.manager.release_before(seq_id, released * self.block_size)
            cached = 0
        try:
            self._flush_evictions()
            blocks = self.manager.block_table(seq_id)[released:]
            self.tiers.swap_in(key, blocks, skip=cached // self.block_size)
        except BaseException:
            self.manager.discard(seq_id)  # registered blocks whose KV never arrived
            raise
        del self._swapped[seq_id]
        self._salts[seq_id] = salt

    # ------------------------------------------------------------- tensors

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter new tokens' K/V (``[N, Hkv, D]``) into their slots of ``layer``."""
        self.pool.write(layer, slots, k, v)

    def write_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Inverse of :meth:`read_blocks`."""
        self.pool.write_blocks(block_ids, data)

    # ---------------------------------------------------------- weight updates

    def set_model_fingerprint(self, model_fingerprint: str) -> bool:
        """Declare new weights: from now on no KV computed under the old fingerprint is
        used. O(1): no block is touched, whatever the cache holds.

        The cache fingerprint (:attr:`fingerprint`) changes, and with it every block
        hash, so: device blocks of the old one are never matched again and are evicted
        lazily (``stats().invalidated_blocks`` counts them meanwhile); tier entries
        written under it are never hit (their keys hold the old hashes); snapshots saved
        under it are refused on restore. Live sequences keep their KV (recompute them if
        that matters), but the blocks they fill from now on are never cached, and a
        sequence swapped out before comes back sharing nothing. Subscribers hear
        :class:`~pagedkv.events.AllBlocksCleared`. Pins carry over to the same tokens.

        Returns ``False``, changing nothing, for the current fingerprint. ``TypeError``
        for a non-str; :class:`~pagedkv.errors.CachePausedError` while paused.
        """
        if not isinstance(model_fingerprint, str):
            raise TypeError("model_fingerprint must be a str (e.g. 'llama-3-8b@step-42')")
        self._check_not_paused("set_model_fingerprint()")
        if model_fingerprint == self.model_fingerprint:
            return False
        fingerprint = _cache_checks.fingerprint(self.layout, model_fingerprint)
        self.manager.set_extra_keys((fingerprint,))
        self.model_fingerprint, self.fingerprint = model_fingerprint, fingerprint
        return True

    # ------------------------------------------------------ snapshot support

    def flush(self) -> None:
        """Wait until every block demoted to the tiers has been stored (and deliver the
        KV events queued meanwhile)."""
        if self.tiers is not None:
            self.tiers.flush()
        self.manager.deliver_events()

    def close(self, *, persist: bool = False) -> None:
        """Flush and close the tiers (pending demotions are written).

        ``persist=True`` (a warm restart): first write the device's cached blocks (those
        no live sequence holds; least recently used first) and the CPU tier's entries to
        the first persistent tier (a :class:`DiskTier` or :class:`RedisTier`), so a new
        process with the same tiers and model fingerprint finds them. Each entry is
        written atomically and verified when read: a process killed meanwhile leaves
        only complete entries (:mod:`pagedkv.tiers.persist`). Without a persistent tier
        it raises ``ValueError`` and closes nothing. Free (or finish) sequences first:
        the blocks of live ones are not written.
        """
        check_bool(persist, "persist")
        if persist:
            if self.tiers is None:
                raise ValueError(
                    "close(persist=True) needs tiers=[..., DiskTier(...) or RedisTier(...)] "
                    "on the KVCache: without a persistent tier there is nowhere to write"
                )
            self.tiers.persist(self.manager.cached_blocks())
        if self.tiers is not None:
            self.tiers.close()
