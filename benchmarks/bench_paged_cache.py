"""``model.generate()`` with a PagedCache vs the default cache: same model, prompts, device.

For each batch size B and prompt length L: B random prompts of L tokens (no padding),
greedy, ``--new`` new tokens (EOS ignored), once with transformers' default cache and
once with ``PagedCache(model)``; each after one untimed warm-up of the same shape, then
the median of ``--repeat`` timed runs. Reports seconds, tok/s, paged / default speed
(>= 1.0 means PagedCache is at least as fast) and token agreement (the share of rows
whose tokens are identical, and of tokens equal position by position; bf16 rounding in
a different attention kernel can flip a near-tie and the rows then diverge).

Model: LlamaForCausalLM with SmolLM2-135M's shape, random weights (bf16 on CUDA, fp32
on CPU). Usage: python benchmarks/bench_paged_cache.py [--batches 1,16,64]
[--lengths 512,1024] [--new 128] [--repeat 3] [--device cuda] [--quick] [--out DIR|FILE].
Writes benchmarks/out/bench_paged_cache.json (and $OUT/bench_paged_cache.json when OUT
is set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs uninstalled

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
               max_position_embeddings=8192)  # fmt: skip
QUICK = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--lengths", default="512,1024")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shape, B=1,2, L=32, 8 new")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "bench_paged_cache.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.lengths, args.new, args.repeat = "1,2", "32", 8, 1
    try:
        args.batches = [int(x) for x in args.batches.split(",")]
        args.lengths = [int(x) for x in args.lengths.split(",")]
    except ValueError:
        ap.error("--batches and --lengths take comma-separated ints, e.g. 1,16,64")
    if min(args.batches + args.lengths) < 1 or args.new < 1 or args.repeat < 1:
        ap.error("--batches, --lengths, --new and --repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    import transformers

    from pagedkv import PagedCache
    from pagedkv.integrations.transformers import cache_kwarg

    args = parse(argv)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shape = QUICK if args.quick else SMOLLM2
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    model = model.to(dev, dtype).eval()
    model.generation_config.eos_token_id = None
    kw = cache_kwarg(model)
    g = torch.Generator().manual_seed(1)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def gen(ids, paged: bool):
        cache = None
        extra = {}
        if paged:
            blocks = ids.shape[0] * -(-(ids.shape[1] + args.new) // 16) + 8
            cache = PagedCache(model, num_blocks=blocks)
            extra = {kw: cache}
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
            min_new_tokens=args.new, do_sample=False, pad_token_id=0, **extra,
        )  # fmt: skip
        if cache is not None:
            cache.close()
        return out[:, ids.shape[1] :].tolist()

    res: dict = dict(
        date=time.strftime("%Y-%m-%d"), device=str(dev), torch=torch.__version__,
        transformers=transformers.__version__, dtype=str(dtype), new=args.new,
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        shape="quick" if args.quick else "smollm2", repeat=args.repeat, rows=[],
    )  # fmt: skip
    out = Path(args.out)
    if out.is_dir() or not out.suffix:
        out = out / "bench_paged_cache.json"
    outs = [out] + ([Path(os.environ["OUT"]) / out.name] if os.environ.get("OUT") else [])
    print(f"{'B':>4} {'L':>6} {'default s':>10} {'paged s':>9} {'paged/default':>14} "
          f"{'same rows':>10} {'same tokens':>12}", flush=True)  # fmt: skip
    for length in args.lengths:
        for b in args.batches:
            ids = torch.randint(3, shape["vocab_size"], (b, length), generator=g).to(dev)
            row: dict = dict(batch=b, prompt_len=length)
            tokens = {}
            for name, paged in (("default", False), ("paged", True)):
                gen(ids, paged)  # warm-up of this shape (kernels, allocator)
                walls = []
                for _ in range(args.repeat):
                    sync()
                    t = time.perf_counter()
                    tokens[name] = gen(ids, paged)
                    sync()
                    walls.append(time.perf_counter() - t)
                wall = statistics.median(walls)
                row[f"{name}_s"] = round(wall, 4)
                row[f"{name}_tok_per_s"] = round(b * args.new / wall, 1)
            row["paged_over_default"] = round(row["default_s"] / row["paged_s"], 3)
            a, p = tokens["default"], tokens["paged"]
            row["same_rows"] = sum(x == y for x, y in zip(a, p)) / b
            row["same_tokens"] = round(
                sum(u == v for x, y in zip(a, p) for u, v in zip(x, y)) / (b * args.new), 4
            )
            res["rows"].append(row)
            print(f"{b:>4} {length:>6} {row['default_s']:>10.3f} {row['paged_s']:>9.3f} "
                  f"{row['paged_over_default']:>13.2f}x {row['same_rows']:>10.2f} "
                  f"{row['same_tokens']:>12.4f}", flush=True)  # fmt: skip
            for path in outs:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
