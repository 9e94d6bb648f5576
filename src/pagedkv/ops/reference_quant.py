"""Torch reference of quantized KV: the specification of the stored bytes and scales.

Formats and the scale rule are in :mod:`pagedkv._kv_formats`. Shapes (one layer):
``k_cache, v_cache: [num_blocks, block_size, Hkv, D]`` of the quantized dtype,
``k_scales, v_scales: [num_blocks, Hkv]`` float32, ``x = q * scale``.

Dynamic write, for the tokens of one call that land in one block (their slots must be
contiguous in the call, see :func:`pagedkv.ops.write_kv`): ``amax`` = the largest
``|x|`` of those tokens per head; the block is *fresh* when they include its offset 0
(its old scale and bytes belong to whoever held it before), else its old scale stands;
``need = amax / qmax``; if ``need > old`` the scale becomes ``need * headroom`` (``need``
when the tokens reach the block's last offset) and, if ``old > 0``, every other slot of
the block is re-quantized: ``q' = encode((q * old) / new)``. Then the tokens are stored
as ``encode(x / new)`` (zeros when ``new == 0``). The Triton kernel computes the same
float32 operations in the same order, so both store the same bytes.
"""

from __future__ import annotations

import torch

from pagedkv._kv_formats import QUANT_FORMATS

# true_div: every division here divides by a tensor on the data's device. Divided by a
# Python number (a CPU scalar), torch's CUDA kernel multiplies by the reciprocal instead,
# which can be one bit off the quotient: the scales, hence the stored bytes, then differed
# between CPU and CUDA and from the Triton kernel (seen on the H200). On both devices a
# tensor divisor gives the IEEE quotient, as tl.math.div_rn does in the Triton kernel.


def encode(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``y`` (already divided by its scale) in the quantized ``dtype``: clamped to
    ``[-qmax, qmax]`` and rounded to nearest even on the format's grid. A value that
    rounds to zero is stored as +0 whatever its sign: a tiny negative value of a quantized
    write on the H200 came out of the Triton kernel as +0 where torch's conversion gave -0
    (10 of 8M bytes); the sign of a zero changes nothing computed from the cache (0 times
    a scale is 0 either way), so both store +0 and the bytes agree on every device."""
    fmt = QUANT_FORMATS[dtype]
    y = y.clamp(-fmt.qmax, fmt.qmax)
    if dtype == torch.int8:
        return torch.round(y).to(torch.int8)  # torch.round: half to even
    # round to nearest even (subnormals included), then -0 -> +0: z + 0.0 is +0 for z = -0
    return (y.to(dtype).float() + 0.0).to(dtype)


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Quantized K or V blocks ``q [n, bs, Hkv, D]`` with their ``scales [n, Hkv]`` as
    ``dtype`` values ``q * scale`` (computed in ``dtype``)."""
    return q.to(dtype) * scales.to(dtype)[:, None, :, None]


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scales: torch.Tensor,
    v_scales: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    static_scales: tuple[float, float] | None = None,
) -> None:
    """Quantize k, v ``[N, Hkv, D]`` into their slots (-1 skips), keeping the scales.

    ``static_scales`` ``(k_scale, v_scale)``: a fixed scale per layer (calibrated, as
    vLLM's ``kv_cache_dtype="fp8"``), written into the scales of every touched block;
    None: dynamic per-(block, head) scales (module docstring).
    """
    _, bs, hkv, d = k_cache.shape
    slots = slots.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    if slots.numel() == 0:
        return
    blk = slots // bs
    pairs = ((k_cache, k_scales, k), (v_cache, v_scales, v))
    if static_scales is not None:
        for (cache, scales, x), s in zip(pairs, static_scales):
            s32 = torch.tensor(s, dtype=torch.float32, device=x.device)
            cache.view(-1, hkv, d)[slots] = encode(x.float() / s32, cache.dtype)
            scales[blk] = s32
        return
    uniq, inv = torch.unique(blk, return_inverse=True)
    off = slots % bs
    n_u = uniq.numel()
    fresh = torch.zeros(n_u, dtype=torch.long, device=slots.device)
    fresh = fresh.scatter_reduce(0, inv, (off == 0).long(), "amax", include_self=False) > 0
    last = torch.zeros(n_u, dtype=torch.long, device=slots.device)
    partial = last.scatter_reduce(0, inv, off, "amax", include_self=False) < bs - 1
    for cache, scales, x in pairs:
        fmt = QUANT_FORMATS[cache.dtype]
        xf = x.float()
        amax = torch.zeros(n_u, hkv, dtype=torch.float32, device=x.device)
        idx = inv[:, None].expand(-1, hkv)
        amax = amax.scatter_reduce(0, idx, xf.abs().amax(-1), "amax", include_self=False)
        old = torch.where(fresh[:, None], 0.0, scales[uniq])  # [U, Hkv]
        need = amax / amax.new_tensor(fmt.qmax)  # see true_div
        grow = need > old
        new = torch.where(grow, torch.where(partial[:, None], need * fmt.headroom, need), old)
        requant = grow & (old > 0)
        if bool(requant.any()):
            blocks = cache[uniq]  # [U, bs, Hkv, D]
            y = (blocks.float() * old[:, None, :, None]) / new[:, None, :, None]
            cache[uniq] = torch.where(requant[:, None, :, None], encode(y, cache.dtype), blocks)
        scales[uniq] = new
        s_tok = new[inv][:, :, None]  # [N, Hkv, 1]
        y = torch.where(s_tok > 0, xf / torch.where(s_tok > 0, s_tok, 1.0), 0.0)
        cache.view(-1, hkv, d)[slots] = encode(y, cache.dtype)


