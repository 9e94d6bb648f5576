"""Triton pieces shared by the attention kernels (decode, prefill, cascade): the
float32-accumulating dot, the widening of quantized K/V (to q's dtype, or to float16 for
the float16 tensor-core path of :mod:`pagedkv.ops.triton_decode`), the power-of-two
rescaling that path applies to q, softcapped logits in log2 units, the start of a
running softmax at a sink and the tile of packed queries a program works on."""

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
def widen16(x):
    """Quantized K/V elements as float16, exactly. fp8 -> fp16 is one hardware conversion
    per pair (fp8 -> bf16 goes through fp16 and then costs a quarter-rate F2F per element
    on sm_90); int8 uses the magic-number trick (bits ``0x6400 | (x ^ 0x80)`` are the
    float16 ``1024 + 128 + x``) instead of a quarter-rate I2F per element."""
    if x.dtype.is_int():
        b = (x.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint16) | 0x6400
        return b.to(tl.float16, bitcast=True) - 1152.0
    else:
        return x.to(tl.float16)


@triton.jit
def widen32(x):
    """K/V elements as float32 for the CUDA-core form (quantized ones through
    :func:`widen16`: exact, and no quarter-rate conversion per element)."""
    if x.dtype.primitive_bitwidth == 8:
        return widen16(x).to(tl.float32)
    else:
        return x.to(tl.float32)


@triton.jit
def pow2_scale(amax):
    """(m, 1 / m) for a power of two m with ``amax * m`` in [2**13, 2**14): float32 x * m
    is exact and fits float16 with headroom (products with fp8 e5m2's 57344 stay finite in
    the float32 accumulator). Built from the exponent bits, so both are exact."""
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent of amax
    me = tl.minimum(tl.maximum(267 - e, 1), 253)  # 2**(13 - (e - 127)); m, 1 / m normal
    return (me << 23).to(tl.float32, bitcast=True), ((254 - me) << 23).to(tl.float32, bitcast=True)


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
def packed_tile(CU, SL, n_tiles, BLOCK: tl.constexpr):
    """Where program (pid, ...) of a grid of ``n_tiles`` tiles per sequence works, the
    queries packed as the cu_seqlens ``CU`` say: (sequence b, its tile's first row within
    the sequence's queries, the sequence's first packed row, its query count, ``SL[b]``)."""
    pid = tl.program_id(0)
    b = pid // n_tiles
    q_start = tl.load(CU + b)
    q_len = tl.load(CU + b + 1) - q_start
    return b, (pid % n_tiles) * BLOCK, q_start, q_len, tl.load(SL + b)


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
