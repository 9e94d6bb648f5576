"""The save protocol: what a save (or fork) writes, and in which order.

A save reads each sequence as (block, fill) *units*: a block and how many of its token
slots hold the sequence's tokens (the last block's slots past ``fill`` are zeroed, so
equal KV has equal digests). Per chunk of units it writes a lease naming the chunk's
pages, then the pages the store lacks (the next chunk is read and hashed meanwhile).
After the last chunk it waits while a gc runs, re-checks that every page it counts on
is stored (re-writing any a concurrent gc took), makes the pages durable, writes the
manifest (one atomic put) and makes it durable; the caller then drops the leases. A
save killed at any point leaves at most orphan pages and a dead lease, which ``gc``
removes (:mod:`pagedkv.snapshot.leases`). A fork writes one lease, waits, checks, and
writes its manifest: it shares every page of its parent.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any, NamedTuple

import numpy as np
import torch

from pagedkv.errors import SnapshotError
from pagedkv.snapshot.args import seq_id_list
from pagedkv.snapshot.jsondoc import MAX_DOC_BYTES
from pagedkv.snapshot.keys import lease_key, manifest_key, new_lease_id, page_key, sha256_hex
from pagedkv.snapshot.leases import take_lease, wait_for_gc, write_lease
from pagedkv.snapshot.manifest import Manifest, SequenceEntry, encode_salt, layout_dict
from pagedkv.snapshot.pager import CachePager, model_of
from pagedkv.snapshot.pipeline import Workers, drop_on_error, progress_bar
from pagedkv.stores.base import BlockStore

Unit = tuple[int, int]  # (block id, tokens of the sequence it holds)


class PlannedSequence(NamedTuple):
    """One sequence to save: its tokens, its units in block order, and its salt."""

    seq_id: int | str
    tokens: list[int]
    units: list[Unit]
    last_fill: int
    salt: object


class SavePlan(NamedTuple):
    """What a save reads: its sequences, and their distinct units (``unit_of[u]`` is the
    position of unit ``u`` in ``units``: pages shared by sequences are read once)."""

    sequences: list[PlannedSequence]
    units: list[Unit]
    unit_of: dict[Unit, int]


def plan_save(pager: CachePager, ids: list[int | str] | None, meta_bytes: int) -> SavePlan:
    """The sequences ``ids`` of ``pager`` (default: all) and the units their pages come
    from. Checks everything the manifest will hold (ids, salts, its size) before any
    write."""
    if ids is None:
        ids = seq_id_list(pager.seq_ids(), "save (the pager's ids)")
    assert ids is not None
    live = set(pager.seq_ids())
    bs = pager.layout.block_size
    plan = SavePlan([], [], {})
    size = meta_bytes + 4096
    for sid in ids:
        if sid not in live:
            raise KeyError(
                f"sequence {sid!r:.60} is not in the pager (live: {sorted(map(str, live))[:8]})"
            )
        _check_not_released(pager, sid)
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
        units = [(b, bs) for b in table[:-1]] + [(table[-1], fill)]
        for u in units:
            if u not in plan.unit_of:
                plan.unit_of[u] = len(plan.units)
                plan.units.append(u)
        plan.sequences.append(PlannedSequence(sid, tokens, units, fill, salt))
    if size > MAX_DOC_BYTES:
        raise ValueError(
            f"these sequences would make a manifest of up to {size} bytes, more than the "
            f"{MAX_DOC_BYTES} a manifest may hold; save them as several snapshots"
        )
    return plan


def _check_not_released(pager: CachePager, sid: int | str) -> None:
    """Refuse a sequence whose leading blocks were released outside its sliding window:
    their KV is gone, and a snapshot restores whole sequences."""
    num_released = getattr(pager, "num_released", None)
    released = num_released(sid) if num_released is not None else 0
    if released:
        raise SnapshotError(
            f"sequence {sid!r:.60} has {released} leading block(s) released outside its "
            "sliding window (release_before), so its KV is incomplete and cannot be saved; "
            "snapshot it before releasing (an Engine keeps every block of a model with a "
            "full-attention layer)"
        )


def read_units(pager: CachePager, units: Sequence[Unit]) -> torch.Tensor:
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


class Saver:
    """One save into ``backend`` (see the module docstring); ``flush`` makes what was
    written so far durable (a no-op unless the store is durable)."""

    def __init__(
        self,
        backend: BlockStore,
        *,
        chunk_bytes: int,
        threads: int,
        grace_seconds: float,
        flush: Callable[[], None],
    ) -> None:
        self.backend = backend
        self.chunk_bytes = chunk_bytes
        self.threads = threads
        self.grace_seconds = grace_seconds
        self.flush = flush

    def save(
        self,
        pager: CachePager,
        ids: list[int | str] | None,
        name: str,
        meta: dict[str, Any],
        *,
        progress: bool,
        started: float,
    ) -> Manifest:
        """Save and return the manifest written (``started``: the save's start time)."""
        lease_id = new_lease_id()
        leases: list[str] = []
        bytes_per_block = pager.layout.bytes_per_block
        with pager.paused(), drop_on_error(self.backend, leases):
            plan = plan_save(pager, ids, len(json.dumps(meta)))
            digests, written = self._write_pages(pager, name, plan, lease_id, leases, progress)
            # A gc that started after some of our leases may have deleted pages we
            # counted on: let it finish, then check every page and re-write the lost.
            wait_for_gc(self.backend, self.grace_seconds)
            written += self._repair_missing(pager, name, plan.units, digests, lease_id, leases)
            self.flush()  # pages durable before the manifest that names them
            pages_of = {
                s.seq_id: [digests[plan.unit_of[u]] for u in s.units] for s in plan.sequences
            }
            sequences = [
                SequenceEntry(s.seq_id, s.tokens, pages_of[s.seq_id], s.last_fill, s.salt)
                for s in plan.sequences
            ]
            logical = sum(len(s.pages) for s in sequences) * bytes_per_block
            manifest = Manifest(
                name=name,
                created=time.time(),
                fingerprint=str(pager.fingerprint),
                model=model_of(pager),
                layout=layout_dict(pager.layout),
                sequences=sequences,
                metadata=meta,
                bytes={
                    "logical": logical,
                    "unique": len(set(digests)) * bytes_per_block,
                    "written": written,
                },
                save={"seconds": time.perf_counter() - started},
            )
            self.backend.put_many([(manifest_key(name), manifest.encode())])
            self.flush()
        self.backend.delete_many(leases)
        return manifest

    def _write_pages(
        self,
        pager: CachePager,
        name: str,
        plan: SavePlan,
        lease_id: str,
        leases: list[str],
        progress: bool,
    ) -> tuple[list[str], int]:
        """Read, hash and write the units chunk by chunk (the next chunk is read and hashed
        while this one is written); return every unit's digest and the bytes written."""
        bytes_per_block = pager.layout.bytes_per_block
        units = plan.units
        digests: list[str] = [""] * len(units)
        written = 0
        with ExitStack() as stack:
            work = stack.enter_context(Workers(self.threads, bytes_per_block))
            total = len(units) * bytes_per_block
            bar = stack.enter_context(progress_bar(progress, f"save {name}", total))
            seen: set[str] = set()
            pending = None
            step = max(1, self.chunk_bytes // bytes_per_block)
            for start in range(0, len(units), step):
                rows = read_units(pager, units[start : start + step]).numpy()
                part = work.digests(rows)
                digests[start : start + len(part)] = part
                if pending is not None:
                    written += pending.result()
                lease = lease_key(lease_id, len(leases))
                leases.append(lease)
                pending = work.background(self._put_pages, lease, name, part, rows, seen)
                bar(len(part) * bytes_per_block)
            if pending is not None:
                written += pending.result()
        return digests, written

    def _put_pages(
        self, lease: str, name: str, digests: list[str], rows: np.ndarray, seen: set[str]
    ) -> int:
        """Lease, then write the pages of one chunk the store lacks; return bytes written."""
        new = {}
        for d, row in zip(digests, rows):
            if d not in seen and d not in new:
                new[d] = row
        seen.update(new)
        if not new:
            return 0
        write_lease(self.backend, lease, name, list(new))
        keys = [page_key(d) for d in new]
        have = self.backend.contains_many(keys)
        items = [(k, memoryview(row)) for k, row, h in zip(keys, new.values(), have) if not h]
        if items:
            self.backend.put_many(items)
        return sum(len(v) for _, v in items)

    def _repair_missing(
        self,
        pager: CachePager,
        name: str,
        units: list[Unit],
        digests: list[str],
        lease_id: str,
        leases: list[str],
    ) -> int:
        """Re-put pages that vanished while saving (a concurrent gc or eviction)."""
        uniq = list(dict.fromkeys(digests))
        have = self.backend.contains_many([page_key(d) for d in uniq])
        lost = {d for d, h in zip(uniq, have) if not h}
        if not lost:
            return 0
        idx = [i for i, d in enumerate(digests) if d in lost]
        idx = list({digests[i]: i for i in idx}.values())
        rows = read_units(pager, [units[i] for i in idx]).numpy()
        if [sha256_hex(r) for r in rows] != [digests[i] for i in idx]:
            raise SnapshotError("the pager changed during the save although it was paused")
        lease = lease_key(lease_id, len(leases))
        leases.append(lease)
        write_lease(self.backend, lease, name, list(lost))
        self.backend.put_many([(page_key(digests[i]), memoryview(r)) for i, r in zip(idx, rows)])
        return len(idx) * rows.shape[1]

    def fork(
        self,
        parent: Manifest,
        new_name: str,
        wanted: list[int | str] | None,
        meta: dict[str, Any] | None,
    ) -> Manifest:
        """Write snapshot ``new_name`` sharing the pages of ``parent`` (only the sequences
        ``wanted``, if given; ``meta`` replaces the parent's metadata, if given)."""
        sequences = parent.sequences
        if wanted is not None:
            by_id = {s.seq_id: s for s in sequences}
            unknown = [s for s in wanted if s not in by_id]
            if unknown:
                raise KeyError(f"snapshot {parent.name!r} has no sequences {unknown[:8]}")
            sequences = [by_id[s] for s in wanted]
        digests = sorted({d for s in sequences for d in s.pages})
        lease = lease_key(new_lease_id(), 0)
        take_lease(self.backend, lease, new_name, digests, self.grace_seconds)
        try:
            have = self.backend.contains_many([page_key(d) for d in digests])
            if not all(have):
                raise SnapshotError(
                    f"cannot fork {parent.name!r}: {have.count(False)} of its pages are missing "
                    f"(run `verify {parent.name}`)"
                )
            bytes_per_block = int(parent.layout["bytes_per_block"])
            child = Manifest(
                name=new_name,
                created=time.time(),
                fingerprint=parent.fingerprint,
                model=parent.model,
                layout=parent.layout,
                sequences=list(sequences),
                metadata=parent.metadata if meta is None else meta,
                parent=parent.name,
                bytes={
                    "logical": sum(len(s.pages) for s in sequences) * bytes_per_block,
                    "unique": len(digests) * bytes_per_block,
                    "written": 0,
                },
            )
            self.backend.put_many([(manifest_key(new_name), child.encode())])
        finally:
            self.backend.delete_many([lease])
        return child
