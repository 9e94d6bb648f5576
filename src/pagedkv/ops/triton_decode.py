"""Triton paged decode attention: split-KV (flash-decoding) with GQA grouping.

One program handles (sequence b, KV head h, split s): the G query heads that share KV
head h are stacked as the rows of one tile, so each K/V token is loaded once for all of
them. Split s covers keys ``[base + s * split_tokens, base + (s + 1) * split_tokens)``
from the first key the query sees (``seq_len - window`` for a sliding window, else 0):
keys before the window are never loaded, and the grid has only the splits a window
needs. Each split writes a float32 partial output and its log-sum-exp, and a second
kernel merges the splits of each sequence (all at once, or one by one in split order).
With a single split the first kernel writes the output. Softcapping is applied in
natural units before the exp2 scaling; sinks enter the first split's running sum.

Batch invariance: a sequence's bits depend on its tokens' tile boundaries, on
``split_tokens`` and on the merge order. In invariant mode ``split_tokens`` is a
constant, splits sit at absolute multiples of it (``base`` rounded down) and the merge
always runs, one split after another, so nothing depends on the batch; otherwise
``split_tokens`` is sized to fill the GPU and the merge reduces all splits in one tree.

Offsets that multiply a block id by a stride are computed in int64.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from pagedkv._extras import optional_imports

with optional_imports(__name__):
    import triton
    import triton.language as tl

from pagedkv.ops._config import interpreting

INVARIANT_SPLIT_TOKENS = 512
MIN_SPLIT_TOKENS = 64
MAX_VECTOR_MERGE = 128  # more splits than this are merged one by one
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


@triton.jit
def split_base(seq_len, window, split_tokens, ALIGNED: tl.constexpr):
    """(first key the query sees, start of split 0). Aligned (batch-invariant) splits sit
    at absolute multiples of split_tokens, as without a window, so a key keeps its split
    and tile as the window slides from step to step."""
    lo = tl.maximum(seq_len - window, 0)
    if ALIGNED:
        return lo, (lo // split_tokens) * split_tokens
    else:
        return lo, lo


@triton.jit
def _decode_split_kernel(
    Q, K, V, BT, SL, Sinks, Out, LSE,
    qk_scale, cap_log2, window,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_btb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    split_tokens,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BS: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, ALIGNED: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(SL + b)
    lo, base = split_base(seq_len, window, split_tokens, ALIGNED)
    start = base + s * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)
    first_key = tl.maximum(start, lo)  # keys before it (outside the window) are never loaded
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    mask_g = offs_g < G
    mask_d = offs_d < D
    heads = h * G + offs_g

    q_ptr = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr, mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # q: [G_PAD, D_PAD]
    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    if HAS_SINKS:  # folded into the first split only (the merge then counts it once)
        sink = tl.load(Sinks + heads, mask=mask_g, other=float("-inf")).to(tl.float32)
        m_i, l_i = with_sink(m_i, l_i, tl.where(s == 0, sink, float("-inf")))
    acc = tl.zeros([G_PAD, D_PAD], dtype=tl.float32)
    bt_row = BT + b.to(tl.int64) * stride_btb
    # tiles at fixed offsets from the split start, beginning with the one holding first_key
    for t0 in range(start + ((first_key - start) // BLOCK_N) * BLOCK_N, end, BLOCK_N):
        offs_n = t0 + tl.arange(0, BLOCK_N)
        mask_n = (offs_n >= first_key) & (offs_n < end)
        blk = tl.load(bt_row + offs_n // BS, mask=mask_n, other=0).to(tl.int64)
        tok = (offs_n % BS).to(tl.int64)
        k_off = blk * stride_kb + tok * stride_kt + h * stride_kh
        v_off = blk * stride_vb + tok * stride_vt + h * stride_vh
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, D]
        v = tl.load(V + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = logits(mma(q, tl.trans(k), IEEE, UPCAST), qk_scale, cap_log2, SOFTCAP)
        qk = tl.where(mask_n[None, :], qk, float("-inf"))  # [G_PAD, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = mma(p.to(v.dtype), v, IEEE, UPCAST)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    # An empty split (start >= seq_len: no iteration) leaves l_i = 0 and writes zeros; the
    # merge never reads it, and in direct mode it is the zero output of an empty sequence.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_mask = mask_g[:, None] & mask_d[None, :]
    if DIRECT:
        o_ptr = Out + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=out_mask)
    else:
        o_base = Out + b.to(tl.int64) * stride_ob + s.to(tl.int64) * stride_os
        tl.store(o_base + heads[:, None] * stride_oh + offs_d[None, :], out, mask=out_mask)
        lse_ptr = LSE + b.to(tl.int64) * stride_lb + heads * stride_lh + s
        tl.store(lse_ptr, m_i + tl.log2(tl.maximum(l_i, 1e-30)), mask=mask_g)


@triton.jit
def _decode_merge_kernel(
    Opart, LSE, SL, OUT,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    split_tokens, window,
    D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Merge the splits of (sequence, query head). S_PAD > 0: all splits at once (a tree
    reduction whose shape depends on S_PAD, hence on the batch); S_PAD == 0: one split
    after another in split order (batch-invariant)."""
    b = tl.program_id(0)
    hq = tl.program_id(1)
    seq_len = tl.load(SL + b)
    _, base = split_base(seq_len, window, split_tokens, ALIGNED)
    n_splits = tl.cdiv(seq_len - base, split_tokens)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D
    o_base = Opart + b.to(tl.int64) * stride_ob + hq * stride_oh
    lse_base = LSE + b.to(tl.int64) * stride_lb + hq * stride_lh
    if S_PAD > 0:
        offs_s = tl.arange(0, S_PAD)
        mask_s = offs_s < n_splits
        lse = tl.load(lse_base + offs_s, mask=mask_s, other=float("-inf"))
        m = tl.max(lse, 0)
        m = tl.where(m == float("-inf"), 0.0, m)  # an empty sequence: no splits
        w = tl.where(mask_s, tl.exp2(lse - m), 0.0)
        o_ptr = o_base + offs_s[:, None] * stride_os + offs_d[None, :]
        o = tl.load(o_ptr, mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        acc = tl.sum(o * w[:, None], 0)
        den = tl.sum(w, 0)
    else:
        m = float("-inf")
        den = 0.0
        acc = tl.zeros([D_PAD], dtype=tl.float32)
        for s in range(0, n_splits):
            lse = tl.load(lse_base + s)
            o = tl.load(o_base + s * stride_os + offs_d, mask=mask_d, other=0.0)
            m_new = tl.maximum(m, lse)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(lse - m_new)
            acc = acc * alpha + w * o
            den = den * alpha + w
            m = m_new
    out = tl.where(n_splits > 0, acc / tl.maximum(den, 1e-30), 0.0)
    out_ptr = OUT + b.to(tl.int64) * stride_outb + hq * stride_outh + offs_d
    tl.store(out_ptr, out.to(OUT.dtype.element_ty), mask=mask_d)


def config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options of the split kernel (fixed per head_dim and dtype, so
    that batch-invariant results do not depend on the batch). Picked from a sweep on an
    H100 (benchmarks/bench_attention.py --sweep): 64-token tiles, 4 warps, 3 stages were
    within 1-3 % of the best at every shape tried."""
    if dtype == torch.float32 or head_dim > 128:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_split_tokens(
    batch: int, num_kv_heads: int, max_seq_len: int, block_n: int, device: torch.device,
    batch_invariant: bool,
) -> int:  # fmt: skip
    """Tokens per split: a constant in invariant mode, else enough splits for about two
    programs per SM. On an H100 (132 SMs) the sweep found: no split once B * Hkv >= ~264
    (B=64 and B=128: splitting only adds merge traffic), 512-token splits at B=1 ctx 16k,
    64-token splits at B=1 ctx 512."""
    if batch_invariant:
        return INVARIANT_SPLIT_TOKENS
    max_seq_len = max(max_seq_len, 1)
    want_splits = -(-2 * _sm_count(device) // max(batch * num_kv_heads, 1))
    split = max(-(-max_seq_len // want_splits), MIN_SPLIT_TOKENS)
    return -(-split // block_n) * block_n


class SplitPlan(NamedTuple):
    """How decode splits each sequence's keys: ``num_splits`` programs per (sequence, KV
    head) of ``split_tokens`` keys each, starting at the window's first key, or at the
    multiple of ``split_tokens`` below it when ``aligned`` (batch-invariant mode)."""

    split_tokens: int
    num_splits: int
    aligned: bool


def plan_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, window: int | None, block_n: int,
    device: torch.device, batch_invariant: bool, split_tokens: int | None = None,
) -> SplitPlan:  # fmt: skip
    """Splits for sequences of up to ``max_seq_len`` tokens: they cover only the keys the
    query sees (the last ``window``), so the work follows the window, not the context."""
    max_seq_len = max(max_seq_len, 1)
    span = max_seq_len if window is None else min(window, max_seq_len)
    if split_tokens is None:
        split_tokens = choose_split_tokens(
            batch, num_kv_heads, span, block_n, device, batch_invariant
        )
    if batch_invariant:  # an aligned span of `span` keys touches at most this many splits
        n = min(-(-max_seq_len // split_tokens), -(-(span - 1) // split_tokens) + 1)
    else:
        n = -(-span // split_tokens)
    return SplitPlan(split_tokens, max(1, n), batch_invariant)


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    batch_invariant: bool = False,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    split_tokens: int | None = None,
    max_seq_len: int | None = None,
    splits: SplitPlan | None = None,
    out: torch.Tensor | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    cfg: dict | None = None,
) -> torch.Tensor:
    """Launch the decode kernels (arguments checked by :func:`pagedkv.ops.decode_attention`).

    q: [B, Hq, D] -> [B, Hq, D]. ``max_seq_len`` bounds seq_lens (default: the table's
    capacity; no device sync). ``splits`` (from :func:`plan_splits`) fixes the split
    layout, else it is planned here (``split_tokens`` forces the split size).
    ``workspace`` = (o [B', Hq, S', D] f32, lse [B', Hq, S'] f32) with B' >= B and S' >=
    the number of splits lets a caller (DecodePlan) keep every buffer static for
    CUDA-graph capture. ``cfg`` overrides :func:`config` (tuning).
    """
    bsz, hq, d = q.shape
    _, bs, hkv, _ = k_cache.shape
    g = hq // hkv
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if bsz == 0:
        return out
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    cfg = {**config(d, k_cache.dtype), **(cfg or {})}
    if splits is None:
        cap = block_tables.shape[1] * bs
        max_seq_len = cap if max_seq_len is None else min(max_seq_len, cap)
        splits = plan_splits(
            bsz, hkv, max_seq_len, window, cfg["BLOCK_N"], q.device, batch_invariant,
            split_tokens,
        )  # fmt: skip
    split_tokens, n_splits, aligned = splits
    direct = n_splits == 1 and not batch_invariant
    if softcap is None:
        qk_scale, cap_log2 = scale * LOG2E, 0.0
    else:
        qk_scale, cap_log2 = scale / softcap, softcap * LOG2E
    win = NO_WINDOW if window is None else min(window, NO_WINDOW)
    sinks_arg = q if sinks is None else sinks.contiguous()  # a dummy pointer without sinks
    common = dict(
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, D_PAD=triton.next_power_of_2(d),
        BS=bs, BLOCK_N=cfg["BLOCK_N"], IEEE=k_cache.dtype == torch.float32,
        UPCAST=needs_upcast(k_cache.dtype), ALIGNED=aligned, SOFTCAP=softcap is not None,
        HAS_SINKS=sinks is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    grid = (bsz, hkv, n_splits)
    qs, ks, vs = q.stride(), k_cache.stride(), v_cache.stride()
    args = (qk_scale, cap_log2, win, qs[0], qs[1], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
            block_tables.stride(0))  # fmt: skip
    if direct:
        os_ = out.stride()
        _decode_split_kernel[grid](
            q, k_cache, v_cache, block_tables, seq_lens, sinks_arg, out, out, *args,
            os_[0], os_[1], 0, 0, 0, split_tokens, DIRECT=True, **common,
        )  # fmt: skip
        return out
    if workspace is None:
        o_part = torch.empty(bsz, hq, n_splits, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(bsz, hq, n_splits, dtype=torch.float32, device=q.device)
    else:
        o_part, lse = workspace
        assert o_part.shape[2] >= n_splits and o_part.shape[0] >= bsz, "workspace too small"
    ops_, ls = o_part.stride(), lse.stride()
    _decode_split_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, sinks_arg, o_part, lse, *args,
        ops_[0], ops_[1], ops_[2], ls[0], ls[1], split_tokens, DIRECT=False, **common,
    )  # fmt: skip
    s_pad = 0 if batch_invariant else triton.next_power_of_2(n_splits)
    if s_pad > MAX_VECTOR_MERGE:
        s_pad = 0
    _decode_merge_kernel[(bsz, hq)](
        o_part, lse, seq_lens, out, ops_[0], ops_[1], ops_[2], ls[0], ls[1],
        out.stride(0), out.stride(1), split_tokens, win, D=d, D_PAD=triton.next_power_of_2(d),
        S_PAD=s_pad, ALIGNED=aligned, num_warps=4 if s_pad >= 32 else 1,
    )  # fmt: skip
    return out
