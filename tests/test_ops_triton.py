"""Triton kernels against the torch reference. Without CUDA they run in the Triton
interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay small."""

from __future__ import annotations

import pytest
import torch

from _kvcases import assert_close, paged_case

pytest.importorskip("triton")

from pagedkv import ops  # noqa: E402
from pagedkv.ops import triton_decode, triton_memory, triton_prefill  # noqa: E402
from pagedkv.ops.blocks import copy_blocks_across  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

# (dtype, GQA ratio, block size, head_dim): each ratio, block size and dtype at least once
CASES = [
    (torch.float32, 1, 8, 32),
    (torch.bfloat16, 4, 16, 32),
    (torch.float16, 8, 32, 32),
    (torch.bfloat16, 8, 8, 64),
    (torch.float16, 1, 16, 40),
]


def _ids(case):
    dt, g, bs, d = case
    return f"{str(dt)[6:]}-g{g}-bs{bs}-d{d}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("split", [None, 64])
def test_decode_matches_reference(case, split):
    dtype, g, bs, d = case
    hkv = 2
    lens = [1, bs, bs + 3, 0, 150, 77]  # ragged, partial last blocks, an empty sequence
    k, v, bt, sl = paged_case(lens, g * hkv, hkv, d, bs, dtype, DEV)
    q = torch.randn(len(lens), g * hkv, d, device=DEV).to(dtype)
    ref = ops.decode_attention(q, k, v, bt, sl, backend="reference")
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    triton_decode.decode(q, k, v, bt, sl, d**-0.5, split_tokens=split, out=out)
    assert_close(out, ref, TOL[dtype], what=f"decode {_ids(case)} split={split}")
    via_ops = ops.decode_attention(q, k, v, bt, sl, backend="triton")
    assert_close(via_ops, ref, TOL[dtype], what="decode via ops")


