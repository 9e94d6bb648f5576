"""Low-overhead Triton launches: each kernel variant is bound once, then called directly.

``kernel[grid](*args)`` costs tens of microseconds of host time per call (Triton 3.x
re-derives the specialization of every argument, builds a cache key from them and the
options, checks the kernel's globals and asks the driver about every pointer). A
:class:`Launcher` fixes everything that decides which compiled kernel runs (constexprs,
the ints that stay specialized, the dtypes of the pointers, the options) when it is
made; its first launch goes through ``kernel[grid]`` and keeps the compiled kernel,
later ones call that kernel's launcher with raw pointers.

Soundness rests on the caller: every int argument that may change between calls is
annotated ``tl.int32`` and listed in ``do_not_specialize`` (so Triton gives it one
specialization whatever its value), and every other non-constexpr argument of a
Launcher is the same on every call (in ``tail``) or a tensor of a fixed dtype. Pointer
alignment (Triton specializes on 16-byte alignment) is checked per call: a misaligned
pointer takes the ordinary path. So does every call while a Triton launch hook (a
profiler) is installed, or where the fast path is unavailable (the interpreter, a
Triton whose compiled kernels lack the ``run`` / ``function`` / ``packed_metadata``
attributes of 3.x).
"""

from __future__ import annotations

import threading
from functools import reduce
from operator import or_
from typing import NamedTuple

import torch

from pagedkv.ops._config import interpreting

ALIGN_MASK = 15  # Triton specializes pointers on 16-byte alignment


class _Bound(NamedTuple):
    run: object  # the compiled kernel's C launcher
    function: int
    metadata: tuple


class _Driver(NamedTuple):
    current_device: object
    current_stream: object
    runtime: object  # triton.knobs.runtime (launch hooks)


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

    ``args`` (per call): the first ``n_ptrs`` are tensors, then the per-call scalars.
    ``tail`` (fixed): the ints that stay specialized and the constexpr values.
    ``options``: ``num_warps`` / ``num_stages``.
    """

    __slots__ = ("kernel", "n_ptrs", "tail", "options", "_bound", "_fast")

    def __init__(self, kernel, n_ptrs: int, tail: tuple, **options) -> None:
        self.kernel = kernel
        self.n_ptrs = n_ptrs
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
                ptrs = [a.data_ptr() for a in args[: self.n_ptrs]]
                rt = drv.runtime
                if (
                    not reduce(or_, ptrs) & ALIGN_MASK
                    and _hook_idle(rt.launch_enter_hook)
                    and _hook_idle(rt.launch_exit_hook)
                ):
                    bound.run(
                        grid[0], grid[1], grid[2], drv.current_stream(dev), bound.function,
                        bound.metadata, None, None, None, *ptrs, *args[self.n_ptrs :],
                        *self.tail,
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
        if reduce(or_, [a.data_ptr() for a in args[: self.n_ptrs]]) & ALIGN_MASK:
            return  # Triton compiled (or reused) the variant for misaligned pointers
        self._bound[drv.current_device()] = _Bound(compiled.run, function, metadata)

    @property
    def bound_devices(self) -> tuple[int, ...]:
        """Devices on which the compiled kernel is bound (diagnostics, tests)."""
        return tuple(self._bound)


class Scratch:
    """Float32 workspace reused across calls, one buffer per (device, stream, thread).

    Reuse is safe because every user of a buffer runs on the buffer's own stream (work on
    one stream runs in order) from one thread (two threads interleaving launches on a
    shared stream would not be), and the buffer was allocated on that stream (so when it
    is replaced, the allocator reuses its memory only after the work queued there). While
    a CUDA graph is being captured a fresh buffer is handed out instead: a graph keeps the
    addresses it captured, and a cached buffer may be replaced later.
    """

    MAX_BUFFERS = 64  # threads come and go; dropping a buffer is always safe (see above)

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, like: torch.Tensor, numel: int) -> torch.Tensor:
        """A float32 tensor of at least ``numel`` elements on ``like``'s device."""
        if not like.is_cuda or torch.cuda.is_current_stream_capturing():
            return like.new_empty(numel, dtype=torch.float32)
        dev = like.get_device()
        key = (dev, torch._C._cuda_getCurrentRawStream(dev), threading.get_ident())
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < numel:
            if len(self._bufs) >= self.MAX_BUFFERS:
                self._bufs.clear()
            old = 0 if buf is None else buf.numel()
            buf = self._bufs[key] = like.new_empty(max(numel, 2 * old), dtype=torch.float32)
        return buf
