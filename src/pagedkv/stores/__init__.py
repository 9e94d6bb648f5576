"""Block stores: byte values under ``str`` keys, shared by offload tiers and snapshots.

- :class:`MemoryStore` — a preallocated (pinned) host slab of fixed-size slots.
- :class:`DiskStore` — one file per entry, atomic writes, survives restarts.
- :class:`RedisStore` — a shared Redis server, one round trip per batch.
- :class:`FramedStore` — wraps any of them; values carry a verified header.

``open_store("redis://...")``, ``open_store("/var/cache/kv", capacity_bytes=...)``,
``open_store("memory://", capacity_bytes=...)`` pick the backend from the location.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from pagedkv.stores.base import BlockStore, StoreStats, check_key
from pagedkv.stores.disk import DiskStore
from pagedkv.stores.framing import FramedStore, digest_hex, pack, unpack
from pagedkv.stores.memory import MemoryStore
from pagedkv.stores.redis import RedisStore


def _open_memory(location: str, **kw: Any) -> BlockStore:
    return MemoryStore(**kw)


def _open_file(location: str, **kw: Any) -> BlockStore:
    parts = urlsplit(location)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file:// URL {location!r} names host {parts.netloc!r}; use file:///path")
    return DiskStore(unquote(parts.path), **kw)


def _open_redis(location: str, **kw: Any) -> BlockStore:
    return RedisStore(location, **kw)


# URL scheme -> factory(location, **kw); a location without a scheme is a directory.
STORE_SCHEMES: dict[str, Callable[..., BlockStore]] = {
    "memory": _open_memory,
    "file": _open_file,
    "redis": _open_redis,
    "rediss": _open_redis,
}


def open_store(location: str | os.PathLike[str], **kw: Any) -> BlockStore:
    """Open the block store named by ``location``; ``kw`` go to the backend's constructor.

    ``redis://``/``rediss://`` -> :class:`RedisStore`; ``file:///path`` or a plain
    path -> :class:`DiskStore` (needs ``capacity_bytes=``); ``memory://`` ->
    :class:`MemoryStore` (needs ``capacity_bytes=``). Unknown schemes raise ``ValueError``.
    """
    if isinstance(location, os.PathLike):
        return DiskStore(location, **kw)
    if not isinstance(location, str) or not location:
        raise ValueError(f"open_store: expected a URL or a directory path, got {location!r}")
    scheme, sep, _ = location.partition("://")
    if not sep:
        return DiskStore(location, **kw)
    factory = STORE_SCHEMES.get(scheme.lower())
    if factory is None:
        raise ValueError(
            f"open_store: unknown scheme {scheme!r}; use one of "
            f"{', '.join(s + '://' for s in STORE_SCHEMES)} or a directory path"
        )
    return factory(location, **kw)


__all__ = [
    "STORE_SCHEMES",
    "BlockStore",
    "DiskStore",
    "FramedStore",
    "MemoryStore",
    "RedisStore",
    "StoreStats",
    "check_key",
    "digest_hex",
    "open_store",
    "pack",
    "unpack",
]
