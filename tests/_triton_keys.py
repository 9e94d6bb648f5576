"""Triton's JIT cache key of every kernel launch, rebuilt with Triton's own binder.

A compiled Triton kernel is looked up by ``(specialization of every argument, options)``
(``JITFunction.run`` -> ``compute_cache_key``): a launch whose key was not seen before is
a compile. Under the interpreter nothing compiles, so :class:`CompileCounter` rebuilds
the key of each launch made through :class:`pagedkv.ops._launch.Launcher` with
``triton.runtime.jit.create_function_from_signature`` (the binder ``JITFunction`` uses,
with the kernel's ``do_not_specialize`` list) and counts the distinct keys. A pre-run
hook on each kernel counts the launches the interpreter really ran, so a launch that
bypasses the Launcher shows up as a mismatch.
"""

from __future__ import annotations

import inspect
from collections import defaultdict

from triton.backends.compiler import BaseBackend
from triton.runtime.jit import KernelParam, create_function_from_signature

from pagedkv.ops import _launch


def _binder(kernel, specialize: bool = True):
    fn = kernel.fn
    sig = inspect.signature(fn)
    opts = getattr(kernel, "kwargs", {})  # InterpretedFunction keeps the jit() arguments
    dns = set(opts.get("do_not_specialize") or ()) if specialize else set()
    dns_oa = set(opts.get("do_not_specialize_on_alignment") or ())
    params = [
        KernelParam(i, p, i in dns or p.name in dns, i in dns_oa or p.name in dns_oa)
        for i, p in enumerate(sig.parameters.values())
    ]
    return create_function_from_signature(sig, params, BaseBackend)


def cache_key(kernel, args: tuple, options: dict, specialize: bool = True) -> tuple:
    """Triton's cache key of ``kernel[grid](*args, **options)``; ``specialize=False``
    ignores the kernel's ``do_not_specialize`` (what a plain ``@triton.jit`` would do)."""
    _, spec, _ = _binder(kernel, specialize)(*args)
    spec = tuple(tuple(s) if isinstance(s, list) else s for s in spec)
    return (kernel.fn.__qualname__, spec, tuple(sorted(options.items())))


class CompileCounter:
    """Records the cache key of every Launcher launch while installed (see module doc)."""

    def __init__(self, monkeypatch, kernels) -> None:
        self.keys: set[tuple] = set()
        self.by_launcher: dict[int, set] = defaultdict(set)
        self.loose_keys: set[tuple] = set()  # the same launches without do_not_specialize
        self.launched = 0  # through the Launcher
        self.ran = 0  # seen by the kernels' pre-run hooks
        original = _launch.Launcher.__call__

        def counted(launcher, grid, *args):
            full = (*args, *launcher.tail)
            key = cache_key(launcher.kernel, full, launcher.options)
            self.keys.add(key)
            self.by_launcher[id(launcher)].add(key)
            self.loose_keys.add(cache_key(launcher.kernel, full, launcher.options, False))
            self.launched += 1
            return original(launcher, grid, *args)

        monkeypatch.setattr(_launch.Launcher, "__call__", counted)
        self._kernels = list(kernels)
        for k in self._kernels:
            k.add_pre_run_hook(self._ran)

    def _ran(self, *args, **kwargs) -> None:
        self.ran += 1

    def close(self) -> None:
        for k in self._kernels:
            k.pre_run_hooks.remove(self._ran)
