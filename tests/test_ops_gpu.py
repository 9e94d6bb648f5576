"""Triton kernels on CUDA at realistic sizes, against the torch reference."""

from __future__ import annotations

import pytest
import torch

from _kvcases import assert_close, cu_from, paged_case, poison_outside
from pagedkv import ops
from pagedkv.storage import KVLayout, KVPool

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize(
    "dtype, hq, hkv, d, bs",
    [
        (torch.bfloat16, 32, 8, 128, 16),
        (torch.float16, 32, 8, 128, 16),
        (torch.bfloat16, 32, 32, 128, 32),
        (torch.bfloat16, 64, 8, 64, 8),
        (torch.float32, 16, 4, 128, 16),
        (torch.bfloat16, 8, 1, 256, 16),
    ],
)
def test_decode_matches_reference(dtype, hq, hkv, d, bs):
    lens = [1, 15, 16, 17, 1000, 4097, 0, 2500, 333, 8191]
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, dtype, DEV)
    q = torch.randn(len(lens), hq, d, device=DEV).to(dtype)
    ref = ops.decode_attention(q, k, v, bt, sl, backend="reference")
    for invariant in (False, True):
        out = ops.decode_attention(q, k, v, bt, sl, backend="triton", batch_invariant=invariant)
        assert_close(out, ref, TOL[dtype], what=f"decode invariant={invariant}")
    plan = ops.DecodePlan(16, hq, hkv, d, bs, 8192, dtype=dtype, device=DEV)
    assert_close(plan.run(q, k, v, bt, sl), ref, TOL[dtype], what="DecodePlan")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_lens", [[300, 777, 1, 64], [1, 2, 16, 5]])
def test_prefill_matches_reference(dtype, q_lens):
    hq, hkv, d, bs = 32, 8, 128, 16
    lens = [1300, 777, 2001, 64]  # prefix + new, no prefix, decode-like, whole
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, dtype, DEV)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q = torch.randn(int(cu[-1]), hq, d, device=DEV).to(dtype)
    ref = ops.prefill_attention(q, cu, k, v, bt, sl, backend="reference")
    out = ops.prefill_attention(q, cu, k, v, bt, sl, backend="triton")
    assert_close(out, ref, TOL[dtype], what=f"prefill q_lens={q_lens}")


def test_decode_batch_invariant_bitwise():
    hq, hkv, d, bs = 32, 8, 128, 16
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    lens = torch.randint(1, 6000, (64,), generator=gen).tolist()
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, torch.bfloat16, DEV)
    q = torch.randn(64, hq, d, device=DEV).to(torch.bfloat16)
    with ops.batch_invariant_mode():
        for target in (0, 17, 63):
            alone = ops.decode_attention(q[[target]], k, v, bt[[target]], sl[[target]])
            for size in (2, 9, 64):
                others = torch.randperm(64, generator=gen)[:size].tolist()
                others = [i for i in others if i != target][: size - 1]
                pos = len(others) // 2
                order = others[:pos] + [target] + others[pos:]
                out = ops.decode_attention(q[order], k, v, bt[order], sl[order])
                assert torch.equal(out[pos], alone[0]), f"target {target}, batch of {size}"
            plan = ops.DecodePlan(128, hq, hkv, d, bs, 6000, dtype=torch.bfloat16, device=DEV)
            assert torch.equal(plan.run(q[[target]], k, v, bt[[target]], sl[[target]])[0], alone[0])


def test_decode_plan_cuda_graph():
    hq, hkv, d, bs, bsz = 32, 8, 128, 16, 8
    k, v, bt, sl = paged_case([4000] * bsz, hq, hkv, d, bs, torch.bfloat16, DEV)
    sl.copy_(torch.tensor([100, 2000, 1, 4000, 17, 999, 3000, 64], dtype=torch.int32))
    plan = ops.DecodePlan(bsz, hq, hkv, d, bs, 4096, dtype=torch.bfloat16, device=DEV)
    q = torch.randn(bsz, hq, d, device=DEV).to(torch.bfloat16)
    plan.run(q, k, v, bt, sl)  # compile outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = plan.run(q, k, v, bt, sl)
    for _ in range(2):  # new inputs written in place, then replay
        q.copy_(torch.randn_like(q, dtype=torch.float32))
        sl.copy_(torch.randint(1, 4001, (bsz,), dtype=torch.int32, device=DEV))
        g.replay()
        ref = ops.decode_attention(q, k, v, bt, sl, backend="reference")
        assert_close(out, ref, TOL[torch.bfloat16], what="graph replay")


