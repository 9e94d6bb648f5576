"""The on-disk layout of a :class:`~pagedkv.stores.DiskStore`: which names are its own.

An entry of key ``k`` is the regular file ``<root>/<fan_of(k)>/<k>.v``; ``<fan>`` is
the key's first two characters followed by its last one (dots replaced by ``_`` so no
folder is ``.`` or ``..``; a one-character key ``k`` gives ``kk``). The head keeps
``keys(prefix)`` a scan of the folders of that prefix; the tail spreads keys that share
a long prefix (a tier's ``kv-<namespace>-<hex hash>``) over 16 folders instead of one,
and not over more: creating a folder costs as much as writing ~0.5 MiB here.

What is the store's: fan folders (real folders named by 2-3 characters of
``[0-9A-Za-z_-]``), the regular files ``<key>.v`` in them whose key fans to that folder
(a regular file of that name is an entry, whoever wrote it), and pagedkv's temp files.
Nothing else is: a symlink, FIFO, socket or folder of an entry's name is skipped by
every reader (opened with ``O_NOFOLLOW | O_NONBLOCK``, kept only if ``fstat`` says
regular file: :func:`~pagedkv.stores._files.open_regular`), and a put over one raises.
Temp files of earlier versions (``<key>.<pid>.<random>.tmp``) are left alone too:
nothing proves that such a name is pagedkv's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from typing import NamedTuple

import pagedkv.stores.atomic as atomic
from pagedkv.stores._files import open_regular, read_exactly
from pagedkv.stores.base import check_key

SUFFIX = ".v"
_FAN_CHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-")


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


class Found(NamedTuple):
    """What a scan of a store directory found: entries oldest first, and the fan folders."""

    entries: list[tuple[int, str, int]]  # (mtime_ns, key, size), by mtime
    fans: set[str]


def scan(root: str, *, sweep: bool) -> Found:
    """Every entry under ``root``, by mtime; with ``sweep`` also remove dead writers' temps
    (only pagedkv's temp names: :func:`pagedkv.stores.atomic.remove_stale_temp`)."""
    now = time.time()
    entries = []
    fans = set()
    for fan in scandir(root):
        if atomic.temp_owner(fan.name) is not None:  # the probe's, or a future root write
            if sweep:
                atomic.remove_stale_temp(fan, now)
            continue
        if not is_fan(fan.name) or not fan.is_dir(follow_symlinks=False):
            continue
        for entry in scandir(fan.path):
            if atomic.temp_owner(entry.name) is not None:
                if sweep:
                    atomic.remove_stale_temp(entry, now)
                continue
            key = key_of(entry.name, fan.name)
            if key is None:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                entries.append((st.st_mtime_ns, key, st.st_size))
        fans.add(fan.name)
    entries.sort()
    return Found(entries, fans)


def list_keys(root: str, prefix: str) -> list[str]:
    """The keys under ``root`` that start with ``prefix`` (a fresh scan; temps never)."""
    head = prefix[:2].replace(".", "_")
    found = []
    for fan in scandir(root):
        if not (
            is_fan(fan.name)
            and fan_head(fan.name).startswith(head)
            and fan.is_dir(follow_symlinks=False)
        ):
            continue
        for entry in scandir(fan.path):
            key = key_of(entry.name, fan.name)
            if key is not None and key.startswith(prefix) and is_file(entry):
                found.append(key)
    return found


class EntryFiles:
    """The entry files of the store at ``root``: their paths, which fans are real
    folders, and the file operations (``OSError`` is the caller's to report).

    ``file_mode``/``fsync`` apply to what is written (see :mod:`pagedkv.stores.atomic`).
    Fan folders known to be real are remembered (``fans``); one that turns out
    otherwise is forgotten again.
    """

    def __init__(self, root: str, file_mode: int | None, fsync: bool) -> None:
        self.root = root
        self.file_mode = file_mode
        self.fsync = fsync
        self.fans: set[str] = set()

    def path(self, key: str) -> str:
        """Where the entry of ``key`` lives: ``<root>/<fan>/<key>.v``."""
        return os.path.join(self.root, fan_of(key), key + SUFFIX)

    def fan_ok(self, key: str) -> bool:
        """Whether the key's fan folder is a real folder (a symlink that happens to have a
        fan's name leads outside the store: no entry is read or written there)."""
        fan = fan_of(key)
        if fan in self.fans:
            return True
        if atomic.is_real_dir(os.path.join(self.root, fan)):
            self.fans.add(fan)
            return True
        return False

    def is_entry(self, key: str) -> bool:
        """Whether the entry of ``key`` exists as a regular file."""
        if not self.fan_ok(key):
            return False
        try:
            return stat.S_ISREG(os.lstat(self.path(key)).st_mode)
        except OSError:
            return False

    def read(self, key: str) -> bytes | None:
        """The value of ``key``; ``None`` if there is no entry (never written, evicted,
        deleted elsewhere, or not a regular file in a real fan folder)."""
        opened = open_regular(self.path(key)) if self.fan_ok(key) else None
        if opened is None:
            return None
        with os.fdopen(opened[0], "rb") as f:
            return f.read()

    def read_into(self, key: str, parts: list[memoryview]) -> int | None:
        """The size of the entry of ``key`` (``None``: no entry); when it equals the size of
        ``parts`` together, its bytes are read into them (one ``readv``). Entries are
        replaced by rename, never rewritten in place: the size looked at is the size read."""
        opened = open_regular(self.path(key)) if self.fan_ok(key) else None
        if opened is None:
            return None
        fd, size = opened
        try:
            if size == sum(len(p) for p in parts):
                read_exactly(fd, parts, size)
        finally:
            os.close(fd)
        return size

    def write_temp(self, key: str, value: memoryview) -> str:
        """Write ``value`` to a fresh temp file in the key's fan folder (created if need
        be); return its path."""
        fan = fan_of(key)
        directory = os.path.join(self.root, fan)
        try:
            if fan not in self.fans:
                atomic.make_dirs(directory, self.file_mode)
                if not atomic.is_real_dir(directory):
                    raise NotADirectoryError(
                        errno.ENOTDIR,
                        f"{directory!r} is not a directory the store made (a symlink or a "
                        "file of that name is in the way); move it away",
                    )
                self.fans.add(fan)
            return atomic.write_temp(directory, [value], file_mode=self.file_mode, fsync=self.fsync)
        except OSError:
            self.fans.discard(fan)
            raise

    def commit(self, tmp: str, key: str, stamp_ns: int, *, known: bool) -> None:
        """Stamp temp file ``tmp`` with ``stamp_ns`` and rename it over the entry of ``key``.
        ``known``: the entry is a regular file the store found or wrote (no need to look
        what is there first)."""
        os.utime(tmp, ns=(stamp_ns, stamp_ns))
        atomic.commit(tmp, self.path(key), fsync=self.fsync, check=not known)

    def unlink(self, key: str) -> bool:
        """Remove the entry of ``key``; whether there was one (a non-file of its name is
        not the store's and stays)."""
        if not self.is_entry(key):
            return False
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            return False
        return True

    def stamp(self, stamps: list[tuple[str, int]]) -> None:
        """Set the mtime of each ``(path, ns)`` entry file (the store's recency on disk);
        a file gone meanwhile is skipped."""
        for path, ns in stamps:
            with contextlib.suppress(OSError):
                os.utime(path, ns=(ns, ns), follow_symlinks=False)
