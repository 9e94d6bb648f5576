"""Batch-invariant matmul and row reductions (pagedkv.ops.invariant): the same function as
torch within rounding, and bit-identical rows whatever the number of rows (M) and the
row's position. Both backends: the torch path ("reference", CPU) and the Triton kernels
(through the Triton interpreter without CUDA, on small shapes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedkv import ops
from pagedkv.ops import invariant as inv
from pagedkv.ops import reference_invariant as ref

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["reference", "triton"]
# rel. error vs a float64 product: float32 accumulation, one rounding to the output dtype
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
MS = (1, 3, 7, 64, 129)
F32 = torch.float32


@pytest.fixture(autouse=True)
def _no_triton_without_it(request):
    spec = getattr(request.node, "callspec", None)
    if spec is not None and spec.params.get("backend") == "triton":
        pytest.importorskip("triton")


def device(backend: str) -> str:
    """The torch path is the CPU path (CUDA tensors take the Triton kernels)."""
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


def rel_err(x: torch.Tensor, ref64: torch.Tensor) -> float:
    return ((x.double() - ref64).abs().max() / ref64.abs().max().clamp_min(1e-30)).item()


def embed(row: torch.Tensor, m: int, at: int, gen: torch.Generator) -> torch.Tensor:
    """``m`` random rows with ``row`` at index ``at``."""
    x = torch.randn(m, *row.shape, generator=gen).to(row.dtype).to(row.device)
    x[at] = row
    return x


def positions(m: int) -> list[int]:
    return sorted({0, m // 2, m - 1})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 40, 37), (70, 64, 48), (129, 33, 17)], ids=str)
def test_gemm_matches_torch(backend, dtype, shape):
    m, k, n = shape
    dev = device(backend)
    g = torch.Generator().manual_seed(m * k + n)
    x = torch.randn(m, k, generator=g).to(dtype).to(dev)
    w = torch.randn(n, k, generator=g).to(dtype).to(dev)
    b = torch.randn(n, generator=g).to(dtype).to(dev)
    exact = x.double() @ w.double().t() + b.double()
    with ops.use_backend(backend):
        y = inv.linear(x, w, b)
    assert y.shape == (m, n) and y.dtype == dtype
    err, err_torch = rel_err(y, exact), rel_err(torch.nn.functional.linear(x, w, b), exact)
    assert err <= TOL[dtype], (
        f"{backend} {dtype} {shape}: rel err {err:.2e} (torch: {err_torch:.2e})"
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gemm_rows_do_not_depend_on_m_or_position(backend, dtype):
    k, n = (40, 37) if backend == "triton" and not HAS_CUDA else (576, 320)
    dev = device(backend)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(n, k, generator=g).to(dtype).to(dev)
    b = torch.randn(n, generator=g).to(dtype).to(dev)
    row = torch.randn(k, generator=g).to(dtype).to(dev)
    with ops.use_backend(backend):
        alone = inv.linear(row[None], w, b)[0]
        for m in MS:
            for at in positions(m):
                got = inv.linear(embed(row, m, at, g), w, b)[at]
                assert torch.equal(got, alone), f"{backend} {dtype}: row {at} of M={m} differs"
    torch_rows = [torch.nn.functional.linear(embed(row, m, 0, g), w, b)[0] for m in MS]
    same = [torch.equal(r, torch_rows[0]) for r in torch_rows]
    print(f"torch F.linear {dtype} K={k} N={n}: row identical to M=1 at M={MS}: {same}")


def random_shapes(seed: int, count: int, most: int) -> list[tuple[int, int, int]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(int(v) for v in torch.randint(1, most, (3,), generator=g)) for _ in range(count)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemm_on_random_shapes_is_torch_matmul_within_rounding_and_rows_keep_their_bits(
    backend, dtype
):
    """Random (M, K, N): ``inv.matmul`` vs ``torch.matmul`` against a float64 product
    (relative errors printed: both within one rounding to the dtype); a row of each
    shape, computed alone and inside other M at other places, has the same bits."""
    small = backend == "triton" and not HAS_CUDA  # the interpreter: small shapes
    dev = device(backend)
    g = torch.Generator().manual_seed(99)
    errs = []
    for m, k, n in random_shapes(17, 4 if small else 12, 48 if small else 700):
        a = torch.randn(m, k, generator=g).to(dtype).to(dev)
        b = torch.randn(k, n, generator=g).to(dtype).to(dev)
        exact = a.double() @ b.double()
        with ops.use_backend(backend):
            got = inv.matmul(a, b)
            alone = inv.matmul(a[-1:], b)[0]
            for m2 in (m + 1, 2 * m + 5) if small else (m + 1, 3 * m + 7, 129):
                at = int(torch.randint(0, m2, (1,), generator=g))
                assert torch.equal(inv.matmul(embed(a[-1], m2, at, g), b)[at], alone), (
                    f"{backend} {dtype} K={k} N={n}: the row differs at {at} of M={m2}"
                )
        assert torch.equal(got[-1], alone), f"{backend} {dtype} {(m, k, n)}: last row of M={m}"
        err, err_torch = rel_err(got, exact), rel_err(torch.matmul(a, b), exact)
        errs.append((m, k, n, err, err_torch))
        assert err <= TOL[dtype], f"{(m, k, n)}: rel err {err:.2e} (torch {err_torch:.2e})"
    print(f"\n{backend} {dtype} rel. error vs float64 (M, K, N, ours, torch.matmul):")
    for m, k, n, e, et in errs:
        print(f"  {m:4d} {k:4d} {n:4d}  {e:.2e}  {et:.2e}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matmul_and_bmm_follow_torch_semantics(backend):
    dev = device(backend)
    g = torch.Generator().manual_seed(3)

    def r(*s):
        return torch.randn(*s, generator=g).to(dev)

    cases = [
        (r(7), r(7)), (r(5, 7), r(7)), (r(7), r(7, 4)), (r(2, 3, 5, 7), r(7, 4)),
        (r(2, 1, 5, 7), r(3, 7, 4)), (r(5, 7), r(2, 7, 4)), (r(2, 3, 0, 7), r(7, 4)),
    ]  # fmt: skip
    with ops.use_backend(backend):
        for a, b in cases:
            want = torch.matmul(a.double(), b.double())
            got = inv.matmul(a, b)
            assert got.shape == want.shape, f"{tuple(a.shape)} @ {tuple(b.shape)}"
            assert got.numel() == 0 or rel_err(got, want) < 1e-5
        bias = r(3, 5, 4)
        a, b = r(3, 5, 6), r(3, 6, 4)
        got = inv.gemm(a, b, bias, beta=0.5, alpha=2.0)
        want = 2.0 * (a.double() @ b.double()) + 0.5 * bias.double()
        assert rel_err(got, want) < 1e-5


ROW_CASES = (
    [("reference", dt, n) for dt in DTYPES for n in (1, 37, 1500)]
    + [
        ("reference", torch.float32, 49152),  # where torch's CPU mean changes with M
    ]
    + [("triton", dt, n) for dt in (torch.float32, torch.bfloat16) for n in (37, 1500)]
    + [("triton", torch.float32, 4500)]  # softmax over 3 chunks
)  # the interpreter runs ~10 ms per row program: few rows there


@pytest.mark.parametrize("backend,dtype,n", ROW_CASES, ids=str)
def test_row_reductions_do_not_depend_on_m_or_position(backend, dtype, n):
    if backend == "triton":
        pytest.importorskip("triton")
    dev = device(backend)
    ms = MS if backend == "reference" or HAS_CUDA else (1, 3, 8)
    if n > 10_000:
        ms = (1, 3, 64)
    elif n > 2048 and not HAS_CUDA:
        ms = (1, 3)
    g = torch.Generator().manual_seed(n)
    row = (torch.randn(n, generator=g) * 3).to(dtype).to(dev)
    fns = {
        "sum": lambda x: inv.reduce_sum(x, -1),
        "mean": lambda x: inv.reduce_mean(x.float().pow(2), -1, keepdim=True),
        "softmax": lambda x: inv.softmax(x, -1, dtype=torch.float32),
        "log_softmax": lambda x: inv.log_softmax(x, -1),
        "cumsum": lambda x: inv.cumsum(x, -1),
    }
    with ops.use_backend(backend):
        for name, fn in fns.items():
            alone = fn(row[None])[0]
            for m in ms:
                for at in positions(m):
                    got = fn(embed(row, m, at, g))[at]
                    assert torch.equal(got, alone), f"{name} {dtype} n={n}: row {at}/{m} differs"


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_match_torch(backend):
    dev = device(backend)
    g = torch.Generator().manual_seed(11)
    shape = (2, 3, 40) if backend == "triton" and not HAS_CUDA else (4, 6, 1100)
    x = torch.randn(*shape, generator=g).to(dev)
    checks = [
        (inv.reduce_sum(x, -1), x.sum(-1)),
        (inv.reduce_sum(x, (0, 2), keepdim=True), x.sum((0, 2), keepdim=True)),
        (inv.reduce_mean(x, 1), x.mean(1)),
        (inv.reduce_mean(x), x.mean()),
        (inv.reduce_mean(x.half(), -1, dtype=torch.float32), x.half().mean(-1, dtype=F32)),
        (inv.softmax(x, 1), x.softmax(1)),
        (inv.log_softmax(x, -1), x.log_softmax(-1)),
        (inv.softmax(x.half(), -1, dtype=torch.float32), x.half().softmax(-1, dtype=torch.float32)),
        (inv.cumsum(x, 0), x.cumsum(0)),
    ]  # fmt: skip
    with ops.use_backend(backend):
        for i, (got, want) in enumerate(checks):
            assert got.shape == want.shape and got.dtype == want.dtype, f"check {i}"
            err = (got.double() - want.double()).abs().max().item()
            scale = want.double().abs().max().item()
            assert err <= 2e-3 * max(scale, 1.0), f"check {i}: max abs err {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_trailing_zeros_and_masked_columns_do_not_change_a_row(backend):
    """A sum over a row padded with zeros, a softmax over a row padded with -inf (masked
    keys of a right-padded batch) give the unpadded row's bits."""
    dev = device(backend)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 37, generator=g).to(dev)
    with ops.use_backend(backend):
        for extra in (1, 27, 91, 1100, 4200) if backend == "reference" else (27, 1100, 4200):
            zeros = torch.zeros(3, extra, device=dev)
            padded = torch.cat([x, zeros], 1)
            assert torch.equal(inv.reduce_sum(padded, -1), inv.reduce_sum(x, -1)), extra
            assert torch.equal(inv.cumsum(padded, -1)[:, :37], inv.cumsum(x, -1)), extra
            masked = torch.cat([x, zeros - float("inf")], 1)
            p = inv.softmax(masked, -1)
            assert torch.equal(p[:, :37], inv.softmax(x, -1)), extra
            assert torch.equal(p[:, 37:], zeros)
            lp = inv.log_softmax(masked, -1)
            assert torch.equal(lp[:, :37], inv.log_softmax(x, -1)), extra


