"""The ``/metrics`` HTTP endpoint: prometheus_client's server, on loopback by default.

The endpoint has no authentication and no TLS, so it listens on 127.0.0.1 unless told
otherwise: a non-loopback address (``addr="0.0.0.0"`` for every interface) is used only
when passed explicitly, and is logged as a warning.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from typing import Any

from pagedkv._closing import Closing
from pagedkv.metrics.collector import FEATURE, Registration, prometheus_client, register

logger = logging.getLogger("pagedkv.metrics")

LOOPBACK = "127.0.0.1"


class MetricsServer(Closing):
    """A running endpoint: ``url`` (``http://addr:port/metrics``), ``addr``, ``port`` (the
    bound one: a request for port 0 gets a free port), and ``close()`` (idempotent; also
    unregisters what :func:`serve_for` registered). A context manager."""

    def __init__(
        self, httpd: Any, thread: threading.Thread, addr: str,
        registration: Registration | None = None,
    ) -> None:  # fmt: skip
        self._httpd, self._thread = httpd, thread
        self.addr = addr
        self.port: int = httpd.server_port
        host = f"[{addr}]" if ":" in addr else addr
        self.url = f"http://{host}:{self.port}/metrics"
        self.registration = registration
        self._closed = False

    def close(self) -> None:
        """Stop serving (waits for the server thread) and free the port."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)
        if self.registration is not None:
            self.registration.unregister()

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"MetricsServer({self.url!r}{', closed' if self._closed else ''})"


def serve(port: int, addr: str = LOOPBACK, registry: Any = None) -> MetricsServer:
    """Serve ``registry`` (default: prometheus_client's global ``REGISTRY``) on
    ``http://addr:port/metrics`` from a daemon thread; returns the running server.

    ``port``: 0-65535 (0: a free port, see ``MetricsServer.port``). ``addr``: an IP
    address (or ``"localhost"``); loopback by default — anything else exposes the
    metrics, unauthenticated, to whoever can reach it, so it must be asked for
    explicitly. Bad arguments raise ``TypeError``/``ValueError``; a port in use an
    ``OSError`` saying so.
    """
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int in 0-65535 (0: any free port), got {port!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0-65535 (0: any free port), got {port}")
    loopback = _check_addr(addr)
    if registry is None:
        registry = prometheus_client.REGISTRY
    if not isinstance(registry, prometheus_client.CollectorRegistry):
        raise TypeError(f"registry must be a prometheus_client CollectorRegistry, got {registry!r}")
    try:
        httpd, thread = prometheus_client.start_http_server(port, addr=addr, registry=registry)
    except OSError as e:
        raise OSError(
            e.errno, f"{FEATURE}: cannot listen on {addr}:{port}: {e.strerror or e} "
            "(pick another port, or 0 for a free one)",
        ) from None  # fmt: skip
    server = MetricsServer(httpd, thread, addr)
    if not loopback:
        logger.warning("serving metrics unauthenticated on %s (not loopback)", server.url)
    return server


def serve_for(
    obj: object, port: int, addr: str = LOOPBACK, *, registry: Any = None, **options: Any
) -> MetricsServer:
    """:func:`register` ``obj`` (``options``: its keyword arguments) and :func:`serve`
    its registry: what ``pagedkv demo --metrics-port N`` does. ``close()`` on the result
    stops the server and unregisters ``obj``; nothing is left registered on error."""
    if registry is None:
        registry = prometheus_client.REGISTRY
    registration = register(obj, registry, **options)
    try:
        server = serve(port, addr, registry)
    except BaseException:
        registration.unregister()
        raise
    server.registration = registration
    return server


def _check_addr(addr: object) -> bool:
    """Whether ``addr`` is a loopback address; ``TypeError``/``ValueError`` unless it is an
    IP address or ``"localhost"`` (no host names: what they resolve to can change)."""
    if not isinstance(addr, str):
        raise TypeError(f"addr must be an IP address as a str, got {type(addr).__name__}")
    if addr == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise ValueError(
            f"addr must be an IP address such as '127.0.0.1' (default), '::1', or '0.0.0.0' "
            f"to listen on every interface; got {addr!r}"
        ) from None
    return ip.is_loopback
