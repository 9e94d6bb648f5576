"""The logits a decode graph returns are one row per chunk; a step whose chunks are all
one token long is replayed from a graph even when one of them is a prefill chunk that
does not end its prompt (the remainder of a chunk budget), which samples nothing. The
runner keeps only the rows that sample (once the sampler got a row too many and the
whole batch failed on CUDA). CPU: a stand-in returns what a replayed graph returns.
And the models whose decode forward cannot be captured are known up front."""

from __future__ import annotations

import torch

import _models
from _models import tiny_family
from pagedkv.engine import Engine, SamplingParams
from pagedkv.engine.cuda_graphs import capture_blocker


class EagerGraphs:
    """Stands in for :class:`~pagedkv.engine.cuda_graphs.DecodeGraphs`: the logits of
    every chunk of a one-token-per-chunk step, computed eagerly."""

    disabled = False

    def __init__(self, runner) -> None:
        self.runner, self.steps, self.partial = runner, 0, 0

    def run(self, chunks):
        r = self.runner
        meta, ids, pos, _ = r.prepare(chunks, True)
        self.steps += 1
        self.partial += not all(c.sample for c in chunks)
        return r.forward(ids, pos, meta, torch.arange(len(chunks)))

    def invalidate_tables(self) -> None:
        pass


def test_a_one_token_prefill_chunk_in_a_graph_step_samples_nothing():
    model = _models.tiny(seed=0)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (3, 4, 20)]
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in Engine(model, num_blocks=32, block_size=4).generate(prompts, sp)]
    # budget 3: two requests decode, the third's prompt advances one token a step
    engine = Engine(model, num_blocks=32, block_size=4, max_batch_tokens=3)
    engine.runner.graphs = graphs = EagerGraphs(engine.runner)
    outs = engine.generate(prompts, sp)
    assert graphs.partial > 0, "no step mixed decode rows with a non-final prefill token"
    assert [o.error for o in outs] == [None] * 3
    assert [o.token_ids for o in outs] == want


def test_models_whose_decode_cannot_be_captured_are_named_with_the_fix():
    assert capture_blocker(_models.tiny(seed=0)) is None
    try:
        moe = tiny_family("gpt_oss", dtype=torch.float32)
    except LookupError:
        moe = tiny_family("mixtral", dtype=torch.float32)
    why = capture_blocker(moe)
    assert why is not None and "set_experts_implementation('grouped_mm')" in why
    assert moe.config._experts_implementation in (None, "eager")  # read, not changed
    moe.set_experts_implementation("batched_mm")
    assert capture_blocker(moe) is None
