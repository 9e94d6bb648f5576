"""Where a snapshot store lives: the block store a location opens, and how it is shown.

Locations go through :func:`pagedkv.stores.parse_location` (the one parser); each
kind it names maps to a snapshot backend here: a directory is a
:class:`~pagedkv.stores.PackStore` (pages in pack files), ``redis://``/``rediss://`` a
:class:`~pagedkv.stores.RedisStore`, ``redis+cluster://``/``rediss+cluster://`` a
:class:`~pagedkv.stores.RedisClusterStore`. Any other kind (``memory://``) is refused:
pass a store object instead. A new scheme: a row in ``STORE_SCHEMES`` and one opener
here.

A snapshot store in a Redis Cluster. Pages (``<sha256>.pg``) spread over every master;
the metadata (manifests, leases, gc markers: the keys under ``snap.``) share one hash
tag, ``{snap.}``, so they live on one master and listing them reads that master only.
The save and gc protocol (:mod:`pagedkv.snapshot.leases`) needs no multi-key atomicity:
every step is single-key writes and reads, each finished before the next begins, and
single-key operations on masters are linearizable, so a cluster keeps the guarantees of
one Redis server, with these limits: a master that fails over to a replica may lose
its last acknowledged writes (replication is asynchronous: a page or a manifest can
vanish; ``verify`` reports it, ``WAIT`` is not used), and a gc must not run while the
``{snap.}`` slot is being resharded (SCAN on a migrating slot can miss keys, so the gc
could miss a manifest and delete its pages). The backend is strict: a master that
cannot answer raises :class:`~pagedkv.errors.StoreUnavailable`; nothing is read as
missing because a node was down.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from pagedkv.snapshot.keys import GC_PREFIX, LEASE_PREFIX, MANIFEST_PREFIX
from pagedkv.stores import (
    Location,
    PackStore,
    RedisClusterStore,
    RedisStore,
    known_schemes,
    parse_location,
)
from pagedkv.stores.base import BlockStore

# The keys a snapshot store writes besides pages; colocated (one hash tag) in a cluster.
METADATA_PREFIX = os.path.commonprefix([MANIFEST_PREFIX, LEASE_PREFIX, GC_PREFIX])


class Backend(NamedTuple):
    """An opened snapshot backend: the ``store``, how it is ``shown`` (its path, or its
    URL without a password), and ``sync``, which makes what was written durable (a
    no-op unless ``durable=True`` was asked for)."""

    store: BlockStore
    shown: str
    sync: Callable[[], None]


def _no_sync() -> None:
    pass


def _open_directory(loc: Location, key_prefix: str, durable: bool, writers: int,
                    file_mode: int | None) -> Backend:  # fmt: skip
    store = PackStore(loc.target, durable=durable, writers=writers, file_mode=file_mode)
    return Backend(store, store.path, store.sync if durable else _no_sync)


def _open_redis(loc: Location, key_prefix: str, durable: bool, writers: int,
                file_mode: int | None) -> Backend:  # fmt: skip
    if file_mode is not None:
        raise ValueError("file_mode= applies to a directory store, not to Redis")
    if durable:
        raise ValueError(
            "durable=True applies to a directory store; Redis persistence is the server's"
        )
    if loc.kind == "redis-cluster":
        store: BlockStore = RedisClusterStore(
            loc.target, key_prefix=key_prefix, colocate=(METADATA_PREFIX,)
        )
    else:
        store = RedisStore(loc.target, key_prefix=key_prefix)
    return Backend(store, loc.shown, _no_sync)


_OPENERS = {"path": _open_directory, "redis": _open_redis, "redis-cluster": _open_redis}


def open_backend(
    location: str | os.PathLike[str] | BlockStore,
    *,
    key_prefix: str,
    durable: bool,
    writers: int,
    file_mode: int | None,
) -> Backend:
    """The backend of ``location``: a directory path, a Redis URL, or a store object
    (used as it is; ``durable`` does not apply to it). Bad locations raise
    ``ValueError``/``TypeError`` saying what is accepted; nothing is created."""
    if isinstance(location, BlockStore):
        if durable:
            raise ValueError("durable=True applies to a directory location, not a store object")
        return Backend(location, describe(location), _no_sync)
    loc = parse_location(location)
    opener = _OPENERS.get(loc.kind)
    if opener is None:
        raise ValueError(
            f"{loc.scheme}:// is not a snapshot store location; use a directory path, "
            "redis:// / rediss:// or redis+cluster:// / rediss+cluster:// (known schemes: "
            f"{known_schemes()}), or pass a block "
            "store object (e.g. MemoryStore(...))"
        )
    return opener(loc, key_prefix, durable, writers, file_mode)


def describe(store: object) -> str:
    """How a store object passed in is shown: its class and path or server, never a URL
    with its password (``RedisStore.url`` is the redacted form)."""
    shown = getattr(store, "url", None) or getattr(store, "path", None)
    return f"{type(store).__name__}({shown})" if shown else type(store).__name__
