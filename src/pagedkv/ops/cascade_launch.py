"""Launch planning of the cascade kernels (:mod:`pagedkv.ops.triton_cascade`): tile
sizes, split sizes, the packed int32 metadata and the float32 workspace of one
:class:`pagedkv.ops.CascadePlan`. Plain torch (no Triton import): built once per step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from pagedkv.ops._config import interpreting

MIN_PRIVATE_SPLIT = 64
SPLIT_PENALTY = 0.02  # cost of one more shared split (Q reload, one more partial), in waves


def shared_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles of the shared level (a flash-attention forward over paged K): 128 pairs x 64
    keys, the usual Hopper choice for head_dim <= 128. Small tiles in the interpreter."""
    if interpreting():
        return dict(BLOCK_Q=16, BLOCK_N=16, num_warps=4, num_stages=1)
    # float32 (exact "ieee" products) and head_dim > 128: the largest tiles that compile
    # for sm_90 without register spills (checked with cuobjdump -res-usage)
    if dtype == torch.float32:
        return dict(BLOCK_Q=32, BLOCK_N=16, num_warps=4, num_stages=2)
    if head_dim > 128:
        return dict(BLOCK_Q=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_Q=128, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_Q=128, BLOCK_N=64, num_warps=8, num_stages=3)


def private_decode_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles of the private decode level (those of :mod:`triton_decode`)."""
    if interpreting():
        return dict(BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_N=32, num_warps=8, num_stages=2)  # 4 warps spill
    if head_dim > 128:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


def private_prefill_config(head_dim: int, dtype: torch.dtype, pairs: int) -> dict:
    """Tiles of the private prefill level; ``pairs`` = longest chunk x G."""
    if interpreting():
        return dict(BLOCK_Q=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_Q=32, BLOCK_N=16, num_warps=8, num_stages=2)
    if head_dim > 128:
        return dict(BLOCK_Q=32, BLOCK_N=32, num_warps=4, num_stages=2)
    if pairs <= 16:
        return dict(BLOCK_Q=16, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_Q=128, BLOCK_N=64, num_warps=8, num_stages=3)


@functools.lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_shared_split(programs: int, max_shared: int, block_n: int, sms: int) -> int:
    """Tokens per shared split: the split count that best fills whole waves of
    ``programs`` (tiles x KV heads) programs per split, each extra split costing a little
    (Q reload, one more partial to write and fold)."""
    best, best_cost = 1, float("inf")
    for s in range(1, 33):
        if s > 1 and -(-max_shared // s) < 2 * block_n:
            break
        cost = -(-programs * s // sms) / s + SPLIT_PENALTY * s
        if cost < best_cost - 1e-9:
            best, best_cost = s, cost
    split = -(-max_shared // best)
    return -(-split // block_n) * block_n


def choose_private_split(batch: int, num_kv_heads: int, max_private: int, block_n: int,
                         sms: int) -> int:  # fmt: skip
    """Tokens per private decode split: no split once ``batch * Hkv`` fills about two
    programs per SM (the rule of :func:`triton_decode.choose_split_tokens`)."""
    want = -(-2 * sms // max(batch * num_kv_heads, 1))
    split = max(-(-max(max_private, 1) // want), MIN_PRIVATE_SPLIT)
    return -(-split // block_n) * block_n


@dataclass
class Launch:
    """Everything :func:`run` launches for one plan; built once by :func:`plan_launch`."""

    shared_cfg: dict
    private_cfg: dict
    n_tiles: int  # shared-level tiles (0: no group)
    split1: int
    slots1: int
    split2: int
    splits2: int
    fused: bool
    prefill_tiles: int
    meta: dict[str, torch.Tensor]
    o_ws: torch.Tensor
    lse_ws: torch.Tensor


def plan_launch(
    plan, shared_split: int | None, private_split: int | None, shared_cfg: dict | None = None
) -> Launch:
    """Tiles, split sizes, packed int32 metadata and workspace of a :class:`CascadePlan`
    (``shared_cfg`` overrides :func:`shared_config`: benchmark sweeps)."""
    hq, hkv, d, bs = plan.shape
    g = hq // hkv
    dev = plan.device
    sms = sm_count(dev)
    scfg = shared_cfg or shared_config(d, plan.dtype)
    tile_group, tile_start, rows, row_ptr, leader, shared_len = [], [], [], [0], [], []
    for gi, grp in enumerate(plan.groups):
        grp_rows = plan.group_q_rows(grp)
        for p0 in range(0, len(grp_rows) * g, scfg["BLOCK_Q"]):
            tile_group.append(gi)
            tile_start.append(p0)
        rows += grp_rows
        row_ptr.append(len(rows))
        leader.append(grp.seqs[0])
        shared_len.append(grp.shared_blocks * bs)
    max_shared = max(shared_len, default=0)
    split1, slots1 = 1, 0
    if tile_group:
        split1 = shared_split or choose_shared_split(
            len(tile_group) * hkv, max_shared, scfg["BLOCK_N"], sms
        )
        slots1 = -(-max_shared // split1)
    split2, splits2, prefill_tiles = 1, 1, 0
    if plan.is_prefill:
        pcfg = private_prefill_config(d, plan.dtype, plan.max_q_len * g)
        prefill_tiles = -(-max(plan.max_q_len * g, 1) // pcfg["BLOCK_Q"])
    else:
        pcfg = private_decode_config(d, plan.dtype)
        max_private = plan.max_seq_len - min(plan.shared_tokens)
        split2 = private_split or choose_private_split(
            plan.num_seqs, hkv, max_private, pcfg["BLOCK_N"], sms
        )
        splits2 = max(1, -(-max_private // split2))
    fused = splits2 == 1
    slots = slots1 + (0 if fused else splits2)
    parts = dict(tile_group=tile_group, tile_start=tile_start, rows=rows, row_ptr=row_ptr)
    parts.update(leader=leader, shared_len=shared_len, row_shared=list(plan.shared_tokens))
    flat = torch.tensor([x for p in parts.values() for x in p] or [0], dtype=torch.int32)
    flat = flat.to(dev)
    meta, at = {}, 0
    for name, p in parts.items():
        meta[name] = flat[at : at + len(p)]
        at += len(p)
    f32 = dict(dtype=torch.float32, device=dev)
    n = plan.num_q_rows if slots else 1
    o_ws = torch.empty(n, hq, max(slots, 1), d, **f32)
    lse_ws = torch.empty(n, hq, max(slots, 1), **f32)
    return Launch(scfg, pcfg, len(tile_group), split1, slots1, split2, splits2, fused,
                  prefill_tiles, meta, o_ws, lse_ws)  # fmt: skip
