"""The keys of a snapshot store: every name a snapshot store gives what it writes.

- ``<sha256 hex>.pg``   a page (a block's K and V bytes), named by its digest
  (:mod:`pagedkv.stores.keys`; in a local store pages live in pack files);
- ``snap.m.<name>``     a manifest (JSON, :mod:`pagedkv.snapshot.manifest`);
- ``snap.l.<id>.<n>``   a lease: the pages a save in progress counts on, ``n``-th chunk;
- ``snap.g.<id>``       a gc in progress (:mod:`pagedkv.snapshot.leases`).
"""

from __future__ import annotations

import secrets

from pagedkv.stores.keys import PAGE_SUFFIX, is_page_key, page_digest, page_key, sha256_hex

MANIFEST_PREFIX = "snap.m."
LEASE_PREFIX = "snap.l."
GC_PREFIX = "snap.g."

__all__ = [
    "GC_PREFIX",
    "LEASE_PREFIX",
    "MANIFEST_PREFIX",
    "PAGE_SUFFIX",
    "gc_marker_key",
    "is_page_key",
    "lease_key",
    "manifest_key",
    "new_lease_id",
    "page_digest",
    "page_key",
    "sha256_hex",
]


def manifest_key(name: str) -> str:
    """The key of snapshot ``name``'s manifest."""
    return MANIFEST_PREFIX + name


def new_lease_id() -> str:
    """A fresh id for the leases of one save or fork (16 hex digits)."""
    return secrets.token_hex(8)


def lease_key(lease_id: str, n: int) -> str:
    """The key of lease ``n`` (one per chunk of a save) of the save ``lease_id``."""
    return f"{LEASE_PREFIX}{lease_id}.{n:06d}"


def gc_marker_key() -> str:
    """A fresh gc marker key."""
    return f"{GC_PREFIX}{secrets.token_hex(8)}"
