"""The batch-invariant GEMM's configurations: the shape-only choice among them, the check
that admits a configuration only when it gives the default's bits (and the fallback when
it does not), and operand layouts that must not change a row's bits. The Triton kernels
run through the interpreter without CUDA (tiny shapes), on the GPU with it."""

from __future__ import annotations

import logging

import pytest
import torch

from pagedkv import ops
from pagedkv.ops import gemm_select as gs
from pagedkv.ops import invariant as inv

triton_matmul = pytest.importorskip("pagedkv.ops.triton_matmul")
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
K, N = 40, 37
# (M, N, K) where M takes the default tile and M = 1 a smaller one
TWO_TILES = (4096, 2048, 576) if HAS_CUDA else (20, N, K)


def _operands(dtype=torch.bfloat16, m=20, n=N, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) / k**0.5).to(dtype).to(DEV)
    w = torch.randn(n, k, generator=g).to(dtype).to(DEV)
    return x, w


def _gemm(x, w, **kw):
    return triton_matmul.gemm(x[None], w.t()[None], **kw)[0]


def test_pick_is_a_function_of_the_shape_only():
    """On the H200 ladder (132 SMs): decode shapes get BLOCK_M 64 tiles narrow enough to
    give every SM work, large M the default tile; never a tile taller than needed."""
    ladder, sms = gs._HALF, 132
    default = ladder[0]
    assert gs.pick(ladder, 1, 4096, 8192, sms) == default
    assert gs.pick(ladder, 1, 1, 2048, sms).block_m == 64  # llama-1B down at decode
    assert gs.tiles(gs.pick(ladder, 1, 1, 8192, sms), 1, 1, 8192) >= sms
    assert gs.pick(ladder, 1, 1, 576, sms) == max(ladder, key=lambda c: gs.tiles(c, 1, 1, 576))
    for m in (1, 2, 16, 33, 64, 65, 200, 1000, 5000):
        for n in (192, 576, 2048, 49152):
            cfg = gs.pick(ladder, 1, m, n, sms)
            assert cfg in ladder
            assert cfg.block_m <= max(64, 1 << (m - 1).bit_length()), (m, n, cfg)
            assert cfg == gs.pick(ladder, 1, m, n, sms)
    assert gs.pick(ladder, 8, 64, 576, sms) != gs.pick(ladder, 1, 64, 576, sms)  # batch tiles


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_smaller_tile_serves_small_m_once_checked_and_rows_stay_identical(dtype):
    m, n, k = TWO_TILES
    sel = gs.GemmSelector(triton_matmul._run_2d)
    x, w = _operands(dtype, m, n, k)
    sms = triton_matmul.num_sms(x.device)
    precision = triton_matmul.float32_precision() if dtype == torch.float32 else "native"
    configs = gs.ladder(dtype, precision)
    small = gs.pick(configs, 1, 1, n, sms)
    assert gs.pick(configs, 1, m, n, sms) == configs[0] != small
    big = _gemm(x, w, selector=sel)
    assert sel.verdicts() == {}, "the default tile needs no check"
    for at in (0, 7, m - 1):
        one = _gemm(x[at : at + 1], w, selector=sel)
        assert torch.equal(one[0], big[at]), f"row {at}: M = 1 ({small.tag}) != M = {m}"
    assert list(sel.verdicts().values()) == [True]
    (key,) = sel.verdicts()
    assert key[2:4] == (n, k) and key[-1] == small.tag
    assert torch.equal(_gemm(x, w, config=small), big)


