"""Random paged-KV cases shared by the ops tests (fresh data each run)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def paged_case(lens, hq, hkv, d, bs, dtype, device="cpu", spare_blocks=3, pad_cols=2):
    """Random K/V caches holding sequences of ``lens`` tokens in shuffled blocks.

    Returns (k_cache, v_cache, block_tables int32 [B, max_blocks], seq_lens int32 [B]).
    Table entries past a sequence's last block hold junk ids (must be ignored).
    """
    need = [max(1, -(-n // bs)) for n in lens]
    nblocks = sum(need) + spare_blocks
    perm = torch.randperm(nblocks).tolist()
    width = max(need) + pad_cols
    table = torch.full((len(lens), width), 10**6, dtype=torch.int32)
    at = 0
    for b, m in enumerate(need):
        table[b, :m] = torch.tensor(perm[at : at + m], dtype=torch.int32)
        at += m
    k = torch.randn(nblocks, bs, hkv, d).to(dtype)
    v = torch.randn(nblocks, bs, hkv, d).to(dtype)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return k.to(device), v.to(device), table.to(device), lens_t.to(device)


def dense_kv(k_cache, v_cache, table_row, n):
    bs = k_cache.shape[1]
    idx = table_row[: -(-n // bs)].long()
    shape = (-1, *k_cache.shape[2:])
    return k_cache[idx].reshape(shape)[:n], v_cache[idx].reshape(shape)[:n]


def sdpa(q, k, v, q_start=None):
    """Dense attention via torch SDPA in float64. q: [M, Hq, D], k/v: [n, Hkv, D]."""
    hq, hkv = q.shape[1], k.shape[1]
    qd = q.double().transpose(0, 1)[None]  # [1, Hq, M, D]
    kd = k.double().repeat_interleave(hq // hkv, dim=1).transpose(0, 1)[None]
    vd = v.double().repeat_interleave(hq // hkv, dim=1).transpose(0, 1)[None]
    mask = None
    if q_start is not None:
        qpos = q_start + torch.arange(q.shape[0], device=q.device)
        mask = torch.arange(k.shape[0], device=q.device)[None, :] <= qpos[:, None]
    o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=1 / math.sqrt(q.shape[-1]))
    return o[0].transpose(0, 1)


def assert_close(out, ref, atol, rtol=0.0, what=""):
    """Compare with a message giving max/mean abs error; NaN anywhere fails."""
    out, ref = out.double(), ref.double()
    err = (out - ref).abs()
    ok = bool(torch.isfinite(out).all()) and bool((err <= atol + rtol * ref.abs()).all())
    assert ok, (
        f"{what}: max abs err {err.max().item():.3e}, mean abs err {err.mean().item():.3e}, "
        f"non-finite {(~torch.isfinite(out)).sum().item()} (atol {atol})"
    )


def dense_attention(q, k, v, q_pos, scale=None, window=None, softcap=None, sinks=None):
    """The straightforward float64 specification, with a dense mask.

    q: [M, Hq, D] at positions ``q_pos`` ([M]); k, v: [n, Hkv, D] at positions 0..n-1.
    Query at p sees keys in (p - window, p]; scores s = q.k * scale, capped as
    softcap * tanh(s / softcap); a sink is one more logit per head whose value is zero.
    """
    m, hq, d = q.shape
    n, hkv = k.shape[0], k.shape[1]
    scale = d**-0.5 if scale is None else scale
    kd = k.double().repeat_interleave(hq // hkv, dim=1)
    vd = v.double().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("mhd,nhd->hmn", q.double(), kd) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    kpos = torch.arange(n, device=q.device)[None, :]
    qpos = torch.as_tensor(q_pos, device=q.device)[:, None]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double()[:, None, None].expand(hq, m, 1)], dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row without keys (n == 0): zeros
    if sinks is not None:
        p = p[..., :-1]
    return torch.einsum("hmn,nhd->mhd", p, vd)


def cu_from(q_lens, device="cpu"):
    """cu_seqlens_q (int32) for these query lengths."""
    return torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32).to(device)


def poison_outside(k, v, table, lens, q_lens, window):
    """NaN into every cached token no query sees (before each sequence's window start,
    and past its length), in place: a kernel that loads any of them returns NaN."""
    bs = k.shape[1]
    table = table.cpu().long()
    seen = torch.zeros(k.shape[0], bs, dtype=torch.bool)
    for b, (n, m) in enumerate(zip(lens, q_lens)):
        lo = n if m == 0 else 0 if window is None else max(0, n - m - window + 1)
        pos = torch.arange(lo, n)
        seen[table[b, pos // bs], pos % bs] = True
    k[~seen.to(k.device)] = float("nan")
    v[~seen.to(v.device)] = float("nan")
