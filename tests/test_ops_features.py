"""Sliding window, logit softcapping, attention sinks and custom scales in the torch
reference ops: against a float64 dense-mask implementation, against transformers' own
eager attention functions (gpt-oss sinks, Gemma 2 softcap), argument checks, the
no-read-outside-the-window property and batch invariance."""

from __future__ import annotations

import itertools
import types

import pytest
import torch

from _kvcases import assert_close, cu_from, dense_attention, dense_kv, paged_case, poison_outside
from pagedkv import ops

REF = "reference"
pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: threads only cost
# (window, softcap, sinks): every feature alone and mixed (Gemma 2 local: window +
# softcap; gpt-oss: window + sinks)
FEATURES = [
    (w, c, s) for w, c, s in itertools.product([None, 1, 5, 19, 1000], [None, 7.5], [False, True])
]


def _sinks(hq, dtype=torch.float32):
    return (torch.randn(hq) * 2).to(dtype)


def _feat_id(f):
    w, c, s = f
    return f"w{w}-cap{c}-sinks{int(s)}"


@pytest.mark.parametrize("bs", [8, 16, 32])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (16, 2)])  # GQA ratios 1, 4, 8
def test_decode_features_match_dense(bs, hq, hkv):
    d = 16
    lens = [1, 7, bs, 3 * bs + 5, 0, 90]  # window 5/19 are not multiples of any block size
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, torch.float32)
    q = torch.randn(len(lens), hq, d)
    for window, softcap, with_sinks in FEATURES:
        sinks = _sinks(hq) if with_sinks else None
        kw = dict(window=window, softcap=softcap, sinks=sinks)
        for invariant in (False, True):
            out = ops.decode_attention(
                q, k, v, bt, sl, backend=REF, batch_invariant=invariant, **kw
            )
            for b, n in enumerate(lens):
                kd, vd = dense_kv(k, v, bt[b], n)
                ref = dense_attention(q[b : b + 1], kd, vd, [n - 1], **kw)[0]
                what = f"decode b={b} n={n} {_feat_id((window, softcap, with_sinks))} {invariant}"
                assert_close(out[b], ref, 2e-5, what=what)


@pytest.mark.parametrize("bs", [8, 16, 32])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (16, 2)])
def test_prefill_features_match_dense(bs, hq, hkv):
    d = 16
    # no prefix, prefix + chunk, q_len 1, no queries, a chunk over several blocks
    lens, q_lens = [9, 60, 40, 50, 3 * bs + 2], [9, 17, 1, 0, 2 * bs]
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, torch.float32)
    cu = cu_from(q_lens)
    q = torch.randn(int(cu[-1]), hq, d)
    for window, softcap, with_sinks in FEATURES:
        sinks = _sinks(hq) if with_sinks else None
        kw = dict(window=window, softcap=softcap, sinks=sinks)
        out = ops.prefill_attention(q, cu, k, v, bt, sl, backend=REF, **kw)
        for b, (n, m) in enumerate(zip(lens, q_lens)):
            kd, vd = dense_kv(k, v, bt[b], n)
            ref = dense_attention(q[cu[b] : cu[b + 1]], kd, vd, range(n - m, n), **kw)
            what = f"prefill b={b} n={n} m={m} {_feat_id((window, softcap, with_sinks))}"
            assert_close(out[cu[b] : cu[b + 1]], ref, 2e-5, what=what)


@pytest.mark.parametrize("d", [64, 80, 96, 128, 256])
def test_head_dims_and_custom_scale(d):
    """Gemma: head_dim 256, scale query_pre_attn_scalar**-0.5 != head_dim**-0.5; non-power-
    of-two head dims."""
    hq, hkv, bs, scale = 8, 4, 16, 144**-0.5
    lens, q_lens = [33, 20], [5, 20]
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, torch.float32)
    cu = cu_from(q_lens)
    q = torch.randn(int(cu[-1]), hq, d)
    kw = dict(window=11, softcap=50.0)
    pre = ops.prefill_attention(q, cu, k, v, bt, sl, scale, backend=REF, **kw)
    dec = ops.decode_attention(q[[4, 24]], k, v, bt, sl, scale, backend=REF, **kw)
    for b, (n, m) in enumerate(zip(lens, q_lens)):
        kd, vd = dense_kv(k, v, bt[b], n)
        ref = dense_attention(q[cu[b] : cu[b + 1]], kd, vd, range(n - m, n), scale, **kw)
        assert_close(pre[cu[b] : cu[b + 1]], ref, 2e-5, what=f"prefill d={d} b={b}")
        assert_close(dec[b], ref[-1], 2e-5, what=f"decode d={d} b={b}")


