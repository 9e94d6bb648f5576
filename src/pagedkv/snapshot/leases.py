"""Leases and gc markers: how saves and ``gc`` share a store safely.

- ``snap.l.<id>.<n>``: a lease, written by a save (or fork) *before* it checks which
  pages the store has; it names the pages the save counts on, and is deleted after
  the manifest is written. ``gc`` never deletes a page a live lease names.
- ``snap.g.<id>``: a gc marker, written when a gc starts and deleted when it ends.
  A gc honours the leases it read when it started, so a lease written after that
  does not protect its pages from this gc. A save therefore waits, after its last
  lease and before its final check that every page it counts on is stored
  (re-writing any that vanished), until no gc runs (:func:`wait_for_gc`); a fork,
  which writes nothing, waits right after its lease (:func:`take_lease`). A gc that
  starts after that wait finds the save's leases, which stay until its manifest is
  written.

Both are :class:`~pagedkv.snapshot.manifest.Lease` JSON documents. One is live while
its process runs (written on this host) or for ``grace`` seconds after it was written
(another host); dead ones are ignored and removed by the next gc.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from pagedkv.errors import SnapshotError
from pagedkv.snapshot.manifest import Lease, parse_lease
from pagedkv.stores.base import pid_alive

LEASE_PREFIX = "snap.l."
GC_PREFIX = "snap.g."
_POLL_SECONDS = 0.02


def new_lease(key: str, name: str, digests: list[str]) -> Lease:
    """A lease (or, with ``name="gc"`` and no digests, a gc marker) held by this process."""
    return Lease(key, name, time.time(), socket.gethostname(), os.getpid(), digests)


def write_lease(backend: Any, key: str, name: str, digests: list[str]) -> None:
    """Write lease ``key`` naming ``digests`` (held by this process)."""
    backend.put_many([(key, new_lease(key, name, digests).encode())])


def wait_for_gc(backend: Any, grace: float) -> None:
    """Return once no live gc marker is left (at once when no gc runs: one listing)."""
    while live_leases(backend, GC_PREFIX, grace)[0]:
        time.sleep(_POLL_SECONDS)


def take_lease(backend: Any, key: str, name: str, digests: list[str], grace: float) -> None:
    """:func:`write_lease`, then :func:`wait_for_gc`."""
    write_lease(backend, key, name, digests)
    wait_for_gc(backend, grace)


def live_leases(backend: Any, prefix: str, grace: float) -> tuple[list[Lease], list[str]]:
    """(live leases under ``prefix``, keys of dead or unreadable ones)."""
    keys = list(backend.keys(prefix))
    alive: list[Lease] = []
    dead: list[str] = []
    host, now = socket.gethostname(), time.time()
    for key, raw in zip(keys, backend.get_many(keys) if keys else []):
        if raw is None:
            continue  # deleted meanwhile
        try:
            lease = parse_lease(raw)
        except SnapshotError:
            dead.append(key)
            continue
        if pid_alive(lease.pid) if lease.host == host else now - lease.created < grace:
            alive.append(lease)
        else:
            dead.append(key)
    return alive, dead
