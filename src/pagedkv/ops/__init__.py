"""Paged-attention and KV-movement kernels: public dispatch.

Every op has a torch reference (:mod:`pagedkv.ops.reference`, any device, the
specification) and a Triton kernel for CUDA tensors. The backend is chosen per call:
``backend=`` argument, else :func:`set_backend` / :func:`use_backend`, else Triton for
CUDA tensors when Triton is installed and the reference otherwise. Triton is imported
only when a Triton kernel is first used, so the reference works without it.

Batch-invariant mode (``batch_invariant=True``, :func:`set_batch_invariant`,
:func:`batch_invariant_mode`) makes decode results for a sequence bit-identical
whatever else shares its batch. :func:`batch_invariant_mode` (or :func:`invariant_forward`
under the flag) also routes a model's own matmuls, reductions and softmax to the
batch-invariant ops of :mod:`pagedkv.ops.invariant` (see :mod:`pagedkv.ops.invariant_mode`).

Decode and prefill take keyword-only ``window`` (sliding window, tokens), ``softcap``
(logit soft-capping) and ``sinks`` (per-head sink logits); any mix may be combined.

Shared-prefix (cascade) attention, :func:`cascade_decode` / :func:`cascade_prefill` over
a :class:`CascadePlan`, reads a prefix shared by a group of sequences once per group
(:mod:`pagedkv.ops.cascade`); :func:`shared_prefix_groups` finds the groups from the
block tables.

Every op checks shapes, dtypes and devices and raises ``ValueError``/``TypeError``
before touching anything; ``check=True`` (default) also checks values (block ids in
range, lengths that fit their tables), which costs one device sync on CUDA.
"""

from __future__ import annotations

from importlib import import_module

import torch

from pagedkv.ops import _checks, reference
from pagedkv.ops._config import (
    batch_invariant_mode,
    get_backend,
    is_batch_invariant,
    resolve,
    resolve_invariant,
    set_backend,
    set_batch_invariant,
    use_backend,
)
from pagedkv.ops.cascade import CascadePlan, cascade_decode, cascade_prefill
from pagedkv.ops.cascade_groups import shared_prefix_groups
from pagedkv.ops.invariant_mode import invariant_forward
from pagedkv.ops.plan import DecodePlan

__all__ = [
    "CascadePlan",
    "DecodePlan",
    "batch_invariant_mode",
    "cascade_decode",
    "cascade_prefill",
    "copy_blocks",
    "decode_attention",
    "gather_blocks",
    "get_backend",
    "invariant_forward",
    "is_batch_invariant",
    "paged_decode",
    "paged_prefill",
    "prefill_attention",
    "scatter_blocks",
    "set_backend",
    "set_batch_invariant",
    "shared_prefix_groups",
    "use_backend",
    "write_kv",
]


_TRITON_MODULES: dict = {}


def _triton(module: str):
    """The Triton module ``triton_<module>``, imported on first use (triton is optional)."""
    mod = _TRITON_MODULES.get(module)
    if mod is None:
        mod = _TRITON_MODULES[module] = import_module(f"pagedkv.ops.triton_{module}")
    return mod


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
    """
    _checks.cache_pair(k_cache, v_cache)
    bsz, _ = _checks.query(q, "q", k_cache, 3)
    opts = _checks.attn_options(scale, window, softcap, sinks, q, check)
    _checks.tables(block_tables, seq_lens, bsz, k_cache.device)
    if check:
        first = None if opts.window is None else (seq_lens - opts.window).clamp(min=0)
        _checks.table_values(block_tables, seq_lens, k_cache.shape[0], k_cache.shape[1], first)
    invariant = resolve_invariant(batch_invariant)
    feats = dict(window=opts.window, softcap=opts.softcap, sinks=opts.sinks)
    if resolve(backend, q.device) == "triton":
        return _triton("decode").decode(
            q, k_cache, v_cache, block_tables, seq_lens, opts.scale, batch_invariant=invariant,
            **feats,
        )  # fmt: skip
    return reference.decode(
        q, k_cache, v_cache, block_tables, seq_lens, opts.scale, invariant, **feats
    )


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
    """:func:`decode_attention` over layer ``layer`` of a :class:`pagedkv.storage.KVPool`."""
    return decode_attention(
        q, pool.k(layer), pool.v(layer), block_tables, seq_lens, scale, window=window,
        softcap=softcap, sinks=sinks, backend=backend, batch_invariant=batch_invariant,
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
    backend: str | None = None,
    max_q_len: int | None = None,
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
    """
    _checks.cache_pair(k_cache, v_cache)
    num_tokens, _ = _checks.query(q, "q", k_cache, 3)
    opts = _checks.attn_options(scale, window, softcap, sinks, q, check)
    cu = _checks.cu_seqlens(cu_seqlens_q, k_cache.device)
    _checks.tables(block_tables, seq_lens, cu.shape[0] - 1, k_cache.device)
    if check:
        _checks.cu_values(cu, seq_lens, num_tokens)
        first = None
        if opts.window is not None:
            first = (seq_lens - (cu[1:] - cu[:-1]) - opts.window + 1).clamp(min=0)
        _checks.table_values(block_tables, seq_lens, k_cache.shape[0], k_cache.shape[1], first)
    feats = dict(window=opts.window, softcap=opts.softcap, sinks=opts.sinks)
    if resolve(backend, q.device) == "triton":
        return _triton("prefill").prefill(
            q, cu, k_cache, v_cache, block_tables, seq_lens, opts.scale, max_q_len=max_q_len,
            **feats,
        )  # fmt: skip
    return reference.prefill(q, cu, k_cache, v_cache, block_tables, seq_lens, opts.scale, **feats)


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
    check: bool = True,
) -> torch.Tensor:
    """:func:`prefill_attention` over layer ``layer`` of a :class:`pagedkv.storage.KVPool`."""
    return prefill_attention(
        q, cu_seqlens_q, pool.k(layer), pool.v(layer), block_tables, seq_lens, scale,
        window=window, softcap=softcap, sinks=sinks, backend=backend, max_q_len=max_q_len,
        check=check,
    )  # fmt: skip


