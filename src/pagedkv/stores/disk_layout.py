"""The on-disk layout of a :class:`~pagedkv.stores.DiskStore`: which names are its own.

An entry of key ``k`` is the regular file ``<root>/<fan_of(k)>/<k>.v``. Fan folders are
named by 2-3 characters of ``[0-9A-Za-z_-]``; a regular file there whose key fans to
that folder is an entry (whoever wrote it). Nothing else is: a symlink, FIFO, socket or
folder of an entry's name is skipped by every reader (opened with ``O_NOFOLLOW |
O_NONBLOCK``, kept only if ``fstat`` says regular file).
"""

from __future__ import annotations

import errno
import os
import stat

from pagedkv.stores.base import check_key

SUFFIX = ".v"
_FAN_CHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-")
# O_NOFOLLOW: a symlink named like an entry is not one (never read through it);
# O_NONBLOCK: opening a FIFO named like one must not hang (it is no entry either).
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NOT_AN_ENTRY = frozenset({errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.ENOTDIR})


def fan_of(key: str) -> str:
    """The fan folder of ``key``: its first two characters and its last, dots as ``_``."""
    return (key[:2] + key[-1]).replace(".", "_")


def fan_head(fan: str) -> str:
    """The key-head part of a fan directory name (all but its last character)."""
    return fan[:-1]


def is_fan(name: str) -> bool:
    """Whether ``name`` has the shape of a fan folder."""
    return 2 <= len(name) <= 3 and _FAN_CHARS.issuperset(name)


def scandir(path: str) -> list[os.DirEntry]:
    """The entries of folder ``path`` (none if it is gone or is no folder)."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def open_entry(path: str) -> tuple[int, int] | None:
    """``(fd, size)`` of the regular file at ``path``; ``None`` if there is none (absent,
    or a symlink, FIFO, socket or directory: not an entry). Other errors raise."""
    try:
        fd = os.open(path, _READ)
    except OSError as e:
        if e.errno in _NOT_AN_ENTRY:
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


def read_exactly(fd: int, parts: list[memoryview], size: int) -> None:
    """Fill ``parts`` (``size`` bytes in all) from ``fd``: one ``readv`` unless it falls short."""
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


def key_of(name: str, fan: str) -> str | None:
    """The key whose entry file is ``<fan>/<name>``, or ``None`` if there is none."""
    if not name.endswith(SUFFIX):
        return None
    try:
        key = check_key(name[: -len(SUFFIX)])
    except ValueError:
        return None
    return key if fan_of(key) == fan else None


def is_file(entry: os.DirEntry) -> bool:
    """Whether a directory entry is a regular file itself (not a symlink to one)."""
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False
