"""Batch-invariant matmul, row reductions and activations in plain torch: the CPU path of
:mod:`pagedkv.ops.invariant` (it runs on any device).

Each function's result for row i depends only on row i of its input (and on the
weights): never on how many rows share the call, nor where the row sits. Why torch's own
CPU ops are not enough, as measured on torch 2.13 (MKL / oneDNN, 2 threads), and what
replaces them:

- **matmul**: ``x @ W.T`` of one row differs between M = 1 (a GEMV) and M > 1, for
  float32 at every shape and for bf16 from K = 2048. Here rows are cut into tiles of
  TILE_M rows (the last padded with zeros) and every tile is one ``torch.mm`` /
  ``torch.addmm`` of the same shape [TILE_M, K] @ [K, N] on a fresh (64-byte aligned,
  contiguous) tile: a call of one fixed shape computes each row in the same order
  wherever the row sits in the tile (tests/test_invariant_ops.py checks every position).
- **sum / mean**: torch splits a long reduced dim across threads once a call holds 32k
  elements, so the split depends on the number of rows (a mean over 49,152 columns
  changes with M). Here a row is summed by a pairwise tree: padded with zeros to a power
  of two, then halves added elementwise until one column is left. The order depends on
  N alone, and zeros appended to a row (masked keys) do not change its sum.
- **softmax / log-softmax** over a contiguous last dim, and **cumsum**: torch's CPU
  kernels already work one row at a time (softmax: a vectorized max, exp-sum and scale
  per row, partial vectors for the tail; cumsum: one sequential float64 pass per row),
  so they are used as they are, on a contiguous float32 copy. (A softmax built from
  elementwise ops would not be: ``torch.log`` itself differs between its vector and
  scalar loops.)
- **silu / sigmoid / gelu** (and ``rsqrt`` of half types): torch's vectorized and scalar
  CPU loops differ in the last bit (the scalar loop runs at the end of each thread's
  chunk, whose boundaries move with the tensor's size). They are computed here from
  ``exp`` / ``tanh`` / ``erf`` and exact arithmetic in float32, whose two loops agree
  (``log`` does not; nothing here applies it elementwise).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TILE_M = 16


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    beta: float = 1.0,
    alpha: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``alpha * (a @ b) + beta * bias`` per batch item, in fixed-shape tiles of TILE_M rows.

    a: [Bt, M, K]; b: [Bt, K, N] (a batch stride of 0 broadcasts); bias: None or a
    [Bt, M, N] view (broadcast strides welcome). Returns a contiguous [Bt, M, N] tensor of
    ``out_dtype`` (default a's dtype; another dtype is computed in float32).
    """
    out_dtype = out_dtype or a.dtype
    compute = a.dtype if out_dtype == a.dtype else torch.float32
    bt, m, k = a.shape
    n = b.shape[2]
    out = torch.empty((bt, m, n), dtype=out_dtype, device=a.device)
    for i in range(bt):
        w = b[i].to(compute)
        z = None if bias is None else bias[i].to(compute)
        row_bias = z is not None and z.stride(0) == 0  # one bias row for all rows (Linear)
        for r in range(0, m, TILE_M):
            rows = min(TILE_M, m - r)
            tile = torch.zeros((TILE_M, k), dtype=compute, device=a.device)
            tile[:rows] = a[i, r : r + rows]
            if z is None:
                y = torch.mm(tile, w)
            else:
                if row_bias:
                    c = z[0]
                else:
                    c = torch.zeros((TILE_M, n), dtype=compute, device=a.device)
                    c[:rows] = z[r : r + rows]
                y = torch.addmm(c, tile, w, beta=beta, alpha=alpha)
            out[i, r : r + rows] = y[:rows]
    return out


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """x: [R, N] float32 -> [R] float32: each row summed by a pairwise tree (see module doc)."""
    n = x.shape[1]
    if n == 0:
        return x.new_zeros(x.shape[0])
    width = 1 << (n - 1).bit_length()
    if width != n:
        x = F.pad(x, (0, width - n))
    while width > 1:
        width //= 2
        x = x[:, :width] + x[:, width:]
    return x[:, 0]


def row_sum(x: torch.Tensor, divisor: float, out_dtype: torch.dtype) -> torch.Tensor:
    """x: [R, N] -> [R] of ``out_dtype``: each row's float32 tree sum divided by ``divisor``."""
    return (tree_sum(x.float()) / divisor).to(out_dtype)


def softmax(x: torch.Tensor, log: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """x: [R, N] -> softmax (or log-softmax) of each row in float32, [R, N] of ``out_dtype``."""
    x = x.float().contiguous()
    y = torch.log_softmax(x, dim=1) if log else torch.softmax(x, dim=1)
    return y.to(out_dtype)


def cumsum(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x: [R, N] -> inclusive prefix sums of each row (one sequential pass per row)."""
    return torch.cumsum(x.float(), dim=1).to(out_dtype)


def silu(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf / (1.0 + torch.exp(-xf))).to(x.dtype)


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return (1.0 / (1.0 + torch.exp(-x.float()))).to(x.dtype)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    xf = x.float()
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (xf + 0.044715 * xf * xf * xf)
        y = 0.5 * xf * (1.0 + torch.tanh(inner))
    else:
        y = 0.5 * xf * (1.0 + torch.erf(xf * (1.0 / math.sqrt(2.0))))
    return y.to(x.dtype)


def rsqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(x.float()).to(x.dtype)
