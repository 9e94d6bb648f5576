"""Compressed sequences of a KVCache: side caches in fp8 / int8 on the same device.

``KVCache(..., compressed_blocks={"fp8": 4096})`` gives the cache a second, compressed
:class:`~pagedkv.KVCache` per format: same geometry, model and manager options, the
quantized ``kv_dtype``, its own pool of that many blocks (each about half the bytes of
a bf16 block). ``cache.compress(seq_id, "fp8")`` moves a live sequence there: the side
cache allocates it (its prefix cache finds full blocks another compressed sequence of
the same prefix brought, which are shared, not re-encoded), the remaining blocks are
quantized into it on the device (:func:`pagedkv.storage.convert_blocks`), then the
sequence is freed here (its registered full blocks stay findable in this cache's prefix
cache until evicted). There it is a normal live sequence: ``cache.compressed("fp8")``
appends, decodes (the kernels read fp8 directly), forks and frees it.
``cache.decompress(seq_id)`` brings it back (dequantized; blocks still cached here are
reused as they are). Both are atomic: on any error nothing changed.

The cache runs the two moves (they touch its manager); this module keeps the side
caches, which sequence lives where, the block conversion and the statistics.
"""

from __future__ import annotations

import time
from collections.abc import Container, Hashable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from pagedkv._kv_formats import dtype_name, is_quantized, parse_kv_dtype
from pagedkv._validate import check_int
from pagedkv.storage import KVLayout, convert_blocks


class CompressionStats(NamedTuple):
    """What :meth:`KVCache.compression_stats` reports.

    ``compressed_seqs``: sequences held compressed now. ``bytes_saved``: bytes the blocks
    they hold (each shared block once) would take in the cache's own format minus what
    they take compressed (blocks also held by uncompressed sequences are not deducted).
    ``ratio``: the same bytes divided (1.0 while none is held). ``seconds``: mean wall
    time of one :meth:`~KVCache.compress` call so far (0.0 before the first).
    """

    compressed_seqs: int
    bytes_saved: int
    ratio: float
    seconds: float


def parse_specs(specs: object, layout: KVLayout) -> dict[torch.dtype, int]:
    """``{kv_dtype: num_blocks}`` from what ``KVCache(compressed_blocks=...)`` was given."""
    if specs is None:
        return {}
    if not isinstance(specs, Mapping):
        raise TypeError(
            "compressed_blocks must map a quantized kv_dtype to a block count, e.g. "
            f"{{'fp8': 4096}}, got {type(specs).__name__}"
        )
    out: dict[torch.dtype, int] = {}
    for key, n in specs.items():
        fmt = parse_kv_dtype(key, "compressed_blocks key")
        if not is_quantized(fmt):
            raise ValueError(f"compressed_blocks: {dtype_name(fmt)} is not a compressed format")
        if fmt == layout.kv_dtype:
            raise ValueError(
                f"compressed_blocks: the cache already stores {dtype_name(fmt)}; a side "
                "cache must use another format"
            )
        if fmt in out:
            raise ValueError(f"compressed_blocks names {dtype_name(fmt)} twice")
        out[fmt] = check_int(n, f"compressed_blocks[{key!r}]", minimum=1)
    return out


def side_layouts(layout: KVLayout, specs: Mapping[torch.dtype, int]) -> list[tuple[KVLayout, int]]:
    """The (layout, num_blocks) of each side cache (for the memory check)."""
    return [(layout.with_kv_dtype(fmt), n) for fmt, n in specs.items()]


class CompressedArea:
    """The side caches of one KVCache and which sequence lives in which (the caches are
    KVCaches, not imported here: :mod:`pagedkv.cache` imports this module)."""

    def __init__(self, caches: dict[torch.dtype, Any]) -> None:  # dtype -> its KVCache
        self.caches = caches
        self.where: dict[Hashable, torch.dtype] = {}
        self.calls = 0
        self.seconds = 0.0

    def side(self, kv_dtype: object) -> Any:
        """The side cache of ``kv_dtype`` (``ValueError`` when the cache has none)."""
        fmt = parse_kv_dtype(kv_dtype)
        cache = self.caches.get(fmt)
        if cache is None:
            have = [dtype_name(d) for d in self.caches] or "none"
            raise ValueError(
                f"this KVCache has no {dtype_name(fmt)} side cache (it has: {have}); build it "
                f"with compressed_blocks={{'{dtype_name(fmt)}': num_blocks}}"
            )
        return cache

    def holds(self, seq_id: Hashable) -> bool:
        return seq_id in self.where

    def record(self, seq_id: Hashable, kv_dtype: torch.dtype, seconds: float) -> None:
        """``seq_id`` now lives in the side cache of ``kv_dtype``; one compress() took
        ``seconds``."""
        self.where[seq_id] = kv_dtype
        self.calls += 1
        self.seconds += seconds

    def side_of(self, seq_id: Hashable) -> Any:
        """The side cache holding compressed ``seq_id`` (``KeyError`` if none does)."""
        fmt = self.where.get(seq_id)
        if fmt is None:
            raise KeyError(f"sequence {seq_id!r} is not compressed")
        return self.caches[fmt]

    def forget(self, seq_id: Hashable) -> None:
        """``seq_id`` left its side cache (decompressed or freed there)."""
        del self.where[seq_id]

    def free(self, seq_id: Hashable) -> None:
        self.caches[self.where.pop(seq_id)].free(seq_id)

    def stats(self, main_layout: KVLayout) -> CompressionStats:
        full = small = 0
        for cache in self.caches.values():
            used = cache.stats().used_blocks
            full += used * main_layout.bytes_per_block
            small += used * cache.layout.bytes_per_block
        mean = self.seconds / self.calls if self.calls else 0.0
        return CompressionStats(len(self.where), full - small, full / small if small else 1.0, mean)

    def violations(self, live: Container[Hashable], swapped: Container[Hashable]) -> list[str]:
        """What disagrees: each compressed id live in exactly its side cache, none also
        live or swapped out in the main cache, no side sequence unaccounted for."""
        problems = []
        for sid, fmt in self.where.items():
            if sid not in self.caches[fmt]:
                problems.append(f"compressed sequence {sid!r} is not live in its side cache")
            if sid in live or sid in swapped:
                problems.append(f"sequence {sid!r} is both compressed and live / swapped out")
        for fmt, cache in self.caches.items():
            stray = [s for s in cache.seq_ids() if self.where.get(s) != fmt]
            if stray:
                problems.append(
                    f"the {dtype_name(fmt)} side cache holds sequences {stray[:5]} the cache "
                    "does not list as compressed (use cache.compress, not the side cache's "
                    "allocate)"
                )
        return problems


