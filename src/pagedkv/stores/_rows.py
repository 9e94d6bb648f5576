"""Rows: ``uint8 [n, w]`` buffers of whole values, checked and copied in bulk.

Stores that move blocks as rows (MemoryStore's slab, the file stores reading into
caller rows, FramedStore) check their arguments here and copy with as few torch
calls as the devices allow. torch is imported on first use: ``import pagedkv.stores``
stays free of it (the CLI and the model loader's file helpers import the package).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def tensor_rows(t: object, n: int, who: str, name: str) -> torch.Tensor:
    """``t`` if it is a ``uint8 [n, w]`` tensor; else ``ValueError`` naming ``who``."""
    import torch

    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 2:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{who}: {name} must be a uint8 tensor [n, w], got {got}")
    if t.shape[0] != n:
        raise ValueError(f"{who}: {name} has {t.shape[0]} rows for {n} keys")
    return t


def byte_rows(x: torch.Tensor | np.ndarray, n: int, name: str, who: str) -> np.ndarray:
    """``x`` (a tensor or array) as a numpy ``uint8 [n, w]`` view with contiguous rows.

    Raises ``ValueError`` naming ``who`` (the calling method) and ``name`` otherwise.
    """
    rows = x.numpy() if hasattr(x, "numpy") else x
    if (
        getattr(rows, "dtype", None) != np.uint8
        or rows.ndim != 2
        or rows.shape[0] != n
        or (rows.shape[1] > 1 and rows.strides[1] != 1)
    ):
        raise ValueError(
            f"{who}: {name} must be uint8 [{n}, w] with contiguous rows, "
            f"got {getattr(rows, 'dtype', type(x).__name__)} {getattr(rows, 'shape', '')}"
        )
    return rows


def _wide(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View two uint8 ``[n, w]`` tensors as the widest integer type both allow (else as is)."""
    import torch

    for dtype in (torch.int64, torch.int32, torch.int16):
        try:
            return a.view(dtype), b.view(dtype)
        except RuntimeError:
            continue
    return a, b


def copy_rows(
    dst: torch.Tensor, dst_idx: list[int], src: torch.Tensor, src_idx: list[int], non_blocking: bool
) -> None:
    """``dst[dst_idx[j]] = src[src_idx[j]]`` for every j, as few copies as the devices allow."""
    import torch

    if dst.device.type == "cpu" and src.device.type == "cpu":
        dst, src = _wide(dst, src if src.is_contiguous() else src.contiguous())
        s_idx = torch.tensor(src_idx, dtype=torch.long)
        if dst_idx == list(range(dst.shape[0])) and dst.is_contiguous():
            torch.index_select(src, 0, s_idx, out=dst)
        else:
            whole = src_idx == list(range(src.shape[0]))
            rows = src if whole else src.index_select(0, s_idx)
            dst.index_copy_(0, torch.tensor(dst_idx, dtype=torch.long), rows)
        return
    # Across devices: a gather would stage through pageable memory; runs of
    # consecutive rows copy straight between the pinned slab and the device instead.
    start = 0
    for j in range(1, len(dst_idx) + 1):
        if (
            j == len(dst_idx)
            or dst_idx[j] != dst_idx[j - 1] + 1
            or src_idx[j] != src_idx[j - 1] + 1
        ):
            d, s, n = dst_idx[start], src_idx[start], j - start
            dst[d : d + n].copy_(src[s : s + n], non_blocking=non_blocking)
            start = j
