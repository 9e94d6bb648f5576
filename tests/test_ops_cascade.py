"""Shared-prefix (cascade) attention against plain paged attention: the torch reference
on random groupings, the Triton kernels (through the interpreter on CPU, small shapes),
and batch-invariant mode."""

from __future__ import annotations

import random

import pytest
import torch

from _cascadecases import grouped_case
from _kvcases import assert_close
from pagedkv import ops

REF = "reference"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _plan(groups, n, hkv, g, d, bs, dtype, backend=REF, device="cpu", **kw):
    kw.setdefault("max_seq_len", 512)
    shape = dict(num_q_heads=g * hkv, num_kv_heads=hkv, head_dim=d, block_size=bs)
    return ops.CascadePlan(groups, n, **shape, dtype=dtype, device=device, backend=backend, **kw)


def _random_batch(rng, bs, n_rows=9, max_shared=5, max_private_blocks=3):
    """Several groups of different sizes (one of one), ungrouped rows, suffixes of
    0 .. a few blocks with partial last blocks."""
    sizes = [3, 2, 1]
    group_of = [gi for gi, n in enumerate(sizes) for _ in range(n)]
    group_of += [-1] * (n_rows - len(group_of))
    rng.shuffle(group_of)
    shared = [rng.randint(1, max_shared) for _ in sizes]
    private = [rng.randint(0, max_private_blocks * bs) for _ in group_of]
    private[group_of.index(0)] = 0  # an empty suffix: the shared part alone
    private[group_of.index(-1)] = bs + 3
    return shared, group_of, private


@pytest.mark.parametrize("g", [1, 4, 8])
@pytest.mark.parametrize("bs", [8, 16])
def test_reference_decode_matches_plain(g, bs):
    rng = random.Random(torch.initial_seed() + g * 100 + bs)
    hkv, d = 2, 16
    for trial in range(3):
        shared, group_of, private = _random_batch(rng, bs)
        k, v, bt, sl, groups = grouped_case(shared, group_of, private, hkv, d, bs, torch.float32)
        q = torch.randn(len(group_of), g * hkv, d)
        plain = ops.decode_attention(q, k, v, bt, sl, backend=REF)
        for min_size in (1, 2):
            plan = _plan(groups, len(group_of), hkv, g, d, bs, torch.float32,
                         min_group_size=min_size)  # fmt: skip
            assert len(plan.groups) == (3 if min_size == 1 else 2)
            out = ops.cascade_decode(q, k, v, bt, sl, plan)
            assert_close(out, plain, 2e-6, what=f"g={g} bs={bs} trial {trial} min={min_size}")


def test_reference_decode_bf16_and_plan_details():
    hkv, g, d, bs = 2, 4, 32, 16
    k, v, bt, sl, groups = grouped_case([4, 2], [0, 0, 1, -1, 1, 0], [5, 0, 17, 9, 40, 1], hkv,
                                        d, bs, torch.bfloat16)  # fmt: skip
    q = torch.randn(6, g * hkv, d).to(torch.bfloat16)
    plan = _plan(groups, 6, hkv, g, d, bs, torch.bfloat16)
    assert plan.shared_tokens == (64, 64, 32, 0, 32, 64) and plan.num_q_rows == 6
    out = ops.cascade_decode(q, k, v, bt, sl, plan)
    assert out.dtype == torch.bfloat16
    ref = ops.decode_attention(q, k, v, bt, sl, backend=REF)
    assert_close(out, ref, TOL[torch.bfloat16], what="bf16 cascade vs plain")
    dest = torch.full_like(q, float("nan"))
    assert ops.cascade_decode(q, k, v, bt, sl, plan, 0.3, out=dest) is dest
    assert_close(dest, ops.decode_attention(q, k, v, bt, sl, 0.3, backend=REF), 3e-2, what="scale")


@pytest.mark.parametrize("g", [1, 4])
def test_reference_prefill_matches_plain(g):
    rng = random.Random(torch.initial_seed() + g)
    hkv, d, bs = 2, 16, 8
    shared, group_of, private = _random_batch(rng, bs)
    q_lens = [rng.randint(0, 6) for _ in group_of]
    q_lens[0], q_lens[1] = 1, 9  # a decode-like row, a chunk over several tiles
    private = [max(p, n) for p, n in zip(private, q_lens)]  # the chunk is private
    k, v, bt, sl, groups = grouped_case(shared, group_of, private, hkv, d, bs, torch.float32)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), g * hkv, d)
    plan = _plan(groups, len(q_lens), hkv, g, d, bs, torch.float32, q_lens=q_lens,
                 min_group_size=1)  # fmt: skip
    assert plan.cu_seqlens_q.tolist() == cu.tolist()
    out = ops.cascade_prefill(q, k, v, bt, sl, plan)
    plain = ops.prefill_attention(q, cu, k, v, bt, sl, backend=REF)
    assert_close(out, plain, 2e-6, what=f"prefill g={g}")


def test_reference_edge_batches():
    hkv, g, d, bs = 1, 2, 8, 4
    k, v, bt, sl, _ = grouped_case([2], [-1, -1], [0, 3], hkv, d, bs, torch.float32)
    q = torch.randn(2, g * hkv, d)
    out = ops.cascade_decode(q, k, v, bt, sl, _plan([], 2, hkv, g, d, bs, torch.float32))
    assert torch.equal(out[0], torch.zeros(g * hkv, d)), "an empty sequence gives zeros"
    assert_close(out, ops.decode_attention(q, k, v, bt, sl, backend=REF), 1e-6, what="no group")
    empty = _plan([], 0, hkv, g, d, bs, torch.float32)
    res = ops.cascade_decode(q[:0], k, v, bt[:0], sl[:0], empty)
    assert res.shape == (0, g * hkv, d)


