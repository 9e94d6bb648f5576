"""The cascade attention entry points, :func:`cascade_decode` and
:func:`cascade_prefill`, over a :class:`~pagedkv.ops.cascade.CascadePlan` (the
contract, the levels and batch invariance are described in :mod:`pagedkv.ops.cascade`).
"""

from __future__ import annotations

import math

import torch

from pagedkv.ops import _checks, invariant_attention, reference, reference_cascade
from pagedkv.ops.cascade import CascadePlan
from pagedkv.ops.invariant import suspend_hook


def _resolve_check(check: bool | None, device: torch.device) -> bool:
    if check is not None:
        return check
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _run(q, k_cache, v_cache, block_tables, seq_lens, plan, scale, check, out, prefill):
    if not isinstance(plan, CascadePlan):
        raise TypeError(f"plan must be a CascadePlan, got {type(plan).__name__}")
    if plan.is_prefill != prefill:
        raise ValueError(
            f"this plan was built for {'prefill' if plan.is_prefill else 'decode'}; "
            f"use cascade_{'prefill' if plan.is_prefill else 'decode'} (or pass q_lens)"
        )
    plan.check_args(q, k_cache, v_cache, block_tables, seq_lens, out)
    if _resolve_check(check, q.device):
        _checks.table_values(block_tables, seq_lens, k_cache.shape[0], k_cache.shape[1])
        plan.check_values(block_tables, seq_lens)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if q.shape[0] == 0:
        return out
    if plan.batch_invariant:  # plain kernels over the full tables (see the module docstring)
        return _plain(q, k_cache, v_cache, block_tables, seq_lens, plan, scale, out)
    if plan.backend == "triton":
        from pagedkv.ops import triton_cascade

        triton_cascade.run(q, k_cache, v_cache, block_tables, seq_lens, plan, scale, out)
        return out
    res = reference_cascade.cascade(q, k_cache, v_cache, block_tables, seq_lens, plan, scale)
    return out.copy_(res)


def _plain(q, k_cache, v_cache, block_tables, seq_lens, plan, scale, out):
    if plan.is_prefill:  # invariant prefill is decode row by row (pagedkv.ops.invariant_attention)
        block_tables, seq_lens = invariant_attention.rows_as_sequences(
            plan.cu_seqlens_q, block_tables, seq_lens, q.shape[0]
        )
    if plan.backend == "triton":
        from pagedkv.ops import triton_decode

        return triton_decode.decode(
            q, k_cache, v_cache, block_tables, seq_lens, scale, batch_invariant=True,
            max_seq_len=plan.max_seq_len, out=out,
        )  # fmt: skip
    with suspend_hook():  # invariant by itself: one sequence at a time
        res = reference.decode(q, k_cache, v_cache, block_tables, seq_lens, scale, True)
    return out.copy_(res)


def cascade_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    plan: CascadePlan,
    scale: float | None = None,
    *,
    check: bool | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention with the shared prefixes of ``plan`` read once per group.

    q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables:
    [B, max_blocks] int32 (full per-sequence tables, shared blocks first); seq_lens: [B].
    Returns [B, Hq, D] (``out`` when given), equal to :func:`decode_attention` within
    rounding. ``check=None`` checks values (one sync) except while capturing a CUDA graph.
    """
    return _run(q, k_cache, v_cache, block_tables, seq_lens, plan, scale, check, out, False)


def cascade_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    plan: CascadePlan,
    scale: float | None = None,
    *,
    check: bool | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal chunked prefill with the shared prefixes of ``plan`` read once per group.

    q: [T, Hq, D], the chunks packed as ``plan.cu_seqlens_q`` says (the plan's
    ``q_lens``); each chunk is the last ``q_len`` of its ``seq_lens[b]`` tokens, whose
    K/V are written first (as for :func:`prefill_attention`). Returns [T, Hq, D].
    """
    return _run(q, k_cache, v_cache, block_tables, seq_lens, plan, scale, check, out, True)
