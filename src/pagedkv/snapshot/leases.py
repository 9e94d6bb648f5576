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

Both are :class:`Lease` JSON documents. One is live while its process runs (written
on this host) or for ``grace`` seconds after it was written (another host; one dated
more than ``grace`` in the future is not live either). Dead ones are ignored and
removed by the next gc, and so are damaged ones (not a lease document, malformed,
unreadable, or of a newer format version): a damaged lease protects nothing and makes
no save wait, which is safe because every save re-checks its pages after the last gc
it could have raced.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

from pagedkv.errors import SnapshotError
from pagedkv.snapshot.jsondoc import decode_document
from pagedkv.snapshot.keys import GC_PREFIX, LEASE_PREFIX
from pagedkv.snapshot.pipeline import read_each
from pagedkv.snapshot.schema import INT32, KEY_RE, MAX_TIMESTAMP, NAME_RE, Fields, check_header
from pagedkv.stores.base import BlockStore, pid_alive

__all__ = [
    "GC_PREFIX",
    "LEASE_PREFIX",
    "Lease",
    "LeaseScan",
    "new_lease",
    "parse_lease",
    "scan_leases",
    "take_lease",
    "wait_for_gc",
    "write_lease",
]

LEASE_FORMAT = "pagedkv.snapshot.lease"
LEASE_VERSION = 1
_POLL_SECONDS = 0.02


@dataclass(frozen=True)
class Lease:
    """A pending save: written before any page, deleted after the manifest.

    ``gc`` keeps every page a live lease names, so a save in progress never loses a
    page it counted on. A lease is live while its process runs (same host) or for a
    grace period after ``created`` (any host).
    """

    lease_id: str
    name: str
    created: float
    host: str
    pid: int
    pages: list[str]

    def encode(self) -> bytes:
        """The lease as the JSON document stored under its key."""
        obj = {"format": LEASE_FORMAT, "version": LEASE_VERSION, **asdict(self)}
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def parse_lease(raw: object, what: str = "lease") -> Lease:
    """Decode and validate a lease or gc marker; ``SnapshotError`` naming the field if bad."""
    obj = decode_document(raw, what)
    check_header(obj, LEASE_FORMAT, LEASE_VERSION, what)
    f = Fields(obj, what)
    return Lease(
        lease_id=f.text("lease_id", KEY_RE, expected="a store key"),
        name=f.text("name", NAME_RE, expected="a snapshot name"),
        created=f.number("created", 0.0, MAX_TIMESTAMP),
        host=f.text("host", max_len=255),
        pid=f.integer("pid", 1, INT32),
        pages=f.digests("pages"),
    )


class LeaseScan(NamedTuple):
    """The leases (or gc markers) under one prefix, by state.

    ``live``: parsed, and their writer may still run. ``dead``: keys of leases whose
    writer is gone (or whose grace ran out). ``damaged``: ``{key: why}`` of those that
    cannot be read or parsed. A gc removes the dead and the damaged.
    """

    live: list[Lease]
    dead: list[str]
    damaged: dict[str, str]


def new_lease(key: str, name: str, digests: list[str]) -> Lease:
    """A lease (or, with ``name="gc"`` and no digests, a gc marker) held by this process."""
    return Lease(key, name, time.time(), socket.gethostname(), os.getpid(), digests)


def write_lease(backend: BlockStore, key: str, name: str, digests: list[str]) -> None:
    """Write lease ``key`` naming ``digests`` (held by this process)."""
    backend.put_many([(key, new_lease(key, name, digests).encode())])


def wait_for_gc(backend: BlockStore, grace: float) -> None:
    """Return once no live gc marker is left (at once when no gc runs: one listing)."""
    while scan_leases(backend, GC_PREFIX, grace).live:
        time.sleep(_POLL_SECONDS)


def take_lease(backend: BlockStore, key: str, name: str, digests: list[str], grace: float) -> None:
    """:func:`write_lease`, then :func:`wait_for_gc`."""
    write_lease(backend, key, name, digests)
    wait_for_gc(backend, grace)


def scan_leases(backend: BlockStore, prefix: str, grace: float) -> LeaseScan:
    """Read every lease under ``prefix`` and sort it into live, dead and damaged."""
    keys = list(backend.keys(prefix))
    scan = LeaseScan([], [], {})
    host, now = socket.gethostname(), time.time()
    for key, raw in zip(keys, read_each(backend, keys) if keys else []):
        if raw is None:
            continue  # deleted meanwhile
        try:
            if isinstance(raw, Exception):
                raise SnapshotError(f"lease {key!r} cannot be read: {raw}")
            lease = parse_lease(raw, what=f"lease {key!r}")
        except SnapshotError as e:
            scan.damaged[key] = str(e)
            continue
        if lease.host == host:
            live = pid_alive(lease.pid)
        else:
            live = -grace < now - lease.created < grace
        if live:
            scan.live.append(lease)
        else:
            scan.dead.append(key)
    return scan
