"""Reading a snapshot back: restore it into a pager, or verify every page of it.

Every page is read and checked (its length, and its sha256 against its key) before
anything is installed: a restore of a damaged snapshot changes nothing. A restore
checks the snapshot against the cache (layout, fingerprint), picks the sequences and
their new ids, and installs them, sharing what the cache's prefix cache already holds.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from pagedkv._kv_formats import dtype_name
from pagedkv.errors import OutOfBlocks, SnapshotError
from pagedkv.snapshot.keys import page_key
from pagedkv.snapshot.manifest import Manifest, SequenceEntry, describe_layout, layout_dict
from pagedkv.snapshot.pager import CachePager, model_of
from pagedkv.snapshot.pipeline import Workers, progress_bar
from pagedkv.storage.host import host_bytes
from pagedkv.storage.layout import KVLayout
from pagedkv.stores.base import BlockStore, ReadsInto


class Fetched(NamedTuple):
    """Pages read and checked: ``rows`` (``uint8 [n, bytes_per_block]``; with ``keep``, row
    ``i`` holds page ``i`` once it verified), and the digests ``missing`` or ``corrupt``."""

    rows: torch.Tensor
    missing: list[str]
    corrupt: list[str]


class Checked(NamedTuple):
    """What a verify found: ``pages`` distinct pages asked for, the digests ``missing``
    (sorted) and ``corrupt``, and the bytes read and checked."""

    pages: int
    missing: list[str]
    corrupt: list[str]
    bytes_checked: int


class PageReader:
    """Reads pages of ``bytes_per_block`` from ``backend`` in chunks of ``chunk_bytes``,
    hashing them on ``threads`` threads while the next chunk is read."""

    def __init__(
        self,
        backend: BlockStore,
        bytes_per_block: int,
        *,
        chunk_bytes: int,
        threads: int,
        progress: bool,
        what: str,
    ) -> None:
        self.backend = backend
        self.bytes_per_block = bytes_per_block
        self.step = max(1, chunk_bytes // bytes_per_block)
        self.threads = threads
        self.progress = progress
        self.what = what

    def fetch(self, digests: Sequence[str], *, keep: bool) -> Fetched:
        """Read every page of ``digests`` and check its length and sha256.

        Pages are read straight into the rows where the backend can
        (:class:`~pagedkv.stores.base.ReadsInto`: no intermediate ``bytes``), the next
        chunk being read while this one is hashed. Without ``keep`` two chunk-sized
        buffers alternate (a verify).
        """
        size, step = self.bytes_per_block, self.step
        chunks = [range(a, min(len(digests), a + step)) for a in range(0, len(digests), step)]
        rows = host_bytes(len(digests) if keep else 2 * min(step, len(digests)), size)
        missing: list[str] = []
        corrupt: list[str] = []

        def read(j: int) -> tuple[torch.Tensor, list[int | None]]:
            """Chunk ``j`` into its rows; per page: bytes present (``None``: missing)."""
            part = chunks[j]
            a = part.start if keep else (j % 2) * step
            out = rows[a : a + len(part)]
            return out, self._read([digests[i] for i in part], out)

        with (
            Workers(self.threads, size) as work,
            progress_bar(self.progress, self.what, len(digests) * size) as bar,
        ):
            ahead = work.background(read, 0) if chunks else None
            for j, part in enumerate(chunks):
                assert ahead is not None
                out, sizes = ahead.result()  # read the next chunk while this one is checked
                if j + 1 < len(chunks):
                    ahead = work.background(read, j + 1)
                names = [digests[i] for i in part]
                missing += [d for d, n in zip(names, sizes) if n is None]
                corrupt += [d for d, n in zip(names, sizes) if n is not None and n != size]
                good = [k for k, n in enumerate(sizes) if n == size]
                arr = out.numpy()
                for k, h in zip(good, work.digests([memoryview(arr[k]) for k in good])):
                    if h != names[k]:
                        corrupt.append(names[k])
                bar(len(part) * size)
        return Fetched(rows, missing, corrupt)

    def check(self, digests: list[str]) -> Checked:
        """Read back and check every page of ``digests`` (distinct), keeping none: which
        are missing (asked the store first, then read) and which are corrupt."""
        present = self.backend.contains_many([page_key(d) for d in digests]) if digests else []
        _, missing, corrupt = self.fetch([d for d, p in zip(digests, present) if p], keep=False)
        missing = sorted([d for d, p in zip(digests, present) if not p] + missing)
        checked = (len(digests) - len(missing)) * self.bytes_per_block
        return Checked(len(digests), missing, corrupt, checked)

    def _read(self, digests: list[str], out: torch.Tensor) -> list[int | None]:
        """Pages into ``out`` rows; per page the bytes found (``None``: missing).

        A page of another size is reported with its size and leaves its row as it was.
        """
        size = self.bytes_per_block
        keys = [page_key(d) for d in digests]
        if isinstance(self.backend, ReadsInto):
            found = self.backend.get_into(keys, out)
        else:
            found = [False] * len(keys)
        sizes: list[int | None] = [size if f else None for f in found]
        retry = [k for k, f in enumerate(found) if not f]
        if retry:  # no get_into, or a page missing or of another size: plain reads
            arr = out.numpy()
            for k, v in zip(retry, self.backend.get_many([keys[k] for k in retry])):
                if v is not None:
                    sizes[k] = len(v)
                    if len(v) == size:
                        arr[k] = np.frombuffer(v, dtype=np.uint8)
        return sizes


def check_compatible(m: Manifest, pager: CachePager) -> KVLayout | None:
    """``SnapshotError`` unless snapshot ``m`` loads into the pager: saved with its layout
    and fingerprint (KV is only valid for the model and layout that computed it), or a
    compressed snapshot of the same model into an unquantized cache. Returns the
    snapshot's layout when its pages must be dequantized first, else None (bit-exact)."""
    mine = layout_dict(pager.layout)
    expected = str(pager.fingerprint)
    source = None
    if m.layout != mine:
        source = _dequantizable(m, pager.layout)
        fingerprint_for = getattr(pager, "fingerprint_for", None)
        if source is None or fingerprint_for is None:
            raise SnapshotError(
                f"snapshot {m.name!r} was saved with layout [{describe_layout(m.layout)}] but "
                f"the cache has layout [{describe_layout(mine)}]; restore it into a cache "
                "built with the snapshot's layout" + _format_hint(m.layout, mine)
            )
        expected = str(fingerprint_for(source))
    if m.fingerprint != expected:
        theirs, ours = model_of(pager), m.model
        raise SnapshotError(
            f"snapshot {m.name!r} was saved from model fingerprint {m.fingerprint!r}"
            + (f" (model {ours!r})" if ours else "")
            + f" but the cache has fingerprint {pager.fingerprint!r}"
            + (f" (model {theirs!r})" if theirs else "")
            + "; KV is only valid for the model and layout that computed it"
        )
    return source


