"""Reading manifests back: one by name, or every manifest of the store in one scan.

One damaged manifest must not break the store: each is read and parsed on its own,
and one that fails is reported as damaged
(:class:`~pagedkv.snapshot.reports.DamagedSnapshot`) while the scan goes on.
"""

from __future__ import annotations

from typing import NamedTuple

from pagedkv.errors import SnapshotError, SnapshotVersionError
from pagedkv.snapshot.keys import MANIFEST_PREFIX, manifest_key
from pagedkv.snapshot.manifest import Manifest, parse_manifest
from pagedkv.snapshot.pipeline import read_each
from pagedkv.snapshot.reports import Catalogue, DamagedSnapshot, SnapshotInfo
from pagedkv.snapshot.schema import NAME_RE
from pagedkv.stores.base import BlockStore


def parse_stored(name: str, raw: object) -> Manifest:
    """The manifest stored as snapshot ``name``: ``SnapshotError`` if it cannot be used.

    ``raw`` is the value read (an exception if the read failed). Besides the manifest's
    own checks, its key must be a valid snapshot name and the manifest must name
    itself so (one copied or renamed by hand does not).
    """
    what = f"manifest of snapshot {name!r}"
    if isinstance(raw, Exception):
        raise SnapshotError(f"{what} cannot be read: {raw}")
    if NAME_RE.fullmatch(name) is None:
        raise SnapshotError(f"{what}: the key is not a valid snapshot name (not written by save)")
    manifest = parse_manifest(raw, what)
    if manifest.name != name:
        raise SnapshotError(
            f"the manifest stored as {name!r} names itself {manifest.name!r}; it was copied or "
            "renamed by hand (use fork() to give a snapshot a second name)"
        )
    return manifest


class ManifestScan(NamedTuple):
    """Every manifest of a store: parsed ones, damaged ones, and the damaged raw values
    (a drop re-reads and compares them, so it never deletes one rewritten meanwhile)."""

    manifests: list[Manifest]
    damaged: list[DamagedSnapshot]
    raws: dict[str, object]


def manifest_names(backend: BlockStore) -> list[str]:
    """The names of every manifest in the store (readable or not), sorted."""
    return sorted(k[len(MANIFEST_PREFIX) :] for k in backend.keys(MANIFEST_PREFIX))


def scan_manifests(backend: BlockStore) -> ManifestScan:
    """Read and parse every manifest; never raises on a damaged one."""
    names = manifest_names(backend)
    values = read_each(backend, [manifest_key(n) for n in names]) if names else []
    scan = ManifestScan([], [], {})
    for name, raw in zip(names, values):
        if raw is None:
            continue  # deleted meanwhile
        try:
            scan.manifests.append(parse_stored(name, raw))
        except SnapshotError as e:
            newer = isinstance(e, SnapshotVersionError)
            scan.damaged.append(DamagedSnapshot(name, str(e), newer_version=newer))
            scan.raws[name] = raw
    return scan


def read_manifest(backend: BlockStore, name: str, where: str) -> Manifest:
    """The manifest of snapshot ``name``; ``SnapshotError`` if it is missing (naming the
    store ``where`` and the snapshots it has) or cannot be used."""
    raw = read_each(backend, [manifest_key(name)])[0]
    if raw is None:
        known = ", ".join(manifest_names(backend)[:10]) or "none"
        raise SnapshotError(f"no snapshot named {name!r} in {where} (have: {known})")
    return parse_stored(name, raw)


def catalogue_of(scan: ManifestScan) -> Catalogue:
    """The catalogue of a scan: readable snapshots oldest first, the damaged ones, and the
    distinct pages the readable ones need together."""
    sizes = {d: m.layout["bytes_per_block"] for m in scan.manifests for d in m.page_digests()}
    infos = sorted(
        map(SnapshotInfo.from_manifest, scan.manifests), key=lambda i: (i.created, i.name)
    )
    return Catalogue(infos, scan.damaged, len(sizes), sum(sizes.values()))


def _by_age(info: SnapshotInfo) -> tuple[float, str]:
    return info.created, info.name
