"""The block-store contract shared by offload tiers and snapshots.

A block store maps ``str`` keys to raw bytes. Every operation is batched (one
lock acquisition, one round trip for remote stores) because tiers move hundreds
of blocks at a time. Values are never interpreted: no pickle, no JSON, just bytes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

Buffer = bytes | bytearray | memoryview

MAX_KEY_LEN = 200
_KEY_RE = re.compile(r"[0-9A-Za-z._-]{1,200}")
_PREFIX_RE = re.compile(r"[0-9A-Za-z._-]{0,200}")


@dataclass(frozen=True)
class StoreStats:
    """Counters of one store since it was opened.

    ``entries``/``bytes_used`` are ``None`` where the store cannot know them cheaply
    (Redis: the server holds the data). ``bytes_used`` counts value bytes.
    ``hits``/``misses`` count keys asked for by ``get_many`` (and the tensor fast
    path); ``puts`` counts values stored; ``evictions`` entries dropped to make room;
    ``errors`` failed I/O or network operations; ``corrupt`` values that failed
    verification (:class:`~pagedkv.stores.framing.FramedStore`).
    """

    entries: int | None
    bytes_used: int | None
    capacity_bytes: int | None
    hits: int = 0
    misses: int = 0
    puts: int = 0
    evictions: int = 0
    errors: int = 0
    corrupt: int = 0


@runtime_checkable
class BlockStore(Protocol):
    """Bytes keyed by ``str`` keys of ``[0-9A-Za-z._-]``, 1-200 characters.

    Implementations are thread-safe within one process (tiers call them from a
    background thread) and evict least-recently-used entries when a put does not
    fit (a ``get`` counts as a use). An invalid key raises ``ValueError``.
    """

    @property
    def capacity_bytes(self) -> int | None:
        """Byte budget of the store, or ``None`` when something else governs it."""
        ...

    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> int:
        """Store every ``(key, value)``, replacing existing ones; return how many were stored.

        A value that can never fit raises ``ValueError`` before anything is stored.
        """
        ...

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Return each key's value, or ``None`` for a miss, in the order asked."""
        ...

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Return whether each key is present (does not count as a use)."""
        ...

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete the keys; return how many existed."""
        ...

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Iterate the keys that start with ``prefix`` (order unspecified)."""
        ...

    def stats(self) -> StoreStats:
        """Return a snapshot of the counters."""
        ...

    def close(self) -> None:
        """Release resources; the store must not be used afterwards."""
        ...


def check_key(key: object) -> str:
    """Return ``key`` if it is a valid store key, else raise ``ValueError`` naming it."""
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        raise ValueError(
            f"invalid block-store key {key!r}: keys are 1-{MAX_KEY_LEN} characters of "
            "[0-9A-Za-z._-] (hex-encode digests, e.g. digest.hex())"
        )
    return key


def check_keys(keys: Iterable[object]) -> list[str]:
    """Validate every key (see :func:`check_key`) and return them as a list."""
    return [check_key(k) for k in keys]


def check_prefix(prefix: object) -> str:
    """Validate a ``keys(prefix)`` argument: like a key, but may be empty."""
    if not isinstance(prefix, str) or _PREFIX_RE.fullmatch(prefix) is None:
        raise ValueError(
            f"invalid key prefix {prefix!r}: use 0-{MAX_KEY_LEN} characters of [0-9A-Za-z._-]"
        )
    return prefix


def check_items(items: Iterable[tuple[str, Buffer]]) -> list[tuple[str, memoryview]]:
    """Validate ``(key, value)`` pairs; return them with values as flat byte memoryviews."""
    out = []
    for item in items:
        try:
            key, value = item
        except (TypeError, ValueError):
            raise TypeError(f"put_many expects (key, value) pairs, got {item!r:.80}") from None
        check_key(key)
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"value of key {key!r} is {type(value).__name__}; stores hold bytes, "
                "bytearray or memoryview (use tensor.numpy().tobytes() or memoryview)"
            )
        view = memoryview(value)
        if not view.c_contiguous:
            raise ValueError(f"value of key {key!r} is not C-contiguous; copy it first")
        out.append((key, view.cast("B") if view.format != "B" or view.ndim != 1 else view))
    return out


def check_capacity(capacity_bytes: object, who: str) -> int:
    """Return ``capacity_bytes`` if it is a positive int, else raise ``ValueError``."""
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
        raise ValueError(f"{who}: capacity_bytes must be a positive int, got {capacity_bytes!r}")
    if capacity_bytes <= 0:
        raise ValueError(
            f"{who}: capacity_bytes must be > 0, got {capacity_bytes} "
            "(give the byte budget, e.g. 4 << 30 for 4 GiB)"
        )
    return capacity_bytes


def byte_rows(x: Any, n: int, name: str, who: str) -> Any:
    """``x`` (a tensor or array) as a numpy ``uint8 [n, w]`` view with contiguous rows.

    Raises ``ValueError`` naming ``who`` (the calling method) and ``name`` otherwise.
    """
    rows = x.numpy() if hasattr(x, "numpy") else x
    if (
        getattr(rows, "dtype", None) != np.uint8
        or rows.ndim != 2
        or rows.shape[0] != n
        or (rows.shape[1] > 1 and rows.strides[1] != 1)
    ):
        raise ValueError(
            f"{who}: {name} must be uint8 [{n}, w] with contiguous rows, "
            f"got {getattr(rows, 'dtype', type(x).__name__)} {getattr(rows, 'shape', '')}"
        )
    return rows


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


# Query parameters of a store URL whose values are shown as given; any other value may
# be a credential (``?password=``, ``?token=``) and is shown as ``***``.
_SHOWN_QUERY = frozenset(
    {
        "db",
        "protocol",
        "timeout",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "retry_on_timeout",
        "health_check_interval",
        "max_connections",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "decode_responses",
        "encoding",
    }
)


def redact_url(url: str) -> str:
    """``url`` fit to print: a password in it becomes ``***``, and so do query values
    other than known harmless options; a fragment is dropped.

    ``redis://user:pw@host:6379/0?password=pw&db=1`` ->
    ``redis://user:***@host:6379/0?password=***&db=1``. Works on text that is not a
    valid URL too (never raises): everything before the last ``@`` of the part ahead of
    the query is user information, so a password holding ``/`` or ``#`` is hidden whole.
    Text without ``://`` is a path and comes back unchanged. Every repr, log line and
    error message of pagedkv that names a URL goes through it.
    """
    text = str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:  # a path, not a URL: nothing in it is user information
        return text
    hidden = []  # the secrets found, hidden wherever else they appear too
    user_info, at, tail = rest.rpartition("@")
    if at:
        user, colon, password = user_info.partition(":")
        if any(c in user for c in "/?#"):  # not a user name: a password held one of these
            user, colon, password = "", ":", user_info
        hidden.append(password)
        shown = f"{scheme}{sep}{user}{':***' if colon else ''}@"
    else:
        shown, tail = f"{scheme}{sep}", rest
    tail = tail.partition("#")[0]
    path, qmark, query = tail.partition("?")
    shown += path
    if qmark:
        params = []
        for item in query.split("&"):
            name, eq, value = item.partition("=")
            if eq and name.lower() not in _SHOWN_QUERY:
                hidden.append(value)
                value = "***"
            params.append(f"{name}{eq}{value}")
        shown += "?" + "&".join(params)
    # Also where a secret appears elsewhere in the text (a mistyped option); not one of
    # under 4 characters, which would garble the host and port and protects nothing.
    for secret in sorted((h for h in hidden if len(h) >= 4), key=len, reverse=True):
        head, star, rest = shown.partition(":***@")  # keep the marker readable
        shown = head.replace(secret, "***") + star + rest.replace(secret, "***")
    return shown