# ---- sliding window, softcap, sinks (issue 13) ------------------------------------------
# (Hq, Hkv, D, window, softcap, sinks): Llama-like, Gemma 2 local (D 256, cap 50),
# gpt-oss-like (window 128 + sinks), Mistral (window 4096), a window off the block grid
FEATURES = [
    (32, 8, 128, 1024, None, False),
    (8, 4, 256, 4096, 50.0, False),
    (64, 8, 64, 128, None, True),
    (32, 8, 128, 4096, None, False),
    (32, 8, 128, 777, 30.0, True),
    (16, 8, 256, None, 50.0, True),
]


def _sinks(hq, dtype=torch.bfloat16):
    return (torch.randn(hq, device=DEV) * 2).to(dtype)


@pytest.mark.parametrize("hq, hkv, d, window, softcap, sinks", FEATURES)
def test_decode_features_match_reference(hq, hkv, d, window, softcap, sinks):
    dtype, bs = torch.bfloat16, 16
    lens = [1, 15, 16, 17, 1000, 4097, 0, 2500, 333, 8191, 1025]
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, dtype, DEV)
    q = (torch.randn(len(lens), hq, d, device=DEV) * 2).to(dtype)
    kw = dict(window=window, softcap=softcap, sinks=_sinks(hq) if sinks else None)
    ref = ops.decode_attention(q, k, v, bt, sl, backend="reference", **kw)
    for invariant in (False, True):
        out = ops.decode_attention(q, k, v, bt, sl, backend="triton", batch_invariant=invariant,
                                   **kw)  # fmt: skip
        assert_close(out, ref, TOL[dtype], what=f"decode invariant={invariant}")
    plan = ops.DecodePlan(16, hq, hkv, d, bs, 8192, dtype=dtype, device=DEV, window=window,
                          softcap=softcap)  # fmt: skip
    assert_close(plan.run(q, k, v, bt, sl, sinks=kw["sinks"]), ref, TOL[dtype], what="plan")
    if window is not None:  # blocks before each window are NaN: never loaded
        kp, vp = k.clone(), v.clone()
        poison_outside(kp, vp, bt, lens, [1] * len(lens), window)
        for invariant in (False, True):
            out = ops.decode_attention(q, kp, vp, bt, sl, backend="triton",
                                       batch_invariant=invariant, **kw)  # fmt: skip
            assert_close(out, ref, TOL[dtype], what=f"poisoned decode invariant={invariant}")


@pytest.mark.parametrize("hq, hkv, d, window, softcap, sinks", FEATURES[:3] + FEATURES[4:5])
def test_prefill_features_match_reference(hq, hkv, d, window, softcap, sinks):
    dtype, bs = torch.bfloat16, 16
    lens, q_lens = [1300, 777, 2001, 64, 5000], [300, 777, 1, 5, 1500]
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, dtype, DEV)
    cu = cu_from(q_lens, DEV)
    q = (torch.randn(int(cu[-1]), hq, d, device=DEV) * 2).to(dtype)
    kw = dict(window=window, softcap=softcap, sinks=_sinks(hq) if sinks else None)
    ref = ops.prefill_attention(q, cu, k, v, bt, sl, backend="reference", **kw)
    out = ops.prefill_attention(q, cu, k, v, bt, sl, backend="triton", **kw)
    assert_close(out, ref, TOL[dtype], what="prefill")
    if window is not None:
        kp, vp = k.clone(), v.clone()
        poison_outside(kp, vp, bt, lens, q_lens, window)
        out = ops.prefill_attention(q, cu, kp, vp, bt, sl, backend="triton", **kw)
        assert_close(out, ref, TOL[dtype], what="poisoned prefill")


