"""What a :class:`~pagedkv.integrations.cache.PagedCache` holds besides the cache object:
its batch rows' sequences and hooks (:class:`CacheRows`), the placeholder layers
transformers' ``Cache`` helpers read (:class:`PagedLayer`), and the pool it is made on
(:func:`make_kv_cache`, :func:`check_kv_cache`)."""

from __future__ import annotations

from typing import Any

from pagedkv._extras import optional_imports
from pagedkv.integrations.attention import PagedAttention, layer_views
from pagedkv.integrations.support import kv_geometry

with optional_imports(__name__):
    from transformers.cache_utils import CacheLayerMixin


class PagedLayer(CacheLayerMixin):
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


class CacheRows:
    """What a PagedCache holds outside the pool: its rows' sequences, its hooks, an open
    paged forward. Kept apart from the cache object so that its finalizer can release
    them without a reference to the cache."""

    def __init__(self, kv_cache: Any, paged: PagedAttention, uid: int) -> None:
        self.kv_cache = kv_cache
        self.paged = paged
        self.uid = uid
        self.lens: list[int] = []  # tokens stored per batch row
        self._sids: list[str] = []  # seq_ids(), kept
        # per-layer (k, v) views of the pool, made once rather than sliced in every layer
        self.layers = layer_views(kv_cache.pool.kv)
        self.handles: list[Any] = []
        self.in_forward = False

    def seq_id(self, row: int) -> str:
        return f"pagedcache-{self.uid}-{row}"

    def seq_ids(self) -> list[str]:
        """The sequence ids of every row (made once per batch size)."""
        if len(self._sids) != len(self.lens):
            self._sids = [self.seq_id(row) for row in range(len(self.lens))]
        return self._sids

    def fork(self, uid: int) -> CacheRows:
        """New rows (``uid``: their sequence ids) forking every sequence of these rows:
        copy-on-write, no KV copied. If a fork fails, those made are freed and the error
        raised; these rows are never changed."""
        twin = CacheRows(self.kv_cache, self.paged, uid)
        forked: list[str] = []
        try:
            for row, n in enumerate(self.lens):
                if n > 0:
                    self.kv_cache.fork(self.seq_id(row), twin.seq_id(row))
                    forked.append(twin.seq_id(row))
        except BaseException:
            for sid in forked:
                self.kv_cache.free(sid)
            raise
        twin.lens = list(self.lens)
        return twin

    def end_forward(self) -> None:
        if self.in_forward:
            self.in_forward = False
            self.paged.exit()

    def free_rows(self) -> None:
        for row, n in enumerate(self.lens):
            if n > 0:
                self.kv_cache.free(self.seq_id(row))
        self.lens = []

    def release(self) -> None:
        self.end_forward()
        for h in self.handles:
            h.remove()
        self.handles = []
        self.free_rows()


def check_kv_cache(model: Any, kv_cache: Any) -> None:
    layers, kv_heads, head_dim = kv_geometry(model.config)
    lay = kv_cache.layout
    if (lay.num_layers, lay.num_kv_heads, lay.head_dim) != (layers, kv_heads, head_dim):
        raise ValueError(
            f"kv_cache layout ({lay.num_layers} layers, {lay.num_kv_heads} KV heads, head_dim "
            f"{lay.head_dim}) does not match the model ({layers}, {kv_heads}, {head_dim})"
        )
    if kv_cache.manager.prefix_caching:
        raise ValueError(
            "PagedCache needs a KVCache with prefix_caching=False (it does not see token ids)"
        )


def make_kv_cache(model: Any, num_blocks: int | None, block_size: int, kv_dtype: Any = None):
    from pagedkv.cache import KVCache
    from pagedkv.storage import KVLayout

    layers, kv_heads, head_dim = kv_geometry(model.config)
    param = next(model.parameters())
    layout = KVLayout(layers, kv_heads, head_dim, block_size, param.dtype, kv_dtype=kv_dtype)
    if num_blocks is None:
        num_blocks = 1024
    return KVCache(layout, num_blocks, device=param.device, prefix_caching=False)
