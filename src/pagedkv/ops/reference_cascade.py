"""Torch reference of shared-prefix (cascade) attention: the specification of
:mod:`pagedkv.ops.triton_cascade`, and itself tested against plain paged attention.

Two levels, merged exactly by the log-sum-exp of each part:

1. each group's query rows against the group's shared prefix, gathered once;
2. each sequence's query rows against its private suffix ``[shared, seq_len)``
   (causal for prefill chunks).

Arguments are assumed checked (:func:`pagedkv.ops.cascade_decode`). Float32 throughout.
"""

from __future__ import annotations

import torch


def _kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, lo: int, hi: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of tokens ``[lo, hi)`` of the sequence with block table ``table``, float32:
    each [n, Hkv, D]."""
    _, bs, hkv, d = k_cache.shape
    if hi <= lo:
        empty = k_cache.new_zeros(0, hkv, d, dtype=torch.float32)
        return empty, empty
    first, last = lo // bs, -(-hi // bs)
    idx = table[first:last].long()
    k = k_cache[idx].reshape(-1, hkv, d)[lo - first * bs : hi - first * bs].float()
    v = v_cache[idx].reshape(-1, hkv, d)[lo - first * bs : hi - first * bs].float()
    return k, v


def attend_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor | None = None,
    k_pos0: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp. q: [M, Hq, D] f32, k/v: [n, Hkv, D] f32 ->
    (o [M, Hq, D] f32, lse [M, Hq] f32, natural log; -inf where a row sees no key).

    With ``q_pos`` ([M] absolute positions), key j (absolute position ``k_pos0 + j``) is
    visible to row i only when ``k_pos0 + j <= q_pos[i]``.
    """
    m, hq, d = q.shape
    n, hkv, _ = k.shape
    if n == 0:
        return q.new_zeros(m, hq, d), q.new_full((m, hq), float("-inf"))
    qg = q.reshape(m, hkv, hq // hkv, d)
    s = torch.einsum("mhgd,nhd->hgmn", qg, k) * scale  # [Hkv, G, M, n]
    if q_pos is not None:
        kpos = k_pos0 + torch.arange(n, device=q.device)
        s = s.masked_fill(kpos[None, :] > q_pos[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [Hkv, G, M]
    p = torch.exp(s - lse[..., None]).nan_to_num_(0.0)  # rows that see nothing: zeros
    o = torch.einsum("hgmn,nhd->mhgd", p, v).reshape(m, hq, d)
    return o, lse.permute(2, 0, 1).reshape(m, hq)


def merge_states(
    o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """The attention output over the union of two disjoint key sets, from each set's
    output o [M, Hq, D] and log-sum-exp [M, Hq]. Rows with neither (-inf twice) give zeros."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    den = (w_a + w_b).clamp_min(1e-30)
    return (o_a * w_a[..., None] + o_b * w_b[..., None]) / den[..., None]


def cascade(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    plan,
    scale: float,
) -> torch.Tensor:
    """Cascade attention as ``plan`` (a :class:`pagedkv.ops.CascadePlan`) groups it.

    q: [N, Hq, D] with N = plan.num_q_rows (one row per sequence for decode, the packed
    chunk rows for prefill) -> [N, Hq, D] in q's dtype.
    """
    n, hq, d = q.shape
    bs = k_cache.shape[1]
    qf = q.float()
    o1 = qf.new_zeros(n, hq, d)
    lse1 = qf.new_full((n, hq), float("-inf"))
    for grp in plan.groups:  # level 1: the shared prefix once per group
        rows = torch.tensor(plan.group_q_rows(grp), dtype=torch.long, device=q.device)
        k, v = _kv(k_cache, v_cache, block_tables[grp.seqs[0]], 0, grp.shared_blocks * bs)
        o1[rows], lse1[rows] = attend_lse(qf[rows], k, v, scale)
    out = torch.empty_like(q)
    cu, lens = plan.cu_seqlens, seq_lens.tolist()
    for b, seq_len in enumerate(lens):  # level 2: the private suffix per sequence, then merge
        lo, hi = cu[b], cu[b + 1]
        if hi == lo:
            continue
        shared = plan.shared_tokens[b]
        k, v = _kv(k_cache, v_cache, block_tables[b], shared, seq_len)
        pos = None
        if plan.is_prefill:
            pos = seq_len - (hi - lo) + torch.arange(hi - lo, device=q.device)
        o2, lse2 = attend_lse(qf[lo:hi], k, v, scale, pos, shared)
        out[lo:hi] = merge_states(o1[lo:hi], lse1[lo:hi], o2, lse2).to(q.dtype)
    return out
