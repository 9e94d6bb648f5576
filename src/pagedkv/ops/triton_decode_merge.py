"""The merge of split decode (:mod:`pagedkv.ops.triton_decode`): each (sequence, query
head) combines its splits' float32 partials by their log-sum-exps, all at once in a tree
or (batch-invariant) one split after another; and where split 0 starts (``split_base``,
shared with the split kernel)."""

from __future__ import annotations

from pagedkv._extras import optional_imports

with optional_imports(__name__):
    import triton
    import triton.language as tl

# per-call ints whose divisibility no load relies on: one specialization whatever their value
MERGE_DYNAMIC = ("stride_lb", "stride_lh", "lse_off", "split_tokens", "window")


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
def merge_head(o_base, lse_base, stride_os, n_splits, D: tl.constexpr, D_PAD: tl.constexpr,
               S_PAD: tl.constexpr, CACHE: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """The merged float32 output [D_PAD] of one (sequence, query head) from the partials at
    ``o_base`` (split s at ``s * stride_os``) and log-sum-exps at ``lse_base`` (split s at
    ``s``). S_PAD > 0: all splits at once (a tree reduction whose shape depends on S_PAD,
    hence on the batch); S_PAD == 0: one split after another in split order. ``CACHE``:
    the loads' cache modifier ("" default; ".cg" reads past L1, for partials that other
    programs of the same launch wrote); ``STAGES``: the split loop's ``num_stages`` (None:
    the kernel's; 1: not software-pipelined)."""
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D
    if S_PAD > 0:
        offs_s = tl.arange(0, S_PAD)
        mask_s = offs_s < n_splits
        lse = tl.load(lse_base + offs_s, mask=mask_s, other=float("-inf"), cache_modifier=CACHE)
        m = tl.max(lse, 0)
        m = tl.where(m == float("-inf"), 0.0, m)  # an empty sequence: no splits
        w = tl.where(mask_s, tl.exp2(lse - m), 0.0)
        o_ptr = o_base + offs_s[:, None] * stride_os + offs_d[None, :]
        o = tl.load(o_ptr, mask=mask_s[:, None] & mask_d[None, :], other=0.0,
                    cache_modifier=CACHE)  # fmt: skip
        acc = tl.sum(o * w[:, None], 0)
        den = tl.sum(w, 0)
    else:
        m = float("-inf")
        den = 0.0
        acc = tl.zeros([D_PAD], dtype=tl.float32)
        for s in tl.range(0, n_splits, num_stages=STAGES):
            lse = tl.load(lse_base + s, cache_modifier=CACHE)
            o = tl.load(o_base + s * stride_os + offs_d, mask=mask_d, other=0.0,
                        cache_modifier=CACHE)  # fmt: skip
            m_new = tl.maximum(m, lse)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(lse - m_new)
            acc = acc * alpha + w * o
            den = den * alpha + w
            m = m_new
    return tl.where(n_splits > 0, acc / tl.maximum(den, 1e-30), 0.0)


@triton.jit
def merge_last(Cnt, o_row, lse_row, f_row, stride_oh, stride_os, stride_lh, stride_fh, h,
               n_splits, G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
               S_PAD: tl.constexpr):  # fmt: skip
    """The fused merge, in the split kernel after a program stored its partials: count
    the program's arrival at its (sequence, KV head); the last of the row's programs (of
    every split of the grid) merges the G query heads' splits (in head order, each as
    :func:`merge_head` does, reading past L1) into the output row ``f_row`` and zeroes
    the count again for the next launch on the stream. acq_rel: the partials each program
    stored (after a barrier of its threads) are visible to the one that merges."""
    tl.debug_barrier()
    cnt = Cnt + tl.program_id(0) * tl.num_programs(1) + h
    if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == tl.num_programs(2) - 1:
        tl.store(cnt, 0)
        offs_d = tl.arange(0, D_PAD)
        for g in tl.range(0, G, num_stages=1):  # no pipelining: no shared-memory buffers
            head = h * G + g
            res = merge_head(o_row + head * stride_oh, lse_row + head * stride_lh, stride_os,
                             n_splits, D, D_PAD, S_PAD, ".cg", 1)  # fmt: skip
            tl.store(f_row + head * stride_fh + offs_d, res.to(f_row.dtype.element_ty),
                     mask=offs_d < D)  # fmt: skip


@triton.jit(do_not_specialize=MERGE_DYNAMIC)
def _decode_merge_kernel(
    Opart, LSE, SL, OUT,
    stride_ob, stride_oh, stride_os, stride_outb, stride_outh,
    stride_lb: tl.int32, stride_lh: tl.int32, lse_off: tl.int64,
    split_tokens: tl.int32, window: tl.int32,
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
    o_base = Opart + b.to(tl.int64) * stride_ob + hq * stride_oh
    lse_base = LSE + lse_off + b.to(tl.int64) * stride_lb + hq * stride_lh
    out = merge_head(o_base, lse_base, stride_os, n_splits, D, D_PAD, S_PAD, "", None)
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D
    out_ptr = OUT + b.to(tl.int64) * stride_outb + hq * stride_outh + offs_d
    tl.store(out_ptr, out.to(OUT.dtype.element_ty), mask=mask_d)
