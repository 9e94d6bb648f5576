"""Writing into quantized caches: the scale rule (fresh blocks, headroom, re-quantization,
static scales), Triton == the torch reference byte for byte, and the argument checks."""

from __future__ import annotations

import pytest
import torch

from pagedkv import ops
from pagedkv._kv_formats import QUANT_FORMATS
from pagedkv.ops import reference_quant
from pagedkv.storage import KVLayout, KVPool

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from pagedkv.ops.triton_quant import encode  # noqa: E402

FP8, E5M2, I8 = torch.float8_e4m3fn, torch.float8_e5m2, torch.int8
BF16, F32 = torch.bfloat16, torch.float32
DEV = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = [FP8, E5M2, I8]
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state (unseeded draws included)."""
    torch.manual_seed(0)


def caches(dtype, nb=6, bs=4, h=2, d=8, device=DEV):
    kc = torch.zeros(nb, bs, h, d, dtype=dtype, device=device)
    ks = torch.zeros(nb, h, device=device)
    return kc, kc.clone(), ks, ks.clone()


def write(state, slots, k, v, backend, static=None):
    kc, vc, ks, vs = state
    dev = kc.device
    ops.write_kv(kc, vc, torch.tensor(slots, device=dev), k.to(dev), v.to(dev), k_scales=ks,
                 v_scales=vs, static_scales=static, backend=backend)  # fmt: skip


def same_bytes(a, b):
    return all(
        torch.equal(x.view(torch.uint8) if x.dtype != F32 else x, y.view(torch.uint8)
                    if y.dtype != F32 else y) for x, y in zip(a, b)
    )  # fmt: skip


# ---- the rule, on the reference (on the CPU: these compare with CPU arithmetic) ----------
@pytest.mark.parametrize("dtype", FORMATS)
def test_full_block_gets_the_exact_max(dtype):
    st = caches(dtype, device="cpu")
    k = torch.randn(4, 2, 8)
    write(st, [4, 5, 6, 7], k, k, "reference")  # block 1, offsets 0..3: fresh and full
    want = k.abs().amax(dim=(0, 2)) / QUANT_FORMATS[dtype].qmax
    assert torch.equal(st[2][1], want)
    deq = reference_quant.dequantize(st[0][1:2], st[2][1:2], F32)[0]
    step = want.max() * (0.5 if dtype == I8 else 2**-3)  # half a step; fp8: relative
    assert (deq - k).abs().max() <= step * (1 if dtype == I8 else k.abs().max() / want.max())


@pytest.mark.parametrize("dtype", FORMATS)
def test_partial_write_keeps_headroom_and_later_tokens_grow_the_scale(dtype):
    fmt = QUANT_FORMATS[dtype]
    st = caches(dtype, device="cpu")
    first = torch.randn(2, 2, 8)
    write(st, [8, 9], first, first, "reference")  # block 2, offsets 0, 1 of 4
    s0 = st[2][2].clone()
    assert torch.equal(s0, first.abs().amax(dim=(0, 2)) / fmt.qmax * fmt.headroom)
    small = first[:1] * 0.5  # fits under the scale: nothing else changes
    before = st[0][2].clone()
    write(st, [10], small, small, "reference")
    assert torch.equal(st[2][2], s0) and torch.equal(st[0][2, :2], before[:2])
    big = first[:1] * 9  # exceeds it: the block's earlier tokens are re-quantized
    write(st, [11], big, big, "reference")  # the last offset: the exact max, no headroom
    assert torch.equal(st[2][2], torch.maximum(s0, big.abs().amax(dim=(0, 2)) / fmt.qmax))
    old = reference_quant.dequantize(before[None], s0[None], F32)[0, :2]
    y = (before[:2].float() * s0[None, :, None]) / st[2][2][None, :, None]
    assert torch.equal(st[0][2, :2].view(torch.uint8), reference_quant.encode(y, dtype).view(
        torch.uint8))  # fmt: skip
    new = reference_quant.dequantize(st[0][2:3], st[2][2:3], F32)[0, :2]
    if dtype == I8:  # one more rounding, of at most half the new step
        assert ((new - old).abs() <= st[2][2][:, None] * 0.5).all()
    else:  # relative: half an ulp of the format, plus the subnormal step
        tol = old.abs() * 2.0**-fmt.mbits + st[2][2][:, None] * 2.0 ** (fmt.emin - fmt.mbits)
        assert ((new - old).abs() <= tol).all()


def test_offset_zero_starts_a_block_afresh():
    st = caches(FP8, device="cpu")
    k = torch.randn(4, 2, 8) * 100
    write(st, [0, 1, 2, 3], k, k, "reference")
    small = torch.randn(1, 2, 8) * 0.01  # the block is reused by another sequence
    write(st, [0], small, small, "reference")
    assert torch.equal(st[2][0], small.abs().amax(dim=(0, 2)) / 448 * 2)


def test_static_scales_write_the_layer_scale():
    st = caches(I8, device="cpu")
    k = torch.randn(3, 2, 8)
    write(st, [5, 6, 13], k, k * 2, "reference", static=(0.02, 0.04))
    assert torch.equal(st[2][[1, 3]], torch.full((2, 2), 0.02))
    assert torch.equal(st[3][[1, 3]], torch.full((2, 2), 0.04))
    want = reference_quant.encode(k.float() / torch.tensor(0.02), I8)
    assert torch.equal(st[0].view(-1, 2, 8)[[5, 6, 13]], want)


# ---- Triton == reference, byte for byte ----------------------------------------------------
CALLS = [  # prefill of 6 tokens over two blocks, decode appends, padding, a fresh block
    [8, 9, 10, 11, 12, 13],
    [14, 20],
    [15, 21],
    [-1, 22, 23, -1],
    [0, 1],
    [2],
    [3, 16, 17],
]


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("static", [None, (0.05, 0.3)])
def test_triton_write_matches_reference_bytes(dtype, static):
    torch.manual_seed(1)
    ref, tri = caches(dtype), caches(dtype)
    for i, slots in enumerate(CALLS):
        n = len(slots)
        k = (torch.randn(n, 2, 8) * (1 + 3 * i)).to(BF16)  # growing: re-quantizations
        v = torch.randn(n, 2, 8) * torch.logspace(-6, 1, 8)  # tiny values: subnormals
        write(ref, slots, k, v, "reference", static)
        write(tri, slots, k, v, "triton", static)
        assert same_bytes(ref, tri), f"call {i}: Triton and reference bytes differ"


@pytest.mark.parametrize("dtype", FORMATS)
def test_pool_write_over_layers(dtype):
    lay = KVLayout(2, 2, 8, 4, BF16, kv_dtype=dtype)
    ref, tri = KVPool(lay, 5, DEV, backend="reference"), KVPool(lay, 5, DEV, backend="triton")
    for layer in range(2):
        k = torch.randn(7, 2, 8, dtype=BF16, device=DEV)
        for p in (ref, tri):
            p.write(layer, torch.arange(3, 10, device=DEV), k, -k)
    assert torch.equal(ref.kv.view(torch.uint8), tri.kv.view(torch.uint8))
    assert torch.equal(ref.scales, tri.scales)
    got, _ = ref.gather(1, [0, 1, 2], 10)
    assert got.dtype == BF16 and got.shape == (10, 2, 8)


@triton.jit
def _encode_kernel(Y, Z, N: tl.constexpr, QMAX: tl.constexpr, MB: tl.constexpr,
                   EMIN: tl.constexpr):  # fmt: skip
    o = tl.arange(0, N)
    tl.store(Z + o, encode(tl.load(Y + o), QMAX, MB, EMIN).to(Z.dtype.element_ty))


@pytest.mark.parametrize("dtype", FORMATS)
def test_triton_grid_rounding_matches_torch(dtype):
    """The kernels round in float32 arithmetic onto the format's grid: the same bytes as
    the reference's conversion (round to nearest even, subnormals, ties, zeros stored as +0,
    clamping)."""
    fmt = QUANT_FORMATS[dtype]
    n = 8192
    mag = torch.logspace(-12, 0, n // 2) * fmt.qmax * 1.3  # beyond qmax too: clamped
    y = torch.cat([mag, -mag]) * (1 + 0.01 * torch.randn(n))
    grid = reference_quant.encode(torch.arange(-300, 300) / 4.0, dtype).float()
    y = torch.cat([y, grid, (grid[1:] + grid[:-1]) / 2, torch.tensor([0.0, -0.0])])  # ties
    y = torch.cat([y, torch.zeros(16384 - y.numel())]).to(DEV)  # a power of two
    z = torch.empty(y.numel(), dtype=dtype, device=DEV)
    _encode_kernel[(1,)](y, z, N=y.numel(), QMAX=fmt.qmax, MB=fmt.mbits, EMIN=fmt.emin)
    bad = z.view(torch.uint8) != reference_quant.encode(y, dtype).view(torch.uint8)
    assert not bad.any(), f"{int(bad.sum())} differ, e.g. {y[bad][:4].tolist()}"


@pytest.mark.parametrize("dtype", FORMATS)
def test_values_that_round_to_zero_are_stored_as_plus_zero(dtype):
    """-0.0 and tiny negative values store the byte of +0 in both the reference and the
    kernel (the H200's kernel and torch's conversion disagreed on their sign before)."""
    fmt = QUANT_FORMATS[dtype]
    y = torch.tensor([-0.0, -1e-30, -1e-7, 0.0, 1e-30] + [0.0] * 11).to(DEV)
    z = torch.empty(y.numel(), dtype=dtype, device=DEV)
    _encode_kernel[(1,)](y, z, N=y.numel(), QMAX=fmt.qmax, MB=fmt.mbits, EMIN=fmt.emin)
    ref = reference_quant.encode(y, dtype).view(torch.uint8)
    assert ref.tolist() == [0] * y.numel()
    assert z.view(torch.uint8).tolist() == [0] * y.numel()


# ---- checks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_write_checks_leave_the_cache_unchanged(backend):
    kc, vc, ks, vs = st = caches(FP8)
    k = torch.randn(3, 2, 8, device=DEV)
    write(st, [4, 5, 6], k, k, backend)
    snap = [t.clone() for t in st]
    sl = torch.tensor([8, 9, 10], device=DEV)
    bad = [
        (dict(k_scales=None), TypeError, "needs its k_scales"),
        (dict(k_scales=ks[:, :1]), ValueError, r"\[num_blocks, Hkv\]"),
        (dict(k_scales=ks.double()), TypeError, "float32"),
        (dict(static_scales=(1.0, -1.0)), ValueError, "finite numbers > 0"),
        (dict(static_scales=1.0), TypeError, "pair"),
        (dict(slots=torch.tensor([8, 12, 9], device=DEV)), ValueError, "contiguous"),
        (dict(slots=torch.tensor([8, 8, 9], device=DEV)), ValueError, "distinct"),
        (dict(slots=torch.tensor([8, -1, 9], device=DEV)), ValueError, "contiguous"),
        (dict(k=k.to(torch.int32)), TypeError, "float dtype"),
    ]
    for over, exc, words in bad:
        args = dict(slots=sl, k=k, k_scales=ks, static_scales=None)
        args.update(over)
        with pytest.raises(exc, match=words):
            ops.write_kv(
                kc, vc, args["slots"], args["k"], k, k_scales=args["k_scales"], v_scales=vs,
                static_scales=args["static_scales"], backend=backend,
            )  # fmt: skip
        assert same_bytes(st, snap)
    with pytest.raises(TypeError, match="quantized"):  # scales for a bf16 cache
        b = torch.zeros(6, 4, 2, 8, dtype=BF16, device=DEV)
        ops.write_kv(b, b, sl, k.to(BF16), k.to(BF16), k_scales=ks, v_scales=vs)
    # static slots need no contiguity: any order is fine there
    ops.write_kv(kc, vc, torch.tensor([8, 12, 9], device=DEV), k, k, k_scales=ks, v_scales=vs,
                 static_scales=(1.0, 1.0), backend=backend)  # fmt: skip
