"""Atomic files: pagedkv's temp-file names, atomic writes, file modes, and the sweep.

Every file pagedkv writes into a directory goes first to a temp file named
``.pagedkv-tmp-<host>-<pid>-<random>`` in that directory (``<host>``: 8 hex digits of
the host name's SHA-256; ``<pid>``: the writer's process id) and is then renamed over
its final name, so a reader sees the old file, the new one or none, never a partial
one, even after ``kill -9``. Temp directories (a model conversion) use the same names.

A sweep removes only names of exactly that shape, only regular files (or, for
:func:`sweep_temp_dirs`, real directories; never a symlink, FIFO or socket), only in
the directories it is given, and only when the writer is gone: its pid is dead on
this host, or (files only) the file is older than :data:`STALE_TEMP_SECONDS`, which
covers other hosts sharing the directory and pid reuse. Anything else with a
``.tmp``-like name belongs to someone else and is never touched.

File modes: ``mode=None`` creates files with ``0o666`` and directories with ``0o777``,
both minus the process umask (what ``open``/``mkdir`` do). An explicit ``mode`` (e.g.
``0o600``) is applied exactly, whatever the umask; directories pagedkv creates then
get :func:`dir_mode` of it (``0o600`` -> ``0o700``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import random
import re
import shutil
import socket
import stat
import time
from collections.abc import Sequence
from typing import NamedTuple

from pagedkv.stores._files import write_all
from pagedkv.stores.base import Buffer, pid_alive

TEMP_PREFIX = ".pagedkv-tmp-"
# A temp file whose writer is gone is garbage; one whose writer we cannot see (another
# host sharing the directory, or pid reuse) is only removed once it is this old.
STALE_TEMP_SECONDS = 600.0
_TEMP_RE = re.compile(r"\.pagedkv-tmp-([0-9a-f]{8})-([1-9][0-9]{0,9})-[0-9a-f]{12}")
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class TempOwner(NamedTuple):
    """Who wrote a temp file: ``host`` (8 hex digits, see :func:`host_id`) and ``pid``."""

    host: str
    pid: int


def host_id() -> str:
    """This host's id in temp names: 8 hex digits of the SHA-256 of its host name."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=4)
def _writer_tag(pid: int) -> str:
    # Per process (a forked child has its own pid): a temp name costs no host look-up.
    return f"{TEMP_PREFIX}{host_id()}-{pid}-"


def temp_name() -> str:
    """A fresh temp name of this process: ``.pagedkv-tmp-<host>-<pid>-<12 hex>``.

    The random part only keeps names of one process apart (files are created with
    ``O_EXCL``, so a repeat would fail, never clobber): no system call for it.
    """
    return f"{_writer_tag(os.getpid())}{random.getrandbits(48):012x}"


def temp_owner(name: str) -> TempOwner | None:
    """The writer of temp name ``name``, or ``None`` if pagedkv never makes that name."""
    m = _TEMP_RE.fullmatch(name)
    return None if m is None else TempOwner(m.group(1), int(m.group(2)))


def check_file_mode(mode: object, who: str) -> int | None:
    """Validate a ``file_mode=`` argument: ``None`` (umask) or permission bits 0..0o777.

    Raises ``TypeError`` for a non-int, ``ValueError`` for other bits or a mode that
    does not let the owner read and write.
    """
    if mode is None:
        return None
    if isinstance(mode, bool) or not isinstance(mode, int):
        raise TypeError(
            f"{who}: file_mode must be None (honour the umask) or an int such as 0o600, "
            f"got {type(mode).__name__}"
        )
    if not 0 <= mode <= 0o777:
        raise ValueError(
            f"{who}: file_mode must be None (honour the umask) or permission bits such as "
            f"0o600, got {mode!r}"
        )
    if not mode & stat.S_IRUSR or not mode & stat.S_IWUSR:
        raise ValueError(
            f"{who}: file_mode={mode:#o} must let the owner read and write (e.g. 0o600)"
        )
    return mode


def dir_mode(file_mode: int | None) -> int | None:
    """Mode of the directories pagedkv creates for files of ``file_mode``: the same bits,
    plus search (x) wherever read is granted (``0o640`` -> ``0o750``)."""
    if file_mode is None:
        return None
    return file_mode | ((file_mode & 0o444) >> 2)


def make_dirs(path: str, file_mode: int | None = None) -> None:
    """Create ``path`` and its missing parents; those created get :func:`dir_mode`.

    Existing directories are left as they are (never chmod-ed). Raises ``OSError``.
    """
    missing = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    mode = dir_mode(file_mode)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o777 if mode is None else mode)
        except FileExistsError:
            continue  # another process made it meanwhile: theirs, leave it
        if mode is not None:
            os.chmod(d, mode)  # exactly, whatever the umask


