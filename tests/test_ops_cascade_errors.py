"""Cascade attention: bad plans and bad calls raise clear errors and write nothing."""

from __future__ import annotations

import pytest
import torch

from _cascadecases import grouped_case
from pagedkv import ops
from pagedkv.storage import KVLayout, KVPool

HKV, G, D, BS = 2, 2, 8, 4
KW = dict(num_q_heads=G * HKV, num_kv_heads=HKV, head_dim=D, block_size=BS, max_seq_len=64,
          dtype=torch.float32, device="cpu", backend="reference")  # fmt: skip


def _case():
    k, v, bt, sl, groups = grouped_case([3], [0, 0, -1], [2, 5, 7], HKV, D, BS, torch.float32)
    q = torch.randn(3, G * HKV, D)
    return dict(q=q, k_cache=k, v_cache=v, block_tables=bt, seq_lens=sl), groups


@pytest.mark.parametrize(
    "groups, n, extra, exc, match",
    [
        ("abc", 3, {}, TypeError, "sequence of"),
        ([([0, 1],)], 3, {}, TypeError, "pair"),
        ([([0, 1.5], 2)], 3, {}, TypeError, "ints"),
        ([([0, 1], -1)], 3, {}, ValueError, "shared_blocks"),
        ([([0, 1], True)], 3, {}, ValueError, "shared_blocks"),
        ([([], 2)], 3, {}, ValueError, "no sequences"),
        ([([0, 3], 2)], 3, {}, ValueError, "outside"),
        ([([0, 1], 2), ([1, 2], 1)], 3, {}, ValueError, "one group only"),
        ([([0, 1], 17)], 3, {}, ValueError, "max_seq_len"),
        ([([0, 1], 2)], -1, {}, ValueError, "num_seqs"),
        ([([0, 1], 2)], 3, dict(num_q_heads=3), ValueError, "multiple"),
        ([([0, 1], 2)], 3, dict(head_dim=0), ValueError, "head_dim"),
        ([([0, 1], 2)], 3, dict(dtype="bf16"), TypeError, "dtype"),
        ([([0, 1], 2)], 3, dict(q_lens=[1, 2]), ValueError, "q_lens"),
        ([([0, 1], 2)], 3, dict(q_lens=[1, 2, -1]), ValueError, "q_lens"),
        ([([0, 1], 15)], 3, dict(q_lens=[5, 1, 1]), ValueError, "max_seq_len"),
        ([([0, 1], 2)], 3, dict(shared_split_tokens=0), ValueError, "shared_split"),
        ([([0, 1], 2)], 3, dict(backend="cuda"), ValueError, "unknown ops backend"),
    ],
)
def test_plan_rejects(groups, n, extra, exc, match):
    with pytest.raises(exc, match=match):
        ops.CascadePlan(groups, n, **{**KW, **extra})


def test_plan_accepts_ranges_and_tensors():
    plan = ops.CascadePlan([(range(2), 3), (torch.tensor([2]), 1)], 3, **KW)
    assert [g.seqs for g in plan.groups] == [(0, 1)]  # a group of one is computed plainly
    assert plan.shared_tokens == (12, 12, 0)
    pool = KVPool(KVLayout(1, HKV, D, BS, torch.float32), 4)
    via_pool = ops.CascadePlan.for_pool(pool, [([0, 1], 3)], 3, G * HKV, 64, backend="reference")
    assert via_pool.shape == plan.shape and via_pool.shared_tokens == plan.shared_tokens


def _mutations():
    def reshape_q(a):
        a["q"] = torch.randn(4, G * HKV, D)

    def heads(a):
        a["q"] = torch.randn(3, 2 * G * HKV, D)

    def dtype(a):
        a["q"] = a["q"].double()

    def block(a):
        a["k_cache"] = a["k_cache"].view(-1, 2, HKV, D)
        a["v_cache"] = a["v_cache"].view(-1, 2, HKV, D)

    def rows(a):
        a["block_tables"] = a["block_tables"][:2]

    def not_shared(a):
        a["block_tables"][1, 2] = a["block_tables"][2, 0]

    def short(a):
        a["seq_lens"][1] = 9  # shares 12 tokens

    def too_long(a):
        wide = torch.zeros(3, 17, dtype=torch.int32)
        wide[:, :7] = a["block_tables"]
        a["block_tables"] = wide.masked_fill(wide >= 10**6, 0)  # valid ids: only the length fails
        a["seq_lens"][2] = 65

    def bad_id(a):
        a["block_tables"][2, 0] = 999

    return [
        (reshape_q, ValueError, "does not match the plan"),
        (heads, ValueError, "does not match the plan"),
        (dtype, TypeError, "dtype"),
        (block, ValueError, "does not match the plan"),
        (rows, ValueError, "rows"),
        (not_shared, ValueError, "does not share the first 3 blocks"),
        (short, ValueError, "shorter than its shared prefix"),
        (too_long, ValueError, "max_seq_len"),
        (bad_id, ValueError, "out of range"),
    ]


@pytest.mark.parametrize(
    "change, exc, match", _mutations(), ids=lambda x: getattr(x, "__name__", "-")
)
def test_call_rejects_and_writes_nothing(change, exc, match):
    args, groups = _case()
    plan = ops.CascadePlan(groups, 3, **KW)
    change(args)
    out = torch.full((args["q"].shape[0], args["q"].shape[1], D), 7.0, dtype=args["q"].dtype)
    before = out.clone()
    with pytest.raises(exc, match=match):
        ops.cascade_decode(**args, plan=plan, out=out)
    assert torch.equal(out, before), "a rejected call wrote its output"


def test_call_rejects_wrong_plan_and_out():
    args, groups = _case()
    with pytest.raises(TypeError, match="CascadePlan"):
        ops.cascade_decode(**args, plan=groups)
    decode_plan = ops.CascadePlan(groups, 3, **KW)
    with pytest.raises(ValueError, match="cascade_decode"):
        ops.cascade_prefill(**args, plan=decode_plan)
    prefill_plan = ops.CascadePlan(groups, 3, q_lens=[1, 1, 1], **KW)
    with pytest.raises(ValueError, match="cascade_prefill"):
        ops.cascade_decode(**args, plan=prefill_plan)
    for bad in (torch.empty(3, G * HKV, D + 1), torch.empty(3, G * HKV, D, dtype=torch.half)):
        with pytest.raises(ValueError, match="out must be"):
            ops.cascade_decode(**args, plan=decode_plan, out=bad)
    with pytest.raises(ValueError, match="shorter than its shared prefix plus its chunk"):
        lens = args["seq_lens"].clone()
        lens[0] = 13  # 12 shared + a 2-token chunk needs 14
        ops.cascade_prefill(torch.randn(4, G * HKV, D), args["k_cache"],
                            args["v_cache"], args["block_tables"], lens,
                            ops.CascadePlan(groups, 3, q_lens=[2, 1, 1], **KW))  # fmt: skip
