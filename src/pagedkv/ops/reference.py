"""Torch reference implementations: the specification every other backend is tested
against. They run on any device and accumulate in float32.

Arguments are assumed checked (see :mod:`pagedkv.ops._checks`); shapes:
``k_cache, v_cache: [num_blocks, block_size, Hkv, D]`` (one layer, NHD),
``kv: [num_layers, 2, num_blocks, block_size, Hkv, D]`` (a whole pool).
"""

from __future__ import annotations

import torch


def _seq_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one sequence's first ``n`` tokens, float32: each [n, Hkv, D]."""
    _, bs, hkv, d = k_cache.shape
    idx = table[: -(-n // bs)].long()
    k = k_cache[idx].reshape(-1, hkv, d)[:n].float()
    v = v_cache[idx].reshape(-1, hkv, d)[:n].float()
    return k, v


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal_from: int | None
):
    """Attention of one sequence. q: [M, Hq, D] f32, k/v: [n, Hkv, D] f32 -> [M, Hq, D] f32.

    With ``causal_from`` set, query row i sits at position ``causal_from + i`` and sees
    keys at positions <= its own.
    """
    m, hq, d = q.shape
    n, hkv, _ = k.shape
    g = hq // hkv
    if n == 0:
        return q.new_zeros(m, hq, d)
    qg = q.reshape(m, hkv, g, d)
    s = torch.einsum("mhgd,nhd->hgmn", qg, k) * scale  # [Hkv, G, M, n]
    if causal_from is not None:
        qpos = causal_from + torch.arange(m, device=q.device)
        kpos = torch.arange(n, device=q.device)
        s = s.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("hgmn,nhd->mhgd", p, v)
    return o.reshape(m, hq, d)


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """One query token per sequence. q: [B, Hq, D] -> [B, Hq, D] (q.dtype).

    Sequence b attends to its ``seq_lens[b]`` tokens; a sequence of length 0 gives zeros.
    In batch-invariant mode each sequence is computed on its own, so its bits depend
    only on its own data; otherwise all sequences are padded into one batched product.
    """
    bsz, hq, d = q.shape
    out = torch.empty_like(q)
    if bsz == 0:
        return out
    lens = seq_lens.tolist()
    if batch_invariant:
        for b, n in enumerate(lens):
            k, v = _seq_kv(k_cache, v_cache, block_tables[b], n)
            out[b] = _attend(q[b : b + 1].float(), k, v, scale, None)[0].to(q.dtype)
        return out
    _, bs, hkv, _ = k_cache.shape
    nb = max(1, -(-max(lens) // bs))
    idx = block_tables[:, :nb].long().clamp(0, k_cache.shape[0] - 1)  # unused entries may be junk
    k = k_cache[idx].reshape(bsz, nb * bs, hkv, d).float()  # [B, L, Hkv, D]
    v = v_cache[idx].reshape(bsz, nb * bs, hkv, d).float()
    qg = q.float().reshape(bsz, hkv, hq // hkv, d)
    s = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
    pad = torch.arange(nb * bs, device=q.device)[None, :] >= seq_lens.to(q.device)[:, None]
    s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # empty sequences: all -inf -> zeros
    o = torch.einsum("bhgl,blhd->bhgd", p, v).reshape(bsz, hq, d)
    return out.copy_(o)


def prefill(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Packed causal prefill over a cached prefix. q: [T, Hq, D] -> [T, Hq, D] (q.dtype).

    Sequence b owns rows ``cu[b]:cu[b+1]``; they are its last ``q_len`` tokens of
    ``seq_lens[b]``, whose K/V are already in the cache. Computed per sequence.
    """
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for b, n in enumerate(seq_lens.tolist()):
        lo, hi = cu[b], cu[b + 1]
        if hi == lo:
            continue
        k, v = _seq_kv(k_cache, v_cache, block_tables[b], n)
        o = _attend(q[lo:hi].float(), k, v, scale, causal_from=n - (hi - lo))
        out[lo:hi] = o.to(q.dtype)
    return out


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Scatter k, v: [N, Hkv, D] into the slots ``block * block_size + offset``; -1 skips."""
    _, _, hkv, d = k_cache.shape
    slots = slots.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    k_cache.view(-1, hkv, d).index_copy_(0, slots, k)
    v_cache.view(-1, hkv, d).index_copy_(0, slots, v)


def copy_blocks(kv: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """kv[:, :, dst] = kv[:, :, src] for all layers, K and V, in one indexed op.

    The right-hand side is gathered before anything is written, so it is exact when no
    block is both a source and a destination (the caller orders other cases).
    """
    kv[:, :, dst] = kv[:, :, src]


def gather_blocks(kv: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Blocks ``ids`` of every layer as one contiguous [n, L, 2, block_size, Hkv, D] tensor."""
    return kv[:, :, ids].permute(2, 0, 1, 3, 4, 5).contiguous()


def scatter_blocks(kv: torch.Tensor, ids: torch.Tensor, data: torch.Tensor) -> None:
    """Inverse of :func:`gather_blocks`: data [n, L, 2, block_size, Hkv, D] into blocks ``ids``."""
    kv[:, :, ids] = data.permute(1, 2, 0, 3, 4, 5)
