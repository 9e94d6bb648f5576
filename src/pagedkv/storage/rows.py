"""Views into a block's bytes: the payload, then (quantized formats) the scales.

A row is one block as :meth:`KVPool.read_blocks` returns it, uint8 ``[bytes_per_block]``
(see :class:`~pagedkv.storage.layout.KVLayout`). The views need each row dense (any row
stride), so they work on slices of staging buffers as well as on whole row tensors.
"""

from __future__ import annotations

import torch

from pagedkv.storage.layout import KVLayout


def payload_view(rows: torch.Tensor, lay: KVLayout) -> torch.Tensor:
    """Byte rows ``[n, bytes_per_block]`` -> payloads ``[n, L, 2, bs, Hkv, D]`` of the
    layout's ``kv_dtype`` (a view)."""
    pay = rows[:, : lay.payload_bytes].view(lay.kv_dtype)
    return pay.view(rows.shape[0], lay.num_layers, 2, lay.block_size, lay.num_kv_heads, -1)


def scale_view(rows: torch.Tensor, lay: KVLayout) -> torch.Tensor:
    """Byte rows of a quantized layout -> their scales ``[n, L, 2, Hkv]`` float32 (a view;
    the payload's size is a multiple of 4 bytes, see KVLayout)."""
    sc = rows[:, lay.payload_bytes :].view(torch.float32)
    return sc.view(rows.shape[0], lay.num_layers, 2, lay.num_kv_heads)
