"""The "pagedkv" attention function, and how one forward of a model is run on it.

The model's own attention module computes q/k/v (projections, RoPE, bias) and hands
them to :func:`paged_attention_forward`, which writes the new K/V into the pool and
reads every key/value directly from the pages through :mod:`pagedkv.ops`
(``paged_prefill`` for packed ragged chunks, ``paged_decode`` for one token per
sequence). Nothing is gathered into contiguous K/V tensors. Under ``torch.compile`` the
same work is one call of the custom op ``pagedkv::paged_attention``
(:mod:`.attention_op`), so a compiled forward is one graph, with no break per layer.

Nothing is left switched on the user's model. transformers picks the attention function
from ``config._attn_implementation`` at every layer call, so :class:`PagedAttention`
switches it to "pagedkv" for the duration of one forward only (exception-safe,
re-entrant, restored exactly: :mod:`.attention_switch`) and the forward carries its
:class:`PagedAttentionMetadata` as the ``pagedkv_metadata`` model kwarg, which
transformers hands on to every attention call. The "pagedkv" functions run the paged
path only when that kwarg is present; otherwise (a plain forward on a model whose
config says "pagedkv": set by hand, or another thread's forward while a paged one
runs) they delegate to the implementation the model had before ("sdpa" if unknown).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from pagedkv import ops
from pagedkv.integrations.attention_op import attend, forward_plan, paged_attention_op
from pagedkv.integrations.attention_switch import (
    ATTN_NAME,
    DEFAULT_FALLBACK,
    attention_configs,
    fallback_attention,
    fallback_implementation,
    paged_mask,
    switch_off,
    switch_on,
)

__all__ = [
    "ATTN_NAME",
    "DEFAULT_FALLBACK",
    "PagedAttention",
    "PagedAttentionMetadata",
    "cache_kwarg",
    "fallback_implementation",
    "forward_params",
    "layer_views",
    "paged_attention_forward",
    "paged_mask",
    "register",
]


@dataclass
class PagedAttentionMetadata:
    """Everything one forward pass needs to read and write the paged KV cache.

    ``kv``: the pool tensor ``[num_layers, 2, num_blocks, block_size, Hkv, D]``.
    ``slots``: [T] int64, where each new token's K/V goes (``-1`` skips it).
    ``block_tables``: [B, W] int32; ``seq_lens``: [B] int32, tokens in the cache per
    sequence *after* this step's write; ``cu_seqlens_q``: [B+1] int32, sequence b owns
    query rows ``cu[b]:cu[b+1]``; ``max_q_len``: the longest of those.
    ``is_decode``: every sequence has exactly one new token (``paged_decode``).
    ``token_index``: None when the model input is the packed ``[1, T]`` sequence;
    otherwise the rows of the flattened ``[B * L]`` input that are real tokens (the
    others are padding, neither written nor attended).
    ``kv_scales``: a quantized (fp8 / int8) pool's scales ``[num_layers, 2, num_blocks,
    Hkv]`` float32 (``pool.scales``), None otherwise; ``static_kv_scales``: per layer
    ``(k_scale, v_scale)`` of a static-scale pool (``pool.layout.static_scales``).
    ``cascade``: a decode :class:`~pagedkv.ops.CascadePlan` of this batch (rows sharing
    cached prefix blocks): full-attention layers without softcap or sinks then run
    :func:`pagedkv.ops.cascade_decode`, the others plain decode.
    ``layers``: per layer, its ``(k_cache, v_cache)`` views of ``kv`` (made once by the
    caller; None: sliced from ``kv`` at each call).
    """

    kv: torch.Tensor
    slots: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_q_len: int
    is_decode: bool
    token_index: torch.Tensor | None = None
    kv_scales: torch.Tensor | None = None
    static_kv_scales: tuple[tuple[float, float], ...] | None = None
    cascade: ops.CascadePlan | None = None
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None


def layer_views(kv: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(k_cache, v_cache)`` of every layer of a pool tensor ``kv``, for
    :attr:`PagedAttentionMetadata.layers` (views: made once, valid while ``kv`` lives)."""
    return [(kv[layer, 0], kv[layer, 1]) for layer in range(kv.shape[0])]


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    pagedkv_metadata: PagedAttentionMetadata | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """transformers attention function over the paged KV pool.

    query: [B, Hq, L, D]; key, value: [B, Hkv, L, D] (RoPE applied). Returns
    ``([B, L, Hq, D], None)`` like transformers' own attention functions. Without
    ``pagedkv_metadata`` (not a paged forward) the call goes to the fallback attention.
    ``attention_mask`` and ``dropout`` are ignored on the paged path: the kernels mask
    causally per sequence from the metadata, and paged forwards are inference only.

    The layer's features arrive as the kwargs transformers' attention modules pass:
    ``scaling`` (e.g. Gemma's ``query_pre_attn_scalar ** -0.5``, Granite's
    ``attention_multiplier``), ``sliding_window`` (tokens: transformers' masks let the
    query at p see keys in ``(p - sliding_window, p]``, the ops' ``window``),
    ``softcap`` (Gemma 2's ``attn_logit_softcapping``) and ``s_aux`` / ``sinks``
    (gpt-oss's per-head sink logits [Hq]).
    """
    meta = pagedkv_metadata
    if meta is not None and torch.compiler.is_compiling():
        # under torch.compile (EngineConfig.torch_compile) the layer's device work is one
        # custom op (.attention_op): Dynamo traces the whole forward as one graph
        return _paged(
            module, query, key, value, attention_mask, meta, scaling, sliding_window, softcap,
            s_aux, kwargs, traced=True,
        )  # fmt: skip
    if meta is None:
        fallback = fallback_attention(module)
        feats = {
            k: v
            for k, v in (("sliding_window", sliding_window), ("softcap", softcap), ("s_aux", s_aux))
            if v is not None
        }
        return fallback(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
            **feats, **kwargs,
        )  # fmt: skip
    return _paged(
        module, query, key, value, attention_mask, meta, scaling, sliding_window, softcap, s_aux,
        kwargs,
    )  # fmt: skip


