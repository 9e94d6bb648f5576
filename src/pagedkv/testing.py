"""Test doubles for code built on pagedkv: an in-memory :class:`SyntheticPager`.

:class:`SyntheticPager` is a small, torch-only model of the
:class:`~pagedkv.snapshot.pager.CachePager` contract (free list, ref counts, prefix
sharing by chained token hash) so snapshot code can be tested without a block manager
or a pool. It is no part of the library's data path; it used to live in
``pagedkv.snapshot`` (still importable from there, deprecated).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from pagedkv._forward import read_through
from pagedkv._pausing import Pausable
from pagedkv.errors import CacheIntegrityError, OutOfBlocks
from pagedkv.manager.hashing import as_token_array, chain_hashes, hash_function, namespace
from pagedkv.storage.host import HostRowCache
from pagedkv.storage.layout import KVLayout

__all__ = ["SyntheticPager"]

# Reads of at least this many bytes gather on torch's threads (a save reads MiB chunks).
_THREADED_READ = 4 << 20


class SyntheticPager(Pausable):
    """An in-memory :class:`CachePager`: blocks are rows of one ``uint8`` tensor.

    Allocation mirrors the manager's states: a block is free, in use (ref > 0) or
    cached (ref 0, chained hash registered, evicted LRU-first when the free list is
    empty). Full blocks are shared by their chained token hash (salted), and
    ``allocate`` reports the shared prefix in tokens, always leaving one token to
    compute. Mutations raise ``RuntimeError`` while :meth:`paused`.
    """

    def __init__(
        self,
        layout: KVLayout,
        num_blocks: int,
        *,
        fingerprint: str = "synthetic",
        prefix_caching: bool = True,
    ) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self._layout = layout
        self._fingerprint = fingerprint
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.data = torch.zeros(num_blocks, layout.bytes_per_block, dtype=torch.uint8)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() -> lowest id
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref 0 + hash, LRU first
        self._seqs: dict[Hashable, tuple[list[int], list[int], object]] = {}
        self._paused = 0
        self._digest = hash_function("sha256")
        self._rows = HostRowCache()  # read_blocks buffers, recycled once unreferenced

    # -- identity -------------------------------------------------------------------
    layout: KVLayout = read_through("_layout", "The block geometry.")

    fingerprint: str = read_through(
        "_fingerprint", "Model + layout identity; snapshots refuse to cross it."
    )

    block_size: int = read_through("_layout.block_size")

    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation can take: free plus cached (evictable)."""
        return len(self._free) + len(self._cached)

    # -- reads ----------------------------------------------------------------------
    def seq_ids(self) -> list[Hashable]:
        return list(self._seqs)

    def _seq(self, seq_id: Hashable) -> tuple[list[int], list[int], object]:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._seq(seq_id)[1])

    def num_tokens(self, seq_id: Hashable) -> int:
        return len(self._seq(seq_id)[0])

    def token_ids(self, seq_id: Hashable) -> list[int]:
        return list(self._seq(seq_id)[0])

    def salt(self, seq_id: Hashable) -> object:
        return self._seq(seq_id)[2]

    def read_blocks(self, ids: Sequence[int]) -> torch.Tensor:
        # data: [n, bytes_per_block] uint8
        idx = np.asarray(list(ids), dtype=np.int64)
        if len(idx) * self.data.shape[1] < _THREADED_READ:
            # numpy indexing: single-threaded, so no OpenMP start-up cost on tiny reads
            return torch.from_numpy(self.data.numpy()[idx])
        out = self._rows.take(len(idx), self.data.shape[1])  # warm memory: no page faults
        return torch.index_select(self.data, 0, torch.from_numpy(idx), out=out)  # torch's threads

    def can_allocate(self, num_tokens: int) -> bool:
        return self._layout.num_blocks_for(num_tokens) <= self.num_free_blocks

    # -- mutations ------------------------------------------------------------------
    def _check_not_paused(self, what: str) -> None:
        if self._paused:
            raise RuntimeError(f"SyntheticPager.{what}() refused: the pager is paused for a save")

    def write_blocks(self, ids: Sequence[int], data: torch.Tensor) -> None:
        self._check_not_paused("write_blocks")
        ids = list(ids)
        if data.dtype != torch.uint8 or tuple(data.shape) != (len(ids), self.data.shape[1]):
            raise ValueError(
                f"write_blocks expects uint8 [{len(ids)}, {self.data.shape[1]}], "
                f"got {data.dtype} {list(data.shape)}"
            )
        self.data.numpy()[np.asarray(ids, dtype=np.int64)] = data.numpy()

    def _take_block(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._cached.popitem(last=False)  # evict the least recently used
        del self._by_hash[self._hash_of.pop(block)]
        return block

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int], salt: object = None) -> int:
        self._check_not_paused("allocate")
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists; free it first")
        tokens = list(as_token_array(token_ids))
        if not tokens:
            raise ValueError("allocate needs at least one token")
        bs = self._layout.block_size
        hashes = chain_hashes(tokens, bs, namespace(salt, (self._fingerprint,)), self._digest)
        hits: list[int] = []
        if self.prefix_caching:
            # leave at least one token to compute: a full-sequence hit stops a block short
            for h in hashes[: (len(tokens) - 1) // bs]:
                block = self._by_hash.get(h)
                if block is None:
                    break
                hits.append(block)
        need = self._layout.num_blocks_for(len(tokens)) - len(hits)
        reusable = sum(1 for b in hits if self._ref[b] == 0)
        if need > self.num_free_blocks - reusable:
            raise OutOfBlocks(
                f"sequence {seq_id!r} needs {need} new blocks, only "
                f"{self.num_free_blocks - reusable} free or evictable"
            )
        for b in hits:
            if self._ref[b] == 0:
                del self._cached[b]
            self._ref[b] += 1
        table = list(hits)
        for i in range(len(hits), len(hits) + need):
            b = self._take_block()
            self._ref[b] = 1
            if self.prefix_caching and i < len(hashes) and hashes[i] not in self._by_hash:
                self._hash_of[b] = hashes[i]
                self._by_hash[hashes[i]] = b
            table.append(b)
        self._seqs[seq_id] = (tokens, table, salt)
        return len(hits) * bs

    def free(self, seq_id: Hashable) -> None:
        self._check_not_paused("free")
        _, table, _ = self._seq(seq_id)
        del self._seqs[seq_id]
        for b in reversed(table):  # the tail is evicted first, as in the manager
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._hash_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)

    # -- test helpers ---------------------------------------------------------------
    def fill_random(self, seq_id: Hashable, generator: torch.Generator | None = None) -> None:
        """Write random bytes into the blocks of ``seq_id`` that it does not share."""
        table = self._seq(seq_id)[1]
        own = [b for b in table if self._ref[b] == 1]
        if own:
            self.write_blocks(
                own,
                torch.randint(
                    0, 256, (len(own), self.data.shape[1]), dtype=torch.uint8, generator=generator
                ),
            )

    def state(self) -> dict:
        """A comparable copy of everything observable (tests: unchanged after a refusal)."""
        return {
            "seqs": {k: (list(t), list(b), s) for k, (t, b, s) in self._seqs.items()},
            "free": list(self._free),
            "cached": list(self._cached),
            "ref": list(self._ref),
            "by_hash": dict(self._by_hash),
            "data": self.data.clone(),
        }

    def check_integrity(self) -> None:
        """Raise :class:`CacheIntegrityError` naming the numbers when block states disagree."""
        in_use = sum(1 for r in self._ref if r > 0)
        total = len(self._free) + len(self._cached) + in_use
        if total != self.num_blocks:  # not assert: a check must hold under python -O too
            raise CacheIntegrityError(
                f"free({len(self._free)}) + cached({len(self._cached)}) + in_use({in_use}) "
                f"!= num_blocks({self.num_blocks})"
            )
        refs = [0] * self.num_blocks
        for _, table, _ in self._seqs.values():
            for b in table:
                refs[b] += 1
        if refs != self._ref:
            raise CacheIntegrityError("ref counts disagree with the block tables")
