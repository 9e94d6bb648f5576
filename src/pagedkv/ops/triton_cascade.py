"""Triton kernels of shared-prefix (cascade) attention (see :mod:`pagedkv.ops.cascade`).

Every program works on (row, head) *pairs*: the G query heads sharing KV head h of each
query row are stacked, so one K/V tile load serves all of them and the products run on
tensor cores (``tl.dot``). Kernels:

- ``_shared_kernel`` (level 1), program (tile, KV head, split): a tile of up to BLOCK_Q
  pairs of one group's rows against tokens ``[s * split, (s+1) * split)`` of the group's
  shared prefix, read through the block table of the group's first sequence; writes a
  float32 partial output and its log-sum-exp (base 2) into slot s of the workspace.
- ``_private_decode_kernel`` (level 2, decode), program (sequence, KV head, split): the
  sequence's suffix ``[shared, seq_len)``; with one split (FUSED) it folds the row's
  shared slots in and writes the output, else it writes slots and ``_merge_kernel``
  folds them all.
- ``_private_prefill_kernel`` (level 2, prefill), program (chunk tile, KV head): the
  causal part over ``[shared, seq_len)``, folding the shared slots in (always fused).

Merging is exact: a slot's (o, lse) is its softmax-normalised output and
``log2(sum(2^scores))``, so folding slots in any order yields the full softmax.
Offsets that multiply a block id or a row by a stride are int64.
"""

from __future__ import annotations

import torch

from pagedkv._extras import optional_imports

with optional_imports(__name__):
    import triton
    import triton.language as tl

from pagedkv.ops.cascade_launch import Launch
from pagedkv.ops.triton_attn import LOG2E, mma, needs_upcast, packed_tile


