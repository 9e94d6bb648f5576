"""transformers' prompt-reuse recipe: a shared prefix computed once, deep-copied per prompt.

Same model, prompts and device for every row; each row generates K prompts
(prefix + a private suffix, greedy):
  default / paged         generate() from scratch per prompt (default cache / PagedCache)
  default / paged recipe  one forward fills a cache with the prefix; per prompt
                          ``copy.deepcopy`` of it, then generate() with the copy
For the recipes, ``copy ms`` is the time of one deepcopy and ``KV copied`` the bytes it
duplicates (DynamicCache copies its tensors; a PagedCache copy forks block tables).
Rows run interleaved ``--repeat`` times; the best of each measure is reported. On a
shared CPU, ``CPU s`` (process time, one torch thread by default) is the stable one.

Model: LlamaForCausalLM with SmolLM2-135M's shape, random weights (fp32 on CPU, bf16 on
CUDA). Usage: python benchmarks/bench_prompt_reuse.py [--prefix 512] [--prompts 3]
[--suffix 16] [--new 16] [--layers 30] [--repeat 3] [--device cpu|cuda] [--quick]
[--out DIR|FILE]. Prints a table; writes benchmarks/out/bench_prompt_reuse.json (and
$OUT/bench_prompt_reuse.json when OUT is set). ``--quick``: 2 layers, a 64-token prefix,
2 prompts, 4 new tokens, one round (a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
               max_position_embeddings=8192)  # fmt: skip


def parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--suffix", type=int, default=16)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--layers", type=int, default=SMOLLM2["num_hidden_layers"])
    ap.add_argument("--repeat", type=int, default=3, help="rounds over all rows; best kept")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--quick", action="store_true", help="a small smoke run (see the doc)")
    ap.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "out"),
        help="JSON file, or a folder to write bench_prompt_reuse.json into",
    )
    args = ap.parse_args()
    if args.quick:
        args.layers, args.prefix, args.prompts, args.new, args.repeat = 2, 64, 2, 4, 1
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    import transformers

    from pagedkv.integrations.transformers import PagedCache, cache_kwarg

    args = parse()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    shape = dict(SMOLLM2, num_hidden_layers=args.layers)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    model = model.to(device, dtype).eval()
    kw = cache_kwarg(model)
    g = torch.Generator().manual_seed(1)
    vocab = SMOLLM2["vocab_size"]
    prefix = torch.randint(3, vocab, (1, args.prefix), generator=g).to(device)
    prompts = [
        torch.cat([prefix, torch.randint(3, vocab, (1, args.suffix), generator=g).to(device)], 1)
        for _ in range(args.prompts)
    ]
    total = args.prefix + args.suffix + args.new
    blocks = args.prompts * (-(-total // 16)) + 64

    def gen(ids, cache=None):
        extra = {} if cache is None else {kw: cache}
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
            do_sample=False, pad_token_id=0, **extra,
        )  # fmt: skip
        return out[0, ids.shape[1] :].tolist()

    def fill(cache):
        with torch.no_grad():
            model(input_ids=prefix, **{kw: cache})
        return cache

    def kv_bytes(cache):
        if isinstance(cache, PagedCache):
            return 0  # a fork allocates no block and copies no byte
        return sum(t.numel() * t.element_size() for layer in cache.layers
                   for t in (layer.keys, layer.values))  # fmt: skip

    def run(name, make_cache, recipe):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        copy_s, copied, outs = 0.0, 0, []
        base = fill(make_cache()) if recipe else None
        for ids in prompts:
            if recipe:
                sync(device)
                t1 = time.perf_counter()
                cache = copy.deepcopy(base)
                sync(device)
                copy_s += time.perf_counter() - t1
                copied = kv_bytes(cache)
            else:
                cache = make_cache()
            outs.append(gen(ids, cache))
            del cache
        sync(device)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"  {name}: {seconds:.2f} s ({cpu:.2f} s CPU)", file=sys.stderr, flush=True)
        return dict(name=name, seconds=seconds, cpu_seconds=cpu,
                    copy_ms=1e3 * copy_s / len(prompts),
                    kv_copied=copied, tokens=outs)  # fmt: skip

    gen(prompts[0][:, :64])  # warm-up
    plan = [
        ("default", lambda: None, False),
        ("default recipe", lambda: transformers.DynamicCache(config=model.config), True),
        ("paged", lambda: PagedCache(model, num_blocks=blocks), False),
        ("paged recipe", lambda: PagedCache(model, num_blocks=blocks), True),
    ]
    best: dict[str, dict] = {}
    for _ in range(args.repeat):  # interleaved rounds: a load spike hits every row alike
        for name, make, recipe in plan:
            r = run(name, make, recipe)
            if name in best:  # best of each measure over the rounds
                for key in ("seconds", "cpu_seconds", "copy_ms"):
                    r[key] = min(r[key], best[name][key])
            best[name] = r
    rows = [best[name] for name, _, _ in plan]
    ref = rows[0]["tokens"]
    print(f"{args.layers} layers, prefix {args.prefix}, {args.prompts} prompts x "
          f"(+{args.suffix} tokens, {args.new} new), {device.type} "
          f"{str(dtype).removeprefix('torch.')}")  # fmt: skip
    print(f"{'':16} {'seconds':>8} {'CPU s':>8} {'copy ms':>8} {'KV copied':>10} "
          f"{'same tokens':>12}")  # fmt: skip
    for r in rows:
        same = sum(a == b for a, b in zip(r["tokens"], ref))
        copy_ms = f"{r['copy_ms']:.2f}" if "recipe" in r["name"] else "-"
        mib = f"{r['kv_copied'] / 2**20:.1f} MiB" if "recipe" in r["name"] else "-"
        print(f"{r['name']:16} {r['seconds']:8.2f} {r['cpu_seconds']:8.2f} {copy_ms:>8} {mib:>10} "
              f"{same:>6}/{len(ref)}")  # fmt: skip
    for r in rows:
        r["same_tokens"] = sum(a == b for a, b in zip(r.pop("tokens"), ref)) / len(ref)
    out = Path(args.out)
    if out.is_dir() or not out.suffix:
        out = out / "bench_prompt_reuse.json"
    outs = [out] + ([Path(os.environ["OUT"]) / out.name] if os.environ.get("OUT") else [])
    res = dict(args=vars(args), device=str(device), date=time.strftime("%Y-%m-%d"), rows=rows)
    for path in outs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
