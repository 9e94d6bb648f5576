"""What a save reads and what a restore installs, apart from the store's protocol.

A save reads each sequence as (block, fill) *units*: a block and how many of its
token slots hold the sequence's tokens (the last block's slots past ``fill`` are
zeroed, so equal KV has equal digests). A restore checks the snapshot against the
cache (layout, fingerprint), picks the sequences and their new ids, and installs
them, sharing what the cache's prefix cache already holds.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

from pagedkv._kv_formats import dtype_name
from pagedkv.errors import OutOfBlocks, SnapshotError
from pagedkv.snapshot.args import seq_id_list
from pagedkv.snapshot.jsondoc import MAX_DOC_BYTES
from pagedkv.snapshot.manifest import (
    Manifest,
    SequenceEntry,
    describe_layout,
    encode_salt,
    layout_dict,
)
from pagedkv.snapshot.pager import CachePager
from pagedkv.storage import KVLayout


def plan_save(pager: CachePager, ids: list[int | str] | None, meta_bytes: int) -> tuple:
    """Sequences to save and the distinct (block, fill) units their pages come from.

    Checks everything the manifest will hold (ids, salts, its size) before any write.
    """
    if ids is None:
        ids = seq_id_list(pager.seq_ids(), "save (the pager's ids)")
    live = set(pager.seq_ids())
    bs = pager.layout.block_size
    entries, units, unit_of = [], [], {}
    size = meta_bytes + 4096
    for sid in ids:
        if sid not in live:
            raise KeyError(
                f"sequence {sid!r:.60} is not in the pager (live: {sorted(map(str, live))[:8]})"
            )
        tokens = list(pager.token_ids(sid))
        table = list(pager.block_table(sid))
        salt = pager.salt(sid)
        encode_salt(salt)
        n = len(tokens)
        if n == 0 or len(table) != -(-n // bs):
            raise SnapshotError(
                f"sequence {sid!r}: {n} tokens but {len(table)} blocks of {bs}; "
                "the pager is inconsistent"
            )
        size += 11 * n + 67 * len(table) + 256 + (len(sid) if isinstance(sid, str) else 20)
        fill = n - (len(table) - 1) * bs
        us = [(b, bs) for b in table[:-1]] + [(table[-1], fill)]
        for u in us:
            if u not in unit_of:
                unit_of[u] = len(units)
                units.append(u)
        entries.append((sid, tokens, us, fill, salt))
    if size > MAX_DOC_BYTES:
        raise ValueError(
            f"these sequences would make a manifest of up to {size} bytes, more than the "
            f"{MAX_DOC_BYTES} a manifest may hold; save them as several snapshots"
        )
    return entries, units, unit_of


def read_units(pager: CachePager, units: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Bytes of (block, fill) units, ``uint8 [n, bytes_per_block]``; slots past fill zeroed."""
    rows = pager.read_blocks([b for b, _ in units])
    if not rows.is_contiguous() or rows.device.type != "cpu":
        rows = rows.to("cpu").contiguous()
    lay = pager.layout
    arr = rows.numpy()
    for i, (_, fill) in enumerate(units):
        if fill < lay.block_size:
            # row bytes are ordered (layer, k/v, token, head, dim): zero tokens >= fill
            # (a compressed layout's scales follow the payload and stay)
            pay = arr[i][: lay.payload_bytes]
            pay.reshape(lay.num_layers * 2, lay.block_size, -1)[:, fill:, :] = 0
    return rows


def check_compatible(m: Manifest, pager: CachePager) -> KVLayout | None:
    """Raise ``SnapshotError`` unless the snapshot loads into ``pager``. Returns the
    snapshot's layout when its pages must be converted first (a compressed snapshot into
    an unquantized cache of the same model: dequantized), else None (bit-exact)."""
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
    same = all(d[k] == getattr(lay, k) for k in ("num_layers", "num_kv_heads", "head_dim",
                                                  "block_size"))  # fmt: skip
    if not same or d["dtype"] != dtype_name(lay.dtype):
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


def model_of(pager: CachePager) -> str | None:
    """The human-readable model id, where the pager has one (``KVCache.model_fingerprint``)."""
    model = getattr(pager, "model_fingerprint", None)
    return str(model) if model else None


def select(
    m: Manifest, pager: CachePager, seq_ids: Mapping[Any, Hashable] | None
) -> tuple[list[SequenceEntry], dict[Any, Hashable]]:
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

    On any error the sequences installed so far are freed and the error re-raised
    (``OutOfBlocks`` saying nothing was restored).
    """
    row_of = {d: i for i, d in enumerate(digests)}
    installed: list[Hashable] = []
    bs = pager.layout.block_size
    shared = 0
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
        for sid in reversed(installed):
            pager.free(sid)
        if isinstance(exc, OutOfBlocks):
            raise OutOfBlocks(
                f"restoring snapshot {name!r} ran out of blocks at sequence "
                f"{e.seq_id!r} ({exc}); nothing was restored"
            ) from exc
        raise
    return shared