@pytest.mark.parametrize("window, softcap, sinks", [(1024, None, True), (700, 50.0, False)])
def test_decode_batch_invariant_bitwise_features(window, softcap, sinks):
    hq, hkv, d, bs = 32, 8, 128, 16
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    lens = torch.randint(1, 6000, (64,), generator=gen).tolist()
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, torch.bfloat16, DEV)
    q = torch.randn(64, hq, d, device=DEV).to(torch.bfloat16)
    kw = dict(window=window, softcap=softcap, sinks=_sinks(hq, torch.float32) if sinks else None)
    plan = ops.DecodePlan(128, hq, hkv, d, bs, 6000, dtype=torch.bfloat16, device=DEV,
                          window=window, softcap=softcap, batch_invariant=True)  # fmt: skip
    with ops.batch_invariant_mode():
        for target in (0, 17, 63):
            alone = ops.decode_attention(q[[target]], k, v, bt[[target]], sl[[target]], **kw)
            for size in (2, 9, 64):
                others = [i for i in torch.randperm(64, generator=gen)[:size].tolist()
                          if i != target][: size - 1]  # fmt: skip
                pos = len(others) // 2
                order = others[:pos] + [target] + others[pos:]
                out = ops.decode_attention(q[order], k, v, bt[order], sl[order], **kw)
                assert torch.equal(out[pos], alone[0]), f"target {target}, batch of {size}"
            got = plan.run(q[[target]], k, v, bt[[target]], sl[[target]], sinks=kw["sinks"])
            assert torch.equal(got[0], alone[0])


def test_windowed_decode_plan_cuda_graph():
    hq, hkv, d, bs, bsz, window = 64, 8, 64, 16, 8, 128
    k, v, bt, sl = paged_case([4000] * bsz, hq, hkv, d, bs, torch.bfloat16, DEV)
    plan = ops.DecodePlan(bsz, hq, hkv, d, bs, 4096, dtype=torch.bfloat16, device=DEV,
                          window=window)  # fmt: skip
    assert plan.num_splits * plan.split_tokens <= window + 2 * plan.split_tokens
    q = torch.randn(bsz, hq, d, device=DEV).to(torch.bfloat16)
    sinks = _sinks(hq)
    plan.run(q, k, v, bt, sl, sinks=sinks)  # compile outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = plan.run(q, k, v, bt, sl, sinks=sinks)
    for _ in range(2):
        q.copy_(torch.randn_like(q, dtype=torch.float32))
        sl.copy_(torch.randint(0, 4001, (bsz,), dtype=torch.int32, device=DEV))
        sinks.copy_(torch.randn_like(sinks, dtype=torch.float32))
        g.replay()
        ref = ops.decode_attention(q, k, v, bt, sl, window=window, sinks=sinks,
                                   backend="reference")  # fmt: skip
        assert_close(out, ref, TOL[torch.bfloat16], what="windowed graph replay")


def test_pool_ops_on_cuda_match_cpu():
    lay = KVLayout(4, 8, 128, 16, torch.bfloat16)
    gpu = KVPool(lay, 64, DEV)
    gpu.kv.normal_()
    cpu = KVPool(lay, 64, "cpu")
    cpu.kv.copy_(gpu.kv.cpu())
    n = 100
    slots = torch.randperm(64 * 16)[:n]
    k, v = torch.randn(n, 8, 128).bfloat16(), torch.randn(n, 8, 128).bfloat16()
    gpu.write(2, slots.to(DEV), k.to(DEV), v.to(DEV))
    cpu.write(2, slots, k, v)
    pairs = [(1, 40), (2, 41), (1, 42)]
    gpu.copy_blocks(pairs)
    cpu.copy_blocks(pairs)
    assert torch.equal(gpu.kv.cpu(), cpu.kv)
    data = gpu.read_blocks([5, 40, 7])
    assert data.is_pinned() and torch.equal(data, cpu.read_blocks([5, 40, 7]))
    gpu.write_blocks([60, 61, 62], data)
    gpu.write_blocks([50, 51, 52], data.to(DEV))
    assert torch.equal(gpu.kv[:, :, 60:63], gpu.kv[:, :, [5, 40, 7]])
    assert torch.equal(gpu.kv[:, :, 50:53], gpu.kv[:, :, [5, 40, 7]])
    side = torch.cuda.Stream()
    out = torch.empty_like(data).pin_memory()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gpu.read_blocks([5, 40, 7], out=out, non_blocking=True)
    side.synchronize()
    assert torch.equal(out, data)
    gk, gv = gpu.gather(2, [slots[0].item() // 16], 16)
    assert gk.device.type == "cuda" and gk.shape == (16, 8, 128)
