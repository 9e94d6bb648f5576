"""The masters of a Redis Cluster, as :class:`~pagedkv.stores.RedisClusterStore` drives
them: who serves a key, one pipeline per master per batch, each master's health.

redis-py's :class:`redis.cluster.RedisCluster` discovers the cluster (slot map, node
clients, credentials, TLS); :meth:`Masters.run` groups single-key commands by the
master owning each key's hash slot and sends one non-transactional pipeline to each.
Why not redis-py's ``ClusterPipeline``: it fails the whole batch when one master is
unreachable, and its semantics changed between redis-py 5 and 8. Here the replies of
the healthy masters are kept, ``MOVED`` (a topology refresh, then a retry) and ``ASK``
(``ASKING`` + the command at the importing node) are followed, and with ``degrade``
each master has its own back-off (:class:`~pagedkv.stores.health.Backoff`, logged on
``pagedkv.stores``), so a master that is down is skipped without I/O until its retry.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from pagedkv.errors import StoreError, StoreUnavailable
from pagedkv.stores.health import Backoff, log
from pagedkv.stores.redis_common import scrub, translate_error

# Rounds of MOVED / ASK redirections one batch follows before its remaining keys count
# as unreachable.
MAX_REDIRECTS = 3


class Down(Exception):
    """The reply of a command whose master could not answer (a miss with ``degrade``)."""


DOWN = Down()
# In the outage notes of a batch: some master failed just now (not only skipped).
_FAILED = "(failed now)"


class Masters:
    """The cluster behind one store; the client is created (the cluster discovered) by
    the first operation, never at construction.

    ``nodes``: startup ``(host, port)`` pairs; ``options``: redis-py connection options;
    ``shown``/``where``: the URL as printed (with and without user information);
    ``secrets``: texts to scrub from every message; ``key_prefix``: for ACL messages;
    ``degrade``/``retry``: see :class:`~pagedkv.stores.RedisClusterStore`;
    ``on_error()``: called for each failed round trip (the store counts them).
    """

    def __init__(
        self, nodes: list[tuple[str, int]], options: dict[str, Any], *, shown: str, where: str,
        secrets: tuple[str, ...], key_prefix: str, degrade: bool, retry: tuple[float, float],
        on_error: Callable[[], None],
    ) -> None:  # fmt: skip
        import redis

        self._redis = redis
        self._nodes, self._options = nodes, options
        self._shown, self._where, self._secrets = shown, where, secrets
        self._prefix, self._degrade, self._retry = key_prefix, degrade, retry
        self._on_error = on_error
        self._lock = threading.Lock()
        self._client: Any = None
        self._health: dict[str, Backoff] = {}
        self._refreshed_at = 0.0
        self._closed = False

    # -- topology -------------------------------------------------------------------

    def client(self, what: str) -> Any:
        """The RedisCluster client, created (discovering the cluster) on first use."""
        with self._lock:
            if self._closed:
                raise ValueError("RedisClusterStore is closed")
            if self._client is not None:
                return self._client
        from redis.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode(host, port) for host, port in self._nodes]
        client = self.guarded(
            what,
            lambda: RedisCluster(startup_nodes=nodes, require_full_coverage=False, **self._options),
        )
        with self._lock:
            if self._client is None and not self._closed:
                self._client = client
                return client
        client.close()  # another thread won, or the store was closed meanwhile
        return self.client(what)

    def node_of(self, client: Any, redis_key: str) -> Any:
        """The master serving ``redis_key``'s slot, or ``None`` when no one does."""
        from redis.crc import key_slot

        try:
            return client.nodes_manager.get_node_from_slot(key_slot(redis_key.encode()))
        except self._redis.exceptions.SlotNotCoveredError:
            return None

    def refresh(self, client: Any, *, force: bool = False) -> None:
        """Re-read the slot map (at most once per back-off interval unless ``force``)."""
        now = time.monotonic()
        if not force and now - self._refreshed_at < self._retry[0]:
            return
        self._refreshed_at = now
        self.guarded("CLUSTER SLOTS", client.nodes_manager.initialize)

    def scan(self, client: Any, node: Any, pattern: str) -> list[bytes]:
        """Every key of ``node`` matching ``pattern`` (SCAN)."""
        conn = client.get_redis_connection(node)
        return self.guarded(
            "SCAN", lambda: list(conn.scan_iter(match=pattern, count=1000)), shown=node.name
        )

    def close(self) -> None:
        """Close every node's connection pool; later operations raise ``ValueError``."""
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- batches --------------------------------------------------------------------

    def run(self, what: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run single-key ``commands`` (the key at ``[1]``), one pipeline per master;
        return each reply, or :data:`DOWN` where its master could not answer (with
        ``degrade``; without it, or when every master is down, that raises
        :class:`StoreUnavailable`)."""
        if not commands:
            return []
        client = self.client(what)
        replies: list[Any] = [DOWN] * len(commands)
        asking: dict[int, Any] = {}  # command -> node it was ASKed to
        todo = list(range(len(commands)))
        down: dict[str, str] = {}  # master -> why
        exc = self._redis.exceptions
        for _ in range(MAX_REDIRECTS + 1):
            by_node: dict[str, tuple[Any, list[int]]] = {}
            for i in todo:
                node = asking.get(i) or self.node_of(client, commands[i][1])
                if node is None:
                    down["(uncovered slot)"] = "no master serves the slot"
                    continue
                by_node.setdefault(node.name, (node, []))[1].append(i)
            retry, moved = [], False
            for node, idxs in by_node.values():
                got = self._replies(client, node, what, [commands[i] for i in idxs],
                                    [i in asking for i in idxs], down)  # fmt: skip
                for i, reply in zip(idxs, got):
                    asking.pop(i, None)
                    if isinstance(reply, exc.MovedError):  # a MovedError is an AskError too
                        retry.append(i)
                        moved = True
                    elif isinstance(reply, exc.AskError):
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
                self.refresh(client, force=True)
            todo = retry
        else:
            down["(redirections)"] = f"still redirected after {MAX_REDIRECTS} rounds"
        if down:
            self._after_outage(client, what, down)
        return replies

    def call(
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

        return self.guarded(what, run, shown=node.name)

    def _replies(
        self, client: Any, node: Any, what: str, commands: list[tuple[Any, ...]],
        asking: list[bool], down: dict[str, str],
    ) -> list[Any]:  # fmt: skip
        """One master's replies (:data:`DOWN` for all when it cannot answer)."""
        exc = self._redis.exceptions
        health = self._node_health(node.name) if self._degrade else None
        if health is not None and not health.ready():
            down.setdefault(node.name, "in back-off after failing")
            return [DOWN] * len(commands)
        try:
            got = self.call(client, node, what, commands, asking)
            trouble = next(
                (x for x in got if isinstance(x, (exc.ClusterDownError, exc.TryAgainError))), None
            )
            if trouble is not None:
                self._on_error()
                raise StoreUnavailable(f"{node.name} answered {type(trouble).__name__}")
        except StoreUnavailable as e:
            down[node.name] = str(e)
            down[_FAILED] = ""
            if health is not None:
                health.failure(e)
            return [DOWN] * len(commands)
        if health is not None:
            health.success()
        for x in got:
            if isinstance(x, Exception) and not isinstance(x, exc.AskError):
                raise self._translate(what, x)
        return got

    def _node_health(self, name: str) -> Backoff:
        with self._lock:
            health = self._health.get(name)
            if health is None:
                health = self._health[name] = Backoff(
                    f"{name} of {self._where}", initial_seconds=self._retry[0],
                    max_seconds=self._retry[1], what="Redis Cluster master", logger=log,
                )  # fmt: skip
            return health

    def _after_outage(self, client: Any, what: str, down: dict[str, str]) -> None:
        """Some masters could not answer a batch: after a fresh failure (not a skip in
        back-off) refresh the slot map (a failover may have moved their slots), then
        raise unless ``degrade`` and a master is healthy."""
        if down.pop(_FAILED, None) is not None:
            with contextlib.suppress(StoreUnavailable):  # no startup node answers: see below
                self.refresh(client)
        if self._degrade and any(
            not self._node_health(n.name).down for n in client.get_primaries()
        ):
            return
        raise StoreUnavailable(
            f"Redis Cluster at {self._shown}: {what} failed on {', '.join(sorted(down))}; "
            f"first: {scrub(next(iter(down.values())), self._secrets)}"
        )

    # -- errors ---------------------------------------------------------------------

    def guarded(self, what: str, fn: Callable[[], Any], *, shown: str | None = None) -> Any:
        """``fn()`` with redis-py's errors turned into pagedkv's (no secret in them);
        ``shown``: the node they name (default: the cluster)."""
        try:
            return fn()
        except Exception as e:
            err = self._translate(what, e, shown)
            if err is e:
                raise
            if isinstance(err, StoreUnavailable):
                self._on_error()
            raise err from None

    def _translate(self, what: str, e: BaseException, shown: str | None = None) -> BaseException:
        if isinstance(e, (StoreError, ValueError)):
            return e
        scrubbed = scrub(str(e), self._secrets)
        if isinstance(e, self._redis.exceptions.RedisClusterException):
            # raised while discovering the cluster; credentials fail as "cannot connect"
            if any(s in scrubbed for s in ("WRONGPASS", "NOAUTH", "invalid username")):
                return StoreError(
                    f"Redis Cluster at {self._shown} rejected the credentials during {what} "
                    f"({scrubbed}); check the password in the URL or the password= argument"
                )
            return StoreUnavailable(
                f"Redis Cluster at {self._shown} is unavailable ({what} failed: {scrubbed}); "
                "is any of its nodes running and reachable?"
            )
        where = self._shown if shown is None else f"{shown} (of {self._where})"
        err = translate_error(e, what, where, self._prefix, lambda t: scrub(t, self._secrets))
        return e if err is None else err
