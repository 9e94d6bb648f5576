"""Triton paged prefill attention: flash-attention tiles over paged K/V, causal, with a
cached prefix, for packed variable-length queries, optionally with a sliding window,
logit softcapping and attention sinks.

Program (tile t, query head hq): tile t = (sequence b, query rows m0 .. m0+BLOCK_M).
Query row i of b sits at absolute position ``p = seq_len - q_len + i`` and sees keys in
``(p - window, p]``. Key tiles sit at absolute multiples of BLOCK_N; those seen by every
row of the tile are streamed without a mask, only the tiles at the window's two edges
(its start and the diagonal) are masked, and tiles before the first row's window start
are skipped (keys there are never loaded). K/V rows are gathered through the block
table; offsets that multiply a block id by a stride are int64.
"""

from __future__ import annotations

import torch

from pagedkv._extras import optional_imports

with optional_imports(__name__):
    import triton
    import triton.language as tl

from pagedkv.ops._launch import Launcher, made_once
from pagedkv.ops.triton_attn import (
    logits,
    mma,
    needs_upcast,
    packed_tile,
    scalars,
    widen,
    with_sink,
)


@triton.jit
def _tile(
    q, acc, m_i, l_i, K, V, KS, VS, bt_row, n0, pos_m, kv_lo, kv_end, window, h,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_ksb, stride_vsb,
    qk_scale, cap_log2,
    offs_d, mask_d, D_PAD: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
    QUANT: tl.constexpr,
):  # fmt: skip
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        mask_n = (offs_n >= kv_lo) & (offs_n < kv_end)
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
    if QUANT:  # as in decode: exact in q's dtype, per-key scales on scores and probabilities
        if MASKED:
            k_s = tl.load(KS + blk * stride_ksb + h, mask=mask_n, other=0.0)
            v_s = tl.load(VS + blk * stride_vsb + h, mask=mask_n, other=0.0)
        else:
            k_s = tl.load(KS + blk * stride_ksb + h)
            v_s = tl.load(VS + blk * stride_vsb + h)
        k = widen(k, q.dtype)
        v = widen(v, q.dtype)
        qk = mma(q, tl.trans(k), IEEE, UPCAST) * k_s[None, :]
    else:
        qk = mma(q, tl.trans(k), IEEE, UPCAST)
    qk = logits(qk, qk_scale, cap_log2, SOFTCAP)
    if MASKED:
        rel = pos_m[:, None] - offs_n[None, :]  # query position - key position
        visible = (rel >= 0) & (rel < window) & mask_n[None, :]
        qk = tl.where(visible, qk, float("-inf"))  # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a row may see none of this tile's keys yet (window start): keep its state empty
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = m_new
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(qk - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if QUANT:
        p = p * v_s[None, :]  # after l_i: the scale weights the value, not the probability
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, IEEE, UPCAST)
    return acc, m_new, l_i


# Integer arguments that change from call to call and whose divisibility no load or store
# relies on: one specialization whatever their value (the q / out strides stay specialized)
PREFILL_DYNAMIC = ("window", "stride_btb", "n_m_tiles")
SHORT_Q = 16  # up to this many queries per sequence, short tiles (see config)


