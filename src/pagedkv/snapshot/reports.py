"""What snapshot store operations report: infos, load results, verify / gc reports,
the catalogue.

Plain dataclasses (no torch): the CLI imports them without loading the store.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pagedkv.snapshot.manifest import Manifest


def _gbps(nbytes: int, seconds: float) -> float:
    """``nbytes`` over ``seconds`` in GB/s (0.0 when no time was measured)."""
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot holds, and for the result of a save, how the save went.

    ``logical_bytes`` counts every page of every sequence; ``unique_bytes`` the
    distinct pages (what the snapshot would take alone); ``written_bytes`` the pages
    the save actually added to the store (the rest were already there).
    ``dedup_ratio = logical_bytes / unique_bytes``. ``seconds``/``gbps`` are the save's
    wall time and ``logical_bytes / seconds`` (0 for a fork).
    """

    name: str
    created: float
    parent: str | None
    fingerprint: str
    layout: dict[str, Any]
    seq_ids: list[int | str]
    num_tokens: int
    num_pages: int
    unique_pages: int
    logical_bytes: int
    unique_bytes: int
    written_bytes: int
    metadata: dict[str, Any]
    seconds: float = 0.0

    @property
    def num_sequences(self) -> int:
        return len(self.seq_ids)

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def gbps(self) -> float:
        return _gbps(self.logical_bytes, self.seconds)

    @property
    def created_iso(self) -> str:
        return datetime.fromtimestamp(self.created, tz=timezone.utc).isoformat(timespec="seconds")

    @classmethod
    def from_manifest(cls, m: Manifest) -> SnapshotInfo:
        """What manifest ``m`` records (``seconds``: its save's wall time)."""
        bytes_per_block = int(m.layout["bytes_per_block"])
        num_pages = sum(len(s.pages) for s in m.sequences)
        unique = len(m.page_digests())
        return cls(
            name=m.name,
            created=m.created,
            parent=m.parent,
            fingerprint=m.fingerprint,
            layout=dict(m.layout),
            seq_ids=[s.seq_id for s in m.sequences],
            num_tokens=sum(s.num_tokens for s in m.sequences),
            num_pages=num_pages,
            unique_pages=unique,
            logical_bytes=num_pages * bytes_per_block,
            unique_bytes=unique * bytes_per_block,
            written_bytes=int(m.bytes.get("written", 0)),
            metadata=dict(m.metadata),
            seconds=float(m.save.get("seconds", 0.0)),
        )


@dataclass(frozen=True)
class SnapshotStoreStats:
    """What one :class:`~pagedkv.SnapshotStore` object did since it was opened (counters
    of this process; another process sharing the store counts its own).

    ``saves`` / ``loads``: successful :meth:`~pagedkv.SnapshotStore.save` and
    :meth:`~pagedkv.SnapshotStore.load` calls (forks are not saves: they write a manifest
    only); ``written_bytes``: page bytes the saves added to the store (deduplicated
    pages are not written); ``read_bytes``: page bytes the loads read and verified;
    ``save_seconds`` / ``load_seconds``: their wall time.
    """

    saves: int = 0
    loads: int = 0
    written_bytes: int = 0
    read_bytes: int = 0
    save_seconds: float = 0.0
    load_seconds: float = 0.0


class LoadResult(dict[Any, Hashable]):
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
        """Distinct page bytes per second of the whole load, in GB/s."""
        return _gbps(self.bytes, self.seconds)


@dataclass(frozen=True)
class VerifyReport:
    """The result of reading back every page of a snapshot and checking its digest.

    ``ok`` is true only when the manifest parsed and every page is present with the
    right length and digest. ``error`` explains a manifest that is missing or bad.
    """

    name: str
    ok: bool
    num_pages: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    error: str | None = None
    bytes_checked: int = 0
    seconds: float = 0.0

    @property
    def gbps(self) -> float:
        return _gbps(self.bytes_checked, self.seconds)


@dataclass(frozen=True)
class GcReport:
    """What :meth:`SnapshotStore.gc` removed and kept.

    ``pages_protected`` are unreferenced pages kept because a live lease (a save or
    fork in progress) names them. ``bytes_freed`` is ``None`` when the backend cannot
    tell (Redis). ``leases_removed`` counts dead, damaged or unreadable leases and gc
    markers removed.

    ``damaged``: manifests that could not be read and are still in the store. A gc
    cannot tell which pages such a manifest names, so while there is one it deletes
    no page at all (``blocked``); ``dropped`` are the damaged manifests it deleted
    because it was asked to (``drop_damaged=True``).
    """

    pages_deleted: int
    bytes_freed: int | None
    pages_kept: int
    pages_protected: int
    leases_removed: int
    seconds: float
    damaged: list[DamagedSnapshot] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def blocked(self) -> bool:
        """Whether unreadable manifests kept this gc from deleting any page."""
        return bool(self.damaged)


@dataclass(frozen=True)
class DamagedSnapshot:
    """A manifest in the store that cannot be read: its name (the key) and why.

    ``newer_version``: it was written by a newer pagedkv (not damaged, only unreadable
    here; upgrade to read it); ``gc(drop_damaged=True)`` never deletes such a one.
    """

    name: str
    error: str
    newer_version: bool = False


@dataclass(frozen=True)
class Catalogue:
    """Every manifest of a store, read once: the readable ones and the damaged ones.

    ``snapshots`` are oldest first (as :meth:`SnapshotStore.list`); ``pages`` and
    ``page_bytes`` count the distinct pages they reference together (what the store
    needs to hold for them, shared pages once).
    """

    snapshots: list[SnapshotInfo]
    damaged: list[DamagedSnapshot]
    pages: int
    page_bytes: int

    @property
    def logical_bytes(self) -> int:
        """KV bytes of every sequence of every readable snapshot (shared pages counted
        every time)."""
        return sum(i.logical_bytes for i in self.snapshots)
