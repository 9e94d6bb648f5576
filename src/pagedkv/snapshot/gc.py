"""Garbage collection of a snapshot store: pages no manifest references, dead leases.

A gc writes a marker (``snap.g.<id>``), then reads the leases, then the manifests,
then lists the pages, and deletes the unreferenced, unleased ones in one batch (the
protocol against concurrent saves: :mod:`pagedkv.snapshot.leases`).

It is conservative about damage. A damaged manifest cannot say which pages it
references, so while the store holds one a gc deletes no page (its report says
``blocked``); ``drop_damaged=True`` deletes damaged manifests first (never one of a
newer format version, which is only unreadable here) and then collects as usual.
Damaged leases and markers protect nothing: they are removed like dead ones.
"""

from __future__ import annotations

import logging
import time

from pagedkv.snapshot.catalogue import ManifestScan, scan_manifests
from pagedkv.snapshot.keys import (
    GC_PREFIX,
    LEASE_PREFIX,
    gc_marker_key,
    is_page_key,
    manifest_key,
    page_digest,
    page_key,
)
from pagedkv.snapshot.leases import new_lease, scan_leases
from pagedkv.snapshot.pipeline import read_each
from pagedkv.snapshot.reports import DamagedSnapshot, GcReport
from pagedkv.stores.base import BlockStore

log = logging.getLogger("pagedkv.snapshot")


def collect(backend: BlockStore, grace: float, *, drop_damaged: bool, where: str) -> GcReport:
    """One gc (see :meth:`SnapshotStore.gc`): marker, leases, manifests, pages.

    Logs the outcome (INFO), and a WARNING when damaged manifests blocked it.
    """
    t0 = time.perf_counter()
    marker = gc_marker_key()
    backend.put_many([(marker, new_lease(marker, "gc", []).encode())])
    try:
        r = _collect(backend, grace, drop_damaged, t0)
    finally:
        backend.delete_many([marker])
    freed = "?" if r.bytes_freed is None else r.bytes_freed
    log.info(
        "gc of %s: deleted %d pages (%s bytes), kept %d (%d protected by saves in progress), "
        "removed %d dead leases, %.3f s",
        *(where, r.pages_deleted, freed, r.pages_kept, r.pages_protected, r.leases_removed),
        r.seconds,
    )
    if r.damaged:
        log.warning(
            "gc of %s deleted no page: %d snapshots are unreadable (%s); delete them, or run "
            "gc with drop_damaged=True (`pagedkv snapshot gc --drop-damaged`)",
            *(where, len(r.damaged), ", ".join(d.name for d in r.damaged[:10])),
        )
    return r


def _collect(backend: BlockStore, grace: float, drop_damaged: bool, t0: float) -> GcReport:
    # The marker first (saves that lease pages from now on wait for this gc to
    # end), then the leases, then the manifests: a save that finishes in between
    # wrote its manifest before dropping its lease, so its pages are seen as
    # leased or as referenced.
    leases = scan_leases(backend, LEASE_PREFIX, grace)
    protected = {d for lease in leases.live for d in lease.pages}
    markers = scan_leases(backend, GC_PREFIX, grace)  # of gcs that died, or damaged
    damaged_leases = {**leases.damaged, **markers.damaged}
    dead = leases.dead + markers.dead + list(damaged_leases)
    scan = scan_manifests(backend)
    damaged, dropped = _drop(backend, scan) if drop_damaged else (scan.damaged, [])
    referenced = {d for m in scan.manifests for d in m.page_digests()}
    pages = {page_digest(k) for k in backend.keys("") if is_page_key(k)}
    orphans = pages - referenced
    doomed = [] if damaged else sorted(orphans - protected)
    before = backend.stats().bytes_used
    deleted = 0
    if doomed:
        # One batch: a pack store rewrites each pack once. Saves that lease pages
        # from now on check them again after this gc ends (the marker); a second
        # look at the leases costs little and spares them most re-writes.
        again = {d for lease in scan_leases(backend, LEASE_PREFIX, grace).live for d in lease.pages}
        deleted = backend.delete_many([page_key(d) for d in doomed if d not in again])
    removed = backend.delete_many(dead) if dead else 0
    after = backend.stats().bytes_used
    if damaged_leases:
        key, why = next(iter(damaged_leases.items()))
        log.warning(
            "gc removed %d damaged lease or gc-marker entries (first: %s: %s)",
            len(damaged_leases),
            key,
            why,
        )
    return GcReport(
        pages_deleted=deleted,
        bytes_freed=None if before is None or after is None else before - after,
        pages_kept=len(pages) - deleted,
        pages_protected=len(orphans & protected),
        leases_removed=removed,
        seconds=time.perf_counter() - t0,
        damaged=damaged,
        dropped=dropped,
    )


def _drop(backend: BlockStore, scan: ManifestScan) -> tuple[list[DamagedSnapshot], list[str]]:
    """Delete the damaged manifests (not those of a newer version) that are still as
    they were read; return (the damaged still there, the names dropped)."""
    kept = [d for d in scan.damaged if d.newer_version]
    candidates = [d for d in scan.damaged if not d.newer_version]
    if not candidates:
        return kept, []
    now = read_each(backend, [manifest_key(d.name) for d in candidates])
    doomed: list[DamagedSnapshot] = []
    for d, raw in zip(candidates, now):
        if raw is None:
            continue  # deleted meanwhile
        if not isinstance(raw, Exception) and raw != scan.raws[d.name]:
            kept.append(d)  # rewritten meanwhile (a save with overwrite=True?): not read, keep
        else:
            doomed.append(d)
    if not doomed:
        return kept, []
    keys = [manifest_key(d.name) for d in doomed]
    backend.delete_many(keys)
    dropped: list[DamagedSnapshot] = []
    for d, present in zip(doomed, backend.contains_many(keys)):
        (kept if present else dropped).append(d)  # one we could not delete still blocks
    if dropped:
        log.warning(
            "gc dropped %d damaged snapshot manifests: %s",
            len(dropped),
            ", ".join(d.name for d in dropped[:10]),
        )
    return kept, [d.name for d in dropped]