def _paged(module, query, key, value, attention_mask, meta, scaling, sliding_window, softcap,
           s_aux, kwargs, traced=False):  # fmt: skip
    sinks = s_aux if s_aux is not None else kwargs.get("sinks")
    _refuse_unknown_features(module, query, key, value, attention_mask, kwargs)
    bsz, hq, q_len, d = query.shape
    layer = module.layer_idx
    hkv = key.shape[1]
    # [B, H, L, D] -> [B*L, H, D]: token-major rows, as the ops expect. The pool never
    # joins an autograd graph (a forward run with grad enabled must not make it one).
    q = query.transpose(1, 2).reshape(bsz * q_len, hq, d)
    k = key.detach().transpose(1, 2).reshape(bsz * q_len, hkv, d)
    v = value.detach().transpose(1, 2).reshape(bsz * q_len, hkv, d)
    if meta.token_index is not None:
        q, k, v = q[meta.token_index], k[meta.token_index], v[meta.token_index]
    if meta.kv_scales is None and k.dtype != meta.kv.dtype:
        # (a quantized pool: write_kv quantizes k, v as they are)
        k, v = k.to(meta.kv.dtype), v.to(meta.kv.dtype)
    if sinks is not None:
        sinks = sinks.detach()
        if sinks.dtype not in (torch.float32, q.dtype):
            sinks = sinks.float()
    static = None
    if meta.kv_scales is not None and meta.static_kv_scales is not None:
        static = meta.static_kv_scales[layer]
    if traced:  # the pool whole and the metadata's tensors; the plan through forward_plan
        k_scale, v_scale = static if static is not None else (None, None)
        out = paged_attention_op(
            q, k, v, meta.kv, meta.kv_scales, meta.slots, meta.block_tables, meta.seq_lens,
            meta.cu_seqlens_q, sinks, layer, scaling, sliding_window, softcap, k_scale,
            v_scale, meta.max_q_len, meta.is_decode, meta.cascade is not None,
        )  # fmt: skip
    else:
        if meta.layers is not None:
            k_cache, v_cache = meta.layers[layer]
        else:
            k_cache, v_cache = meta.kv[layer, 0], meta.kv[layer, 1]
        ks = vs = None
        if meta.kv_scales is not None:
            ks, vs = meta.kv_scales[layer, 0], meta.kv_scales[layer, 1]
        out = attend(
            q, k, v, k_cache, v_cache, ks, vs, static, meta.slots, meta.block_tables,
            meta.seq_lens, meta.cu_seqlens_q, meta.max_q_len, meta.is_decode, meta.cascade,
            scaling, sliding_window, softcap, sinks,
        )  # fmt: skip
    if meta.token_index is not None:
        full = out.new_zeros(bsz * q_len, hq, d)
        full[meta.token_index] = out
        out = full
    return out.view(bsz, q_len, hq, d), None


# Attention kwargs that change what a layer computes in ways the paged kernels do not
# implement: a call carrying one (not None) is refused rather than silently ignored.
_UNSUPPORTED_KWARGS = {
    "position_bias": "an additive position bias (T5-style relative attention)",
    "indices": "sparse attention over selected key indices",
    "block_indices": "block-sparse attention",
}


_GUARDED_KWARGS = frozenset({*_UNSUPPORTED_KWARGS, "is_causal"})


