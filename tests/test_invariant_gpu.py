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
from pagedkv.ops import invariant as inv

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
