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
from typing import Any, NamedTuple

import torch

from pagedkv.ops._config import interpreting

ALIGN_MASK = 15  # Triton specializes pointers on 16-byte alignment
INT_MASK = ~0x7FFFFFF0  # an int of the bound class: 0 <= x < 2**31, x % 16 == 0


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

    ``zeroed``: int32 counters, zero when made (a fresh buffer under capture is zeroed
    inside the graph), which their kernels leave zero again when they finish; kept on the
    CPU too (the interpreter runs launches in order). Else float32, uninitialised, and on
    the CPU a new buffer per call.
    """

    MAX_BUFFERS = 64  # threads come and go; dropping a buffer is always safe (see above)

    def __init__(self, zeroed: bool = False) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}
        self._zeroed = zeroed
        self._dtype = torch.int32 if zeroed else torch.float32

    def _new(self, like: torch.Tensor, numel: int) -> torch.Tensor:
        if self._zeroed:
            return like.new_zeros(numel, dtype=self._dtype)
        return like.new_empty(numel, dtype=self._dtype)

    def get(self, like: torch.Tensor, numel: int) -> torch.Tensor:
        """A tensor of at least ``numel`` elements on ``like``'s device."""
        key: tuple
        if like.is_cuda:
            if torch.cuda.is_current_stream_capturing():
                return self._new(like, numel)
            dev = like.get_device()
            key = (dev, torch._C._cuda_getCurrentRawStream(dev), threading.get_ident())
        elif self._zeroed:
            key = (str(like.device), 0, threading.get_ident())
        else:
            return self._new(like, numel)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            if len(self._bufs) >= self.MAX_BUFFERS:
                self._bufs.clear()
            old = 0 if buf is None else buf.numel()
            buf = self._bufs[key] = self._new(like, max(numel, 2 * old))
        return buf
