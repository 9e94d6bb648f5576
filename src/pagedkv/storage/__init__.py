"""Tensor storage of the paged KV cache: :class:`KVLayout` and :class:`KVPool`; format
conversion of blocks (:func:`convert_rows`, :func:`convert_blocks`)."""

from pagedkv.storage.convert import convert_blocks, convert_rows
from pagedkv.storage.layout import KVLayout
from pagedkv.storage.pool import KVPool

__all__ = ["KVLayout", "KVPool", "convert_blocks", "convert_rows"]
