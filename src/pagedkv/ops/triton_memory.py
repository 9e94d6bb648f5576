"""Triton kernels that move KV: slot write, block copy, block gather/scatter for swaps.

The pool tensor ``kv: [L, 2, num_blocks, block_size, Hkv, D]`` (or a quantized pool's
scales ``[L, 2, num_blocks, Hkv]``) is seen as ``[L * 2, num_blocks, E]`` with ``E``
contiguous elements per block and layer-half; every program copies a chunk of one such
row. Offsets that multiply a block id or slot by a stride are int64.
"""

from __future__ import annotations

import torch

from pagedkv._extras import optional_imports

with optional_imports(__name__):
    import triton
    import triton.language as tl

from pagedkv.ops._launch import Launcher, made_once

CHUNK = 2048  # elements per program in the block kernels


@triton.jit
def _write_kv_kernel(
    K, V, KC, VC, SLOTS,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    H: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    slot = tl.load(SLOTS + n).to(tl.int64)
    blk = slot // BS
    tok = slot % BS
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    slot_2d = tl.zeros([H_PAD, D_PAD], dtype=tl.int64) + slot
    mask = (offs_h[:, None] < H) & (offs_d[None, :] < D) & (slot_2d >= 0)  # slot -1: skip
    src = n.to(tl.int64)
    k = tl.load(K + src * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + src * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    kc = KC + blk * stride_kcb + tok * stride_kct + offs_h[:, None] * stride_kch + offs_d[None, :]
    vc = VC + blk * stride_vcb + tok * stride_vct + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(kc, k, mask=mask)
    tl.store(vc, v, mask=mask)


@triton.jit
def _block_rows_kernel(
    SRC, DST, SRC_IDS, DST_IDS,
    stride_src_row, stride_src_blk, stride_dst_row, stride_dst_blk,
    E, SRC_INDEXED: tl.constexpr, DST_INDEXED: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """dst[row, dst_id(i), e] = src[row, src_id(i), e]; an id is ids[i] if indexed, else i.

    Grid: (n, rows, cdiv(E, CHUNK)). One kernel serves block copy (both indexed), gather
    (source indexed) and scatter (destination indexed)."""
    i = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(2).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < E
    s = tl.load(SRC_IDS + i).to(tl.int64) if SRC_INDEXED else i.to(tl.int64)
    d = tl.load(DST_IDS + i).to(tl.int64) if DST_INDEXED else i.to(tl.int64)
    x = tl.load(SRC + row * stride_src_row + s * stride_src_blk + offs, mask=mask)
    tl.store(DST + row * stride_dst_row + d * stride_dst_blk + offs, x, mask=mask)


class WriteKernels:
    """The KV-write kernel of one shape class (cache dtype, strides, Hkv, D, block size,
    slot dtype, device), bound once; token count and the strides of k / v vary freely."""

    def __init__(self, key: tuple) -> None:
        _, (bs, h, d), kcs, vcs, *_ = key
        tail = (*kcs[:3], *vcs[:3], h, d, triton.next_power_of_2(h), triton.next_power_of_2(d), bs)
        self.launch = Launcher(_write_kv_kernel, 5, 4, tail)

    def run(self, k_cache, v_cache, slots, k, v) -> None:
        """Scatter k, v [N, Hkv, D] into slots (-1 skips); arguments checked by the caller."""
        if slots.stride(0) != 1:
            slots = slots.contiguous()
        if k.stride(2) != 1 or v.stride(2) != 1:
            k, v = k.contiguous(), v.contiguous()
        ks, vs = k.stride(), v.stride()
        self.launch(
            (k.shape[0],), k, v, k_cache, v_cache, slots, ks[0], ks[1], vs[0], vs[1]
        )  # fmt: skip


_WRITE: dict[tuple, WriteKernels] = {}  # shape class -> bound kernel (a compile cache)


def write_kernels(k_cache, v_cache, slots, k) -> WriteKernels:
    """The :class:`WriteKernels` of these tensors' shape class (made on first use)."""
    key = (k_cache.dtype, tuple(k_cache.shape[1:]), k_cache.stride(), v_cache.stride(),
           slots.dtype, k_cache.device)  # fmt: skip
    return made_once(_WRITE, key, WriteKernels)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:  # fmt: skip
    """Scatter k, v [N, Hkv, D] into slots (-1 skips); arguments checked by the caller."""
    write_kernels(k_cache, v_cache, slots, k).run(k_cache, v_cache, slots, k, v)


def _rows(kv: torch.Tensor) -> torch.Tensor:
    nl, two, nb = kv.shape[:3]
    return kv.view(nl * two, nb, -1)  # [L*2, num_blocks, E]


def copy_blocks(kv: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """kv[:, :, dst] = kv[:, :, src] in one launch (no dst may be a src)."""
    copy_blocks_across(kv, src, kv, dst)


def copy_blocks_across(
    src_kv: torch.Tensor, src: torch.Tensor, dst_kv: torch.Tensor, dst: torch.Tensor
) -> None:
    """dst_kv[:, :, dst] = src_kv[:, :, src] between two pool tensors in one launch, in
    8-byte words where a block's rows allow (wide loads and stores over the bus when one
    side is a device view of host memory)."""
    a, b = _rows(src_kv), _rows(dst_kv)
    if (a.shape[2] * a.element_size()) % 8 == 0:
        a, b = a.view(torch.int64), b.view(torch.int64)
    e = a.shape[2]
    src, dst = src.contiguous(), dst.contiguous()
    grid = (src.numel(), a.shape[0], triton.cdiv(e, CHUNK))
    _block_rows_kernel[grid](
        a, b, src, dst, a.stride(0), a.stride(1), b.stride(0), b.stride(1), e,
        SRC_INDEXED=True, DST_INDEXED=True, CHUNK=CHUNK,
    )  # fmt: skip


def gather_blocks(
    kv: torch.Tensor, ids: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Blocks ``ids`` as [n, L, 2, block_size, Hkv, D] (contiguous) in one launch."""
    rows = _rows(kv)
    n, e = ids.numel(), rows.shape[2]
    ids = ids.contiguous()
    if out is None:
        out = torch.empty((n, *kv.shape[:2], *kv.shape[3:]), dtype=kv.dtype, device=kv.device)
    if n == 0:
        return out
    staged = out.view(n, rows.shape[0], e)  # [n, L*2, E]
    grid = (n, rows.shape[0], triton.cdiv(e, CHUNK))
    _block_rows_kernel[grid](
        rows, staged, ids, ids, rows.stride(0), rows.stride(1), staged.stride(1), staged.stride(0),
        e, SRC_INDEXED=True, DST_INDEXED=False, CHUNK=CHUNK,
    )  # fmt: skip
    return out


def scatter_blocks(kv: torch.Tensor, ids: torch.Tensor, data: torch.Tensor) -> None:
    """Inverse of :func:`gather_blocks` in one launch."""
    rows = _rows(kv)
    n, e = ids.numel(), rows.shape[2]
    ids = ids.contiguous()
    staged = data.reshape(n, rows.shape[0], e)  # a view when each row is dense
    grid = (n, rows.shape[0], triton.cdiv(e, CHUNK))
    _block_rows_kernel[grid](
        staged, rows, ids, ids, staged.stride(1), staged.stride(0), rows.stride(0), rows.stride(1),
        e, SRC_INDEXED=False, DST_INDEXED=True, CHUNK=CHUNK,
    )  # fmt: skip
