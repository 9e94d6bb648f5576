"""The paged attention of one layer as a torch custom op, for compiled forwards.

:func:`attend` is the paged path's device work for one layer: write the new K/V into
the pool, then attend (``cascade_decode``, ``decode_attention`` or ``prefill_attention``).
The eager path (:func:`pagedkv.integrations.attention.paged_attention_forward`) calls it
directly. Under ``torch.compile`` the same call goes through the custom op
``torch.ops.pagedkv.paged_attention``, which Dynamo records as one opaque node (its fake
implementation gives the output's shape), so the whole forward is traced as one graph:
no graph break at each layer, and inductor fuses the norms, RoPE, SiLU-and-mul and
residual adds around it.

The op takes tensors and plain scalars only: the query/key/value rows, the whole pool
``kv`` (and its ``kv_scales``), both declared mutated (the K/V write), the step's
metadata tensors, and the layer index and features as ints/floats. Passing the pool
whole (not per-layer views of it) keeps the graph free of aliased mutated inputs. The
one non-tensor piece, a cascade plan (Python launch parameters over device buffers), is
not an argument: the op gets ``cascade=True`` and reads the plan the running forward set
with :func:`forward_plan` (:class:`~pagedkv.integrations.attention.PagedAttention` sets
it around each forward). At replay of a CUDA graph nothing of this runs: the kernels
read the static buffers they were captured with.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from pagedkv import ops

__all__ = ["attend", "forward_plan", "paged_attention_op"]

# The cascade plan of the forward running now (None: none, or not a paged forward).
_PLAN: contextvars.ContextVar[ops.CascadePlan | None] = contextvars.ContextVar(
    "pagedkv_cascade_plan", default=None
)


@contextlib.contextmanager
def forward_plan(plan: ops.CascadePlan | None) -> Iterator[None]:
    """Make ``plan`` the cascade plan the op reads for the duration of one forward."""
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


def attend(q, k, v, k_cache, v_cache, ks, vs, static, slots, block_tables, seq_lens, cu_seqlens_q,
           max_q_len, is_decode, plan, scaling, window, softcap, sinks):  # fmt: skip
    """Write k, v ([T, Hkv, D], already in the cache's dtype unless it is quantized) at
    ``slots`` and return the attention of q [T, Hq, D] over the pages: [T, Hq, D]
    (``ks``/``vs``: the layer's scales of a quantized pool, ``static`` its static ones)."""
    ops.write_kv(
        k_cache, v_cache, slots, k, v, k_scales=ks, v_scales=vs, static_scales=static,
        check=False,
    )  # fmt: skip
    plain = window is None and softcap is None and sinks is None and ks is None
    if is_decode and plan is not None and plain and q.dtype == k_cache.dtype:
        return ops.cascade_decode(
            q, k_cache, v_cache, block_tables, seq_lens, plan, scaling, check=False
        )
    feats = dict(window=window, softcap=softcap, sinks=sinks, k_scales=ks, v_scales=vs,
                 check=False)  # fmt: skip
    if is_decode:
        return ops.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scaling, **feats)
    return ops.prefill_attention(
        q, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens, scaling,
        max_q_len=max_q_len, **feats,
    )  # fmt: skip


# The schema spelled out (not inferred from the annotations): the same on every torch
# version (older ones read `X | None` string annotations differently).
_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor(a!) kv, Tensor(b!)? kv_scales, Tensor slots, "
    "Tensor block_tables, Tensor seq_lens, Tensor cu_seqlens_q, Tensor? sinks, int layer, "
    "float? scaling, int? window, float? softcap, float? k_scale, float? v_scale, "
    "SymInt max_q_len, bool is_decode, bool cascade) -> Tensor"
)


@torch.library.custom_op(
    "pagedkv::paged_attention", mutates_args=("kv", "kv_scales"), schema=_SCHEMA
)
def paged_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: torch.Tensor,
    kv_scales: torch.Tensor | None,
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    sinks: torch.Tensor | None,
    layer: int,
    scaling: float | None,
    window: int | None,
    softcap: float | None,
    k_scale: float | None,
    v_scale: float | None,
    max_q_len: int,
    is_decode: bool,
    cascade: bool,
) -> torch.Tensor:
    """One layer's paged attention (see :func:`attend`): q [T, Hq, D], k, v [T, Hkv, D];
    ``kv`` the pool ``[num_layers, 2, num_blocks, block_size, Hkv, D]`` (written);
    ``kv_scales`` its scales when quantized (written); ``k_scale``/``v_scale`` the layer's
    static scales (both or neither); ``cascade``: use the plan set by
    :func:`forward_plan`. Returns [T, Hq, D] in q's dtype."""
    ks = vs = None
    if kv_scales is not None:
        ks, vs = kv_scales[layer, 0], kv_scales[layer, 1]
    static = None if k_scale is None or v_scale is None else (k_scale, v_scale)
    plan = _PLAN.get() if cascade else None
    if cascade and plan is None:
        raise RuntimeError(
            "pagedkv::paged_attention was called with cascade=True outside a forward that "
            "set a plan (run it through PagedAttention)"
        )
    return attend(
        q, k, v, kv[layer, 0], kv[layer, 1], ks, vs, static, slots, block_tables, seq_lens,
        cu_seqlens_q, max_q_len, is_decode, plan, scaling, window, softcap, sinks,
    )  # fmt: skip


@paged_attention_op.register_fake
def _(q, k, v, kv, kv_scales, slots, block_tables, seq_lens, cu_seqlens_q, sinks, layer,
      scaling, window, softcap, k_scale, v_scale, max_q_len, is_decode, cascade):  # fmt: skip
    return q.new_empty(q.shape)  # the kernels' output: a new contiguous tensor
