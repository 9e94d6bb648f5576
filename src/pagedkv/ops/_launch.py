"""Low-overhead Triton launches: each kernel variant is bound once, then called directly.

``kernel[grid](*args)`` costs tens of microseconds of host time per call (Triton 3.x
re-derives the specialization of every argument, builds a cache key from them and the
options, checks the kernel's globals and asks the driver about every pointer). A
:class:`Launcher` fixes everything that decides which compiled kernel runs (constexprs,
the ints that stay specialized, the dtypes of the pointers, the options) when it is
made; its first launch goes through ``kernel[grid]`` and keeps the compiled kernel,
later ones call that kernel's launcher with raw pointers.

Soundness rests on the caller, who lays a kernel's parameters out as: pointers (tensors
of a dtype fixed per Launcher), then ints that stay specialized (strides that make loads
vector-wide), then per-call scalars whose specialization never changes (floats, and ints
annotated ``tl.int32`` / ``tl.int64`` and listed in ``do_not_specialize``), then the
fixed ``tail`` (ints that are the same on every call, constexprs). Triton specializes a
pointer on 16-byte alignment and an int on being 1 or a multiple of 16 (and on its
width): the bound kernel is the variant where every pointer is 16-byte aligned and every
specialized int a multiple of 16 below 2**31, and only calls of that class take the fast
path. Any other call takes the ordinary path (Triton picks or compiles its variant), as
does every call while a Triton launch hook (a profiler) is installed, or where the fast
path is unavailable (the interpreter, or a Triton whose compiled kernels lack the
``run`` / ``function`` / ``packed_metadata`` attributes of 3.x).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import reduce
from operator import or_
from typing import Any, NamedTuple, TypeVar

import torch

from pagedkv.ops._config import interpreting

ALIGN_MASK = 15  # Triton specializes pointers on 16-byte alignment
INT_MASK = ~0x7FFFFFF0  # an int of the bound class: 0 <= x < 2**31, x % 16 == 0


K = TypeVar("K")
T = TypeVar("T")


def made_once(cache: dict[K, T], key: K, make: Callable[[K], T]) -> T:
    """``cache[key]``, made by ``make(key)`` and kept on first use (a compile cache)."""
    made = cache.get(key)
    if made is None:
        made = cache[key] = make(key)
    return made


class _Bound(NamedTuple):
    run: Any  # the compiled kernel's C launcher
    function: int
    metadata: tuple


class _Driver(NamedTuple):
    current_device: Callable[[], int]
    current_stream: Callable[[int], int]
    runtime: Any  # triton.knobs.runtime (launch hooks)


_DRIVER: list[_Driver] = []  # resolved on the first binding (needs CUDA)


def _driver() -> _Driver | None:
    if not _DRIVER:
        try:
            from triton import knobs
            from triton.runtime import driver

            active = driver.active
            _DRIVER.append(
                _Driver(active.get_current_device, active.get_current_stream, knobs.runtime)
            )
        except (ImportError, AttributeError, RuntimeError):
            return None
    return _DRIVER[0]


def _hook_idle(hook) -> bool:
    return hook is None or (not getattr(hook, "calls", True))


class Launcher:
    """Launch ``kernel`` over ``grid`` with ``(*args, *tail)`` as its parameters in order.

    ``args`` (per call): ``n_ptrs`` tensors, ``n_ints`` specialized ints, then scalars
    that are never specialized. ``tail`` (fixed): ints the same on every call, and the
    constexpr values. ``options``: ``num_warps`` / ``num_stages``.
    """

    __slots__ = ("kernel", "n_ptrs", "n_ints", "tail", "options", "_bound", "_fast")

    def __init__(self, kernel, n_ptrs: int, n_ints: int, tail: tuple, **options) -> None:
        self.kernel = kernel
        self.n_ptrs = n_ptrs
        self.n_ints = n_ints
        self.tail = tail
        self.options = options
        self._bound: dict[int, _Bound] = {}  # current device -> compiled kernel
        self._fast = not interpreting()

    def __call__(self, grid: tuple, *args) -> None:
        if self._bound:  # only ever filled where the fast path works
            drv = _DRIVER[0]
            dev = drv.current_device()
            bound = self._bound.get(dev)
            if bound is not None:
                n = self.n_ptrs
                ptrs = [a.data_ptr() for a in args[:n]]
                rt = drv.runtime
                enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
                if (
                    not reduce(or_, ptrs) & ALIGN_MASK
                    and not reduce(or_, args[n : n + self.n_ints], 0) & INT_MASK
                    and (enter is None or _hook_idle(enter))  # no call for the usual None
                    and (leave is None or _hook_idle(leave))
                ):
                    gx, gy, gz = (*grid, 1, 1)[:3]  # a 1-D or 2-D grid is padded as Triton does
                    bound.run(
                        gx, gy, gz, drv.current_stream(dev), bound.function,
                        bound.metadata, None, None, None, *ptrs, *args[n:], *self.tail,
                    )  # fmt: skip
                    return
        compiled = self.kernel[grid](*args, *self.tail, **self.options)
        if self._fast:
            self._bind(compiled, args)

    def _bind(self, compiled, args) -> None:
        """Keep the kernel Triton just launched, if it is the aligned variant."""
        function = getattr(compiled, "function", None)
        metadata = getattr(compiled, "packed_metadata", None)
        drv = _driver()
        if function is None or metadata is None or drv is None:
            self._fast = False  # not a Triton whose compiled kernels we can call
            return
        n = self.n_ptrs
        if (
            reduce(or_, [a.data_ptr() for a in args[:n]]) & ALIGN_MASK
            or reduce(or_, args[n : n + self.n_ints], 0) & INT_MASK
        ):
            return  # Triton launched another variant than the one calls are checked for
        self._bound[drv.current_device()] = _Bound(compiled.run, function, metadata)

    @property
    def bound_devices(self) -> tuple[int, ...]:
        """Devices on which the compiled kernel is bound (diagnostics, tests)."""
        return tuple(self._bound)


class Scratch:
    """Workspace reused across calls, one buffer per (device, stream, thread).

    Reuse is safe because every user of a buffer runs on the buffer's own stream (work on
    one stream runs in order) from one thread (two threads interleaving launches on a
    shared stream would not be), and the buffer was allocated on that stream (so when it
    is replaced, the allocator reuses its memory only after the work queued there). While
    a CUDA graph is being captured a fresh buffer is handed out instead: a graph keeps the
    addresses it captured, and a cached buffer may be replaced later.

    :meth:`counted` also hands out int32 counters from a second buffer of the same key:
    zero when made (a fresh buffer under capture is zeroed inside the graph), which their
    kernels leave zero again when they finish; on the CPU (the interpreter runs launches
    in order) they are kept too, while float32 buffers there are new per call.
    """

    MAX_BUFFERS = 64  # threads come and go; dropping a buffer is always safe (see above)

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}
        self._counts: dict[tuple, torch.Tensor] = {}

    def get(self, like: torch.Tensor, numel: int) -> torch.Tensor:
        """A float32 tensor of at least ``numel`` elements on ``like``'s device."""
        key = _stream_key(like)
        if key is None or not like.is_cuda:
            return like.new_empty(numel, dtype=torch.float32)
        return _take(self._bufs, key, like, numel, torch.float32)

    def counted(
        self, like: torch.Tensor, numel: int, counts: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`get` and an int32 tensor of at least ``counts`` zeros (one key lookup)."""
        key = _stream_key(like)
        if key is None:  # capturing
            return like.new_empty(numel, dtype=torch.float32), like.new_zeros(
                counts, dtype=torch.int32
            )
        buf = _take(self._bufs, key, like, numel, torch.float32) if like.is_cuda else (
            like.new_empty(numel, dtype=torch.float32))  # fmt: skip
        return buf, _take(self._counts, key, like, counts, torch.int32)


def _stream_key(like: torch.Tensor) -> tuple | None:
    """(device, stream, thread) of a call on ``like``'s device; None while capturing."""
    if like.is_cuda:
        if torch.cuda.is_current_stream_capturing():
            return None
        dev = like.get_device()
        return (dev, torch._C._cuda_getCurrentRawStream(dev), threading.get_ident())
    return (str(like.device), 0, threading.get_ident())


def _take(bufs: dict, key: tuple, like: torch.Tensor, numel: int, dtype) -> torch.Tensor:
    """The buffer of ``key`` in ``bufs``, replaced by one twice as large (zeroed when
    int32) when it holds fewer than ``numel`` elements."""
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        if len(bufs) >= Scratch.MAX_BUFFERS:
            bufs.clear()
        size = max(numel, 2 * (0 if buf is None else buf.numel()))
        buf = bufs[key] = (
            like.new_zeros(size, dtype=dtype) if dtype == torch.int32
            else like.new_empty(size, dtype=dtype)
        )  # fmt: skip
    return buf
