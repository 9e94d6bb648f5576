"""Batch invariance on CUDA: the Triton GEMM and row kernels at LLM projection shapes,
model forwards in bf16, CUDA-graph capture under the mode, the sampler. torch's own
kernels are measured alongside (printed, not asserted)."""

from __future__ import annotations

import pytest
import torch
import transformers

from _models import tiny
from pagedkv import ops
from pagedkv.engine.request import SamplingParams
from pagedkv.engine.sampling import probabilities
from pagedkv.ops import gemm_select as gs
from pagedkv.ops import invariant as inv
from pagedkv.ops import triton_matmul as tm

pytestmark = pytest.mark.gpu
MS = (1, 3, 7, 64, 129, 1000, 4096)
SHAPES = [(576, 1536), (1536, 576), (2048, 8192), (8192, 2048), (576, 49152)]  # (K, N)


def _embed(row, m, at):
    x = torch.randn(m, row.shape[0], device="cuda", dtype=row.dtype)
    x[at] = row
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_gemm_rows_are_invariant_on_cuda(dtype, shape):
    k, n = shape
    torch.manual_seed(k + n)
    w = torch.randn(n, k, device="cuda").to(dtype) / k**0.5
    b = torch.randn(n, device="cuda").to(dtype)
    row = torch.randn(k, device="cuda").to(dtype)
    alone = inv.linear(row[None], w, b)[0]
    torch_alone = torch.nn.functional.linear(row[None], w, b)[0]
    torch_same = []
    for m in MS:
        if m * k * n > 2**33 and dtype == torch.float32:  # CUDA-core float32: slow
            continue
        for at in sorted({0, m // 2, m - 1}):
            x = _embed(row, m, at)
            got = inv.linear(x, w, b)
            assert torch.equal(got[at], alone), f"{dtype} K={k} N={n}: row {at} of M={m} differs"
            torch_same.append(torch.equal(torch.nn.functional.linear(x, w, b)[at], torch_alone))
        exact = x.double() @ w.double().t() + b.double()
        err = ((got.double() - exact).abs().max() / exact.abs().max()).item()
        err_torch = (
            (torch.nn.functional.linear(x, w, b).double() - exact).abs().max() / exact.abs().max()
        ).item()
        tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        assert err <= tol, f"M={m}: rel err {err:.2e} (cuBLAS: {err_torch:.2e})"
    print(f"cuBLAS {dtype} K={k} N={n}: a row identical at every M: {all(torch_same)}")
    mine = {key[-1]: v for key, v in tm.SELECTOR.verdicts().items() if key[2:4] == (n, k)}
    print(f"ours {dtype} K={k} N={n}: configs checked against the default: {mine}")


def _ladder(dtype):
    precision = tm.float32_precision() if dtype == torch.float32 else "native"
    return precision, gs.ladder(dtype, precision)


CONFIG_CASES = [
    (dt, i) for dt in (torch.bfloat16, torch.float32) for i in range(len(_ladder(dt)[1]))
]  # fmt: skip (float16 runs the bf16 ladder's code: the default is tested above)


@pytest.mark.parametrize("dtype,index", CONFIG_CASES, ids=str)
@pytest.mark.parametrize("shape", [(576, 1536), (2048, 512), (8192, 2048)], ids=str)
def test_every_gemm_config_is_m_invariant_on_cuda(dtype, index, shape):
    """Each configuration on its own (forced): a row's bits at every M and position. Whether
    it also matches the default configuration is printed (the selector checks it before
    use; test_the_selector_agrees_with_what_it_checks asserts that)."""
    k, n = shape
    _, configs = _ladder(dtype)
    cfg = configs[index]
    torch.manual_seed(index)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    row = torch.randn(k, device="cuda").to(dtype)
    alone = tm.gemm(row[None, None], w.t()[None], config=cfg)[0, 0]
    for m in (1, 7, 64, 129, 1000):
        for at in sorted({0, m // 2, m - 1}):
            got = tm.gemm(_embed(row, m, at)[None], w.t()[None], config=cfg)[0, at]
            assert torch.equal(got, alone), f"{cfg.tag} {dtype} K={k} N={n}: row {at} of {m}"
    x = torch.randn(192, k, device="cuda").to(dtype)
    f32 = torch.float32  # the accumulators, before any rounding
    same = torch.equal(
        tm.gemm(x[None], w.t()[None], config=cfg, out_dtype=f32),
        tm.gemm(x[None], w.t()[None], config=configs[0], out_dtype=f32),
    )
    print(f"{cfg.tag} {dtype} K={k} N={n}: M-invariant; same bits as {configs[0].tag}: {same}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_the_selector_agrees_with_what_it_checks_on_cuda(dtype):
    """A fresh selector's verdict for each ladder configuration is what a direct
    comparison on other random data finds; rows through the selector are identical at
    every M although the configuration changes with M."""
    k, n = 2048, 2048
    precision, configs = _ladder(dtype)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    x = torch.randn(300, k, device="cuda").to(dtype)
    want = tm.gemm(x[None], w.t()[None], config=configs[0])[0]
    sel = gs.GemmSelector(tm._run_2d, configs=lambda dt, p: configs)
    used = set()
    for m in (1, 2, 16, 64, 100, 256, 300):
        used.add(gs.pick(configs, 1, m, n, tm.num_sms(x.device)).tag)
        got = tm.gemm(x[None, :m], w.t()[None], selector=sel)[0]
        assert torch.equal(got, want[:m]), f"{dtype}: M={m} differs from the default's rows"
    for key, same in sel.verdicts().items():
        cfg = next(c for c in configs if c.tag == key[-1])
        f32 = torch.float32  # the selector compares accumulators, before any rounding
        direct = torch.equal(
            tm.gemm(x[None], w.t()[None], config=cfg, out_dtype=f32),
            tm.gemm(x[None], w.t()[None], config=configs[0], out_dtype=f32),
        )
        assert same == direct, f"{key}: verdict {same}, direct comparison {direct}"
    print(f"{dtype} K={k} N={n}: configs used by M {sorted(used)}, verdicts {sel.verdicts()}")


def test_gemm_bits_do_not_depend_on_the_activations_layout_on_cuda():
    """Misaligned (2-byte offset), strided and 3-D activations: one layout reaches the
    kernel, so the same binary and bits as a fresh contiguous tensor."""
    torch.manual_seed(5)
    k, n = 576, 1536
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    for m in (1, 64):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        want = inv.linear(x, w)
        big = torch.zeros(m * k + 1, device="cuda", dtype=torch.bfloat16)
        big[1:].copy_(x.flatten())
        assert torch.equal(inv.linear(big[1:].view(m, k), w), want), f"misaligned M={m}"
        assert torch.equal(inv.linear(x.t().contiguous().t(), w), want), f"column-major M={m}"
        assert torch.equal(inv.linear(x[None].expand(3, m, k), w)[1], want), f"3-D M={m}"


def test_capture_without_a_verdict_uses_the_default_config():
    """No check can run inside a CUDA-graph capture: an unverified smaller tile is replaced
    by the default there (same bits either way when the two agree)."""
    k, n = 2048, 8192
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    sel = gs.GemmSelector(tm._run_2d)
    default = gs.ladder(torch.bfloat16, "native")[0]
    tm.gemm(x[None], w.t()[None], config=default)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tm.gemm(x[None], w.t()[None], selector=sel)
    graph.replay()
    assert sel.verdicts() == {}
    assert torch.equal(out, tm.gemm(x[None], w.t()[None], config=default))
    eager = tm.gemm(x[None], w.t()[None], selector=sel)  # now checked, maybe a smaller tile
    assert len(sel.verdicts()) == 1
    if all(sel.verdicts().values()):
        assert torch.equal(eager, out)


@pytest.mark.parametrize("n", [37, 576, 1000])
def test_padding_does_not_change_a_rows_reductions_on_cuda(n):
    """Zeros (sum, cumsum) or -inf (softmax) appended to a row, up to a width divisible by
    16 or not, over one or several softmax chunks: the unpadded row's bits (the failure a
    plain tl.sum over lanes had on the H200, where N = 64 and N = 37 compiled to other
    layouts)."""
    torch.manual_seed(n)
    x = torch.randn(5, n, device="cuda") * 3
    for extra in (27, 1024 - n % 1024, 3 * 2048 + 5, 128256 - n):
        z = torch.zeros(5, extra, device="cuda")
        pad = torch.cat([x, z], 1)
        neg = torch.cat([x, z - float("inf")], 1)
        assert torch.equal(inv.reduce_sum(pad, -1), inv.reduce_sum(x, -1)), extra
        assert torch.equal(inv.cumsum(pad, -1)[:, :n], inv.cumsum(x, -1)), extra
        assert torch.equal(inv.softmax(neg, -1)[:, :n], inv.softmax(x, -1)), extra
        assert torch.equal(inv.log_softmax(neg, -1)[:, :n], inv.log_softmax(x, -1)), extra


@pytest.mark.parametrize("n", [576, 2048, 49152, 128256])
def test_row_kernels_are_invariant_on_cuda(n):
    torch.manual_seed(n)
    row = (torch.randn(n, device="cuda").to(torch.bfloat16) * 3).float()
    fns = {  # (ours, torch's) on the float32 upcast of a bf16 row
        "rms mean": (lambda x: inv.reduce_mean(x.pow(2), -1), lambda x: x.pow(2).mean(-1)),
        "softmax": (lambda x: inv.softmax(x, -1), lambda x: x.softmax(-1)),
        "log_softmax": (lambda x: inv.log_softmax(x, -1), lambda x: x.log_softmax(-1)),
        "cumsum": (lambda x: inv.cumsum(x, -1), lambda x: x.cumsum(-1)),
    }
    for name, (ours, theirs) in fns.items():
        alone, torch_alone = ours(row[None])[0], theirs(row[None])[0]
        torch_same = True
        for m in (1, 3, 64, 1000, 8192):
            if m * n > 2**28:
                continue
            x = _embed(row, m, m - 1)
            assert torch.equal(ours(x)[m - 1], alone), f"{name} n={n}: row {m - 1} of {m}"
            torch_same &= torch.equal(theirs(x)[m - 1], torch_alone)
        torch.testing.assert_close(alone, torch_alone, rtol=1e-4, atol=1e-4 * n**0.5)
        print(f"torch CUDA {name} n={n}: row invariant across M: {torch_same}")


def _smollm2_shaped(layers: int = 4):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        num_hidden_layers=layers, vocab_size=49152, max_position_embeddings=2048,
        tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("which", ["tiny-llama", "tiny-qwen2", "smollm2-shape"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_model_logits_do_not_depend_on_the_batch_on_cuda(which, attn):
    model = _smollm2_shaped() if which == "smollm2-shape" else tiny(which.split("-")[1])
    model = model.to("cuda", torch.bfloat16)
    model.config._attn_implementation = attn
    vocab = model.config.vocab_size
    torch.manual_seed(1)
    seq = torch.randint(0, vocab, (1, 37), device="cuda")
    batch = torch.cat([torch.randint(0, vocab, (5, 37), device="cuda"), seq])
    got = {}
    for on in (False, True):
        with torch.inference_mode(), ops.batch_invariant_mode(on):
            alone = model(seq).logits[0, -1]
            in_batch = model(batch).logits[-1, -1]
            pre = model(batch[:, :-1], use_cache=True)
            step = model(batch[:, -1:], cache=pre.past_key_values).logits[-1, -1]
            pre1 = model(seq[:, :-1], use_cache=True)
            step1 = model(seq[:, -1:], cache=pre1.past_key_values).logits[0, -1]
        got[on] = (torch.equal(alone, in_batch), torch.equal(step, step1))
    print(f"{which} {attn} bf16 CUDA, (forward, decode) alone == in batch: default {got[False]}")
    assert got[True] == (True, True)


def test_cuda_graph_capture_under_the_mode_replays_invariant_kernels():
    torch.manual_seed(2)
    lin1 = torch.nn.Linear(576, 1536, device="cuda", dtype=torch.bfloat16)
    lin2 = torch.nn.Linear(1536, 576, device="cuda", dtype=torch.bfloat16)

    def block(x):
        h = lin2(torch.nn.functional.silu(lin1(x)))
        h = h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return torch.softmax(h, dim=-1)

    static = torch.randn(64, 576, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode(), ops.batch_invariant_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            block(static)  # warm-up: Triton compiles outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = block(static)
    fresh = torch.randn(64, 576, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        static.copy_(fresh)
        graph.replay()  # outside the mode: a replay runs no Python
        with ops.batch_invariant_mode():
            eager = block(fresh)
            one_row = block(fresh[5:6])
    assert torch.equal(out, eager)
    assert torch.equal(out[5], one_row[0])


def test_sampler_distribution_is_invariant_on_cuda():
    torch.manual_seed(3)
    vocab = 49152
    row = torch.randn(vocab, device="cuda") * 4
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
    for invariant in (False, True):
        alone = probabilities(row[None], [0], [p], batch_invariant=invariant)[0]
        same = True
        for m in (2, 33, 256):
            x = torch.randn(m, vocab, device="cuda") * 4
            x[m - 1] = row
            params = [SamplingParams(temperature=0.7, top_p=0.5)] * (m - 1) + [p]
            got = probabilities(x, list(range(m)), params, batch_invariant=invariant)[m - 1]
            same &= torch.equal(got, alone)
        if invariant:
            assert same
        else:
            print(f"default CUDA sampler: distribution invariant across batch sizes: {same}")
