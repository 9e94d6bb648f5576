"""Paged-attention and KV-movement kernels: public dispatch.

Every op has a torch reference (:mod:`pagedkv.ops.reference`, any device, the
specification) and a Triton kernel for CUDA tensors. The backend is chosen per call:
``backend=`` argument, else :func:`set_backend` / :func:`use_backend`, else Triton for
CUDA tensors when Triton is installed and the reference otherwise. Triton is imported
only when a Triton kernel is first used, so the reference works without it.

Batch-invariant mode (``batch_invariant=True``, :func:`set_batch_invariant`,
:func:`batch_invariant_mode`) makes attention results for a sequence bit-identical
whatever else shares its batch, and a query row's result the same whether decode or
prefill computes it, in whatever chunk (prefill then runs the decode path row by row:
:mod:`pagedkv.ops.invariant_attention`). :func:`batch_invariant_mode` (or :func:`invariant_forward`
under the flag) also routes a model's own matmuls, reductions and softmax to the
batch-invariant ops of :mod:`pagedkv.ops.invariant` (see :mod:`pagedkv.ops.invariant_mode`).

Decode and prefill take keyword-only ``window`` (sliding window, tokens), ``softcap``
(logit soft-capping) and ``sinks`` (per-head sink logits); any mix may be combined.

Shared-prefix (cascade) attention, :func:`cascade_decode` / :func:`cascade_prefill` over
a :class:`CascadePlan`, reads a prefix shared by a group of sequences once per group
(:mod:`pagedkv.ops.cascade`); :func:`shared_prefix_groups` finds the groups from the
block tables. Whole-block copies, swaps and (de)quantization: :mod:`pagedkv.ops.blocks`.

Every op checks shapes, dtypes and devices and raises ``ValueError``/``TypeError``
before touching anything; ``check=True`` (default) also checks values (block ids in
range, lengths that fit their tables), which costs one device sync on CUDA.

The eager path is lean: the metadata checks and the backend choice run once per shape
class (dtypes, head counts and dims, block size, cache strides, options) and are then
looked up (``ops/_specs.py``); each Triton kernel variant is bound once and
launched directly afterwards (``ops/_launch.py``). With ``check=False`` a
call allocates only its output (and, for split decode, a reused workspace) and never
syncs. Integer kernel arguments that vary per call are not specialized on, so new
batch sizes, lengths or table widths never recompile; :func:`warmup` compiles every
variant a layout needs ahead of time.
"""

from __future__ import annotations

import torch

from pagedkv._kv_formats import is_quantized
from pagedkv.ops import _checks, _specs, invariant_attention, reference, reference_quant
from pagedkv.ops._config import (
    get_backend,
    is_batch_invariant,
    resolve,
    resolve_invariant,
    set_backend,
    set_batch_invariant,
    use_backend,
)
from pagedkv.ops.blocks import (
    copy_blocks,
    dequantize_blocks,
    gather_blocks,
    quantize_blocks,
    scatter_blocks,
)
from pagedkv.ops.cascade import CascadePlan
from pagedkv.ops.cascade_groups import shared_prefix_groups
from pagedkv.ops.cascade_ops import cascade_decode, cascade_prefill
from pagedkv.ops.invariant import suspend_hook
from pagedkv.ops.invariant_mode import batch_invariant_mode, invariant_forward
from pagedkv.ops.plan import DecodePlan
from pagedkv.ops.warmup import WarmupResult, warmup

