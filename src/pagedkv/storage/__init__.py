"""Tensor storage of the paged KV cache: :class:`KVLayout` and :class:`KVPool`."""

from pagedkv.storage.layout import KVLayout
from pagedkv.storage.pool import KVPool

__all__ = ["KVLayout", "KVPool"]
