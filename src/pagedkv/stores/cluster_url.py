"""Redis Cluster URLs: ``redis+cluster://[user][:password]@host:port,host:port,...``.

One URL names several startup nodes (any masters or replicas of the cluster; the
client discovers the rest), so it is parsed here rather than by redis-py's one-host
URL parser. ``rediss+cluster://`` is TLS to every node. The path must be empty or
``/0`` (a cluster has only database 0). Query options are the TLS and connection
ones of redis-py (:data:`QUERY_OPTIONS`) plus ``password=``; any other raises
``ValueError`` naming the option (a typo must not be silently ignored). Messages show
the URL through :func:`~pagedkv.stores.locations.redact_url`.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote

# shown_nodes lives with the other ways a URL is shown; importable from here too.
from pagedkv.stores.locations import redact_url
from pagedkv.stores.locations import shown_nodes as shown_nodes

SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_PORT = 6379


def _flag(value: str) -> bool:
    low = value.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


# query option -> how its value is read (passed to redis-py's RedisCluster)
QUERY_OPTIONS: dict[str, Any] = {
    "ssl_ca_certs": str,
    "ssl_ca_path": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_password": str,
    "ssl_cert_reqs": str,
    "ssl_check_hostname": _flag,
    "socket_keepalive": _flag,
    "max_connections": int,
    "protocol": int,
    "client_name": str,
}


class ClusterURL(NamedTuple):
    """A parsed cluster URL: the startup ``nodes`` (host, port), whether to use ``tls``,
    the ``options`` for redis-py (username, password, TLS and connection options), how
    it is ``shown`` (password as ``***``), and the ``secrets`` it holds, as written and
    decoded (to scrub texts of)."""

    nodes: list[tuple[str, int]]
    tls: bool
    options: dict[str, Any]
    shown: str
    secrets: tuple[str, ...]


def parse_cluster_url(url: object, who: str = "RedisClusterStore") -> ClusterURL:
    """Parse ``redis+cluster://`` / ``rediss+cluster://``; ``ValueError`` saying what is
    wrong (never showing the password) and what is expected."""
    expected = "redis+cluster://[:password@]host:port[,host:port...] (rediss+cluster:// for TLS)"
    if not isinstance(url, str):
        raise ValueError(f"{who}: url must be a str like {expected}, got {type(url).__name__}")
    shown = redact_url(url)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise ValueError(f"{who}: url {shown!r} is not a Redis Cluster URL; expected {expected}")
    # as redact_url reads it: everything before the last "@" is user information, so a
    # password holding "/", "?" or "#" is taken whole
    user_info, at, tail = rest.rpartition("@")
    tail = tail.partition("#")[0]
    tail, _, query = tail.partition("?")
    hosts, slash, path = tail.partition("/")
    if slash and path not in ("", "0"):
        raise ValueError(
            f"{who}: url {shown!r} names database /{path}; a Redis Cluster has only database 0"
        )
    options: dict[str, Any] = {}
    secrets = set()
    if at:
        user, colon, password = user_info.partition(":")
        if user:
            options["username"] = unquote(user)
        if colon and password:
            options["password"] = unquote(password)
            secrets |= {password, unquote(password)}
    secrets |= {v for k, _, v in (p.partition("=") for p in query.split("&")) if k == "password"}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "password":
            options["password"] = value
            secrets.add(value)
            continue
        parser = QUERY_OPTIONS.get(name)
        if parser is None:
            raise ValueError(
                f"{who}: url {shown!r} has unknown option {name!r}; known: "
                f"password, {', '.join(QUERY_OPTIONS)}"
            )
        try:
            options[name] = parser(value)
        except ValueError:
            raise ValueError(f"{who}: url {shown!r}: bad value for option {name!r}") from None
    nodes = [_host_port(h, shown, who) for h in hosts.split(",")]
    tls = scheme.lower() == "rediss+cluster"
    if tls:
        options["ssl"] = True
    found = tuple(sorted((x for x in secrets if x), key=len, reverse=True))
    return ClusterURL(nodes, tls, options, shown, found)


def _host_port(text: str, shown: str, who: str) -> tuple[str, int]:
    """``host:port``, ``host`` (port 6379) or ``[v6addr]:port``."""
    if text.startswith("["):
        host, close, tail = text[1:].partition("]")
        if not close or (tail and not tail.startswith(":")):
            raise ValueError(f"{who}: url {shown!r}: bad IPv6 node address {text!r}")
        port_text = tail[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(
            f"{who}: url {shown!r} has an empty node address; list nodes as host:port,host:port"
        )
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{who}: url {shown!r}: the port of node {host!r} must be 1-65535")
    return host, int(port_text)
