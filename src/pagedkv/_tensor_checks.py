"""Argument checks over tensors shared by :mod:`pagedkv.storage` and :mod:`pagedkv.ops`.

The torch counterpart of :mod:`pagedkv._validate` (which stays torch-free for the
block manager). Each check raises ``TypeError`` for a wrong type or dtype and
``ValueError`` for a wrong shape or value, naming the argument, before anything runs.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

#: Dtypes accepted for block ids, slots and lengths.
INDEX_DTYPES = (torch.int32, torch.int64)


def tensor(x: object, name: str) -> torch.Tensor:
    """``x`` if it is a ``torch.Tensor``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def block_ids(
    ids: object, num_blocks: int, device: torch.device, name: str = "block_ids"
) -> torch.Tensor:
    """A list / 1-D int tensor of block ids as an int64 tensor on ``device``, each in
    ``[0, num_blocks)`` (checking the range reads the values: one sync on CUDA)."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype not in INDEX_DTYPES:
            raise TypeError(f"{name} must be an int32 or int64 tensor, got {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
        t = ids.to(device=device, dtype=torch.int64).contiguous()
    else:
        if not isinstance(ids, Iterable):
            raise TypeError(
                f"{name} must be a sequence of ints or an int tensor, got {type(ids).__name__}"
            )
        try:
            t = torch.as_tensor(list(ids), dtype=torch.int64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be a sequence of ints or an int tensor: {e}") from None
        t = t.to(device)
    if t.numel():
        lo, hi = torch.stack([t.min(), t.max()]).tolist()
        if lo < 0 or hi >= num_blocks:
            raise ValueError(
                f"{name} out of range: ids must lie in [0, {num_blocks}), got min {lo}, max {hi}"
            )
    return t
