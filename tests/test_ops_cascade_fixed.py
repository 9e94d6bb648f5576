"""Fixed-capacity cascade plans (refilled in place, as CUDA graphs replay them) against
plain paged decode: the torch reference and the Triton kernels (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from _cascadecases import grouped_case
from _kvcases import assert_close
from pagedkv import ops
from pagedkv.ops.cascade_fixed import CascadeGrouping, FixedCascadePlan

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _grouping(n, hkv, g, d, bs, dtype, device=DEV, **kw):
    return CascadeGrouping(n, num_q_heads=g * hkv, num_kv_heads=hkv, head_dim=d, block_size=bs,
                           dtype=dtype, device=device, **kw)  # fmt: skip


# rows 7, 8: padding rows (length 0) as in a CUDA-graph bucket
GROUP_OF = [0, -1, 1, 0, 0, 1, 2, -1, -1]
PRIVATE = [3, 13, 0, 17, 9, 9, 4, 0, 0]


def _case(dtype, hkv, d, bs):
    torch.manual_seed(0)  # the case and the queries drawn after it
    k, v, bt, sl, groups = grouped_case([3, 2, 1], GROUP_OF, PRIVATE, hkv, d, bs, dtype, DEV)
    sl[7:] = 0
    return k, v, bt, sl, [grp for grp in groups if 7 not in grp[0]]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refilled_plan_matches_plain_decode_for_each_grouping(backend, dtype):
    if backend == "triton":
        pytest.importorskip("triton")
    hkv, g, d, bs = 2, 4, 16, 8
    k, v, bt, sl, groups = _case(dtype, hkv, d, bs)
    q = torch.randn(len(GROUP_OF), g * hkv, d, device=DEV).to(dtype)
    ref = ops.decode_attention(q, k, v, bt, sl, backend="reference")
    grouping = _grouping(len(GROUP_OF), hkv, g, d, bs, dtype, max_groups=2)
    plans = [FixedCascadePlan(grouping, max_seq_len=n, backend=backend) for n in (64, 160)]
    # the same plans (and device buffers) for every grouping: what a graph replays
    for trial in (groups, groups[:1], [], [(groups[0][0][:1], 3)], groups):
        grouping.refill(trial)
        assert len(grouping.groups) == min(2, len([t for t in trial if len(t[0]) > 1]))
        for plan in plans:
            out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
            ops.cascade_decode(q, k, v, bt, sl, plan, out=out, check=False)
            assert_close(out, ref, TOL[dtype], what=f"{backend} {plan} {trial}")
            assert torch.equal(out[7:], torch.zeros_like(out[7:])), "padding rows give zeros"
    if backend == "triton":
        launch = plans[0].launch
        assert launch.n_tiles == grouping.max_tiles and launch.meta is grouping.meta


def test_grouping_keeps_the_groups_that_save_most_and_checks_its_input():
    hkv, g, d, bs = 2, 4, 16, 8
    grouping = _grouping(6, hkv, g, d, bs, torch.float32, max_groups=1)
    grouping.refill([([0, 1], 4), ([2, 3, 4], 3), ([5], 9)])
    assert [(grp.seqs, grp.shared_blocks) for grp in grouping.groups] == [((2, 3, 4), 3)]
    assert grouping.shared_tokens == (0, 0, 24, 24, 24, 0)
    before = (grouping.buffer.clone(), grouping.groups)
    bad_groupings = [
        ([([0, 6], 1)], ValueError), ([([0, 1], 1), ([1, 2], 1)], ValueError),
        ([([0, 1], -1)], ValueError), ("x", TypeError), ([(0, 1)], TypeError),
    ]  # fmt: skip
    for bad, err in bad_groupings:
        with pytest.raises(err):
            grouping.refill(bad)
        assert torch.equal(grouping.buffer, before[0]) and grouping.groups == before[1]
    with pytest.raises(ValueError, match="max_seq_len"):
        FixedCascadePlan(grouping, max_seq_len=0)
    with pytest.raises(TypeError, match="CascadeGrouping"):
        FixedCascadePlan(object(), max_seq_len=8)


def test_checked_call_verifies_the_refilled_grouping():
    hkv, g, d, bs = 2, 2, 16, 8
    k, v, bt, sl, groups = _case(torch.float32, hkv, d, bs)
    q = torch.randn(len(GROUP_OF), g * hkv, d, device=DEV)
    grouping = _grouping(len(GROUP_OF), hkv, g, d, bs, torch.float32)
    plan = FixedCascadePlan(grouping, max_seq_len=64, backend="reference")
    grouping.refill(groups)
    ops.cascade_decode(q, k, v, bt, sl, plan, check=True)
    grouping.refill([([0, 2], 2)])  # row 2 does not share row 0's blocks
    with pytest.raises(ValueError, match="does not share"):
        ops.cascade_decode(q, k, v, bt, sl, plan, check=True)
