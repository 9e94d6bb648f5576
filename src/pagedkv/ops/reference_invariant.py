"""Batch-invariant matmul, row reductions and activations in plain torch: the CPU path of
:mod:`pagedkv.ops.invariant` (it runs on any device).

Each function's result for row i depends only on row i of its input (and on the
weights): never on how many rows share the call, nor where the row sits. Why torch's own
CPU ops are not enough, as measured on torch 2.13 (MKL / oneDNN, 2 threads), and what
replaces them:

- **matmul**: ``x @ W.T`` of one row differs between M = 1 (a GEMV) and M > 1, for
  float32 at every shape and for bf16 from K = 2048; and even one fixed-shape
  ``torch.mm`` does not compute a row the same at every position of its tile on every
  machine (on a 16-core host with torch 2.11, row 8 of a [16, 2048] tile differed). So no
  BLAS is used: each output element is ``sum_k x[k] * w[k]`` computed by elementwise
  torch ops only — the products in float32 (exact for bf16 / fp16 inputs), then the K
  products padded with zeros to a power of two and summed by halving (``p[:h] + p[h:]``,
  the tree of :func:`tree_sum`). Elementwise IEEE multiplies and adds round the same in
  torch's vector and scalar loops, so every element's bits are fixed by construction:
  by its row of ``a`` and column of ``b``, whatever M, the position, the thread count or
  the BLAS (tests/test_invariant_ops.py replays the order in numpy). Blocks of rows and
  columns bound the [rows, cols, K] product tensor (``PRODUCT_ELEMENTS``).
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

PRODUCT_ELEMENTS = 1 << 18  # float32 products held at once by gemm (1 MiB: cache-sized)


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    beta: float = 1.0,
    alpha: float = 1.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``alpha * (a @ b) + beta * bias`` per batch item, each element a fixed tree (see
    module doc), accumulated in float32 and rounded once to ``out_dtype``.

    a: [Bt, M, K]; b: [Bt, K, N] (a batch stride of 0 broadcasts); bias: None or a
    [Bt, M, N] view (broadcast strides welcome). Returns a contiguous [Bt, M, N] tensor of
    ``out_dtype`` (default a's dtype).
    """
    out_dtype = out_dtype or a.dtype
    bt, m, k = a.shape
    n = b.shape[2]
    out = torch.empty((bt, m, n), dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out
    one_b = bt == 1 or b.stride(0) == 0
    if one_b:  # one weight: all batch items' rows at once
        acc = _dot_rows(a.reshape(bt * m, k), b[0]).reshape(bt, m, n)
    else:
        acc = torch.stack([_dot_rows(a[i], b[i]) for i in range(bt)])
    if bias is not None:
        acc = acc if alpha == 1 else acc * alpha
        acc = acc + (bias.float() if beta == 1 else bias.float() * beta)
    elif alpha != 1:
        acc = acc * alpha
    out.copy_(acc)
    return out


def _dot_rows(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x: [M, K], w: [K, N] -> [M, N] float32, element (i, j) = tree sum over k of
    float32(x[i, k]) * float32(w[k, j])."""
    m, k = x.shape
    n = w.shape[1]
    if k == 0:
        return x.new_zeros((m, n), dtype=torch.float32)
    width = 1 << (k - 1).bit_length()
    # K first, so that every step of the tree adds two contiguous halves in place
    xt = F.pad(x.float(), (0, width - k)).t()  # [Kp, M]
    wf = F.pad(w.float(), (0, 0, 0, width - k))  # [Kp, N]
    cols = min(n, max(1, PRODUCT_ELEMENTS // width))
    rows = max(1, PRODUCT_ELEMENTS // (cols * width))
    buf = torch.empty(width * min(rows, m) * cols, dtype=torch.float32, device=x.device)
    out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    for r in range(0, m, rows):
        rb = min(rows, m - r)
        for c in range(0, n, cols):
            cb = min(cols, n - c)
            p = buf[: width * rb * cb].view(width, rb, cb)
            torch.mul(xt[:, r : r + rb, None], wf[:, None, c : c + cb], out=p)
            h = width
            while h > 1:
                h //= 2
                p[:h].add_(p[h : 2 * h])
            out[r : r + rb, c : c + cb] = p[0]
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
