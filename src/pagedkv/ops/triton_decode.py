"""Triton paged decode attention: split-KV (flash-decoding) with GQA grouping.

One program handles (sequence b, KV head h, split s): the G query heads that share KV
head h are stacked as the rows of one tile, so each K/V token is loaded once for all of
them. Split s covers keys ``[base + s * split_tokens, base + (s + 1) * split_tokens)``
from the first key the query sees (``seq_len - window`` for a sliding window, else 0):
keys before the window are never loaded, and the grid has only the splits a window
needs. Each split writes a float32 partial output and its log-sum-exp; the last
program of each (sequence, KV head) to finish (an atomic count of arrivals, acq_rel)
merges the row's splits, so one launch does it all (``FUSED``); batch-invariant mode and
callers with their own workspace (DecodePlan) merge in a second kernel instead. Either
merge takes the splits all at once or one by one in split order, whichever program runs
it. With a single split the first kernel writes the output. Softcapping is applied in
natural units before the exp2 scaling; sinks enter the first split's running sum.

A tile's products take one of three forms (``FORM``, the config's ``form``: see
:data:`pagedkv.ops.decode_splits.QUANT_CONFIGS`): ``tl.dot`` in q's dtype, ``tl.dot`` in
float16 over a quantized cache (q scaled by a power of two, ``p * v_scale`` by the
tile's largest ``v_scale``), or float32 products reduced over D on CUDA cores.

Batch invariance: a sequence's bits depend on its tokens' tile boundaries (and the
config, fixed per dtype), on ``split_tokens`` and on the merge order. In invariant mode
``split_tokens`` is a constant, splits sit at absolute multiples of it (``base`` rounded
down) and the merge always runs, one split after another, so nothing depends on the
batch; otherwise ``split_tokens`` is sized to fill the GPU and the merge reduces all
splits in one tree.

Offsets that multiply a block id by a stride are computed in int64.
"""

from __future__ import annotations

import torch

from pagedkv._extras import optional_imports

with optional_imports(__name__):
    import triton
    import triton.language as tl

from pagedkv.ops._launch import Launcher, Scratch, made_once
from pagedkv.ops.decode_splits import (  # noqa: F401  (re-exported: the split planning)
    FORMS,
    INVARIANT_SPLIT_TOKENS,
    MAX_VECTOR_MERGE,
    MIN_SPLIT_TOKENS,
    SplitPlan,
    _sm_count,
    choose_split_tokens,
    config,
    form_of,
    plan_splits,
)
from pagedkv.ops.triton_attn import (
    logits,
    mma,
    needs_upcast,
    pow2_scale,
    scalars,
    widen,
    widen16,
    widen32,
    with_sink,
)
from pagedkv.ops.triton_decode_merge import (  # noqa: F401
    _decode_merge_kernel,
    merge_last,
    split_base,
)

# Integer arguments that change from call to call and whose divisibility no load or store
# relies on (table width, split size, window, log-sum-exp offsets): one specialization
# whatever their value. The strides of q / out / partials stay specialized (they make
# row loads and stores vector-wide); they are multiples of 16 in every common layout.
# See pagedkv.ops._launch for how the kernels are launched.
DECODE_DYNAMIC = ("window", "stride_btb", "stride_lb", "stride_lh", "lse_off", "split_tokens")


