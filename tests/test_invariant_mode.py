"""batch_invariant_mode() as a whole: the dispatch hook is scoped (per block, per thread,
exception-safe, nothing left behind) and makes unmodified Hugging Face models give a
sequence's logits bit-identical alone and inside a batch."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from _models import tiny
from pagedkv import ops
from pagedkv.ops.invariant_mode import BatchInvariantOps, hook_active

pytestmark = pytest.mark.usefixtures("single_thread")


def _rows_equal_across_m(fn, k=64, seed=0) -> bool:
    """fn(x [M, k]) -> [M, ...]: is row 0 the same at M = 1 and M = 9?"""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, k, generator=g)
    return torch.equal(fn(x[:1])[0], fn(x)[0])


def test_mode_routes_torch_ops_only_inside_its_block():
    w = torch.randn(48, 64)
    assert not hook_active() and not ops.is_batch_invariant()
    with ops.batch_invariant_mode():
        assert hook_active() and ops.is_batch_invariant()
        assert _rows_equal_across_m(lambda x: F.linear(x, w))
        assert _rows_equal_across_m(lambda x: x @ w.t())
        with ops.batch_invariant_mode(False):  # the flag is read per op
            assert not ops.is_batch_invariant()
        with ops.batch_invariant_mode():  # nested: nothing pushed twice
            assert (
                sum(isinstance(m, BatchInvariantOps) for m in _get_current_dispatch_mode_stack())
                == 1
            )
    assert not hook_active() and not ops.is_batch_invariant()
    assert not _rows_equal_across_m(lambda x: F.linear(x, w)), "torch's CPU GEMM varies with M"


def test_mode_is_left_on_error_and_per_thread():
    with pytest.raises(RuntimeError, match="boom"), ops.batch_invariant_mode():
        raise RuntimeError("boom")
    assert not hook_active() and not ops.is_batch_invariant()
    seen = []
    with ops.batch_invariant_mode():
        t = threading.Thread(target=lambda: seen.append((hook_active(), ops.is_batch_invariant())))
        t.start()
        t.join()
    assert seen == [(False, False)]


def test_invariant_forward_follows_the_flag():
    with ops.invariant_forward():
        assert not hook_active()  # flag off: no-op, zero overhead
    token_free = ops.is_batch_invariant()
    ops.set_batch_invariant(True)
    try:
        assert not hook_active()  # the flag alone does not route torch ops
        with ops.invariant_forward():
            assert hook_active()
            w = torch.randn(16, 64)
            assert _rows_equal_across_m(lambda x: F.linear(x, w))
        assert not hook_active()
    finally:
        ops.set_batch_invariant(token_free)


@pytest.mark.parametrize("grad_mode", [torch.inference_mode, torch.no_grad, torch.enable_grad])
def test_every_level_of_dispatch_is_covered(grad_mode):
    """Composites reach the mode whole under inference_mode, decomposed otherwise."""
    w, b = torch.randn(48, 64), torch.randn(48)
    kv = torch.randn(1, 1, 5, 64)
    fns = {
        "linear": lambda x: F.linear(x, w, b),
        "matmul 3d": lambda x: torch.matmul(x[None], w.t())[0],
        "einsum": lambda x: torch.einsum("mk,nk->mn", x, w),
        "mean": lambda x: x.pow(2).mean(-1, keepdim=True),
        "sum": lambda x: x.sum(-1),
        "softmax": lambda x: F.softmax(x * 30, dim=-1, dtype=torch.float32),
        "log_softmax": lambda x: F.log_softmax(x * 30, dim=-1),
        "rms_norm": lambda x: F.rms_norm(x, (64,), torch.ones(64)),
        "layer_norm": lambda x: F.layer_norm(x, (64,)),
        "sdpa": lambda x: F.scaled_dot_product_attention(x[None, None], kv, kv)[0, 0],
        "bmm": lambda x: torch.bmm(x[None], w.t()[None])[0],
    }
    with grad_mode(), ops.batch_invariant_mode():
        for name, fn in fns.items():
            assert _rows_equal_across_m(fn), name


def test_results_have_torch_shapes_and_dtypes():
    x, w = torch.randn(2, 3, 8), torch.randn(5, 8)
    cases = [
        lambda t: F.linear(t, w), lambda t: t.sum(), lambda t: t.mean((0, 1)),
        lambda t: t.softmax(1), lambda t: t.half().softmax(-1, dtype=torch.float32),
        lambda t: t.bfloat16().mean(-1), lambda t: t.cumsum(1), lambda t: t @ t.transpose(1, 2),
        lambda t: F.layer_norm(t, (3, 8)), lambda t: t.sum(dtype=torch.float16),
        lambda t: torch.nn.functional.silu(t.bfloat16()), lambda t: t.abs().bfloat16().rsqrt(),
    ]  # fmt: skip
    for i, fn in enumerate(cases):
        want = fn(x)
        with ops.batch_invariant_mode():
            got = fn(x)
        assert got.shape == want.shape and got.dtype == want.dtype, f"case {i}"
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2, msg=f"case {i}")


def test_ops_without_an_invariant_version_warn_once_and_run():
    x = torch.randn(4, 16)
    with ops.batch_invariant_mode(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v1, v2 = x.var(-1), x.var(-1)
        torch.arange(10).sum()  # integer sums are exact: no warning
    assert torch.allclose(v1, x.var(-1)) and torch.equal(v1, v2)
    msgs = [str(w.message) for w in caught if "batch_invariant_mode" in str(w.message)]
    assert len(msgs) == 1 and "var" in msgs[0]


def _last_logits(model, ids, mask=None) -> torch.Tensor:
    """Logits of each row's last real token."""
    out = model(input_ids=ids, attention_mask=mask).logits
    if mask is None:
        return out[:, -1]
    last = mask.sum(-1) - 1
    return out[torch.arange(ids.shape[0]), last]


