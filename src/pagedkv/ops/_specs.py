"""Shape classes of op calls: the checks that read only metadata run once per class.

A call's key holds everything the shape / dtype / device checks and the backend choice
read: tensor metadata other than the row counts, the scalar options with their types,
the backend settings. The first call with a key runs the full checks of
``ops/_checks.py`` (they raise the clear errors) and keeps what they found, with
the Triton kernels of that class; later calls with the key check only that the row
counts agree. A key that cannot be built (an argument that is not a tensor, an
unhashable option) always gets the full checks. Value checks (``check=True``) read the
data and run on every call, in :mod:`pagedkv.ops`.

The dicts below are caches of pure functions of their keys (like Triton's own kernel
cache): they hold no tensors and never change a result, only skip repeated work.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, NamedTuple, Protocol

from pagedkv._kv_formats import COMPUTE_DTYPES, is_quantized
from pagedkv.ops import _checks
from pagedkv.ops._config import get_backend, resolve

MAX_ENTRIES = 512  # per op; a caller with ever-new keys (e.g. random scales) stays bounded

_TRITON_MODULES: dict = {}


def triton_module(name: str):
    """The module ``pagedkv.ops.triton_<name>``, imported on first use (triton is optional)."""
    mod = _TRITON_MODULES.get(name)
    if mod is None:
        mod = _TRITON_MODULES[name] = import_module(f"pagedkv.ops.triton_{name}")
    return mod


class Kernels(Protocol):
    """The bound Triton kernels of one shape class (``triton_decode.DecodeKernels``,
    ``triton_prefill.PrefillKernels``, ``triton_memory.WriteKernels``,
    ``triton_quant.QuantWriteKernels``): each op calls its own ``run`` with its own
    arguments, so only the name is common."""

    def run(self, *args: Any, **kwargs: Any) -> Any: ...


class AttnSpec(NamedTuple):
    """What the checks of one attention shape class found."""

    scale: float
    window: int | None
    softcap: float | None
    invariant: bool
    kernels: Kernels | None  # the Triton kernels of the class; None: torch reference
    scalars: tuple | None  # their (qk_scale, cap_log2, window) arguments


class WriteSpec(NamedTuple):
    """What the checks of one KV-write shape class found."""

    num_slots: int
    kernels: Kernels | None  # triton_memory.WriteKernels / triton_quant.QuantWriteKernels
    quantized: bool  # into an fp8 / int8 cache (with scales)
    static_scales: tuple[float, float] | None  # fixed (k, v) scales; None: dynamic


_DECODE: dict[tuple, AttnSpec] = {}
_PREFILL: dict[tuple, AttnSpec] = {}
_WRITE: dict[tuple, WriteSpec] = {}


def _remember(cache: dict, key: tuple | None, spec) -> None:
    if key is not None:
        if len(cache) >= MAX_ENTRIES:
            cache.clear()
        cache[key] = spec


def _scales_key(ks, vs) -> tuple | None:
    if ks is None and vs is None:
        return None
    return (type(ks), ks.shape, ks.stride(), ks.dtype, ks.device, type(vs), vs.shape,
            vs.stride(), vs.dtype, vs.device)  # fmt: skip


def decode(
    q, k, v, bt, sl, scale, window, softcap, sinks, backend, invariant, ks=None, vs=None
) -> AttnSpec:
    """Checked spec of a :func:`pagedkv.ops.decode_attention` call (raises on bad input)."""
    try:
        key = (type(q), q.dtype, q.shape[1:], q.device, k.shape, k.stride(), k.dtype, k.device,
               v.shape, v.stride(), v.dtype, v.device, bt.dtype, bt.dim(), bt.device, sl.dtype,
               sl.dim(), sl.device, scale, type(scale), window, type(window), softcap,
               type(softcap), sinks if sinks is None else (sinks.shape, sinks.dtype, sinks.device),
               backend, get_backend(), invariant, _scales_key(ks, vs))  # fmt: skip
        spec = _DECODE.get(key)
        n = q.shape[0]
        if spec is not None and bt.shape[0] == n and sl.shape[0] == n:
            return spec
    except (AttributeError, TypeError, IndexError):  # not tensors: the full checks say what
        key = None
    _checks.cache_pair(k, v)
    bsz, _ = _checks.query(q, "q", k, 3)
    opts = _checks.attn_options(scale, window, softcap, sinks, q, False)
    _checks.tables(bt, sl, bsz, k.device)
    name = resolve(backend, q.device)
    _checks.kv_scales(k, ks, vs, name)
    kern = scal = None
    if name == "triton":
        td = triton_module("decode")
        kern = td.kernels(q, k, v, bt, sl, sinks, opts.softcap is not None, invariant, None,
                          ks, vs)  # fmt: skip
        scal = td.scalars(opts.scale, opts.softcap, opts.window)
    spec = AttnSpec(opts.scale, opts.window, opts.softcap, invariant, kern, scal)
    _remember(_DECODE, key, spec)
    return spec


def prefill(q, cu, k, v, bt, sl, scale, window, softcap, sinks, backend, ks=None, vs=None):
    """Checked spec of a :func:`pagedkv.ops.prefill_attention` call (raises on bad input)."""
    try:
        key = (type(q), q.dtype, q.shape[1:], q.device, k.shape, k.stride(), k.dtype, k.device,
               v.shape, v.stride(), v.dtype, v.device, cu.dtype, cu.dim(), cu.device, bt.dtype,
               bt.dim(), bt.device, sl.dtype, sl.dim(), sl.device, scale, type(scale), window,
               type(window), softcap, type(softcap),
               sinks if sinks is None else (sinks.shape, sinks.dtype, sinks.device),
               backend, get_backend(), _scales_key(ks, vs))  # fmt: skip
        spec = _PREFILL.get(key)
        n = cu.shape[0] - 1
        if spec is not None and bt.shape[0] == n and sl.shape[0] == n:
            return spec
    except (AttributeError, TypeError, IndexError):
        key = None
    _checks.cache_pair(k, v)
    _checks.query(q, "q", k, 3)
    opts = _checks.attn_options(scale, window, softcap, sinks, q, False)
    cu = _checks.cu_seqlens(cu, k.device)
    _checks.tables(bt, sl, cu.shape[0] - 1, k.device)
    name = resolve(backend, q.device)
    _checks.kv_scales(k, ks, vs, name)
    kern = scal = None
    if name == "triton":
        tp = triton_module("prefill")
        kern = tp.kernels(q, cu, k, v, bt, sl, sinks, opts.softcap is not None, ks, vs)
        scal = triton_module("decode").scalars(opts.scale, opts.softcap, opts.window)
    spec = AttnSpec(opts.scale, opts.window, opts.softcap, False, kern, scal)
    _remember(_PREFILL, key, spec)
    return spec


def write(pool_k, pool_v, slots, k, v, backend, ks=None, vs=None, static=None) -> WriteSpec:
    """Checked spec of a :func:`pagedkv.ops.write_kv` call (raises on bad input)."""
    try:
        key = (pool_k.shape, pool_k.stride(), pool_k.dtype, pool_k.device, pool_v.shape,
               pool_v.stride(), pool_v.dtype, pool_v.device, type(k), k.shape[1:], k.dtype,
               k.device, type(v), v.shape[1:], v.dtype, v.device, slots.dtype, slots.dim(),
               slots.device, backend, get_backend(), _scales_key(ks, vs),
               static if static is None else (type(static), *static))  # fmt: skip
        hash(key)
        spec = _WRITE.get(key)
        if spec is not None and k.shape[0] == v.shape[0] == slots.shape[0]:
            return spec
    except (AttributeError, TypeError, IndexError):
        key = None
    nb, bs, hkv, d = _checks.cache_pair(pool_k, pool_v)
    quantized = is_quantized(pool_k.dtype)
    for name, x in (("k", k), ("v", v)):
        _checks.tensor(x, name)
        if x.dim() != 3 or tuple(x.shape[1:]) != (hkv, d):
            raise ValueError(f"{name} must be [N, {hkv}, {d}], got shape {tuple(x.shape)}")
        if quantized and x.dtype not in COMPUTE_DTYPES:
            raise TypeError(
                f"{name} dtype {x.dtype} must be a float dtype (float16, bfloat16, float32); "
                f"the {pool_k.dtype} cache quantizes it"
            )
        if not quantized and x.dtype != pool_k.dtype:
            raise TypeError(
                f"{name} dtype {x.dtype} != KV cache dtype {pool_k.dtype}; cast it first"
            )
        _checks.same_device(x, name, pool_k.device)
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k has {k.shape[0]} tokens but v has {v.shape[0]}")
    _checks.slots(slots, k.shape[0], nb * bs, pool_k.device, False)
    static = _checks.static_scales(static, pool_k.dtype)
    name = resolve(backend, pool_k.device)
    _checks.kv_scales(pool_k, ks, vs, name)
    kern = None
    if name == "triton":
        if quantized:
            kern = triton_module("quant").write_kernels(
                pool_k, pool_v, ks, vs, slots, static is not None
            )
        else:
            kern = triton_module("memory").write_kernels(pool_k, pool_v, slots, k)
    spec = WriteSpec(nb * bs, kern, quantized, static)
    _remember(_WRITE, key, spec)
    return spec
