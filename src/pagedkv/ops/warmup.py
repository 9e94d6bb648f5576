"""Compile and bind every Triton kernel variant a workload's shape class needs, up front.

Triton compiles a kernel variant on its first launch (seconds); later calls of the same
shape class with other batch sizes, lengths, table widths, windows or scales reuse it
(the integer arguments that vary are not specialized on). :func:`warmup` launches each
variant once on empty inputs, so that a timed run, or the first request of a server,
never waits for a compile.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch

from pagedkv._kv_formats import is_quantized
from pagedkv.ops import _checks
from pagedkv.ops._config import resolve, resolve_invariant
from pagedkv.ops._specs import triton_module
from pagedkv.ops.decode_splits import MIN_SPLIT_TOKENS, SplitPlan, _sm_count


class WarmupResult(NamedTuple):
    """What :func:`warmup` did: kernel launches (each variant at least once, compiled if
    it was not already) and the wall time it took."""

    launches: int
    seconds: float


def warmup(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_q_heads: int,
    *,
    max_seq_len: int | None = None,
    windows: Sequence[int | None] = (None,),
    softcaps: Sequence[float | None] = (None,),
    sinks: Sequence[torch.dtype | None] = (None,),
    batch_invariant: bool | Sequence[bool] | None = None,
    index_dtype: torch.dtype = torch.int32,
    slot_dtype: torch.dtype = torch.int64,
    decode: bool = True,
    prefill: bool = True,
    write: bool = True,
    blocks: bool = True,
    backend: str | None = None,
    dtype: torch.dtype | None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    static_scales: bool = False,
) -> WarmupResult:
    """Compile the decode, prefill and KV-write kernels for one layer layout.

    ``k_cache`` / ``v_cache``: a layer's caches ([num_blocks, block_size, Hkv, D], e.g.
    ``pool.k(0)``, ``pool.v(0)``); only their dtype, shape and strides are used (nothing
    is read or written). ``num_q_heads``: Hq of the model. ``max_seq_len``: the longest
    sequence decode will see (bounds the split counts to cover; default: every split
    count the planner can choose). ``windows``, ``softcaps``: the values the model's
    layers use (None: none); ``sinks``: the dtypes of their sink tensors (None: no sinks).
    ``batch_invariant``: the mode(s) to cover (default: the current one).
    ``index_dtype``: dtype of block tables, sequence lengths and cu_seqlens;
    ``slot_dtype``: dtype of the slots given to :func:`pagedkv.ops.write_kv`.
    ``decode``, ``prefill``, ``write``, ``blocks`` (block copy / gather / scatter, the
    swap and copy-on-write kernels of a contiguous KVPool): which kernels to cover.
    A quantized cache (fp8 / int8) also takes ``dtype`` (the compute dtype of q, k, v),
    its layer's ``k_scales`` / ``v_scales`` (``pool.k_scales(0)``, for their strides) and
    ``static_scales`` (whether the layout's scales are static: the write kernel differs).

    Covers every kernel :func:`pagedkv.ops.decode_attention`, ``prefill_attention``,
    ``write_kv`` and :class:`pagedkv.ops.DecodePlan` launch for such calls, whatever the
    batch size, lengths, table width, window size or scale, for q, k and v whose last
    dimension is dense (views of a wider projection included where their strides are
    multiples of 16 elements, as in every common layout). A no-op on the torch
    reference backend. Returns a :class:`WarmupResult`.
    """
    t0 = time.perf_counter()
    _, _, hkv, d = _checks.cache_pair(k_cache, v_cache)
    if isinstance(num_q_heads, bool) or not isinstance(num_q_heads, int) or num_q_heads <= 0:
        raise ValueError(f"num_q_heads must be a positive int, got {num_q_heads!r}")
    if num_q_heads % hkv:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of the cache's Hkv {hkv}")
    for w in windows:
        _checks.attn_options(None, w, None, None, k_cache[:0, 0], False)
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len!r}")
    quantized = is_quantized(k_cache.dtype)
    cdt = k_cache.dtype if dtype is None else dtype
    if quantized and dtype is None:
        raise ValueError(f"a {k_cache.dtype} cache needs dtype= (the compute dtype of q, k, v)")
    if not quantized and cdt != k_cache.dtype:
        raise ValueError(f"dtype {cdt} must be the cache's dtype {k_cache.dtype}")
    name = resolve(backend, k_cache.device)
    _checks.kv_scales(k_cache, k_scales, v_scales, name)
    if name != "triton":
        return WarmupResult(0, 0.0)
    modes = _modes(batch_invariant)
    dev = k_cache.device
    # stand-ins with the caches' dtype and strides: one block, zeros
    kd = _like(k_cache)
    vd = _like(v_cache)
    ks = None if k_scales is None else _like(k_scales)
    vs = None if v_scales is None else _like(v_scales)
    table = torch.zeros(1, 1, dtype=index_dtype, device=dev)
    lens = torch.zeros(1, dtype=index_dtype, device=dev)
    q = torch.zeros(1, num_q_heads, d, dtype=cdt, device=dev)
    n = 0
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        for softcap in {s is not None for s in softcaps}:
            for sink_dtype in set(sinks):
                sk = None
                if sink_dtype is not None:
                    sk = torch.full((num_q_heads,), float("-inf"), dtype=sink_dtype, device=dev)
                if decode:
                    n += _decode(q, kd, vd, table, lens, sk, softcap, modes, windows, max_seq_len,
                                 ks, vs)  # fmt: skip
                if prefill:
                    n += _prefill(q, kd, vd, table, sk, softcap, ks, vs)
        if write:
            slots = torch.full((1,), -1, dtype=slot_dtype, device=dev)  # -1: nothing written
            kn = torch.zeros(1, hkv, d, dtype=cdt, device=dev)
            if quantized:
                wk = triton_module("quant").write_kernels(kd, vd, ks, vs, slots, static_scales)
                wk.run(kd, vd, ks, vs, slots, kn, kn, (1.0, 1.0) if static_scales else None)
            else:
                wk = triton_module("memory").write_kernels(kd, vd, slots, kn)
                wk.run(kd, vd, slots, kn, kn)
            n += 1
        if blocks:
            n += _blocks(k_cache.dtype, k_cache.shape[1:], dev)
            if quantized:  # the scales move with the blocks: [L, 2, num_blocks, Hkv]
                n += _blocks(torch.float32, k_cache.shape[2:3], dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return WarmupResult(n, time.perf_counter() - t0)


def _modes(batch_invariant) -> list[bool]:
    if batch_invariant is None or isinstance(batch_invariant, bool):
        return [resolve_invariant(batch_invariant)]
    return sorted({bool(m) for m in batch_invariant})


def _like(cache: torch.Tensor) -> torch.Tensor:
    shape = (1, *cache.shape[1:])
    return torch.empty_strided(
        shape, cache.stride(), dtype=cache.dtype, device=cache.device
    ).zero_()


def _decode(q, k, v, table, lens, sinks, softcap, modes, windows, max_seq_len, ks, vs) -> int:
    td = triton_module("decode")
    scal = td.scalars(q.shape[-1] ** -0.5, 1.0 if softcap else None, None)
    hkv = k.shape[2]
    n = 0
    for inv in modes:
        kern = td.kernels(q, k, v, table, lens, sinks, softcap, inv, None, ks, vs)
        most = 16 if inv else max(_max_splits(kern, hkv, w, max_seq_len) for w in windows)
        # Each merge variant (S_PAD), and within it split counts of every residue mod 16:
        # the partials' strides (S * D, Hq * S * D) are specialized on divisibility by 16.
        per_pad: dict[int, int] = {}
        for c in range(1, most + 1):
            pad = -1 if c == 1 and not inv else kern.s_pad(c)  # -1: the direct kernel
            if per_pad.setdefault(pad, 0) < 16:
                per_pad[pad] += 1
                splits = SplitPlan(MIN_SPLIT_TOKENS, c, inv)  # seq_len 0: no key is read
                # eager split decode merges in the split kernel; DecodePlan and the
                # invariant mode in a second kernel
                for fused in (False,) if inv or pad == -1 else (True, False):
                    kern.run(q, k, v, table, lens, sinks, scal, None, splits=splits,
                             k_scales=ks, v_scales=vs, fused=fused)  # fmt: skip
                    n += 1 if pad == -1 or fused else 2
    return n


def _max_splits(kern, hkv: int, window: int | None, max_seq_len: int | None) -> int:
    """The most splits the planner gives any batch: one row, the longest span (a split
    holds at least MIN_SPLIT_TOKENS keys, and about ``programs_per_sm`` programs per SM)."""
    want = -(-kern.programs_per_sm * _sm_count(kern.device) // hkv)
    span = max_seq_len if max_seq_len is not None else want * MIN_SPLIT_TOKENS
    if window is not None:
        span = min(span, window)
    return max(1, min(want, -(-span // MIN_SPLIT_TOKENS)))


def _blocks(dtype: torch.dtype, block_shape, dev: torch.device) -> int:
    """Copy, gather, scatter on a two-block pool [1, 2, 2, block_size, Hkv, D]: the same
    variants as on a real pool (its row strides, num_blocks x block elements, stay
    multiples of 16 when a block's elements are)."""
    tm = triton_module("memory")
    kv = torch.zeros(1, 2, 2, *block_shape, dtype=dtype, device=dev)
    first = torch.zeros(1, dtype=torch.int64, device=dev)
    tm.copy_blocks(kv, first, first + 1)
    tm.scatter_blocks(kv, first + 1, tm.gather_blocks(kv, first))
    return 3


def _prefill(q, k, v, table, sinks, softcap, ks, vs) -> int:
    tp = triton_module("prefill")
    scal = triton_module("decode").scalars(q.shape[-1] ** -0.5, 1.0 if softcap else None, None)
    cu = torch.tensor([0, 1], dtype=table.dtype, device=table.device)
    lens = torch.ones(
        1, dtype=table.dtype, device=table.device
    )  # one query over one (zero) key of block 0
    kern = tp.kernels(q, cu, k, v, table, lens, sinks, softcap, ks, vs)
    cfgs = kern.tile_configs()
    for cfg in cfgs:
        kern.run(q, cu, k, v, table, lens, sinks, scal, 1, cfg, ks, vs)
    return len(cfgs)