def test_float64_inputs_compute_in_float64():
    hq, hkv, d, bs = 8, 2, 16, 8
    lens = [30, 11]
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, torch.float64)
    q = torch.randn(2, hq, d, dtype=torch.float64)
    kw = dict(window=9, softcap=3.0, sinks=_sinks(hq, torch.float64))
    out = ops.decode_attention(q, k, v, bt, sl, backend=REF, **kw)
    assert out.dtype == torch.float64
    for b, n in enumerate(lens):
        kd, vd = dense_kv(k, v, bt[b], n)
        assert_close(out[b], dense_attention(q[b : b + 1], kd, vd, [n - 1], **kw)[0], 1e-12)


# ---- transformers' own eager attention (the models' definition) --------------------------
def _hf_inputs(n, m, hq, hkv, d, dtype=torch.float64, bs=8):
    """A cache of n tokens and the last m of them as queries, for our ops and in the
    [1, H, L, D] layout of transformers' attention functions."""
    k, v, bt, sl = paged_case([n], hq, hkv, d, bs, dtype)
    q = torch.randn(m, hq, d, dtype=dtype)
    kd, vd = dense_kv(k, v, bt[0], n)
    hf = (q.transpose(0, 1)[None], kd.transpose(0, 1)[None], vd.transpose(0, 1)[None])
    return (q, k, v, bt, sl, cu_from([m])), hf


def _hf_mask(n, m, window, dtype):
    """transformers' additive 4D mask for the last m of n positions (sliding_window_overlay:
    kv_idx > q_idx - window, on top of causal)."""
    qpos = torch.arange(n - m, n)[:, None]
    kpos = torch.arange(n)[None, :]
    keep = (kpos <= qpos) & (kpos > qpos - window if window else True)
    return torch.zeros(m, n, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)[None, None]


