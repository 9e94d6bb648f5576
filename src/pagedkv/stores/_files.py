"""Vectored file I/O shared by the file stores (DiskStore, PackStore, atomic writes).

Each helper moves a list of buffers in as few system calls as the kernel allows
(``writev``/``readv``/``preadv``, at most :data:`IOV_MAX` buffers per call) and resumes
after a partial transfer, so a caller never loops over bytes itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence

# Buffers per vectored call: Linux accepts 1024; half keeps every platform happy.
IOV_MAX = 512
# O_NOFOLLOW: a symlink named like an entry is not one (never read through it);
# O_NONBLOCK: opening a FIFO named like one must not hang (it is no entry either).
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NOT_A_FILE = frozenset({errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.ENOTDIR})


def write_all(fd: int, views: list[memoryview]) -> None:
    """``writev`` every view (flat byte views), resuming after partial writes."""
    i = 0
    while i < len(views):
        batch = views[i : i + IOV_MAX]
        done = os.writev(fd, batch)
        for v in batch:
            if done >= len(v):
                done -= len(v)
                i += 1
            else:
                views[i] = v[done:]
                break


def read_exactly(fd: int, parts: Sequence[memoryview], size: int) -> None:
    """Fill ``parts`` (``size`` bytes in all) from ``fd``'s position: one ``readv`` unless
    it falls short. Raises ``OSError`` if the file ends first."""
    got = os.readv(fd, parts)
    if got == size:
        return
    for p in parts:  # a short read: keep what arrived, read the rest part by part
        if got >= len(p):
            got -= len(p)
            continue
        view, got = p[got:], 0
        while len(view):
            step = os.readv(fd, [view])
            if step == 0:
                raise OSError(f"file shrank while being read ({size} bytes expected)")
            view = view[step:]


def preadv_all(fd: int, views: Sequence[memoryview], offset: int) -> int:
    """Fill ``views`` from file ``offset`` on; return the bytes read (less at end of file)."""
    views = list(views)
    i = total = 0
    while i < len(views):
        n = os.preadv(fd, views[i : i + IOV_MAX], offset + total)
        if n == 0:
            break
        total += n
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]
    return total


def pread(path: str, offset: int, length: int, into: memoryview | None = None) -> bytes | None:
    """``length`` bytes of file ``path`` at ``offset`` (read into ``into`` when given, then
    ``b""`` is returned); ``None`` if the file is shorter. Raises ``OSError``."""
    buf = into if into is not None else memoryview(bytearray(length))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if preadv_all(fd, [buf], offset) < length:
            return None
    finally:
        os.close(fd)
    return b"" if into is not None else bytes(buf)


def pread_runs(runs: Sequence[tuple[str, int, list[memoryview]]]) -> list[int]:
    """For each ``(path, offset, views)``: fill ``views`` from that offset of that file
    (:func:`preadv_all`, each file opened once); return the bytes read per run (0 for a
    file that is gone). Raises other ``OSError``."""
    fds: dict[str, int | None] = {}
    got = []
    try:
        for path, offset, views in runs:
            if path not in fds:
                try:
                    fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    fds[path] = None
            fd = fds[path]
            got.append(0 if fd is None else preadv_all(fd, views, offset))
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)
    return got


def open_regular(path: str) -> tuple[int, int] | None:
    """``(fd, size)`` of the regular file at ``path``; ``None`` if there is none (absent,
    or a symlink, FIFO, socket or directory: not a file a store wrote). Other errors
    raise ``OSError``."""
    try:
        fd = os.open(path, _READ)
    except OSError as e:
        if e.errno in _NOT_A_FILE:
            return None
        raise
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st.st_size


def unlink_quietly(path: str) -> None:
    """Remove ``path`` if it can be (a temp file being abandoned); never raises."""
    with contextlib.suppress(OSError):
        os.unlink(path)
