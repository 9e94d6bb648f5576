"""The torch reference ops against dense SDPA; argument checks; batch invariance."""

from __future__ import annotations

import pytest
import torch

from _kvcases import assert_close, dense_kv, paged_case, sdpa
from pagedkv import ops
from pagedkv.storage import KVLayout, KVPool

REF = "reference"


@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("bs", [4, 16])
def test_decode_matches_sdpa(hq, hkv, bs):
    lens = [1, 5, bs, 3 * bs + 1, 40]
    k, v, bt, sl = paged_case(lens, hq, hkv, 16, bs, torch.float32)
    q = torch.randn(len(lens), hq, 16)
    for invariant in (False, True):
        out = ops.decode_attention(q, k, v, bt, sl, backend=REF, batch_invariant=invariant)
        for b, n in enumerate(lens):
            kd, vd = dense_kv(k, v, bt[b], n)
            ref = sdpa(q[b : b + 1], kd, vd)[0]
            assert_close(out[b], ref, 1e-5, what=f"decode b={b} n={n} invariant={invariant}")


def test_decode_empty_sequence_gives_zeros():
    k, v, bt, sl = paged_case([0, 3], 4, 2, 8, 4, torch.float32)
    q = torch.randn(2, 4, 8)
    for invariant in (False, True):
        out = ops.decode_attention(q, k, v, bt, sl, backend=REF, batch_invariant=invariant)
        assert torch.equal(out[0], torch.zeros(4, 8)) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_matches_sdpa(dtype):
    hq, hkv, d, bs = 8, 2, 16, 4
    lens, q_lens = [7, 20, 4, 33], [7, 5, 1, 12]  # first: no prefix; others: cached prefix
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), hq, d).to(dtype)
    out = ops.prefill_attention(q, cu, k, v, bt, sl, backend=REF)
    assert out.dtype == dtype
    for b, (n, m) in enumerate(zip(lens, q_lens)):
        kd, vd = dense_kv(k, v, bt[b], n)
        ref = sdpa(q[cu[b] : cu[b + 1]], kd, vd, q_start=n - m)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert_close(out[cu[b] : cu[b + 1]], ref, tol, what=f"prefill b={b}")


def test_prefill_last_row_equals_decode():
    k, v, bt, sl = paged_case([9, 17], 4, 2, 8, 4, torch.float32)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    q = torch.randn(7, 4, 8)
    pre = ops.prefill_attention(q, cu, k, v, bt, sl, backend=REF)
    dec = ops.decode_attention(q[[2, 6]], k, v, bt, sl, backend=REF)
    assert_close(pre[[2, 6]], dec, 1e-6, what="last prefill row vs decode")


def test_paged_wrappers_use_pool_layer():
    pool = KVPool(KVLayout(2, 2, 8, 4, torch.float32), 8)
    pool.kv.normal_()
    bt = torch.tensor([[3, 1]], dtype=torch.int32)
    sl = torch.tensor([6], dtype=torch.int32)
    q = torch.randn(1, 4, 8)
    out = ops.paged_decode(q, pool, 1, bt, sl, backend=REF)
    ref = ops.decode_attention(q, pool.k(1), pool.v(1), bt, sl, backend=REF)
    assert torch.equal(out, ref)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    out = ops.paged_prefill(q.expand(2, 4, 8).contiguous(), cu, pool, 0, bt, sl, backend=REF)
    assert out.shape == (2, 4, 8)


# ---- argument checks -------------------------------------------------------------------------
def _decode_args():
    k, v, bt, sl = paged_case([5, 9], 8, 2, 16, 4, torch.float32)
    return dict(q=torch.randn(2, 8, 16), k_cache=k, v_cache=v, block_tables=bt, seq_lens=sl)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (lambda a: a.update(q=a["q"].half()), TypeError, "dtype"),
        (lambda a: a.update(q=torch.randn(2, 7, 16)), ValueError, "multiple"),
        (lambda a: a.update(q=torch.randn(2, 8, 8)), ValueError, "head_dim"),
        (lambda a: a.update(q=torch.randn(8, 16)), ValueError, "Hq"),
        (lambda a: a.update(block_tables=a["block_tables"].float()), TypeError, "int32"),
        (lambda a: a.update(seq_lens=a["seq_lens"][:1]), ValueError, "rows"),
        (
            lambda a: a.update(seq_lens=torch.tensor([5, 30], dtype=torch.int32)),
            ValueError,
            "capacity",
        ),
        (lambda a: a.update(seq_lens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, ">= 0"),
        (lambda a: a["block_tables"].__setitem__((1, 0), 999), ValueError, "out of range"),
        (lambda a: a.update(v_cache=a["v_cache"][:, :, :1]), ValueError, "same shape"),
        (lambda a: a.update(q=a["q"].to("meta")), ValueError, "device"),
    ],
)
def test_decode_rejects(change, exc, match):
    args = _decode_args()
    change(args)
    with pytest.raises(exc, match=match):
        ops.decode_attention(**args, backend=REF)


def test_prefill_rejects():
    k, v, bt, sl = paged_case([5, 9], 4, 2, 8, 4, torch.float32)
    q = torch.randn(6, 4, 8)
    for cu, match in (([0, 2, 5], "end at"), ([0, 4, 2], "never decrease"), ([0, 6, 6], "queries")):
        with pytest.raises(ValueError, match=match):
            ops.prefill_attention(q, torch.tensor(cu, dtype=torch.int32), k, v, bt, sl, backend=REF)


def test_backend_selection():
    with pytest.raises(ValueError, match="unknown"):
        ops.set_backend("cuda")
    with ops.use_backend("reference"):
        assert ops.get_backend() == "reference"
    assert ops.get_backend() is None
    if not torch.cuda.is_available():
        args = _decode_args()
        import os

        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            with pytest.raises(ValueError, match="CUDA"):
                ops.decode_attention(**args, backend="triton")


# ---- batch invariance --------------------------------------------------------------------------
def test_decode_batch_invariant_reference():
    hq, hkv, d, bs = 8, 2, 32, 4
    lens = [37, 3, 64, 1, 50, 12, 29]
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, torch.bfloat16)
    q = torch.randn(len(lens), hq, d).to(torch.bfloat16)
    target = 4
    with ops.batch_invariant_mode():
        assert ops.is_batch_invariant()
        alone = ops.decode_attention(q[target : target + 1], k, v, bt[target : target + 1],
                                     sl[target : target + 1], backend=REF)  # fmt: skip
        for order in (list(range(len(lens))), [target, 0, 1], [6, 5, 1, target]):
            out = ops.decode_attention(q[order], k, v, bt[order], sl[order], backend=REF)
            assert torch.equal(out[order.index(target)], alone[0]), f"batch {order}"
    assert not ops.is_batch_invariant()


# ---- KV movement ops ----------------------------------------------------------------------------
def test_gather_scatter_blocks_inverse():
    kv = torch.randn(2, 2, 6, 4, 2, 8)
    ids = torch.tensor([4, 0, 2])
    data = ops.gather_blocks(kv, ids, backend=REF)
    assert data.shape == (3, 2, 2, 4, 2, 8)
    assert torch.equal(data[0], kv[:, :, 4])
    kv2 = torch.zeros_like(kv)
    ops.scatter_blocks(kv2, ids, data, backend=REF)
    assert torch.equal(kv2[:, :, ids], kv[:, :, ids])
    ops.copy_blocks(kv2, torch.tensor([4]), torch.tensor([5]), backend=REF)
    assert torch.equal(kv2[:, :, 5], kv[:, :, 4])