@pytest.mark.parametrize("window", [None, 6, 13])
def test_sinks_match_gpt_oss_eager(window):
    """gpt-oss passes ``s_aux=module.sinks`` ([Hq], the model dtype); its eager attention
    concatenates the sinks as an extra logit column and drops it after the softmax."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    n, m, hq, hkv, d = 29, 7, 8, 2, 16
    (q, k, v, bt, sl, cu), (hq_, hk_, hv_) = _hf_inputs(n, m, hq, hkv, d)
    sinks = _sinks(hq, torch.float64)
    module = types.SimpleNamespace(num_key_value_groups=hq // hkv, sinks=sinks, training=False)
    scale = d**-0.5
    want, _ = eager_attention_forward(
        module, hq_, hk_, hv_, _hf_mask(n, m, window, torch.float64), scaling=scale
    )  # [1, m, Hq, D]
    kw = dict(window=window, sinks=sinks)
    got = ops.prefill_attention(q, cu, k, v, bt, sl, scale, backend=REF, **kw)
    assert_close(got, want[0], 1e-12, what="prefill vs gpt-oss eager")
    dec = ops.decode_attention(q[-1:], k, v, bt, sl, scale, backend=REF, **kw)
    assert_close(dec[0], want[0, -1], 1e-12, what="decode vs gpt-oss eager")


@pytest.mark.parametrize("window", [None, 9])
def test_softcap_matches_gemma2_eager(window):
    """Gemma 2: scaling query_pre_attn_scalar**-0.5, attn_logit_softcapping 50 (its eager
    softmax runs in float32, hence the tolerance)."""
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    n, m, hq, hkv, d = 40, 5, 8, 4, 32
    (q, k, v, bt, sl, cu), (hq_, hk_, hv_) = _hf_inputs(n, m, hq, hkv, d)
    q, hq_ = q * 6, hq_ * 6  # large logits, so that the cap matters
    scale, cap = 256**-0.5, 5.0
    module = types.SimpleNamespace(num_key_value_groups=hq // hkv, head_dim=d, training=False)
    want, _ = eager_attention_forward(
        module, hq_, hk_, hv_, _hf_mask(n, m, window, torch.float64), scaling=scale, softcap=cap
    )
    got = ops.prefill_attention(q, cu, k, v, bt, sl, scale, window=window, softcap=cap, backend=REF)
    assert_close(got, want[0], 1e-6, what="prefill vs gemma2 eager")
    uncapped = ops.prefill_attention(q, cu, k, v, bt, sl, scale, window=window, backend=REF)
    assert (uncapped - got).abs().max() > 1e-3, "the cap changed nothing: test too weak"


# ---- argument checks ---------------------------------------------------------------------
def _args():
    k, v, bt, sl = paged_case([5, 9], 8, 2, 16, 4, torch.float32)
    return dict(q=torch.randn(2, 8, 16), k_cache=k, v_cache=v, block_tables=bt, seq_lens=sl)


BAD = [
    (dict(window=0), ValueError, "window must be >= 1"),
    (dict(window=-3), ValueError, "window must be >= 1"),
    (dict(window=2.5), TypeError, "window must be an int"),
    (dict(window=True), TypeError, "window must be an int"),
    (dict(window="8"), TypeError, "window must be an int"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=-1), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a finite"),
    (dict(softcap=float("nan")), ValueError, "softcap must be a finite"),
    (dict(softcap="50"), TypeError, "softcap must be a real number"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite number > 0"),
    (dict(scale=0.0), ValueError, "scale must be a finite number > 0"),
    (dict(sinks=torch.zeros(4)), ValueError, r"sinks must be \[Hq\] = \[8\]"),
    (dict(sinks=torch.zeros(1, 8)), ValueError, r"sinks must be \[Hq\]"),
    (dict(sinks=torch.zeros(8, dtype=torch.float16)), TypeError, "sinks dtype"),
    (dict(sinks=torch.zeros(8, dtype=torch.int64)), TypeError, "sinks dtype"),
    (dict(sinks=[0.0] * 8), TypeError, "sinks must be a torch.Tensor"),
    (dict(sinks=torch.zeros(8, device="meta")), ValueError, "sinks is on device meta"),
    (dict(sinks=torch.full((8,), float("nan"))), ValueError, "NaN"),
    (dict(sinks=torch.full((8,), float("inf"))), ValueError, r"\+inf"),
]


@pytest.mark.parametrize("bad, exc, match", BAD)
def test_feature_arguments_rejected(bad, exc, match):
    args = _args()
    with pytest.raises(exc, match=match):
        ops.decode_attention(**args, **bad, backend=REF)
    cu = cu_from([1, 1])
    with pytest.raises(exc, match=match):
        ops.prefill_attention(
            args["q"], cu, args["k_cache"], args["v_cache"], args["block_tables"],
            args["seq_lens"], **bad, backend=REF,
        )  # fmt: skip
    if "sinks" not in bad:  # a plan fixes window, softcap and scale when it is built
        with pytest.raises(exc, match=match):
            ops.DecodePlan(2, 8, 2, 16, 4, 64, dtype=torch.float32, device="cpu", **bad)
    else:
        plan = ops.DecodePlan(2, 8, 2, 16, 4, 64, dtype=torch.float32, device="cpu")
        with pytest.raises(exc, match=match):
            plan.run(args["q"], args["k_cache"], args["v_cache"], args["block_tables"],
                     args["seq_lens"], sinks=bad["sinks"])  # fmt: skip


def test_minus_inf_sink_is_no_sink():
    args = _args()
    base = ops.decode_attention(**args, backend=REF)
    none = ops.decode_attention(**args, sinks=torch.full((8,), float("-inf")), backend=REF)
    assert_close(none, base, 1e-6, what="-inf sinks")


def test_window_covering_the_context_is_full_attention():
    args = _args()
    full = ops.decode_attention(**args, backend=REF, batch_invariant=True)
    wide = ops.decode_attention(**args, window=9, backend=REF, batch_invariant=True)
    assert torch.equal(full, wide)
    one = ops.decode_attention(**args, window=1, backend=REF)  # sees only itself: its value
    k, v, bt, sl = (args[x] for x in ("k_cache", "v_cache", "block_tables", "seq_lens"))
    for b, n in enumerate(sl.tolist()):
        last = dense_kv(k, v, bt[b], n)[1][-1]  # [Hkv, D]
        assert_close(one[b], last.repeat_interleave(4, dim=0), 1e-6, what="window 1")


# ---- reads and batch invariance ------------------------------------------------------------
def test_reference_reads_only_the_window():
    hq, hkv, d, bs, window = 8, 2, 16, 8, 13
    lens, q_lens = [70, 45, 3, 0], [6, 1, 3, 0]
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, torch.float32)
    cu = cu_from(q_lens)
    q = torch.randn(int(cu[-1]), hq, d)
    kw = dict(window=window, softcap=20.0, sinks=_sinks(hq))
    clean_pre = ops.prefill_attention(q, cu, k, v, bt, sl, backend=REF, **kw)
    qd = torch.randn(len(lens), hq, d)
    clean_dec = [ops.decode_attention(qd, k, v, bt, sl, backend=REF, batch_invariant=i, **kw)
                 for i in (False, True)]  # fmt: skip
    kp, vp = k.clone(), v.clone()
    poison_outside(kp, vp, bt, lens, q_lens, window)
    assert torch.equal(ops.prefill_attention(q, cu, kp, vp, bt, sl, backend=REF, **kw), clean_pre)
    kp, vp = k.clone(), v.clone()
    poison_outside(kp, vp, bt, lens, [1] * len(lens), window)
    assert kp.isnan().any()
    for inv, clean in zip((False, True), clean_dec):
        out = ops.decode_attention(qd, kp, vp, bt, sl, backend=REF, batch_invariant=inv, **kw)
        assert_close(out, clean, 1e-6, what=f"poisoned decode invariant={inv}")


def test_decode_batch_invariant_with_features_reference():
    hq, hkv, d, bs = 8, 2, 32, 16
    lens = [37, 3, 64, 1, 50, 0, 29]
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, torch.bfloat16)
    q = torch.randn(len(lens), hq, d).to(torch.bfloat16)
    kw = dict(window=21, softcap=30.0, sinks=_sinks(hq, torch.bfloat16))
    with ops.batch_invariant_mode():
        for target in (0, 4):
            one = [target]
            alone = ops.decode_attention(q[one], k, v, bt[one], sl[one], backend=REF, **kw)
            for order in (list(range(len(lens))), [target, 5, 1], [6, 5, 1, target]):
                out = ops.decode_attention(q[order], k, v, bt[order], sl[order], backend=REF, **kw)
                assert torch.equal(out[order.index(target)], alone[0]), f"batch {order}"


def test_table_entries_before_the_window_are_ignored():
    """Blocks wholly before every query's window may be released (their table entries
    -1 or stale): checked calls accept them and give the same result; an entry inside
    the window is still checked."""
    hq, hkv, d, bs, window = 8, 2, 16, 8, 11
    lens, q_lens = [70, 45, 9], [5, 1, 9]
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, torch.float32)
    cu = cu_from(q_lens)
    q = torch.randn(int(cu[-1]), hq, d)
    qd = torch.randn(3, hq, d)
    kw = dict(window=window, softcap=9.0)
    pre = ops.prefill_attention(q, cu, k, v, bt, sl, backend=REF, **kw)
    dec = ops.decode_attention(qd, k, v, bt, sl, backend=REF, **kw)
    released = bt.clone()
    for b, (n, m) in enumerate(zip(lens, q_lens)):
        first_block = max(0, n - m - window + 1) // bs
        released[b, :first_block] = -1 if b % 2 else 10**6
    assert (released != bt).any()
    assert torch.equal(ops.prefill_attention(q, cu, k, v, released, sl, backend=REF, **kw), pre)
    assert torch.equal(ops.decode_attention(qd, k, v, released, sl, backend=REF, **kw), dec)
    plan = ops.DecodePlan(3, hq, hkv, d, bs, 80, dtype=torch.float32, device="cpu", **kw)
    assert_close(plan.run(qd, k, v, released, sl), dec, 1e-6, what="plan, released blocks")
    with pytest.raises(ValueError, match="out of range"):  # full attention reads them
        ops.decode_attention(qd, k, v, released, sl, backend=REF)
    inside = released.clone()
    inside[0, (70 - window) // bs] = -1  # the block holding the decode window's first key
    with pytest.raises(ValueError, match=r"block_tables\[0, 7\] = -1 is out of range"):
        ops.decode_attention(qd, k, v, inside, sl, backend=REF, **kw)
