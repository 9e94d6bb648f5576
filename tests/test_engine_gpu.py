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
