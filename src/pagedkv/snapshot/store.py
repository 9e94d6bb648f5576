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

Every document read back is bounded and validated (:mod:`pagedkv.snapshot.jsondoc`,
:mod:`pagedkv.snapshot.schema`): a damaged one is a ``SnapshotError`` where one
snapshot is asked for, and a reported entry where the whole store is scanned
(:mod:`pagedkv.snapshot.catalogue`). Reading never creates or changes anything.

Logging: logger ``pagedkv.snapshot``; INFO for each save, load, fork, delete, verify
and gc (names, counts, bytes, seconds), WARNING for damaged entries. Never metadata,
never a URL's password, never per page.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Hashable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

import numpy as np

from pagedkv.errors import SnapshotError, StoreError, StoreUnavailable
from pagedkv.snapshot.args import (
    check_flag,
    check_metadata,
    check_pager,
    id_mapping,
    positive_int,
    seconds,
    seq_id_list,
)
from pagedkv.snapshot.catalogue import (
    MANIFEST_PREFIX,
    collect,
    manifest_names,
    parse_stored,
    scan_manifests,
)
from pagedkv.snapshot.leases import LEASE_PREFIX, take_lease, wait_for_gc, write_lease
from pagedkv.snapshot.manifest import (
    Manifest,
    SequenceEntry,
    layout_dict,
    validate_name,
)
from pagedkv.snapshot.pager import CachePager
from pagedkv.snapshot.pipeline import (
    PAGE_SUFFIX,
    Workers,
    drop_on_error,
    fetch_pages,
    page_key,
    progress_bar,
    read_each,
    sha256_hex,
    syncfs,
)
from pagedkv.snapshot.plan import (
    check_compatible,
    install,
    model_of,
    plan_save,
    read_units,
    select,
)
from pagedkv.snapshot.reports import Catalogue, GcReport, SnapshotInfo, VerifyReport
from pagedkv.storage import convert_rows
from pagedkv.stores import Location, known_schemes, parse_location

log = logging.getLogger("pagedkv.snapshot")

__all__ = ["MANIFEST_PREFIX", "PAGE_SUFFIX", "LoadResult", "SnapshotStore", "page_key"]


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


def _open_directory(
    loc: Location, key_prefix: str, durable: bool, writers: int, file_mode: int | None
) -> Any:
    from pagedkv.snapshot.packs import PackStore

    return PackStore(loc.target, durable=durable, writers=writers, file_mode=file_mode)


def _open_redis(
    loc: Location, key_prefix: str, durable: bool, writers: int, file_mode: int | None
) -> Any:
    from pagedkv.stores import RedisStore

    if file_mode is not None:
        raise ValueError("file_mode= applies to a directory store, not to Redis")
    if durable:
        raise ValueError(
            "durable=True applies to a directory store; Redis persistence is the server's"
        )
    return RedisStore(loc.target, key_prefix=key_prefix)


# Location kind (pagedkv.stores.STORE_SCHEMES) -> backend of a snapshot store.
_BACKENDS = {"path": _open_directory, "redis": _open_redis}


