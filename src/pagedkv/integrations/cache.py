"""PagedCache: a ``transformers.Cache`` whose K/V live in a pagedkv block pool.

Two uses:

* ``model.generate(..., past_key_values=PagedCache(model))`` for plain batched
  generation (greedy or sampling). Each batch row is one paged sequence; left padding
  is neither stored nor attended, so outputs equal those of the default cache.
* The :class:`~pagedkv.Engine` hands the model a ``PagedCache`` bound to its own
  :class:`~pagedkv.KVCache` and sets :attr:`PagedCache.step` before every forward.

``update`` does not store anything itself: it names this cache as the active metadata
source and returns k/v unchanged; the "pagedkv" attention function then writes them
into the pool and attends over the pages (see :mod:`pagedkv.integrations.attention`).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from pagedkv._extras import optional_imports
from pagedkv.integrations.attention import (
    ATTN_NAME,
    PagedAttentionMetadata,
    set_active_source,
    use_paged_attention,
)
from pagedkv.integrations.support import check_model_supported, kv_geometry

with optional_imports(__name__):
    from transformers.cache_utils import Cache, CacheLayerMixin

_uids = itertools.count()


class _PagedLayer(CacheLayerMixin):
    """Placeholder layer: lets transformers' Cache helpers (is_sliding, ...) work."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass


class PagedCache(Cache):
    """A transformers ``Cache`` backed by a paged :class:`pagedkv.KVCache`.

    ``PagedCache(model, num_blocks=None, block_size=16)`` checks the model is supported,
    switches it to attn_implementation "pagedkv" and allocates a pool on the model's
    device and dtype (``num_blocks`` defaults to 1024; the pool does not grow, so size
    it for batch x ceil((prompt + new tokens) / block_size)). Raises
    :class:`~pagedkv.errors.UnsupportedModelError` for unsupported models and
    ``NotImplementedError`` for beam search (``num_beams > 1``), which needs cache
    reordering. Call :meth:`reset` (or drop the object) to release the blocks.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        num_blocks: int | None = None,
        block_size: int = 16,
        kv_cache: Any = None,
        num_layers: int | None = None,
    ) -> None:
        if kv_cache is None:
            if model is None:
                raise ValueError("PagedCache needs a model (or an existing kv_cache)")
            check_model_supported(model)
            use_paged_attention(model)
            kv_cache = _make_kv_cache(model, num_blocks, block_size)
            num_layers = model.config.num_hidden_layers
        elif num_layers is None:
            num_layers = kv_cache.layout.num_layers
        super().__init__(layers=[_PagedLayer() for _ in range(num_layers)])
        self.kv_cache = kv_cache
        #: Engine mode: metadata of the current forward, set by the engine.
        self.step: PagedAttentionMetadata | None = None
        self._uid = next(_uids)
        self._seen = 0  # columns (padding included) processed so far, generate mode
        self._lens: list[int] = []  # tokens stored per batch row
        self._meta: PagedAttentionMetadata | None = None

    # -- what transformers calls ------------------------------------------------------
    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Name this cache as the active metadata source; k/v are written by the
        attention function (it knows which rows are padding)."""
        if layer_idx == 0 and self.step is None:
            self._meta = None
            self._seen += key_states.shape[-2]
        set_active_source(self)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns processed so far (generate mode; 0 in engine mode)."""
        return 0 if self.step is not None else self._seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    def reset(self) -> None:
        """Free every sequence's blocks; the cache can be used for a new generate()."""
        for b in range(len(self._lens)):
            if self._lens[b] > 0:
                self.kv_cache.free(self._seq_id(b))
        self._lens, self._seen, self._meta = [], 0, None

    def _unsupported(self, what: str):
        raise NotImplementedError(
            f"PagedCache does not support {what} (beam search / num_beams > 1, "
            "contrastive or assisted decoding); use greedy or sampling, or the default cache"
        )

    def reorder_cache(self, beam_idx) -> None:
        self._unsupported("reordering the batch")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported("repeating batch rows")

    def batch_select_indices(self, indices) -> None:
        self._unsupported("selecting batch rows")

    def crop(self, max_length: int) -> None:
        self._unsupported("cropping")

    # -- metadata for the attention function ----------------------------------------
    def _seq_id(self, row: int) -> str:
        return f"pagedcache-{self._uid}-{row}"

    def attention_metadata(
        self, attention_mask: Any, batch_size: int, q_len: int, device: torch.device
    ) -> PagedAttentionMetadata:
        """Metadata of the current forward (engine mode: :attr:`step`)."""
        if self.step is not None:
            return self.step
        if self._meta is None:
            self._meta = self._build(attention_mask, batch_size, q_len, device)
        return self._meta

    def _build(self, attention_mask, bsz: int, q_len: int, device) -> PagedAttentionMetadata:
        if not self._lens:
            self._lens = [0] * bsz
        elif len(self._lens) != bsz:
            self._unsupported(f"a batch size change ({len(self._lens)} -> {bsz})")
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            real = attention_mask[:, -q_len:].to(torch.bool)
            counts = real.sum(1).tolist()
            token_index = None if all(c == q_len for c in counts) else real.flatten().nonzero()
            if token_index is not None:
                token_index = token_index.squeeze(1)
        else:
            counts, token_index = [q_len] * bsz, None
        cache = self.kv_cache
        slots: list[int] = []
        for b, n in enumerate(counts):
            if n == 0:
                continue
            sid, before = self._seq_id(b), self._lens[b]
            # Token ids are unknown here (the attention sees hidden states only), and
            # this pool has prefix caching off, so placeholder ids are harmless.
            if before == 0:
                cache.allocate(sid, [0] * n)
            else:
                cache.append(sid, [0] * n)
            slots.extend(cache.slot_mapping(sid, before, before + n))
            self._lens[b] = before + n
        tables = [cache.block_table(self._seq_id(b)) if n else [] for b, n in enumerate(self._lens)]
        width = max(1, max(len(t) for t in tables))
        table_rows = [t + [0] * (width - len(t)) for t in tables]
        cu = [0, *itertools.accumulate(counts)]
        return PagedAttentionMetadata(
            kv=cache.pool.kv,
            slots=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=torch.tensor(table_rows, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(self._lens, dtype=torch.int32, device=device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            max_q_len=max(counts) if counts else 0,
            is_decode=q_len == 1 and all(c == 1 for c in counts),
            token_index=token_index,
        )


def _make_kv_cache(model: Any, num_blocks: int | None, block_size: int):
    from pagedkv.cache import KVCache
    from pagedkv.storage import KVLayout

    layers, kv_heads, head_dim = kv_geometry(model.config)
    param = next(model.parameters())
    layout = KVLayout(layers, kv_heads, head_dim, block_size, param.dtype)
    if num_blocks is None:
        num_blocks = 1024
    return KVCache(layout, num_blocks, device=param.device, prefix_caching=False)


__all__ = ["ATTN_NAME", "PagedCache"]
