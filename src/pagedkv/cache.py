"""KVCache: the facade users hold — a BlockManager, a KVPool and optional offload tiers.

The manager decides (which blocks, what is shared, what must be copied); the pool
holds the bytes and executes. KVCache keeps the two in step so users never see the
manager's copy-on-write copies or evictions: each operation runs the copies it owes
before returning, and evicted blocks are demoted to the tiers before anyone can
overwrite them.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager

import torch

from pagedkv import _cache_checks, _resources, ops
from pagedkv.errors import CacheIntegrityError, PagedKVError
from pagedkv.manager import BlockManager, CacheStats
from pagedkv.storage import KVLayout, KVPool


class KVCache:
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
        **manager_options: passed to :class:`BlockManager` (``prefix_caching``,
            ``eviction``, ``ttl_seconds``, ``hash_algo``, ``watermarks``).

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
        tiers: Sequence[object] | None = None,
        write_through: bool = False,
        backend: str | None = None,
        **manager_options: object,
    ) -> None:
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a KVLayout, got {type(layout).__name__}")
        if not isinstance(model_fingerprint, str):
            raise TypeError("model_fingerprint must be a str (e.g. 'llama-3-8b@rev2')")
        if "on_evict" in manager_options or "extra_keys" in manager_options:
            raise TypeError(
                "KVCache sets on_evict and extra_keys itself; pass model_fingerprint instead"
            )
        device = _resources.resolve_device(device)
        _cache_checks.check_fits(layout, num_blocks, device, tiers, manager_options)
        self.layout = layout
        self.model_fingerprint = model_fingerprint
        self.fingerprint = _fingerprint(layout, model_fingerprint)
        self._evicted: list[tuple[int, bytes]] = []
        self.manager = BlockManager(
            num_blocks,
            layout.block_size,
            extra_keys=(self.fingerprint,),
            on_evict=self._note_eviction if tiers else None,
            **manager_options,
        )
        self.pool = KVPool(layout, num_blocks, device, backend=backend)
        self.device = self.pool.device
        self.backend = backend
        self._salts: dict[Hashable, object] = {}
        self._swapped: dict[Hashable, tuple[list[int], object, str]] = {}
        self._paused = 0
        self.tiers = None
        self.write_through = bool(write_through)
        self._tier_hit_tokens = 0
        if tiers:
            from pagedkv.tiers import TieredStore

            self.tiers = TieredStore(list(tiers), layout, self.fingerprint)
            self.tiers.attach(self.pool)

    # ------------------------------------------------------------------ basics

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @property
    def num_blocks(self) -> int:
        return self.manager.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.manager.num_free_blocks

    def can_allocate(self, num_tokens: int) -> bool:
        return self.manager.can_allocate(num_tokens)

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
        return KeyError(
            f"unknown sequence {seq_id!r}: allocate() it first (or it was already freed)"
        )

    def _swapped_out(self, seq_id: Hashable, name: str) -> bool:
        """Whether ``seq_id`` is swapped out; ``TypeError`` naming ``name`` if unhashable."""
        try:
            return seq_id in self._swapped
        except TypeError:
            raise TypeError(f"{name} must be hashable, got {type(seq_id).__name__}") from None

    def stats(self) -> CacheStats:
        return self.manager.stats()

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
        problems = _cache_checks.violations(self)
        if problems:
            raise CacheIntegrityError("KVCache: " + "; ".join(problems))
        if self.tiers is not None:
            self.tiers.check_integrity()

    # ----------------------------------------------------------- sequences

    def _check_not_paused(self, what: str) -> None:
        if self._paused:
            raise PagedKVError(
                f"{what} is not allowed while the cache is paused (a snapshot is reading it)"
            )

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int], salt: object = None) -> int:
        """Start a sequence; return how many prompt tokens already have their KV.

        Counts blocks shared from the device's prefix cache and blocks loaded back
        from the tiers; the caller computes (and writes) the KV of the rest.
        """
        self._check_not_paused("allocate()")
        if self._swapped_out(seq_id, "seq_id"):
            raise ValueError(f"sequence {seq_id!r} is swapped out; swap_in() it or free() it")
        cached = self.manager.allocate(seq_id, token_ids, salt)
        self._salts[seq_id] = salt
        self._flush_evictions()
        if self.tiers is not None:
            cached += self._tier_exchange(seq_id, cached)
        return cached

    def _tier_exchange(self, seq_id: Hashable, cached: int) -> int:
        """Write device hits through (if asked) and load the next blocks from the tiers.

        Returns the tokens loaded; the blocks after the device prefix hit that the tiers
        hold are written into the sequence's fresh blocks.
        """
        bs = self.block_size
        table = self.manager.block_table(seq_id)
        hit = cached // bs
        if self.write_through and hit:
            # A device prefix hit means the block is used at least twice: keep a copy
            # below too (the chain skips blocks it wrote recently).
            hashes = self.manager.block_hashes(seq_id, 0, hit)
            self.tiers.write_through(list(zip(table[:hit], hashes)))
        limit = (self.manager.num_tokens(seq_id) - 1) // bs  # leave one token to compute
        if hit >= limit:
            return 0
        hashes = self.manager.block_hashes(seq_id, hit, limit)
        loaded = self.tiers.promote(hashes, table[hit:limit]) * bs
        self._tier_hit_tokens += loaded
        return loaded

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
        if self._swapped_out(child_id, "child_id"):
            raise ValueError(
                f"sequence {child_id!r} is swapped out; fork into a new id "
                "(or free() the swapped-out one first)"
            )
        try:
            self.manager.fork(parent_id, child_id)
        except KeyError:
            raise self._not_live(parent_id) from None
        self._salts[child_id] = self._salts.get(parent_id)

    def free(self, seq_id: Hashable) -> None:
        """Release a live sequence, or discard a swapped-out one."""
        self._check_not_paused("free()")
        if self._swapped_out(seq_id, "seq_id"):
            _, _, key = self._swapped.pop(seq_id)
            self.tiers.discard_swap(key)
            return
        self.manager.free(seq_id)
        self._salts.pop(seq_id, None)

    def _note_eviction(self, block: int, block_hash: bytes) -> None:
        self._evicted.append((block, block_hash))

    def _flush_evictions(self) -> None:
        # Evicted blocks were handed out by the manager call that just returned; the
        # caller has not written them yet, so their old bytes are still intact here.
        if self._evicted:
            evicted, self._evicted = self._evicted, []
            self.tiers.demote(evicted)

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
        self.tiers.swap_out(key, self.manager.block_table(seq_id))
        salt = self._salts.get(seq_id)
        self.manager.free(seq_id)
        self._salts.pop(seq_id, None)
        self._swapped[seq_id] = (tokens, salt, key)

    def swap_in(self, seq_id: Hashable) -> None:
        """Bring a swapped-out sequence back into fresh device blocks, bit-exact.

        Raises :class:`OutOfBlocks` (and stays swapped out) when the pool is full.
        """
        self._check_not_paused("swap_in()")
        try:
            tokens, salt, key = self._swapped[seq_id]
        except KeyError:
            state = "live" if seq_id in self.manager else "unknown"
            raise KeyError(f"sequence {seq_id!r} is not swapped out (it is {state})") from None
        except TypeError:
            raise TypeError(f"seq_id must be hashable, got {type(seq_id).__name__}") from None
        cached = self.manager.allocate(seq_id, tokens, salt)
        self._flush_evictions()
        first = cached // self.block_size
        blocks = self.manager.block_table(seq_id)
        try:
            self.tiers.swap_in(key, blocks, skip=first)
        except BaseException:
            self.manager.free(seq_id)
            raise
        del self._swapped[seq_id]
        self._salts[seq_id] = salt

    def swapped_ids(self) -> list:
        """Sequences currently swapped out."""
        return list(self._swapped)

    # ------------------------------------------------------------- tensors

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter new tokens' K/V (``[N, Hkv, D]``) into their slots of ``layer``."""
        self.pool.write(layer, slots, k, v)

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
        width = longest if width is None else width
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

    def write_blocks(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        """Inverse of :meth:`read_blocks`."""
        self.pool.write_blocks(block_ids, data)

    # ------------------------------------------------------ snapshot support

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Refuse mutations (allocate/append/fork/free/swap) while a snapshot reads."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def flush(self) -> None:
        """Wait until every block demoted to the tiers has been stored."""
        if self.tiers is not None:
            self.tiers.flush()

    def close(self) -> None:
        """Flush and close the tiers (pending demotions are written)."""
        if self.tiers is not None:
            self.tiers.close()

    def __repr__(self) -> str:
        return (
            f"KVCache({self.layout}, num_blocks={self.num_blocks}, device={self.device}, "
            f"tiers={0 if self.tiers is None else len(self.tiers.tiers)})"
        )

    def discard(self, seq_id: Hashable) -> None:
        """Undo :meth:`allocate` of a sequence whose KV was never written (a failed copy).

        Like :meth:`free`, but the blocks past its prefix hit that no other sequence holds
        are forgotten instead of cached (see :meth:`BlockManager.discard`).
        """
        self._check_not_paused("discard()")
        self.manager.discard(seq_id)
        self._salts.pop(seq_id, None)


def _fingerprint(layout: KVLayout, model_fingerprint: str) -> str:
    """Identity of the KV bytes: the layout and the model that produced them."""
    desc = (
        f"L{layout.num_layers}-H{layout.num_kv_heads}-D{layout.head_dim}"
        f"-B{layout.block_size}-{str(layout.dtype).removeprefix('torch.')}"
    )
    digest = hashlib.sha256(f"{desc}|{model_fingerprint}".encode()).hexdigest()[:16]
    return f"{desc}-{digest}"
