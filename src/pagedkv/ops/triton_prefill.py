"""Triton paged prefill attention: flash-attention tiles over paged K/V, causal, with a
cached prefix, for packed variable-length queries.

Program (tile t, query head hq): tile t = (sequence b, query rows m0 .. m0+BLOCK_M).
Query row i of b sits at absolute position ``seq_len - q_len + i``. Keys before the
tile's first position are visible to every row and are streamed without a mask; only
the diagonal tiles are masked. K/V rows are gathered through the block table; offsets
that multiply a block id by a stride are int64.
"""

from __future__ import annotations

import torch

from pagedkv._extras import optional_imports

with optional_imports(__name__):
    import triton
    import triton.language as tl

from pagedkv.ops.triton_decode import LOG2E, mma, needs_upcast


@triton.jit
def _tile(
    q, acc, m_i, l_i, K, V, bt_row, n0, pos_m, kv_end, h,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale_log2,
    offs_d, mask_d, D_PAD: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        mask_n = offs_n < kv_end
        blk = tl.load(bt_row + offs_n // BS, mask=mask_n, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + offs_n // BS).to(tl.int64)
    tok = (offs_n % BS).to(tl.int64)
    k_off = blk * stride_kb + tok * stride_kt + h * stride_kh
    v_off = blk * stride_vb + tok * stride_vt + h * stride_vh
    if MASKED:
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    else:
        k = tl.load(K + k_off[:, None] + offs_d[None, :], mask=mask_d[None, :], other=0.0)
        v = tl.load(V + v_off[:, None] + offs_d[None, :], mask=mask_d[None, :], other=0.0)
    qk = mma(q, tl.trans(k), IEEE, UPCAST) * scale_log2  # [BLOCK_M, BLOCK_N]
    if MASKED:
        visible = (offs_n[None, :] <= pos_m[:, None]) & mask_n[None, :]
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, IEEE, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    Q, K, V, BT, SL, CU, OUT, scale_log2,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_btb, stride_ot, stride_oh, n_m_tiles,
    G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    hq = tl.program_id(1)
    b = pid // n_m_tiles
    m0 = (pid % n_m_tiles) * BLOCK_M
    q_start = tl.load(CU + b)
    q_len = tl.load(CU + b + 1) - q_start
    seq_len = tl.load(SL + b)
    h = hq // G
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    mask_m = offs_m < q_len  # all false for a tile past this sequence's queries: no work
    mask_d = offs_d < D
    prefix = seq_len - q_len
    pos_m = prefix + offs_m
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        Q + rows[:, None] * stride_qt + hq * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :], other=0.0,
    )  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    bt_row = BT + b.to(tl.int64) * stride_btb
    tile_end = tl.minimum(m0 + BLOCK_M, q_len)
    kv_end = tl.where(m0 < q_len, prefix + tile_end, 0)  # keys this tile may see
    full_end = tl.where(m0 < q_len, ((prefix + m0) // BLOCK_N) * BLOCK_N, 0)  # seen by all rows
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _tile(
            q, acc, m_i, l_i, K, V, bt_row, n0, pos_m, kv_end, h,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale_log2,
            offs_d, mask_d, D_PAD, BS, BLOCK_N, False, IEEE, UPCAST,
        )  # fmt: skip
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _tile(
            q, acc, m_i, l_i, K, V, bt_row, n0, pos_m, kv_end, h,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale_log2,
            offs_d, mask_d, D_PAD, BS, BLOCK_N, True, IEEE, UPCAST,
        )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptr = OUT + rows[:, None] * stride_ot + hq * stride_oh + offs_d[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def config(head_dim: int, dtype: torch.dtype, max_q_len: int) -> dict:
    """Tile sizes and launch options (H100-tuned for head_dim 128, bf16/fp16)."""
    if dtype == torch.float32 or head_dim > 128:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    if max_q_len <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def prefill(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_q_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Launch the prefill kernel (arguments checked by :func:`pagedkv.ops.prefill_attention`).

    q: [T, Hq, D] -> [T, Hq, D]. Without ``max_q_len`` it is read from cu_seqlens_q
    (one device sync).
    """
    t, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    bsz = cu_seqlens_q.numel() - 1
    if t == 0 or bsz == 0:
        return out
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    cfg = config(d, k_cache.dtype, max_q_len)
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    n_m_tiles = triton.cdiv(max(max_q_len, 1), cfg["BLOCK_M"])
    grid = (bsz * n_m_tiles, hq)
    ks, vs = k_cache.stride(), v_cache.stride()
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens.contiguous(), cu_seqlens_q.contiguous(), out,
        scale * LOG2E, q.stride(0), q.stride(1), ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
        block_tables.stride(0), out.stride(0), out.stride(1), n_m_tiles,
        G=hq // hkv, D=d, D_PAD=triton.next_power_of_2(d), BS=bs,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], IEEE=k_cache.dtype == torch.float32,
        UPCAST=needs_upcast(k_cache.dtype), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out
