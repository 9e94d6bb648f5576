"""Torch reference implementations: the specification every other backend is tested
against. They run on any device and accumulate in float32 (float64 for float64 inputs).

Arguments are assumed checked (see ``ops/_checks.py``); shapes:
``k_cache, v_cache: [num_blocks, block_size, Hkv, D]`` (one layer, NHD),
``kv: [num_layers, 2, num_blocks, block_size, Hkv, D]`` (a whole pool).
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs (so float64 tests compare at float64 precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def window_start(seq_len: int, q_len: int, window: int | None) -> int:
    """First key position any of the last ``q_len`` queries of ``seq_len`` tokens sees."""
    return 0 if window is None else max(0, seq_len - q_len - window + 1)


def _blocks(cache: torch.Tensor, scales: torch.Tensor | None, idx: torch.Tensor, dtype):
    """Blocks ``idx`` of one layer's K or V cache in ``dtype`` ([*idx.shape, bs, Hkv, D]);
    quantized blocks are dequantized with their per-(block, head) ``scales``:
    ``q * scale``, computed in ``dtype``."""
    x = cache[idx].to(dtype)
    if scales is None:
        return x
    return x * scales[idx].to(dtype)[..., None, :, None]


def _seq_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, lo: int, n: int, dtype,
    k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """K and V of one sequence's tokens ``lo .. n-1`` in ``dtype``: each [n - lo, Hkv, D].
    Only the blocks holding those tokens are read."""
    _, bs, hkv, d = k_cache.shape
    b0 = lo // bs
    idx = table[b0 : -(-n // bs)].long()
    k = _blocks(k_cache, k_scales, idx, dtype).reshape(-1, hkv, d)[lo - b0 * bs : n - b0 * bs]
    v = _blocks(v_cache, v_scales, idx, dtype).reshape(-1, hkv, d)[lo - b0 * bs : n - b0 * bs]
    return k, v


def _scores(s: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """Scaled logits, capped as ``cap * tanh(s / cap)`` when ``softcap`` is set (Gemma 2)."""
    s = s * scale
    return s if softcap is None else torch.tanh(s / softcap) * softcap


def _softmax(s: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim; a sink is one more logit whose value is zero (gpt-oss):
    it enlarges the denominator and is dropped. s: [..., n]; sinks broadcast to [..., 1]."""
    if sinks is None:
        return torch.softmax(s, dim=-1)
    sk = sinks.to(s.dtype).expand(*s.shape[:-1], 1)
    return torch.softmax(torch.cat([s, sk], dim=-1), dim=-1)[..., :-1]


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor | None,
    k_pos0: int,
    window: int | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Attention of one sequence. q: [M, Hq, D], k/v: [n, Hkv, D] (compute dtype) -> [M, Hq, D].

    Key j sits at position ``k_pos0 + j``. With ``q_pos`` ([M] positions) query row i sees
    keys in ``(q_pos[i] - window, q_pos[i]]``; without it every row sees every key.
    """
    m, hq, d = q.shape
    n, hkv, _ = k.shape
    g = hq // hkv
    if n == 0:
        return q.new_zeros(m, hq, d)
    qg = q.reshape(m, hkv, g, d)
    s = _scores(torch.einsum("mhgd,nhd->hgmn", qg, k), scale, softcap)  # [Hkv, G, M, n]
    if q_pos is not None:
        kpos = k_pos0 + torch.arange(n, device=q.device)
        hidden = kpos[None, :] > q_pos[:, None]
        if window is not None:
            hidden |= kpos[None, :] <= q_pos[:, None] - window
        s = s.masked_fill(hidden, float("-inf"))
    p = _softmax(s, None if sinks is None else sinks.view(hkv, g, 1, 1))
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
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence. q: [B, Hq, D] -> [B, Hq, D] (q.dtype).

    Sequence b's query sits at position ``seq_lens[b] - 1`` and attends to the keys in
    ``(pos - window, pos]`` (all its tokens when ``window`` is None); only the blocks
    holding those keys are read. Scores are ``q.k * scale``, then ``softcap *
    tanh(s / softcap)`` when ``softcap`` is set. ``sinks`` ([Hq]) adds one logit per head
    to the softmax denominator (a key with a zero value). A sequence of length 0 gives
    zeros. In batch-invariant mode each sequence is computed on its own, so its bits
    depend only on its own data; otherwise all sequences are padded into one product.
    A quantized cache (fp8 / int8) comes with ``k_scales`` / ``v_scales`` ([num_blocks,
    Hkv] float32): its keys and values are ``q * scale`` in the compute dtype.
    """
    bsz, hq, d = q.shape
    out = torch.empty_like(q)
    if bsz == 0:
        return out
    cdt = compute_dtype(q.dtype)
    lens = seq_lens.tolist()
    if batch_invariant:
        for b, n in enumerate(lens):
            lo = window_start(n, 1, window)
            k, v = _seq_kv(k_cache, v_cache, block_tables[b], lo, n, cdt, k_scales, v_scales)
            o = _attend(q[b : b + 1].to(cdt), k, v, scale, None, lo, window, softcap, sinks)
            out[b] = o[0].to(q.dtype)
        return out
    num_blocks, bs, hkv, _ = k_cache.shape
    lens_t = torch.tensor(lens, device=q.device)
    first = (lens_t - window).clamp_(min=0) if window is not None else torch.zeros_like(lens_t)
    b0 = first // bs  # first block each sequence reads
    nb = max(1, int(((lens_t + bs - 1) // bs - b0).max()))
    cols = (b0[:, None] + torch.arange(nb, device=q.device)).clamp_(max=block_tables.shape[1] - 1)
    idx = block_tables.gather(1, cols).long().clamp_(0, num_blocks - 1)
    pos = b0[:, None] * bs + torch.arange(nb * bs, device=q.device)  # [B, L] key positions
    valid = (pos >= first[:, None]) & (pos < lens_t[:, None])  # unused entries may be junk
    k = _blocks(k_cache, k_scales, idx, cdt).reshape(bsz, nb * bs, hkv, d)  # [B, L, Hkv, D]
    v = _blocks(v_cache, v_scales, idx, cdt).reshape(bsz, nb * bs, hkv, d)
    v = v.masked_fill(~valid[:, :, None, None], 0.0)  # hidden keys' values never count
    qg = q.to(cdt).reshape(bsz, hkv, hq // hkv, d)
    s = _scores(torch.einsum("bhgd,blhd->bhgl", qg, k), scale, softcap)
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = _softmax(s, None if sinks is None else sinks.view(1, hkv, hq // hkv, 1))
    p = p.nan_to_num_(0.0)  # empty sequences without sinks: all -inf -> zeros
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
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed causal prefill over a cached prefix. q: [T, Hq, D] -> [T, Hq, D] (q.dtype).

    Sequence b owns rows ``cu[b]:cu[b+1]``; they are its last ``q_len`` tokens of
    ``seq_lens[b]``, whose K/V are already in the cache. The row at position p sees keys
    in ``(p - window, p]`` (``window`` None: ``[0, p]``); ``softcap`` and ``sinks`` as in
    :func:`decode` (quantized caches too). Computed per sequence, reading only the blocks
    some row sees.
    """
    out = torch.empty_like(q)
    cdt = compute_dtype(q.dtype)
    cu = cu_seqlens_q.tolist()
    for b, n in enumerate(seq_lens.tolist()):
        lo_q, hi_q = cu[b], cu[b + 1]
        m = hi_q - lo_q
        if m == 0:
            continue
        lo = window_start(n, m, window)
        k, v = _seq_kv(k_cache, v_cache, block_tables[b], lo, n, cdt, k_scales, v_scales)
        q_pos = torch.arange(n - m, n, device=q.device)
        o = _attend(q[lo_q:hi_q].to(cdt), k, v, scale, q_pos, lo, window, softcap, sinks)
        out[lo_q:hi_q] = o.to(q.dtype)
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
    """kv[:, :, dst] = kv[:, :, src] for all layers, K and V, in one indexed op (``kv`` is
    any ``[L, 2, num_blocks, ...]`` tensor: the pool, or its scales).

    The right-hand side is gathered before anything is written, so it is exact when no
    block is both a source and a destination (the caller orders other cases).
    """
    kv[:, :, dst] = kv[:, :, src]


def copy_blocks_across(
    src_kv: torch.Tensor, src: torch.Tensor, dst_kv: torch.Tensor, dst: torch.Tensor
) -> None:
    """dst_kv[:, :, dst] = src_kv[:, :, src] between two pool tensors (one indexed op)."""
    dst_kv[:, :, dst] = src_kv[:, :, src]


def gather_blocks(kv: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Blocks ``ids`` of every layer as one contiguous [n, L, 2, block_size, Hkv, D] tensor
    (``[n, L, 2, *rest]`` for any ``[L, 2, num_blocks, *rest]`` tensor)."""
    return kv[:, :, ids].movedim(2, 0).contiguous()


def scatter_blocks(kv: torch.Tensor, ids: torch.Tensor, data: torch.Tensor) -> None:
    """Inverse of :func:`gather_blocks`: data [n, L, 2, block_size, Hkv, D] into blocks ``ids``."""
    kv[:, :, ids] = data.movedim(0, 2)
