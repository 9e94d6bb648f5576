"""Block stores: byte values under ``str`` keys, shared by offload tiers and snapshots.

- :class:`MemoryStore` — a preallocated (pinned) host slab of fixed-size slots.
- :class:`DiskStore` — one file per entry, atomic writes, survives restarts.
- :class:`RedisStore` — a shared Redis server, one round trip per batch.
- :class:`RedisClusterStore` — a Redis Cluster, one pipeline per master per batch.
- :class:`PackStore` — a snapshot directory: content-addressed pages in pack files.
- :class:`FramedStore` — wraps any of them; values carry a verified header.

``open_store("redis://...")``, ``open_store("redis+cluster://h1:p1,h2:p2")``,
``open_store("/var/cache/kv", capacity_bytes=...)``,
``open_store("memory://", capacity_bytes=...)`` pick the backend from the location;
:func:`parse_location` is the one parser of locations. The contracts (protocols
:class:`BlockStore`, :class:`RowStore` and the capabilities) are in
:mod:`pagedkv.stores.base`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from pagedkv.stores.base import BlockStore, RowStore, StoreStats, check_key
from pagedkv.stores.disk import DiskStore
from pagedkv.stores.framing import FramedStore, pack, unpack
from pagedkv.stores.keys import sha256_hex
from pagedkv.stores.locations import STORE_SCHEMES, Location, known_schemes, parse_location
from pagedkv.stores.memory import MemoryStore
from pagedkv.stores.packs import PackStore
from pagedkv.stores.redis import RedisStore
from pagedkv.stores.redis_cluster import RedisClusterStore

# The content address of a page; the name it had here before ``sha256_hex``.
digest_hex = sha256_hex


def _open_path(location: Location, **kw: Any) -> BlockStore:
    return DiskStore(location.target, **kw)


def _open_memory(location: Location, **kw: Any) -> BlockStore:
    return MemoryStore(**kw)


def _open_redis(location: Location, **kw: Any) -> BlockStore:
    return RedisStore(location.target, **kw)


def _open_redis_cluster(location: Location, **kw: Any) -> BlockStore:
    return RedisClusterStore(location.target, **kw)


# Location kind -> block store. A new scheme: a row in STORE_SCHEMES and one here.
_OPENERS: dict[str, Callable[..., BlockStore]] = {
    "path": _open_path,
    "memory": _open_memory,
    "redis": _open_redis,
    "redis-cluster": _open_redis_cluster,
}


def open_store(location: str | os.PathLike[str], **kw: Any) -> BlockStore:
    """Open the block store named by ``location``; ``kw`` go to the backend's constructor.

    ``redis://``/``rediss://`` -> :class:`RedisStore`; ``redis+cluster://``/
    ``rediss+cluster://`` -> :class:`RedisClusterStore`; ``file:///path`` or a plain
    path -> :class:`DiskStore` (needs ``capacity_bytes=``); ``memory://`` ->
    :class:`MemoryStore` (needs ``capacity_bytes=``). Unknown schemes raise
    ``ValueError`` (see :func:`parse_location`).
    """
    parsed = parse_location(location)
    return _OPENERS[parsed.kind](parsed, **kw)


__all__ = [
    "STORE_SCHEMES",
    "BlockStore",
    "DiskStore",
    "FramedStore",
    "Location",
    "MemoryStore",
    "PackStore",
    "RedisClusterStore",
    "RedisStore",
    "RowStore",
    "StoreStats",
    "check_key",
    "digest_hex",
    "known_schemes",
    "open_store",
    "pack",
    "parse_location",
    "sha256_hex",
    "unpack",
]
