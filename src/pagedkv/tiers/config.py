"""Tier configs: what a user passes as ``KVCache(..., tiers=[...])``.

Each config is a frozen dataclass validated at construction (``ValueError`` /
``TypeError`` naming the field and how to fix it). :class:`TieredStore` opens them
once it knows the block layout, turning each into a :class:`~pagedkv.tiers.level.Level`.

The names: a *tier* is what the user configures here; a *level* is a tier opened
over its store (:class:`~pagedkv.tiers.level.Level`); the *chain*
(:class:`~pagedkv.tiers.chain.TieredStore`) is the levels in order, fastest first.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedkv import _resources
from pagedkv.errors import ResourceError
from pagedkv.tiers.health import Backoff
from pagedkv.tiers.level import Level

if TYPE_CHECKING:
    from pagedkv.stores import RedisClusterStore, RedisStore


def _check_bytes(value: object, who: str, field: str, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{who}: {field} must be an int number of bytes, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(
            f"{who}: {field} must be {'>= 0' if allow_zero else '> 0'}, got {value} "
            "(give a byte budget, e.g. 4 << 30 for 4 GiB)"
        )


def _check_host_memory(who: str, capacity_bytes: int) -> None:
    """The slab is preallocated (pinned when CUDA): refuse one larger than free host memory."""
    if capacity_bytes < _resources.PROBE_MIN_BYTES:
        return
    import torch

    pinned = torch.cuda.is_available()
    _resources.require_memory(
        who, "capacity_bytes", capacity_bytes, capacity_bytes, "cpu",
        unit_bytes=1, kind="pinned host" if pinned else "host",
    )  # fmt: skip


def _check_kv_dtype(tier: CPUTier | DiskTier | RedisTier, who: str) -> None:
    """Normalise ``kv_dtype`` (a name such as ``"fp8"``, or a torch.dtype) in place."""
    value = tier.kv_dtype
    if value is not None:
        from pagedkv._kv_formats import parse_kv_dtype

        object.__setattr__(tier, "kv_dtype", parse_kv_dtype(value, f"{who}: kv_dtype"))


def _check_seconds(value: object, who: str, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{who}: {field} must be a positive number of seconds, got {value!r}")


@dataclass(frozen=True)
class CPUTier:
    """Host-memory tier: a preallocated slab (pinned when CUDA) of ``capacity_bytes``.

    ``swap_bytes`` is a separate budget for sequences swapped out by
    ``KVCache.swap_out``; they live in their own buffers, are never evicted, and a
    swap that does not fit raises :class:`~pagedkv.errors.OutOfBlocks`. ``None``
    means the same as ``capacity_bytes``; ``0`` disables swapping. The buffers are
    allocated only while sequences are swapped out. Why apart from the slab: a swap
    is then one gather and one copy, with no second copy into slab slots.

    A ``capacity_bytes`` above the free host memory raises
    :class:`~pagedkv.errors.ResourceError` here and again when the tier is opened
    (memory may have gone meanwhile), before the slab is allocated. The swap budget
    is not checked: its buffers come and go with the swapped sequences.

    ``kv_dtype`` (every tier type has it): the format the tier stores blocks in,
    ``None`` (the pool's) or e.g. ``"fp8"`` / ``"int8"``, about half the bytes of a bf16
    block: demotion quantizes, promotion dequantizes (one rounding, within the format's
    bound; :func:`pagedkv.storage.convert_rows`). All tiers of one cache share it.
    Swapped-out sequences stay in the pool's format (bit-exact).
    """

    capacity_bytes: int
    swap_bytes: int | None = None
    kv_dtype: Any = None

    def __post_init__(self) -> None:
        _check_kv_dtype(self, "CPUTier")
        _check_bytes(self.capacity_bytes, "CPUTier", "capacity_bytes")
        if self.swap_bytes is not None:
            _check_bytes(self.swap_bytes, "CPUTier", "swap_bytes", allow_zero=True)
        _check_host_memory("CPUTier", self.capacity_bytes)

    @property
    def swap_budget(self) -> int:
        """Bytes available to swapped-out sequences."""
        return self.capacity_bytes if self.swap_bytes is None else self.swap_bytes

    def open(self, bytes_per_block: int, fingerprint: str) -> Level:
        """Allocate the slab for blocks of ``bytes_per_block``; raises if not even one fits.

        Not framed: the bytes never leave this process, and a digest per block would cost
        more than the copy itself.
        """
        if self.capacity_bytes < bytes_per_block:
            raise ValueError(
                f"CPUTier: capacity_bytes={self.capacity_bytes} cannot hold one KV block of "
                f"{bytes_per_block} bytes; give at least that much"
            )
        from pagedkv.stores import MemoryStore

        _check_host_memory("CPUTier", self.capacity_bytes)
        store = MemoryStore(self.capacity_bytes, slot_bytes=bytes_per_block)
        return Level(
            "cpu", store, bytes_per_block, capacity_blocks=store.num_slots, in_process=True
        )


@dataclass(frozen=True)
class DiskTier:
    """Local-disk tier: one file per block under ``path``, at most ``capacity_bytes``.

    Entries are framed (fingerprint + digest) and verified on read; a corrupt or
    foreign entry is a miss and is deleted. Writes are atomic (temp file + rename),
    so a crash never leaves a partial entry readable. Several processes may share
    ``path``. ``fsync=True`` also makes entries survive power loss (slow).

    A ``capacity_bytes`` larger than the whole file system holding ``path`` raises
    :class:`~pagedkv.errors.ResourceError`. One larger than its free space is
    accepted: entries of earlier runs may already fill part of the budget, and a
    full disk only costs misses (a failed write is a miss, never an error).
    ``file_mode``: permission bits of the entry files (e.g. ``0o600``; directories get
    search bits added); ``None`` (default) honours the umask. Entries hold KV bytes of
    your prompts: on a host shared with other users, use ``0o600`` or a private ``path``.
    Files in ``path`` that the tier did not write are never modified or deleted
    (:class:`~pagedkv.stores.DiskStore` says what counts as its own).
    """

    path: str | os.PathLike[str]
    capacity_bytes: int
    fsync: bool = False
    file_mode: int | None = None
    kv_dtype: Any = None

    def __post_init__(self) -> None:
        _check_kv_dtype(self, "DiskTier")
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise TypeError(f"DiskTier: path must be a directory path, got {self.path!r}")
        _check_bytes(self.capacity_bytes, "DiskTier", "capacity_bytes")
        if not isinstance(self.fsync, bool):
            raise TypeError(f"DiskTier: fsync must be a bool, got {self.fsync!r}")
        from pagedkv.stores.atomic import check_file_mode

        check_file_mode(self.file_mode, "DiskTier")
        path = os.path.abspath(os.fspath(self.path))
        probe = path
        while not os.path.exists(probe):  # the nearest existing ancestor must be writable
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise ValueError(
                f"DiskTier: {probe!r} exists and is not a directory; pick another path"
            )
        if not os.access(probe, os.W_OK | os.X_OK):
            raise ValueError(
                f"DiskTier: {probe!r} is not writable by this process; "
                "pass a directory you can write (or create it first)"
            )
        disk = shutil.disk_usage(probe)
        if self.capacity_bytes > disk.total:
            raise ResourceError(
                f"DiskTier: capacity_bytes={self.capacity_bytes} needs "
                f"{_resources.format_bytes(self.capacity_bytes)} but the file system holding "
                f"{probe!r} has {_resources.format_bytes(disk.total)} in all "
                f"({_resources.format_bytes(disk.free)} free); pass capacity_bytes <= {disk.free}"
            )

    def open(self, bytes_per_block: int, fingerprint: str) -> Level:
        """Open (create) the directory; entries of earlier runs stay usable."""
        from pagedkv.stores import DiskStore, FramedStore
        from pagedkv.stores.framing import HEADER_BYTES

        entry = bytes_per_block + HEADER_BYTES
        if self.capacity_bytes < entry:
            raise ValueError(
                f"DiskTier: capacity_bytes={self.capacity_bytes} cannot hold one framed KV "
                f"block of {entry} bytes; give at least that much"
            )
        disk = DiskStore(self.path, self.capacity_bytes, fsync=self.fsync, file_mode=self.file_mode)
        return Level(
            "disk",
            FramedStore(disk, fingerprint),
            bytes_per_block,
            capacity_blocks=self.capacity_bytes // entry,
        )


@dataclass(frozen=True, init=False)
class RedisTier:
    """Shared Redis tier (``redis://host:port/db`` or ``rediss://``), or a Redis Cluster
    (``redis+cluster://host:port,host:port,...`` or ``rediss+cluster://``: any of its
    nodes; the others are discovered).

    The server's ``maxmemory`` / ``maxmemory-policy allkeys-lru`` governs capacity,
    so this tier is normally the last one. In a cluster, keys spread over every
    master (:class:`~pagedkv.stores.RedisClusterStore`); a master that is down costs
    the misses of its slots only (logged once on ``pagedkv.stores``, retried with the
    same back-off), the tier as a whole is missing only while every master is; run
    the cluster with ``cluster-require-full-coverage no`` so the other masters keep
    serving (the README, "Redis Cluster"). ``ttl_seconds`` adds a sliding expiry.
    Entries are framed and verified like the disk tier's. When Redis is unreachable,
    slow (``timeout_seconds`` per round trip) or failing, the tier is treated as
    missing and retried after ``retry_initial_seconds``, doubling up to
    ``retry_max_seconds``; the first failure and the recovery are logged once on
    ``pagedkv.tiers``. Construction never connects. The repr, logs and errors show
    the URL with its password as ``***``; ``password`` is never shown. Keys are
    ``key_prefix + "kv-<namespace>-<hash>"`` (see the README on Redis ACLs).

    ``timeout_s``, ``retry_initial_s`` and ``retry_max_s`` are accepted as the older
    names of the three ``*_seconds`` keywords.
    """

    url: str
    key_prefix: str = "pagedkv:"
    password: str | None = field(default=None, repr=False)
    ttl_seconds: int | None = None
    timeout_seconds: float = 0.5
    retry_initial_seconds: float = 0.5
    retry_max_seconds: float = 30.0
    kv_dtype: Any = None

    def __init__(
        self,
        url: str,
        key_prefix: str = "pagedkv:",
        password: str | None = None,
        ttl_seconds: int | None = None,
        timeout_seconds: float | None = None,
        retry_initial_seconds: float | None = None,
        retry_max_seconds: float | None = None,
        *,
        timeout_s: float | None = None,
        retry_initial_s: float | None = None,
        retry_max_s: float | None = None,
        kv_dtype: Any = None,
    ) -> None:
        given = {
            "timeout_seconds": _one_of(timeout_seconds, timeout_s, "timeout", 0.5),
            "retry_initial_seconds": _one_of(
                retry_initial_seconds, retry_initial_s, "retry_initial", 0.5
            ),
            "retry_max_seconds": _one_of(retry_max_seconds, retry_max_s, "retry_max", 30.0),
        }
        for name, value in (
            ("url", url),
            ("key_prefix", key_prefix),
            ("password", password),
            ("ttl_seconds", ttl_seconds),
            *given.items(),
            ("kv_dtype", kv_dtype),
        ):
            object.__setattr__(self, name, value)
        self.__post_init__()

    def __post_init__(self) -> None:
        _check_kv_dtype(self, "RedisTier")
        if not isinstance(self.url, str):
            raise TypeError(
                "RedisTier: url must be a str like redis://host:6379/0, got "
                f"{type(self.url).__name__}"
            )
        _check_seconds(self.timeout_seconds, "RedisTier", "timeout_seconds")
        _check_seconds(self.retry_initial_seconds, "RedisTier", "retry_initial_seconds")
        _check_seconds(self.retry_max_seconds, "RedisTier", "retry_max_seconds")
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ValueError(
                f"RedisTier: retry_max_seconds ({self.retry_max_seconds}) < "
                f"retry_initial_seconds ({self.retry_initial_seconds})"
            )
        self._store().close()  # the store validates url, prefix and ttl (no connection)

    def __repr__(self) -> str:
        from pagedkv.stores.base import redact_url

        password = "" if self.password is None else ", password='***'"
        return (
            f"RedisTier(url={redact_url(self.url)!r}, key_prefix={self.key_prefix!r}"
            f"{password}, ttl_seconds={self.ttl_seconds!r}, "
            f"timeout_seconds={self.timeout_seconds!r}, "
            f"retry_initial_seconds={self.retry_initial_seconds!r}, "
            f"retry_max_seconds={self.retry_max_seconds!r}"
            f"{'' if self.kv_dtype is None else f', kv_dtype={self.kv_dtype}'})"
        )

    def _store(self) -> RedisStore | RedisClusterStore:
        from pagedkv.stores import RedisClusterStore, RedisStore, parse_location

        common: dict[str, Any] = dict(
            key_prefix=self.key_prefix,
            password=self.password,
            socket_timeout=self.timeout_seconds,
            connect_timeout=self.timeout_seconds,
            ttl_seconds=self.ttl_seconds,
        )
        if parse_location(self.url).kind == "redis-cluster":
            return RedisClusterStore(
                self.url,
                **common,
                degrade=True,  # a master down costs its slots' misses, not the tier
                retry_initial_seconds=self.retry_initial_seconds,
                retry_max_seconds=self.retry_max_seconds,
            )
        return RedisStore(self.url, **common)

    def open(self, bytes_per_block: int, fingerprint: str) -> Level:
        """Create the client (no round trip yet)."""
        from pagedkv.stores import FramedStore

        store = self._store()
        backoff = Backoff(
            f"redis({store.url})",
            initial_seconds=self.retry_initial_seconds,
            max_seconds=self.retry_max_seconds,
        )
        return Level("redis", FramedStore(store, fingerprint), bytes_per_block, backoff=backoff)


def _one_of(new: float | None, old: float | None, stem: str, default: float) -> float:
    """The value of keyword ``<stem>_seconds``, or of its older name ``<stem>_s``."""
    if new is not None and old is not None:
        raise TypeError(f"RedisTier: pass {stem}_seconds or {stem}_s (its older name), not both")
    value = new if new is not None else old
    return default if value is None else value


Tier = CPUTier | DiskTier | RedisTier


def check_tiers(tiers: object) -> None:
    """``TypeError`` unless ``tiers`` is a non-empty list of tier configs."""
    if isinstance(tiers, (str, bytes)) or not isinstance(tiers, Sequence) or not tiers:
        raise TypeError(
            "tiers must be a non-empty list such as "
            f"[CPUTier(8 << 30), DiskTier(path, 64 << 30)], got {tiers!r}"
        )
    for t in tiers:
        if not isinstance(t, (CPUTier, DiskTier, RedisTier)):
            raise TypeError(
                f"tiers must be CPUTier, DiskTier or RedisTier objects, got {type(t).__name__}"
            )


def open_levels(tiers: Sequence[Tier], bytes_per_block: int, fingerprint: str) -> list[Level]:
    """Open every tier for blocks of ``bytes_per_block`` under ``fingerprint``, fastest
    first; a kind that repeats is named ``disk``, ``disk2`` ... Every tier but the last
    must have a capacity (it spills to the one below). On an error the levels opened so
    far are closed."""
    levels: list[Level] = []
    try:
        for t in tiers:
            levels.append(t.open(bytes_per_block, fingerprint))
        for level in levels[:-1]:
            if level.capacity_blocks is None:
                raise ValueError(
                    f"tier {level.name} has no capacity, so it cannot spill to the tier "
                    "below it; put it last in the tiers list"
                )
    except BaseException:
        for level in levels:
            level.close()
        raise
    seen: dict[str, int] = {}
    for level in levels:
        seen[level.name] = seen.get(level.name, 0) + 1
        if seen[level.name] > 1:
            level.name = f"{level.name}{seen[level.name]}"
    return levels
