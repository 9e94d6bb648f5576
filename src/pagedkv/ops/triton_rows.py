"""Batch-invariant row reductions for CUDA: sum / mean, softmax / log-softmax, cumsum over
the last dim of a contiguous [R, N] tensor, one Triton program per row.

A row is read in slices of BLOCK elements, slice 0 first; lane j accumulates elements
j, j + BLOCK, j + 2 * BLOCK, ... in float32, and the BLOCK lanes are reduced at the end by
one ``tl.sum`` (a tree fixed by BLOCK and the warp count). BLOCK is a constant — not a
function of N, nor of R — so a row's bits depend on its own values only: not on how many
rows share the call, nor where the row is, nor on zeros appended after it (a masked key,
a padding column adds 0 to a lane, exactly). torch's CUDA reductions pick their thread
layout and split factor from the number of rows, which is why they are not used here.
"""

from __future__ import annotations

import torch

from pagedkv._extras import optional_imports

with optional_imports(__name__):
    import triton
    import triton.language as tl

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _sum_kernel(X, Out, N, stride_x, divisor, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        x = tl.load(X + row * stride_x + start + offs, mask=start + offs < N, other=0.0)
        acc += x.to(tl.float32)
    total = tl.sum(acc, axis=0) / divisor
    tl.store(Out + row, total.to(Out.dtype.element_ty))


@triton.jit
def _softmax_kernel(X, Out, N, stride_x, stride_o, LOG: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row = X + row * stride_x
    o_row = Out + row * stride_o
    top = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for start in range(0, N, BLOCK):
        x = tl.load(x_row + start + offs, mask=start + offs < N, other=float("-inf"))
        top = tl.maximum(top, x.to(tl.float32))
    m = tl.max(top, axis=0)  # exact in any order
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        mask = start + offs < N
        x = tl.load(x_row + start + offs, mask=mask, other=float("-inf")).to(tl.float32)
        acc += tl.where(mask, tl.exp(x - m), 0.0)
    s = tl.sum(acc, axis=0)
    log_s = tl.log(s)
    for start in range(0, N, BLOCK):
        mask = start + offs < N
        x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            y = x - m - log_s
        else:
            y = tl.exp(x - m) / s
        tl.store(o_row + start + offs, y.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _cumsum_kernel(X, Out, N, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    carry = tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0)
    for start in range(0, N, BLOCK):
        mask = start + offs < N
        x = tl.load(X + row * stride_x + start + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.cumsum(x, axis=0) + carry
        tl.store(Out + row * stride_o + start + offs, c.to(Out.dtype.element_ty), mask=mask)
        carry = tl.sum(tl.where(offs == BLOCK - 1, c, 0.0), axis=0)  # c[-1], exactly


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def row_sum(x: torch.Tensor, divisor: float, out_dtype: torch.dtype) -> torch.Tensor:
    """x: [R, N] -> [R] of ``out_dtype``: each row's float32 sum divided by ``divisor``."""
    x = _rows(x)
    r, n = x.shape
    out = torch.empty(r, dtype=out_dtype, device=x.device)
    if r:
        _sum_kernel[(r,)](x, out, n, x.stride(0), float(divisor), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def softmax(x: torch.Tensor, log: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """x: [R, N] -> softmax (or log-softmax) of each row, [R, N] of ``out_dtype``."""
    x = _rows(x)
    r, n = x.shape
    out = torch.empty((r, n), dtype=out_dtype, device=x.device)
    if r and n:
        _softmax_kernel[(r,)](
            x, out, n, x.stride(0), out.stride(0), LOG=log, BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    return out


def cumsum(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x: [R, N] -> inclusive float32 prefix sums of each row, [R, N] of ``out_dtype``."""
    x = _rows(x)
    r, n = x.shape
    out = torch.empty((r, n), dtype=out_dtype, device=x.device)
    if r and n:
        _cumsum_kernel[(r,)](
            x, out, n, x.stride(0), out.stride(0), BLOCK=BLOCK, num_warps=NUM_WARPS
        )
    return out
