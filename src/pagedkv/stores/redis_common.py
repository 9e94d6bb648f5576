"""What the two Redis stores (:class:`~pagedkv.stores.RedisStore`,
:class:`~pagedkv.stores.RedisClusterStore`) share: option checks, the redis-py import,
error translation (scrubbed of passwords), and :class:`RedisBase`, their common surface
(``key_prefix``, ``url``, ``capacity_bytes``, ``stats()``, context manager, repr).
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from pagedkv._closing import Closing
from pagedkv._forward import read_through
from pagedkv.errors import StoreError, StoreUnavailable
from pagedkv.stores.base import Buffer, Counters, StoreStats, check_items

# Redis rejects bulk strings above proto-max-bulk-len (512 MiB by default).
MAX_VALUE_BYTES = 512 << 20
_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\"})


class RedisBase(Closing):
    """The surface both Redis stores show; a subclass sets ``_prefix``, ``_shown``,
    ``_lock`` and ``_counts`` in its ``__init__`` and defines ``close()``."""

    _prefix: str
    _shown: str
    _lock: threading.Lock
    _counts: Counters

    @property
    def capacity_bytes(self) -> None:
        """Always ``None``: the server's (each master's) ``maxmemory`` governs capacity."""
        return None

    key_prefix: str = read_through("_prefix", "Prefix prepended to every key in Redis.")

    url: str = read_through(
        "_shown", "The URL with any password replaced by ``***`` (safe to print)."
    )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._shown!r}, key_prefix={self._prefix!r})"

    def stats(self) -> StoreStats:
        """Local counters; ``entries``/``bytes_used`` are ``None`` (the server knows).
        ``errors`` counts failed round trips (in a cluster, a master's while others answer)."""
        with self._lock:
            return self._counts.stats(None, None, None)

    @abstractmethod
    def close(self) -> None:
        """Close the connection pool(s)."""


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis ``SCAN MATCH`` pattern."""
    return text.translate(_GLOB_SPECIAL)


def import_redis(who: str) -> Any:
    """The ``redis`` module, or :class:`StoreError` saying how to install it."""
    try:
        import redis
    except ImportError as e:
        raise StoreError(f"{who} needs redis-py: pip install 'pagedkv[redis]'") from e
    return redis


def check_options(
    who: str, password: object, key_prefix: object, socket_timeout: object,
    connect_timeout: object, ttl_seconds: object,
) -> None:  # fmt: skip
    """``ValueError`` naming the first bad one of the options every Redis store takes."""
    if password is not None and not isinstance(password, str):
        raise ValueError(f"{who}: password must be a str or None, got {type(password).__name__}")
    if not isinstance(key_prefix, str):
        raise ValueError(f"{who}: key_prefix must be a str, got {key_prefix!r}")
    for name, t in (("socket_timeout", socket_timeout), ("connect_timeout", connect_timeout)):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
            raise ValueError(f"{who}: {name} must be a positive number of seconds")
    if ttl_seconds is not None and (
        isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0
    ):
        raise ValueError(f"{who}: ttl_seconds must be a positive int or None, got {ttl_seconds!r}")


def check_values(who: str, items: Sequence[tuple[str, Buffer]]) -> list[tuple[str, memoryview]]:
    """:func:`check_items`, and no value above what Redis accepts."""
    checked = check_items(items)
    for key, value in checked:
        if len(value) > MAX_VALUE_BYTES:
            raise ValueError(
                f"{who}: value of key {key!r} is {len(value)} bytes; Redis accepts "
                f"at most {MAX_VALUE_BYTES} (proto-max-bulk-len)"
            )
    return checked


def scrub(text: str, secrets: Sequence[str]) -> str:
    """``text`` with each of ``secrets`` (longest first) replaced by ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def translate_error(
    e: BaseException, what: str, shown: str, key_prefix: str, scrub: Callable[[str], str]
) -> StoreError | None:
    """The pagedkv error to raise for a redis-py (or socket) error ``e`` raised by command
    ``what`` on the server shown as ``shown``; ``None`` when ``e`` is neither (re-raise it).

    A refused command (ACL) or rejected credentials is a :class:`StoreError`, a
    connection problem or timeout :class:`StoreUnavailable`. The caller raises it
    ``from None``: redis-py's own texts hold no password, but the promise is ours to
    keep, so they are scrubbed first and never chained.
    """
    import redis as r

    if not isinstance(e, (r.RedisError, OSError)):
        return None
    text = f"{type(e).__name__}: {scrub(str(e))}"
    if isinstance(e, r.exceptions.NoPermissionError) or "NOPERM" in text:
        return StoreError(
            f"Redis at {shown} refused {what} for this user ({text}); an ACL "
            f"user needs the keys ~{key_prefix}* and the commands pagedkv sends "
            "(see the README, Redis ACLs)"
        )
    if isinstance(e, r.AuthenticationError) or any(
        s in text for s in ("NOAUTH", "WRONGPASS", "invalid password", "invalid username")
    ):
        return StoreError(
            f"Redis at {shown} rejected the credentials during {what} ({text}); "
            "check the password in the URL or the password= argument"
        )
    if isinstance(e, (r.ConnectionError, r.TimeoutError, OSError)):
        return StoreUnavailable(
            f"Redis at {shown} is unavailable ({what} failed: {text}); "
            "is redis-server running and reachable?"
        )
    return StoreError(f"Redis at {shown}: {what} failed ({text})")
