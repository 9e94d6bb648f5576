"""Blocks from one storage format into another: quantize (bf16 -> fp8 / int8), dequantize
(fp8 / int8 -> bf16), or re-quantize, as byte rows or between two pools.

The byte rows are those of :meth:`KVPool.read_blocks` (payload, then a quantized
format's scales; see :class:`KVLayout`), so the tiers and snapshots can store blocks in
another format than the device pool: demote = ``convert_rows(rows, pool.layout,
tier_layout)``, promote = the reverse. A quantized target gets the scales a dynamic
write of the same tokens gives (:func:`pagedkv.ops.quantize_blocks`), or its layout's
static scales. Conversions between the same format are the identity (bit-exact);
anything else rounds once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pagedkv import _tensor_checks, ops
from pagedkv.storage.layout import KVLayout
from pagedkv.storage.pool import KVPool
from pagedkv.storage.rows import payload_view, scale_view

CHUNK_BYTES = 64 << 20  # float32 working set of one conversion step, about


def _geometry(lay: KVLayout) -> tuple[int, int, int, int]:
    return (lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.block_size)


def check_convertible(src: KVLayout, dst: KVLayout) -> None:
    """``ValueError`` unless the two layouts hold the same blocks (geometry)."""
    if not isinstance(src, KVLayout) or not isinstance(dst, KVLayout):
        raise TypeError("convert needs two KVLayouts")
    if _geometry(src) != _geometry(dst):
        raise ValueError(
            f"layouts differ in geometry (layers, KV heads, head_dim, block_size): "
            f"{_geometry(src)} vs {_geometry(dst)}; only the storage format may differ"
        )


def _values(rows: torch.Tensor, lay: KVLayout) -> torch.Tensor:
    """The K/V values of byte rows as float32 (float64 for a float64 layout)."""
    cdt = torch.float64 if lay.dtype == torch.float64 else torch.float32
    pay = payload_view(rows, lay)
    if lay.quantized:
        return ops.dequantize_blocks(pay, scale_view(rows, lay), cdt)
    return pay.to(cdt)


def _encode_into(
    out: torch.Tensor, x: torch.Tensor, lay: KVLayout, fills: torch.Tensor | None
) -> None:
    pay = payload_view(out, lay)
    if lay.quantized:
        static = None
        if lay.static_scales is not None:
            static = torch.tensor(lay.static_scales, dtype=torch.float32)
        q, scales = ops.quantize_blocks(x, lay.kv_dtype, fills=fills, static_scales=static)
        pay.copy_(q)
        scale_view(out, lay).copy_(scales)
        return
    if fills is not None:
        live = torch.arange(lay.block_size, device=x.device)[None, :] < fills[:, None]
        x = x * live[:, None, None, :, None, None]
    pay.copy_(x.to(lay.kv_dtype))


def convert_rows(
    rows: torch.Tensor,
    src: KVLayout,
    dst: KVLayout,
    *,
    fills: Sequence[int] | torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Byte rows of ``src``'s format as rows of ``dst``'s (same geometry), on their device.

    ``rows``: uint8 ``[n, src.bytes_per_block]``; returns uint8 ``[n, dst.bytes_per_block]``
    (``out`` when given). ``fills``: tokens held per block (default: full); slots past a
    fill are ignored (a partly filled block's junk never reaches its scale) and written
    as zeros. The same format gives the rows back unchanged (a copy, or ``out``).
    """
    check_convertible(src, dst)
    _tensor_checks.tensor(rows, "rows")
    if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] != src.bytes_per_block:
        raise ValueError(
            f"rows must be uint8 [n, {src.bytes_per_block}] (blocks of {src}), got "
            f"{tuple(rows.shape)} {rows.dtype}"
        )
    n = rows.shape[0]
    if out is None:
        out = torch.empty((n, dst.bytes_per_block), dtype=torch.uint8, device=rows.device)
    elif tuple(out.shape) != (n, dst.bytes_per_block) or out.dtype != torch.uint8:
        raise ValueError(f"out must be uint8 [{n}, {dst.bytes_per_block}], got {tuple(out.shape)}")
    fill_t = None
    if fills is not None:
        fill_t = torch.as_tensor(fills, dtype=torch.long).to(rows.device)
        if fill_t.shape != (n,) or bool(((fill_t < 0) | (fill_t > src.block_size)).any()):
            raise ValueError(f"fills must be {n} ints in [0, {src.block_size}]")
    if src == dst and fill_t is None:
        return out.copy_(rows)
    rows = rows.contiguous()
    per = max(1, CHUNK_BYTES // (4 * max(src.payload_bytes // src.element_size, 1)))
    for a in range(0, n, per):
        f = None if fill_t is None else fill_t[a : a + per]
        _encode_into(out[a : a + per], _values(rows[a : a + per], src), dst, f)
    return out


def convert_blocks(
    src: KVPool,
    src_ids: Sequence[int],
    dst: KVPool,
    dst_ids: Sequence[int],
    *,
    fills: Sequence[int] | None = None,
) -> int:
    """Blocks ``src_ids`` of ``src`` into blocks ``dst_ids`` of ``dst`` (distinct), in
    ``dst``'s format (:func:`convert_rows`); both pools on one device. Returns the bytes
    written. Arguments are checked before anything is written."""
    if not isinstance(src, KVPool) or not isinstance(dst, KVPool):
        raise TypeError("convert_blocks() converts between two KVPools")
    check_convertible(src.layout, dst.layout)
    if src.device != dst.device:
        raise ValueError(f"pools on {src.device} and {dst.device}; convert on one device")
    s = _tensor_checks.block_ids(list(src_ids), src.num_blocks, src.device, "src_ids")
    d = _tensor_checks.block_ids(list(dst_ids), dst.num_blocks, dst.device, "dst_ids")
    if s.numel() != d.numel():
        raise ValueError(f"{s.numel()} source blocks but {d.numel()} target blocks")
    if torch.unique(d).numel() != d.numel():
        raise ValueError("dst_ids must be distinct")
    if fills is not None and len(fills) != s.numel():
        raise ValueError(f"fills must hold one int per block ({s.numel()})")
    n = s.numel()
    if n == 0:
        return 0
    per = max(1, CHUNK_BYTES // max(src.layout.bytes_per_block, dst.layout.bytes_per_block))
    dev = src.device
    for a in range(0, n, per):
        k = min(per, n - a)
        rows = torch.empty((k, src.layout.bytes_per_block), dtype=torch.uint8, device=dev)
        src.gather_rows(s[a : a + k], rows)
        f = None if fills is None else list(fills[a : a + k])
        dst.scatter_rows(d[a : a + k], convert_rows(rows, src.layout, dst.layout, fills=f))
    return n * dst.layout.bytes_per_block
