"""Exceptions raised by pagedkv.

Every user-facing error is a subclass of :class:`PagedKVError` (or a plain
``ValueError``/``TypeError``/``KeyError`` for bad arguments) whose message says
what was wrong and how to fix it.
"""

from __future__ import annotations


class PagedKVError(Exception):
    """Base class of pagedkv's own exceptions."""


class OutOfBlocks(PagedKVError):
    """Not enough free or evictable KV blocks for the request; nothing was changed."""


class CachePausedError(PagedKVError, RuntimeError):
    """A cache (or pager) refused a mutation while it is paused for a snapshot that is
    reading it; retry after the ``paused()`` block ends. Nothing was changed.

    A ``RuntimeError`` too: the call was valid, the cache's state refused it for now.
    """


class CacheIntegrityError(PagedKVError):
    """An internal invariant does not hold; the message names the numbers that disagree."""


class UnsupportedModelError(PagedKVError, ValueError):
    """The model uses a feature pagedkv cannot run (the message names it)."""


class ResourceError(PagedKVError, ValueError):
    """The machine cannot give what the arguments ask for: not enough host or device
    memory (the message names the argument, the bytes asked for and the bytes
    available), or a device that does not exist here. Raised before anything is
    allocated.

    A ``ValueError`` too: the fix is a different argument (fewer blocks, a smaller
    tier, another device), and code that guards construction with ``except
    ValueError`` keeps working. Not a ``MemoryError``: nothing ran out, the request
    was refused.
    """


class EngineClosedError(PagedKVError, RuntimeError):
    """The :class:`~pagedkv.Engine` was closed; build a new one to generate again."""


class StoreError(PagedKVError):
    """A block store failed (I/O error, bad configuration, unreachable server)."""


class StoreUnavailable(StoreError):
    """A remote block store cannot be reached right now (connection refused, timeout)."""


class SnapshotError(PagedKVError):
    """A snapshot cannot be saved, read or restored (missing, corrupt or mismatched)."""


class SnapshotVersionError(SnapshotError):
    """A snapshot document was written by a newer pagedkv (a format version this one
    cannot read): it is not damaged, and nothing it references may be collected."""


class MigrationError(PagedKVError, RuntimeError):
    """A request could not be moved to another engine now (it finished or was aborted on
    its engine first, or a step of it is in flight); its engine still holds it unless
    the message says it finished."""
