"""Triton KV write into quantized (fp8 / int8) caches, keeping per-(block, head) scales.

Every division is ``tl.math.div_rn`` (IEEE round-to-nearest): Triton's ``/`` on float32
is ``div.full.f32`` on the GPU (up to 2 ulp off), which made the stored bytes differ
from the torch reference's on CUDA (the interpreter divides exactly, so CPU tests agree
either way).

Dynamic scales (see :mod:`pagedkv.ops.reference_quant`, the specification): program
(n, h) runs only when token n starts a *run*, the tokens of the call that land in one
block (the caller keeps them contiguous); it loads the run's K and V rows of head h,
takes their maximum, grows the block's scale if they do not fit, re-quantizes the
block's other slots to the grown scale, stores the run and the scale. One program owns
a (block, head) for the whole call, so nothing races and no sync is needed (the grid
is the token count: CUDA-graph capturable). Static scales: every token is quantized
with the layer's fixed scale, which is also stored as its block's scale.

Rounding is done in float32 arithmetic onto the format's grid (round half to even, fp8
subnormals included, zeros unsigned) and the exact result converted, so the stored bytes
are the same on the GPU, in the Triton interpreter (whose own fp8 conversion of inexact
values is not faithful) and in the torch reference.
"""

from __future__ import annotations

from pagedkv._extras import optional_imports

with optional_imports(__name__):
    import triton
    import triton.language as tl

from pagedkv._kv_formats import QUANT_FORMATS
from pagedkv.ops._launch import Launcher, made_once


