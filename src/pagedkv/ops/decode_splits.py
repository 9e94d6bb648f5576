"""How decode attention splits each sequence's keys (flash-decoding), and its tiles.

Pure Python: the Triton kernels (:mod:`pagedkv.ops.triton_decode`) and the warm-up
(:mod:`pagedkv.ops.warmup`) plan with it. Split counts follow the batch and the keys a
query sees (the window), except in batch-invariant mode, where the split size is a
constant so that nothing depends on the batch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

INVARIANT_SPLIT_TOKENS = 512
MIN_SPLIT_TOKENS = 64
MAX_VECTOR_MERGE = 128  # more splits than this are merged one by one


def config(head_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options of the split kernel (fixed per head_dim and dtype, so
    that batch-invariant results do not depend on the batch). Picked from a sweep on an
    H100 (benchmarks/bench_attention.py --sweep): 64-token tiles, 4 warps, 3 stages were
    within 1-3 % of the best at every shape tried."""
    if dtype == torch.float32 or head_dim > 128:
        return dict(BLOCK_N=32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_split_tokens(
    batch: int, num_kv_heads: int, max_seq_len: int, block_n: int, device: torch.device,
    batch_invariant: bool,
) -> int:  # fmt: skip
    """Tokens per split: a constant in invariant mode, else enough splits for about two
    programs per SM. On an H100 (132 SMs) the sweep found: no split once B * Hkv >= ~264
    (B=64 and B=128: splitting only adds merge traffic), 512-token splits at B=1 ctx 16k,
    64-token splits at B=1 ctx 512."""
    if batch_invariant:
        return INVARIANT_SPLIT_TOKENS
    max_seq_len = max(max_seq_len, 1)
    want_splits = -(-2 * _sm_count(device) // max(batch * num_kv_heads, 1))
    split = max(-(-max_seq_len // want_splits), MIN_SPLIT_TOKENS)
    return -(-split // block_n) * block_n


class SplitPlan(NamedTuple):
    """How decode splits each sequence's keys: ``num_splits`` programs per (sequence, KV
    head) of ``split_tokens`` keys each, starting at the window's first key, or at the
    multiple of ``split_tokens`` below it when ``aligned`` (batch-invariant mode)."""

    split_tokens: int
    num_splits: int
    aligned: bool


def plan_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, window: int | None, block_n: int,
    device: torch.device, batch_invariant: bool, split_tokens: int | None = None,
) -> SplitPlan:  # fmt: skip
    """Splits for sequences of up to ``max_seq_len`` tokens: they cover only the keys the
    query sees (the last ``window``), so the work follows the window, not the context."""
    max_seq_len = max(max_seq_len, 1)
    span = max_seq_len if window is None else min(window, max_seq_len)
    if split_tokens is None:
        split_tokens = choose_split_tokens(
            batch, num_kv_heads, span, block_n, device, batch_invariant
        )
    if batch_invariant:  # an aligned span of `span` keys touches at most this many splits
        n = min(-(-max_seq_len // split_tokens), -(-(span - 1) // split_tokens) + 1)
    else:
        n = -(-span // split_tokens)
    return SplitPlan(split_tokens, max(1, n), batch_invariant)
