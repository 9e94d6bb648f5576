"""Incremental detokenization with the real SmolLM2 tokenizer: the deltas joined are the
final text for any token sequence, and no delta shows half a character."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedkv.engine.detokenize import Detokenizer

TEXT = "Bonjour, ça va ? Très bien ! 日本語のテキストです。Ünïcödé 🎉👍🏽 — naïve café. n't 's ."


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from pagedkv.engine.model_loader import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)


@pytest.fixture(scope="module")
def cleanup_tok():
    """The same tokenizer made to apply transformers' space clean-up in decode()."""
    from transformers import AutoTokenizer

    from pagedkv.engine.model_loader import default_model_dir

    return AutoTokenizer.from_pretrained(
        default_model_dir(), local_files_only=True, clean_up_tokenization_spaces=True,
        clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pools(tok):
    """Ids worth drawing often: byte tokens that are part of a character (they decode
    alone to U+FFFD), special tokens, ids of real multilingual text and of spaces."""
    partial = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]
    assert len(partial) > 100
    real = tok.encode(TEXT, add_special_tokens=False)
    spaces = tok.encode(" . , ? ! n't 's 've 're 'm ' ", add_special_tokens=False)
    return partial, list(range(17)), real, spaces


def ids_strategy(tok, pools):
    partial, special, real, spaces = pools
    one = st.one_of(
        st.integers(0, len(tok) - 1), st.sampled_from(partial), st.sampled_from(special),
        st.sampled_from(real), st.sampled_from(spaces),
    )  # fmt: skip
    return st.lists(one, max_size=40)


def stream(detok: Detokenizer, ids: list[int], chunks: list[int], final: str) -> list[str]:
    """Deltas for ``ids`` pushed in chunks of the given sizes (1 = one token a step)."""
    out, i, sizes = [], 0, iter(chunks)
    while i < len(ids):
        k = next(sizes, 1)
        out.append(detok.push(ids[i : i + k]))
        i += k
    out.append(detok.finish(final))
    return out


def check(deltas: list[str], final: str) -> None:
    assert "".join(deltas) == final
    shown = "".join(deltas[:-1])  # what was shown before the end
    assert final.startswith(shown)
    assert shown.count("\ufffd") <= final.count("\ufffd")


@pytest.mark.parametrize("variant", ["decode_stream", "window", "cleanup", "cleanup-window"])
def test_joined_deltas_are_the_final_text_for_random_ids(variant, tok, cleanup_tok, pools):
    t = cleanup_tok if variant.startswith("cleanup") else tok
    use_stream = not variant.endswith("window")
    expected_kind = ("decode_stream" if use_stream else "window") + (
        "+cleanup" if t is cleanup_tok else ""
    )
    assert Detokenizer(t, decode_stream=use_stream).kind == expected_kind

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ids=ids_strategy(tok, pools), chunks=st.lists(st.integers(1, 4), max_size=40))
    def prop(ids, chunks):
        final = t.decode(ids, skip_special_tokens=True)
        check(stream(Detokenizer(t, decode_stream=use_stream), ids, chunks, final), final)

    prop()


@pytest.mark.parametrize("use_stream", [True, False])
def test_real_text_streams_whole_characters(tok, cleanup_tok, use_stream):
    for t in (tok, cleanup_tok):
        ids = t.encode(TEXT, add_special_tokens=False)
        final = t.decode(ids, skip_special_tokens=True)
        deltas = stream(Detokenizer(t, decode_stream=use_stream), ids, [], final)
        check(deltas, final)
        assert "\ufffd" not in "".join(deltas)
        # the text really streams: all but a few characters came before the end
        assert len(deltas[-1]) <= 4
    # characters spanning several tokens are in this text (the case being tested)
    assert sum("\ufffd" in tok.decode([i]) for i in tok.encode(TEXT)) >= 10
    assert cleanup_tok.decode(tok.encode("a .")) == "a."  # the clean-up is on


class _CountingTokenizer:
    """A tokenizer without a Rust backend that records how many ids each decode sees."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids, **kw):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, **kw)


def test_the_window_decodes_a_few_tokens_per_step_not_the_output(tok):
    counting = _CountingTokenizer(tok)
    ids = tok.encode(TEXT * 8, add_special_tokens=False)  # ~400 tokens
    detok = Detokenizer(counting)
    assert detok.kind == "window"
    deltas = [detok.push([i]) for i in ids]
    final = tok.decode(ids, skip_special_tokens=True)
    deltas.append(detok.finish(final))
    check(deltas, final)
    assert len(ids) > 300 and max(counting.sizes) <= 8
