"""The CUDA runtime calls torch does not expose: pitched copies and page-locking memory that
torch allocated, bound with ctypes to the ``libcudart`` torch has loaded.

Why: a block of a CPU pool is ``2 L`` segments ``num_blocks`` segments apart. torch copies a
strided CPU tensor to a GPU through a contiguous pageable temporary (ATen's
``copy_requires_temporaries``), so a block costs a host gather and a staged copy. One
``cudaMemcpy2DAsync`` instead moves a block's segments (or a run of consecutive blocks)
between two pools on the copy engine, with no host pass, when the CPU pool's pages are
locked (``cudaHostRegister``). vLLM binds its IPC calls the same way; nothing is built.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import weakref

import torch

MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from the pointers (unified addressing)
HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, not only the current device's
HOST_REGISTER_MAPPED = 2  # cudaHostRegisterMapped: a device address for the pages too
DEV_ATTR_MAX_PITCH = 11  # cudaDevAttrMaxPitch
CUDA_ERROR_INVALID_VALUE = 1


class CudaRuntimeError(RuntimeError):
    """A CUDA runtime call failed; ``code`` is its ``cudaError_t``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class CudaRuntime:
    """The calls of one ``libcudart`` (see :func:`runtime`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        lib = ctypes.CDLL(path)
        size, ptr, c_int = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int
        signatures = {
            "cudaMemcpy2DAsync": [ptr, size, ptr, size, size, size, c_int, ptr],
            "cudaHostRegister": [ptr, size, ctypes.c_uint],
            "cudaHostUnregister": [ptr],
            "cudaHostGetDevicePointer": [ctypes.POINTER(ptr), ptr, ctypes.c_uint],
            "cudaDeviceGetAttribute": [ctypes.POINTER(c_int), c_int, c_int],
            "cudaGetLastError": [],
        }
        for name, args in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, c_int
        lib.cudaGetErrorString.argtypes, lib.cudaGetErrorString.restype = [c_int], ctypes.c_char_p
        self._lib = lib

    def __repr__(self) -> str:
        return f"CudaRuntime({self.path!r})"

    def memcpy_2d(
        self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream: int
    ) -> None:
        """Enqueue on ``stream`` a copy of ``height`` rows of ``width`` bytes, ``spitch``
        bytes apart at ``src``, to rows ``dpitch`` bytes apart at ``dst`` (any devices)."""
        err = self._lib.cudaMemcpy2DAsync(
            dst, dpitch, src, spitch, width, height, MEMCPY_DEFAULT, stream
        )
        self._check(err, "cudaMemcpy2DAsync")

    def host_register(self, ptr: int, size: int) -> None:
        self._check(
            self._lib.cudaHostRegister(ptr, size, HOST_REGISTER_PORTABLE | HOST_REGISTER_MAPPED),
            "cudaHostRegister",
        )

    def device_pointer(self, ptr: int) -> int | None:
        """The device address of page-locked, mapped host memory at ``ptr`` (``None`` when
        it is not mapped: pageable, or locked without the mapping)."""
        out = ctypes.c_void_p()
        if self._lib.cudaHostGetDevicePointer(ctypes.byref(out), ptr, 0):
            self._lib.cudaGetLastError()  # clear it: torch would raise it later
            return None
        return out.value

    def host_unregister(self, ptr: int) -> None:
        self._check(self._lib.cudaHostUnregister(ptr), "cudaHostUnregister")

    def max_pitch(self, device: int) -> int:
        """The largest row pitch :meth:`memcpy_2d` takes on ``device``."""
        value = ctypes.c_int()
        err = self._lib.cudaDeviceGetAttribute(ctypes.byref(value), DEV_ATTR_MAX_PITCH, device)
        self._check(err, "cudaDeviceGetAttribute(MaxPitch)")
        return value.value

    def _check(self, err: int, what: str) -> None:
        if err:
            self._lib.cudaGetLastError()  # a failed call stays "last error"; torch would raise it
            text = self._lib.cudaGetErrorString(err).decode(errors="replace")
            raise CudaRuntimeError(err, f"{what} failed: {text} (cudaError {err})")


def find_loaded(name: str = "libcudart") -> str | None:
    """Path of the first shared library named ``name*`` mapped into this process."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line[line.find("/") :].strip() if "/" in line else ""
                file = path.rpartition("/")[2]
                if file.startswith((name + ".so", name + "-")) and ".so" in file:
                    return path
    except OSError:
        return None
    return None


