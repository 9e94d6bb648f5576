"""CachePager: what a snapshot needs from a KV cache.

A pager exposes sequences (token ids + block table) and the raw bytes of blocks.
``KVCache`` implements it; :class:`pagedkv.testing.SyntheticPager` is an in-memory one
for tests (importable from here too, where it was first).
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Sequence
from typing import Protocol, runtime_checkable

import torch

from pagedkv.storage.layout import KVLayout


@runtime_checkable
class CachePager(Protocol):
    """The engine-agnostic view of a paged KV cache that snapshots save and restore.

    - ``layout`` / ``fingerprint``: geometry and identity (model + layout); a snapshot
      is only restored into a pager whose layout and fingerprint are equal.
    - ``block_table(seq_id)`` lists the blocks of a sequence in order; the last one is
      filled to ``num_tokens - (len(table) - 1) * block_size`` tokens.
    - ``read_blocks(ids)`` returns ``uint8 [n, layout.bytes_per_block]`` on the CPU,
      bytes ordered (layer, k/v, token, head, dim); ``write_blocks`` is its inverse.
    - ``allocate(seq_id, token_ids, salt)`` creates a sequence holding ``token_ids``
      and returns how many leading tokens were already cached: those blocks are
      shared with the prefix cache and must not be written. It raises
      :class:`~pagedkv.errors.OutOfBlocks` and changes nothing when it cannot fit.
    - ``salt(seq_id)`` is the salt the sequence was allocated with (``None`` if none).
    - ``paused()`` is a context manager during which the pager refuses or defers
      every mutation, so a save reads a consistent state.

    Optional: ``discard(seq_id)``, a free that caches nothing the sequence registered
    (a failed restore drops what it installed with it; ``free`` otherwise). Optional: a
    ``model_fingerprint`` attribute (a readable model id) is recorded in
    manifests and named in mismatch errors next to the opaque ``fingerprint``; a
    ``num_released(seq_id)`` method (blocks released outside a sliding window, see
    :meth:`~pagedkv.KVCache.release_before`): a sequence with any is refused by save.
    """

    @property
    def layout(self) -> KVLayout: ...

    @property
    def fingerprint(self) -> str: ...

    def seq_ids(self) -> list[Hashable]: ...

    def block_table(self, seq_id: Hashable) -> list[int]: ...

    def num_tokens(self, seq_id: Hashable) -> int: ...

    def token_ids(self, seq_id: Hashable) -> list[int]: ...

    def salt(self, seq_id: Hashable) -> object: ...

    def read_blocks(self, ids: Sequence[int]) -> torch.Tensor: ...

    def write_blocks(self, ids: Sequence[int], data: torch.Tensor) -> None: ...

    def allocate(self, seq_id: Hashable, token_ids: Sequence[int], salt: object = None) -> int: ...

    def free(self, seq_id: Hashable) -> None: ...

    def can_allocate(self, num_tokens: int) -> bool: ...

    def paused(self) -> contextlib.AbstractContextManager[None]: ...


def model_of(pager: CachePager) -> str | None:
    """The human-readable model id, where the pager has one (``KVCache.model_fingerprint``)."""
    model = getattr(pager, "model_fingerprint", None)
    return str(model) if model else None


def __getattr__(name: str) -> object:
    # SyntheticPager lived here; it is a test double and moved to pagedkv.testing.
    if name == "SyntheticPager":
        from pagedkv.testing import SyntheticPager

        return SyntheticPager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