@triton.jit
def _kv_tile(
    q, acc, m_i, l_i, K, V, bt_row, n0, kv_end, pos, h,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale_log2,
    offs_d, mask_d, BS: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One online-softmax step of q [R, D_PAD] over keys ``n0 .. n0 + BLOCK_N``."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        mask_n = offs_n < kv_end
        blk = tl.load(bt_row + offs_n // BS, mask=mask_n, other=0).to(tl.int64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
    else:
        blk = tl.load(bt_row + offs_n // BS).to(tl.int64)
        kv_mask = mask_d[None, :]
    tok = (offs_n % BS).to(tl.int64)
    k_off = blk * stride_kb + tok * stride_kt + h * stride_kh
    v_off = blk * stride_vb + tok * stride_vt + h * stride_vh
    k = tl.load(K + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, D]
    v = tl.load(V + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    qk = mma(q, tl.trans(k), IEEE, UPCAST) * scale_log2  # [R, BLOCK_N]
    if MASKED:
        visible = mask_n[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= pos[:, None])
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, IEEE, UPCAST)
    return acc, m_new, l_i


@triton.jit
def _fold(acc, m_i, l_i, o_ptrs, lse_ptrs, mask_r, mask_o, n, stride_os):
    """Fold ``n`` workspace slots (normalised o, base-2 lse) into a running (acc, m, l)."""
    for s in range(0, n):
        lse = tl.load(lse_ptrs + s, mask=mask_r, other=0.0)
        o = tl.load(o_ptrs + s * stride_os, mask=mask_o, other=0.0)
        m_new = tl.maximum(m_i, lse)
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha[:, None] + o * w[:, None]
        l_i = l_i * alpha + w
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _span(
    q, acc, m_i, l_i, K, V, bt_row, start, full_end, end, pos, h,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale_log2,
    offs_d, mask_d, BS: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Keys ``[start, end)`` into (acc, m, l): the whole tiles before ``full_end`` without
    a mask (every row sees every key there), the rest masked."""
    for part in tl.static_range(2):  # unrolled at compile time: unmasked, then masked
        lo = start if part == 0 else full_end
        hi = full_end if part == 0 else end
        for n0 in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _kv_tile(
                q, acc, m_i, l_i, K, V, bt_row, n0, end, pos, h, stride_kb, stride_kt,
                stride_kh, stride_vb, stride_vt, stride_vh, scale_log2, offs_d, mask_d, BS,
                BLOCK_N, part == 1, CAUSAL, IEEE, UPCAST,
            )  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _empty(R: tl.constexpr, D_PAD: tl.constexpr):
    """The online-softmax state (acc, m, l) of ``R`` rows before any key."""
    acc = tl.zeros([R, D_PAD], dtype=tl.float32)
    return acc, tl.full([R], float("-inf"), dtype=tl.float32), tl.zeros([R], dtype=tl.float32)


@triton.jit
def _write_slot(acc, m_i, l_i, o_ptrs, lse_ptrs, keep, mask_d):
    """Store rows ``keep`` of the normalised output and their base-2 lse in a workspace slot."""
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptrs, out, mask=keep[:, None] & mask_d[None, :])
    tl.store(lse_ptrs, m_i + tl.log2(tl.maximum(l_i, 1e-30)), mask=keep)


@triton.jit
def _write_out(acc, l_i, out_ptrs, OUT, mask):
    """Store the normalised output (zeros where nothing was seen) in OUT's dtype."""
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["split_tokens"])
def _shared_kernel(
    Q, K, V, BT, TILE_GROUP, TILE_START, ROWS, ROW_PTR, LEADER, SHARED_LEN, Opart, LSE,
    scale_log2, stride_qr, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
    stride_vh, stride_btb, stride_or, stride_oh, stride_os, stride_lr, stride_lh, split_tokens,
    G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    grp = tl.load(TILE_GROUP + t)
    p0 = tl.load(TILE_START + t)
    r0 = tl.load(ROW_PTR + grp)
    n_pairs = (tl.load(ROW_PTR + grp + 1) - r0) * G
    shared_len = tl.load(SHARED_LEN + grp)
    start = s * split_tokens
    end = tl.minimum(start + split_tokens, shared_len)
    offs_p = p0 + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < n_pairs
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D
    row = tl.load(ROWS + r0 + offs_p // G, mask=mask_p, other=0).to(tl.int64)
    head = h * G + offs_p % G
    q_mask = mask_p[:, None] & mask_d[None, :]
    q = tl.load(Q + row[:, None] * stride_qr + head[:, None] * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)  # fmt: skip
    acc, m_i, l_i = _empty(BLOCK_Q, D_PAD)
    bt_row = BT + tl.load(LEADER + grp).to(tl.int64) * stride_btb
    full_end = start + (tl.maximum(end - start, 0) // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _span(
        q, acc, m_i, l_i, K, V, bt_row, start, full_end, end, offs_p, h, stride_kb, stride_kt,
        stride_kh, stride_vb, stride_vt, stride_vh, scale_log2, offs_d, mask_d, BS, BLOCK_N,
        False, IEEE, UPCAST,
    )  # fmt: skip
    keep = offs_p < tl.where(start < shared_len, n_pairs, 0)  # a split past the prefix: none
    o_ptr = Opart + row[:, None] * stride_or + head[:, None] * stride_oh + s * stride_os
    lse_ptr = LSE + row * stride_lr + head * stride_lh + s
    _write_slot(acc, m_i, l_i, o_ptr + offs_d[None, :], lse_ptr, keep, mask_d)


@triton.jit(do_not_specialize=["split1", "split2", "slot0"])
def _private_decode_kernel(
    Q, K, V, BT, SL, SHARED, Opart, LSE, OUT, scale_log2,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_btb, stride_or, stride_oh, stride_os, stride_lr, stride_lh, stride_outb, stride_outh,
    split1, split2, slot0,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BS: tl.constexpr, BLOCK_N: tl.constexpr, FUSED: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # sequence, KV head, split
    seq_len = tl.load(SL + b)
    shared = tl.load(SHARED + b)
    start = shared + s * split2
    end = tl.minimum(start + split2, seq_len)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    mask_g = offs_g < G
    mask_d = offs_d < D
    heads = h * G + offs_g
    b64 = b.to(tl.int64)
    row_mask = mask_g[:, None] & mask_d[None, :]
    q = tl.load(Q + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask, other=0.0)  # q: [G_PAD, D_PAD]  # fmt: skip
    acc, m_i, l_i = _empty(G_PAD, D_PAD)
    bt_row = BT + b64 * stride_btb
    for n0 in range(start, end, BLOCK_N):
        acc, m_i, l_i = _kv_tile(
            q, acc, m_i, l_i, K, V, bt_row, n0, end, offs_g, h, stride_kb, stride_kt,
            stride_kh, stride_vb, stride_vt, stride_vh, scale_log2, offs_d, mask_d, BS,
            BLOCK_N, True, False, IEEE, UPCAST,
        )  # fmt: skip
    o_rows = Opart + b64 * stride_or + heads[:, None] * stride_oh + offs_d[None, :]
    lse_rows = LSE + b64 * stride_lr + heads * stride_lh
    if FUSED:
        n1 = tl.cdiv(shared, split1)
        acc, m_i, l_i = _fold(acc, m_i, l_i, o_rows, lse_rows, mask_g, row_mask, n1, stride_os)
        out_ptr = OUT + b64 * stride_outb + heads[:, None] * stride_outh + offs_d[None, :]
        _write_out(acc, l_i, out_ptr, OUT, row_mask)  # nothing at all (seq_len 0): zeros
    else:
        keep = offs_g < tl.where(start < seq_len, G, 0)
        slot = slot0 + s
        _write_slot(acc, m_i, l_i, o_rows + slot * stride_os, lse_rows + slot, keep, mask_d)


@triton.jit(do_not_specialize=["split1", "split2", "slot0"])
def _merge_kernel(
    Opart, LSE, SL, SHARED, OUT, stride_or, stride_oh, stride_os, stride_lr, stride_lh,
    stride_outb, stride_outh, split1, split2, slot0,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
):  # fmt: skip
    """Fold a decode row's shared slots [0, n1) and private slots [slot0, slot0 + n2)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(SL + b)
    shared = tl.load(SHARED + b)
    n1 = tl.cdiv(shared, split1)
    n2 = tl.cdiv(tl.maximum(seq_len - shared, 0), split2)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    mask_g = offs_g < G
    row_mask = mask_g[:, None] & (offs_d < D)[None, :]
    heads = h * G + offs_g
    b64 = b.to(tl.int64)
    o_rows = Opart + b64 * stride_or + heads[:, None] * stride_oh + offs_d[None, :]
    lse_rows = LSE + b64 * stride_lr + heads * stride_lh
    acc, m_i, l_i = _empty(G_PAD, D_PAD)
    acc, m_i, l_i = _fold(acc, m_i, l_i, o_rows, lse_rows, mask_g, row_mask, n1, stride_os)
    acc, m_i, l_i = _fold(acc, m_i, l_i, o_rows + slot0 * stride_os, lse_rows + slot0, mask_g,
                          row_mask, n2, stride_os)  # fmt: skip
    out_ptr = OUT + b64 * stride_outb + heads[:, None] * stride_outh + offs_d[None, :]
    _write_out(acc, l_i, out_ptr, OUT, row_mask)


@triton.jit(do_not_specialize=["split1", "n_tiles"])
def _private_prefill_kernel(
    Q, K, V, BT, SL, CU, SHARED, Opart, LSE, OUT, scale_log2,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_btb, stride_or, stride_oh, stride_os, stride_lr, stride_lh, stride_ot, stride_oth,
    split1, n_tiles,
    G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(1)
    b, p0, q_start, q_len, seq_len = packed_tile(CU, SL, n_tiles, BLOCK_Q)
    shared = tl.load(SHARED + b)
    n_pairs = q_len * G
    offs_p = p0 + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < n_pairs  # all false for a tile past this chunk: no work
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D
    tok = offs_p // G
    heads = h * G + offs_p % G
    prefix = seq_len - q_len
    pos = prefix + tok  # absolute position of each pair's query token
    rows = (q_start + tok).to(tl.int64)
    row_mask = mask_p[:, None] & mask_d[None, :]
    q = tl.load(Q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask, other=0.0)  # fmt: skip
    acc, m_i, l_i = _empty(BLOCK_Q, D_PAD)
    bt_row = BT + b.to(tl.int64) * stride_btb
    has = p0 < n_pairs
    last_tok = (tl.minimum(p0 + BLOCK_Q, n_pairs) - 1) // G
    kv_end = tl.where(has, prefix + last_tok + 1, shared)  # keys this tile may see
    # keys before the tile's first query token are seen by every row: no mask there
    full_end = tl.where(has, shared + ((prefix + p0 // G - shared) // BLOCK_N) * BLOCK_N, shared)
    acc, m_i, l_i = _span(
        q, acc, m_i, l_i, K, V, bt_row, shared, full_end, kv_end, pos, h, stride_kb, stride_kt,
        stride_kh, stride_vb, stride_vt, stride_vh, scale_log2, offs_d, mask_d, BS, BLOCK_N,
        True, IEEE, UPCAST,
    )  # fmt: skip
    n1 = tl.where(has, tl.cdiv(shared, split1), 0)
    o_rows = Opart + rows[:, None] * stride_or + heads[:, None] * stride_oh + offs_d[None, :]
    lse_rows = LSE + rows * stride_lr + heads * stride_lh
    acc, m_i, l_i = _fold(acc, m_i, l_i, o_rows, lse_rows, mask_p, row_mask, n1, stride_os)
    out_ptr = OUT + rows[:, None] * stride_ot + heads[:, None] * stride_oth + offs_d[None, :]
    _write_out(acc, l_i, out_ptr, OUT, row_mask)


def run(q, k_cache, v_cache, block_tables, seq_lens, plan, scale, out) -> None:
    """Launch the cascade kernels of ``plan`` (arguments checked by the caller)."""
    L: Launch = plan.launch
    hq, hkv, d, bs = plan.shape
    g = hq // hkv
    q = q if q.stride(2) == 1 else q.contiguous()
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    m = L.meta
    qs, ks, vs = q.stride(), k_cache.stride(), v_cache.stride()
    ows, lws = L.o_ws.stride(), L.lse_ws.stride()
    common = dict(D=d, D_PAD=triton.next_power_of_2(d), BS=bs, IEEE=k_cache.dtype == torch.float32,
                  UPCAST=needs_upcast(k_cache.dtype))  # fmt: skip
    sl2 = scale * LOG2E
    if L.n_tiles:
        c = L.shared_cfg
        _shared_kernel[(L.n_tiles, hkv, L.slots1)](
            q, k_cache, v_cache, block_tables, m["tile_group"], m["tile_start"], m["rows"],
            m["row_ptr"], m["leader"], m["shared_len"], L.o_ws, L.lse_ws, sl2, qs[0], qs[1],
            ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], block_tables.stride(0), ows[0], ows[1],
            ows[2], lws[0], lws[1], L.split1, G=g, BLOCK_Q=c["BLOCK_Q"], BLOCK_N=c["BLOCK_N"],
            num_warps=c["num_warps"], num_stages=c["num_stages"], **common,
        )  # fmt: skip
    c = L.private_cfg
    if plan.is_prefill:
        _private_prefill_kernel[(plan.num_seqs * L.prefill_tiles, hkv)](
            q, k_cache, v_cache, block_tables, seq_lens, plan.cu_seqlens_q, m["row_shared"],
            L.o_ws, L.lse_ws, out, sl2, qs[0], qs[1], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
            block_tables.stride(0), ows[0], ows[1], ows[2], lws[0], lws[1], out.stride(0),
            out.stride(1), L.split1, L.prefill_tiles, G=g, BLOCK_Q=c["BLOCK_Q"],
            BLOCK_N=c["BLOCK_N"], num_warps=c["num_warps"], num_stages=c["num_stages"], **common,
        )  # fmt: skip
        return
    g_pad = max(16, triton.next_power_of_2(g))
    _private_decode_kernel[(plan.num_seqs, hkv, L.splits2)](
        q, k_cache, v_cache, block_tables, seq_lens, m["row_shared"], L.o_ws, L.lse_ws, out,
        sl2, qs[0], qs[1], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], block_tables.stride(0),
        ows[0], ows[1], ows[2], lws[0], lws[1], out.stride(0), out.stride(1), L.split1,
        L.split2, L.slots1, G=g, G_PAD=g_pad, BLOCK_N=c["BLOCK_N"], FUSED=L.fused,
        num_warps=c["num_warps"], num_stages=c["num_stages"], **common,
    )  # fmt: skip
    if not L.fused:
        _merge_kernel[(plan.num_seqs, hkv)](
            L.o_ws, L.lse_ws, seq_lens, m["row_shared"], out, ows[0], ows[1], ows[2], lws[0],
            lws[1], out.stride(0), out.stride(1), L.split1, L.split2, L.slots1, G=g,
            G_PAD=g_pad, D=d, D_PAD=triton.next_power_of_2(d), num_warps=1,
        )  # fmt: skip
