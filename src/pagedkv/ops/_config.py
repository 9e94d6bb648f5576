"""Backend and batch-invariance settings of :mod:`pagedkv.ops`.

Each setting is a ``ContextVar``: its value belongs to the current context, which is
the calling thread (a new thread starts from the defaults; on Python builds that copy
the parent's context into threads, ``sys.flags.thread_inherit_context``, from the
values at its start) or the current asyncio task (a task starts from a copy of its
creator's context). So a setting never reaches another thread, and a change made in a
thread after another one started never reaches it; within a thread it is a value for
the rest of that thread, like any global, until changed again.

The scoped forms are the recommended ones: :func:`use_backend` and
:func:`pagedkv.ops.batch_invariant_mode` (the flag, :func:`invariant_flag`, plus the
routing of a model's ops) set a value for a ``with`` block and restore the previous one
on exit, also on an exception. :func:`set_backend` and :func:`set_batch_invariant`
set it for the rest of the current context and return the previous value, so a caller
that cannot use a ``with`` block restores it with a second call.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from contextvars import ContextVar

import torch

BACKENDS = ("reference", "triton")

_backend: ContextVar[str | None] = ContextVar("pagedkv_ops_backend", default=None)
_invariant: ContextVar[bool] = ContextVar("pagedkv_ops_batch_invariant", default=False)


def set_backend(name: str | None) -> str | None:
    """Force a backend for every op for the rest of the current context (this thread or
    asyncio task; never another thread, see the module doc): ``"reference"``,
    ``"triton"`` or ``None`` (automatic: Triton for CUDA tensors when Triton is
    installed, else reference). Returns the previous choice (``set_backend(previous)``
    restores it); prefer ``with use_backend(name):``, which restores it by itself."""
    previous = _backend.get()
    _backend.set(_check_backend(name))
    return previous


def get_backend() -> str | None:
    """The forced backend, or ``None`` when chosen automatically."""
    return _backend.get()


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous choice on exit."""
    token = _backend.set(_check_backend(name))
    try:
        yield
    finally:
        _backend.reset(token)


def set_batch_invariant(enabled: bool) -> bool:
    """Turn batch-invariant mode on or off for the rest of the current context (this
    thread or asyncio task; never another thread, see the module doc) — a flag, nothing
    else. Returns the previous value (``set_batch_invariant(previous)`` restores it);
    prefer ``with pagedkv.ops.batch_invariant_mode():``, which restores it by itself.

    In this mode the output for one sequence is bit-identical whatever other sequences
    share its batch and wherever it sits in it (fixed split size in tokens, fixed
    reduction order). The flag switches pagedkv's own ops (attention kernels, the
    engine's sampler); a model forward run under it is invariant as a whole only inside
    :func:`pagedkv.ops.invariant_forward` (what :func:`pagedkv.ops.batch_invariant_mode`
    and the engine enter), which routes the model's matmuls and reductions to invariant
    kernels.
    """
    previous = _invariant.get()
    _invariant.set(bool(enabled))
    return previous


def is_batch_invariant() -> bool:
    """Whether batch-invariant mode is on in this context."""
    return _invariant.get()


@contextlib.contextmanager
def invariant_flag(enabled: bool = True) -> Iterator[None]:
    """The batch-invariance flag alone for the block (:func:`set_batch_invariant`
    restored on exit, also on an exception). :func:`pagedkv.ops.batch_invariant_mode`
    is this plus the routing of a model's own ops (:func:`pagedkv.ops.invariant_forward`)."""
    token = _invariant.set(bool(enabled))
    try:
        yield
    finally:
        _invariant.reset(token)


def _check_backend(name: str | None) -> str | None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; use one of {BACKENDS} or None (automatic)")
    return name


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when ``import triton`` works (it is an optional dependency)."""
    try:
        import triton  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run through the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(backend: str | None, device: torch.device) -> str:
    """Pick the backend for tensors on ``device``; raise if the choice cannot run there."""
    name = _check_backend(backend) or _backend.get()
    if name is None:
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if name == "triton":
        if not triton_available():
            raise RuntimeError(
                "backend='triton' needs the triton package (pip install 'pagedkv[triton]'); "
                "use backend='reference' instead"
            )
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got {device}; use backend='reference' "
                "or set TRITON_INTERPRET=1 (before importing triton) to run the kernels on CPU"
            )
    return name


def resolve_invariant(batch_invariant: bool | None) -> bool:
    return _invariant.get() if batch_invariant is None else bool(batch_invariant)
