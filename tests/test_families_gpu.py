"""Windowed / softcapped / sink families on CUDA: Triton kernels, CUDA graphs (GPU only).

float32 (TF32 off): the engine, with CUDA graphs for decode, prefix hits and preemption,
gives transformers' own greedy tokens. bfloat16 (Gemma 3): the graph replays give the
eager paged path's tokens bit for bit, and the first step's logits are those of
transformers' eager attention to bf16 rounding.
"""

from __future__ import annotations

import pytest
import torch

from _models import tiny_family
from pagedkv.engine import Engine, SamplingParams
from test_families import PREFIX, family_prompts, skip_if_missing

pytestmark = pytest.mark.gpu

NEW = 24
GREEDY = SamplingParams(max_new_tokens=NEW, ignore_eos=True)


def long_prompts(seed: int = 0) -> list[list[int]]:
    """The CPU prompts, plus longer ones: windowed decode runs several splits and skips
    many blocks before the window."""
    g = torch.Generator().manual_seed(seed + 100)
    longer = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (300, 181)]
    return family_prompts(seed) + longer


def cuda_reference(model, prompts, new=NEW):
    outs = []
    for p in prompts:
        o = model.generate(
            torch.tensor([p], device="cuda"), max_new_tokens=new, do_sample=False, pad_token_id=0
        )
        outs.append(o[0, len(p) :].tolist())
    return outs


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("name", ["mistral", "gemma3_text", "gemma2", "gpt_oss"])
@pytest.mark.parametrize(
    "options",
    [dict(), dict(num_blocks=32, max_batch_tokens=64)],  # graphs; + preemption, chunks
    ids=["graphs", "graphs-preempt"],
)
def test_cuda_engine_matches_generate_float32(name, options):
    skip_if_missing(name)
    model = tiny_family(name, dtype=torch.float32).cuda()
    if name == "gpt_oss":  # transformers' eager experts cannot be captured (see below)
        model.set_experts_implementation("batched_mm")
    prompts = long_prompts()
    ref = cuda_reference(model, prompts)
    engine = Engine(model, **{"num_blocks": 256, "block_size": 16, **options})
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == ref
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.graphs and not graphs.disabled  # decode replayed
    stats = engine.stats()
    assert stats.cached_tokens >= PREFIX
    if "num_blocks" in options and name == "mistral":
        # every layer windowed: blocks behind the window are released as decoding goes, so
        # the pool never fills (no preemption), which is the point of releasing them
        assert stats.preemptions == 0 and stats.blocks_peak < options["num_blocks"]
    elif "num_blocks" in options:
        assert stats.preemptions > 0
    engine.cache.check_integrity()


def test_cuda_moe_on_eager_experts_runs_eagerly_and_says_how_to_get_graphs():
    skip_if_missing("gpt_oss")
    model = tiny_family("gpt_oss", dtype=torch.float32).cuda()
    with pytest.warns(UserWarning, match="set_experts_implementation"):
        engine = Engine(model, num_blocks=64, block_size=16)
    assert engine.runner.graphs is None and "eager" in engine.runner.graphs_off
    prompts = long_prompts()[:3]
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == cuda_reference(model, prompts)


def test_cuda_gemma3_bf16_graphs_equal_eager_and_logits_match_transformers():
    skip_if_missing("gemma3_text")
    model = tiny_family("gemma3_text", dtype=torch.bfloat16).cuda()
    prompts = long_prompts(seed=1)
    with_graphs = Engine(model, num_blocks=256, block_size=16)
    eager = Engine(model, num_blocks=256, block_size=16, cuda_graphs=False)
    a = [o.token_ids for o in with_graphs.generate(prompts, GREEDY)]
    b = [o.token_ids for o in eager.generate(prompts, GREEDY)]
    assert a == b
    assert with_graphs.runner.graphs.graphs and not with_graphs.runner.graphs.disabled
    # the paged prefill's last-token logits vs transformers' eager attention, in bf16
    from test_families import paged_logits

    for p in prompts[:3]:
        with torch.no_grad():
            want = model(torch.tensor([p], device="cuda")).logits[0, -1].float()
        got, _ = paged_logits(model, [p], [0])
        err = (got[0][-1].float() - want).abs().max().item()
        assert err <= 0.05 * want.abs().max().item(), err
