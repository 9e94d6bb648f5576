"""Batch-invariant matmul, reductions, norms and attention: public functions.

Every function here returns, for each row of its input (a token's activations, a
logits row), bits that depend only on that row and on the weights: not on how many rows
share the call (M), not on where the row sits, and (reductions) not on zeros appended
after it. They follow torch's semantics (shapes, broadcasting, dtypes) and accumulate in
float32. CUDA tensors run the Triton kernels (:mod:`~pagedkv.ops.triton_matmul`,
:mod:`~pagedkv.ops.triton_rows`); other devices the torch path
(:mod:`~pagedkv.ops.reference_invariant`); ``pagedkv.ops.use_backend`` overrides the
choice as for the attention ops (``"triton"`` on CPU needs ``TRITON_INTERPRET=1``).

These are what :func:`pagedkv.ops.batch_invariant_mode` routes a model's own ``F.linear``,
``torch.matmul``, ``mean``, ``softmax``... to (see :mod:`pagedkv.ops.invariant_mode`);
they can also be called directly. Inputs must be float32, float16 or bfloat16.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack, _pop_mode_temporarily

from pagedkv.ops import reference_invariant as _ref
from pagedkv.ops._config import resolve

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NEG_INF = float("-inf")


def _backend(device: torch.device):
    if resolve(None, device) == "triton":
        from pagedkv.ops import triton_matmul, triton_rows

        return triton_matmul, triton_rows
    return _ref, _ref


def suspend_hook() -> contextlib.AbstractContextManager:
    """Pop :func:`pagedkv.ops.invariant_forward`'s dispatch mode for the block when it is
    the innermost mode (a no-op otherwise). pagedkv's own invariant ops (the
    :mod:`pagedkv.ops.invariant` functions, the attention reference) run their torch ops
    under it: they are batch-invariant by construction, and routing their inner matmuls
    again would compute the same thing through many slower calls."""
    stack = _get_current_dispatch_mode_stack()
    if stack and getattr(stack[-1], "pagedkv_invariant", False):
        return _pop_mode_temporarily()
    return contextlib.nullcontext()


def _check(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; batch-invariant ops take float32, float16 or "
            "bfloat16 (cast it, or call the torch op outside batch-invariant mode)"
        )


def _same_device(t: torch.Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other operands are on {device}")


# -- matmul ---------------------------------------------------------------------------


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    beta: float = 1.0,
    alpha: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``alpha * (a[i] @ b[i]) + beta * bias[i]`` for every batch item i.

    a: [Bt, M, K]; b: [Bt, K, N] (a batch of 1 on either side broadcasts), same dtype and
    device; bias: None or broadcastable to [Bt, M, N]. Returns a new [Bt, M, N] tensor of
    ``out_dtype`` (default a's dtype), accumulated in float32: row m of item i depends only
    on ``a[i, m]``, ``b[i]`` and ``bias[i, m]``.
    """
    _check(a, "a")
    _check(b, "b")
    if a.dim() != 3 or b.dim() != 3:
        raise ValueError(f"a and b must be 3-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if b.dtype != a.dtype:
        raise TypeError(f"a is {a.dtype} but b is {b.dtype}; cast one of them")
    _same_device(b, "b", a.device)
    if a.shape[2] != b.shape[1]:
        raise ValueError(f"a {tuple(a.shape)} @ b {tuple(b.shape)}: inner dimensions differ")
    bt = max(a.shape[0], b.shape[0])
    if min(a.shape[0], b.shape[0]) not in (1, bt):
        raise ValueError(f"batch sizes {a.shape[0]} and {b.shape[0]} do not broadcast")
    a, b = a.expand(bt, -1, -1), b.expand(bt, -1, -1)
    m, n = a.shape[1], b.shape[2]
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    z = None
    if bias is not None:
        _check(bias, "bias")
        _same_device(bias, "bias", a.device)
        try:
            z = bias.expand(bt, m, n)
        except RuntimeError:
            raise ValueError(
                f"bias of shape {tuple(bias.shape)} does not broadcast to [{bt}, {m}, {n}]"
            ) from None
    mm, _ = _backend(a.device)
    with suspend_hook():
        if mm is _ref:
            return _ref.gemm(a, b, z, beta=beta, alpha=alpha, out_dtype=out_dtype)
        if z is None or (beta == 1 and alpha == 1):
            out = mm.gemm(a, b, z, out_dtype=out_dtype)
            return out if alpha == 1 else (out * alpha).to(out.dtype)
        c = mm.gemm(a, b, None, out_dtype=torch.float32)
        return (alpha * c + beta * z.float()).to(out_dtype or a.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear``: x [..., K] @ weight[N, K].T (+ bias [N]) -> [..., N]."""
    _check(x, "x")
    _check(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [N, K], got shape {tuple(weight.shape)}")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x {tuple(x.shape)} and weight {tuple(weight.shape)}: x's last dim must be K"
        )
    k, n = weight.shape[1], weight.shape[0]
    out = gemm(x.reshape(1, -1, k), weight.t()[None], bias)
    return out.reshape(*x.shape[:-1], n)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul`` (1-D operands, broadcast batch dims) on :func:`gemm`."""
    _check(a, "a")
    _check(b, "b")
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError("matmul needs operands of at least 1 dimension, got a 0-d tensor")
    a2 = a[None] if a.dim() == 1 else a  # [..., M, K]
    b2 = b[:, None] if b.dim() == 1 else b  # [..., K, N]
    m, k, n = a2.shape[-2], a2.shape[-1], b2.shape[-1]
    if b2.dim() == 2:  # x @ W: every leading dim of x is a row
        out = gemm(a2.reshape(1, -1, k), b2[None]).reshape(*a2.shape[:-1], n)
    else:
        batch = torch.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        a3 = a2.expand(*batch, m, k).reshape(-1, m, k)
        b3 = b2.expand(*batch, b2.shape[-2], n).reshape(-1, b2.shape[-2], n)
        out = gemm(a3, b3).reshape(*batch, m, n)
    if a.dim() == 1:
        out = out.squeeze(-2)
    if b.dim() == 1:
        out = out.squeeze(-1)
    return out


# -- reductions -------------------------------------------------------------------------


def _dims(x: torch.Tensor, dim) -> list[int]:
    nd = x.dim()
    if dim is None or (isinstance(dim, Sequence) and len(dim) == 0):
        return list(range(nd))
    dims = [dim] if isinstance(dim, int) else list(dim)
    span = max(nd, 1)
    for d in dims:
        if not -span <= d < span:
            raise ValueError(f"dim {d} is out of range for a {nd}-d tensor")
    out = sorted({d % span for d in dims})
    if len(out) != len(dims):
        raise ValueError(f"dim {dim} names a dimension twice")
    return out if nd else []


def _reduce(x, dim, keepdim: bool, dtype, mean: bool) -> torch.Tensor:
    _check(x, "x")
    out_dtype = dtype or x.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    dims = _dims(x, dim)
    kept = [d for d in range(x.dim()) if d not in dims]
    n = math.prod(x.shape[d] for d in dims)
    x2 = x.permute(*kept, *dims).reshape(-1, n)  # [R, N]: the reduced dims last
    _, rows = _backend(x.device)
    with suspend_hook():
        r = rows.row_sum(x2, float(n) if mean else 1.0, out_dtype)
    if keepdim:
        return r.reshape([1 if d in dims else s for d, s in enumerate(x.shape)])
    return r.reshape([x.shape[d] for d in kept])


def reduce_sum(x: torch.Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    """``torch.sum(x, dim, keepdim, dtype=)``; ``dim`` None or () reduces every dim."""
    return _reduce(x, dim, keepdim, dtype, mean=False)


def reduce_mean(x: torch.Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    """``torch.mean(x, dim, keepdim, dtype=)``: the float32 sum divided by the count."""
    return _reduce(x, dim, keepdim, dtype, mean=True)


def _along(x: torch.Tensor, dim: int, fn) -> torch.Tensor:
    """Apply a row function [R, N] -> [R, N] along ``dim``; the result is contiguous."""
    nd = max(x.dim(), 1)
    if not -nd <= dim < nd:
        raise ValueError(f"dim {dim} is out of range for a {x.dim()}-d tensor")
    xm = x.reshape(1) if x.dim() == 0 else x.movedim(dim, -1)
    y = fn(xm.reshape(-1, xm.shape[-1])).reshape(xm.shape)
    if x.dim() == 0:
        return y.reshape(())
    return y if dim % nd == nd - 1 else y.movedim(-1, dim).contiguous()


def softmax_as(x, dim: int, dtype, log: bool, out_dtype=None) -> torch.Tensor:
    """(Log-)softmax of ``x`` (cast to ``dtype`` first when given) along ``dim``, in
    float32, returned as ``out_dtype`` (default: the input's dtype): aten's
    ``_softmax(x, dim, half_to_float)`` is ``out_dtype=torch.float32``."""
    _check(x, "x")
    if dtype is not None:
        x = x.to(dtype)
        _check(x, "x")
    out_dtype = out_dtype or x.dtype
    _, rows = _backend(x.device)
    with suspend_hook():
        return _along(x, dim, lambda x2: rows.softmax(x2, log, out_dtype))


def softmax(x: torch.Tensor, dim: int = -1, *, dtype=None) -> torch.Tensor:
    """``torch.softmax(x, dim, dtype=)``, computed in float32."""
    return softmax_as(x, dim, dtype, log=False)


def log_softmax(x: torch.Tensor, dim: int = -1, *, dtype=None) -> torch.Tensor:
    """``torch.log_softmax(x, dim, dtype=)``, computed in float32."""
    return softmax_as(x, dim, dtype, log=True)


def cumsum(x: torch.Tensor, dim: int = -1, *, dtype=None) -> torch.Tensor:
    """``torch.cumsum(x, dim, dtype=)`` for float tensors: one fixed-order scan per row."""
    _check(x, "x")
    out_dtype = dtype or x.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    _, rows = _backend(x.device)
    with suspend_hook():
        return _along(x, dim, lambda x2: rows.cumsum(x2, out_dtype))


# -- norms and attention ----------------------------------------------------------------


def norm_dims(x: torch.Tensor, normalized_shape) -> list[int]:
    """The dims a norm over ``normalized_shape`` reduces (the last ones of ``x``); raises
    ``ValueError`` when they are not ``x``'s trailing dims."""
    shape = tuple(normalized_shape)
    if not shape or tuple(x.shape[x.dim() - len(shape) :]) != shape:
        raise ValueError(f"normalized_shape {shape} must be the last dims of x {tuple(x.shape)}")
    return list(range(x.dim() - len(shape), x.dim()))


def rms_norm(x, normalized_shape, weight=None, eps: float | None = None) -> torch.Tensor:
    """``F.rms_norm``: x / sqrt(mean(x^2) + eps) * weight, in float32, back to x's dtype."""
    _check(x, "x")
    dims = norm_dims(x, normalized_shape)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    xf = x.float()
    y = xf * torch.rsqrt(reduce_mean(xf * xf, dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """``torch.native_layer_norm``: (out in x's dtype, mean, rstd), statistics in float32."""
    _check(x, "x")
    dims = norm_dims(x, normalized_shape)
    xf = x.float()
    mean = reduce_mean(xf, dims, keepdim=True)
    centered = xf - mean
    rstd = torch.rsqrt(reduce_mean(centered * centered, dims, keepdim=True) + eps)
    y = centered * rstd
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), mean, rstd


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.scaled_dot_product_attention`` without dropout, on :func:`gemm` and :func:`softmax`.

    q: [..., Hq, Lq, D]; k, v: [..., Hkv, Lk, D(v)] with Hq a multiple of Hkv (GQA);
    attn_mask: bool (True = attend) or additive, broadcastable to [..., Hq, Lq, Lk];
    ``is_causal``: query i sees keys <= i (top-left aligned, as torch). Scores are float32
    ([..., Lq, Lk] materialized); a query that sees no key gets zeros. Returns
    (out [..., Hq, Lq, Dv] in q's dtype, logsumexp [..., Hq, Lq] float32).
    """
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        _check(t, name)
        if t.dim() < 3:
            raise ValueError(f"{name} must be [..., heads, len, dim], got {tuple(t.shape)}")
    hq, hkv = q.shape[-3], k.shape[-3]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of key/value heads {hkv}")
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=-3)
        v = v.repeat_interleave(hq // hkv, dim=-3)
    lq, d = q.shape[-2], q.shape[-1]
    lk, dv = k.shape[-2], v.shape[-1]
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q3 = q.expand(*batch, lq, d).reshape(-1, lq, d)
    k3 = k.expand(*batch, lk, d).reshape(-1, lk, d)
    v3 = v.expand(*batch, lk, dv).reshape(-1, lk, dv)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    s = gemm(q3, k3.transpose(1, 2), out_dtype=torch.float32) * scale  # [BH, Lq, Lk]
    if is_causal:
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, _NEG_INF)
    if attn_mask is not None:
        mask = attn_mask.expand(*batch, lq, lk).reshape(-1, lq, lk)
        s = s.masked_fill(~mask, _NEG_INF) if mask.dtype == torch.bool else s + mask.float()
    top = s.amax(dim=-1, keepdim=True)  # [BH, Lq, 1]
    dead = top == _NEG_INF  # sees no key: zeros, as torch's math path
    p = softmax(s, dim=-1).masked_fill(dead, 0.0)
    out = gemm(p.to(v.dtype), v3, out_dtype=q.dtype)
    # logsumexp (what the fused kernels return for their backward)
    lse = top + torch.log(reduce_sum(torch.exp(s - top.masked_fill(dead, 0.0)), -1, True))
    return out.reshape(*batch, lq, dv), lse.reshape(*batch, lq)