__all__ = [
    "CascadePlan",
    "DecodePlan",
    "WarmupResult",
    "batch_invariant_mode",
    "cascade_decode",
    "cascade_prefill",
    "check_kv_readable",
    "copy_blocks",
    "decode_attention",
    "dequantize_blocks",
    "gather_blocks",
    "get_backend",
    "invariant_forward",
    "is_batch_invariant",
    "paged_decode",
    "paged_prefill",
    "prefill_attention",
    "quantize_blocks",
    "scatter_blocks",
    "set_backend",
    "set_batch_invariant",
    "shared_prefix_groups",
    "use_backend",
    "warmup",
    "write_kv",
]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    backend: str | None = None,
    batch_invariant: bool | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Decode attention of one layer over paged K/V.

    q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D] with Hq a multiple
    of Hkv (GQA); block_tables: [B, max_blocks] int32 (entries past a sequence's last
    block are ignored); seq_lens: [B] int32. Returns [B, Hq, D] in q's dtype; a sequence
    of length 0 gives zeros. ``scale`` defaults to 1/sqrt(D).

    ``window`` (tokens, sliding-window layers): the query at position p = seq_len - 1
    sees keys in ``(p - window, p]``; blocks wholly before that are never read, so the
    cost follows the window, not the context, and their table entries may hold anything
    (e.g. blocks already released). ``softcap``: scores ``s = q.k * scale``
    become ``softcap * tanh(s / softcap)`` (Gemma 2). ``sinks``: [Hq] logits (float32 or
    q's dtype), one per query head, added to the softmax denominator as a key whose
    value is zero (gpt-oss).

    A quantized cache (``float8_e4m3fn``, ``float8_e5m2``, ``int8``) needs ``k_scales`` and
    ``v_scales`` (float32 [num_blocks, Hkv]): key j of block b, head h is
    ``k_cache[b, j, h] * k_scales[b, h]``, dequantized in registers; q is then any float
    dtype (the compute dtype), and so is the result.
    """
    invariant = resolve_invariant(batch_invariant)
    spec = _specs.decode(
        q, k_cache, v_cache, block_tables, seq_lens, scale, window, softcap, sinks, backend,
        invariant, k_scales, v_scales,
    )  # fmt: skip
    if check:
        _checks.sink_values(sinks)
        first = None if spec.window is None else (seq_lens - spec.window).clamp(min=0)
        _checks.table_values(block_tables, seq_lens, k_cache.shape[0], k_cache.shape[1], first)
    if spec.kernels is not None:
        return spec.kernels.run(
            q, k_cache, v_cache, block_tables, seq_lens, sinks, spec.scalars, spec.window,
            k_scales=k_scales, v_scales=v_scales,
        )  # fmt: skip
    with suspend_hook():  # invariant by itself: one sequence at a time
        return reference.decode(
            q, k_cache, v_cache, block_tables, seq_lens, spec.scale, invariant,
            window=spec.window, softcap=spec.softcap, sinks=sinks, k_scales=k_scales,
            v_scales=v_scales,
        )  # fmt: skip


def paged_decode(
    q: torch.Tensor,
    pool,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    backend: str | None = None,
    batch_invariant: bool | None = None,
    check: bool = True,
) -> torch.Tensor:
    """:func:`decode_attention` over layer ``layer`` of a :class:`pagedkv.storage.KVPool`
    (with its scales when it is quantized)."""
    return decode_attention(
        q, pool.k(layer), pool.v(layer), block_tables, seq_lens, scale, window=window,
        softcap=softcap, sinks=sinks, k_scales=pool.k_scales(layer),
        v_scales=pool.v_scales(layer), backend=backend, batch_invariant=batch_invariant,
        check=check,
    )  # fmt: skip


def prefill_attention(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    backend: str | None = None,
    max_q_len: int | None = None,
    batch_invariant: bool | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Causal prefill of packed variable-length queries over paged K/V (with a cached prefix).

    q: [T, Hq, D]; cu_seqlens_q: [B+1] int32, sequence b owning rows ``cu[b]:cu[b+1]``.
    Those rows are the LAST ``q_len_b`` tokens of the ``seq_lens[b]`` tokens in the cache
    (cached prefix + themselves; write their K/V with :func:`write_kv` first). Row i of
    sequence b sits at position ``p = seq_lens[b] - q_len_b + i`` and sees keys at
    positions in ``(p - window, p]`` (``[0, p]`` when ``window`` is None); ``softcap`` and
    ``sinks`` as in :func:`decode_attention`. Returns [T, Hq, D] in q's dtype.
    ``max_q_len`` (the longest q_len) spares the Triton path a device sync when given.
    In batch-invariant mode (``batch_invariant``; None follows the current mode) every
    row is computed by the invariant decode path, so its bits equal what
    :func:`decode_attention` gives for the same query at the same position.

    Quantized caches take ``k_scales`` / ``v_scales`` as in :func:`decode_attention`.
    """
    cu = cu_seqlens_q
    spec = _specs.prefill(
        q, cu, k_cache, v_cache, block_tables, seq_lens, scale, window, softcap, sinks, backend,
        k_scales, v_scales,
    )  # fmt: skip
    if check:
        _checks.sink_values(sinks)
        _checks.cu_values(cu, seq_lens, q.shape[0])
        first = None
        if spec.window is not None:
            first = (seq_lens - (cu[1:] - cu[:-1]) - spec.window + 1).clamp(min=0)
        _checks.table_values(block_tables, seq_lens, k_cache.shape[0], k_cache.shape[1], first)
    if resolve_invariant(batch_invariant):
        tables, lens = invariant_attention.rows_as_sequences(cu, block_tables, seq_lens, q.shape[0])
        return decode_attention(
            q, k_cache, v_cache, tables, lens, spec.scale, window=spec.window,
            softcap=spec.softcap, sinks=sinks, k_scales=k_scales, v_scales=v_scales,
            backend=backend, batch_invariant=True, check=False,
        )  # fmt: skip
    if spec.kernels is not None:
        return spec.kernels.run(
            q, cu, k_cache, v_cache, block_tables, seq_lens, sinks, spec.scalars, max_q_len,
            k_scales=k_scales, v_scales=v_scales,
        )  # fmt: skip
    return reference.prefill(
        q, cu, k_cache, v_cache, block_tables, seq_lens, spec.scale, window=spec.window,
        softcap=spec.softcap, sinks=sinks, k_scales=k_scales, v_scales=v_scales,
    )  # fmt: skip


def paged_prefill(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    pool,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    backend: str | None = None,
    max_q_len: int | None = None,
    batch_invariant: bool | None = None,
    check: bool = True,
) -> torch.Tensor:
    """:func:`prefill_attention` over layer ``layer`` of a :class:`pagedkv.storage.KVPool`
    (with its scales when it is quantized)."""
    return prefill_attention(
        q, cu_seqlens_q, pool.k(layer), pool.v(layer), block_tables, seq_lens, scale,
        window=window, softcap=softcap, sinks=sinks, k_scales=pool.k_scales(layer),
        v_scales=pool.v_scales(layer), backend=backend, max_q_len=max_q_len,
        batch_invariant=batch_invariant, check=check,
    )  # fmt: skip


def write_kv(
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    static_scales: tuple[float, float] | None = None,
    backend: str | None = None,
    check: bool = True,
) -> None:
    """Scatter new tokens' K/V into one layer's caches.

    pool_k, pool_v: [num_blocks, block_size, Hkv, D]; k, v: [N, Hkv, D] of the cache's
    dtype; slots: [N] int, ``block * block_size + offset``, or -1 to skip a token (padding).

    A quantized cache (fp8 / int8) takes k, v of any float dtype and quantizes them,
    keeping ``k_scales`` / ``v_scales`` (float32 [num_blocks, Hkv], updated in place; see
    :mod:`pagedkv._kv_formats` for the rule). Dynamic scales (``static_scales=None``) need
    the slots of one block to be contiguous in the call (every sequence writes its tokens
    together, in order: true of the engine, ``PagedCache`` and ``KVPool.write``) and blocks
    filled from offset 0; ``check=True`` verifies the first (one more sync).
    ``static_scales=(k_scale, v_scale)``: this layer's fixed scales (calibrated).
    """
    spec = _specs.write(pool_k, pool_v, slots, k, v, backend, k_scales, v_scales, static_scales)
    if check:
        _checks.slots(slots, k.shape[0], spec.num_slots, pool_k.device, True)
        if spec.quantized and spec.static_scales is None and k.shape[0]:
            _checks.block_runs(slots, pool_k.shape[1])
    if k.shape[0] == 0:
        return
    if spec.quantized:
        # _specs.write raised unless a quantized cache came with both scales
        assert k_scales is not None and v_scales is not None
        if spec.kernels is not None:
            spec.kernels.run(pool_k, pool_v, k_scales, v_scales, slots, k, v, spec.static_scales)
        else:
            reference_quant.write_kv(
                pool_k, pool_v, k_scales, v_scales, slots, k, v, spec.static_scales
            )
    elif spec.kernels is not None:
        spec.kernels.run(pool_k, pool_v, slots, k, v)
    else:
        reference.write_kv(pool_k, pool_v, slots, k, v)


def check_kv_readable(
    kv_dtype: torch.dtype, device: torch.device, backend: str | None = None
) -> None:
    """Raise ``ValueError`` when the backend chosen for ``device`` (``backend``, the global
    setting, or the default) cannot read KV stored as ``kv_dtype`` there (Triton reads
    float8_e4m3fn only on compute capability 8.9+). Pools call it before allocating."""
    if is_quantized(kv_dtype) and resolve(backend, device) == "triton":
        _checks.triton_reads(kv_dtype, device)