@triton.jit
def rint(t):
    """Round half to even of t >= 0 (exact for t < 2**22)."""
    r = tl.floor(t + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(((r - t) == 0.5) & odd, r - 1.0, r)


@triton.jit
def encode(y, QMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """float32 y -> the nearest value of the format's grid (clamped to +-QMAX), as float32.
    MBITS == 0: the integers (int8); else fp8 with MBITS mantissa bits, smallest normal
    exponent EMIN."""
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    a = tl.abs(y)
    if MBITS == 0:
        r = rint(a)
    else:
        e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.maximum(e, EMIN)
        ulp = ((e - MBITS + 127) << 23).to(tl.float32, bitcast=True)  # a power of two
        r = rint(tl.math.div_rn(a, ulp)) * ulp
    # y's sign on a nonzero r; a zero is +0 (reference_quant.encode says why)
    return tl.where((y.to(tl.int32, bitcast=True) < 0) & (r > 0), -r, r)


@triton.jit
def spread(flag, like):
    """A scalar bool as a vector shaped like the int vector ``like`` (the interpreter cannot
    combine a scalar bool with a vector of bools)."""
    return (tl.zeros_like(like) + flag.to(like.dtype)) > 0


@triton.jit
def _run_tile(cache_ptr, scale_ptr, x, blk, tok, in_run, h, mask_d, offs_d, offs_t,
              stride_cb, stride_ct, stride_ch, stride_sb, head,
              BS: tl.constexpr, QMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
              HEADROOM: tl.constexpr):  # fmt: skip
    """Grow the (block, head) scale for the run's rows x [BS_PAD, D_PAD] (f32), re-quantize
    the block's other slots if it grew, store the run and the scale."""
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    fresh = tl.max(tl.where(in_run & (tok == 0), 1, 0), 0) > 0
    last = tl.max(tl.where(in_run, tok, -1), 0)
    old = tl.load(scale_ptr + blk * stride_sb + h, mask=head, other=0.0)
    old = tl.where(fresh, 0.0, old)
    need = tl.math.div_rn(amax, QMAX)
    grow = need > old
    new = tl.where(grow, tl.where(last < BS - 1, need * HEADROOM, need), old)
    # slots of this block not written by the run: re-quantized when the scale grew
    written = tl.max(tl.where(in_run[None, :] & (tok[None, :] == offs_t[:, None]), 1, 0), 1)
    requant = head & grow & (old > 0)
    row_ok = (offs_t < BS) & (written == 0) & spread(requant, offs_t)
    bmask = row_ok[:, None] & mask_d[None, :]
    base = cache_ptr + blk * stride_cb + h * stride_ch
    b_ptr = base + offs_t[:, None].to(tl.int64) * stride_ct + offs_d[None, :]
    q_old = tl.load(b_ptr, mask=bmask, other=0.0).to(tl.float32)
    y_old = tl.math.div_rn(q_old * old, tl.where(new > 0, new, 1.0))  # new > 0 where stored
    tl.store(b_ptr, encode(y_old, QMAX, MBITS, EMIN).to(cache_ptr.dtype.element_ty), mask=bmask)
    y = tl.where(new > 0, tl.math.div_rn(x, tl.where(new > 0, new, 1.0)), 0.0)
    t_ptr = base + tok[:, None] * stride_ct + offs_d[None, :]
    tmask = in_run[:, None] & mask_d[None, :]
    tl.store(t_ptr, encode(y, QMAX, MBITS, EMIN).to(cache_ptr.dtype.element_ty), mask=tmask)
    tl.store(scale_ptr + blk * stride_sb + h, new, mask=head)


@triton.jit(do_not_specialize=("n_tokens",))
def _write_dynamic_kernel(
    K, V, KC, VC, KS, VS, SLOTS,
    stride_kn, stride_kh, stride_vn, stride_vh,
    n_tokens: tl.int32,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    stride_ksb, stride_vsb,
    D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr, BS_PAD: tl.constexpr,
    QMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, HEADROOM: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(SLOTS + n).to(tl.int64)
    blk = tl.where(slot >= 0, slot // BS, -1)
    prev = tl.load(SLOTS + tl.maximum(n - 1, 0)).to(tl.int64)
    prev_blk = tl.where((n > 0) & (prev >= 0), prev // BS, -1)
    head = (slot >= 0) & (prev_blk != blk)  # token n starts a run: this program owns it
    offs_i = tl.arange(0, BS_PAD)
    idx = n + offs_i
    live = (idx < n_tokens) & spread(head, offs_i)
    s_i = tl.load(SLOTS + idx, mask=live, other=-1).to(tl.int64)
    same = (s_i >= 0) & (tl.where(s_i >= 0, s_i // BS, -1) == blk)
    brk = tl.min(tl.where(same, BS_PAD, offs_i), 0)  # the first token past the run
    in_run = live & (offs_i < brk) & (offs_i < BS)
    tok = tl.where(in_run, s_i % BS, 0)
    blk = tl.maximum(blk, 0)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D
    rows = idx.to(tl.int64)
    xmask = in_run[:, None] & mask_d[None, :]
    kx = tl.load(K + rows[:, None] * stride_kn + h * stride_kh + offs_d[None, :], mask=xmask,
                 other=0.0).to(tl.float32)  # fmt: skip
    vx = tl.load(V + rows[:, None] * stride_vn + h * stride_vh + offs_d[None, :], mask=xmask,
                 other=0.0).to(tl.float32)  # fmt: skip
    offs_t = tl.arange(0, BS_PAD)
    _run_tile(KC, KS, kx, blk, tok, in_run, h, mask_d, offs_d, offs_t, stride_kcb, stride_kct,
              stride_kch, stride_ksb, head, BS, QMAX, MBITS, EMIN, HEADROOM)  # fmt: skip
    _run_tile(VC, VS, vx, blk, tok, in_run, h, mask_d, offs_d, offs_t, stride_vcb, stride_vct,
              stride_vch, stride_vsb, head, BS, QMAX, MBITS, EMIN, HEADROOM)  # fmt: skip


@triton.jit
def _write_static_kernel(
    K, V, KC, VC, KS, VS, SLOTS,
    stride_kn, stride_kh, stride_vn, stride_vh,
    k_scale, v_scale,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch, stride_ksb, stride_vsb,
    H: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BS: tl.constexpr, QMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    slot = tl.load(SLOTS + n).to(tl.int64)
    blk = tl.maximum(slot, 0) // BS
    tok = tl.maximum(slot, 0) % BS
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    ok = slot >= 0
    hmask = (offs_h < H) & spread(ok, offs_h)
    mask = hmask[:, None] & (offs_d[None, :] < D)
    src = n.to(tl.int64)
    k = tl.load(K + src * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + src * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kq = encode(tl.math.div_rn(k.to(tl.float32), k_scale), QMAX, MBITS, EMIN)
    vq = encode(tl.math.div_rn(v.to(tl.float32), v_scale), QMAX, MBITS, EMIN)
    kq = kq.to(KC.dtype.element_ty)
    vq = vq.to(VC.dtype.element_ty)
    kc = KC + blk * stride_kcb + tok * stride_kct + offs_h[:, None] * stride_kch + offs_d[None, :]
    vc = VC + blk * stride_vcb + tok * stride_vct + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(kc, kq, mask=mask)
    tl.store(vc, vq, mask=mask)
    tl.store(KS + blk * stride_ksb + offs_h, tl.zeros([H_PAD], tl.float32) + k_scale, mask=hmask)
    tl.store(VS + blk * stride_vsb + offs_h, tl.zeros([H_PAD], tl.float32) + v_scale, mask=hmask)


class QuantWriteKernels:
    """The quantized KV-write kernel of one shape class (cache dtype and strides, scale
    strides, Hkv, D, block size, slot dtype, static or dynamic, device), bound once."""

    def __init__(self, key: tuple) -> None:
        dtype, (bs, h, d), kcs, vcs, kss, vss, _slots, static, _dev = key
        fmt = QUANT_FORMATS[dtype]
        self.static, self.hkv = static, h
        grid_fmt = (fmt.qmax, fmt.mbits, fmt.emin)
        strides = (*kcs[:3], *vcs[:3], kss[0], vss[0])
        pads: tuple[int, ...]
        if static:
            pads = (triton.next_power_of_2(h), triton.next_power_of_2(d))
            tail = (*strides, h, d, *pads, bs, *grid_fmt)
            self.launch = Launcher(_write_static_kernel, 7, 4, tail)
        else:
            pads = (d, triton.next_power_of_2(d), bs, triton.next_power_of_2(bs))
            tail = (*strides, *pads, *grid_fmt, fmt.headroom)
            self.launch = Launcher(_write_dynamic_kernel, 7, 4, tail)

    def run(self, k_cache, v_cache, k_scales, v_scales, slots, k, v, static_scales=None):
        """Quantize k, v [N, Hkv, D] into slots (-1 skips); arguments checked by the caller."""
        if slots.stride(0) != 1:
            slots = slots.contiguous()
        if k.stride(2) != 1 or v.stride(2) != 1:
            k, v = k.contiguous(), v.contiguous()
        ks, vs = k.stride(), v.stride()
        n = k.shape[0]
        args = (k, v, k_cache, v_cache, k_scales, v_scales, slots, ks[0], ks[1], vs[0], vs[1])
        if self.static:
            self.launch((n,), *args, float(static_scales[0]), float(static_scales[1]))
        else:
            self.launch((n, self.hkv), *args, n)


_KERNELS: dict[tuple, QuantWriteKernels] = {}  # shape class -> bound kernel (a compile cache)


def write_kernels(k_cache, v_cache, k_scales, v_scales, slots, static: bool) -> QuantWriteKernels:
    """The :class:`QuantWriteKernels` of these tensors' shape class (made on first use)."""
    key = (k_cache.dtype, tuple(k_cache.shape[1:]), k_cache.stride(), v_cache.stride(),
           k_scales.stride(), v_scales.stride(), slots.dtype, bool(static),
           k_cache.device)  # fmt: skip
    return made_once(_KERNELS, key, QuantWriteKernels)


def write_kv(k_cache, v_cache, k_scales, v_scales, slots, k, v, static_scales=None) -> None:
    """Quantize k, v into their slots (see :class:`QuantWriteKernels`)."""
    kern = write_kernels(k_cache, v_cache, k_scales, v_scales, slots, static_scales is not None)
    kern.run(k_cache, v_cache, k_scales, v_scales, slots, k, v, static_scales)
