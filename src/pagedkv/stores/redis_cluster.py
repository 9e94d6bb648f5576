"""RedisClusterStore: blocks in a Redis Cluster, one pipeline per master per batch.

redis-py's :class:`redis.cluster.RedisCluster` discovers the cluster (slot map, node
clients, credentials, TLS); this store groups each batch by the master that owns each
key's hash slot and sends one non-transactional pipeline of single-key commands
(``SET``/``GET``/``GETEX``/``EXISTS``/``DEL``) to each. Why not redis-py's
``ClusterPipeline``: it fails the whole batch when one master is unreachable, and
its semantics changed between redis-py 5 and 8. Grouping here keeps the batch
answers of the healthy masters, follows ``MOVED`` (topology refresh, then retry) and
``ASK`` (``ASKING`` + the command at the importing node) redirections, and gives each
master its own health.

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

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pagedkv.errors import StoreError, StoreUnavailable
from pagedkv.stores.base import Counters, StoreStats, check_keys, check_prefix
from pagedkv.stores.cluster_url import parse_cluster_url, shown_nodes
from pagedkv.stores.health import Backoff, log
from pagedkv.stores.redis import (
    Buffer,
    check_options,
    check_values,
    glob_escape,
    import_redis,
    scrub,
    translate_error,
)

# How many rounds of MOVED / ASK redirections one batch follows before its remaining
# keys count as unreachable.
MAX_REDIRECTS = 3


class _Down(Exception):
    """A command whose master could not answer (a miss, or StoreUnavailable)."""


class RedisClusterStore:
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
        self._where = shown_nodes(url)
        if password is not None and not isinstance(password, str):
            raise ValueError(
                f"RedisClusterStore: password must be a str or None, got {type(password).__name__}"
            )
        self._secrets = tuple(sorted({*parsed.secrets, *([password] if password else [])},
                                     key=len, reverse=True))  # fmt: skip
        check_options("RedisClusterStore", key_prefix, socket_timeout, connect_timeout, ttl_seconds)
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
        self._redis = import_redis("RedisClusterStore")
        self._options: dict[str, Any] = dict(parsed.options)
        if password is not None:
            self._options["password"] = password
        self._options.update(
            socket_timeout=float(socket_timeout), socket_connect_timeout=float(connect_timeout)
        )
        self._startup = parsed.nodes
        self._prefix = key_prefix
        self._ttl = ttl_seconds
        self._degrade = degrade
        self._retry = (float(retry_initial_seconds), float(retry_max_seconds))
        self._lock = threading.Lock()
        self._client: Any = None  # the RedisCluster, created by the first operation
        self._health: dict[str, Backoff] = {}
        self._refreshed_at = 0.0
        self._counts = Counters()
        self._closed = False

    @property
    def capacity_bytes(self) -> None:
        """Always ``None``: each master's ``maxmemory`` governs capacity."""
        return None

    @property
    def key_prefix(self) -> str:
        """Prefix prepended to every key in the cluster."""
        return self._prefix

    @property
    def url(self) -> str:
        """The cluster's URL with any password replaced by ``***`` (safe to print)."""
        return self._shown

    def __repr__(self) -> str:
        return f"RedisClusterStore({self._shown!r}, key_prefix={self._prefix!r})"

    def redis_key(self, key: str) -> str:
        """The cluster key of store key ``key`` (hash-tagged if colocated)."""
        for group in self._colocate:
            if key.startswith(group):
                return f"{self._prefix}{{{group}}}{key[len(group) :]}"
        return self._prefix + key

    def ping(self) -> bool:
        """Whether every master answers now; rejected credentials raise :class:`StoreError`."""
        try:
            client = self._cluster("PING")
            self._refresh(client, force=True)
            for node in client.get_primaries():
                self._call_node(client, node, "PING", [("PING",)])
        except StoreUnavailable:
            return False
        return True

    # -- BlockStore ---------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[str, Buffer]]) -> int:
        """SET every value, one pipeline per master; returns how many were stored."""
        checked = check_values("RedisClusterStore", items)
        ex = () if self._ttl is None else ("EX", self._ttl)
        out = self._run("SET", [("SET", self.redis_key(k), v, *ex) for k, v in checked])
        stored = sum(1 for r in out if r is True)
        with self._lock:
            self._counts.puts += stored
        return stored

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """GET (GETEX when a TTL slides) each key; ``None`` for a miss."""
        keys = check_keys(keys)
        ex = () if self._ttl is None else ("EX", self._ttl)
        what = "GET" if self._ttl is None else "GETEX"
        out = self._run(what, [(what, self.redis_key(k), *ex) for k in keys])
        values = [r if isinstance(r, bytes) else None for r in out]
        with self._lock:
            self._counts.reads(sum(v is not None for v in values), len(values))
        return values

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """EXISTS per key (``False`` for a key whose master is down, with ``degrade``)."""
        keys = check_keys(keys)
        return [r is not None and not isinstance(r, _Down) and bool(r) for r in
                self._run("EXISTS", [("EXISTS", self.redis_key(k)) for k in keys])]  # fmt: skip

    def delete_many(self, keys: Sequence[str]) -> int:
        """DEL the keys; returns how many existed (on the masters that answered)."""
        unique = list(dict.fromkeys(check_keys(keys)))
        out = self._run("DEL", [("DEL", self.redis_key(k)) for k in unique])
        return sum(int(r) for r in out if isinstance(r, int))

    def keys(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``key_prefix + prefix``: SCAN of every master (one master for a
        colocated prefix), collected before returning. Any master that cannot be read
        raises :class:`StoreUnavailable`, ``degrade`` or not."""
        prefix = check_prefix(prefix)
        client = self._cluster("SCAN")
        self._refresh(client, force=True)  # list what the cluster holds now, not then
        group = next((g for g in self._colocate if prefix.startswith(g)), None)
        if group is not None:  # one slot: one master
            pattern = glob_escape(self.redis_key(prefix)) + "*"
            nodes = [self._node_of(client, self.redis_key(prefix))]
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
            conn = client.get_redis_connection(node)
            scan = lambda c=conn: list(c.scan_iter(match=pattern, count=1000))  # noqa: E731
            raw = self._guarded("SCAN", scan, shown=node.name)
            found += (self._store_key(k[cut:].decode("utf-8", "replace")) for k in raw)
        return iter([k for k in dict.fromkeys(found) if k.startswith(prefix)])

    def stats(self) -> StoreStats:
        """Local counters; ``entries``/``bytes_used`` are ``None`` (the masters know)."""
        with self._lock:
            return self._counts.stats(None, None, None)

    def close(self) -> None:
        """Close every node's connection pool."""
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> RedisClusterStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------

    def _store_key(self, text: str) -> str:
        if text.startswith("{"):  # a colocated key: "{group}rest"
            group, _, rest = text[1:].partition("}")
            return group + rest
        return text

    def _cluster(self, what: str) -> Any:
        """The RedisCluster client, created (discovering the cluster) on first use."""
        with self._lock:
            if self._closed:
                raise ValueError("RedisClusterStore is closed")
            if self._client is not None:
                return self._client
        from redis.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode(host, port) for host, port in self._startup]
        client = self._guarded(
            what,
            lambda: RedisCluster(startup_nodes=nodes, require_full_coverage=False, **self._options),
        )
        with self._lock:
            if self._client is None and not self._closed:
                self._client = client
                return client
        client.close()  # another thread won, or the store was closed meanwhile
        return self._cluster(what)

    def _node_of(self, client: Any, redis_key: str) -> Any:
        """The master serving ``redis_key``'s slot, or ``None`` when no one does."""
        from redis.crc import key_slot

        try:
            return client.nodes_manager.get_node_from_slot(key_slot(redis_key.encode()))
        except self._redis.exceptions.SlotNotCoveredError:
            return None

    def _refresh(self, client: Any, *, force: bool = False) -> None:
        """Re-read the slot map (at most once per back-off interval unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._refreshed_at < self._retry[0]:
            return
        self._refreshed_at = now
        self._guarded("CLUSTER SLOTS", client.nodes_manager.initialize)

    def _node_health(self, name: str) -> Backoff:
        with self._lock:
            health = self._health.get(name)
            if health is None:
                health = self._health[name] = Backoff(
                    f"{name} of {self._where}", initial_seconds=self._retry[0],
                    max_seconds=self._retry[1], what="Redis Cluster master", logger=log,
                )  # fmt: skip
            return health

    def _run(self, what: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run single-key ``commands`` (key at ``[1]``) one pipeline per master; return
        each reply, or a :class:`_Down` where its master could not answer (``degrade``;
        otherwise that raises :class:`StoreUnavailable`)."""
        if not commands:
            return []
        client = self._cluster(what)
        replies: list[Any] = [_Down()] * len(commands)
        asking: dict[int, Any] = {}  # command -> node it was ASKed to
        todo = list(range(len(commands)))
        down: dict[str, str] = {}  # master -> why
        for _ in range(MAX_REDIRECTS + 1):
            by_node: dict[str, tuple[Any, list[int]]] = {}
            for i in todo:
                node = asking.get(i) or self._node_of(client, commands[i][1])
                if node is None:
                    down["(uncovered slot)"] = "no master serves the slot"
                    continue
                by_node.setdefault(node.name, (node, []))[1].append(i)
            retry, moved = [], False
            for node, idxs in by_node.values():
                got = self._node_replies(client, node, what, [commands[i] for i in idxs],
                                         [i in asking for i in idxs], down)  # fmt: skip
                for i, reply in zip(idxs, got):
                    asking.pop(i, None)
                    if isinstance(reply, self._redis.exceptions.MovedError):
                        retry.append(i)
                        moved = True
                    elif isinstance(reply, self._redis.exceptions.AskError):
                        target = client.get_node(host=reply.host, port=reply.port)
                        moved |= target is None
                        if target is not None:
                            asking[i] = target
                        retry.append(i)
                    else:
                        replies[i] = reply
            if not retry:
                break
            if moved:
                self._refresh(client, force=True)
            todo = retry
        else:
            down["(redirections)"] = f"still redirected after {MAX_REDIRECTS} rounds"
        if down:
            self._after_outage(client, what, down)
        return replies

    def _node_replies(
        self, client: Any, node: Any, what: str, commands: list[tuple[Any, ...]],
        asking: list[bool], down: dict[str, str],
    ) -> list[Any]:  # fmt: skip
        """One master's replies (:class:`_Down` for all when it cannot answer)."""
        r = self._redis.exceptions
        health = self._node_health(node.name) if self._degrade else None
        if health is not None and not health.ready():
            down[node.name] = "in back-off after failing"
            return [_Down()] * len(commands)
        try:
            got = self._call_node(client, node, what, commands, asking)
            trouble = next((x for x in got if isinstance(x, (r.ClusterDownError, r.TryAgainError))),
                           None)  # fmt: skip
            if trouble is not None:
                raise StoreUnavailable(f"{node.name} answered {type(trouble).__name__}")
        except StoreUnavailable as e:
            down[node.name] = str(e)
            with self._lock:
                self._counts.errors += 1
            if health is not None:
                health.failure(e)
            return [_Down()] * len(commands)
        if health is not None:
            health.success()
        for x in got:
            if isinstance(x, Exception) and not isinstance(x, r.AskError):
                raise self._translate(what, x)
        return got

    def _call_node(
        self, client: Any, node: Any, what: str, commands: list[tuple[Any, ...]],
        asking: list[bool] | None = None,
    ) -> list[Any]:  # fmt: skip
        """One pipeline to one node (``ASKING`` before the asked ones); replies in order,
        errors among them as exception objects. Retried once on a dropped connection (a
        restarted node leaves stale pooled sockets); never on a timeout."""
        conn = client.get_redis_connection(node)
        flags = asking or [False] * len(commands)

        def run() -> list[Any]:
            for attempt in (0, 1):
                pipe = conn.pipeline(transaction=False)
                for args, ask in zip(commands, flags):
                    if ask:
                        pipe.execute_command("ASKING")
                    pipe.execute_command(*args)
                try:
                    out = pipe.execute(raise_on_error=False)
                except self._redis.ConnectionError as e:
                    if attempt or isinstance(e, self._redis.AuthenticationError):
                        raise
                    continue
                it = iter(out)
                return [next(it) if not ask else (next(it), next(it))[1] for ask in flags]
            raise AssertionError("unreachable")

        return self._guarded(what, run, shown=node.name)

    def _after_outage(self, client: Any, what: str, down: dict[str, str]) -> None:
        """After a batch some masters could not answer: raise unless ``degrade`` and some
        master is still healthy; refresh the slot map (a failover may have moved them)."""
        with contextlib.suppress(StoreUnavailable):  # all startup nodes down: raised below
            self._refresh(client)
        healthy = [
            n for n in client.get_primaries() if not self._node_health(n.name).down
        ] if self._degrade else []  # fmt: skip
        if self._degrade and healthy:
            return
        names = ", ".join(sorted(down))
        raise StoreUnavailable(
            f"Redis Cluster at {self._shown}: {what} failed on {names}; first: "
            f"{self._scrub(next(iter(down.values())))}"
        )

    def _guarded(self, what: str, fn: Callable[[], Any], *, shown: str | None = None) -> Any:
        """``fn()`` with redis-py's errors turned into pagedkv's (no secret in them);
        ``shown``: the node they name (default: the cluster)."""
        try:
            return fn()
        except Exception as e:
            err = self._translate(what, e, shown)
            if err is e:
                raise
            if isinstance(err, StoreUnavailable):
                with self._lock:
                    self._counts.errors += 1
            raise err from None

    def _translate(self, what: str, e: BaseException, shown: str | None = None) -> BaseException:
        if isinstance(e, (StoreError, ValueError)):
            return e
        if isinstance(e, self._redis.exceptions.RedisClusterException):
            # raised while discovering the cluster; credentials fail as "cannot connect"
            text = self._scrub(str(e))
            if any(
                s in text for s in ("WRONGPASS", "NOAUTH", "invalid username", "invalid password")
            ):
                return StoreError(
                    f"Redis Cluster at {self._shown} rejected the credentials during {what} "
                    f"({text}); check the password in the URL or the password= argument"
                )
            return StoreUnavailable(
                f"Redis Cluster at {self._shown} is unavailable ({what} failed: {text}); "
                "is any of its nodes running and reachable?"
            )
        where = self._shown if shown is None else f"{shown} (of {self._where})"
        err = translate_error(e, what, where, self._prefix, self._scrub)
        return e if err is None else err

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)
