"""What this machine can give: host memory, device memory, devices.

Constructors that preallocate (``BlockManager``, ``KVPool``, ``KVCache``, ``CPUTier``)
ask here before they allocate, so an oversized request is refused at once with a
:class:`~pagedkv.errors.ResourceError` naming the argument, the bytes asked for and
the bytes available, instead of a bare allocator error or the kernel's OOM killer
minutes later.

Host memory is ``MemAvailable`` from ``/proc/meminfo`` capped by the cgroup memory
limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``, at every level of the
process's cgroup, minus what the cgroup uses beyond its reclaimable page cache).
CUDA memory is what the driver reports free plus what torch's caching allocator
holds unused on that device. Each probe reads a few small files (tens of µs); it is
not cached, since memory comes and goes. Requests under :data:`PROBE_MIN_BYTES` are
not probed at all: refusing them helps nobody, and small constructors stay as fast
as before.

No torch at import time: the (pure Python) block manager imports this module.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

from pagedkv.errors import ResourceError

if TYPE_CHECKING:
    import torch

#: Requests below this are allocated without asking (``ResourceError`` is for the
#: ones that would take the machine down, not for the last few MiB).
PROBE_MIN_BYTES = 64 << 20

# cgroup v1 reports "no limit" as a huge page-aligned number (2**63 - 4096 here).
_V1_UNLIMITED = 1 << 62


class Available(NamedTuple):
    """Bytes an allocation can get now, and where the figure comes from."""

    bytes: int
    source: str


def available_host_bytes() -> Available | None:
    """Host memory a new allocation can get now (``None`` when it cannot be told)."""
    found = _meminfo_available()
    limit = _cgroup_available(_read("/proc/self/cgroup"), "/sys/fs/cgroup")
    if limit is not None and (found is None or limit.bytes < found.bytes):
        return limit
    return found


def free_device_bytes(device: torch.device) -> Available | None:
    """Free memory of a CUDA device (driver free + torch's cached unused bytes there).

    ``None`` for devices whose free memory cannot be asked (CPU: use
    :func:`available_host_bytes`; MPS, XPU and others: unknown).
    """
    if device.type != "cuda":
        return None
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return Available(free + cached, f"free on {device}")


def resolve_device(device: object, *, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine.

    ``None`` means CUDA when available, else CPU. Raises ``ValueError`` for a string
    that is no device, ``TypeError`` for another type, and
    :class:`~pagedkv.errors.ResourceError` for a CUDA (or MPS) device this process
    cannot use (no CUDA build, no visible GPU, index out of range), saying why.
    """
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(
            f"{name} must be a str like 'cpu' or 'cuda:0', or a torch.device; "
            f"got {type(device).__name__}"
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(
            f"{name}={device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"this torch {torch.__version__} is built without CUDA"
                if torch.version.cuda is None
                else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)"
            )
            raise ResourceError(f"{name}={device!r} asks for CUDA but {why}; use device='cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ResourceError(
                f"{name}={device!r}: there is no CUDA device {dev.index} "
                f"({count} visible: cuda:0 .. cuda:{count - 1})"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ResourceError(f"{name}={device!r}: MPS is not available here; use device='cpu'")
    return dev


def require_memory(
    who: str,
    arg: str,
    value: object,
    asked: int,
    device: torch.device | str = "cpu",
    *,
    unit_bytes: int | None = None,
    reserved: int = 0,
    detail: str = "",
    kind: str | None = None,
) -> None:
    """Raise :class:`~pagedkv.errors.ResourceError` if ``asked`` bytes do not fit now.

    ``who``/``arg``/``value`` name what asked (``KVPool: num_blocks=10**6``);
    ``device`` says whose memory (host for ``"cpu"``). With ``unit_bytes`` (what one
    unit of ``arg`` costs, on top of ``reserved`` bytes that do not depend on it) the
    message says the largest ``arg`` that fits; ``detail``
    is a breakdown to show; ``kind`` overrides the memory's name ("pinned host").
    Does nothing for requests under :data:`PROBE_MIN_BYTES` or when the free memory
    cannot be told.
    """
    if asked < PROBE_MIN_BYTES:
        return
    dev_type = device if isinstance(device, str) else device.type
    if dev_type == "cpu":
        available = available_host_bytes()
        kind = kind or "host"
    else:
        import torch  # not at import time: the pure-Python manager imports this module

        available = free_device_bytes(torch.device(device))
        kind = kind or str(device)
    if available is None or asked <= available.bytes:
        return
    fix = f"pass a smaller {arg}"
    if unit_bytes:
        fix += f" (at most {max(0, available.bytes - reserved) // unit_bytes} fit now)"
    raise ResourceError(
        f"{who}: {arg}={value} needs {format_bytes(asked)} of {kind} memory"
        f"{f' ({detail})' if detail else ''}, but only {format_bytes(available.bytes)} "
        f"is available ({available.source}); {fix}"
    )


def format_bytes(n: int) -> str:
    """``68719476736`` -> ``'64.0 GiB (68719476736 bytes)'``."""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            break
        size /= 1024
    return f"{size:.1f} {unit} ({n} bytes)" if unit != "B" else f"{n} bytes"


# -- probes ------------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("ascii", "replace")
    except OSError:
        return None


def _meminfo_available() -> Available | None:
    text = _read("/proc/meminfo")
    if text is not None:
        at = text.find("MemAvailable:")
        if at >= 0:
            kib = text[at + 13 : text.index("\n", at)].split()[0]
            return Available(int(kib) * 1024, "MemAvailable in /proc/meminfo")
    try:  # not Linux (or an old kernel): physical pages not in use
        pages = os.sysconf("SC_AVPHYS_PAGES")
        return Available(pages * os.sysconf("SC_PAGE_SIZE"), "free physical pages")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available(proc_cgroup: str | None, root: str) -> Available | None:
    """Headroom under the tightest cgroup memory limit of this process (``None``: none).

    ``proc_cgroup`` is the text of ``/proc/self/cgroup``; ``root`` the cgroup mount
    (``/sys/fs/cgroup``). Headroom = limit - (usage - reclaimable inactive page cache),
    taken at the process's cgroup and each ancestor (any of them may hold the limit).
    Inside a cgroup namespace the listed path may not exist under ``root``; the root
    of the mount is then the process's own cgroup.
    """
    if not proc_cgroup:
        return None
    best: Available | None = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2 unified hierarchy
            base, files = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base = os.path.join(root, "memory")
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        for directory in _levels(base, path):
            found = _headroom(directory, *files)
            if found is not None and (best is None or found.bytes < best.bytes):
                best = found
    return best


def _levels(base: str, path: str) -> list[str]:
    """``base/path`` and each of its ancestors up to ``base``."""
    rel = [p for p in path.strip().split("/") if p and p not in (".", "..")]
    return [os.path.join(base, *rel[:i]) for i in range(len(rel), -1, -1)]


def _headroom(directory: str, limit_file: str, usage_file: str, stat_key: str) -> Available | None:
    limit_path = os.path.join(directory, limit_file)
    text = _read(limit_path)  # None where the level does not exist (namespaced path)
    if text is None or text.strip() in ("", "max"):
        return None
    try:
        limit = int(text)
        usage = int(_read(os.path.join(directory, usage_file)) or 0)
    except ValueError:
        return None
    if limit >= _V1_UNLIMITED:
        return None
    reclaimable = 0
    for line in (_read(os.path.join(directory, "memory.stat")) or "").splitlines():
        key, _, num = line.partition(" ")
        if key == stat_key and num.strip().isdigit():
            reclaimable = int(num)
            break
    headroom = max(0, limit - max(0, usage - reclaimable))
    return Available(headroom, f"cgroup limit of {limit} bytes in {limit_path}")