# ---- Triton kernels (interpreter on CPU) ---------------------------------------------------
pytest.importorskip("triton")

# (dtype, GQA ratio, block size, head_dim)
CASES = [(torch.float32, 1, 8, 16), (torch.bfloat16, 4, 16, 32), (torch.float16, 8, 8, 16)]


def _ids(case):
    dt, g, bs, d = case
    return f"{str(dt)[6:]}-g{g}-bs{bs}-d{d}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("splits", [None, (16, 16)], ids=["fused", "split"])
def test_triton_decode_matches_plain(case, splits):
    dtype, g, bs, d = case
    hkv = 2
    group_of = [0, -1, 1, 0, 0, 1, 2]
    private = [3, bs + 5, 0, 2 * bs + 1, 17, 9, 4]
    k, v, bt, sl, groups = grouped_case([3, 2, 1], group_of, private, hkv, d, bs, dtype, DEV)
    q = torch.randn(len(group_of), g * hkv, d, device=DEV).to(dtype)
    s1, s2 = splits or (None, 512)  # one private split: the fused path
    plan = _plan(groups, len(group_of), hkv, g, d, bs, dtype, "triton", DEV, min_group_size=1,
                 max_seq_len=96, shared_split_tokens=s1, private_split_tokens=s2)  # fmt: skip
    launch = plan.launch
    assert launch.n_tiles >= 3 and launch.fused == (splits is None)
    if splits:
        assert launch.slots1 == -(-3 * bs // 16) and launch.splits2 > 1  # merge kernel too
    ref = ops.decode_attention(q, k, v, bt, sl, backend=REF)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    ops.cascade_decode(q, k, v, bt, sl, plan, out=out)
    assert_close(out, ref, TOL[dtype], what=f"triton cascade {_ids(case)} splits={splits}")


@pytest.mark.parametrize("case", CASES[:2], ids=_ids)
def test_triton_prefill_matches_plain(case):
    dtype, g, bs, d = case
    hkv = 2
    group_of = [0, 0, -1, 1, 1]
    q_lens = [5, 1, 3, 0, 12]
    private = [5, 9, 3, 2, 12]
    k, v, bt, sl, groups = grouped_case([3, 2], group_of, private, hkv, d, bs, dtype, DEV)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), g * hkv, d, device=DEV).to(dtype)
    plan = _plan(groups, 5, hkv, g, d, bs, dtype, "triton", DEV, q_lens=q_lens, max_seq_len=96,
                 shared_split_tokens=16)  # fmt: skip
    ref = ops.prefill_attention(q, cu.to(DEV), k, v, bt, sl, backend=REF)
    out = torch.full_like(q, float("nan"))
    ops.cascade_prefill(q, k, v, bt, sl, plan, out=out)
    assert_close(out, ref, TOL[dtype], what=f"triton cascade prefill {_ids(case)}")


def test_batch_invariant_mode_runs_plain_kernels():
    """Invariant mode: the grouping is ignored; bits equal plain invariant decode, so
    they do not depend on the grouping or on the rest of the batch."""
    dtype, hkv, g, d, bs = torch.bfloat16, 2, 4, 16, 8
    group_of, private = [0, 0, -1, 0, 1, 1], [3, 0, 20, 9, 5, 11]
    k, v, bt, sl, groups = grouped_case([4, 2], group_of, private, hkv, d, bs, dtype, DEV)
    q = torch.randn(6, g * hkv, d, device=DEV).to(dtype)
    for backend in (REF, "triton"):
        with ops.batch_invariant_mode():
            # inside the mode: the dispatch hook also swaps the reference's own matmuls
            # for the invariant GEMM, so "plain" must be computed under the same mode
            plain = ops.decode_attention(q, k, v, bt, sl, backend=backend, batch_invariant=True)
            plan = _plan(groups, 6, hkv, g, d, bs, dtype, backend, DEV)
            assert plan.batch_invariant and plan.launch is None
            out = ops.cascade_decode(q, k, v, bt, sl, plan)
            assert torch.equal(out, plain), backend
            sub = [0, 3, 4]  # another batch, another grouping
            other = _plan([([0, 1], 4)], 3, hkv, g, d, bs, dtype, backend, DEV)
            out2 = ops.cascade_decode(q[sub], k, v, bt[sub], sl[sub], other)
            assert torch.equal(out2, plain[sub]), backend
    fast = _plan(groups, 6, hkv, g, d, bs, dtype, REF, DEV, batch_invariant=False)
    assert_close(ops.cascade_decode(q, k, v, bt, sl, fast), plain, TOL[dtype], what="fast")
    q_lens = [1, 0, 2, 3, 1, 1]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    qp = torch.randn(8, g * hkv, d, device=DEV).to(dtype)
    inv = _plan(groups, 6, hkv, g, d, bs, dtype, REF, DEV, q_lens=q_lens, batch_invariant=True)
    plain_p = ops.prefill_attention(qp, cu.to(DEV), k, v, bt, sl, backend=REF, batch_invariant=True)
    assert torch.equal(ops.cascade_prefill(qp, k, v, bt, sl, inv), plain_p)


def test_shared_split_fills_whole_waves():
    from pagedkv.ops.cascade_launch import choose_shared_split

    # 64 programs per split on 132 SMs: two splits fill one wave (not 3: 1.5 waves)
    assert choose_shared_split(64, 4096, 64, 132) == 2048
    # 18 programs per split: about 7 splits, rounded to whole key tiles
    split = choose_shared_split(18, 1024, 64, 132)
    assert split % 64 == 0 and 5 <= -(-1024 // split) <= 8
    assert choose_shared_split(4, 64, 64, 132) == 64  # never below one tile per split
