"""SnapshotStore: save, fork, restore and verify KV state in a content-addressed store.

The facade users hold. Each operation checks its arguments (:mod:`.args`), then runs
its protocol: saving and forking in :mod:`.save`, restoring and verifying in
:mod:`.restore`, collecting in :mod:`.gc`; manifests are read back by
:mod:`.catalogue`, and the keys they all use are :mod:`.keys`. A location opens its
backend in :mod:`.backends`.

Every document read back is bounded and validated (:mod:`.jsondoc`, :mod:`.schema`):
a damaged one is a ``SnapshotError`` where one snapshot is asked for, and a reported
entry where the whole store is scanned. Reading never creates or changes anything.

Logging: logger ``pagedkv.snapshot``; INFO for each save, load, fork, delete, verify
and gc (names, counts, bytes, seconds), WARNING for damaged entries. Never metadata,
never a URL's password, never per page.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from pagedkv._closing import Closing
from pagedkv.errors import SnapshotError, StoreError, StoreUnavailable
from pagedkv.snapshot import restore
from pagedkv.snapshot.args import (
    check_flag,
    check_metadata,
    check_pager,
    id_mapping,
    positive_int,
    seconds,
    seq_id_list,
)
from pagedkv.snapshot.backends import open_backend
from pagedkv.snapshot.catalogue import catalogue_of, manifest_names, read_manifest, scan_manifests
from pagedkv.snapshot.gc import collect
from pagedkv.snapshot.keys import MANIFEST_PREFIX, PAGE_SUFFIX, manifest_key, page_key
from pagedkv.snapshot.manifest import Manifest, validate_name
from pagedkv.snapshot.pager import CachePager
from pagedkv.snapshot.reports import (
    Catalogue,
    GcReport,
    LoadResult,
    SnapshotInfo,
    SnapshotStoreStats,
    VerifyReport,
)
from pagedkv.snapshot.save import Saver
from pagedkv.storage import convert_rows
from pagedkv.stores.base import BlockStore

log = logging.getLogger("pagedkv.snapshot")

__all__ = ["MANIFEST_PREFIX", "PAGE_SUFFIX", "LoadResult", "SnapshotStore", "page_key"]


class SnapshotStore(Closing):
    """Named snapshots of KV state over a block store (a directory, or Redis).

    ``location``: a directory path (or ``file:///path``; a
    :class:`~pagedkv.stores.PackStore`: each chunk of new pages is written as one pack
    file, manifests as files; never evicted), a ``redis://``/``rediss://`` URL (keys
    under ``key_prefix``; configure the server with ``maxmemory-policy noeviction``: an
    evicted page breaks a snapshot, which ``verify`` then reports), or any
    :class:`~pagedkv.stores.BlockStore` object. Any other ``scheme://`` raises
    ``ValueError``. Opening a directory creates nothing: it is created by the first
    write (save, fork), and a missing or read-only one can be listed, verified and
    loaded from (``exists`` tells whether it is there).
    ``durable=True`` (directories only) also survives power loss: each pack is fsynced
    before it becomes visible, and after the pages and again after the manifest one
    file-system flush (``syncfs``) makes them durable in that order; without it a
    killed process still never leaves a partial pack or manifest visible (atomic
    renames). ``grace_seconds``: how long ``gc`` honours a lease written by another
    host. ``chunk_bytes`` bounds the bytes in flight, and ``threads`` the digest
    workers. ``writers`` (local stores only; default ``min(8, os.cpu_count())``): a
    chunk's new pages are split over up to this many packs (of >= 16 MiB) written
    concurrently, while the next chunk is hashed. ``file_mode`` (local stores only):
    permission bits of the files written (e.g. ``0o600``; manifests hold token ids);
    ``None`` honours the umask. ``location`` and ``repr`` show a URL's password as ``***``.
    """

    def __init__(
        self,
        location: str | os.PathLike[str] | BlockStore,
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
        self.backend, self.location, sync = open_backend(
            location, key_prefix=key_prefix, durable=durable, writers=self.writers,
            file_mode=file_mode,
        )  # fmt: skip
        self._saver = Saver(
            self.backend, chunk_bytes=self.chunk_bytes, threads=self.threads,
            grace_seconds=self.grace_seconds, flush=sync,
        )  # fmt: skip
        # replaced whole on each update: a scrape from another thread reads one state
        self._stats = SnapshotStoreStats()

    def stats(self) -> SnapshotStoreStats:
        """Saves, loads and their bytes since this object was opened (what
        :mod:`pagedkv.metrics` exports for a registered store)."""
        return self._stats

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

    # -- save, fork ---------------------------------------------------------------
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
        manifest = self._saver.save(pager, ids, name, meta, progress=progress, started=t0)
        info = replace(SnapshotInfo.from_manifest(manifest), seconds=time.perf_counter() - t0)
        s = self._stats
        self._stats = replace(
            s, saves=s.saves + 1, written_bytes=s.written_bytes + info.written_bytes,
            save_seconds=s.save_seconds + info.seconds,
        )  # fmt: skip
        log.info(
            "saved snapshot %r to %s: %d sequences, %d tokens, %d pages (%d unique), "
            "%d bytes written of %d, %.3f s",
            *(name, self.location, info.num_sequences, info.num_tokens, info.num_pages),
            *(info.unique_pages, info.written_bytes, info.logical_bytes),
            info.seconds,
        )
        return info

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
        info = SnapshotInfo.from_manifest(self._saver.fork(parent, new_name, wanted, meta))
        log.info(
            "forked snapshot %r as %r in %s: %d sequences, %d bytes shared",
            *(name, new_name, self.location, info.num_sequences, info.unique_bytes),
        )
        return info

    def _new_name(self, name: str | None, overwrite: bool) -> str:
        if name is None:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            return f"snap-{stamp}-{secrets.token_hex(3)}"
        validate_name(name)
        if not overwrite and self.backend.contains_many([manifest_key(name)])[0]:
            raise SnapshotError(
                f"snapshot {name!r} already exists in {self.location}; pass overwrite=True "
                "to replace it, or choose another name"
            )
        return name

    # -- load, verify -------------------------------------------------------------
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
        out of blocks (or a write fails) midway, the sequences installed so far are
        discarded, leaving the pager's blocks and prefix cache as they were, and
        ``OutOfBlocks`` (or the write's error) is raised.
        """
        t0 = time.perf_counter()
        check_pager(pager)
        validate_name(name)
        wanted = id_mapping(seq_ids)
        check_flag("progress", progress)
        manifest = self.manifest(name)
        source = restore.check_compatible(manifest, pager)
        entries, mapping = restore.select(manifest, pager, wanted)
        uniq = list(dict.fromkeys(d for e in entries for d in e.pages))
        reader = self._reader(manifest, progress)
        pages, missing, corrupt = reader.fetch(uniq, keep=True)
        if missing or corrupt:
            raise SnapshotError(
                f"snapshot {name!r} is damaged: {len(missing)} missing and {len(corrupt)} corrupt "
                f"pages (first: {(missing + corrupt)[0]}); nothing was restored. "
                f"`pagedkv snapshot verify {name}` lists them"
            )
        if source is not None:  # a compressed snapshot into an unquantized cache
            pages = convert_rows(pages, source, pager.layout)
        result = LoadResult()
        result.shared_blocks = restore.install(pager, name, entries, mapping, pages, uniq)
        result.update((e.seq_id, mapping[e.seq_id]) for e in entries)
        result.bytes = len(uniq) * reader.bytes_per_block
        result.seconds = time.perf_counter() - t0
        s = self._stats
        self._stats = replace(
            s, loads=s.loads + 1, read_bytes=s.read_bytes + result.bytes,
            load_seconds=s.load_seconds + result.seconds,
        )  # fmt: skip
        log.info(
            "loaded snapshot %r from %s: %d sequences, %d bytes read, %d blocks shared, %.3f s",
            *(name, self.location, len(result), result.bytes, result.shared_blocks),
            result.seconds,
        )
        return result

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
            checked = self._reader(manifest, progress).check(sorted(manifest.page_digests()))
        except StoreUnavailable:
            raise
        except (SnapshotError, StoreError) as e:
            log.warning("snapshot %r in %s failed verification: %s", name, self.location, e)
            return VerifyReport(name, ok=False, error=str(e), seconds=time.perf_counter() - t0)
        missing, corrupt = checked.missing, checked.corrupt
        report = VerifyReport(
            name, ok=not missing and not corrupt, num_pages=checked.pages, missing=missing,
            corrupt=corrupt, bytes_checked=checked.bytes_checked, seconds=time.perf_counter() - t0,
        )  # fmt: skip
        if report.ok:
            log.info(
                "verified snapshot %r: %d pages, %d bytes, %.3f s",
                *(name, report.num_pages, report.bytes_checked, report.seconds),
            )
        else:
            log.warning(
                "snapshot %r in %s failed verification: %d missing, %d corrupt of %d pages",
                *(name, self.location, len(missing), len(corrupt), checked.pages),
            )
        return report

    def _reader(self, manifest: Manifest, progress: bool) -> restore.PageReader:
        return restore.PageReader(
            self.backend, int(manifest.layout["bytes_per_block"]), chunk_bytes=self.chunk_bytes,
            threads=self.threads, progress=progress, what=manifest.name,
        )  # fmt: skip

    # -- catalogue ----------------------------------------------------------------
    def manifest(self, name: str) -> Manifest:
        """The parsed manifest of ``name``; ``SnapshotError`` if missing or damaged."""
        validate_name(name)
        where = self.location if self.exists else f"{self.location} (no store there yet)"
        return read_manifest(self.backend, name, where)

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
        return catalogue_of(scan_manifests(self.backend))

    def list(self) -> list[SnapshotInfo]:
        """Info of every readable snapshot, oldest first.

        Damaged manifests are left out (each logged as a warning);
        :meth:`catalogue` reports them, ``gc`` will not collect while there are any.
        """
        cat = self.catalogue()
        for d in cat.damaged:
            log.warning("snapshot %r in %s is unreadable: %s", d.name, self.location, d.error)
        return cat.snapshots

    def delete(self, name: str) -> None:
        """Remove snapshot ``name`` (its manifest, damaged or not); ``gc`` reclaims pages
        no one else uses."""
        validate_name(name)
        if not self.backend.delete_many([manifest_key(name)]):
            raise SnapshotError(f"no snapshot named {name!r} in {self.location}")
        log.info("deleted snapshot %r from %s", name, self.location)

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
