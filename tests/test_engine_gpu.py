"""The engine on CUDA (Triton kernels, CUDA graphs): token-identical to generate() (GPU only)."""

from __future__ import annotations

import pytest
import torch

from _models import tiny
from pagedkv.engine import Engine
from test_engine import GREEDY, prompts_of

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_llama():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = tiny("llama").cuda()
    prompts = prompts_of(prefix=list(range(100, 140)))
    model.set_attn_implementation("sdpa")
    ref = []
    for p in prompts:
        out = model.generate(
            torch.tensor([p], device="cuda"), max_new_tokens=40, do_sample=False, pad_token_id=0
        )
        ref.append(out[0, len(p) :].tolist())
    return model, prompts, ref


@pytest.mark.parametrize(
    "options",
    [
        dict(),  # CUDA graphs for decode
        dict(cuda_graphs=False),
        dict(max_batch_tokens=7),  # chunked prefill
        dict(num_blocks=40, block_size=4),  # preemption by recompute, graphs re-captured
        dict(num_blocks=40, block_size=4, cuda_graphs=False),
    ],
    ids=["graphs", "eager", "chunked", "preempt-graphs", "preempt-eager"],
)
def test_cuda_engine_matches_generate(cuda_llama, options):
    model, prompts, ref = cuda_llama
    engine = Engine(model, **{"num_blocks": 128, "block_size": 8, **options})
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == ref
    if "num_blocks" in options:
        assert engine.stats().preemptions > 0
    engine.cache.check_integrity()


def test_cuda_engine_swap_preemption(cuda_llama):
    from pagedkv.tiers import CPUTier

    model, prompts, ref = cuda_llama
    engine = Engine(model, num_blocks=40, block_size=4, preemption="swap", tiers=[CPUTier(8 << 20)])
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == ref
    assert engine.stats().preemptions > 0
    engine.cache.close()


def test_cuda_graphs_ignore_the_models_attention_setting(cuda_llama):
    """Switching the model's attention between engine calls reaches neither eager paged
    forwards nor graph replays; the user's setting is kept and plain generate() works."""
    model, prompts, ref = cuda_llama
    engine = Engine(model, num_blocks=128, block_size=8)
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == ref
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.graphs and not graphs.disabled
    try:
        for impl in ("eager", "sdpa"):
            model.set_attn_implementation(impl)
            assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == ref
            assert model.config._attn_implementation == impl and not graphs.disabled
        p = prompts[0]
        out = model.generate(
            torch.tensor([p], device="cuda"), max_new_tokens=40, do_sample=False, pad_token_id=0
        )
        assert out[0, len(p) :].tolist() == ref[0]  # plain transformers next to the engine
    finally:
        model.set_attn_implementation("sdpa")
    engine.close()
    assert engine.runner.graphs is None


def test_cuda_paged_cache_generate_and_prompt_reuse(cuda_llama):
    import copy

    from pagedkv.integrations.transformers import PagedCache, cache_kwarg

    model, prompts, _ = cuda_llama
    kw = cache_kwarg(model)
    rows = [prompts[0][:20], prompts[1][:9]]
    ids = torch.tensor([[0] * (20 - len(r)) + r for r in rows], device="cuda")
    mask = torch.tensor([[0] * (20 - len(r)) + [1] * len(r) for r in rows], device="cuda")
    gen = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    ref = model.generate(ids, **gen)
    cache = PagedCache(model, num_blocks=64, block_size=8)
    assert torch.equal(model.generate(ids, **gen, **{kw: cache}), ref)
    # prompt reuse: prefix once, one copy-on-write copy per continuation
    prefix = torch.tensor([prompts[0][:37]], device="cuda")
    base = PagedCache(model, num_blocks=64, block_size=8)
    with torch.no_grad():
        model(input_ids=prefix, **{kw: base})
    for extra in (prompts[2][:5], prompts[3][:11]):
        full = torch.cat([prefix, torch.tensor([extra], device="cuda")], 1)
        one = dict(attention_mask=torch.ones_like(full), max_new_tokens=16, do_sample=False,
                   pad_token_id=0)  # fmt: skip
        want = model.generate(full, **one)
        assert torch.equal(model.generate(full, **one, **{kw: copy.deepcopy(base)}), want)
    base.kv_cache.check_integrity()


