"""Random paged-KV batches whose sequences share prefix blocks (cascade tests)."""

from __future__ import annotations

import torch


def grouped_case(shared_blocks, group_of, private_lens, hkv, d, bs, dtype, device="cpu"):
    """K/V caches and block tables where sequence b's first ``shared_blocks[group_of[b]]``
    blocks are the same physical blocks as the rest of its group (``group_of[b] = -1``:
    no shared part), followed by ``private_lens[b]`` private tokens.

    Returns (k_cache, v_cache, block_tables int32 [B, W], seq_lens int32 [B], groups) with
    ``groups = [(seqs, shared_blocks), ...]``; table entries past a sequence's end are junk.
    """
    n_groups = len(shared_blocks)
    priv_blocks = [-(-n // bs) for n in private_lens]
    total = sum(shared_blocks) + sum(priv_blocks) + 2
    perm = torch.randperm(total).tolist()
    at = 0
    shared_ids = []
    for n in shared_blocks:
        shared_ids.append(perm[at : at + n])
        at += n
    rows, lens = [], []
    for b, g in enumerate(group_of):
        ids = list(shared_ids[g]) if g >= 0 else []
        ids += perm[at : at + priv_blocks[b]]
        at += priv_blocks[b]
        rows.append(ids)
        lens.append((shared_blocks[g] * bs if g >= 0 else 0) + private_lens[b])
    width = max([len(r) for r in rows] + [1]) + 2
    table = torch.full((len(rows), width), 10**6, dtype=torch.int32)
    for b, ids in enumerate(rows):
        table[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
    groups = [([b for b, g in enumerate(group_of) if g == gi], shared_blocks[gi])
              for gi in range(n_groups)]  # fmt: skip
    groups = [grp for grp in groups if grp[0]]
    k = torch.randn(total, bs, hkv, d).to(dtype)
    v = torch.randn(total, bs, hkv, d).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32)
    return k.to(device), v.to(device), table.to(device), sl.to(device), groups
