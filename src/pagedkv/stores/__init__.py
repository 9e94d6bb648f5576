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
import re
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from pagedkv.stores.base import BlockStore, StoreStats, check_key
from pagedkv.stores.disk import DiskStore
from pagedkv.stores.framing import FramedStore, digest_hex, pack, unpack
from pagedkv.stores.memory import MemoryStore
from pagedkv.stores.redis import RedisStore

# URL scheme -> kind of store. A location without a scheme is a directory path
# ("path"). To add a store: a row here, and an opener for its kind in each user of
# parse_location that supports it (open_store below; the snapshot store).
STORE_SCHEMES: dict[str, str] = {
    "file": "path",
    "memory": "memory",
    "redis": "redis",
    "rediss": "redis",
}

# RFC 3986 scheme, at the start; one letter is a Windows drive ("C:"), not a scheme.
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")


class Location(NamedTuple):
    """A parsed store location.

    ``kind``: ``"path"`` (a directory), or the kind :data:`STORE_SCHEMES` gives the
    URL's scheme. ``target``: the directory path for ``"path"`` (a ``file://`` URL
    decoded), the URL otherwise (its scheme in lower case, the rest unchanged).
    ``scheme``: the URL's scheme (lower case), ``None`` for a plain path.
    """

    kind: str
    target: str
    scheme: str | None

    @property
    def shown(self) -> str:
        """A printable form: the path, or the URL without its user and password."""
        if self.scheme is None or self.kind == "path":
            return self.target
        try:
            parts = urlsplit(self.target)
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
        except ValueError:  # a malformed port: show no more than the scheme
            return f"{self.scheme}://?"
        return f"{self.scheme}://{host}{port}{parts.path}"


def known_schemes() -> str:
    """The accepted URL schemes, for messages: ``"file://, memory://, ..."``."""
    return ", ".join(s + "://" for s in STORE_SCHEMES)


def parse_location(location: object) -> Location:
    """Parse a store location: a directory path (``str`` or ``os.PathLike``) or a URL.

    The one parser every store location goes through (block stores, tiers, snapshot
    stores), so a location means the same everywhere. A ``scheme://`` that is not in
    :data:`STORE_SCHEMES` raises ``ValueError`` naming the known schemes, and so does a
    known scheme missing its ``//`` (``redis:host``): neither is silently taken as a
    directory name. Messages never show a URL itself (it may hold a password).
    """
    if isinstance(location, os.PathLike):
        location = os.fspath(location)
        if not isinstance(location, str):
            raise TypeError(f"a store location must be a str path or URL, got bytes {location!r}")
        return Location("path", _check_path(location), None)
    if not isinstance(location, str):
        raise TypeError(
            f"a store location must be a directory path or a URL ({known_schemes()}), "
            f"got {type(location).__name__}"
        )
    m = _SCHEME_RE.match(location)
    if m is not None:
        scheme, rest = m.group(1).lower(), location[m.end() :]
        kind = STORE_SCHEMES.get(scheme)
        if rest.startswith("//"):
            if kind is None:
                raise ValueError(
                    f"unknown scheme {scheme + '://'!r} in a store location; use one of "
                    f"{known_schemes()} or a directory path"
                )
            if kind == "path":
                return Location("path", _file_url_path(location), scheme)
            return Location(kind, f"{scheme}:{rest}", scheme)  # the scheme in lower case
        if kind is not None:
            raise ValueError(
                f"store location starts with {scheme + ':'!r} but not {scheme + '://'!r}; "
                f"write it as a URL ({scheme}://...) or, for a directory, as ./{scheme}:..."
            )
    return Location("path", _check_path(location), None)


def _check_path(path: str) -> str:
    if not path or "\x00" in path:
        raise ValueError(f"a store directory path must be non-empty, without NUL; got {path!r}")
    return path


def _file_url_path(location: str) -> str:
    parts = urlsplit(location)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(
            f"file:// URL names host {parts.netloc!r}; a local directory is file:///path "
            "(three slashes)"
        )
    return _check_path(unquote(parts.path))


def _open_path(location: Location, **kw: Any) -> BlockStore:
    return DiskStore(location.target, **kw)


def _open_memory(location: Location, **kw: Any) -> BlockStore:
    return MemoryStore(**kw)


def _open_redis(location: Location, **kw: Any) -> BlockStore:
    return RedisStore(location.target, **kw)


_OPENERS: dict[str, Callable[..., BlockStore]] = {
    "path": _open_path,
    "memory": _open_memory,
    "redis": _open_redis,
}


def open_store(location: str | os.PathLike[str], **kw: Any) -> BlockStore:
    """Open the block store named by ``location``; ``kw`` go to the backend's constructor.

    ``redis://``/``rediss://`` -> :class:`RedisStore`; ``file:///path`` or a plain
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
    "RedisStore",
    "StoreStats",
    "check_key",
    "digest_hex",
    "known_schemes",
    "open_store",
    "pack",
    "parse_location",
    "unpack",
]
