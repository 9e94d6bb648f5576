"""pytest fixtures around a real, throw-away ``redis-server``.

``redis_server`` (session): a server on a free 127.0.0.1 port with a random
password, no persistence and its own temp dir; ``.url``, ``.port``, ``.password``,
``.kill()`` (SIGKILL), ``.pause()``/``.resume()`` (SIGSTOP/SIGCONT, for timeouts),
``.restart()``. ``redis_url`` (function): the URL, with the database flushed and the
server (re)started if a previous test left it down.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask(port: int, password: str, command: bytes, timeout: float = 0.5) -> bytes:
    """Send AUTH + one inline command over a raw socket; return the raw reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
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
        log = self._log_tail()
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

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log")) as f:
                return "".join(f.readlines()[-20:])
        except OSError:
            return "(no log)"


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
