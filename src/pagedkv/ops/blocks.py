"""Whole-block ops over a pool tensor: copy, gather (swap-out staging), scatter
(swap-in), and the (de)quantization of whole blocks. Re-exported by :mod:`pagedkv.ops`;
the backend is chosen per call as there (``backend=``, then the current setting)."""

from __future__ import annotations

import torch

from pagedkv._kv_formats import is_quantized
from pagedkv.ops import _checks, reference, reference_quant
from pagedkv.ops._config import resolve
from pagedkv.ops._specs import triton_module


def _pool_tensor(kv: torch.Tensor) -> None:
    _checks.tensor(kv, "kv")
    if kv.dim() < 3 or kv.shape[1] != 2 or not kv.is_contiguous():
        raise ValueError(
            "kv must be a contiguous [num_layers, 2, num_blocks, ...] tensor (a pool, "
            f"[L, 2, num_blocks, block_size, Hkv, D], or its scales), got shape {tuple(kv.shape)}"
        )


def _impl(backend, device: torch.device):
    """The module whose block ops run for ``backend`` on ``device``."""
    return triton_module("memory") if resolve(backend, device) == "triton" else reference


def _each_block(op: str, kv: torch.Tensor, ids: torch.Tensor, *args, backend) -> None:
    """Check ``kv``, then run the backend's block op ``op`` unless ``ids`` is empty."""
    _pool_tensor(kv)
    if ids.numel():
        getattr(_impl(backend, kv.device), op)(kv, ids, *args)


def copy_blocks(kv: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, *, backend=None) -> None:
    """Copy whole blocks (all layers, K and V): ``kv[:, :, dst[i]] = kv[:, :, src[i]]``.

    ``kv``: a pool tensor [L, 2, num_blocks, block_size, Hkv, D], or any [L, 2, num_blocks,
    ...] tensor (a quantized pool's scales). src, dst: [n] int64 tensors on kv's device, in
    range (checked by the caller, e.g. :meth:`KVPool.copy_blocks`); no dst may also be a
    src (the pool orders such lists).
    """
    _each_block("copy_blocks", kv, src, dst, backend=backend)


def copy_blocks_across(
    src_kv: torch.Tensor,
    src: torch.Tensor,
    dst_kv: torch.Tensor,
    dst: torch.Tensor,
    *,
    backend=None,
) -> None:
    """Copy whole blocks from one pool tensor into another: ``dst_kv[:, :, dst[i]] =
    src_kv[:, :, src[i]]``, in one launch on the Triton backend.

    Both are ``[L, 2, num_blocks, ...]`` tensors of one dtype and device whose shapes
    differ at most in ``num_blocks`` (a CUDA view of a page-locked CPU pool,
    :func:`pagedkv.storage.cudart.device_view`, counts as on the device: the kernel then
    reads or writes host memory over the bus). ``src``, ``dst``: [n] int64 on that device,
    in range, ``dst`` distinct (checked by the caller, e.g.
    :func:`pagedkv.storage.pool_copy.copy_blocks_between`).
    """
    _pool_tensor(src_kv)
    _pool_tensor(dst_kv)
    same = src_kv.shape[:2] == dst_kv.shape[:2] and src_kv.shape[3:] == dst_kv.shape[3:]
    if not same or src_kv.dtype != dst_kv.dtype or src_kv.device != dst_kv.device:
        raise ValueError(
            "copy_blocks_across needs two pool tensors of one dtype and device that differ "
            f"at most in num_blocks, got {tuple(src_kv.shape)} {src_kv.dtype} on "
            f"{src_kv.device} and {tuple(dst_kv.shape)} {dst_kv.dtype} on {dst_kv.device}"
        )
    if src.numel():
        _impl(backend, dst_kv.device).copy_blocks_across(src_kv, src, dst_kv, dst)


def gather_blocks(
    kv: torch.Tensor, ids: torch.Tensor, *, out: torch.Tensor | None = None, backend=None
) -> torch.Tensor:
    """Blocks ``ids`` ([n] int64, in range) as one [n, L, 2, block_size, Hkv, D] tensor
    (``[n, L, 2, *rest]`` for an [L, 2, num_blocks, *rest] ``kv``) on kv's device: the
    staging copy of a swap-out. ``out`` receives it when given; its rows may be strided
    (views into byte rows that hold a block's payload and scales) if each row is dense."""
    _pool_tensor(kv)
    if resolve(backend, kv.device) == "triton":
        return triton_module("memory").gather_blocks(kv, ids, out=out)
    res = reference.gather_blocks(kv, ids)
    return res if out is None else out.copy_(res)


def scatter_blocks(
    kv: torch.Tensor, ids: torch.Tensor, data: torch.Tensor, *, backend=None
) -> None:
    """Inverse of :func:`gather_blocks`: data [n, L, 2, block_size, Hkv, D] (kv's dtype and
    device; rows may be strided as for ``out`` there) into blocks ``ids`` ([n] int64, in
    range, distinct)."""
    _each_block("scatter_blocks", kv, ids, data, backend=backend)


def quantize_blocks(
    x: torch.Tensor,
    kv_dtype: torch.dtype,
    *,
    fills: torch.Tensor | None = None,
    static_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole blocks ``x`` [n, L, 2, block_size, Hkv, D] (float) in the quantized
    ``kv_dtype``: returns ``(payload, scales [n, L, 2, Hkv] float32)``, the scales a dynamic
    write of each block's tokens gives (``fills``: tokens per block, default full; slots
    past it become zeros), or ``static_scales`` [L, 2] (fixed per layer). Any device; the
    format conversion of :func:`pagedkv.storage.convert_rows` and ``KVCache.compress``."""
    _checks.tensor(x, "x")
    if not is_quantized(kv_dtype):
        raise ValueError(f"kv_dtype must be a quantized format (fp8 / int8), got {kv_dtype}")
    if x.dim() != 6 or x.shape[2] != 2 or not x.dtype.is_floating_point:
        raise ValueError(
            f"x must be float [n, L, 2, block_size, Hkv, D] blocks, got {tuple(x.shape)} {x.dtype}"
        )
    return reference_quant.quantize_blocks(x, kv_dtype, fills, static_scales)


def dequantize_blocks(
    payload: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Quantized blocks ``payload`` [n, L, 2, block_size, Hkv, D] with their ``scales``
    [n, L, 2, Hkv] as ``dtype`` values ``payload * scale``."""
    _checks.tensor(payload, "payload")
    _checks.tensor(scales, "scales")
    if not is_quantized(payload.dtype) or payload.dim() != 6:
        raise ValueError(
            f"payload must be quantized [n, L, 2, block_size, Hkv, D] blocks, got "
            f"{tuple(payload.shape)} {payload.dtype}"
        )
    want = (*payload.shape[:3], payload.shape[4])
    if tuple(scales.shape) != want or scales.dtype != torch.float32:
        raise ValueError(f"scales must be float32 {list(want)}, got {tuple(scales.shape)}")
    return reference_quant.dequantize_blocks(payload, scales, dtype)