SHARED = list(range(100, 132))  # 4 full blocks of 8: the later prompts share them


@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
@pytest.mark.parametrize("cascade", [True, False], ids=["cascade", "plain"])
def test_cuda_speed_paths_keep_the_tokens(cuda_llama, graphs, overlap, cascade, monkeypatch):
    """Overlap, cascade decode (inside CUDA graphs or eager) and neither give the tokens
    of generate(); cascade runs exactly when asked for."""
    from pagedkv import ops

    model, _, _ = cuda_llama
    prompts = prompts_of(lengths=(3, 9, 1, 14, 6), seed=5, prefix=SHARED)
    ref = [
        model.generate(torch.tensor([p], device="cuda"), max_new_tokens=40, do_sample=False,
                       pad_token_id=0)[0, len(p) :].tolist()
        for p in prompts
    ]  # fmt: skip
    calls = []
    real = ops.cascade_decode
    monkeypatch.setattr(ops, "cascade_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    engine = Engine(model, num_blocks=128, block_size=8, cuda_graphs=graphs, overlap=overlap,
                    cascade=cascade)  # fmt: skip
    outs = engine.generate(prompts[:1], GREEDY) + engine.generate(prompts[1:], GREEDY)
    assert [o.token_ids for o in outs] == ref
    if not graphs:  # inside a graph the Python call happens once, at capture
        assert bool(calls) is cascade
    elif cascade:
        assert any(key[2] for key in engine.runner.graphs.graphs), "no cascade graph captured"
    assert engine.stats().blocks_in_use == 0
    engine.cache.check_integrity()


def test_cuda_warmup_captures_every_graph_the_run_needs(cuda_llama):
    model, _, _ = cuda_llama
    prompts = prompts_of(lengths=(3, 9, 1, 14, 6), seed=5, prefix=SHARED)
    engine = Engine(model, num_blocks=128, block_size=8, max_num_seqs=16)
    warm = engine.warmup()
    held = set(engine.runner.graphs.graphs)
    assert warm.graphs == len(held) > 0 and not engine.runner.graphs.disabled
    engine.generate(prompts[:1], GREEDY)
    engine.generate(prompts[1:], GREEDY)
    assert set(engine.runner.graphs.graphs) == held, "a step captured a graph after warmup()"


@pytest.mark.slow
def test_cuda_torch_compile_keeps_the_tokens(cuda_llama):
    """torch_compile=True: the model compiled around the paged attention (a graph break),
    in eager steps and inside the CUDA graphs; still generate()'s tokens, no fallback."""
    model, prompts, ref = cuda_llama
    engine = Engine(model, num_blocks=128, block_size=8, torch_compile=True)
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == ref
    assert engine.runner.compiled is not None, "torch.compile fell back to eager"
    assert not engine.runner.graphs.disabled


@pytest.mark.parametrize("sampling", ["greedy", "mixed"])
def test_cuda_overlapped_decode_steps_never_wait_for_the_device(cuda_llama, sampling):
    """Decode steps with overlap and CUDA graphs make no synchronizing CUDA call (torch's
    sync debug mode raises on one): the one wait per step is the event of the sampled
    ids' copy. The tokens equal those of the same run without overlap."""
    from pagedkv.engine import SamplingParams

    model, _, _ = cuda_llama
    prompts = prompts_of(lengths=(5, 9, 12, 3, 7, 10, 4, 8), seed=3, prefix=SHARED)
    seeded = SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=0.8, top_p=0.9,
                            top_k=20, seed=7)  # fmt: skip
    params = [seeded if sampling == "mixed" and i % 2 else GREEDY for i in range(len(prompts))]
    outs = {}
    for overlap in (False, True):
        engine = Engine(model, num_blocks=128, block_size=8, max_num_seqs=16, overlap=overlap)
        engine.warmup()
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        done = {}
        for o in engine.step() + engine.step():  # the prefill (it may copy and wait)
            done[o.request_id] = o
        torch.cuda.set_sync_debug_mode("error")
        try:
            while engine.has_unfinished():
                for o in engine.step():
                    done[o.request_id] = o
        finally:
            torch.cuda.set_sync_debug_mode("default")
        outs[overlap] = [done[i].token_ids for i in ids]
        engine.cache.check_integrity()
    assert outs[True] == outs[False]
