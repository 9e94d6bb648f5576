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


# Tile tables: (BLOCK_Q, BLOCK_N, num_warps, num_stages) by case (see _tiles). float32
# (exact "ieee" products) and head_dim > 128 on the shared level: the largest tiles that
# compile for sm_90 without register spills (checked with cuobjdump -res-usage); on the
# private decode level float32 takes 8 warps (4 warps spill).
_SHARED = {"interpreter": (16, 16, 4, 1), "float32": (32, 16, 4, 2), "wide": (64, 32, 8, 2),
           "small": (128, 64, 4, 3), "default": (128, 64, 8, 3)}  # fmt: skip
_DECODE = {"interpreter": (16, 4, 1), "float32": (32, 8, 2), "wide": (32, 4, 2),
           "default": (64, 4, 3)}  # fmt: skip
_PREFILL = {"interpreter": (16, 16, 4, 1), "float32": (32, 16, 8, 2), "wide": (32, 32, 4, 2),
            "small": (16, 64, 4, 3), "default": (128, 64, 8, 3)}  # fmt: skip


def _tiles(table: dict, head_dim: int, dtype: torch.dtype, small: bool = False) -> dict:
    """The launch options of ``table``'s case for this call: small tiles in the
    interpreter, then float32, then head_dim > 128 ("wide"), then ``small``."""
    if interpreting():
        case = "interpreter"
    elif dtype == torch.float32:
        case = "float32"
    elif head_dim > 128:
        case = "wide"
    else:
        case = "small" if small else "default"
    row = table[case]
    names = ("BLOCK_Q", "BLOCK_N", "num_warps", "num_stages")[4 - len(row) :]
    return dict(zip(names, row, strict=True))


def shared_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles of the shared level (a flash-attention forward over paged K): 128 pairs x 64
    keys, the usual Hopper choice for head_dim <= 128. Small tiles in the interpreter."""
    return _tiles(_SHARED, head_dim, dtype, head_dim <= 64)


def private_decode_config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tiles of the private decode level (those of :mod:`triton_decode`)."""
    return _tiles(_DECODE, head_dim, dtype)


def private_prefill_config(head_dim: int, dtype: torch.dtype, pairs: int) -> dict:
    """Tiles of the private prefill level; ``pairs`` = longest chunk x G."""
    return _tiles(_PREFILL, head_dim, dtype, pairs <= 16)


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
