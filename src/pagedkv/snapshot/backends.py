"""Where a snapshot store lives: the block store a location opens, and how it is shown.

Locations go through :func:`pagedkv.stores.parse_location` (the one parser); each
kind it names maps to a snapshot backend here: a directory is a
:class:`~pagedkv.stores.PackStore` (pages in pack files), ``redis://``/``rediss://`` a
:class:`~pagedkv.stores.RedisStore`. Any other kind (``memory://``) is refused: pass a
store object instead. A new scheme: a row in ``STORE_SCHEMES`` and one opener here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from pagedkv.stores import Location, PackStore, RedisStore, known_schemes, parse_location
from pagedkv.stores.base import BlockStore


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
    return Backend(RedisStore(loc.target, key_prefix=key_prefix), loc.shown, _no_sync)


_OPENERS = {"path": _open_directory, "redis": _open_redis}


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
            f"{loc.scheme}:// is not a snapshot store location; use a directory path or "
            f"redis:// / rediss:// (known schemes: {known_schemes()}), or pass a block "
            "store object (e.g. MemoryStore(...))"
        )
    return opener(loc, key_prefix, durable, writers, file_mode)


def describe(store: object) -> str:
    """How a store object passed in is shown: its class and path or server, never a URL
    with its password (``RedisStore.url`` is the redacted form)."""
    shown = getattr(store, "url", None) or getattr(store, "path", None)
    return f"{type(store).__name__}({shown})" if shown else type(store).__name__