@triton.jit(do_not_specialize=DECODE_DYNAMIC)
def _decode_split_kernel(
    Q, K, V, KS, VS, BT, SL, Sinks, Out, LSE, Final, Cnt,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_os, stride_fb, stride_fh,
    qk_scale, cap_log2, window: tl.int32, stride_btb: tl.int32,
    stride_lb: tl.int32, stride_lh: tl.int32, lse_off: tl.int64, split_tokens: tl.int32,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ksb, stride_vsb,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BS: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, ALIGNED: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr, QUANT: tl.constexpr, FORM: tl.constexpr, FUSED: tl.constexpr,
    S_PAD: tl.constexpr,
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
    if FORM == 1:  # float16 tensor cores: q times a power of two, undone on the scores
        q_mul, q_inv = pow2_scale(tl.max(tl.max(tl.abs(q.to(tl.float32)), 1), 0))
        q = (q.to(tl.float32) * q_mul).to(tl.float16)
    elif FORM == 2:  # CUDA cores, float32
        q = q.to(tl.float32)
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
        if FORM == 2:  # products reduced over D: no dot-operand layout, no padding of G
            qk = tl.sum(q[:, None, :] * widen32(k)[None, :, :], 2)
        elif FORM == 1:
            qk = mma(q, tl.trans(widen16(k)), False, False) * q_inv
        else:  # quantized K/V are exact in q's dtype
            qk = mma(q, tl.trans(widen(k, q.dtype)), IEEE, UPCAST)
        if QUANT:  # the per-(block, head) scales fold into the scores (K) and the
            # probabilities (V), one per key
            k_s = tl.load(KS + blk * stride_ksb + h, mask=mask_n, other=0.0)  # [BLOCK_N]
            v_s = tl.load(VS + blk * stride_vsb + h, mask=mask_n, other=0.0)
            qk = qk * k_s[None, :]
        qk = logits(qk, qk_scale, cap_log2, SOFTCAP)
        qk = tl.where(mask_n[None, :], qk, float("-inf"))  # [G_PAD, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if QUANT and FORM != 1:
            p = p * v_s[None, :]
        if FORM == 2:
            pv = tl.sum(p[:, :, None] * widen32(v)[None, :, :], 1)
        elif FORM == 1:  # p * v_s / (the tile's largest v_s) <= 1 fits float16 whatever the scales
            v_top = tl.max(v_s, 0)
            v_top = tl.where(v_top > 0, v_top, 1.0)
            pv = mma((p * (v_s / v_top)[None, :]).to(tl.float16), widen16(v), False, False)
            pv = pv * v_top
        else:
            pv = mma(p.to(q.dtype), widen(v, q.dtype), IEEE, UPCAST)
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
        lse_ptr = LSE + lse_off + b.to(tl.int64) * stride_lb + heads * stride_lh + s
        tl.store(lse_ptr, m_i + tl.log2(tl.maximum(l_i, 1e-30)), mask=mask_g)
        if FUSED:  # the last program of (b, h) to finish merges the row's splits
            merge_last(Cnt, Out + b.to(tl.int64) * stride_ob, LSE + lse_off + b.to(tl.int64)
                       * stride_lb, Final + b.to(tl.int64) * stride_fb, stride_oh, stride_os,
                       stride_lh, stride_fh, h, tl.cdiv(seq_len - base, split_tokens), G, D,
                       D_PAD, S_PAD)  # fmt: skip


class DecodeKernels:
    """The decode kernels of one shape class, bound once (get them from :func:`kernels`).

    A shape class fixes everything Triton compiles for: dtypes (q / KV, table, lengths,
    sinks), head counts, head_dim, block size, the caches' strides, softcap and sinks on
    or off, batch-invariant mode, tile config and device. Batch size, table width,
    lengths, window, scale, view strides and split size vary per call and never cause a
    compile: the variants one class needs are the direct split kernel, the fused split
    kernel per merge ``S_PAD`` (:meth:`s_pad`), and the split kernel with partials plus
    one merge kernel per ``S_PAD`` (:func:`pagedkv.ops.warmup` compiles them all).
    """

    def __init__(self, key: tuple) -> None:
        (dtype, _kv_dtype, hq, hkv, d, bs, kstr, vstr, sstr, _bt, _sl, sinks_dtype, softcap,
         invariant, device, cfg_items) = key  # fmt: skip
        cfg = dict(cfg_items)
        self.hq, self.hkv, self.d, self.bs = hq, hkv, d, bs
        self.invariant, self.device, self.block_n = invariant, device, cfg["BLOCK_N"]
        self.programs_per_sm = cfg["programs_per_sm"]
        form = form_of(cfg["form"], dtype, sstr is not None)
        g = hq // hkv
        self._d_pad = triton.next_power_of_2(d)
        g_pad = triton.next_power_of_2(g) if form == FORMS["fma"] else max(16, g)
        shape = (g, triton.next_power_of_2(g_pad), d, self._d_pad, bs, cfg["BLOCK_N"])
        # IEEE, UPCAST, ALIGNED, SOFTCAP, HAS_SINKS, QUANT, FORM
        flags = (dtype == torch.float32, needs_upcast(dtype), invariant, softcap,
                 sinks_dtype is not None, sstr is not None, form)  # fmt: skip
        opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        strides = (*kstr[:3], *vstr[:3], *(sstr or (0, 0)))
        self._tail, self._opts = (*strides, *shape, False, *flags), opts  # DIRECT False
        self.direct = Launcher(_decode_split_kernel, 12, 7, (*strides, *shape, True, *flags,
                                                             False, 0), **opts)  # fmt: skip
        self.parts = Launcher(_decode_split_kernel, 12, 7, (*self._tail, False, 0), **opts)
        self._merges: dict[tuple[int, bool], Launcher] = {}
        self._plans: dict[tuple, tuple[SplitPlan, int]] = {}

    def merge(self, s_pad: int, fused: bool = False) -> Launcher:
        """The merge kernel for ``S_PAD`` = s_pad (0: one split after another), or with
        ``fused`` the split kernel whose last program per (sequence, KV head) merges."""
        m = self._merges.get((s_pad, fused))
        if m is None:
            if fused:
                m = Launcher(_decode_split_kernel, 12, 7, (*self._tail, True, s_pad), **self._opts)
            else:
                tail = (self.d, self._d_pad, s_pad, self.invariant)
                m = Launcher(_decode_merge_kernel, 4, 5, tail, num_warps=4 if s_pad >= 32 else 1)
            self._merges[(s_pad, fused)] = m
        return m

    def s_pad(self, n_splits: int) -> int:
        """The merge variant of ``n_splits`` splits: all at once in a tree of the next power
        of two, or (batch-invariant, or more than MAX_VECTOR_MERGE) one by one."""
        if self.invariant:
            return 0
        s = 1 << (n_splits - 1).bit_length()
        return 0 if s > MAX_VECTOR_MERGE else s

    def plan(
        self, bsz: int, width: int, window: int | None, max_seq_len: int | None = None,
        split_tokens: int | None = None,
    ) -> tuple[SplitPlan, int]:  # fmt: skip
        """(splits, merge S_PAD) of a batch of ``bsz`` rows with ``width``-block tables."""
        key = (bsz, width, window, max_seq_len, split_tokens)
        got = self._plans.get(key)
        if got is None:
            cap = width * self.bs
            msl = cap if max_seq_len is None else min(max_seq_len, cap)
            sp = plan_splits(bsz, self.hkv, msl, window, self.block_n, self.device,
                             self.invariant, split_tokens, self.programs_per_sm)  # fmt: skip
            if len(self._plans) >= 4096:  # eager callers with ever-new widths: stay bounded
                self._plans.clear()
            got = self._plans[key] = (sp, self.s_pad(sp.num_splits))
        return got

    def run(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        block_tables: torch.Tensor, seq_lens: torch.Tensor, sinks: torch.Tensor | None,
        scalars: tuple[float, float, int], window: int | None, *,
        splits: SplitPlan | None = None, out: torch.Tensor | None = None,
        workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_seq_len: int | None = None, split_tokens: int | None = None,
        k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
        fused: bool | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Launch the kernels; ``scalars`` = :func:`scalars` of (scale, softcap, window);
        ``k_scales`` / ``v_scales`` ([num_blocks, Hkv] float32) for a quantized cache.
        Split decode merges inside the split kernel (one launch: its last program per
        row merges) unless batch-invariant, given a ``workspace`` or ``fused=False``
        (then a merge kernel follows)."""
        bsz = q.shape[0]
        hq, d = self.hq, self.d
        if out is None:
            out = q.new_empty((bsz, hq, d))
        else:
            assert out.dtype == q.dtype and out.stride(2) == 1, "out: q's dtype, last dim dense"
        if bsz == 0:
            return out
        if q.stride(2) != 1:
            q = q.contiguous()
        if block_tables.stride(1) != 1:
            block_tables = block_tables.contiguous()
        if seq_lens.stride(0) != 1:
            seq_lens = seq_lens.contiguous()
        if splits is None:
            splits, s_pad = self.plan(bsz, block_tables.shape[1], window, max_seq_len,
                                      split_tokens)  # fmt: skip
        else:
            s_pad = self.s_pad(splits.num_splits)
        split_tokens, n_splits = splits.split_tokens, splits.num_splits
        sinks_arg = q if sinks is None else sinks.contiguous()  # a dummy pointer without sinks
        ks_arg = q if k_scales is None else k_scales  # dummies for an unquantized cache
        vs_arg = q if v_scales is None else v_scales
        grid = (bsz, self.hkv, n_splits)
        qs, bts, os_ = q.stride(), block_tables.stride(0), out.stride()
        if n_splits == 1 and not self.invariant:
            self.direct(
                grid, q, k_cache, v_cache, ks_arg, vs_arg, block_tables, seq_lens, sinks_arg, out,
                out, out, q, qs[0], qs[1], os_[0], os_[1], 0, 0, 0, *scalars, bts, 0, 0, 0,
                split_tokens,
            )  # fmt: skip
            return out
        ost: tuple[int, ...]  # strides of the partials and of the log-sum-exps
        lst: tuple[int, ...]
        if workspace is None:
            # one allocation: the partials [B, Hq, S, D], then the log-sum-exps [B, Hq, S]
            n_o = bsz * hq * n_splits * d
            ost, lst = (hq * n_splits * d, n_splits * d, d), (hq * n_splits, n_splits, n_o)
            if fused is not False and not self.invariant:  # one launch: merged in the kernel
                o_part, counts = _SCRATCH.counted(q, n_o + bsz * hq * n_splits, bsz * self.hkv)
                self.merge(s_pad, True)(
                    grid, q, k_cache, v_cache, ks_arg, vs_arg, block_tables, seq_lens,
                    sinks_arg, o_part, o_part, out, counts, qs[0], qs[1], *ost, os_[0], os_[1],
                    *scalars, bts, *lst, split_tokens,
                )  # fmt: skip
                return out
            o_part = lse = _SCRATCH.get(q, n_o + bsz * hq * n_splits)
        else:
            o_part, lse = workspace
            assert o_part.shape[2] >= n_splits and o_part.shape[0] >= bsz, "workspace too small"
            ost, lst = o_part.stride()[:3], (*lse.stride()[:2], 0)
        self.parts(
            grid, q, k_cache, v_cache, ks_arg, vs_arg, block_tables, seq_lens, sinks_arg, o_part,
            lse, out, q, qs[0], qs[1], *ost, 0, 0, *scalars, bts, *lst, split_tokens,
        )  # fmt: skip
        self.merge(s_pad)(
            (bsz, hq), o_part, lse, seq_lens, out, *ost, os_[0], os_[1], *lst, split_tokens,
            scalars[2],
        )  # fmt: skip
        return out


_KERNELS: dict[tuple, DecodeKernels] = {}  # shape class -> bound kernels (a compile cache)
_SCRATCH = Scratch()  # the split partials of eager calls


def kernels(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, sinks: torch.Tensor | None, softcap: bool, batch_invariant: bool,
    cfg: dict | None = None, k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> DecodeKernels:  # fmt: skip
    """The :class:`DecodeKernels` of these tensors' shape class (made on first use); a
    quantized cache comes with its ``k_scales`` / ``v_scales``."""
    d = q.shape[2]
    quant = k_scales is not None and v_scales is not None
    base = config(d, q.dtype, k_cache.dtype if quant else None)
    cfg = base if cfg is None else {**base, **cfg}
    _, bs, hkv, _ = k_cache.shape
    sstr = None
    if k_scales is not None and v_scales is not None:  # quantized: both given
        sstr = (k_scales.stride(0), v_scales.stride(0))
    key = (q.dtype, k_cache.dtype, q.shape[1], hkv, d, bs, k_cache.stride(),
           v_cache.stride(), sstr, block_tables.dtype, seq_lens.dtype,
           None if sinks is None else sinks.dtype, bool(softcap), bool(batch_invariant),
           q.device, tuple(sorted(cfg.items())))  # fmt: skip
    return made_once(_KERNELS, key, DecodeKernels)


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
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the decode kernels (arguments checked by :func:`pagedkv.ops.decode_attention`).

    q: [B, Hq, D] -> [B, Hq, D]. ``max_seq_len`` bounds seq_lens (default: the table's
    capacity; no device sync). ``splits`` (from :func:`plan_splits`) fixes the split
    layout, else it is planned here (``split_tokens`` forces the split size).
    ``workspace`` = (o [B', Hq, S', D] f32, lse [B', Hq, S'] f32) with B' >= B and S' >=
    the number of splits lets a caller (DecodePlan) keep every buffer static for
    CUDA-graph capture. ``cfg`` overrides :func:`config` (tuning).
    """
    assert splits is None or splits.aligned == batch_invariant, "splits of the other mode"
    kern = kernels(q, k_cache, v_cache, block_tables, seq_lens, sinks, softcap is not None,
                   batch_invariant, cfg, k_scales, v_scales)  # fmt: skip
    return kern.run(
        q, k_cache, v_cache, block_tables, seq_lens, sinks, scalars(scale, softcap, window),
        window, splits=splits, out=out, workspace=workspace, max_seq_len=max_seq_len,
        split_tokens=split_tokens, k_scales=k_scales, v_scales=v_scales,
    )  # fmt: skip