def copy_converted(src: Any, src_table, dst: Any, dst_table, cached: int, n: int) -> None:
    """Convert a sequence's blocks from cache ``src`` into cache ``dst``, past the target's
    prefix hit (``cached`` tokens); its last block holds the rest of its ``n`` tokens (the
    junk past them never reaches a scale)."""
    bs = src.block_size
    hit = cached // bs
    fills = [min(bs, n - i * bs) for i in range(hit, len(dst_table))]
    convert_blocks(src.pool, src_table[hit:], dst.pool, dst_table[hit:], fills=fills)


class CompressionMethods:
    """KVCache's compress / compressed / decompress (a mixin: ``self`` is the KVCache;
    kept here beside the side caches they move sequences into)."""

    _compressed: CompressedArea
    manager: Any
    _salts: dict

    if TYPE_CHECKING:  # provided by CacheReads / CacheLimits, KVCache's other bases

        def _check_not_paused(self, what: str) -> None: ...
        def _flush_evictions(self) -> None: ...
        def token_ids(self, seq_id: Hashable) -> list[int]: ...
        def salt(self, seq_id: Hashable) -> object: ...
        def block_table(self, seq_id: Hashable) -> list[int]: ...

    def compress(self, seq_id: Hashable, kv_dtype: str | torch.dtype = "fp8") -> None:
        """Move a live sequence into the compressed side cache of ``kv_dtype`` ("fp8",
        "fp8_e5m2", "int8"; see ``compressed_blocks``): its KV is quantized there (blocks
        another compressed sequence brought with the same prefix are shared), its blocks
        here are released. Call it between steps, when the sequence's KV is written.
        It then lives in :meth:`compressed` until :meth:`decompress` or :meth:`free`.
        ``KeyError`` unless live here, ``ValueError`` without such a side cache,
        :class:`OutOfBlocks` when that is full; nothing changes on error.
        """
        self._check_not_paused("compress()")
        t0 = time.perf_counter()
        side = self._compressed.side(kv_dtype)
        tokens, salt, table = self.token_ids(seq_id), self.salt(seq_id), self.block_table(seq_id)
        cached = side.allocate(seq_id, tokens, salt)  # OutOfBlocks: nothing changed
        try:
            dst = side.block_table(seq_id)
            copy_converted(self, table, side, dst, cached, len(tokens))
        except BaseException:
            side.discard(seq_id)  # its fresh blocks never got their KV
            raise
        self.manager.free(seq_id)
        self._salts.pop(seq_id, None)
        self._compressed.record(seq_id, side.layout.kv_dtype, time.perf_counter() - t0)

    def compressed(self, kv_dtype: str | torch.dtype = "fp8") -> Any:
        """The side cache of ``kv_dtype``, where its compressed sequences live: append,
        decode, read them there; compress, decompress and free them through this cache."""
        return self._compressed.side(kv_dtype)

    def decompress(self, seq_id: Hashable) -> None:
        """Bring a compressed sequence back into this cache's own format (dequantized;
        blocks of its prefix still cached here are reused as they are). ``KeyError``
        unless compressed, :class:`OutOfBlocks` when the pool is full (it stays compressed)."""
        self._check_not_paused("decompress()")
        side = self._compressed.side_of(seq_id)
        tokens, salt = side.token_ids(seq_id), side.salt(seq_id)
        cached = self.manager.allocate(seq_id, tokens, salt)  # OutOfBlocks: nothing changed
        try:
            self._flush_evictions()
            dst = self.manager.block_table(seq_id)
            copy_converted(side, side.block_table(seq_id), self, dst, cached,
                                           len(tokens))  # fmt: skip
        except BaseException:
            self.manager.discard(seq_id)
            raise
        side.free(seq_id)
        self._compressed.forget(seq_id)
        self._salts[seq_id] = salt
