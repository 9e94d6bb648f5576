"""The formulations of the split decode kernel over quantized caches ("dot" in q's dtype,
"dot16" in float16 with q rescaled by a power of two, "fma" on CUDA cores) and its tile
configs (as benchmarks/bench_quant_sweep.py times them): each against the float64
reference of the same stored bytes (the Triton interpreter on CPU), with splits, window,
softcap, sinks, batch-invariant mode and extreme magnitudes of q and of the scales."""

from __future__ import annotations

import pytest
import torch

from _kvcases import assert_close, paged_case
from pagedkv import ops
from test_quant_attention import BF16, DEV, E5M2, F16, F32, FP8, I8, TOL, quant_case

pytest.importorskip("triton")

from pagedkv.ops import decode_splits, triton_decode  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
LENS = [1, 19, 0, 90, 41]
# (kv dtype, q dtype, GQA ratio, block size, head_dim, window, softcap, sinks)
CASES = [
    (FP8, BF16, 4, 16, 32, None, None, False),
    (I8, BF16, 3, 8, 64, 21, 30.0, True),  # G 3: padded rows (fma pads to 4, dot to 16)
    (E5M2, F16, 1, 16, 32, None, None, True),
    (I8, F16, 8, 16, 32, 37, None, False),
]
# Beyond the output's rounding to q's dtype, "dot" rounds p * v_scale to q's dtype (bf16:
# 2**-9 per key), "dot16" to float16 (2**-12), "fma" not at all.
FORM_TOL = {"dot": TOL, "dot16": {BF16: 8e-3, F16: 2e-3}, "fma": {BF16: 8e-3, F16: 2e-3}}


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def _ids(c):
    return f"{str(c[0])[6:]}-{str(c[1])[6:]}-g{c[2]}-bs{c[3]}-d{c[4]}-w{c[5]}-cap{c[6]}-s{c[7]:d}"


def _run(q, kq, vq, ks, vs, bt, sl, cfg, **kw):
    out = torch.full_like(q, float("nan"))
    return triton_decode.decode(q, kq, vq, bt, sl, q.shape[-1] ** -0.5, out=out, cfg=cfg,
                                k_scales=ks, v_scales=vs, **kw)  # fmt: skip