@pytest.mark.parametrize("case", CASES[:3], ids=_ids)
def test_prefill_matches_reference(case):
    dtype, g, bs, d = case
    hkv = 2
    lens, q_lens = [9, 40, 5, 50], [9, 21, 1, 0]  # no prefix, prefix + chunk, decode-like, none
    k, v, bt, sl = paged_case(lens, g * hkv, hkv, d, bs, dtype, DEV)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q = torch.randn(int(cu[-1]), g * hkv, d, device=DEV).to(dtype)
    ref = ops.prefill_attention(q, cu, k, v, bt, sl, backend="reference")
    for bm, bn in ((16, 16), (32, 32)) if g < 8 else ((16, 32),):
        out = triton_prefill.prefill(q, cu, k, v, bt, sl, d**-0.5, block_m=bm, block_n=bn)
        assert_close(out, ref, TOL[dtype], what=f"prefill {_ids(case)} tiles {bm}x{bn}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_kernels_match_reference(dtype):
    kv = torch.randn(2, 2, 9, 8, 2, 16, device=DEV).to(dtype)  # [L, 2, NB, bs, H, D]
    ref = kv.clone()
    n = 11
    k, v = torch.randn(n, 2, 16, device=DEV).to(dtype), torch.randn(n, 2, 16, device=DEV).to(dtype)
    slots = torch.randperm(9 * 8, device=DEV)[:n]
    slots[3] = -1
    triton_memory.write_kv(kv[1, 0], kv[1, 1], slots, k, v)
    ops.write_kv(ref[1, 0], ref[1, 1], slots, k, v, backend="reference")
    assert torch.equal(kv, ref), "write_kv"
    src, dst = torch.tensor([0, 3, 3], device=DEV), torch.tensor([5, 6, 8], device=DEV)
    triton_memory.copy_blocks(kv, src, dst)
    ops.copy_blocks(ref, src, dst, backend="reference")
    assert torch.equal(kv, ref), "copy_blocks"
    ids = torch.tensor([7, 2, 2, 0], device=DEV)
    out = torch.full((4, 2, 2, 8, 2, 16), float("nan"), device=DEV).to(dtype)
    staged = triton_memory.gather_blocks(kv, ids, out=out)
    assert torch.equal(staged, ops.gather_blocks(ref, ids, backend="reference")), "gather"
    fresh = torch.zeros_like(kv)
    triton_memory.scatter_blocks(fresh, ids[:2], staged[:2])
    assert torch.equal(fresh[:, :, [7, 2]], kv[:, :, [7, 2]]), "scatter"
    assert fresh[:, :, [0, 1, 3, 4, 5, 6, 8]].abs().sum() == 0, "scatter wrote outside its blocks"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_copy_blocks_across_pools_matches_reference(dtype):
    """Blocks between two pool tensors of different sizes (the zero-copy route between a
    CPU pool's device view and a GPU pool): one launch, in 8-byte words when a block's
    rows allow (8 x 2 x 16 values) and value by value when not (1 x 1 x 3)."""
    for bs, h, d in ((8, 2, 16), (1, 1, 3)):
        a = torch.randn(2, 2, 9, bs, h, d, device=DEV).to(dtype)
        b = torch.randn(2, 2, 5, bs, h, d, device=DEV).to(dtype)
        ref, orig = b.clone(), b.clone()
        src, dst = torch.tensor([8, 0, 4], device=DEV), torch.tensor([1, 4, 0], device=DEV)
        copy_blocks_across(a, src, b, dst, backend="triton")
        copy_blocks_across(a, src, ref, dst, backend="reference")
        assert torch.equal(b.view(torch.uint8), ref.view(torch.uint8)), f"D={d}"
        assert torch.equal(b[:, :, 1].view(torch.uint8), a[:, :, 8].view(torch.uint8))
        untouched = [2, 3]  # blocks no copy targets keep their bytes
        assert torch.equal(
            b[:, :, untouched].view(torch.uint8), orig[:, :, untouched].view(torch.uint8)
        )


def test_copy_blocks_across_refuses_mismatched_pools():
    a = torch.zeros(2, 2, 9, 8, 2, 16, device=DEV)
    ids = torch.tensor([0], device=DEV)
    for b, what in ((torch.zeros(2, 2, 9, 8, 2, 8, device=DEV), "shape"),
                    (torch.zeros(2, 2, 9, 8, 2, 16, device=DEV).half(), "dtype")):  # fmt: skip
        with pytest.raises(ValueError, match="differ at most in num_blocks"):
            copy_blocks_across(a, ids, b, ids)
        assert not b.any(), what


def test_decode_batch_invariant_triton():
    dtype, hkv, g, d, bs = torch.bfloat16, 2, 4, 32, 16
    split = triton_decode.INVARIANT_SPLIT_TOKENS
    lens = [split + 90, 5, 2 * split + 3, 64, 1, split]  # target: index 0, two splits
    k, v, bt, sl = paged_case(lens, g * hkv, hkv, d, bs, dtype, DEV)
    q = torch.randn(len(lens), g * hkv, d, device=DEV).to(dtype)
    with ops.batch_invariant_mode():
        alone = ops.decode_attention(q[:1], k, v, bt[:1], sl[:1], backend="triton")
        for order in ([0, 1, 2, 3, 4, 5], [3, 0], [5, 4, 2, 1, 0]):
            out = ops.decode_attention(q[order], k, v, bt[order], sl[order], backend="triton")
            assert torch.equal(out[order.index(0)], alone[0]), f"not bit-identical in batch {order}"
        plan = ops.DecodePlan(8, g * hkv, hkv, d, bs, 3 * split, dtype=dtype, device=DEV,
                              backend="triton")  # fmt: skip
        assert torch.equal(plan.run(q[[2, 0]], k, v, bt[[2, 0]], sl[[2, 0]])[1], alone[0])
    ref = ops.decode_attention(q[:1], k, v, bt[:1], sl[:1], backend="reference")
    assert_close(alone, ref, TOL[dtype], what="invariant decode vs reference")


def test_decode_plan_matches_reference():
    dtype, hkv, g, d, bs = torch.float16, 2, 4, 32, 8
    lens = [33, 0, 96]
    k, v, bt, sl = paged_case(lens, g * hkv, hkv, d, bs, dtype, DEV)
    q = torch.randn(3, g * hkv, d, device=DEV).to(dtype)
    plan = ops.DecodePlan(4, g * hkv, hkv, d, bs, 96, dtype=dtype, device=DEV, backend="triton")
    out = plan.run(q, k, v, bt, sl)
    assert out.shape == (3, g * hkv, d) and out.data_ptr() == plan.out.data_ptr()
    ref = ops.decode_attention(q, k, v, bt, sl, backend="reference")
    assert_close(out, ref, TOL[dtype], what="DecodePlan")
    with pytest.raises(ValueError, match="max_seq_len"):
        small = ops.DecodePlan(4, g * hkv, hkv, d, bs, 64, dtype=dtype, device=DEV)
        small.run(q, k, v, bt, sl)
