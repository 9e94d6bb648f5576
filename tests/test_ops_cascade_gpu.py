"""Cascade attention on CUDA at realistic shapes, against plain paged attention."""

from __future__ import annotations

import random

import pytest
import torch

from _cascadecases import grouped_case
from _kvcases import assert_close
from pagedkv import ops

pytestmark = pytest.mark.gpu
DEV = "cuda"
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
SHAPES = [(32, 8, 128), (9, 3, 64), (32, 32, 128), (64, 8, 64)]  # (Hq, Hkv, D)


def _batch(rng, bs, sizes=(40, 12, 1), ungrouped=11, shared=(64, 256, 8), max_private=600):
    group_of = [gi for gi, n in enumerate(sizes) for _ in range(n)] + [-1] * ungrouped
    rng.shuffle(group_of)
    private = [rng.randint(0, max_private) for _ in group_of]
    return [s * 16 // bs for s in shared], group_of, private


def _plan(groups, n, hq, hkv, d, bs, dtype, **kw):
    kw.setdefault("max_seq_len", 8192)
    return ops.CascadePlan(groups, n, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                           block_size=bs, dtype=dtype, device=DEV, **kw)  # fmt: skip


@pytest.mark.parametrize(
    "hq, hkv, d, dtype",
    [(*s, torch.bfloat16) for s in SHAPES] + [(*SHAPES[0], torch.float16)],
)
def test_decode_matches_plain(hq, hkv, d, dtype):
    rng = random.Random(hq * d)
    bs = 16
    shared, group_of, private = _batch(rng, bs)
    k, v, bt, sl, groups = grouped_case(shared, group_of, private, hkv, d, bs, dtype, DEV)
    q = torch.randn(len(group_of), hq, d, device=DEV).to(dtype)
    ref = ops.decode_attention(q, k, v, bt, sl, backend="reference")
    for splits in ((None, None), (256, 128)):  # chosen (fused), forced (merge kernel)
        plan = _plan(groups, len(group_of), hq, hkv, d, bs, dtype, min_group_size=1,
                     shared_split_tokens=splits[0], private_split_tokens=splits[1])  # fmt: skip
        out = ops.cascade_decode(q, k, v, bt, sl, plan)
        assert_close(out, ref, TOL[dtype], what=f"cascade {hq}/{hkv}/{d} splits={splits}")
    plain = ops.decode_attention(q, k, v, bt, sl)
    assert_close(plain, ref, TOL[dtype], what="plain triton")


@pytest.mark.parametrize("bs", [16, 32])
def test_decode_one_big_group(bs):
    """The engine's workload shape: 256 rows behind one 1,024-token prompt."""
    hq, hkv, d, dtype = 32, 8, 128, torch.bfloat16
    k, v, bt, sl, groups = grouped_case([1024 // bs], [0] * 256, [32] * 128 + [300] * 128, hkv,
                                        d, bs, dtype, DEV)  # fmt: skip
    q = torch.randn(256, hq, d, device=DEV).to(dtype)
    plan = _plan(groups, 256, hq, hkv, d, bs, dtype, max_seq_len=2048)
    out = ops.cascade_decode(q, k, v, bt, sl, plan)
    assert_close(out, ops.decode_attention(q, k, v, bt, sl, backend="reference"), TOL[dtype],
                 what="one group of 256")  # fmt: skip


@pytest.mark.parametrize("hq, hkv, d", SHAPES[:2])
def test_prefill_matches_plain(hq, hkv, d):
    rng = random.Random(7)
    bs, dtype = 16, torch.bfloat16
    shared, group_of, _ = _batch(rng, bs, sizes=(4, 3), ungrouped=2, shared=(64, 8))
    q_lens = [rng.choice([1, 17, 300, 512]) for _ in group_of]
    private = [n + rng.randint(0, 400) for n in q_lens]
    k, v, bt, sl, groups = grouped_case(shared, group_of, private, hkv, d, bs, dtype, DEV)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq, d, device=DEV).to(dtype)
    plan = _plan(groups, len(q_lens), hq, hkv, d, bs, dtype, q_lens=q_lens)
    out = ops.cascade_prefill(q, k, v, bt, sl, plan)
    ref = ops.prefill_attention(q, cu.to(DEV), k, v, bt, sl, backend="reference")
    assert_close(out, ref, TOL[dtype], what=f"cascade prefill {hq}/{hkv}/{d}")


def test_cuda_graph_capture_and_invariant_mode():
    hq, hkv, d, bs, dtype = 32, 8, 128, 16, torch.bfloat16
    k, v, bt, sl, groups = grouped_case([64, 16], [0] * 30 + [1] * 10 + [-1] * 8,
                                        [100] * 48, hkv, d, bs, dtype, DEV)  # fmt: skip
    q = torch.randn(48, hq, d, device=DEV).to(dtype)
    plan = _plan(groups, 48, hq, hkv, d, bs, dtype, max_seq_len=2048)
    out = torch.empty_like(q)
    ops.cascade_decode(q, k, v, bt, sl, plan, out=out)  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.cascade_decode(q, k, v, bt, sl, plan, out=out)
    shared = torch.tensor(plan.shared_tokens, dtype=torch.int32, device=DEV)
    for _ in range(2):  # new queries and private lengths written in place, then replay
        q.copy_(torch.randn_like(q, dtype=torch.float32))
        sl.copy_(shared + torch.randint(0, 101, sl.shape, device=DEV, dtype=torch.int32))
        graph.replay()
        ref = ops.decode_attention(q, k, v, bt, sl, backend="reference")
        assert_close(out, ref, TOL[dtype], what="graph replay")
    with ops.batch_invariant_mode():
        inv = _plan(groups, 48, hq, hkv, d, bs, dtype, max_seq_len=2048)
        plain = ops.decode_attention(q, k, v, bt, sl)
        assert torch.equal(ops.cascade_decode(q, k, v, bt, sl, inv), plain)
