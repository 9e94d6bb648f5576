"""RedisClusterStore: blocks in a Redis Cluster, one pipeline per master per batch.

Every operation is single-key commands (``SET``/``GET``/``GETEX``/``EXISTS``/``DEL``),
one non-transactional pipeline per master per batch, through redis-py's
:class:`redis.cluster.RedisCluster` (:mod:`pagedkv.stores.cluster_masters`: grouping
by slot, redirections, each master's health).

Key layout: ``key_prefix + key``, so keys spread over every slot (a cluster has no
multi-key operation we need: every command touches one key). Keys that start with
one of the ``colocate`` prefixes are stored as ``key_prefix + "{" + group + "}" +
rest`` (a hash tag): all of them live in one slot, so listing them reads one master.
A snapshot store colocates its manifests, leases and gc markers (``snap.``): see
:mod:`pagedkv.snapshot.backends` for what this does and does not guarantee.

Unreachable masters (``degrade``): a cache tier passes ``degrade=True``: the keys of
a master that is down (connection refused, timeout, ``CLUSTERDOWN``, its slots not
covered) are misses, a put to it stores nothing, and the master is skipped without
I/O until its back-off ends (:class:`~pagedkv.stores.health.Backoff`: logged once on
``pagedkv.stores`` when it goes, once when it comes back; a topology refresh runs
first, so a replica promoted meanwhile takes its slots). Only when every master is
down does a call raise :class:`~pagedkv.errors.StoreUnavailable` (the tier then backs
off as for one Redis). With ``degrade=False`` (the default, what a snapshot store
needs) any master down raises :class:`StoreUnavailable`. ``keys()`` always needs
every master it lists (a partial listing would mislead a gc) and raises otherwise.

Credentials never appear in a repr, log line or error message (as for
:class:`~pagedkv.stores.RedisStore`). Commands sent: those above, ``SCAN``, ``PING``,
``CLUSTER SLOTS`` (discovery), ``ASKING``, plus the connection handshake.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

from pagedkv.errors import StoreUnavailable
from pagedkv.stores.base import Buffer, Counters, check_keys, check_prefix
from pagedkv.stores.cluster_masters import Down, Masters
from pagedkv.stores.cluster_url import parse_cluster_url
from pagedkv.stores.health import Backoff
from pagedkv.stores.locations import shown_nodes
from pagedkv.stores.redis_common import (
    RedisBase,
    check_options,
    check_values,
    glob_escape,
    import_redis,
)


class RedisClusterStore(RedisBase):
    """Block store in a Redis Cluster; construction never connects (see the module
    docstring for the key layout and what happens when a master is down).

    ``url``: ``redis+cluster://[user][:password]@host:port[,host:port...]`` (startup
    nodes; the rest are discovered) or ``rediss+cluster://`` (TLS; ``?ssl_ca_certs=``
    and the other options of :mod:`pagedkv.stores.cluster_url`). ``password``
    overrides the URL's. ``key_prefix`` must not hold ``{`` or ``}`` (it would make a
    hash tag: every key in one slot). ``socket_timeout``/``connect_timeout`` bound
    each round trip; ``ttl_seconds`` adds a sliding expiry. ``degrade``: treat the keys
    of an unreachable master as missing (a cache) instead of raising; its back-off
    starts at ``retry_initial_seconds`` and doubles up to ``retry_max_seconds``.
    ``colocate``: key prefixes whose keys share one hash slot.
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
        degrade: bool = False,
        retry_initial_seconds: float = 0.5,
        retry_max_seconds: float = 30.0,
        colocate: Sequence[str] = (),
    ) -> None:
        parsed = parse_cluster_url(url)
        self._shown = parsed.shown
        check_options(
            "RedisClusterStore", password, key_prefix, socket_timeout, connect_timeout, ttl_seconds
        )
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError(
                f"RedisClusterStore: key_prefix {key_prefix!r} holds a brace; in a cluster "
                "{...} is a hash tag that would put every key in one slot (one master)"
            )
        if not isinstance(degrade, bool):
            raise TypeError(f"RedisClusterStore: degrade must be a bool, got {degrade!r}")
        Backoff("check", initial_seconds=retry_initial_seconds, max_seconds=retry_max_seconds)
        if isinstance(colocate, str):
            raise TypeError("RedisClusterStore: colocate is a list of key prefixes, not a str")
        self._colocate = tuple(check_prefix(p) for p in colocate)
        if "" in self._colocate:
            raise ValueError("RedisClusterStore: a colocate prefix must not be empty")
        import_redis("RedisClusterStore")
        options: dict[str, Any] = dict(parsed.options)
        if password is not None:
            options["password"] = password
        options.update(
            socket_timeout=float(socket_timeout), socket_connect_timeout=float(connect_timeout)
        )
        secrets = {*parsed.secrets, *([password] if password else [])}
        self._prefix = key_prefix
        self._ttl = ttl_seconds
        self._lock = threading.Lock()
        self._counts = Counters()
        self._masters = Masters(
            parsed.nodes, options, shown=parsed.shown, where=shown_nodes(url),
            secrets=tuple(sorted(secrets, key=len, reverse=True)), key_prefix=key_prefix,
            degrade=degrade, retry=(float(retry_initial_seconds), float(retry_max_seconds)),
            on_error=self._count_error,
        )  # fmt: skip

    @property
    def masters(self) -> Masters:
        """The cluster's masters (topology, health), for tools and tests."""
        return self._masters

    def redis_key(self, key: str) -> str:
        """The cluster key of store key ``key`` (hash-tagged if colocated)."""
        for group in self._colocate:
            if key.startswith(group):
                return f"{self._prefix}{{{group}}}{key[len(group) :]}"
        return self._prefix + key

    def node_of(self, key: str) -> Any:
        """The master (a redis-py ``ClusterNode``) serving store key ``key`` now, or
        ``None`` when no master serves its slot."""
        return self._masters.node_of(self._masters.client("CLUSTER SLOTS"), self.redis_key(key))

    def ping(self) -> bool:
        """Whether every master answers now; rejected credentials raise :class:`StoreError`."""
        m = self._masters
        try:
            client = m.client("PING")
            m.refresh(client, force=True)
            for node in client.get_primaries():
                m.call(client, node, "PING", [("PING",)])
        except StoreUnavailable:
            return False
        return True

    # -- BlockStore ---------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> int:
        """SET every value, one pipeline per master; returns how many were stored."""
        checked = check_values("RedisClusterStore", items)
        ex = () if self._ttl is None else ("EX", self._ttl)
        out = self._masters.run("SET", [("SET", self.redis_key(k), v, *ex) for k, v in checked])
        stored = sum(1 for r in out if r is True)
        with self._lock:
            self._counts.puts += stored
        return stored

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """GET (GETEX when a TTL slides) each key; ``None`` for a miss."""
        keys = check_keys(keys)
        ex = () if self._ttl is None else ("EX", self._ttl)
        what = "GET" if self._ttl is None else "GETEX"
        out = self._masters.run(what, [(what, self.redis_key(k), *ex) for k in keys])
        values = [r if isinstance(r, bytes) else None for r in out]
        with self._lock:
            self._counts.reads(sum(v is not None for v in values), len(values))
        return values

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """EXISTS per key (``False`` for a key whose master is down, with ``degrade``)."""
        keys = check_keys(keys)
        out = self._masters.run("EXISTS", [("EXISTS", self.redis_key(k)) for k in keys])
        return [not isinstance(r, Down) and bool(r) for r in out]

    def delete_many(self, keys: Sequence[str]) -> int:
        """DEL the keys; returns how many existed (on the masters that answered)."""
        unique = list(dict.fromkeys(check_keys(keys)))
        out = self._masters.run("DEL", [("DEL", self.redis_key(k)) for k in unique])
        return sum(int(r) for r in out if isinstance(r, int))

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``key_prefix + prefix``: SCAN of every master (one master for a
        colocated prefix), collected before returning. Any master that cannot be read
        raises :class:`StoreUnavailable`, ``degrade`` or not."""
        prefix = check_prefix(prefix)
        m = self._masters
        client = m.client("SCAN")
        m.refresh(client, force=True)  # list what the cluster holds now, not then
        group = next((g for g in self._colocate if prefix.startswith(g)), None)
        if group is not None:  # one slot: one master
            pattern = glob_escape(self.redis_key(prefix)) + "*"
            nodes = [m.node_of(client, self.redis_key(prefix))]
            if nodes[0] is None:
                raise StoreUnavailable(
                    f"Redis Cluster at {self._shown}: no master serves the slot of {group!r}"
                )
        else:
            loose = any(g.startswith(prefix) for g in self._colocate)
            pattern = glob_escape(self._prefix) + ("" if loose else prefix) + "*"
            nodes = client.get_primaries()
        cut = len(self._prefix.encode())
        found: list[str] = []
        for node in nodes:
            found += (_store_key(k[cut:].decode("utf-8", "replace")) for k in
                      m.scan(client, node, pattern))  # fmt: skip
        return iter([k for k in dict.fromkeys(found) if k.startswith(prefix)])

    def close(self) -> None:
        """Close every node's connection pool."""
        self._masters.close()

    def _count_error(self) -> None:
        with self._lock:
            self._counts.errors += 1


def _store_key(text: str) -> str:
    """The store key of a cluster key (``key_prefix`` cut off): a colocated key
    ``{group}rest`` is ``group + rest``."""
    if text.startswith("{"):
        group, _, rest = text[1:].partition("}")
        return group + rest
    return text
