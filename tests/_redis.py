"""pytest fixtures around a real, throw-away ``redis-server``.

``redis_server`` (session): a server on a free 127.0.0.1 port with a random
password, no persistence and its own temp dir; ``.url``, ``.port``, ``.password``,
``.kill()`` (SIGKILL), ``.pause()``/``.resume()`` (SIGSTOP/SIGCONT, for timeouts),
``.restart()``. ``redis_url`` (function): the URL, with the database flushed and the
server (re)started if a previous test left it down.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Cluster node ports: clients on [10000, 20000), their cluster bus (+10000) on [20000,
# 30000). The two ranges are disjoint (one node's bus port is never another's client
# port) and below Linux's ephemeral range (32768+), where outgoing connections would
# take ports at random.
_CLUSTER_PORTS = (10000, 20000)
_BUS_OFFSET = 10000


def _free_cluster_port(taken: set[int]) -> int:
    """A port free now, with its cluster bus port, and not in ``taken``."""
    rng = random.Random()
    for _ in range(500):
        port = rng.randrange(*_CLUSTER_PORTS)
        if port in taken:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + _BUS_OFFSET))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _ask(
    port: int,
    password: str,
    command: bytes,
    timeout: float = 0.5,
    tls: ssl.SSLContext | None = None,
) -> bytes:
    """Send AUTH + one inline command over a raw socket (TLS with ``tls``); return the reply."""
    with contextlib.ExitStack() as stack:
        s = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=timeout))
        if tls is not None:
            s = stack.enter_context(tls.wrap_socket(s, server_hostname="127.0.0.1"))
        s.sendall(b"AUTH " + password.encode() + b"\r\n" + command + b"\r\n")
        data = b""
        while data.count(b"\r\n") < 2:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


class RedisServer:
    """A redis-server child process (see the module docstring)."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = _free_port()
        self.password = secrets.token_hex(12)
        self.dir = tempfile.mkdtemp(prefix="pagedkv-redis-")
        self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--requirepass", self.password,
            "--save", "",
            "--appendonly", "no",
            "--dir", self.dir,
            "--daemonize", "no",
            "--logfile", os.path.join(self.dir, "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if b"+PONG" in _ask(self.port, self.password, b"PING"):
                    return
            except OSError:
                pass
            time.sleep(0.02)
        log = _tail(os.path.join(self.dir, "redis.log"))
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")

    def alive(self) -> bool:
        """Whether the server process is running (not killed)."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server (it stays down until :meth:`restart`)."""
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open but nothing answers (timeouts)."""
        if self.alive():
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Kill the server if running and start it again on the same port (data is lost)."""
        self.kill()
        self.start()

    def flush(self) -> None:
        """FLUSHALL."""
        reply = _ask(self.port, self.password, b"FLUSHALL", timeout=5.0)
        if b"+OK" not in reply:
            raise RuntimeError(f"FLUSHALL failed: {reply!r}")

    def stop(self) -> None:
        """Kill the server and remove its directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server():
    """A real redis-server for the session (make test installs the Debian package)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not on PATH: run `make test` (it installs the Debian package) "
            "or `apt-get install redis-server`"
        )
    server = RedisServer(binary)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The server's URL, with the server running and its data flushed."""
    redis_server.resume()
    if not redis_server.alive():
        redis_server.start()
    redis_server.flush()
    return redis_server.url


