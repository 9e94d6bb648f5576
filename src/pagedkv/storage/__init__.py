"""Tensor storage of the paged KV cache: :class:`KVLayout` and :class:`KVPool`; format
conversion of blocks (:func:`convert_rows`, :func:`convert_blocks`); :func:`to_device`
(a small host list on a device without a stream sync)."""

from pagedkv.storage._streams import to_device
from pagedkv.storage.convert import convert_blocks, convert_rows
from pagedkv.storage.layout import KVLayout
from pagedkv.storage.pool import KVPool

__all__ = ["KVLayout", "KVPool", "convert_blocks", "convert_rows", "to_device"]