@triton.jit(do_not_specialize=PREFILL_DYNAMIC)
def _prefill_kernel(
    Q, K, V, KS, VS, BT, SL, CU, Sinks, OUT, stride_qt, stride_qh, stride_ot, stride_oh,
    qk_scale, cap_log2, window: tl.int32, stride_btb: tl.int32, n_m_tiles: tl.int32,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_ksb, stride_vsb,
    G: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, QUANT: tl.constexpr,
):  # fmt: skip
    hq = tl.program_id(1)
    b, m0, q_start, q_len, seq_len = packed_tile(CU, SL, n_m_tiles, BLOCK_M)
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
    if HAS_SINKS:
        m_i, l_i = with_sink(m_i, l_i, tl.load(Sinks + hq))
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    bt_row = BT + b.to(tl.int64) * stride_btb
    live = m0 < q_len
    p_first = prefix + m0
    p_last = prefix + tl.minimum(m0 + BLOCK_M, q_len) - 1
    kv_end = tl.where(live, p_last + 1, 0)  # keys this tile may see: [kv_lo, kv_end)
    kv_lo = tl.maximum(p_first - window + 1, 0)
    n_lo = tl.where(live, (kv_lo // BLOCK_N) * BLOCK_N, 0)  # earlier tiles: outside the window
    # keys in [full_lo, full_hi) are seen by every row of the tile: no mask there
    full_lo = tl.maximum(tl.cdiv(tl.maximum(p_last - window + 1, 0), BLOCK_N) * BLOCK_N, n_lo)
    full_lo = tl.where(live, full_lo, 0)
    full_hi = tl.maximum(tl.where(live, (p_first // BLOCK_N) * BLOCK_N, 0), full_lo)
    # keys [n_lo, full_lo) masked (window start), [full_lo, full_hi) not, [full_hi, kv_end)
    # masked (the diagonal): three loops, unrolled at compile time
    for part in tl.static_range(3):
        lo = n_lo if part == 0 else (full_lo if part == 1 else full_hi)
        hi = full_lo if part == 0 else (full_hi if part == 1 else kv_end)
        for n0 in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _tile(
                q, acc, m_i, l_i, K, V, KS, VS, bt_row, n0, pos_m, kv_lo, kv_end, window, h,
                stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_ksb,
                stride_vsb, qk_scale, cap_log2, offs_d, mask_d, D_PAD, BS, BLOCK_N, part != 1,
                IEEE, UPCAST, SOFTCAP, QUANT,
            )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptr = OUT + rows[:, None] * stride_ot + hq * stride_oh + offs_d[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def config(head_dim: int, dtype: torch.dtype, max_q_len: int) -> dict:
    """Tile sizes and launch options (H100-tuned for head_dim 128, bf16/fp16)."""
    if dtype == torch.float32 or head_dim > 128:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    if max_q_len <= SHORT_Q:
        return dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


class PrefillKernels:
    """The prefill kernel of one shape class, bound once per tile config (from
    :func:`kernels`): dtypes (q / KV, table, lengths, cu_seqlens, sinks), head counts,
    head_dim, block size, cache strides, softcap and sinks on or off, device. Token and
    sequence counts, lengths, window, scale and view strides vary per call without a
    compile; the tile config follows the longest query (:func:`config`: two variants)."""

    def __init__(self, key: tuple) -> None:
        dtype, _kv_dtype, hq, hkv, d, bs, kstr, vstr, sstr, *_, sinks_dtype, softcap, _dev = key
        self.dtype, self.hq, self.d = dtype, hq, d
        self._strides = (*kstr[:3], *vstr[:3], *(sstr or (0, 0)))
        self._shape = (hq // hkv, d, triton.next_power_of_2(d), bs)  # G, D, D_PAD, BS
        # IEEE, UPCAST, SOFTCAP, HAS_SINKS, QUANT
        self._flags = (dtype == torch.float32, needs_upcast(dtype), softcap,
                       sinks_dtype is not None, sstr is not None)  # fmt: skip
        self._launchers: dict[tuple, Launcher] = {}
        # (launcher, BLOCK_M) of config()'s two choices: short queries, long ones
        self._default = [self._bind(config(d, dtype, q)) for q in (1, SHORT_Q + 1)]

    def _bind(self, cfg: dict) -> tuple[Launcher, int]:
        la = self.launcher(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"])
        return la, cfg["BLOCK_M"]

    def launcher(self, block_m: int, block_n: int, num_warps: int, num_stages: int) -> Launcher:
        """The kernel bound for one tile config."""
        key = (block_m, block_n, num_warps, num_stages)
        la = self._launchers.get(key)
        if la is None:
            tail = (*self._strides, *self._shape, block_m, block_n, *self._flags)
            opts = dict(num_warps=num_warps, num_stages=num_stages)
            la = Launcher(_prefill_kernel, 10, 4, tail, **opts)
            self._launchers[key] = la
        return la

    def tile_configs(self) -> list[dict]:
        """Every config :func:`config` can pick for this class (warm-up covers them)."""
        cfgs = [config(self.d, self.dtype, 1), config(self.d, self.dtype, SHORT_Q + 1)]
        return [c for i, c in enumerate(cfgs) if c not in cfgs[:i]]

    def run(
        self, q: torch.Tensor, cu_seqlens_q: torch.Tensor, k_cache: torch.Tensor,
        v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
        sinks: torch.Tensor | None, scalars: tuple[float, float, int],
        max_q_len: int | None = None, cfg: dict | None = None,
        k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Launch; ``scalars`` = :func:`pagedkv.ops.triton_decode.scalars`; ``cfg``
        overrides :func:`config`'s choice (keys BLOCK_M, BLOCK_N, num_warps, num_stages)."""
        t = q.shape[0]
        if q.stride(2) != 1:
            q = q.contiguous()
        out = q.new_empty((t, self.hq, self.d))
        bsz = cu_seqlens_q.shape[0] - 1
        if t == 0 or bsz == 0:
            return out
        if max_q_len is None:
            max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        if cfg is None:
            la, bm = self._default[max_q_len > SHORT_Q]
        else:
            la, bm = self._bind({**config(self.d, self.dtype, max_q_len), **cfg})
        if block_tables.stride(1) != 1:
            block_tables = block_tables.contiguous()
        if seq_lens.stride(0) != 1:
            seq_lens = seq_lens.contiguous()
        if cu_seqlens_q.stride(0) != 1:
            cu_seqlens_q = cu_seqlens_q.contiguous()
        n_m_tiles = -(-max(max_q_len, 1) // bm)
        qs = q.stride()
        la(
            (bsz * n_m_tiles, self.hq), q, k_cache, v_cache,
            q if k_scales is None else k_scales, q if v_scales is None else v_scales,
            block_tables, seq_lens,
            cu_seqlens_q, q if sinks is None else sinks.contiguous(), out, qs[0], qs[1],
            out.stride(0), out.stride(1), *scalars, block_tables.stride(0), n_m_tiles,
        )  # fmt: skip
        return out


_KERNELS: dict[tuple, PrefillKernels] = {}  # shape class -> bound kernels (a compile cache)


def kernels(
    q: torch.Tensor, cu_seqlens_q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, sinks: torch.Tensor | None,
    softcap: bool, k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
) -> PrefillKernels:  # fmt: skip
    """The :class:`PrefillKernels` of these tensors' shape class (made on first use)."""
    _, bs, hkv, d = k_cache.shape
    sstr = None
    if k_scales is not None and v_scales is not None:  # quantized: both given
        sstr = (k_scales.stride(0), v_scales.stride(0))
    key = (q.dtype, k_cache.dtype, q.shape[1], hkv, d, bs, k_cache.stride(), v_cache.stride(),
           sstr,
           cu_seqlens_q.dtype, block_tables.dtype, seq_lens.dtype,
           None if sinks is None else sinks.dtype, bool(softcap), q.device)  # fmt: skip
    return made_once(_KERNELS, key, PrefillKernels)


def prefill(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    max_q_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the prefill kernel (arguments checked by :func:`pagedkv.ops.prefill_attention`).

    q: [T, Hq, D] -> [T, Hq, D]. Without ``max_q_len`` it is read from cu_seqlens_q
    (one device sync). ``block_m`` / ``block_n`` override the tile sizes (tests, tuning).
    """
    kern = kernels(q, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens, sinks,
                   softcap is not None, k_scales, v_scales)  # fmt: skip
    cfg = None
    if block_m is not None or block_n is not None:
        cfg = {"BLOCK_M": block_m, "BLOCK_N": block_n}
        cfg = {k: v for k, v in cfg.items() if v is not None}
    return kern.run(
        q, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens, sinks,
        scalars(scale, softcap, window), max_q_len, cfg, k_scales, v_scales,
    )  # fmt: skip
