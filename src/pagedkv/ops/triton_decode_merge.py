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
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D
    o_base = Opart + b.to(tl.int64) * stride_ob + hq * stride_oh
    lse_base = LSE + lse_off + b.to(tl.int64) * stride_lb + hq * stride_lh
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
