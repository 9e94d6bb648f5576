"""SnapshotStore: save, fork, restore and verify KV state in a content-addressed store.

Keys in the backing block store:

- ``<sha256 hex>.pg``  one page (a block's K and V bytes), named by its digest (in a
  local store, pages live in pack files: :mod:`pagedkv.snapshot.packs`);
- ``snap.m.<name>``    a manifest (JSON, :mod:`pagedkv.snapshot.manifest`);
- ``snap.l.<id>.<n>``  a lease: the pages a save in progress is about to count on;
- ``snap.g.<id>``      a gc in progress (a save waits for it before its final page
  check: :mod:`pagedkv.snapshot.leases`).

A save writes, per chunk of pages, a lease naming them, then the pages the store
lacks, and the manifest last (one atomic put), then drops its leases. A save killed
at any point therefore leaves at most orphan pages and a dead lease; ``gc`` removes
both, and never a page that a manifest or a live lease names.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pagedkv.errors import OutOfBlocks, SnapshotError
from pagedkv.snapshot.leases import (
    GC_PREFIX,
    LEASE_PREFIX,
    live_leases,
    new_lease,
    take_lease,
    wait_for_gc,
    write_lease,
)
from pagedkv.snapshot.manifest import (
    GcReport,
    Manifest,
    SequenceEntry,
    SnapshotInfo,
    VerifyReport,
    describe_layout,
    layout_dict,
    parse_manifest,
    validate_name,
)
from pagedkv.snapshot.pager import CachePager
from pagedkv.snapshot.pipeline import Workers, drop_on_error, progress_bar, sha256_hex, syncfs
from pagedkv.storage.host import host_bytes

PAGE_SUFFIX = ".pg"
MANIFEST_PREFIX = "snap.m."
_PAGE_KEY_RE = re.compile(r"^[0-9a-f]{64}\.pg$")


def page_key(digest: str) -> str:
    return digest + PAGE_SUFFIX


class LoadResult(dict):
    """``{old seq id: new seq id}`` of a restore, plus its throughput.

    ``bytes`` are the distinct page bytes read and verified, ``seconds`` the wall time
    of the whole load, ``shared_blocks`` the blocks found in the pager's prefix cache
    (shared, not written).
    """

    bytes: int = 0
    seconds: float = 0.0
    shared_blocks: int = 0

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class SnapshotStore:
    """Named snapshots of KV state over a block store (a directory, or Redis).

    ``location``: a directory path (created if missing; a
    :class:`~pagedkv.snapshot.packs.PackStore`: each chunk of new pages is written as
    one pack file, manifests as files; never evicted), a ``redis://`` URL (keys
    under ``key_prefix``; configure the server with ``maxmemory-policy noeviction``:
    an evicted page breaks a snapshot, which ``verify`` then reports), or any object
    with the ``BlockStore`` methods.
    ``durable=True`` (local only) also survives power loss: each pack is fsynced
    before it becomes visible, and after the pages and again after the manifest one
    file-system flush (``syncfs``) makes them durable in that order; without it a
    killed process still never leaves a partial pack or manifest visible (atomic
    renames).
    ``grace_seconds``: how long ``gc`` honours a lease written by another host.
    ``chunk_bytes`` bounds the bytes in flight, and ``threads`` the digest workers.
    ``writers`` (local stores only; default ``min(8, os.cpu_count())``): a chunk's
    new pages are split over up to this many packs (of >= 16 MiB) written
    concurrently, while the next chunk is hashed.
    ``file_mode`` (local stores only): permission bits of the files written (e.g.
    ``0o600``; manifests hold token ids); ``None`` honours the umask.
    ``location`` and ``repr`` show a URL's password as ``***``.
    """

    def __init__(
        self,
        location: str | os.PathLike[str] | Any,
        *,
        key_prefix: str = "pagedkv-snap:",
        durable: bool = False,
        grace_seconds: float = 3600.0,
        chunk_bytes: int = 64 << 20,
        threads: int = 2,
        writers: int | None = None,
        file_mode: int | None = None,
    ) -> None:
        self._sync_dir: str | None = None
        if writers is None:
            writers = min(8, os.cpu_count() or 1)
        if isinstance(writers, bool) or not isinstance(writers, int) or writers <= 0:
            raise ValueError(f"writers must be a positive int, got {writers!r}")
        self.writers = writers
        if hasattr(location, "put_many"):
            self.backend = location
            self.location = repr(location)
        else:
            from pagedkv.snapshot.packs import PackStore
            from pagedkv.stores import RedisStore
            from pagedkv.stores.base import redact_url

            loc = os.fspath(location)
            self.location = redact_url(loc)
            if loc.startswith(("redis://", "rediss://")):
                self.backend = RedisStore(loc, key_prefix=key_prefix)
            else:
                path = loc.removeprefix("file://")
                self.backend = PackStore(
                    path, durable=durable, writers=writers, file_mode=file_mode
                )
                self._sync_dir = self.backend.path if durable else None
        if chunk_bytes <= 0 or threads <= 0:
            raise ValueError("chunk_bytes and threads must be positive")
        self.grace_seconds = float(grace_seconds)
        self.chunk_bytes = int(chunk_bytes)
        self.threads = int(threads)

    def __repr__(self) -> str:
        return f"SnapshotStore({self.location!r})"

    def close(self) -> None:
        """Close the backing block store."""
        self.backend.close()

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- save ---------------------------------------------------------------------
    def save(
        self,
        pager: CachePager,
        seq_ids: Iterable[Hashable] | None = None,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
        progress: bool = False,
    ) -> SnapshotInfo:
        """Save sequences ``seq_ids`` (default: all) of ``pager`` as snapshot ``name``.

        Pages go in by the sha256 of their bytes, and pages already in the store are
        not written again. The pager is held :meth:`~CachePager.paused` for the whole
        save so every page belongs to one consistent state. The manifest is written
        last, atomically: if the save dies, no snapshot is listed. ``name`` defaults
        to a generated ``snap-<utc time>-<random>``; an existing name raises
        ``SnapshotError`` unless ``overwrite=True``. ``metadata`` must be JSON-able.
        Sequence ids must be ``int`` or ``str``. Returns the new snapshot's info
        with the save's wall time (``seconds``, ``gbps``) and ``written_bytes``.
        """
        t0 = time.perf_counter()
        name = self._new_name(name, overwrite)
        meta = _json_object(metadata)
        layout = pager.layout
        bpb = layout.bytes_per_block
        lease_id = secrets.token_hex(8)
        leases: list[str] = []
        with pager.paused(), drop_on_error(self.backend, leases):
            entries, units, unit_of = self._plan(pager, seq_ids)
            digests: list[str] = [""] * len(units)
            written = 0
            with ExitStack() as stack:
                work = stack.enter_context(Workers(self.threads, bpb))
                bar = stack.enter_context(progress_bar(progress, f"save {name}", len(units) * bpb))
                seen: set[str] = set()
                pending = None
                step = max(1, self.chunk_bytes // bpb)
                for start in range(0, len(units), step):
                    rows = _read_units(pager, units[start : start + step]).numpy()
                    part = work.digests(rows)
                    digests[start : start + len(part)] = part
                    if pending is not None:
                        written += pending.result()
                    lease = f"{LEASE_PREFIX}{lease_id}.{len(leases):06d}"
                    leases.append(lease)
                    pending = work.background(self._put_pages, lease, name, part, rows, seen)
                    bar(len(part) * bpb)
                if pending is not None:
                    written += pending.result()
            # A gc that started after some of our leases may have deleted pages we
            # counted on: let it finish, then check every page and re-write the lost.
            wait_for_gc(self.backend, self.grace_seconds)
            written += self._repair_missing(pager, name, units, digests, leases, lease_id)
            self._flush()  # pages durable before the manifest that names them
            sequences = [
                SequenceEntry(sid, tokens, [digests[unit_of[u]] for u in us], fill, salt)
                for sid, tokens, us, fill, salt in entries
            ]
            unique = len(set(digests))
            logical = sum(len(s.pages) for s in sequences) * bpb
            manifest = Manifest(
                name=name,
                created=time.time(),
                fingerprint=str(pager.fingerprint),
                model=_model_of(pager),
                layout=layout_dict(layout),
                sequences=sequences,
                metadata=meta,
                bytes={"logical": logical, "unique": unique * bpb, "written": written},
                save={"seconds": time.perf_counter() - t0},
            )
            self.backend.put_many([(MANIFEST_PREFIX + name, manifest.encode())])
            self._flush()
        self.backend.delete_many(leases)
        return replace(SnapshotInfo.from_manifest(manifest), seconds=time.perf_counter() - t0)

    def _flush(self) -> None:
        """Make everything written so far durable (``durable=True`` local stores only)."""
        if self._sync_dir is None:
            return
        fd = os.open(self._sync_dir, os.O_RDONLY)
        try:
            syncfs(fd)
        finally:
            os.close(fd)

    def _new_name(self, name: str | None, overwrite: bool) -> str:
        if name is None:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            return f"snap-{stamp}-{secrets.token_hex(3)}"
        validate_name(name)
        if not overwrite and self.backend.contains_many([MANIFEST_PREFIX + name])[0]:
            raise SnapshotError(
                f"snapshot {name!r} already exists in {self.location}; pass overwrite=True "
                "to replace it, or choose another name"
            )
        return name

    def _plan(self, pager: CachePager, seq_ids: Iterable[Hashable] | None) -> tuple:
        """Sequences to save and the distinct (block, fill) units their pages come from."""
        ids = list(pager.seq_ids()) if seq_ids is None else list(seq_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids has duplicates: {ids}")
        live = set(pager.seq_ids())
        bs = pager.layout.block_size
        entries, units, unit_of = [], [], {}
        for sid in ids:
            if isinstance(sid, bool) or not isinstance(sid, (int, str)):
                raise TypeError(f"snapshots save int or str sequence ids, got {sid!r}")
            if sid not in live:
                raise KeyError(
                    f"sequence {sid!r} is not in the pager (live: {sorted(map(str, live))[:8]})"
                )
            tokens = list(pager.token_ids(sid))
            table = list(pager.block_table(sid))
            n = len(tokens)
            if n == 0 or len(table) != -(-n // bs):
                raise SnapshotError(
                    f"sequence {sid!r}: {n} tokens but {len(table)} blocks of {bs}; "
                    "the pager is inconsistent"
                )
            fill = n - (len(table) - 1) * bs
            us = [(b, bs) for b in table[:-1]] + [(table[-1], fill)]
            for u in us:
                if u not in unit_of:
                    unit_of[u] = len(units)
                    units.append(u)
            entries.append((sid, tokens, us, fill, pager.salt(sid)))
        return entries, units, unit_of

    def _put_pages(
        self, lease: str, name: str, digests: list[str], rows: np.ndarray, seen: set
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

    def _repair_missing(self, pager, name, units, digests, leases, lease_id) -> int:
        """Re-put pages that vanished while saving (a concurrent gc or eviction)."""
        uniq = list(dict.fromkeys(digests))
        have = self.backend.contains_many([page_key(d) for d in uniq])
        lost = {d for d, h in zip(uniq, have) if not h}
        if not lost:
            return 0
        idx = [i for i, d in enumerate(digests) if d in lost]
        idx = list({digests[i]: i for i in idx}.values())
        rows = _read_units(pager, [units[i] for i in idx]).numpy()
        if [sha256_hex(r) for r in rows] != [digests[i] for i in idx]:
            raise SnapshotError("the pager changed during the save although it was paused")
        lease = f"{LEASE_PREFIX}{lease_id}.{len(leases):06d}"
        leases.append(lease)
        write_lease(self.backend, lease, name, list(lost))
        self.backend.put_many([(page_key(digests[i]), memoryview(r)) for i, r in zip(idx, rows)])
        return len(idx) * rows.shape[1]

    # -- load ---------------------------------------------------------------------
    def load(
        self,
        pager: CachePager,
        name: str,
        seq_ids: Mapping[Any, Hashable] | None = None,
        *,
        progress: bool = False,
    ) -> LoadResult:
        """Restore snapshot ``name`` into ``pager``; return ``{old id: new id}``.

        ``seq_ids`` maps the saved ids to restore onto new ids (only those are
        restored); by default every sequence is restored under ``"<name>:<old id>"``.
        The layout and fingerprint are checked and every page is read and verified
        before anything is installed: a mismatch, a missing or corrupt page raises
        ``SnapshotError`` and leaves the pager untouched. Pages whose blocks the
        pager's prefix cache already holds are shared, not written. If the pager runs
        out of blocks midway, the sequences installed so far are freed and
        ``OutOfBlocks`` is raised.
        """
        t0 = time.perf_counter()
        manifest = self.manifest(name)
        _check_compatible(manifest, pager)
        entries, mapping = _select(manifest, pager, seq_ids)
        uniq = list(dict.fromkeys(d for e in entries for d in e.pages))
        bpb = int(manifest.layout["bytes_per_block"])
        pages, missing, corrupt = self._fetch(uniq, bpb, keep=True, progress=progress, what=name)
        row_of = {d: i for i, d in enumerate(uniq)}
        if missing or corrupt:
            raise SnapshotError(
                f"snapshot {name!r} is damaged: {len(missing)} missing and {len(corrupt)} corrupt "
                f"pages (first: {(missing + corrupt)[0]}); nothing was restored. "
                f"`pagedkv snapshot verify {name}` lists them"
            )
        result = LoadResult()
        installed: list[Hashable] = []
        bs = pager.layout.block_size
        try:
            for e in entries:
                new_id = mapping[e.seq_id]
                cached = pager.allocate(new_id, e.token_ids, salt=e.salt)
                installed.append(new_id)
                table = pager.block_table(new_id)
                skip = -(-cached // bs)  # a partly cached block is still shared
                result.shared_blocks += skip
                if skip < len(table):
                    idx = [row_of[d] for d in e.pages[skip:]]
                    if idx == list(range(idx[0], idx[0] + len(idx))):
                        data = pages[idx[0] : idx[0] + len(idx)]  # a view: no copy
                    else:
                        data = pages[torch.tensor(idx)]
                    pager.write_blocks(table[skip:], data)
                result[e.seq_id] = new_id
        except BaseException as exc:
            for sid in reversed(installed):
                pager.free(sid)
            if isinstance(exc, OutOfBlocks):
                raise OutOfBlocks(
                    f"restoring snapshot {name!r} ran out of blocks at sequence "
                    f"{e.seq_id!r} ({exc}); nothing was restored"
                ) from exc
            raise
        result.bytes = len(uniq) * bpb
        result.seconds = time.perf_counter() - t0
        return result

    def _fetch(
        self, digests: Sequence[str], bpb: int, *, keep: bool, progress: bool, what: str
    ) -> tuple[torch.Tensor, list[str], list[str]]:
        """Read and check pages; return (rows, missing, corrupt).

        With ``keep``, ``rows`` is ``uint8 [len(digests), bpb]`` holding page ``i`` in row
        ``i`` once it verified. Pages are read straight into these rows where the
        backend can (``get_into``: no intermediate ``bytes``), the next chunk being read
        while this one is hashed. Without ``keep`` two chunk-sized buffers alternate.
        """
        step = max(1, self.chunk_bytes // bpb)
        chunks = [range(a, min(len(digests), a + step)) for a in range(0, len(digests), step)]
        rows = host_bytes(len(digests) if keep else 2 * min(step, len(digests)), bpb)
        missing: list[str] = []
        corrupt: list[str] = []

        def read(j: int) -> tuple[torch.Tensor, list[int | None]]:
            """Chunk ``j`` into its rows; per page: bytes present (``None``: missing)."""
            part = chunks[j]
            a = part.start if keep else (j % 2) * step
            out = rows[a : a + len(part)]
            return out, self._read_pages([digests[i] for i in part], out, bpb)

        with (
            Workers(self.threads, bpb) as work,
            progress_bar(progress, what, len(digests) * bpb) as bar,
        ):
            ahead = work.background(read, 0) if chunks else None
            for j, part in enumerate(chunks):
                out, sizes = ahead.result()  # read the next chunk while this one is checked
                if j + 1 < len(chunks):
                    ahead = work.background(read, j + 1)
                names = [digests[i] for i in part]
                missing += [d for d, n in zip(names, sizes) if n is None]
                corrupt += [d for d, n in zip(names, sizes) if n is not None and n != bpb]
                good = [k for k, n in enumerate(sizes) if n == bpb]
                arr = out.numpy()
                for k, h in zip(good, work.digests([memoryview(arr[k]) for k in good])):
                    if h != names[k]:
                        corrupt.append(names[k])
                bar(len(part) * bpb)
        return rows, missing, corrupt

    def _read_pages(self, digests: list[str], out: torch.Tensor, bpb: int) -> list[int | None]:
        """Pages into ``out`` rows; per page the bytes found (``None``: missing).

        A page of another size is reported with its size and leaves its row as it was.
        """
        keys = [page_key(d) for d in digests]
        get_into = getattr(self.backend, "get_into", None)
        found = get_into(keys, out) if get_into is not None else [False] * len(keys)
        sizes: list[int | None] = [bpb if f else None for f in found]
        retry = [k for k, f in enumerate(found) if not f]
        if retry:  # no get_into, or a page missing or of another size: plain reads
            arr = out.numpy()
            for k, v in zip(retry, self.backend.get_many([keys[k] for k in retry])):
                if v is not None:
                    sizes[k] = len(v)
                    if len(v) == bpb:
                        arr[k] = np.frombuffer(v, dtype=np.uint8)
        return sizes

    # -- catalogue ----------------------------------------------------------------
    def manifest(self, name: str) -> Manifest:
        """The parsed manifest of ``name``; ``SnapshotError`` if missing or invalid."""
        validate_name(name)
        raw = self.backend.get_many([MANIFEST_PREFIX + name])[0]
        if raw is None:
            known = ", ".join(self.names()[:10]) or "none"
            raise SnapshotError(f"no snapshot named {name!r} in {self.location} (have: {known})")
        manifest = parse_manifest(raw, what=f"manifest of snapshot {name!r}")
        if manifest.name != name:
            raise SnapshotError(
                f"the manifest stored as {name!r} names itself {manifest.name!r}; it was "
                f"copied or renamed by hand (use fork() to give a snapshot a second name)"
            )
        return manifest

    def info(self, name: str) -> SnapshotInfo:
        """What snapshot ``name`` holds (``SnapshotError`` if missing or invalid)."""
        return SnapshotInfo.from_manifest(self.manifest(name))

    def names(self) -> list[str]:
        """Names of every manifest in the store, valid or not, sorted."""
        return sorted(k[len(MANIFEST_PREFIX) :] for k in self.backend.keys(MANIFEST_PREFIX))

    def list(self) -> list[SnapshotInfo]:
        """Info of every readable snapshot, oldest first (unreadable ones: see ``verify``)."""
        names = self.names()
        raws = self.backend.get_many([MANIFEST_PREFIX + n for n in names]) if names else []
        out = []
        for raw in raws:
            try:
                out.append(SnapshotInfo.from_manifest(parse_manifest(raw or b"")))
            except SnapshotError:
                continue
        return sorted(out, key=lambda i: (i.created, i.name))

    def verify(self, name: str, *, progress: bool = False) -> VerifyReport:
        """Read back every page of ``name``; check lengths and digests (damage never raises)."""
        t0 = time.perf_counter()
        try:
            manifest = self.manifest(name)
        except SnapshotError as e:
            return VerifyReport(name, ok=False, error=str(e), seconds=time.perf_counter() - t0)
        bpb = int(manifest.layout["bytes_per_block"])
        uniq = sorted(manifest.page_digests())
        _, missing, corrupt = self._fetch(uniq, bpb, keep=False, progress=progress, what=name)
        return VerifyReport(
            name,
            ok=not missing and not corrupt,
            num_pages=len(uniq),
            missing=missing,
            corrupt=corrupt,
            bytes_checked=(len(uniq) - len(missing)) * bpb,
            seconds=time.perf_counter() - t0,
        )

    def fork(
        self,
        name: str,
        new_name: str,
        metadata: Mapping[str, Any] | None = None,
        *,
        seq_ids: Iterable[Any] | None = None,
        overwrite: bool = False,
    ) -> SnapshotInfo:
        """A new snapshot ``new_name`` sharing every page of ``name`` (writes one manifest).

        ``metadata`` replaces the parent's when given; ``seq_ids`` keeps only those
        sequences. ``SnapshotError`` if a page of the parent is gone.
        """
        parent = self.manifest(name)
        self._new_name(new_name, overwrite)
        sequences = parent.sequences
        if seq_ids is not None:
            wanted = list(seq_ids)
            by_id = {s.seq_id: s for s in sequences}
            unknown = [s for s in wanted if s not in by_id]
            if unknown:
                raise KeyError(f"snapshot {name!r} has no sequences {unknown}")
            sequences = [by_id[s] for s in wanted]
        digests = sorted({d for s in sequences for d in s.pages})
        lease = f"{LEASE_PREFIX}{secrets.token_hex(8)}.000000"
        take_lease(self.backend, lease, new_name, digests, self.grace_seconds)
        try:
            have = self.backend.contains_many([page_key(d) for d in digests])
            if not all(have):
                raise SnapshotError(
                    f"cannot fork {name!r}: {have.count(False)} of its pages are missing "
                    f"(run `verify {name}`)"
                )
            bpb = int(parent.layout["bytes_per_block"])
            child = Manifest(
                name=new_name,
                created=time.time(),
                fingerprint=parent.fingerprint,
                model=parent.model,
                layout=parent.layout,
                sequences=list(sequences),
                metadata=parent.metadata if metadata is None else _json_object(metadata),
                parent=name,
                bytes={
                    "logical": sum(len(s.pages) for s in sequences) * bpb,
                    "unique": len(digests) * bpb,
                    "written": 0,
                },
            )
            self.backend.put_many([(MANIFEST_PREFIX + new_name, child.encode())])
        finally:
            self.backend.delete_many([lease])
        return SnapshotInfo.from_manifest(child)

    def delete(self, name: str) -> None:
        """Remove snapshot ``name`` (its manifest); ``gc`` reclaims pages no one else uses."""
        validate_name(name)
        if not self.backend.delete_many([MANIFEST_PREFIX + name]):
            raise SnapshotError(f"no snapshot named {name!r} in {self.location}")

    # -- gc -----------------------------------------------------------------------
    def gc(self, *, grace_seconds: float | None = None) -> GcReport:
        """Delete pages no manifest references, and dead leases.

        A page named by a live lease (a save or fork in progress) is kept: a lease is
        live while its process runs (same host) or for ``grace_seconds`` (default:
        the store's) after it was written by another host. A gc announces itself with
        a marker while it runs; a save waits for it to end before its final check
        that every page it counts on is stored, a fork before its check (see
        :mod:`pagedkv.snapshot.leases`). Raises ``SnapshotError`` without
        deleting anything if a manifest is unreadable (its pages would be lost):
        delete or repair it first.
        """
        t0 = time.perf_counter()
        grace = self.grace_seconds if grace_seconds is None else grace_seconds
        marker = f"{GC_PREFIX}{secrets.token_hex(8)}"
        self.backend.put_many([(marker, new_lease(marker, "gc", []).encode())])
        try:
            return self._collect(grace, t0)
        finally:
            self.backend.delete_many([marker])

    def _collect(self, grace: float, t0: float) -> GcReport:
        # The marker first (saves that lease pages from now on wait for this gc to
        # end), then the leases, then the manifests: a save that finishes in between
        # wrote its manifest before dropping its lease, so its pages are seen as
        # leased or as referenced.
        live, dead = live_leases(self.backend, LEASE_PREFIX, grace)
        protected = {d for lease in live for d in lease.pages}
        dead += live_leases(self.backend, GC_PREFIX, grace)[1]  # markers of gcs that died
        names = self.names()
        raws = self.backend.get_many([MANIFEST_PREFIX + n for n in names]) if names else []
        referenced: set[str] = set()
        for n, raw in zip(names, raws):
            if raw is None:
                continue  # deleted meanwhile
            try:
                referenced |= parse_manifest(raw, what=f"manifest {n!r}").page_digests()
            except SnapshotError as e:
                raise SnapshotError(f"gc refused: {e}; delete snapshot {n!r} first") from None
        pages = {k[: -len(PAGE_SUFFIX)] for k in self.backend.keys("") if _PAGE_KEY_RE.match(k)}
        orphans = pages - referenced
        doomed = sorted(orphans - protected)
        before = self.backend.stats().bytes_used
        deleted = 0
        if doomed:
            # One batch: a pack store rewrites each pack once. Saves that lease pages
            # from now on check them again after this gc ends (the marker); a second
            # look at the leases costs little and spares them most re-writes.
            now_live = live_leases(self.backend, LEASE_PREFIX, grace)[0]
            again = {d for lease in now_live for d in lease.pages}
            deleted = self.backend.delete_many([page_key(d) for d in doomed if d not in again])
        removed = self.backend.delete_many(dead) if dead else 0
        after = self.backend.stats().bytes_used
        return GcReport(
            pages_deleted=deleted,
            bytes_freed=None if before is None or after is None else before - after,
            pages_kept=len(pages) - deleted,
            pages_protected=len(orphans & protected),
            leases_removed=removed,
            seconds=time.perf_counter() - t0,
        )


def _read_units(pager: CachePager, units: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Bytes of (block, fill) units, ``uint8 [n, bytes_per_block]``; slots past fill zeroed."""
    rows = pager.read_blocks([b for b, _ in units])
    if not rows.is_contiguous() or rows.device.type != "cpu":
        rows = rows.to("cpu").contiguous()
    lay = pager.layout
    arr = rows.numpy()
    for i, (_, fill) in enumerate(units):
        if fill < lay.block_size:
            # row bytes are ordered (layer, k/v, token, head, dim): zero tokens >= fill
            arr[i].reshape(lay.num_layers * 2, lay.block_size, -1)[:, fill:, :] = 0
    return rows


def _check_compatible(m: Manifest, pager: CachePager) -> None:
    mine = layout_dict(pager.layout)
    if m.layout != mine:
        raise SnapshotError(
            f"snapshot {m.name!r} was saved with layout [{describe_layout(m.layout)}] but the "
            f"cache has layout [{describe_layout(mine)}]; restore it into a cache built with "
            "the snapshot's layout"
        )
    if m.fingerprint != str(pager.fingerprint):
        theirs, ours = _model_of(pager), m.model
        raise SnapshotError(
            f"snapshot {m.name!r} was saved from model fingerprint {m.fingerprint!r}"
            + (f" (model {ours!r})" if ours else "")
            + f" but the cache has fingerprint {pager.fingerprint!r}"
            + (f" (model {theirs!r})" if theirs else "")
            + "; KV is only valid for the model and layout that computed it"
        )


def _model_of(pager: CachePager) -> str | None:
    """The human-readable model id, where the pager has one (``KVCache.model_fingerprint``)."""
    model = getattr(pager, "model_fingerprint", None)
    return str(model) if model else None


def _select(
    m: Manifest, pager: CachePager, seq_ids: Mapping[Any, Hashable] | None
) -> tuple[list[SequenceEntry], dict[Any, Hashable]]:
    live = set(pager.seq_ids())
    if seq_ids is None:
        mapping: dict[Any, Hashable] = {}
        for s in m.sequences:
            new, k = f"{m.name}:{s.seq_id}", 2
            while new in live or new in mapping.values():
                new, k = f"{m.name}:{s.seq_id}#{k}", k + 1
            mapping[s.seq_id] = new
    else:
        mapping = dict(seq_ids)
        by_id = {s.seq_id for s in m.sequences}
        unknown = [k for k in mapping if k not in by_id]
        if unknown:
            raise KeyError(
                f"snapshot {m.name!r} has no sequences {unknown} (it has {sorted(by_id, key=str)})"
            )
        taken = [v for v in mapping.values() if v in live]
        if taken or len(set(mapping.values())) != len(mapping):
            raise ValueError(f"new sequence ids must be distinct and unused; taken: {taken}")
    return [s for s in m.sequences if s.seq_id in mapping], mapping


def _json_object(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    meta = dict(metadata or {})
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"metadata must be JSON-serialisable (str keys, plain values): {e}"
        ) from None
    return json.loads(json.dumps(meta))
