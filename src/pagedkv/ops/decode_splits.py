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


#: Tile config of the split kernel over a quantized cache, keyed by the KV format's kind
#: (q bfloat16 / float16, head_dim <= 128). ``form``: "dot" (tensor cores in q's dtype),
#: "dot16" (tensor cores in float16: fp8 -> fp16 is one conversion per pair, fp8 -> bf16
#: a quarter-rate one per element on sm_90), "fma" (CUDA cores, float32). ``programs_per_sm``
#: sizes the splits (:func:`choose_split_tokens`). From the sweep on an H200 (2026-12-02,
#: ``bash benchmarks/gpu_quant_sweep.sh``: 33 variants x 6 shapes, CUDA graphs): the
#: config with the best geometric mean over the shapes, 1.06x (fp8) / 1.07x (int8) the
#: best per shape; 128-token tiles in q's dtype beat "dot16" (its extra register pressure
#: costs more than the cheaper conversion saves) and "fma" (4-8x slower). The sweep
#: prints the line to put here (one line per kind).
QUANT_CONFIGS: dict[str, dict] = {
    "fp8": dict(BLOCK_N=128, num_warps=4, num_stages=3, form="dot", programs_per_sm=2),
    "int8": dict(BLOCK_N=128, num_warps=4, num_stages=5, form="dot", programs_per_sm=2),
}
FORMS = {"dot": 0, "dot16": 1, "fma": 2}  # the split kernel's FORM constexpr


def config(head_dim: int, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> dict:
    """Tile sizes, launch options, formulation and split sizing of the split kernel for q
    of ``dtype`` over a cache of ``kv_dtype`` (default ``dtype``); fixed per (head_dim,
    dtype, kv_dtype), so that batch-invariant results do not depend on the batch. The
    unquantized config was picked from a sweep on an H100 (benchmarks/bench_attention.py
    --sweep): 64-token tiles, 4 warps, 3 stages were within 1-3 % of the best at every
    shape tried; quantized caches read :data:`QUANT_CONFIGS` (float32 q keeps the exact
    float32 dot)."""
    if dtype == torch.float32 or head_dim > 128:
        base = dict(BLOCK_N=32, num_warps=4, num_stages=2, form="dot", programs_per_sm=2)
    else:
        base = dict(BLOCK_N=64, num_warps=4, num_stages=3, form="dot", programs_per_sm=2)
    kind = _quant_kind(kv_dtype)
    if kind is None or dtype == torch.float32:
        return base
    if head_dim > 128:  # the bytes per tile of bfloat16's config
        return {**base, "BLOCK_N": 64, "form": QUANT_CONFIGS[kind]["form"]}
    return dict(QUANT_CONFIGS[kind])


def form_of(name: str, dtype: torch.dtype, quantized: bool) -> int:
    """The FORM constexpr of a config's ``form`` (raises on one that cannot run here)."""
    if name not in FORMS:
        raise ValueError(f"decode form {name!r}: use one of {sorted(FORMS)}")
    if name == "dot16" and (not quantized or dtype not in (torch.bfloat16, torch.float16)):
        raise ValueError("decode form 'dot16' reads a quantized cache with bf16 / fp16 q")
    return FORMS[name]


def _quant_kind(kv_dtype: torch.dtype | None) -> str | None:
    if kv_dtype == torch.int8:
        return "int8"
    if kv_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return "fp8"
    return None


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_split_tokens(
    batch: int, num_kv_heads: int, max_seq_len: int, block_n: int, device: torch.device,
    batch_invariant: bool, programs_per_sm: int = 2,
) -> int:  # fmt: skip
    """Tokens per split: a constant in invariant mode, else enough splits for about
    ``programs_per_sm`` programs per SM. On an H100 (132 SMs) the sweep found for bf16
    (2 per SM): no split once B * Hkv >= ~264 (B=64 and B=128: splitting only adds merge
    traffic), 512-token splits at B=1 ctx 16k, 64-token splits at B=1 ctx 512."""
    if batch_invariant:
        return INVARIANT_SPLIT_TOKENS
    max_seq_len = max(max_seq_len, 1)
    want_splits = -(-programs_per_sm * _sm_count(device) // max(batch * num_kv_heads, 1))
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
    programs_per_sm: int = 2,
) -> SplitPlan:  # fmt: skip
    """Splits for sequences of up to ``max_seq_len`` tokens: they cover only the keys the
    query sees (the last ``window``), so the work follows the window, not the context."""
    max_seq_len = max(max_seq_len, 1)
    span = max_seq_len if window is None else min(window, max_seq_len)
    if split_tokens is None:
        split_tokens = choose_split_tokens(
            batch, num_kv_heads, span, block_n, device, batch_invariant, programs_per_sm
        )
    if batch_invariant:  # an aligned span of `span` keys touches at most this many splits
        n = min(-(-max_seq_len // split_tokens), -(-(span - 1) // split_tokens) + 1)
    else:
        n = -(-span // split_tokens)
    return SplitPlan(split_tokens, max(1, n), batch_invariant)