def write_kv(
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str | None = None,
    check: bool = True,
) -> None:
    """Scatter new tokens' K/V into one layer's caches.

    pool_k, pool_v: [num_blocks, block_size, Hkv, D]; k, v: [N, Hkv, D] of the cache's
    dtype; slots: [N] int, ``block * block_size + offset``, or -1 to skip a token (padding).
    """
    nb, bs, hkv, d = _checks.cache_pair(pool_k, pool_v)
    for name, x in (("k", k), ("v", v)):
        _checks.tensor(x, name)
        if x.dim() != 3 or tuple(x.shape[1:]) != (hkv, d):
            raise ValueError(f"{name} must be [N, {hkv}, {d}], got shape {tuple(x.shape)}")
        if x.dtype != pool_k.dtype:
            raise TypeError(
                f"{name} dtype {x.dtype} != KV cache dtype {pool_k.dtype}; cast it first"
            )
        _checks.same_device(x, name, pool_k.device)
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k has {k.shape[0]} tokens but v has {v.shape[0]}")
    s = _checks.slots(slots, k.shape[0], nb * bs, pool_k.device, check)
    if k.shape[0] == 0:
        return
    if resolve(backend, pool_k.device) == "triton":
        _triton("memory").write_kv(pool_k, pool_v, s, k, v)
    else:
        reference.write_kv(pool_k, pool_v, s, k, v)


def _pool_tensor(kv: torch.Tensor) -> None:
    _checks.tensor(kv, "kv")
    if kv.dim() != 6 or kv.shape[1] != 2 or not kv.is_contiguous():
        raise ValueError(
            "kv must be a contiguous [num_layers, 2, num_blocks, block_size, Hkv, D] tensor, "
            f"got shape {tuple(kv.shape)}"
        )


def copy_blocks(kv: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, *, backend=None) -> None:
    """Copy whole blocks (all layers, K and V): ``kv[:, :, dst[i]] = kv[:, :, src[i]]``.

    src, dst: [n] int64 tensors on kv's device, in range (checked by the caller, e.g.
    :meth:`KVPool.copy_blocks`); no dst may also be a src (the pool orders such lists).
    """
    _pool_tensor(kv)
    if src.numel() == 0:
        return
    if resolve(backend, kv.device) == "triton":
        _triton("memory").copy_blocks(kv, src, dst)
    else:
        reference.copy_blocks(kv, src, dst)


def gather_blocks(
    kv: torch.Tensor, ids: torch.Tensor, *, out: torch.Tensor | None = None, backend=None
) -> torch.Tensor:
    """Blocks ``ids`` ([n] int64, in range) as one contiguous [n, L, 2, block_size, Hkv, D]
    tensor on kv's device (into ``out`` when given): the staging copy of a swap-out."""
    _pool_tensor(kv)
    if resolve(backend, kv.device) == "triton":
        return _triton("memory").gather_blocks(kv, ids, out=out)
    res = reference.gather_blocks(kv, ids)
    return res if out is None else out.copy_(res)


def scatter_blocks(
    kv: torch.Tensor, ids: torch.Tensor, data: torch.Tensor, *, backend=None
) -> None:
    """Inverse of :func:`gather_blocks`: data [n, L, 2, block_size, Hkv, D] (kv's dtype and
    device) into blocks ``ids`` ([n] int64, in range, distinct)."""
    _pool_tensor(kv)
    if ids.numel() == 0:
        return
    if resolve(backend, kv.device) == "triton":
        _triton("memory").scatter_blocks(kv, ids, data)
    else:
        reference.scatter_blocks(kv, ids, data)
