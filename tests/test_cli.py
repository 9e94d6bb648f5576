"""The pagedkv command line (typer), on a tiny model with the default tokenizer."""

from __future__ import annotations

import pytest
import torch
import transformers
from typer.testing import CliRunner

from pagedkv.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer, saved locally."""
    from pagedkv.engine.model_loader import default_model_dir

    tok = transformers.AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("demo", "generate", "explain", "manager-demo"):
        assert name in result.output


def test_generate_with_a_local_model(tiny_dir):
    args = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "5", "--device", "cpu"]
    result = runner.invoke(app, [*args, "Hello there", "Second prompt"])
    assert result.exit_code == 0, result.output
    assert "Hello there" in result.output and "Second prompt" in result.output


def test_generate_missing_model_dir_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["generate", "--model", str(tmp_path / "nope"), "hi"])
    assert result.exit_code == 2
    assert "does not exist" in " ".join(result.output.split())


def test_generate_with_a_model_saved_without_tokenizer_is_a_clear_error(tiny_dir, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.save_pretrained(tmp_path / "bare")  # the weights only
    args = ["generate", "--model", str(tmp_path / "bare"), "--device", "cpu", "hi"]
    result = runner.invoke(app, args)
    out = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "has no tokenizer" in out and "tokenizer.save_pretrained" in out
    assert "Traceback" not in result.output


def test_chat_demo_on_a_tiny_model(tiny_dir):
    args = ["demo", "--model", str(tiny_dir), "--conversations", "3", "--turns", "2",
            "--max-new-tokens", "4", "--device", "cpu"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "tokens served from the prefix cache" in result.output
    assert "dense per-request cache" in result.output


def test_chat_demo_serves_metrics_while_it_runs(tiny_dir):
    args = ["demo", "--model", str(tiny_dir), "--conversations", "2", "--turns", "1",
            "--max-new-tokens", "2", "--device", "cpu", "--metrics-port", "0"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Prometheus metrics at http://127.0.0.1:" in result.output
    result = runner.invoke(app, [*args[:-1], "65536"])
    assert result.exit_code == 2 and "--metrics-port" in result.output


def test_explain_reads_what_a_disk_tier_holds_and_writes_nothing(tiny_dir, tmp_path):
    from pagedkv.engine import Engine, SamplingParams
    from pagedkv.tiers import DiskTier

    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    kv = tmp_path / "kv"
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    engine = Engine.from_pretrained(
        str(tiny_dir), device="cpu", num_blocks=14, block_size=4,
        tiers=[DiskTier(kv, 1 << 24)],
    )  # fmt: skip
    engine.generate([prompt], params, cache_salt="t1")
    engine.generate(["Completely unrelated text to push it out. " * 5], params)  # evicts it
    engine.close()  # stores the demoted blocks
    files = sorted((p.name, p.stat().st_mtime_ns) for p in kv.rglob("*") if p.is_file())
    assert files
    base = ["explain", prompt, "--model", str(tiny_dir), "--disk-tier", str(kv),
            "--block-size", "4", "--device", "cpu", "--no-chat"]  # fmt: skip
    result = runner.invoke(app, [*base, "--salt", "t1"])
    assert result.exit_code == 0, result.output
    assert "tier:disk" in result.output  # (blocks that stayed on the device died with it)
    result = runner.invoke(app, [*base, "--salt", "t2"])  # another tenant learns nothing
    assert result.exit_code == 0 and "tier:disk" not in result.output, result.output
    assert "never_seen" in result.output
    assert sorted((p.name, p.stat().st_mtime_ns) for p in kv.rglob("*") if p.is_file()) == files


def test_manager_demo_is_wired():
    result = runner.invoke(app, ["manager-demo"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["demo", "--manager"])
    assert result.exit_code == 0, result.output


def test_snapshot_commands_on_a_parked_conversation(tmp_path):
    """`pagedkv snapshot ls | show | verify | rm | gc` on a snapshot an Engine wrote."""
    from pagedkv.engine import Engine, SamplingParams

    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    engine = Engine(transformers.LlamaForCausalLM(cfg).float(), num_blocks=16, block_size=8)
    out = engine.generate([list(range(3, 20))], SamplingParams(max_new_tokens=4), retain=True)
    store = str(tmp_path / "snaps")
    engine.snapshot(out[0], "chat-1", store=store, metadata={"user": "ada"})

    def cli(*args):
        result = runner.invoke(app, ["snapshot", *args, "--store", store], terminal_width=200)
        return result.exit_code, result.output

    code, text = cli("ls")
    assert code == 0 and "chat-1" in text, text
    code, text = cli("show", "chat-1")
    assert code == 0 and '"user": "ada"' in text and "next_token" in text, text
    code, text = cli("verify", "chat-1")
    assert code == 0 and "chat-1" in text, text
    assert cli("rm", "chat-1")[0] == 0
    code, text = cli("gc")
    assert code == 0, text
    code, text = cli("show", "chat-1")
    assert code == 1 and "no snapshot named 'chat-1'" in " ".join(text.split()), text


def test_help_lists_the_snapshot_commands():
    result = runner.invoke(app, ["snapshot", "--help"])
    assert result.exit_code == 0
    for name in ("ls", "show", "verify", "rm", "gc"):
        assert name in result.output


def test_version():
    from pagedkv import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"pagedkv {__version__}"


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["demo", "--turns", "-1"], "--turns"),
        (["demo", "--turns", "0"], "--turns"),
        (["demo", "--conversations", "0"], "--conversations"),
        (["demo", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["demo", "--max-batch-tokens", "-5"], "--max-batch-tokens"),
        (["generate", "--max-new-tokens", "0", "hi"], "--max-new-tokens"),
        (["generate", "--temperature", "-0.5", "hi"], "--temperature"),
        (["generate", "--top-k", "-1", "hi"], "--top-k"),
        (["generate", "--top-p", "1.5", "hi"], "--top-p"),
        (["generate", "--top-p", "-0.1", "hi"], "--top-p"),
        (["generate", "--seed", "-1", "hi"], "--seed"),
        (["generate", "--seed", str(2**64), "hi"], "--seed"),
        (["snapshot", "gc", "--store", "unused-dir", "--grace", "-1"], "--grace"),
    ],
)
def test_numeric_options_out_of_range_are_refused_before_anything_runs(
    args, option, monkeypatch, tmp_path
):
    from pagedkv.engine import Engine

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded despite a bad option")

    monkeypatch.setattr(Engine, "from_pretrained", must_not_load)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"Invalid value for '{option}'" in text
    assert not (tmp_path / "unused-dir").exists()  # nothing created either


def test_top_p_zero_is_refused_with_the_valid_range(monkeypatch):
    from pagedkv.engine import Engine

    monkeypatch.setattr(Engine, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    result = runner.invoke(app, ["generate", "--top-p", "0", "hi"])
    assert result.exit_code == 2
    assert "top_p must be in (0, 1]" in " ".join(result.output.split())


# ------------------------------------------------------------------ engine options
def _engine_params(command):
    """The click parameters of a command that come from EngineConfig, by name."""
    import typer.main

    from pagedkv.engine.config import option_fields

    names = {f.name for f in option_fields()}
    cmd = typer.main.get_command(app).commands[command]
    return {p.name: p for p in cmd.params if p.name in names}


@pytest.mark.parametrize("command", ["demo", "generate"])
def test_engine_flags_are_the_config_fields_with_their_defaults_and_help(command):
    from pagedkv.engine.config import EngineConfig, option_fields

    params = _engine_params(command)
    offered = [f for f in option_fields() if f.metadata["cli"]]
    assert sorted(params) == sorted(f.name for f in offered)
    assert "preemption" not in params  # "swap" needs tiers, which the CLI cannot build
    defaults = EngineConfig()
    for f in offered:
        p = params[f.name]
        assert p.default == getattr(defaults, f.name), f.name  # one default, the config's
        assert f.metadata["help"].split(";")[0] in p.help, f.name
        assert f"--{f.name.replace('_', '-')}" in p.opts, f.name
    assert params["max_batch_tokens"].default == 8192


@pytest.fixture
def captured_config(monkeypatch):
    """The EngineConfig the CLI passes to Engine.from_pretrained (which then stops)."""
    from pagedkv.engine import Engine

    seen = []

    def fake(path=None, *, device=None, dtype=None, config=None, **kw):
        seen.append(config)
        raise FileNotFoundError("stopped after the options")

    monkeypatch.setattr(Engine, "from_pretrained", fake)
    return seen


def test_the_cli_passes_the_config_it_built(captured_config):
    from pagedkv.engine.config import EngineConfig

    assert runner.invoke(app, ["generate", "hi"]).exit_code == 2
    args = ["generate", "--max-batch-tokens", "1024", "--no-prefix-caching", "--num-blocks",
            "64", "--preemption-policy", "lru", "--gpu-memory-fraction", "0.5", "hi"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "stopped after the options" in result.output
    assert captured_config == [
        EngineConfig(),
        EngineConfig(
            max_batch_tokens=1024, prefix_caching=False, num_blocks=64, preemption_policy="lru",
            gpu_memory_fraction=0.5,
        ),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "option", "says"),
    [
        (["--gpu-memory-fraction", "0"], "--gpu-memory-fraction", "must be in (0, 1], got 0.0"),
        (["--gpu-memory-fraction", "1.5"], "--gpu-memory-fraction", "must be in (0, 1]"),
        (["--num-blocks", "0"], "--num-blocks", "num_blocks must be >= 1"),
        (["--block-size", "0"], "--block-size", "block_size must be >= 1, got 0"),
        (["--max-num-seqs", "-2"], "--max-num-seqs", "max_num_seqs must be >= 1"),
        (["--preemption-policy", "nope"], "--preemption-policy", "'nope' is not a known policy"),
    ],
)
@pytest.mark.parametrize("command", ["demo", "generate"])
def test_bad_engine_flags_are_refused_with_the_configs_message(
    command, args, option, says, captured_config
):
    tail = ["hi"] if command == "generate" else []
    result = runner.invoke(app, [command, *args, *tail])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())  # rich wraps it in a box
    assert f"Invalid value for '{option}'" in text and says in text, text
    assert captured_config == []  # nothing was loaded
