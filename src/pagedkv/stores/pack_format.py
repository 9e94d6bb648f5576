"""The pack file format of :class:`~pagedkv.stores.packs.PackStore`: build and parse.

A pack is ``<root>/packs/<time_ns:016x>-<pid>-<random>.pack``::

    page bytes, back to back
    index:  count x (32-byte digest, u64 offset, u64 length)
    footer: b"PKVPACK1", u64 count, u64 index offset, sha256 of the index (32 bytes)

Pages are content-addressed (:mod:`pagedkv.stores.keys`): the index holds the raw
32-byte digest of each page key. The pages carry no checksum here (their key is their
sha256, checked by every reader); the index does, and a pack whose footer or index
does not verify is no pack (:func:`read_index` returns ``None``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Collection, Sequence
from typing import NamedTuple

import pagedkv.stores.atomic as atomic
from pagedkv.errors import StoreError
from pagedkv.stores.base import Buffer
from pagedkv.stores.keys import page_digest, page_key

PACK_DIR = "packs"
PACK_SUFFIX = ".pack"
# Only names pagedkv gives packs: another file that ends in .pack is not read or removed.
_NAME_RE = re.compile(r"[0-9a-f]{16}-[1-9][0-9]{0,9}-[0-9a-f]{8}\.pack")
MAGIC = b"PKVPACK1"
_ENTRY = struct.Struct("<32sQQ")
_FOOTER = struct.Struct("<8sQQ32s")


class PackIndex(NamedTuple):
    """What a pack holds: ``entries`` ``{page key: (offset, length)}`` and ``data_bytes``,
    where the pages end (the index's offset): every page lies below it."""

    entries: dict[str, tuple[int, int]]
    data_bytes: int


class PackImage(NamedTuple):
    """A pack to write: its file ``contents`` as buffers, back to back, and its ``table``
    (the index it holds)."""

    contents: list[memoryview]
    table: PackIndex


def new_pack_name() -> str:
    """A fresh pack name of this process: ``<time_ns:016x>-<pid>-<8 hex>.pack``."""
    return f"{time.time_ns():016x}-{os.getpid()}-{secrets.token_hex(4)}{PACK_SUFFIX}"


def is_pack_name(name: str) -> bool:
    """Whether ``name`` is a name pagedkv gives packs."""
    return _NAME_RE.fullmatch(name) is not None


def build(items: Sequence[tuple[str, Buffer]]) -> PackImage:
    """The pack of ``items`` (page key, bytes): pages, then index, then footer."""
    entries: dict[str, tuple[int, int]] = {}
    index = bytearray()
    views = []
    offset = 0
    for key, value in items:
        view = memoryview(value).cast("B")
        entries[key] = (offset, len(view))
        index += _ENTRY.pack(bytes.fromhex(page_digest(key)), offset, len(view))
        views.append(view)
        offset += len(view)
    footer = _FOOTER.pack(MAGIC, len(entries), offset, hashlib.sha256(index).digest())
    views += [memoryview(index), memoryview(footer)]
    return PackImage(views, PackIndex(entries, offset))


class WrittenPack(NamedTuple):
    """A pack :func:`write` put in place: its file ``name`` and the ``table`` it holds."""

    name: str
    table: PackIndex


def write(
    directory: str, items: Sequence[tuple[str, Buffer]], *, file_mode: int | None, fsync: bool
) -> WrittenPack:
    """Write the pack of ``items`` under a fresh name in ``directory``: a temp file,
    fsynced if ``fsync``, renamed when complete. ``StoreError`` when it cannot be."""
    name = new_pack_name()
    image = build(items)
    path = os.path.join(directory, name)
    try:
        atomic.atomic_write(path, image.contents, file_mode=file_mode, fsync=fsync)
    except OSError as e:
        raise StoreError(
            f"PackStore: cannot write pack {name!r} in {directory!r}: {e.strerror or e}"
        ) from e
    return WrittenPack(name, image.table)


def make_pack_dir(directory: str, file_mode: int | None) -> None:
    """Create the pack directory (and its parents) if missing; ``StoreError`` when it
    cannot be, or when something other than a real directory has its name."""
    try:
        atomic.make_dirs(directory, file_mode)
        if not atomic.is_real_dir(directory):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory (move it away)")
    except OSError as e:
        raise StoreError(f"PackStore: cannot create {directory!r}: {e.strerror or e}") from e


def read_index(path: str) -> PackIndex | None:
    """The index of the pack file at ``path``; ``None`` if there is no pack there (absent,
    not a regular file, or a footer/index that does not verify). Other I/O errors raise
    ``OSError``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, IsADirectoryError):
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # a symlink or socket: not a pack
            return None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        size = st.st_size
        if not stat.S_ISREG(st.st_mode) or size < _FOOTER.size:
            return None
        f.seek(size - _FOOTER.size)
        magic, count, at, digest = _FOOTER.unpack(f.read(_FOOTER.size))
        if magic != MAGIC or at + count * _ENTRY.size + _FOOTER.size != size:
            return None
        f.seek(at)
        raw = f.read(count * _ENTRY.size)
    if hashlib.sha256(raw).digest() != digest:
        return None
    entries = {}
    for d, off, length in _ENTRY.iter_unpack(raw):
        if off + length > at:
            return None
        entries[page_key(d.hex())] = (off, length)
    return PackIndex(entries, at)


def list_packs(directory: str) -> set[str]:
    """The names of the packs in ``directory`` (none if it is missing). Other names are
    not packs, whatever they end with. Raises ``OSError`` if it cannot be listed."""
    try:
        return {n for n in os.listdir(directory) if is_pack_name(n)}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def read_pages(path: str, index: PackIndex, *, skip: Collection[str]) -> list[tuple[str, Buffer]]:
    """The pages of the pack at ``path`` (holding ``index``) other than ``skip``, in index
    order. A page the file no longer holds whole (truncated under us) is left out: it
    could not be read anyway, and ``verify`` reports it missing. Raises ``OSError``."""
    kept: list[tuple[str, Buffer]] = []
    with open(path, "rb") as f:
        for key, (off, length) in index.entries.items():
            if key not in skip:
                data = os.pread(f.fileno(), length, off)
                if len(data) == length:
                    kept.append((key, data))
    return kept


def split(
    items: list[tuple[str, memoryview]], writers: int, min_bytes: int
) -> list[list[tuple[str, Buffer]]]:
    """``items`` as contiguous groups of about equal bytes, at most ``writers`` of them,
    each of at least ``min_bytes`` (one group when the whole is smaller): the packs of
    one put, written side by side."""
    total = sum(len(v) for _, v in items)
    n = max(1, min(writers, len(items), total // min_bytes))
    if n == 1:
        return [list(items)]
    groups: list[list[tuple[str, Buffer]]] = []
    cur: list[tuple[str, Buffer]] = []
    acc, target = 0, total / n
    for item in items:
        cur.append(item)
        acc += len(item[1])
        if acc >= target * (len(groups) + 1) and len(groups) < n - 1:
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    return groups