class RedisClusterNodes:
    """A local Redis Cluster of ``masters`` masters (no replicas) on 127.0.0.1.

    Each node is a :class:`RedisServer`-like child with ``--cluster-enabled yes``, its
    own temp dir (``nodes.conf`` there, so :meth:`restart` brings back the same node),
    one password for clients and for the nodes themselves, no persistence, and
    ``cluster-require-full-coverage no`` (a master down makes only its slots fail).
    ``.url`` is ``redis+cluster://:pw@127.0.0.1:p1,...``; ``.kill(i)`` SIGKILLs node
    ``i``, ``.restart(i)`` starts it again and waits until the cluster is whole.
    ``tls=True``: every port (clients and the cluster bus) is TLS only, with a
    certificate for 127.0.0.1 from a throw-away CA (``openssl`` CLI); ``.url`` is then
    ``rediss+cluster://...?ssl_ca_certs=<ca.crt>``.
    """

    def __init__(self, binary: str, cli: str, masters: int = 3, *, tls: bool = False) -> None:
        self.binary, self.cli = binary, cli
        self.password = secrets.token_hex(12)
        self.ports: list[int] = []
        self.dirs = [tempfile.mkdtemp(prefix="pagedkv-rcluster-") for _ in range(masters)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * masters
        self.tls: ssl.SSLContext | None = None
        self.certs = ""
        try:
            if tls:
                self.certs = _make_certs(self.dirs[0])
                self.tls = ssl.create_default_context(cafile=f"{self.certs}/ca.crt")
            for i in range(masters):
                self._start_new(i)
            hosts = ",".join(f"127.0.0.1:{p}" for p in self.ports)
            self.url = f"redis+cluster://:{self.password}@{hosts}"
            if tls:
                self.url = f"rediss+cluster://:{self.password}@{hosts}"
                self.url += f"?ssl_ca_certs={self.certs}/ca.crt"
            tls_args = ["--tls", "--cacert", f"{self.certs}/ca.crt"] if tls else []
            created = subprocess.run(
                [cli, *tls_args, "-a", self.password, "--no-auth-warning", "--cluster", "create",
                 *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "0",
                 "--cluster-yes"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30,
            )  # fmt: skip
            if created.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed: {created.stderr.decode(errors='replace')}"
                )
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    def _start_new(self, i: int, attempts: int = 5) -> None:
        """Start node ``i`` on a fresh port pair; another port when the chosen one was
        taken between the check and the start (other test runs share the machine)."""
        for attempt in range(attempts):
            port = _free_cluster_port(set(self.ports))
            self.ports.append(port)
            try:
                self.start(i)
                return
            except _NodeExited:
                self.ports.pop()
                if attempt == attempts - 1:
                    raise

    def start(self, i: int, timeout: float = 10.0) -> None:
        """Start node ``i`` (again: same port, same ``nodes.conf``) and wait for PING."""
        port, d = self.ports[i], self.dirs[i]
        if self.tls is None:
            ports = ["--port", str(port)]
        else:
            c = self.certs
            ports = [
                "--port", "0", "--tls-port", str(port), "--tls-cluster", "yes",
                "--tls-cert-file", f"{c}/node.crt", "--tls-key-file", f"{c}/node.key",
                "--tls-ca-cert-file", f"{c}/ca.crt", "--tls-auth-clients", "no",
            ]  # fmt: skip
        args = [
            self.binary,
            *ports,
            "--bind", "127.0.0.1",
            "--requirepass", self.password,
            "--masterauth", self.password,
            "--cluster-enabled", "yes",
            "--cluster-config-file", os.path.join(d, "nodes.conf"),
            "--cluster-node-timeout", "1000",
            "--cluster-require-full-coverage", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", d,
            "--daemonize", "no",
            "--logfile", os.path.join(d, "redis.log"),
        ]  # fmt: skip
        log = os.path.join(d, "redis.log")
        with contextlib.suppress(FileNotFoundError):
            os.remove(log)  # so that a failure shows this start's log only
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs[i] = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise _NodeExited(f"cluster node on port {port} exited:\n{_tail(log)}")
            try:
                if b"+PONG" in _ask(port, self.password, b"PING", tls=self.tls):
                    return
            except OSError:
                pass
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        raise RuntimeError(
            f"cluster node on port {port} did not answer in {timeout} s:\n{_tail(log)}"
        )

    def cluster_state(self, i: int) -> str:
        """``cluster_state`` of node ``i``'s CLUSTER INFO (``ok`` or ``fail``)."""
        reply = _ask(self.ports[i], self.password, b"CLUSTER INFO", timeout=2.0, tls=self.tls)
        for line in reply.decode(errors="replace").splitlines():
            if line.startswith("cluster_state:"):
                return line.split(":", 1)[1].strip()
        return "?"

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Wait until every running node reports ``cluster_state:ok`` (all slots served)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(self.cluster_state(i) == "ok" for i in range(len(self.ports))):
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def alive(self, i: int) -> bool:
        proc = self.procs[i]
        return proc is not None and proc.poll() is None

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (its slots stay uncovered until :meth:`restart`)."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self, i: int) -> None:
        """Start node ``i`` again (its data is gone) and wait until the cluster is whole."""
        self.kill(i)
        self.start(i)
        self.wait_ok()

    def flush(self) -> None:
        """FLUSHALL on every node (each master holds its own slots' keys)."""
        for port in self.ports:
            reply = _ask(port, self.password, b"FLUSHALL", timeout=5.0, tls=self.tls)
            if b"+OK" not in reply:
                raise RuntimeError(f"FLUSHALL on port {port} failed: {reply!r}")

    def dbsize(self, i: int) -> int:
        """Keys held by node ``i``."""
        reply = _ask(self.ports[i], self.password, b"DBSIZE", timeout=2.0, tls=self.tls)
        return int(reply.split(b":")[-1].split(b"\r\n")[0])

    def stop(self) -> None:
        """Kill every node and remove their directories."""
        for i in range(len(self.procs)):
            self.kill(i)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)


class _NodeExited(RuntimeError):
    """A cluster node's process ended while starting (its port taken, most often)."""


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def _make_certs(directory: str) -> str:
    """A throw-away CA and a certificate for 127.0.0.1 signed by it, in ``directory/tls``."""
    d = os.path.join(directory, "tls")
    os.makedirs(d)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=pagedkv-test-ca", "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", "node.key", "-out", "node.csr")  # fmt: skip
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "node.crt")  # fmt: skip
    return d


@pytest.fixture(scope="session")
def redis_cluster_nodes():
    """A real 3-master Redis Cluster for the session (skipped without redis-server and
    redis-cli; ``make test`` installs both)."""
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None:
        pytest.fail(
            "redis-server and redis-cli are not both on PATH: run `make test` (it installs "
            "the Debian packages) or `apt-get install redis-server redis-tools`"
        )
    cluster = RedisClusterNodes(binary, cli)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_nodes):
    """The cluster with every node running, the cluster whole and its data flushed."""
    for i in range(len(redis_cluster_nodes.ports)):
        if not redis_cluster_nodes.alive(i):
            redis_cluster_nodes.start(i)
    redis_cluster_nodes.wait_ok()
    redis_cluster_nodes.flush()
    return redis_cluster_nodes
