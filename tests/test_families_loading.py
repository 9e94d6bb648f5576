"""Loading the families from local safetensors directories: ``Engine.from_pretrained``
and ``pagedkv generate --model DIR`` give transformers' own greedy tokens."""

from __future__ import annotations

import pytest
import torch
import transformers
from typer.testing import CliRunner

from _models import FAMILIES, tiny_family
from pagedkv.cli import app
from pagedkv.engine import Engine, SamplingParams
from pagedkv.errors import UnsupportedModelError
from test_families import NEW, family_prompts, reference, skip_if_missing

pytestmark = pytest.mark.usefixtures("single_thread")


def save(model, path, tokenizer=None):
    model.save_pretrained(path)  # config.json + model.safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    assert any(path.glob("*.safetensors"))
    return path


def word_tokenizer():
    """A real tokenizer built offline for the tiny vocabulary: token i is the word ``w<i>``
    (text is printable, so the CLI output can be compared word for word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_engine_from_pretrained_loads_a_saved_family(name, tmp_path):
    """A tokenizer-less directory: token-id prompts, no text."""
    skip_if_missing(name)
    model = tiny_family(name)
    prompts = family_prompts(seed=2)[:3]
    ref = reference(model, prompts)
    engine = Engine.from_pretrained(
        str(save(model, tmp_path)), device="cpu", dtype="float64", num_blocks=48, block_size=8
    )
    assert engine.tokenizer is None and engine.model.config.model_type == name
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=NEW, ignore_eos=True))
    assert [o.token_ids for o in outs] == ref
    assert all(o.text is None for o in outs)


@pytest.mark.parametrize("name", ["gemma3_text", "gpt_oss", "mistral"])
def test_cli_generate_with_a_saved_family(name, tmp_path):
    skip_if_missing(name)
    model, tok = tiny_family(name), word_tokenizer()
    model.generation_config.eos_token_id = None
    prompts = family_prompts(seed=3)[:2]
    ref = reference(model, prompts, new=8)
    path = save(model, tmp_path, tok)
    texts = [" ".join(f"w{t}" for t in p) for p in prompts]
    args = ["generate", "--model", str(path), "--max-new-tokens", "8", "--device", "cpu",
            "--dtype", "float64", *texts]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())
    for text, r in zip(texts, ref):
        assert f"> {text} {tok.decode(r)}" in printed


def test_unsupported_directory_is_refused_before_loading_weights(tmp_path):
    cfg = transformers.BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=64)
    path = tmp_path / "bloom"
    transformers.BloomForCausalLM(cfg).save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"not weights")  # never read
    with pytest.raises(UnsupportedModelError, match="bloom"):
        Engine.from_pretrained(str(path), device="cpu")
    result = CliRunner().invoke(app, ["generate", "--model", str(path), "hi"])
    assert result.exit_code == 2 and "bloom" in result.output


def test_directory_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Engine.from_pretrained(str(tmp_path), device="cpu")
    torch.manual_seed(0)  # (nothing else to clean up: nothing was loaded)