def test_cpu_activations_are_position_independent():
    """torch's CPU silu differs between its vector loop and the scalar tail; ours does not."""
    x = torch.randn(4099) * 4
    for name, fn in (("silu", ref.silu), ("sigmoid", ref.sigmoid), ("gelu", ref.gelu)):
        whole = fn(x)
        parts = torch.cat([fn(x[i : i + 37]) for i in range(0, x.numel(), 37)])
        single = torch.stack([fn(x[i : i + 1])[0] for i in range(0, x.numel(), 41)])
        assert torch.equal(whole, parts) and torch.equal(whole[::41], single), name
    silu_torch = torch.nn.functional.silu
    torch_parts = torch.cat([silu_torch(x[i : i + 37]) for i in range(0, x.numel(), 37)])
    print("torch silu: elements differing between chunkings:", (silu_torch(x) != torch_parts).sum())


def _numpy_tree_dot(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The CPU GEMM's order written out in numpy float32 scalars-by-array: products, zero
    padding to a power of two, halves added until one is left."""
    p = x.astype(np.float32)[:, None, :] * w.T.astype(np.float32)[None, :, :]  # [M, N, K]
    width = 1 << (p.shape[2] - 1).bit_length()
    p = np.concatenate([p, np.zeros((*p.shape[:2], width - p.shape[2]), np.float32)], 2)
    while p.shape[2] > 1:
        h = p.shape[2] // 2
        p = p[:, :, :h] + p[:, :, h:]
    return p[:, :, 0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_gemm_is_its_fixed_order_whatever_the_threads(dtype):
    """By construction: the CPU GEMM's bits are those of one fixed sequence of IEEE float32
    products and adds per element (replayed here in numpy), for a row alone, in a batch,
    on 1 or 2 threads, in blocks of any size — BLAS, whose order can change with the
    shape, the tile position and the thread count, is not involved."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 300, generator=g).to(dtype)  # [N, K]: K=300 pads to 512
    x = torch.randn(19, 300, generator=g).to(dtype)
    want = torch.from_numpy(_numpy_tree_dot(x.float().numpy(), w.float().t().numpy()))
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            got = ref.gemm(x[None], w.t()[None], out_dtype=torch.float32)[0]
            assert torch.equal(got, want), f"{dtype} on {n_threads} threads"
            for at in (0, 7, 18):  # alone == in the batch, at any position
                one = ref.gemm(x[None, at : at + 1], w.t()[None], out_dtype=torch.float32)
                assert torch.equal(one[0, 0], want[at]), f"{dtype}: row {at} alone"
    finally:
        torch.set_num_threads(threads)
    small = ref.PRODUCT_ELEMENTS
    try:  # blocks of 1 row x 3 columns: the same elements
        ref.PRODUCT_ELEMENTS = 3 * 512
        assert torch.equal(ref.gemm(x[None], w.t()[None], out_dtype=torch.float32)[0], want)
    finally:
        ref.PRODUCT_ELEMENTS = small


def test_torch_cpu_mm_is_not_position_independent_here_or_there():
    """Why the CPU GEMM avoids BLAS: shown (printed), not asserted, since it depends on
    the machine (on the GPU host's 16 cores a row differed at tile position 8)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 2048, generator=g).t()
    row = torch.randn(2048, generator=g)
    first, moved = None, []
    for at in range(16):
        tile = torch.randn(16, 2048, generator=g)
        tile[at] = row
        y = torch.mm(tile, w)[at]
        first = y if first is None else first
        moved.append(not torch.equal(y, first))
    print(f"torch.mm [16, 2048] float32: positions whose row differs from position 0: "
          f"{[i for i, d in enumerate(moved) if d]}")  # fmt: skip


def test_bad_arguments_raise_clear_errors():
    a = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="inner dimensions"):
        inv.gemm(a, torch.randn(2, 5, 6))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        inv.gemm(a.long(), a.long())
    with pytest.raises(TypeError, match="cast one"):
        inv.gemm(a, torch.randn(2, 4, 6).half())
    with pytest.raises(ValueError, match="does not broadcast"):
        inv.gemm(a, torch.randn(2, 4, 6), bias=torch.randn(5))
    with pytest.raises(ValueError, match="batch sizes"):
        inv.gemm(a, torch.randn(3, 4, 6))
    with pytest.raises(ValueError, match="last dim must be K"):
        inv.linear(a, torch.randn(6, 5))
    with pytest.raises(ValueError, match="out of range"):
        inv.reduce_sum(a, 3)
    with pytest.raises(ValueError, match="twice"):
        inv.reduce_mean(a, (1, -2))
    with pytest.raises(ValueError, match="out of range"):
        inv.softmax(a, -4)
    with pytest.raises(ValueError, match="normalized_shape"):
        inv.rms_norm(a, (3,))
