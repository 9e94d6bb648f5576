"""The "pagedkv" attention and mask functions registered with transformers.

The model's own attention module computes q/k/v (projections, RoPE, bias) and hands
them to :func:`paged_attention_forward`, which writes the new K/V into the pool and
reads every key/value directly from the pages through :mod:`pagedkv.ops`
(``paged_prefill`` for packed ragged chunks, ``paged_decode`` for one token per
sequence). Nothing is gathered into contiguous K/V tensors.

The per-forward metadata (slots, block tables, lengths, cu_seqlens) comes from a
:class:`PagedAttentionMetadata` passed as the ``pagedkv_metadata`` model kwarg, or
from the :class:`~pagedkv.integrations.cache.PagedCache` the model calls ``update`` on
just before each attention call (it names itself in a ``ContextVar``, so nothing
global has to be reset between models, threads or tests).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pagedkv import ops

ATTN_NAME = "pagedkv"


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
    """

    kv: torch.Tensor
    slots: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_q_len: int
    is_decode: bool
    token_index: torch.Tensor | None = None


class MetadataSource(Protocol):
    """What the attention function asks for the metadata of the current forward."""

    def attention_metadata(
        self, attention_mask: Any, batch_size: int, q_len: int, device: torch.device
    ) -> PagedAttentionMetadata: ...


_ACTIVE: ContextVar[MetadataSource | None] = ContextVar("pagedkv_active_cache", default=None)


def set_active_source(source: MetadataSource) -> None:
    """Name the cache whose metadata the next attention calls use (PagedCache.update)."""
    _ACTIVE.set(source)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    pagedkv_metadata: PagedAttentionMetadata | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function over the paged KV pool.

    query: [B, Hq, L, D]; key, value: [B, Hkv, L, D] (RoPE applied). Returns
    ``([B, L, Hq, D], None)`` like transformers' own attention functions.
    """
    bsz, hq, q_len, d = query.shape
    meta = pagedkv_metadata
    if meta is None:
        source = _ACTIVE.get()
        _ACTIVE.set(None)  # consumed: a later forward without the cache must not reuse it
        if source is None:
            raise RuntimeError(
                "attn_implementation='pagedkv' needs a paged KV cache: pass "
                "past_key_values=PagedCache(...) to generate()/forward, or run the model "
                "through pagedkv.Engine"
            )
        meta = source.attention_metadata(attention_mask, bsz, q_len, query.device)
    layer = module.layer_idx
    hkv = key.shape[1]
    # [B, H, L, D] -> [B*L, H, D]: token-major rows, as the ops expect.
    q = query.transpose(1, 2).reshape(bsz * q_len, hq, d)
    k = key.transpose(1, 2).reshape(bsz * q_len, hkv, d)
    v = value.transpose(1, 2).reshape(bsz * q_len, hkv, d)
    if meta.token_index is not None:
        q, k, v = q[meta.token_index], k[meta.token_index], v[meta.token_index]
    k_cache, v_cache = meta.kv[layer, 0], meta.kv[layer, 1]
    if k.dtype != k_cache.dtype:
        k, v = k.to(k_cache.dtype), v.to(k_cache.dtype)
    ops.write_kv(k_cache, v_cache, meta.slots, k, v, check=False)
    if meta.is_decode:
        out = ops.decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scaling, check=False
        )
    else:
        out = ops.prefill_attention(
            q, meta.cu_seqlens_q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scaling,
            max_q_len=meta.max_q_len, check=False,
        )  # fmt: skip
    if meta.token_index is not None:
        full = out.new_zeros(bsz * q_len, hq, d)
        full[meta.token_index] = out
        out = full
    return out.view(bsz, q_len, hq, d), None


def paged_mask(
    batch_size: int = 1,
    q_length: int = 1,
    kv_length: int = 1,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask function registered for "pagedkv".

    Causality is enforced by the paged kernels themselves (each query row sees the
    keys at positions <= its own), so no 4D mask is built. What the kernels cannot
    know is padding: the 2D padding mask ``[B, kv_length]`` (True = real token) is
    passed through, or ``None`` when there is no padding.
    """
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    if mask.shape[-1] != kv_length:
        mask = mask[..., -kv_length:]
    return mask


def register() -> str:
    """Register the "pagedkv" attention and mask functions with transformers.

    Idempotent. Returns the name to use with ``model.set_attn_implementation`` or
    ``config._attn_implementation``.
    """
    from transformers import AttentionInterface

    try:
        from transformers import AttentionMaskInterface
    except ImportError:  # older 5.x exports it only from masking_utils
        from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, paged_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, paged_mask)
    return ATTN_NAME


def use_paged_attention(model: torch.nn.Module) -> None:
    """Register the functions and switch ``model`` to attn_implementation "pagedkv"."""
    name = register()
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError, KeyError):
        model.config._attn_implementation = name
