"""Leases and gc markers: how saves and ``gc`` share a store safely.

- ``snap.l.<id>.<n>``: a lease, written by a save (or fork) *before* it checks which
  pages the store has; it names the pages the save counts on, and is deleted after
  the manifest is written. ``gc`` never deletes a page a live lease names.
- ``snap.g.<id>``: a gc marker, written when a gc starts and deleted when it ends. A
  save that writes a lease while a gc runs waits for it to end (:func:`take_lease`): that
  gc read the leases before this one existed, so it might delete pages the save is
  about to count on.

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


def take_lease(backend: Any, key: str, name: str, digests: list[str], grace: float) -> None:
    """Write lease ``key`` naming ``digests``, then wait until no gc is running."""
    backend.put_many([(key, new_lease(key, name, digests).encode())])
    while live_leases(backend, GC_PREFIX, grace)[0]:
        time.sleep(_POLL_SECONDS)


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
