"""RedisStore: blocks in a shared Redis server, one round trip per batch.

Keys are ``key_prefix + key``. Capacity and eviction belong to the server
(configure ``maxmemory`` and ``maxmemory-policy allkeys-lru``); ``ttl_seconds``
adds a sliding expiry (reset on every hit). Every connection problem surfaces as
:class:`~pagedkv.errors.StoreUnavailable` after at most about two socket timeouts,
so a tier can back off and treat the store as missing.

Credentials (a password in the URL, in its query, or ``password=``) never appear in
a repr, log line or error message: the store is shown by
:func:`~pagedkv.stores.base.redact_url`, and server error texts are scrubbed of them.
The commands sent are ``PING``, ``SET`` (``EX``), ``MGET``, ``GETEX``, ``EXISTS``,
``DEL`` and ``SCAN`` (plus ``AUTH``/``HELLO``/``CLIENT SETINFO``/``SELECT`` when
connecting), all on keys under ``key_prefix``: a Redis ACL user limited to
``~<key_prefix>*`` and these commands is enough (README, "Redis ACLs").
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from pagedkv.errors import StoreUnavailable
from pagedkv.stores.base import Buffer, Counters, check_keys, check_prefix, redact_url
from pagedkv.stores.redis_common import (
    RedisBase,
    check_options,
    check_values,
    glob_escape,
    import_redis,
    scrub,
    translate_error,
)

T = TypeVar("T")


def _check_url(url: object) -> tuple[str, str]:
    """Validate a redis URL; return (url, a printable form without the password)."""
    if not isinstance(url, str):
        raise ValueError(
            f"RedisStore: url must be a str like redis://host:6379/0, got {type(url).__name__}"
        )
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise ValueError(
            f"RedisStore: malformed url {shown!r} ({e}); expected redis://host:6379/0"
        ) from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(
            f"RedisStore: url scheme {parts.scheme!r} is not supported; use "
            "redis://[:password@]host[:port][/db] or rediss:// for TLS"
        )
    if not parts.hostname:
        raise ValueError(f"RedisStore: url {shown!r} has no host; expected redis://host:6379/0")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"RedisStore: the database in url {shown!r} must be a number (/0, /1...)")
    return url, shown


def _without_password(url: str) -> str:
    """``url`` minus its password (user information and ``?password=``)."""
    parts = urlsplit(url)
    user, _, hostport = parts.netloc.rpartition("@")
    user = user.partition(":")[0]
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "password"])
    netloc = f"{user}@{hostport}" if user else hostport
    return parts._replace(netloc=netloc, query=query).geturl()


def url_passwords(url: str, password: str | None) -> tuple[str, ...]:
    """Every password the store may send, as written and decoded (to scrub texts of)."""
    parts = urlsplit(url)
    found = [password, parts.password]
    found += [v for k, v in parse_qsl(parts.query) if k == "password"]
    found += [
        v for k, _, v in (p.partition("=") for p in parts.query.split("&")) if k == "password"
    ]
    out = {p for p in found if p}
    out |= {unquote(p) for p in out}
    return tuple(sorted(out, key=len, reverse=True))


class RedisStore(RedisBase):
    """Block store in Redis; construction never connects (see :meth:`ping`).

    ``url``: ``redis://[user][:password]@host[:port][/db]`` or ``rediss://`` (TLS).
    A bad scheme or URL raises ``ValueError``. ``password`` overrides the URL's.
    ``key_prefix`` is put in front of every key (give each application its own, and
    an ACL user limited to it: see the module docstring).
    ``socket_timeout``/``connect_timeout`` bound every round trip; a connection
    error or timeout raises :class:`StoreUnavailable`, a rejected password
    :class:`StoreError`. ``capacity_bytes`` is ``None``: the server's ``maxmemory``
    governs, and ``stats()`` reports ``entries``/``bytes_used`` as ``None``.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "pagedkv:",
        password: str | None = None,
        socket_timeout: float = 2.0,
        connect_timeout: float = 2.0,
        ttl_seconds: int | None = None,
    ) -> None:
        url, self._shown = _check_url(url)
        check_options(
            "RedisStore", password, key_prefix, socket_timeout, connect_timeout, ttl_seconds
        )
        self._secrets = url_passwords(url, password)
        redis = import_redis("RedisStore")
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._prefix = key_prefix
        self._ttl = ttl_seconds
        kw: dict[str, Any] = {
            "socket_timeout": float(socket_timeout),
            "socket_connect_timeout": float(connect_timeout),
        }
        if password is not None:  # redis-py lets the URL win; drop the URL's password
            url = _without_password(url)
            kw["password"] = password
        try:
            self._client = redis.Redis.from_url(url, **kw)
        except ValueError as e:  # a bad query option; the text names the option only
            raise ValueError(f"RedisStore: url {self._shown!r}: {self._scrub(str(e))}") from None
        # One immediate retry on a dropped connection (a server restart leaves stale
        # pooled sockets), none on timeouts: the tier layer owns back-off.
        self._client.set_retry(Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)))
        self._lock = threading.Lock()
        self._counts = Counters()
        self._closed = False

    def ping(self) -> bool:
        """Whether the server answers now; a rejected password raises :class:`StoreError`."""
        try:
            return bool(self._call("PING", self._client.ping))
        except StoreUnavailable:
            return False

    # -- BlockStore ---------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> int:
        """SET every value in one pipelined round trip (with the TTL, if any)."""
        checked = check_values("RedisStore", items)
        if not checked:
            return 0

        def run() -> None:
            pipe = self._client.pipeline(transaction=False)
            for key, value in checked:
                pipe.set(self._prefix + key, value, ex=self._ttl)
            pipe.execute()

        self._call("SET", run)
        with self._lock:
            self._counts.puts += len(checked)
        return len(checked)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """MGET the keys (GETEX in one pipeline when a TTL slides)."""
        keys = check_keys(keys)
        if not keys:
            return []
        full = [self._prefix + k for k in keys]
        out: list[Any]  # bytes or None: the client does not decode responses
        if self._ttl is None:
            out = self._call("MGET", lambda: self._client.mget(full))
        else:

            def run() -> list[Any]:
                pipe = self._client.pipeline(transaction=False)
                for k in full:
                    pipe.getex(k, ex=self._ttl)
                return pipe.execute()

            out = self._call("GETEX", run)
        with self._lock:
            self._counts.reads(sum(v is not None for v in out), len(out))
        return list(out)

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """EXISTS per key, pipelined."""
        keys = check_keys(keys)
        if not keys:
            return []

        def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._prefix + k)
            return pipe.execute()

        return [bool(n) for n in self._call("EXISTS", run)]

    def delete_many(self, keys: Sequence[str]) -> int:
        """DEL the keys; return how many existed."""
        keys = check_keys(keys)
        if not keys:
            return 0
        unique = list(dict.fromkeys(self._prefix + k for k in keys))
        return int(self._call("DEL", lambda: self._client.delete(*unique)))

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``key_prefix + prefix``, found with SCAN (collected before returning)."""
        prefix = check_prefix(prefix)
        pattern = glob_escape(self._prefix) + prefix + "*"
        cut = len(self._prefix.encode())

        def run() -> list[str]:
            it = self._client.scan_iter(match=pattern, count=1000)
            return [k[cut:].decode("utf-8", "replace") for k in it]

        return iter(self._call("SCAN", run))

    def close(self) -> None:
        """Close the connection pool."""
        if not self._closed:
            self._closed = True
            self._client.close()

    # -- internals ----------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        if self._closed:
            raise ValueError("RedisStore is closed")
        try:
            return fn()
        except Exception as e:
            err = translate_error(e, what, self._shown, self._prefix, self._scrub)
            if err is None:
                raise
            with self._lock:
                self._counts.errors += 1
            raise err from None

    def _scrub(self, text: str) -> str:
        """``text`` with every password this store knows replaced by ``***``."""
        return scrub(text, self._secrets)