def is_real_dir(path: str) -> bool:
    """Whether ``path`` is a directory itself (not a symlink to one)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def create_temp(directory: str, file_mode: int | None = None) -> tuple[int, str]:
    """Create a fresh temp file in ``directory``; return ``(fd, path)``. Raises ``OSError``."""
    path = os.path.join(directory, temp_name())
    fd = os.open(path, _CREATE, 0o666 if file_mode is None else file_mode)
    if file_mode is not None:
        try:
            os.fchmod(fd, file_mode)  # exactly, whatever the umask
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
    return fd, path


def write_temp(
    directory: str,
    views: Sequence[Buffer],
    *,
    file_mode: int | None = None,
    fsync: bool = False,
) -> str:
    """Write ``views`` back to back into a fresh temp file in ``directory``; return its path.

    On any error the temp file is removed and the ``OSError`` raised.
    """
    fd, path = create_temp(directory, file_mode)
    try:
        try:
            write_all(fd, [memoryview(v).cast("B") for v in views])
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return path


def commit(tmp: str, path: str, *, fsync: bool = False, check: bool = True) -> None:
    """Rename temp file ``tmp`` over ``path`` (same directory); with ``fsync`` also sync the
    directory. ``path`` must be absent or a regular file: anything else there (a symlink,
    a directory, a FIFO) is someone else's and raises ``FileExistsError`` (``check=False``:
    the caller knows ``path`` is its own file, skip the look). On an error the temp file
    is removed."""
    try:
        try:
            st = os.lstat(path) if check else None
        except FileNotFoundError:
            pass
        else:
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise FileExistsError(
                    errno.EEXIST,
                    f"{path!r} exists and is not a file pagedkv wrote; move it away",
                    path,
                )
        os.replace(tmp, path)
        if fsync:
            fsync_dir(os.path.dirname(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(
    path: str,
    views: Sequence[Buffer],
    *,
    file_mode: int | None = None,
    fsync: bool = False,
) -> None:
    """Write ``views`` to ``path`` atomically: a temp file beside it, then a rename."""
    tmp = write_temp(os.path.dirname(path), views, file_mode=file_mode, fsync=fsync)
    commit(tmp, path, fsync=fsync)


def fsync_dir(directory: str) -> None:
    """fsync a directory (makes the renames in it durable)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_file_system(directory: str) -> None:
    """Flush the whole file system holding ``directory`` (Linux ``syncfs``; ``os.sync``
    elsewhere): one call makes every file written there so far durable, in any number."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.syncfs(fd) == 0:
                return
        except (OSError, AttributeError):
            pass
        os.sync()
    finally:
        os.close(fd)


def _owner_gone(owner: TempOwner, here: str) -> bool:
    return owner.host == here and not pid_alive(owner.pid)


def remove_stale_temp(entry: os.DirEntry, now: float) -> bool:
    """Remove ``entry`` if it is a temp file of a writer that is gone; return whether it
    was removed. Anything else (another name, a non-file, a live writer's) is left."""
    owner = temp_owner(entry.name)
    if owner is None:
        return False
    try:
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            return False
        if _owner_gone(owner, host_id()) or now - st.st_mtime > STALE_TEMP_SECONDS:
            os.unlink(entry.path)
            return True
    except OSError:  # removed meanwhile, or no permission: not ours to fight over
        pass
    return False


def sweep_temps(directory: str, *, now: float | None = None) -> int:
    """Remove the temp files of dead writers directly in ``directory``; return how many.

    Only regular files named by :func:`temp_name` whose writer is gone (see the module
    docstring). Errors (a file removed meanwhile, no permission) are ignored.
    """
    now = time.time() if now is None else now
    try:
        with os.scandir(directory) as it:
            return sum(remove_stale_temp(entry, now) for entry in it)
    except OSError:
        return 0


def sweep_temp_dirs(directory: str) -> int:
    """Remove temp directories of dead processes of this host directly in ``directory``.

    Only real directories named by :func:`temp_name` whose pid is dead on this host (a
    temp directory of another host is never removed: its writer cannot be checked).
    Returns how many were removed; errors are ignored.
    """
    here = host_id()
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        owner = temp_owner(name)
        path = os.path.join(directory, name)
        if owner is None or not is_real_dir(path) or not _owner_gone(owner, here):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(path)
            removed += 1
    return removed