def _decode_logits(model, ids) -> torch.Tensor:
    """Prefill all but the last token with transformers' default cache, decode the last."""
    out = model(input_ids=ids[:, :-1], use_cache=True)
    return model(input_ids=ids[:, -1:], cache=out.past_key_values).logits[:, -1]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_model_logits_of_a_sequence_do_not_depend_on_its_batch(family, dtype, attn):
    model = tiny(family).to(dtype)
    model.config._attn_implementation = attn
    g = torch.Generator().manual_seed(hash((family, attn)) % 1000)
    seq = torch.randint(0, 256, (1, 11), generator=g)
    others = torch.randint(0, 256, (7, 11), generator=g)
    batch = torch.cat([others[:3], seq, others[3:]])  # the sequence is row 3 of 8
    # right-padded ragged batch (shown, not asserted: padding lengthens the attention
    # reduction over keys, and CPU BLAS sums K = 11 and K = 16 + zeros differently)
    lens = torch.tensor([5, 11, 16, 2])
    ragged = torch.randint(0, 256, (4, 16), generator=g)
    ragged[1, :11] = seq[0]
    mask = (torch.arange(16)[None] < lens[:, None]).long()
    results, padded = {}, {}
    for on in (False, True):
        with torch.inference_mode(), ops.batch_invariant_mode(on):
            results[on] = {
                "forward": (_last_logits(model, seq)[0], _last_logits(model, batch)[3]),
                "decode": (_decode_logits(model, seq)[0], _decode_logits(model, batch)[3]),
            }
            padded[on] = torch.equal(
                results[on]["forward"][0], _last_logits(model, ragged, mask)[1]
            )
    default = {k: torch.equal(a, b) for k, (a, b) in results[False].items()}
    print(
        f"{family} {dtype} {attn} alone == in batch without the mode: {default}; "
        f"alone == right-padded batch: {padded[False]} without, {padded[True]} with the mode"
    )
    for kind, (alone, in_batch) in results[True].items():
        diff = (alone.float() - in_batch.float()).abs().max().item()
        assert torch.equal(alone, in_batch), f"{kind}: max |diff| {diff:.3g} with the mode on"
    for kind in results[True]:  # the mode changes results by rounding only
        torch.testing.assert_close(
            results[True][kind][0].float(), results[False][kind][0].float(), rtol=0.05, atol=0.05
        )


@pytest.mark.slow
def test_model_forward_through_the_triton_kernels_is_invariant():
    """The same through the Triton GEMM and row kernels (the interpreter without CUDA)."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny("llama").to(dev, torch.bfloat16)
    g = torch.Generator().manual_seed(4)
    seq = torch.randint(0, 256, (1, 4), generator=g).to(dev)
    batch = torch.cat([torch.randint(0, 256, (2, 4), generator=g).to(dev), seq])
    with torch.inference_mode(), ops.use_backend("triton"), ops.batch_invariant_mode():
        alone = _last_logits(model, seq)[0]
        in_batch = _last_logits(model, batch)[2]
    assert torch.equal(alone, in_batch)
    with torch.inference_mode():
        torch.testing.assert_close(
            alone.float(), _last_logits(model, seq)[0].float(), rtol=0.05, atol=0.05
        )


def test_direct_calls_inside_the_mode_compute_once():
    """pagedkv.ops.invariant called inside the mode gives the same bits as outside it (its
    own torch ops are not routed through the hook a second time)."""
    from pagedkv.ops import invariant as inv

    x, w = torch.randn(37, 64), torch.randn(48, 64)
    want = (inv.linear(x, w), inv.softmax(x, -1), inv.reduce_mean(x, -1))
    with ops.batch_invariant_mode():
        got = (inv.linear(x, w), inv.softmax(x, -1), inv.reduce_mean(x, -1))
        assert hook_active()
    assert all(torch.equal(a, b) for a, b in zip(got, want))