def quantize_blocks(
    x: torch.Tensor,
    dtype: torch.dtype,
    fills: torch.Tensor | None = None,
    static_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole blocks ``x [n, L, 2, bs, Hkv, D]`` (float) as ``(payload, scales)``:
    payload ``[n, L, 2, bs, Hkv, D]`` of ``dtype``, scales ``[n, L, 2, Hkv]`` float32.

    The scale of each (block, layer, K/V, head) is what a dynamic write of the block's
    tokens in one call gives: ``amax / qmax``, times the headroom when the block is
    partly filled. ``fills`` ([n] ints, default all ``bs``): tokens held per block; slots
    past the fill are ignored and stored as zeros. ``static_scales`` ([L, 2] float32):
    fixed per-layer scales instead.
    """
    fmt = QUANT_FORMATS[dtype]
    n, _, _, bs = x.shape[:4]
    xf = x.float()
    partial = torch.zeros(n, dtype=torch.bool, device=x.device)
    if fills is not None:
        fills = fills.to(device=x.device, dtype=torch.long)
        live = torch.arange(bs, device=x.device)[None, :] < fills[:, None]  # [n, bs]
        xf = xf * live[:, None, None, :, None, None]
        partial = fills < bs
    if static_scales is not None:
        scales = static_scales.to(device=x.device, dtype=torch.float32)[None, :, :, None]
        scales = scales.expand(n, -1, -1, x.shape[4]).contiguous()
    else:
        amax = xf.abs().amax(dim=(3, 5))  # [n, L, 2, Hkv]
        need = amax / amax.new_tensor(fmt.qmax)  # see true_div
        scales = torch.where(partial[:, None, None, None], need * fmt.headroom, need)
    s = scales[:, :, :, None, :, None]
    y = torch.where(s > 0, xf / torch.where(s > 0, s, 1.0), 0.0)
    return encode(y, dtype), scales


def dequantize_blocks(
    payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of :func:`quantize_blocks` up to rounding: ``payload * scales`` as ``dtype``
    ``[n, L, 2, bs, Hkv, D]`` (computed in float32, or float64 for ``dtype`` float64)."""
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    return (payload.to(cdt) * scales.to(cdt)[:, :, :, None, :, None]).to(dtype)