def _dequantizable(m: Manifest, lay: KVLayout) -> KVLayout | None:
    """The snapshot's KVLayout if it is a compressed one of ``lay``'s geometry and dtype
    and ``lay`` is unquantized (a wider format: its pages load dequantized), else None."""
    d = m.layout
    if "kv_dtype" not in d or lay.quantized:
        return None
    dims = ("num_layers", "num_kv_heads", "head_dim", "block_size")
    if any(d[k] != getattr(lay, k) for k in dims) or d["dtype"] != dtype_name(lay.dtype):
        return None
    return lay.with_kv_dtype(d["kv_dtype"])


def _format_hint(theirs: dict[str, Any], mine: dict[str, Any]) -> str:
    a, b = theirs.get("kv_dtype"), mine.get("kv_dtype")
    if a == b:
        return ""
    if a is not None and b is not None:
        return (
            f" (a {a} snapshot loads into a {a} cache bit-exactly, or dequantized into an "
            f"unquantized {theirs['dtype']} one; not into {b}, which would round it twice)"
        )
    if b is not None:
        return f" (an unquantized snapshot does not load into a {b} cache)"
    return ""


def select(
    m: Manifest, pager: CachePager, seq_ids: Mapping[Any, Hashable] | None
) -> tuple[list[SequenceEntry], dict[Any, Hashable]]:
    """The sequences of ``m`` to restore and their new ids: those of ``seq_ids`` (checked:
    known, new ids distinct and unused), or every one under ``"<name>:<old id>"``."""
    live = set(pager.seq_ids())
    if seq_ids is None:
        mapping: dict[Any, Hashable] = {}
        used: set[Hashable] = set()
        for s in m.sequences:
            new, k = f"{m.name}:{s.seq_id}", 2
            while new in live or new in used:
                new, k = f"{m.name}:{s.seq_id}#{k}", k + 1
            mapping[s.seq_id] = new
            used.add(new)
    else:
        mapping = dict(seq_ids)
        by_id = {s.seq_id for s in m.sequences}
        unknown = [k for k in mapping if k not in by_id]
        if unknown:
            raise KeyError(
                f"snapshot {m.name!r} has no sequences {unknown[:8]} "
                f"(it has {sorted(by_id, key=str)[:8]}{'...' if len(by_id) > 8 else ''})"
            )
        taken = [v for v in mapping.values() if v in live]
        if taken or len(set(mapping.values())) != len(mapping):
            raise ValueError(f"new sequence ids must be distinct and unused; taken: {taken[:8]}")
    return [s for s in m.sequences if s.seq_id in mapping], mapping


def install(
    pager: CachePager,
    name: str,
    entries: list[SequenceEntry],
    mapping: dict[Any, Hashable],
    pages: torch.Tensor,
    digests: list[str],
) -> int:
    """Allocate each sequence under its new id and write the pages its prefix cache
    lacks (row ``i`` of ``pages`` holds page ``digests[i]``); return the blocks shared.

    On any error the sequences installed so far are dropped and the error re-raised
    (``OutOfBlocks`` saying nothing was restored): through the pager's ``discard`` where
    it has one, so the blocks they registered are freed, not left in the prefix cache
    (a block whose write failed holds no KV, and the cache is left as it was before).
    """
    row_of = {d: i for i, d in enumerate(digests)}
    installed: list[Hashable] = []
    bs = pager.layout.block_size
    shared = 0
    e = None
    try:
        for e in entries:
            new_id = mapping[e.seq_id]
            cached = pager.allocate(new_id, e.token_ids, salt=e.salt)
            installed.append(new_id)
            table = pager.block_table(new_id)
            skip = -(-cached // bs)  # a partly cached block is still shared
            shared += skip
            if skip < len(table):
                idx = [row_of[d] for d in e.pages[skip:]]
                if idx == list(range(idx[0], idx[0] + len(idx))):
                    data = pages[idx[0] : idx[0] + len(idx)]  # a view: no copy
                else:
                    data = pages[torch.tensor(idx)]
                pager.write_blocks(table[skip:], data)
    except BaseException as exc:
        drop = getattr(pager, "discard", None) or pager.free
        for sid in reversed(installed):
            drop(sid)
        if isinstance(exc, OutOfBlocks):
            at = "?" if e is None else repr(e.seq_id)
            raise OutOfBlocks(
                f"restoring snapshot {name!r} ran out of blocks at sequence {at} ({exc}); "
                "nothing was restored"
            ) from exc
        raise
    return shared
