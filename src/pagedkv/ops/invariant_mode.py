"""The hook that makes unmodified model code batch-invariant: a scoped torch dispatch mode.

:func:`invariant_forward` (entered by :func:`pagedkv.ops.batch_invariant_mode`) pushes a
:class:`BatchInvariantOps` ``TorchDispatchMode`` for the code it wraps. Every aten op the
model's Python code reaches goes through it; the ones whose result depends on the batch
— matmuls (``F.linear``, ``torch.matmul``, ``mm``/``addmm``/``bmm``/``baddbmm``...), float
sums and means (RMSNorm's ``mean``), softmax / log-softmax, cumsum, layer/RMS norms,
scaled-dot-product attention — are answered by :mod:`pagedkv.ops.invariant`; on CPU also
the activations whose vector and scalar loops disagree (silu, sigmoid, gelu; rsqrt of
half types). Everything else runs untouched.

Why a dispatch mode (measured choices, torch 2.13):

- ``TorchFunctionMode`` sees Python-level calls only: each alias (``F.linear``,
  ``Tensor.__matmul__``, ``Tensor.mean``, ``torch.einsum``...) must be caught, and ops
  that composites run in C++ (einsum's bmm, SDPA's internals) are invisible.
- ``torch.library`` impl overrides (the approach of Thinking Machines'
  batch_invariant_ops) replace the kernels process-wide: every thread sees them while
  one thread wants them, they cost a registration on each entry, and the original
  kernel cannot be called back for the ops left alone.
- A dispatch mode sees aten ops after autograd, per thread, only inside its ``with``
  block, and pops itself while handling an op (our kernels call torch freely). Under
  ``torch.inference_mode()`` composites reach it before decomposition (``aten.linear``,
  ``aten.matmul``, ``aten.softmax.int``, ``aten.scaled_dot_product_attention``), under
  ``no_grad`` after (``addmm``, ``mm``, ``bmm``, ``_softmax``, the fused SDPA ops): both
  levels are handled. Cost: a Python call per aten op while active (a few µs), nothing
  when not. CUDA-graph capture inside the mode records our Triton kernels; replay runs no
  Python at all, so a captured graph stays invariant after the mode is left.

The mode is per thread and per ``with`` block (torch keeps the mode stack per thread);
the invariance flag is the ``ContextVar`` of ``ops/_config.py``, read per op, so a
``batch_invariant_mode(False)`` block inside an active one turns the routing off.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

from pagedkv.ops import invariant as inv
from pagedkv.ops import reference_invariant as _ref
from pagedkv.ops._config import invariant_flag, is_batch_invariant

aten = torch.ops.aten


def _ok(*tensors) -> bool:
    """Plain float CPU/CUDA tensors on one device: the inputs our kernels take."""
    dev = None
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            return False
        if t.dtype not in inv.FLOAT_DTYPES or t.device.type not in ("cpu", "cuda"):
            return False
        if dev is not None and t.device != dev:
            return False
        dev = t.device
    return True


def _float(dtype) -> bool:
    return dtype is None or dtype in inv.FLOAT_DTYPES


# -- aten adapters: return NotImplemented to let torch run the op -----------------------


def _mm(a, b):
    if not _ok(a, b) or a.dtype != b.dtype:
        return NotImplemented
    return inv.gemm(a[None], b[None])[0]


def _addmm(bias, a, b, *, beta=1, alpha=1):
    if not _ok(bias, a, b) or a.dtype != b.dtype:
        return NotImplemented
    return inv.gemm(a[None], b[None], bias, beta=beta, alpha=alpha)[0]


def _bmm(a, b):
    if not _ok(a, b) or a.dtype != b.dtype:
        return NotImplemented
    return inv.gemm(a, b)


def _baddbmm(bias, a, b, *, beta=1, alpha=1):
    if not _ok(bias, a, b) or a.dtype != b.dtype:
        return NotImplemented
    return inv.gemm(a, b, bias, beta=beta, alpha=alpha)


def _matmul(a, b):
    if not _ok(a, b) or a.dtype != b.dtype:
        return NotImplemented
    return inv.matmul(a, b)


def _mv(a, x):
    if not _ok(a, x) or a.dtype != x.dtype:
        return NotImplemented
    return inv.matmul(a, x)


def _linear(x, weight, bias=None):
    if not _ok(x, weight, bias) or x.dtype != weight.dtype:
        return NotImplemented
    return inv.linear(x, weight, bias)


def _reducer(mean: bool):
    def handler(x, dim=None, keepdim=False, *, dtype=None):
        if not _ok(x) or not _float(dtype):
            return NotImplemented
        reduce = inv.reduce_mean if mean else inv.reduce_sum
        return reduce(x, dim, keepdim, dtype=dtype)

    return handler


def _softmaxer(log: bool, half_to_float: bool):
    """aten::_softmax(x, dim, half_to_float) or aten::softmax.int(x, dim, dtype=None)."""

    def handler(x, dim, arg=None):
        if half_to_float:
            out = torch.float32 if arg else None
            return inv.softmax_as(x, dim, None, log, out) if _ok(x) else NotImplemented
        return inv.softmax_as(x, dim, arg, log) if _ok(x) and _float(arg) else NotImplemented

    return handler


def _cumsum(x, dim, *, dtype=None):
    if not _ok(x) or not _float(dtype):
        return NotImplemented
    return inv.cumsum(x, dim, dtype=dtype)


def _native_layer_norm(x, normalized_shape, weight, bias, eps):
    if not _ok(x, weight, bias):
        return NotImplemented
    return inv.layer_norm(x, normalized_shape, weight, bias, eps)


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    out = _native_layer_norm(x, normalized_shape, weight, bias, eps)
    return out if out is NotImplemented else out[0]


def _rms_norm(x, normalized_shape, weight=None, eps=None):
    if not _ok(x, weight):
        return NotImplemented
    return inv.rms_norm(x, normalized_shape, weight, eps)


def _fused_rms_norm(x, normalized_shape, weight, eps):
    if not _ok(x, weight):
        return NotImplemented
    dims = inv.norm_dims(x, normalized_shape)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    rstd = torch.rsqrt(inv.reduce_mean(x.float().square(), dims, keepdim=True) + eps)
    return inv.rms_norm(x, normalized_shape, weight, eps), rstd


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    if dropout_p or not _ok(q, k, v) or (attn_mask is not None and not _mask_ok(attn_mask, q)):
        return NotImplemented
    if q.shape[-3] != k.shape[-3] and not enable_gqa:
        return NotImplemented  # torch raises its own error
    return inv.attention(q, k, v, attn_mask, is_causal, scale)[0]


def _mask_ok(mask, q) -> bool:
    return type(mask) is torch.Tensor and mask.device == q.device


def _sdpa_cpu(q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    if dropout_p or not _ok(q, k, v) or (attn_mask is not None and not _mask_ok(attn_mask, q)):
        return NotImplemented
    return inv.attention(q, k, v, attn_mask, is_causal, scale)


def _sdpa_flash(q, k, v, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    if dropout_p or return_debug_mask or not _ok(q, k, v):
        return NotImplemented
    out, lse = inv.attention(q, k, v, None, is_causal, scale)
    e = q.new_empty(0)
    return out, lse, e, e, q.shape[-2], k.shape[-2], e, e, e


def _sdpa_bias(q, k, v, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, **kw):
    """The efficient and cuDNN kernels: (out, lse, ...) with an additive bias."""
    if dropout_p or kw.get("return_debug_mask") or not _ok(q, k, v):
        return NotImplemented
    if attn_bias is not None and not _mask_ok(attn_bias, q):
        return NotImplemented
    out, lse = inv.attention(q, k, v, attn_bias, is_causal, kw.get("scale"))
    e = q.new_empty(0)
    if "return_debug_mask" in kw:  # cudnn: the flash layout of outputs
        return out, lse, e, e, q.shape[-2], k.shape[-2], e, e, e
    return out, lse, e, e


def _cpu_only(fn):
    """Elementwise ops whose CPU loops disagree between vector body and scalar tail."""

    def handler(x, *args, **kwargs):
        if x.device.type != "cpu" or not _ok(x):
            return NotImplemented
        return fn(x, *args, **kwargs)

    return handler


def _half_rsqrt(x):
    if x.dtype == torch.float32:
        return NotImplemented
    return _ref.rsqrt(x)


def _table() -> dict:
    entries = {
        "mm.default": _mm,
        "addmm.default": _addmm,
        "bmm.default": _bmm,
        "baddbmm.default": _baddbmm,
        "matmul.default": _matmul,
        "mv.default": _mv,
        "dot.default": _matmul,
        "linear.default": _linear,
        "sum.dim_IntList": _reducer(mean=False),
        "sum.default": _reducer(mean=False),
        "mean.dim": _reducer(mean=True),
        "mean.default": _reducer(mean=True),
        "_softmax.default": _softmaxer(log=False, half_to_float=True),
        "_log_softmax.default": _softmaxer(log=True, half_to_float=True),
        "softmax.int": _softmaxer(log=False, half_to_float=False),
        "log_softmax.int": _softmaxer(log=True, half_to_float=False),
        "cumsum.default": _cumsum,
        "native_layer_norm.default": _native_layer_norm,
        "layer_norm.default": _layer_norm,
        "rms_norm.default": _rms_norm,
        "_fused_rms_norm.default": _fused_rms_norm,
        "scaled_dot_product_attention.default": _sdpa,
        "_scaled_dot_product_flash_attention_for_cpu.default": _sdpa_cpu,
        "_scaled_dot_product_flash_attention.default": _sdpa_flash,
        "_scaled_dot_product_efficient_attention.default": _sdpa_bias,
        "_scaled_dot_product_cudnn_attention.default": _sdpa_bias,
        "silu.default": _cpu_only(_ref.silu),
        "sigmoid.default": _cpu_only(_ref.sigmoid),
        "gelu.default": _cpu_only(_ref.gelu),
        "rsqrt.default": _cpu_only(_half_rsqrt),
    }
    table = {}
    for name, fn in entries.items():
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload, None)
        if op is not None:  # an op this torch does not have cannot be reached either
            table[op] = fn
    return table


_HANDLERS = _table()

# Float ops with a batch-dependent reduction and no invariant version here: warned about
# once per mode (their results may change with the batch), then run as torch runs them.
_UNCOVERED = frozenset(
    getattr(getattr(aten, p), o)
    for p, o in (
        ("var", "correction"), ("std", "correction"), ("var_mean", "correction"),
        ("std_mean", "correction"), ("linalg_vector_norm", "default"), ("norm", "Scalar"),
        ("logsumexp", "default"), ("prod", "default"), ("nansum", "default"),
        ("cumprod", "default"), ("addmv", "default"), ("addbmm", "default"),
        ("convolution", "default"), ("native_group_norm", "default"),
        ("native_batch_norm", "default"), ("addmm_", "default"),
        ("mm", "out"), ("bmm", "out"), ("addmm", "out"), ("sum", "IntList_out"),
        ("mean", "out"), ("_softmax", "out"),
    )
    if hasattr(getattr(aten, p, None), o)
)  # fmt: skip


# Composites that reach the mode undecomposed under inference_mode and hide matmuls in
# C++: decomposed with the mode pushed again, so their mm / bmm / sum come back to it.
_DECOMPOSE = frozenset(
    getattr(getattr(aten, p), o)
    for p, o in (
        ("einsum", "default"), ("tensordot", "default"), ("inner", "default"),
        ("chain_matmul", "default"), ("linalg_multi_dot", "default"), ("bilinear", "default"),
    )
    if hasattr(getattr(aten, p, None), o)
)  # fmt: skip


class BatchInvariantOps(TorchDispatchMode):
    """Routes batch-dependent aten ops to :mod:`pagedkv.ops.invariant` while batch-invariant
    mode is on in this context. Enter it through :func:`invariant_forward`."""

    pagedkv_invariant = True  # how pagedkv.ops.invariant recognizes it on the mode stack

    def __init__(self) -> None:
        super().__init__()
        self.warned: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_batch_invariant():
            handler = _HANDLERS.get(func)
            if handler is not None:
                out = handler(*args, **kwargs)
                if out is not NotImplemented:
                    return out
            elif func in _DECOMPOSE:
                with self:
                    return func.decompose(*args, **kwargs)
            elif func in _UNCOVERED and func not in self.warned and _has_float(args):
                self.warned.add(func)
                warnings.warn(
                    f"batch_invariant_mode: {func} has no batch-invariant implementation "
                    "in pagedkv; its result may depend on the batch", stacklevel=2,
                )  # fmt: skip
        return func(*args, **kwargs)


def _has_float(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.is_floating_point() for a in args)


def hook_active() -> bool:
    """Whether a :class:`BatchInvariantOps` mode is on this thread's dispatch-mode stack."""
    return any(getattr(m, "pagedkv_invariant", False) for m in _get_current_dispatch_mode_stack())


@contextlib.contextmanager
def invariant_forward() -> Iterator[None]:
    """Run the block's torch code (a model forward, a CUDA-graph capture, a sampler) on
    batch-invariant ops if batch-invariant mode is on in this context; a no-op otherwise.

    ``pagedkv.ops.batch_invariant_mode()`` enters it for you; call it yourself around a
    forward when the mode was switched on with ``set_batch_invariant(True)``. The routing
    is per thread: enter it in the thread that runs the forward. Nested uses push nothing.
    """
    if not is_batch_invariant() or hook_active():
        yield
        return
    with BatchInvariantOps():
        yield


@contextlib.contextmanager
def batch_invariant_mode(enabled: bool = True) -> Iterator[None]:
    """Batch-invariant mode for the block: :func:`pagedkv.ops.set_batch_invariant`
    restored on exit, and (when enabled) :func:`invariant_forward`, so that a model forward
    run inside computes every row — matmuls, norms, softmax, attention — independently of
    the rest of its batch. ``batch_invariant_mode(False)`` inside turns both off again."""
    with invariant_flag(enabled):
        if enabled:
            with invariant_forward():
                yield
        else:
            yield