@functools.cache
def runtime() -> CudaRuntime | None:
    """The ``libcudart`` torch uses (the one mapped here once CUDA is initialised), or
    ``None`` without CUDA or when none can be loaded (direct copies are then off)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.init()
    candidates = [find_loaded(), "libcudart.so", f"libcudart.so.{_major()}"]
    for path in filter(None, candidates):
        try:
            return CudaRuntime(path)
        except (OSError, AttributeError):
            continue
    return None


def _major() -> str:
    return (torch.version.cuda or "12").split(".")[0]


def is_page_locked(t: torch.Tensor) -> bool:
    """Whether the CPU tensor's memory is page-locked (pinned at allocation or registered),
    so the copy engine reads and writes it directly."""
    if t.device.type != "cpu" or t.numel() == 0 or not torch.cuda.is_available():
        return False
    return bool(t.is_pinned())


class PageLock:
    """The pages of a contiguous CPU tensor, page-locked until :meth:`release` (or until
    this object is collected).

    ``owned`` is false when the memory was page-locked already (pinned at allocation or
    registered by someone else): nothing was registered then, and release does nothing.
    The lock holds a reference to the tensor, so the memory cannot be freed while its
    pages are registered. It registers the whole pages the tensor touches, and only when
    those pages lie inside the tensor's own storage (as :func:`own_pages` allocates it):
    a page shared with another allocation (malloc places tensors of up to 32 MiB on the
    heap) would leave that allocation's copies straddling a registered range, which CUDA
    refuses with "invalid argument". Raises :class:`CudaRuntimeError` when the pages are
    shared or registering fails (not enough lockable memory, a registered range already).
    """

    def __init__(self, t: torch.Tensor, rt: CudaRuntime) -> None:
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("only a contiguous CPU tensor can be page-locked")
        self.nbytes = t.numel() * t.element_size()
        self.owned = not is_page_locked(t)
        self._finalizer = None
        if self.owned:
            first = t.data_ptr() & ~(mmap.PAGESIZE - 1)
            end = -(-(t.data_ptr() + self.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE
            storage = t.untyped_storage()
            base = storage.data_ptr()
            if first < base or end > base + storage.nbytes():
                raise CudaRuntimeError(
                    CUDA_ERROR_INVALID_VALUE,
                    "the tensor shares memory pages with other allocations; allocate it "
                    "with storage.cudart.own_pages (KVPool does on CPU) to page-lock it",
                )
            rt.host_register(first, end - first)
            self._finalizer = weakref.finalize(self, _unregister, rt, first, t)

    @property
    def locked(self) -> bool:
        """Whether this lock still holds registered pages."""
        return self._finalizer is not None and self._finalizer.alive

    def release(self) -> None:
        """Unregister the pages this lock registered (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()


#: own_pages() asks the kernel for transparent huge pages on mappings of at least this
#: many bytes: locking them is 3x faster, and copies of scattered blocks to and from them
#: a few per cent faster (1 GiB on the H200: cuda -> cpu 78 -> 80 % of a pinned copy)
HUGE_PAGE_MIN = 64 << 20


def own_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor of ``shape`` on an anonymous memory mapping of its own (whole
    pages, page-aligned), so :class:`PageLock` can lock its pages without locking another
    allocation's. The mapping is unmapped when the tensor's storage is freed. Its memory is
    committed on first touch: by 4 KiB pages, or by 2 MiB where the kernel grants the huge
    pages asked for (mappings of :data:`HUGE_PAGE_MIN` bytes or more), so a pool whose
    first blocks are written commits whole 2 MiB stretches (at most the pool's size, which
    ``torch.zeros`` committed at once)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = itemsize
    for n in shape:
        nbytes *= n
    size = max(-(-nbytes // mmap.PAGESIZE), 1) * mmap.PAGESIZE
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= HUGE_PAGE_MIN and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # a hint: transparent huge pages may be off
            mapping.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # the storage keeps the mapping alive
    return raw[:nbytes].view(dtype).view(shape)


def _unregister(rt: CudaRuntime, ptr: int, keep: torch.Tensor) -> None:
    """``keep``: the tensor, held until the pages are unregistered."""
    with contextlib.suppress(CudaRuntimeError):  # the context is gone (interpreter exit)
        rt.host_unregister(ptr)


class _Mapped:
    """``__cuda_array_interface__`` of a page-locked CPU tensor's device mapping; holds the
    tensor, so the memory outlives every CUDA tensor made from this."""

    def __init__(self, t: torch.Tensor, address: int) -> None:
        self.tensor = t
        nbytes = t.numel() * t.element_size()
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (address, False), "version": 3,
            "strides": None,
        }  # fmt: skip


def device_view(t: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A CUDA tensor on ``device`` over the memory of the contiguous, page-locked CPU
    tensor ``t`` (its device mapping: kernels read and write the host memory over the bus,
    no copy engine), or ``None`` when ``t`` has no mapping (pageable, locked without
    ``cudaHostRegisterMapped``, no CUDA runtime). It holds ``t``, not its lock: the caller
    keeps the pages locked while the view is in use."""
    rt = runtime()
    if rt is None or not t.is_contiguous() or not is_page_locked(t):
        return None
    address = rt.device_pointer(t.data_ptr())
    if address is None:
        return None
    raw = torch.as_tensor(_Mapped(t, address), device=device)
    return raw.view(t.dtype).view(t.shape)
