"""Triton pieces shared by the attention kernels (decode, prefill, cascade): the
float32-accumulating dot, the widening of quantized K/V, softcapped logits in log2
units and the start of a running softmax at a sink."""

from __future__ import annotations

import torch

from pagedkv._extras import optional_imports

with optional_imports(__name__):
    import triton
    import triton.language as tl

from pagedkv.ops._config import interpreting

LOG2E = 1.4426950408889634
NO_WINDOW = 1 << 30  # full attention, as the kernels see it (int32 arithmetic)


def needs_upcast(dtype: torch.dtype) -> bool:
    """The Triton interpreter computes ``tl.dot`` on bf16 inputs wrongly (triton 3.9): there,
    bf16 operands are widened to float32 first (after the same bf16 rounding)."""
    return dtype == torch.bfloat16 and interpreting()


@triton.jit
def mma(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation; ``IEEE`` keeps float32 inputs exact (no TF32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def widen(x, dtype):
    """Quantized K/V elements as ``dtype`` (exact: fp8 and int8 values are all bf16 / fp16
    values); int8 goes through float32 (the interpreter's int8 -> bf16 is wrong)."""
    if x.dtype.is_int():
        return x.to(tl.float32).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def tanh(x):
    """tanh from exp2 (the interpreter has no libdevice tanh); absolute error ~1e-7."""
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))  # exp(-2|x|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def logits(qk, qk_scale, cap_log2, SOFTCAP: tl.constexpr):
    """Raw q.k -> scores in log2 units. Without a cap qk_scale = scale * log2(e); with one
    the cap applies in natural units, ``cap * tanh(s / cap)``, so qk_scale = scale / cap
    and cap_log2 = cap * log2(e)."""
    if SOFTCAP:
        return cap_log2 * tanh(qk * qk_scale)
    else:
        return qk * qk_scale


@triton.jit
def with_sink(m_i, l_i, sink):
    """Start the running (max, sum) of an empty state (-inf, 0) at a sink: a key of logit
    ``sink`` (natural units, not scaled) whose value is zero; a -inf sink is no sink."""
    m = tl.maximum(m_i, sink.to(tl.float32) * 1.4426950408889634)
    return m, tl.where(m > float("-inf"), 1.0, l_i)


def scalars(scale: float, softcap: float | None, window: int | None) -> tuple[float, float, int]:
    """(qk_scale, cap_log2, window) as the split kernel takes them (see :func:`logits`)."""
    win = NO_WINDOW if window is None else min(window, NO_WINDOW)
    if softcap is None:
        return scale * LOG2E, 0.0, win
    return scale / softcap, softcap * LOG2E, win
