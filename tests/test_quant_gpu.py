"""Compressed KV on CUDA at realistic sizes: decode / prefill against the float64 reference
of the same stored bytes, Triton write_kv byte-identical to the reference, a bf16 pool
with an fp8 CPU tier (the copy-stream path), the engine with fp8 KV and CUDA graphs."""

from __future__ import annotations

import hashlib

import pytest
import torch

from _kvcases import assert_close, cu_from
from _models import tiny
from pagedkv import KVCache, ops
from pagedkv.storage import KVLayout, KVPool
from pagedkv.tiers import CPUTier, TieredStore

pytestmark = pytest.mark.gpu
DEV = "cuda"
BF16 = torch.bfloat16
FORMATS = ["fp8", "fp8_e5m2", "int8"]


def filled_pool(fmt: str, lens: list[int], hkv: int = 8, d: int = 128, bs: int = 16, seed=0):
    """A one-layer pool holding ``lens`` tokens per sequence, written through write_kv in
    prefill-sized calls then a few one-token appends (dynamic scales as served)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    nbs = [-(-n // bs) for n in lens]
    pool = KVPool(KVLayout(1, hkv, d, bs, BF16, kv_dtype=fmt), sum(nbs) + 4, DEV)
    perm = torch.randperm(sum(nbs) + 4, device=DEV, generator=g)[: sum(nbs)]
    tables = torch.zeros(len(lens), max(nbs), dtype=torch.int32, device=DEV)
    at = 0
    for i, (n, nb) in enumerate(zip(lens, nbs)):
        tables[i, :nb] = perm[at : at + nb].to(torch.int32)
        at += nb
        slots = (tables[i, :nb, None].long() * bs + torch.arange(bs, device=DEV)).flatten()[:n]
        cut = max(0, n - 3)
        for a, b in ((0, cut), *((j, j + 1) for j in range(cut, n))):
            if b > a:
                k = torch.randn(b - a, hkv, d, device=DEV, generator=g).to(BF16) * 3
                v = torch.randn(b - a, hkv, d, device=DEV, generator=g).to(BF16)
                pool.write(0, slots[a:b], k, v)
    return pool, tables, torch.tensor(lens, dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_and_prefill_at_size_match_the_float64_reference(fmt):
    lens = [1, 17, 4097, 0, 2500, 8191, 333]
    pool, bt, sl = filled_pool(fmt, lens)
    sc = dict(k_scales=pool.k_scales(0), v_scales=pool.v_scales(0))
    q = torch.randn(len(lens), 32, 128, device=DEV).to(BF16)
    ref = ops.decode_attention(q.double(), pool.k(0), pool.v(0), bt, sl, backend="reference",
                               **sc)  # fmt: skip
    for inv in (False, True):
        out = ops.decode_attention(q, pool.k(0), pool.v(0), bt, sl, backend="triton",
                                   batch_invariant=inv, **sc)  # fmt: skip
        assert_close(out, ref, 3e-2, rtol=2**-7, what=f"decode {fmt} invariant={inv}")
    plan = ops.DecodePlan(16, 32, 8, 128, 16, 8192, dtype=BF16, kv_dtype=pool.kv.dtype,
                          device=DEV)  # fmt: skip
    assert_close(plan.run(q, pool.k(0), pool.v(0), bt, sl, **sc), ref, 3e-2, rtol=2**-7,
                 what="DecodePlan")  # fmt: skip
    q_lens = [1, 17, 300, 0, 64, 1000, 5]
    qp = torch.randn(sum(q_lens), 32, 128, device=DEV).to(BF16)
    cu = cu_from(q_lens, DEV)
    ref = ops.prefill_attention(qp.double(), cu, pool.k(0), pool.v(0), bt, sl,
                                backend="reference", **sc)  # fmt: skip
    out = ops.prefill_attention(qp, cu, pool.k(0), pool.v(0), bt, sl, backend="triton", **sc)
    assert_close(out, ref, 3e-2, rtol=2**-7, what=f"prefill {fmt}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_write_is_byte_identical_to_the_reference_at_size(fmt):
    lay = KVLayout(2, 8, 128, 16, BF16, kv_dtype=fmt)
    ref, tri = (KVPool(lay, 256, DEV, backend=b) for b in ("reference", "triton"))
    g = torch.Generator(device=DEV).manual_seed(3)
    for layer in range(2):
        for a, b in ((0, 1000), (1000, 1001), (1001, 1002), (1002, 3000)):
            k = torch.randn(b - a, 8, 128, device=DEV, generator=g).to(BF16) * (1 + a / 500)
            for p in (ref, tri):
                p.write(layer, torch.arange(a, b, device=DEV), k, k * 0.25)
    assert torch.equal(ref.kv.view(torch.uint8), tri.kv.view(torch.uint8))
    assert torch.equal(ref.scales, tri.scales)


def test_bf16_cuda_pool_with_an_fp8_cpu_tier():
    """Demote on the copy stream quantizes on the device; promote dequantizes; the
    result equals the conversion done on the CPU, bit for bit."""
    from pagedkv.storage import convert_rows

    lay = KVLayout(4, 8, 128, 16, BF16)
    pool = KVPool(lay, 64, DEV)
    pool.kv.normal_(generator=torch.Generator(device=DEV).manual_seed(4))
    ts = TieredStore([CPUTier(64 << 20, kv_dtype="fp8")], lay, "m")
    ts.attach(pool)
    hs = [hashlib.sha256(str(i).encode()).digest() for i in range(20)]
    rows = pool.read_blocks(list(range(20))).clone()
    small = lay.with_kv_dtype("fp8")
    expect = convert_rows(convert_rows(rows, lay, small), small, lay)
    ts.demote(list(zip(range(20), hs)))
    pool.kv.fill_(-3.0)  # the next tenants overwrite the blocks at once
    ts.flush()
    assert ts.promote(hs, list(range(30, 50))) == 20
    assert torch.equal(pool.read_blocks(list(range(30, 50))), expect)
    assert ts.stats()["tiers"]["cpu"]["bytes_used"] == 20 * small.bytes_per_block
    ts.close()


def test_engine_with_fp8_kv_and_cuda_graphs_matches_eager():
    """The fp8 engine's CUDA-graph decode (write_kv quantizing inside the graph) gives the
    same tokens as its eager decode; the pool holds ~2x the blocks of bf16 in the bytes."""
    from pagedkv.engine import Engine, SamplingParams

    model = tiny("llama").to(DEV, BF16)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 40, 17, 90)]
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    outs = {}
    for graphs in (False, True):
        engine = Engine(model, num_blocks=64, kv_dtype="fp8", cuda_graphs=graphs)
        outs[graphs] = [o.token_ids for o in engine.generate(prompts, params)]
        engine.cache.check_integrity()
        engine.close()
    assert outs[True] == outs[False]


def test_kvcache_fp8_pool_on_cuda_refuses_nothing_on_hopper():
    """On compute capability 8.9+ the Triton kernels read e4m3; the pool is built."""
    major, minor = torch.cuda.get_device_capability()
    lay = KVLayout(1, 2, 64, 16, BF16, kv_dtype="fp8")
    if (major, minor) >= (8, 9):
        assert KVCache(lay, 4, device=DEV).pool.kv.dtype == torch.float8_e4m3fn
    else:
        with pytest.raises(ValueError, match="compute capability 8.9"):
            KVCache(lay, 4, device=DEV)