@pytest.mark.skipif(HAS_CUDA, reason="needs a config known to differ: the interpreter's")
def test_a_config_with_other_bits_is_never_used_and_logged_once(caplog):
    """The interpreter's emulated MMA accumulates in steps of min(16, BLOCK_K), so a
    BLOCK_K 8 tile really sums in another order: the check must refuse it."""
    other = gs.GemmConfig(16, 8, 8, group_m=2, num_warps=1, num_stages=1)
    default = gs.ladder(torch.float32, "ieee")[0]
    sel = gs.GemmSelector(triton_matmul._run_2d, configs=lambda dtype, p: (default, other))
    x, w = _operands(torch.float32)
    assert gs.pick((default, other), 1, 1, N, 4) == other  # what M = 1 would take
    assert not torch.equal(_gemm(x, w, config=other), _gemm(x, w, config=default))
    with caplog.at_level(logging.WARNING, logger="pagedkv.ops"):
        got = [_gemm(x[:1], w, selector=sel) for _ in range(3)]
    assert sel.verdicts() and not any(sel.verdicts().values())
    logged = [r for r in caplog.records if "other bits" in r.getMessage()]
    assert len(logged) == 1 and other.tag in logged[0].getMessage()
    want = _gemm(x[:1], w, config=default)
    assert all(torch.equal(g, want) for g in got)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_operand_layouts_do_not_change_a_rows_bits(backend):
    """Misaligned, strided, 3-D and batched operands: the same bits as the plain product
    (the Triton path copies activations into one layout, so one binary serves all)."""
    dev = DEV if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, K, generator=g).to(dev)
    w = torch.randn(N, K, generator=g).to(dev)
    b = torch.randn(N, generator=g).to(dev)
    with ops.use_backend(backend):
        want = inv.linear(x, w, b)
        big = torch.zeros(9 * K + 1, device=dev)
        big[1:].copy_(x.flatten())
        variants = {
            "misaligned": big[1:].view(9, K),
            "column-major": x.t().contiguous().t(),
            "every other row": torch.stack([x, x], 1).reshape(18, K)[::2],
        }
        for name, xv in variants.items():
            assert torch.equal(inv.linear(xv, w, b), want), name
        three = inv.linear(torch.stack([x[:4], x[5:]]), w, b)  # [2, 4, K]: rows fold
        assert torch.equal(three.reshape(8, N), want[[0, 1, 2, 3, 5, 6, 7, 8]])
        col_major_w = inv.linear(x, w.t().contiguous().t(), b)
        assert torch.equal(col_major_w, want), "weight layout"
        a3 = torch.randn(3, 5, K, generator=g).to(dev)
        b3 = torch.randn(3, K, N, generator=g).to(dev)
        batched = inv.gemm(a3, b3)  # distinct B per item: the batched kernel
        for i in range(3):
            assert torch.equal(batched[i], inv.gemm(a3[i : i + 1], b3[i : i + 1])[0]), i


@pytest.mark.skipif(HAS_CUDA, reason="on CUDA every test runs this path")
def test_the_gpu_code_path_computes_the_product(monkeypatch):
    """The BLOCK_K loop that CUDA runs (tl.dot, K and edge masks, the bias, batched and
    folded addressing), run by the interpreter's numpy dot: the product within float32
    rounding. (The other interpreter tests use the emulated, bit-faithful dot.)"""
    monkeypatch.setattr(triton_matmul, "emulate_dot", lambda: False)
    g = torch.Generator().manual_seed(8)
    cfg = gs.GemmConfig(16, 16, 32, group_m=2, num_warps=1, num_stages=1)  # K=40: 2 steps
    a = torch.randn(2, 21, K, generator=g)
    b = torch.randn(2, K, N, generator=g)
    bias = torch.randn(N, generator=g)
    cases = {
        "folded + bias": (a, b[:1].expand(2, K, N), bias.expand(2, 21, N)),
        "batched": (a, b, None),
        "batched + full bias": (a, b, torch.randn(2, 21, N, generator=g)),
    }
    for name, (x, w, z) in cases.items():
        got = triton_matmul.gemm(x, w, z, config=cfg)
        want = x.double() @ w.double() + (0 if z is None else z.double())
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4), name


def test_a_config_that_cannot_run_is_refused_and_the_default_serves(caplog):
    """A candidate that raises (on a GPU: out of shared memory, a compiler limit) is
    recorded as unusable, logged once, and the default computes the call."""
    m, n, k = TWO_TILES
    x, w = _operands(torch.bfloat16, m, n, k)
    default = gs.ladder(torch.bfloat16, "native")[0]

    def run(a, b, cfg):
        if cfg != default:
            raise RuntimeError("out of resources: shared memory")
        return triton_matmul._run_2d(a, b, cfg)

    sel = gs.GemmSelector(run)
    with caplog.at_level(logging.WARNING, logger="pagedkv.ops"):
        got = [_gemm(x[:1], w, selector=sel) for _ in range(2)]
    assert list(sel.verdicts().values()) == [False]
    assert sum("failed" in r.getMessage() for r in caplog.records) == 1
    want = _gemm(x[:1], w, config=default)
    assert all(torch.equal(g, want) for g in got)
