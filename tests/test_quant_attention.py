"""Decode and prefill over quantized (fp8 / int8) caches: the Triton kernels (the
interpreter on CPU) against the float64 reference that dequantizes the same stored
bytes; window / softcap / sinks; batch invariance; DecodePlan; warm-up; cascade refusal."""

from __future__ import annotations

import pytest
import torch

from _kvcases import assert_close, cu_from, dense_attention, paged_case
from pagedkv import ops
from pagedkv._kv_formats import QUANT_FORMATS
from pagedkv.ops import reference_quant
from pagedkv.storage import KVLayout, KVPool

pytest.importorskip("triton")

from pagedkv.ops import triton_decode, triton_prefill  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP8, E5M2, I8 = torch.float8_e4m3fn, torch.float8_e5m2, torch.int8
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
# bf16 rounding of the output and of the probability x value-scale product (as for bf16 caches)
TOL = {F32: 2e-5, F16: 5e-3, BF16: 3e-2}
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state (unseeded draws included)."""
    torch.manual_seed(0)


def quant_case(lens, hq, hkv, d, bs, kv_dtype, dtype, poison=True):
    """Random quantized caches (+ scales) holding ``lens`` tokens, and q of ``dtype``.
    Slots past each length and the spare blocks hold NaN (fp8) / junk with NaN scales."""
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, F32, DEV)
    nb = k.shape[0]
    out = []
    for x in (k, v):
        amax = x.abs().amax(dim=(1, 3))  # [nb, Hkv]: a full-block scale
        s = amax / QUANT_FORMATS[kv_dtype].qmax * (1 + torch.rand(nb, hkv, device=DEV))
        out += [reference_quant.encode(x / s[:, None, :, None], kv_dtype), s.contiguous()]
    kq, ks, vq, vs = out
    if poison:
        used = torch.zeros(nb, dtype=torch.bool)
        for b, n in enumerate(lens):
            used[bt[b, : -(-n // bs)].long().cpu()] = True
        ks[~used.to(DEV)] = float("nan")
        vs[~used.to(DEV)] = float("nan")
    q = torch.randn(len(lens), hq, d, device=DEV).to(dtype)
    return kq, vq, ks, vs, bt, sl, q


# (kv dtype, compute dtype, GQA ratio, block size, head_dim, window, softcap, sinks)
CASES = [
    (FP8, BF16, 4, 16, 32, None, None, False),
    (FP8, F16, 1, 8, 64, 21, 30.0, True),
    (E5M2, BF16, 8, 16, 32, 5, None, True),
    (I8, BF16, 4, 8, 64, None, 20.0, False),
    (I8, F32, 2, 16, 32, 37, None, True),
    (E5M2, F32, 4, 32, 128, None, None, False),  # D 128
]


def _ids(c):
    return (
        f"{str(c[0])[6:]}-{str(c[1])[6:]}-g{c[2]}-bs{c[3]}-d{c[4]}-w{c[5]}-cap{c[6]}-s{int(c[7])}"
    )


def _kw(case, hq):
    *_, window, softcap, sinks = case
    s = torch.randn(hq, device=DEV) * 2 if sinks else None
    return dict(window=window, softcap=softcap, sinks=s)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_decode_matches_float64_reference_of_the_same_bytes(case):
    kvd, dt, g, bs, d = case[:5]
    hkv = 1 if g == 8 else 2
    lens = [1, bs + 3, 0, 90, 41]
    kq, vq, ks, vs, bt, sl, q = quant_case(lens, g * hkv, hkv, d, bs, kvd, dt)
    kw = _kw(case, g * hkv)
    ref = ops.decode_attention(q.double(), kq, vq, bt, sl, k_scales=ks, v_scales=vs,
                               backend="reference", **kw)  # fmt: skip
    for split, inv in ((None, False), (32, False), (64, True)):
        out = torch.full_like(q, float("nan"))
        triton_decode.decode(q, kq, vq, bt, sl, d**-0.5, split_tokens=split, out=out,
                             batch_invariant=inv, k_scales=ks, v_scales=vs, **kw)  # fmt: skip
        assert_close(out, ref, TOL[dt], rtol=2**-7, what=f"decode {_ids(case)} split={split}")
    via = ops.decode_attention(q, kq, vq, bt, sl, k_scales=ks, v_scales=vs, backend="triton",
                               **kw)  # fmt: skip
    assert_close(via, ref, TOL[dt], rtol=2**-7, what="decode via ops")


@pytest.mark.parametrize("case", CASES[:5], ids=_ids)
def test_prefill_matches_float64_reference_of_the_same_bytes(case):
    kvd, dt, g, bs, d = case[:5]
    hkv = 1 if g == 8 else 2
    lens, q_lens = [6, 40, 5, 50], [6, 13, 1, 20]
    kq, vq, ks, vs, bt, sl, _ = quant_case(lens, g * hkv, hkv, d, bs, kvd, dt)
    q = torch.randn(sum(q_lens), g * hkv, d, device=DEV).to(dt)
    cu = cu_from(q_lens, DEV)
    kw = _kw(case, g * hkv)
    ref = ops.prefill_attention(q.double(), cu, kq, vq, bt, sl, k_scales=ks, v_scales=vs,
                                backend="reference", **kw)  # fmt: skip
    bm, bn = ((16, 16), (32, 32), (16, 32))[CASES.index(case) % 3]
    out = triton_prefill.prefill(q, cu, kq, vq, bt, sl, d**-0.5, block_m=bm, block_n=bn,
                                 k_scales=ks, v_scales=vs, **kw)  # fmt: skip
    assert_close(out, ref, TOL[dt], rtol=2**-7, what=f"prefill {_ids(case)}")


@pytest.mark.parametrize("kvd", [FP8, I8])
def test_reference_is_attention_over_the_dequantized_values(kvd):
    """The specification itself: the reference equals dense float64 attention over
    ``q * scale`` of the stored bytes."""
    lens = [9, 30]
    kq, vq, ks, vs, bt, sl, q = quant_case(lens, 4, 2, 16, 8, kvd, F32)
    out = ops.decode_attention(q.double(), kq, vq, bt, sl, k_scales=ks, v_scales=vs,
                               backend="reference", window=7)  # fmt: skip
    for b, n in enumerate(lens):
        idx = bt[b, : -(-n // 8)].long()
        k = reference_quant.dequantize(kq[idx], ks[idx], torch.float64).reshape(-1, 2, 16)[:n]
        v = reference_quant.dequantize(vq[idx], vs[idx], torch.float64).reshape(-1, 2, 16)[:n]
        want = dense_attention(q[b : b + 1], k, v, [n - 1], window=7)
        assert_close(out[b : b + 1], want, 1e-12, what=f"seq {b}")


def test_batch_invariant_on_a_quantized_pool():
    lens = [700, 5, 530, 0, 1100]
    kq, vq, ks, vs, bt, sl, q = quant_case(lens, 8, 2, 32, 16, FP8, BF16)
    kw = dict(k_scales=ks, v_scales=vs, backend="triton", window=600, softcap=30.0)
    with ops.batch_invariant_mode():
        alone = ops.decode_attention(q[:1], kq, vq, bt[:1], sl[:1], **kw)
        for order in ([0, 1, 2, 3, 4], [4, 3, 0, 2]):
            out = ops.decode_attention(q[order], kq, vq, bt[order], sl[order], **kw)
            assert torch.equal(out[order.index(0)], alone[0]), f"not bit-identical in {order}"
        plan = ops.DecodePlan(8, 8, 2, 32, 16, 1200, dtype=BF16, kv_dtype=FP8, device=DEV,
                              window=600, softcap=30.0, backend="triton")  # fmt: skip
        got = plan.run(q[[2, 0]], kq, vq, bt[[2, 0]], sl[[2, 0]], k_scales=ks, v_scales=vs)
        assert torch.equal(got[1], alone[0]), "DecodePlan differs from the eager call"


def test_decode_plan_for_a_quantized_pool():
    pool = KVPool(KVLayout(1, 2, 32, 8, BF16, kv_dtype="int8"), 12, DEV, backend="triton")
    pool.write(0, torch.arange(40, device=DEV), torch.randn(40, 2, 32, dtype=BF16, device=DEV),
               torch.randn(40, 2, 32, dtype=BF16, device=DEV))  # fmt: skip
    bt = torch.arange(10, dtype=torch.int32, device=DEV).view(2, 5)
    sl = torch.tensor([37, 3], dtype=torch.int32, device=DEV)
    q = torch.randn(2, 8, 32, dtype=BF16, device=DEV)
    for backend in ("triton", "reference"):
        plan = ops.DecodePlan.for_pool(pool, 4, 8, 64, backend=backend)
        assert plan.kv_dtype == torch.int8 and plan.dtype == BF16
        out = plan.run(q, pool.k(0), pool.v(0), bt, sl, k_scales=pool.k_scales(0),
                       v_scales=pool.v_scales(0))  # fmt: skip
        ref = ops.paged_decode(q.double(), pool, 0, bt, sl, backend="reference")
        assert_close(out, ref, TOL[BF16], rtol=2**-7, what=f"plan {backend}")
    with pytest.raises(TypeError, match="needs its k_scales"):
        plan.run(q, pool.k(0), pool.v(0), bt, sl)


def test_attention_checks():
    kq, vq, ks, vs, bt, sl, q = quant_case([5, 9], 4, 2, 16, 8, FP8, BF16, poison=False)
    with pytest.raises(TypeError, match="needs its k_scales"):
        ops.decode_attention(q, kq, vq, bt, sl)
    with pytest.raises(ValueError, match=r"\[num_blocks, Hkv\]"):
        ops.decode_attention(q, kq, vq, bt, sl, k_scales=ks[:1], v_scales=vs)
    with pytest.raises(TypeError, match="compute dtype"):
        ops.decode_attention(q.to(torch.int32), kq, vq, bt, sl, k_scales=ks, v_scales=vs)
    cu = cu_from([1, 1], DEV)
    with pytest.raises(TypeError, match="float32"):
        ops.prefill_attention(q, cu, kq, vq, bt, sl, k_scales=ks.half(), v_scales=vs)
    b = torch.zeros(4, 8, 2, 16, dtype=BF16, device=DEV)
    with pytest.raises(TypeError, match="for quantized"):
        ops.decode_attention(q, b, b, bt, sl, k_scales=ks, v_scales=vs)


def test_cascade_refuses_quantized_pools():
    pool = KVPool(KVLayout(1, 2, 16, 8, BF16, kv_dtype="fp8"), 8, DEV)
    with pytest.raises(TypeError, match="cascade attention does not read quantized"):
        ops.CascadePlan.for_pool(pool, [([0, 1], 1)], 2, 4, 64)
    plan = ops.CascadePlan([([0, 1], 1)], 2, num_q_heads=4, num_kv_heads=2, head_dim=16,
                           block_size=8, max_seq_len=64, dtype=BF16, device=DEV)  # fmt: skip
    bt = torch.tensor([[0, 1], [0, 2]], dtype=torch.int32, device=DEV)
    sl = torch.tensor([10, 12], dtype=torch.int32, device=DEV)
    q = torch.randn(2, 4, 16, dtype=BF16, device=DEV)
    with pytest.raises(TypeError, match="cascade attention does not read quantized"):
        ops.cascade_decode(q, pool.k(0), pool.v(0), bt, sl, plan)


@pytest.mark.skipif(DEV == "cuda", reason="counts rebuilt keys under the interpreter")
def test_warmup_covers_quantized_variants(monkeypatch):
    """After ops.warmup of a quantized layer, writes, decode and prefill of any batch
    launch only kernel variants the warm-up launched (no Triton cache key is new)."""
    import _triton_keys as keys
    from pagedkv.ops import triton_quant

    kernels = [triton_decode._decode_split_kernel, triton_decode._decode_merge_kernel,
               triton_prefill._prefill_kernel, triton_quant._write_dynamic_kernel]  # fmt: skip
    pool = KVPool(KVLayout(1, 2, 16, 8, F32, kv_dtype="fp8"), 40, DEV, backend="triton")
    args = dict(k_scales=pool.k_scales(0), v_scales=pool.v_scales(0), backend="triton")
    with pytest.raises(ValueError, match="dtype="):
        ops.warmup(pool.k(0), pool.v(0), 4, **args)
    counter = keys.CompileCounter(monkeypatch, kernels)
    try:
        res = ops.warmup(pool.k(0), pool.v(0), 4, dtype=F32, max_seq_len=256, blocks=False,
                         **args)  # fmt: skip
        warm = set(counter.keys)
        assert res.launches == counter.launched >= len(warm) > 0
        for n in (70, 3):
            k = torch.randn(n, 2, 16, device=DEV)
            pool.write(0, torch.arange(100, 100 + n, device=DEV), k, k)
        bt = torch.arange(32, dtype=torch.int32, device=DEV).view(4, 8)
        for rows, lens in (([0, 1], [64, 6]), ([0, 1, 2, 3], [1, 60, 64, 33])):
            sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
            q = torch.randn(len(rows), 4, 16, device=DEV)
            ops.paged_decode(q, pool, 0, bt[rows], sl, backend="triton")
            ops.paged_prefill(q, cu_from([1] * len(rows), DEV), pool, 0, bt[rows], sl,
                              backend="triton")  # fmt: skip
        new = counter.keys - warm
        assert not new, f"{len(new)} launch(es) would compile after the warm-up: {new}"
    finally:
        counter.close()
