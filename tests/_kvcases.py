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