@pytest.mark.parametrize("form", ["dot", "dot16", "fma"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_every_form_matches_the_float64_reference(case, form):
    kvd, dt, g, bs, d, window, softcap, sinks = case
    hkv = 2
    kq, vq, ks, vs, bt, sl, q = quant_case(LENS, g * hkv, hkv, d, bs, kvd, dt)
    kw = dict(window=window, softcap=softcap,
              sinks=torch.randn(g * hkv, device=DEV) * 2 if sinks else None)  # fmt: skip
    ref = ops.decode_attention(q.double(), kq, vq, bt, sl, k_scales=ks, v_scales=vs,
                               backend="reference", **kw)  # fmt: skip
    # tiles smaller and larger than a block, one split or several, aligned (invariant)
    for block_n, split, inv in ((16, None, False), (32, 32, False), (64, None, True)):
        cfg = dict(form=form, BLOCK_N=block_n)
        out = _run(q, kq, vq, ks, vs, bt, sl, cfg, split_tokens=split, batch_invariant=inv,
                   **kw)  # fmt: skip
        what = f"{form} {_ids(case)} BLOCK_N={block_n} split={split} invariant={inv}"
        assert_close(out, ref, FORM_TOL[form][dt], rtol=2**-7, what=what)


@pytest.mark.parametrize("form", ["dot16", "fma"])
def test_forms_are_batch_invariant(form):
    lens = [700, 5, 530, 0, 1100]
    kq, vq, ks, vs, bt, sl, q = quant_case(lens, 8, 2, 32, 16, I8, BF16)
    kw = dict(k_scales=ks, v_scales=vs, batch_invariant=True, window=600, cfg=dict(form=form))
    scale = 32**-0.5
    alone = triton_decode.decode(q[:1], kq, vq, bt[:1], sl[:1], scale, **kw)
    for order in ([0, 1, 2, 3, 4], [4, 3, 0, 2]):
        out = triton_decode.decode(q[order], kq, vq, bt[order], sl[order], scale, **kw)
        assert torch.equal(out[order.index(0)], alone[0]), f"{form}: not bit-identical in {order}"


@pytest.mark.parametrize("q_mag", [1e-25, 1e-3, 3e4, 1e20])
@pytest.mark.parametrize("v_mag", [1e-20, 1.0, 1e25])
def test_dot16_holds_any_magnitude_of_q_and_of_the_scales(q_mag, v_mag):
    """float16 operands: q is rescaled by a power of two and p * v_scale is divided by the
    tile's largest v_scale, so neither overflows nor flushes (float16 ends at 65504)."""
    kq, vq, ks, vs, bt, sl, q = quant_case(LENS, 4, 1, 32, 16, FP8, BF16)
    q = (q.float() * q_mag).to(BF16)
    vs = vs * v_mag
    ks = ks / max(q_mag, 1.0)  # scores that still mix several keys
    ref = ops.decode_attention(q.double(), kq, vq, bt, sl, k_scales=ks, v_scales=vs,
                               backend="reference")  # fmt: skip
    out = _run(q, kq, vq, ks, vs, bt, sl, dict(form="dot16", BLOCK_N=32))
    assert_close(out / v_mag, ref / v_mag, 8e-3, rtol=2**-7, what=f"q {q_mag} v {v_mag}")


def test_all_zero_blocks_and_zero_queries():
    """Blocks written with zeros have scale 0 (the tile's largest v_scale is then 0)."""
    kq, vq, ks, vs, bt, sl, q = quant_case(LENS, 4, 2, 32, 16, FP8, BF16)
    ks.zero_()
    vs.zero_()
    q.zero_()
    for form in ("dot", "dot16", "fma"):
        out = _run(q, kq, vq, ks, vs, bt, sl, dict(form=form))
        assert torch.equal(out, torch.zeros_like(out)), form


def test_fma_over_an_unquantized_cache():
    k, v, bt, sl = paged_case(LENS, 8, 2, 32, 16, BF16, DEV)
    q = torch.randn(len(LENS), 8, 32, device=DEV).to(BF16)
    ref = ops.decode_attention(q.double(), k.double(), v.double(), bt, sl, backend="reference")
    for split in (None, 32):
        out = triton_decode.decode(q, k, v, bt, sl, 32**-0.5, split_tokens=split,
                                   cfg=dict(form="fma", BLOCK_N=32))  # fmt: skip
        assert_close(out, ref, 8e-3, rtol=2**-7, what=f"fma bf16 split={split}")


def test_form_errors():
    kq, vq, ks, vs, bt, sl, q = quant_case([5, 9], 4, 2, 16, 8, FP8, BF16, poison=False)
    with pytest.raises(ValueError, match="use one of"):
        _run(q, kq, vq, ks, vs, bt, sl, dict(form="wmma"))
    with pytest.raises(ValueError, match="bf16 / fp16 q"):
        _run(q.float(), kq, vq, ks, vs, bt, sl, dict(form="dot16"))
    k, v, bt2, sl2 = paged_case([5], 4, 2, 16, 8, BF16, DEV)
    with pytest.raises(ValueError, match="quantized cache"):
        triton_decode.decode(q[:1], k, v, bt2, sl2, 0.25, cfg=dict(form="dot16"))


def test_configs_are_keyed_by_the_kv_dtype():
    """Quantized caches read QUANT_CONFIGS; float32 q keeps the exact float32 dot; the
    split planner and DecodePlan follow the config's programs_per_sm."""
    for kvd, kind in ((FP8, "fp8"), (E5M2, "fp8"), (I8, "int8")):
        for dt in (BF16, F16):
            assert decode_splits.config(128, dt, kvd) == decode_splits.QUANT_CONFIGS[kind]
        assert decode_splits.config(128, F32, kvd)["form"] == "dot"
    assert decode_splits.config(128, BF16, None)["form"] == "dot"
    dev = torch.device("cpu")
    few = decode_splits.plan_splits(1, 8, 16384, None, 64, dev, False, programs_per_sm=2)
    many = decode_splits.plan_splits(1, 8, 16384, None, 64, dev, False, programs_per_sm=8)
    assert many.num_splits == 4 * few.num_splits
    plan = ops.DecodePlan(1, 32, 8, 64, 16, 16384, dtype=BF16, kv_dtype=FP8, device=DEV,
                          backend="triton")  # fmt: skip
    cfg = decode_splits.config(64, BF16, FP8)
    want = decode_splits.plan_splits(1, 8, 16384, None, cfg["BLOCK_N"], torch.device(DEV),
                                     False, programs_per_sm=cfg["programs_per_sm"])  # fmt: skip
    assert (plan.split_tokens, plan.num_splits) == (want.split_tokens, want.num_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("kvd", [FP8, E5M2, I8])
def test_forms_on_cuda_at_size(kvd):
    """The compiled kernels (the interpreter runs none of the sm_90 code) at serving sizes."""
    lens = [1, 17, 4097, 0, 2500, 8191, 333]
    kq, vq, ks, vs, bt, sl, q = quant_case(lens, 32, 8, 128, 16, kvd, BF16)
    ref = ops.decode_attention(q.double(), kq, vq, bt, sl, k_scales=ks, v_scales=vs,
                               backend="reference")  # fmt: skip
    for form, block_n, stages in (("dot", 64, 3), ("dot16", 128, 3), ("dot16", 64, 5),
                                  ("fma", 32, 2)):  # fmt: skip
        for split, inv in ((None, False), (512, False), (None, True)):
            cfg = dict(form=form, BLOCK_N=block_n, num_stages=stages)
            out = _run(q, kq, vq, ks, vs, bt, sl, cfg, split_tokens=split, batch_invariant=inv)
            what = f"{form} n{block_n} s{stages} split={split} invariant={inv}"
            assert_close(out, ref, FORM_TOL[form][BF16], rtol=2**-7, what=what)