class SnapshotStore:
    """Named snapshots of KV state over a block store (a directory, or Redis).

    ``location``: a directory path (or ``file:///path``; a
    :class:`~pagedkv.snapshot.packs.PackStore`: each chunk of new pages is written as
    one pack file, manifests as files; never evicted), a ``redis://``/``rediss://`` URL
    (keys under ``key_prefix``; configure the server with ``maxmemory-policy
    noeviction``: an evicted page breaks a snapshot, which ``verify`` then reports), or
    any object with the ``BlockStore`` methods. Any other ``scheme://`` raises
    ``ValueError``. Opening a directory creates nothing: it is created by the first
    write (save, fork), and a missing or read-only one can be listed, verified and
    loaded from (``exists`` tells whether it is there).
    ``durable=True`` (directories only) also survives power loss: each pack is fsynced
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
        self.writers = positive_int(
            "writers", min(8, os.cpu_count() or 1) if writers is None else writers
        )
        self.chunk_bytes = positive_int("chunk_bytes", chunk_bytes)
        self.threads = positive_int("threads", threads)
        self.grace_seconds = seconds("grace_seconds", grace_seconds)
        check_flag("durable", durable)
        if not isinstance(key_prefix, str):
            raise TypeError(f"key_prefix must be a str, got {type(key_prefix).__name__}")
        self._sync_dir: str | None = None
        if hasattr(location, "put_many"):
            if durable:
                raise ValueError("durable=True applies to a directory location, not a store object")
            self.backend = location
            self.location = _describe(location)
            return
        loc = parse_location(location)
        opener = _BACKENDS.get(loc.kind)
        if opener is None:
            raise ValueError(
                f"{loc.scheme}:// is not a snapshot store location; use a directory path or "
                f"redis:// / rediss:// (known schemes: {known_schemes()}), or pass a block "
                "store object (e.g. MemoryStore(...))"
            )
        self.backend = opener(loc, key_prefix, durable, self.writers, file_mode)
        self.location = getattr(self.backend, "path", None) or loc.shown  # never a password
        if durable:
            self._sync_dir = self.backend.path

    def __repr__(self) -> str:
        return f"SnapshotStore({self.location!r})"

    @property
    def exists(self) -> bool:
        """Whether the store is there: ``False`` for a directory not created yet (Redis
        and store objects: always ``True``)."""
        return bool(getattr(self.backend, "exists", True))

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
        ``SnapshotError`` unless ``overwrite=True``.

        ``seq_ids``: a list (any iterable but a ``str``/``bytes``, which raise
        ``TypeError``) of ``int`` (64-bit) or ``str`` ids. ``metadata``: a mapping of
        ``str`` keys to plain JSON values (finite numbers, at most 31 levels deep, at
        most 16 MiB as JSON). Every argument is checked before anything is written.
        Returns the new snapshot's info with the save's wall time (``seconds``,
        ``gbps``) and ``written_bytes``.
        """
        t0 = time.perf_counter()
        check_pager(pager)
        ids = seq_id_list(seq_ids, "save")
        meta = check_metadata(metadata)
        check_flag("overwrite", overwrite)
        check_flag("progress", progress)
        name = self._new_name(name, overwrite)
        layout = pager.layout
        bpb = layout.bytes_per_block
        lease_id = secrets.token_hex(8)
        leases: list[str] = []
        with pager.paused(), drop_on_error(self.backend, leases):
            entries, units, unit_of = plan_save(pager, ids, len(json.dumps(meta)))
            digests: list[str] = [""] * len(units)
            written = 0
            with ExitStack() as stack:
                work = stack.enter_context(Workers(self.threads, bpb))
                bar = stack.enter_context(progress_bar(progress, f"save {name}", len(units) * bpb))
                seen: set[str] = set()
                pending = None
                step = max(1, self.chunk_bytes // bpb)
                for start in range(0, len(units), step):
                    rows = read_units(pager, units[start : start + step]).numpy()
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
                model=model_of(pager),
                layout=layout_dict(layout),
                sequences=sequences,
                metadata=meta,
                bytes={"logical": logical, "unique": unique * bpb, "written": written},
                save={"seconds": time.perf_counter() - t0},
            )
            self.backend.put_many([(MANIFEST_PREFIX + name, manifest.encode())])
            self._flush()
        self.backend.delete_many(leases)
        info = replace(SnapshotInfo.from_manifest(manifest), seconds=time.perf_counter() - t0)
        log.info(
            "saved snapshot %r to %s: %d sequences, %d tokens, %d pages (%d unique), "
            "%d bytes written of %d, %.3f s",
            *(name, self.location, info.num_sequences, info.num_tokens, info.num_pages),
            *(info.unique_pages, written, info.logical_bytes),
            info.seconds,
        )
        return info

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
        rows = read_units(pager, [units[i] for i in idx]).numpy()
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
        restored; a list or a ``str`` raises ``TypeError``); by default every sequence
        is restored under ``"<name>:<old id>"``. A compressed (fp8 / int8) snapshot
        loads bit-exactly into a cache of its format, or dequantized into an unquantized
        cache of the same model (the pager needs ``fingerprint_for``, as KVCache has);
        any other format pair is refused. The layout and fingerprint are
        checked and every page is read and verified before anything is installed: a
        mismatch, a damaged manifest, a missing or corrupt page raises
        ``SnapshotError`` and leaves the pager untouched. Pages whose blocks the
        pager's prefix cache already holds are shared, not written. If the pager runs
        out of blocks midway, the sequences installed so far are freed and
        ``OutOfBlocks`` is raised.
        """
        t0 = time.perf_counter()
        check_pager(pager)
        validate_name(name)
        wanted = id_mapping(seq_ids)
        check_flag("progress", progress)
        manifest = self.manifest(name)
        source = check_compatible(manifest, pager)
        entries, mapping = select(manifest, pager, wanted)
        uniq = list(dict.fromkeys(d for e in entries for d in e.pages))
        bpb = int(manifest.layout["bytes_per_block"])
        pages, missing, corrupt = fetch_pages(
            self.backend,
            uniq,
            bpb,
            chunk_bytes=self.chunk_bytes,
            threads=self.threads,
            keep=True,
            progress=progress,
            what=name,
        )
        if missing or corrupt:
            raise SnapshotError(
                f"snapshot {name!r} is damaged: {len(missing)} missing and {len(corrupt)} corrupt "
                f"pages (first: {(missing + corrupt)[0]}); nothing was restored. "
                f"`pagedkv snapshot verify {name}` lists them"
            )
        if source is not None:  # a compressed snapshot into an unquantized cache
            pages = convert_rows(pages, source, pager.layout)
        result = LoadResult()
        result.shared_blocks = install(pager, name, entries, mapping, pages, uniq)
        result.update((e.seq_id, mapping[e.seq_id]) for e in entries)
        result.bytes = len(uniq) * bpb
        result.seconds = time.perf_counter() - t0
        log.info(
            "loaded snapshot %r from %s: %d sequences, %d bytes read, %d blocks shared, %.3f s",
            *(name, self.location, len(result), result.bytes, result.shared_blocks),
            result.seconds,
        )
        return result

    # -- catalogue ----------------------------------------------------------------
    def manifest(self, name: str) -> Manifest:
        """The parsed manifest of ``name``; ``SnapshotError`` if missing or damaged."""
        validate_name(name)
        raw = read_each(self.backend, [MANIFEST_PREFIX + name])[0]
        if raw is None:
            known = ", ".join(self.names()[:10]) or "none"
            where = self.location if self.exists else f"{self.location} (no store there yet)"
            raise SnapshotError(f"no snapshot named {name!r} in {where} (have: {known})")
        return parse_stored(name, raw)

    def info(self, name: str) -> SnapshotInfo:
        """What snapshot ``name`` holds (``SnapshotError`` if missing or damaged)."""
        return SnapshotInfo.from_manifest(self.manifest(name))

    def names(self) -> list[str]:
        """Names of every manifest in the store, readable or not, sorted."""
        return manifest_names(self.backend)

    def catalogue(self) -> Catalogue:
        """Every manifest read once: the readable snapshots (oldest first), the damaged
        ones with why (``damaged``), and the distinct pages the readable ones need.

        Never raises on a damaged entry (an unreachable store still raises).
        """
        scan = scan_manifests(self.backend)
        sizes = {d: m.layout["bytes_per_block"] for m in scan.manifests for d in m.page_digests()}
        infos = sorted(map(SnapshotInfo.from_manifest, scan.manifests), key=_by_age)
        return Catalogue(infos, scan.damaged, len(sizes), sum(sizes.values()))

    def list(self) -> list[SnapshotInfo]:
        """Info of every readable snapshot, oldest first.

        Damaged manifests are left out (each logged as a warning);
        :meth:`catalogue` reports them, ``gc`` will not collect while there are any.
        """
        cat = self.catalogue()
        for d in cat.damaged:
            log.warning("snapshot %r in %s is unreadable: %s", d.name, self.location, d.error)
        return cat.snapshots

    def verify(self, name: str, *, progress: bool = False) -> VerifyReport:
        """Read back every page of ``name``; check lengths and digests.

        Damage never raises: a missing or damaged manifest, missing or corrupt pages
        and unreadable entries are reported (``ok=False``). Only a bad argument
        (``TypeError``/``ValueError``) or an unreachable store raises.
        """
        t0 = time.perf_counter()
        validate_name(name)
        check_flag("progress", progress)
        try:
            manifest = self.manifest(name)
            bpb = int(manifest.layout["bytes_per_block"])
            uniq = sorted(manifest.page_digests())
            present = self.backend.contains_many([page_key(d) for d in uniq]) if uniq else []
            absent = [d for d, p in zip(uniq, present) if not p]
            _, missing, corrupt = fetch_pages(
                self.backend,
                [d for d, p in zip(uniq, present) if p],
                bpb,
                chunk_bytes=self.chunk_bytes,
                threads=self.threads,
                keep=False,
                progress=progress,
                what=name,
            )
        except StoreUnavailable:
            raise
        except (SnapshotError, StoreError) as e:
            log.warning("snapshot %r in %s failed verification: %s", name, self.location, e)
            return VerifyReport(name, ok=False, error=str(e), seconds=time.perf_counter() - t0)
        missing = sorted(absent + missing)
        report = VerifyReport(
            name,
            ok=not missing and not corrupt,
            num_pages=len(uniq),
            missing=missing,
            corrupt=corrupt,
            bytes_checked=(len(uniq) - len(missing)) * bpb,
            seconds=time.perf_counter() - t0,
        )
        if report.ok:
            log.info(
                "verified snapshot %r: %d pages, %d bytes, %.3f s",
                *(name, report.num_pages, report.bytes_checked, report.seconds),
            )
        else:
            log.warning(
                "snapshot %r in %s failed verification: %d missing, %d corrupt of %d pages",
                *(name, self.location, len(missing), len(corrupt), len(uniq)),
            )
        return report

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

        ``metadata`` replaces the parent's when given; ``seq_ids`` (a list, as for
        :meth:`save`) keeps only those sequences. ``SnapshotError`` if the parent is
        missing or damaged, or a page of it is gone.
        """
        validate_name(name)
        validate_name(new_name)
        wanted = seq_id_list(seq_ids, "fork")
        meta = None if metadata is None else check_metadata(metadata)
        check_flag("overwrite", overwrite)
        parent = self.manifest(name)
        self._new_name(new_name, overwrite)
        sequences = parent.sequences
        if wanted is not None:
            by_id = {s.seq_id: s for s in sequences}
            unknown = [s for s in wanted if s not in by_id]
            if unknown:
                raise KeyError(f"snapshot {name!r} has no sequences {unknown[:8]}")
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
                metadata=parent.metadata if meta is None else meta,
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
        info = SnapshotInfo.from_manifest(child)
        log.info(
            "forked snapshot %r as %r in %s: %d sequences, %d bytes shared",
            *(name, new_name, self.location, info.num_sequences, info.unique_bytes),
        )
        return info

    def delete(self, name: str) -> None:
        """Remove snapshot ``name`` (its manifest, damaged or not); ``gc`` reclaims pages
        no one else uses."""
        validate_name(name)
        if not self.backend.delete_many([MANIFEST_PREFIX + name]):
            raise SnapshotError(f"no snapshot named {name!r} in {self.location}")
        log.info("deleted snapshot %r from %s", name, self.location)

    # -- gc -----------------------------------------------------------------------
    def gc(self, *, grace_seconds: float | None = None, drop_damaged: bool = False) -> GcReport:
        """Delete pages no manifest references, and dead or damaged leases.

        A page named by a live lease (a save or fork in progress) is kept: a lease is
        live while its process runs (same host) or for ``grace_seconds`` (default:
        the store's) after it was written by another host. A gc announces itself with
        a marker while it runs; a save waits for it to end before its final check
        that every page it counts on is stored, a fork before its check (see
        :mod:`pagedkv.snapshot.leases`).

        Damaged manifests never make it raise. As a damaged manifest cannot tell which
        pages it needs, a gc that finds one deletes no page (``report.blocked``,
        ``report.damaged`` names them): delete or repair them, or pass
        ``drop_damaged=True`` to delete them first (not those of a newer pagedkv
        version) and then collect. A store that does not exist yet is left so.
        """
        grace = (
            self.grace_seconds if grace_seconds is None else seconds("grace_seconds", grace_seconds)
        )
        check_flag("drop_damaged", drop_damaged)
        if not self.exists:
            return GcReport(0, 0, 0, 0, 0, 0.0)
        return collect(self.backend, grace, drop_damaged=drop_damaged, where=self.location)


def _describe(backend: object) -> str:
    """How a store object passed in is shown: its class and path or server, never a URL
    with its password (``RedisStore.url`` is the redacted form)."""
    shown = getattr(backend, "url", None) or getattr(backend, "path", None)
    return f"{type(backend).__name__}({shown})" if shown else type(backend).__name__


def _by_age(info: SnapshotInfo) -> tuple[float, str]:
    return info.created, info.name