def _refuse_unknown_features(module, query, key, value, attention_mask, kwargs: dict) -> None:
    """Fail loudly (not silently wrong) on a layer the paged path cannot compute. Runs at
    every layer call, so the usual case is one cheap test (~1 µs)."""
    d = query.shape[-1]
    if (
        _GUARDED_KWARGS.isdisjoint(kwargs)
        and (attention_mask is None or (type(attention_mask) is torch.Tensor
                                        and not attention_mask.numel()))
        and key.shape[-1] == d
        and value.shape[-1] == d
        and type(getattr(module, "layer_idx", None)) is int
        and getattr(module, "is_causal", True) is not False
    ):  # fmt: skip
        return
    from pagedkv.errors import UnsupportedModelError

    name = type(module).__name__
    for kw, feature in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(kw) is not None:
            raise UnsupportedModelError(f"{name} uses {feature}: not supported by pagedkv")
    if kwargs.get("is_causal", True) is False or getattr(module, "is_causal", True) is False:
        raise UnsupportedModelError(f"{name} is bidirectional (non-causal): not supported")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.numel():
        raise UnsupportedModelError(
            f"{name} builds an attention mask of its own (e.g. a dynamic mask): the paged "
            "kernels mask causally by position only"
        )
    if not isinstance(getattr(module, "layer_idx", None), int):
        raise UnsupportedModelError(f"{name} has no layer_idx: pagedkv cannot tell its KV layer")
    if key.shape[-1] != d or value.shape[-1] != d:
        raise UnsupportedModelError(
            f"{name} has query/key/value head dims {d}/{key.shape[-1]}/{value.shape[-1]}: "
            "pagedkv needs one head_dim (multi-latent attention is refused)"
        )


def register() -> str:
    """Register the "pagedkv" attention and mask functions with transformers.

    Idempotent; returns the name. Registering changes no model: a model runs on the
    paged path only inside :class:`PagedAttention` forwards (the engine's and
    :class:`~pagedkv.integrations.cache.PagedCache`'s).
    """
    from transformers import AttentionInterface

    try:
        from transformers import AttentionMaskInterface
    except ImportError:  # older 5.x exports it only from masking_utils
        from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, paged_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, paged_mask)
    return ATTN_NAME


class PagedAttention:
    """Runs forwards of one transformers model on the "pagedkv" attention.

    ``with paged:`` (or :meth:`enter` / :meth:`exit`) switches the model's
    ``_attn_implementation`` to "pagedkv" and, if the model is in training mode, its
    modules to eval; leaving restores both exactly, also on error. :meth:`__call__`
    runs one whole paged forward. The model is never left changed between forwards, so
    it keeps working with plain transformers and a later ``set_attn_implementation``
    by the user cannot reach a paged forward.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        register()
        self.model = model
        self._configs = attention_configs(model)
        self._no_mask: dict[torch.device, torch.Tensor] = {}
        self._flipped: list[list[torch.nn.Module]] = []  # per open scope

    def no_mask(self, device: torch.device) -> torch.Tensor:
        """The ``attention_mask`` a paged forward passes: an empty 4D tensor, which
        transformers takes as a prepared mask (so it builds none), and which fails loudly
        in any attention function other than the paged one."""
        mask = self._no_mask.get(device)
        if mask is None:
            mask = self._no_mask[device] = torch.empty(
                (0, 0, 0, 0), dtype=torch.bool, device=device
            )
        return mask

    def enter(self) -> None:
        """Switch the model to the paged attention (pair every call with :meth:`exit`)."""
        switch_on(self._configs)
        flipped: list[torch.nn.Module] = []
        if self.model.training:  # paged forwards are inference: no dropout, no checkpointing
            flipped = [m for m in self.model.modules() if m.training]
            for m in flipped:
                m.training = False
        self._flipped.append(flipped)

    def exit(self) -> None:
        """Undo the matching :meth:`enter` (the last one out restores the config)."""
        for m in self._flipped.pop() if self._flipped else ():
            m.training = True
        switch_off(self._configs)

    def __enter__(self) -> PagedAttention:
        self.enter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.exit()

    def __call__(
        self,
        meta: PagedAttentionMetadata,
        input_ids: torch.Tensor,
        *,
        forward: Callable[..., Any] | None = None,
        **kwargs: Any,
    ):
        """One paged forward: ``model(input_ids, **kwargs)`` with the metadata, no
        transformers cache (the pool is the cache) and no mask built. ``forward``: what
        to call instead of the model (e.g. ``torch.compile(model.forward)``)."""
        plan = forward_plan(meta.cascade) if meta.cascade is not None else _NO_PLAN
        with self, plan:
            return (forward or self.model)(
                input_ids=input_ids,
                attention_mask=self.no_mask(input_ids.device),
                use_cache=False,
                pagedkv_metadata=meta,
                **kwargs,
            )


_NO_PLAN = contextlib.nullcontext()


def cache_kwarg(model: Any) -> str:
    """The name the installed transformers gives the cache argument of ``model``'s
    ``forward`` and ``generate``: ``"cache"`` (5.24+), else ``"past_key_values"`` (the
    old name, deprecated from 5.24). Looked up once per model class."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def forward_params(model: Any) -> tuple[str, ...]:
    """The parameter names of ``model.forward`` after ``self``, in order (what positional
    arguments of a forward call bind to); looked up once per model class."""
    cls: type = type(model)
    return _forward_params(cls)


# `type`, not type[Module]: mypy does not take a class object for Hashable (it reads the
# instances' __hash__), and functools.cache requires that of its arguments
@functools.cache
def _forward_params(cls: type) -> tuple[str, ...]:
    forward = cast("type[torch.nn.Module]", cls).forward
    return tuple(inspect.signature(forward).parameters)[1:]
