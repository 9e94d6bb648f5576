"""End-to-end generation throughput: pagedkv Engine vs transformers' continuous batching
(``generate_batch``) vs plain ``generate()`` — same model, prompts, device, one run.

Model: LlamaForCausalLM with SmolLM2-135M's config (``--config llama1b``: a ~1B
Llama-style shape), random weights, bf16 on CUDA / fp32 on CPU. Workloads (EOS ignored):
  (a) N requests sharing a 1,024-token system prompt + 32 unique tokens, 128 new tokens
  (b) N unrelated 1,056-token prompts, 128 new tokens
Plain generate() runs batch 64 on the (b) prompts.

Each pagedkv / generate_batch workload runs 1 + ``--repeat`` times after a warm-up of
the same shape class: ``first_s`` is the first timed run, ``steady_s`` the median of
the others (tok/s from it). Beside them: the decode floor (bytes per step / measured
copy bandwidth, see ``_e2e_measure.py``) and pagedkv's % of it, and a per-step
device/host breakdown from one profiled run (32 new tokens). ``--baseline-src DIR``
runs the same pagedkv command with an older ``src/`` tree (DIR) in a subprocess and
adds its numbers and the speed-up. ``--torch-compile``: the engine compiles its decode
forward (``torch_compile=True``); build, warm-up (the compiles and graph captures) and
warm runs are timed apart (``pk_build_s``, ``pk_warmup_s``, ``pk_warm_runs_s``; their
sum ``pk_setup_s``), never in the timed runs, and each workload says whether the engine
stayed compiled and how many graphs it held after warm-up and after its runs.

Usage: python benchmarks/bench_e2e.py [--tiny] [--device cpu|cuda] [--plan pk,tf,plain]
       [--kv-dtype fp8]  (pagedkv's pool stored as fp8 / int8)
Writes benchmarks/out/bench_e2e.json (and $OUT/bench_e2e_<config>.json when OUT is set)
and a PNG of tok/s per workload beside each; ``--replot RESULT.json`` redraws one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

# runs uninstalled; PAGEDKV_BENCH_SRC: another src/ tree (the --baseline-src child)
SRC = os.environ.get("PAGEDKV_BENCH_SRC") or str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)
from _e2e_measure import (  # noqa: E402
    copy_bandwidth,
    device_breakdown,
    floor,
    run_baseline,
    strip_baseline_args,
    timed_runs,
)
from _plot import RAW, add_plot_arguments, bars, figure, plot_result, replot  # noqa: E402
from _progress import add_quiet_argument, steps  # noqa: E402

WORKLOADS = ("a", "b")

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
}  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", "--quick", action="store_true", help="small CPU-sized smoke run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default="smollm2", choices=sorted(SHAPES))
    ap.add_argument("--plan", default="pk,tf,plain", help="pk = pagedkv, tf = generate_batch")
    ap.add_argument("--workloads", default="a,b")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--num-blocks", type=int, default=None)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument(
        "--torch-compile",
        action="store_true",
        help="pagedkv's engine with torch_compile=True (a compiled forward, captured)",
    )
    ap.add_argument("--kv-dtype", default=None, help="pagedkv's KV pool format: fp8, int8, ...")
    ap.add_argument("--repeat", type=int, default=3, help="steady runs after the first")
    ap.add_argument("--tf-repeat", type=int, default=None, help="generate_batch's (--repeat)")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the profiled run")
    ap.add_argument("--baseline-src", default=None,
                    help="an older src/ tree: run the pagedkv part with it too")  # fmt: skip
    ap.add_argument("--baseline-timeout", type=float, default=None, help="seconds")
    ap.add_argument(
        "--out",
        default=str(Path(__file__).parent / "out" / "bench_e2e.json"),
        help="JSON file, or a folder to write bench_e2e_<config>.json into",
    )
    add_plot_arguments(ap)
    add_quiet_argument(ap)
    args = ap.parse_args(argv)
    if not set(args.plan.split(",")) <= {"pk", "tf", "plain"}:
        ap.error(f"--plan takes pk,tf,plain; got {args.plan!r}")
    if not set(args.workloads.split(",")) <= set(WORKLOADS):
        ap.error(f"--workloads takes a,b; got {args.workloads!r}")
    if (args.requests is not None and args.requests < 1) or (args.num_blocks or 1) < 1:
        ap.error("--requests and --num-blocks must be >= 1")
    if args.repeat < 0 or (args.tf_repeat or 0) < 0:
        ap.error("--repeat and --tf-repeat must be >= 0")
    if args.tf_repeat is None:
        args.tf_repeat = args.repeat
    return args


def _kv_tag(args: argparse.Namespace) -> str:
    return f"_kv_{args.kv_dtype}" if args.kv_dtype else ""


def plot(res: dict):
    """Generated tokens/s of pagedkv beside transformers' continuous batching and plain
    generate(), per workload (log scale: the gap is an order of magnitude)."""
    ws = [w for w in WORKLOADS if any(f"{p}_{w}" in res for p in ("pk", "tf", "plain"))]
    prefix, unique = res.get("prefix", 0), res.get("unique", 0)
    names = {"a": f"(a) shared {prefix:,}-token prefix\n+ {unique} unique tokens",
             "b": f"(b) unrelated\n{prefix + unique:,}-token prompts"}  # fmt: skip
    if not ws:
        raise ValueError("no tok/s rows in this result to plot")
    tok = lambda key: (res.get(key) or {}).get("tok_per_s")  # noqa: E731
    series = {
        "pagedkv Engine": [tok(f"pk_{w}") for w in ws],
        "transformers generate_batch": [tok(f"tf_{w}") for w in ws],
        f"plain generate(), batch {res.get('plain_b', {}).get('batch', '?')}": [
            tok(f"plain_{w}") for w in ws
        ],
    }
    series = {k: v for k, v in series.items() if any(x is not None for x in v)}
    for w in ws:
        if res.get(f"ratio_{w}_pk_over_tf"):
            names[w] += f"\npagedkv: {res[f'ratio_{w}_pk_over_tf']:.1f}x generate_batch"
    shape = res.get("shape", res.get("config"))
    fig, (ax,) = figure(size=(7.5, 4.8), title=(
        f"end-to-end generation, {res['device_name']}, {res['date']}\n"
        f"{shape} shape ({res.get('params_M', '?')} M params, {res.get('dtype')}), "
        f"{res['requests']} requests x {res['new_tokens']} new tokens"))  # fmt: skip
    colors = dict(zip(series, ["#1f77b4", RAW, "#c7c7c7"]))
    bars(ax, [names[w] for w in ws], series, ylabel="generated tokens / s (log)", log=True,
         fmt="{:,.0f}".format, colors=colors)  # fmt: skip
    ax.margins(y=0.2)
    return fig


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.replot:
        raise SystemExit(replot(plot, args.replot))
    plan, ws = args.plan.split(","), args.workloads.split(",")
    total = ("pk" in plan) * (1 + len(ws)) + ("tf" in plan) * (1 + len(ws)) + ("plain" in plan)
    with steps(total, "end-to-end runs", quiet=args.quiet) as bar:
        res, outs = run(args, bar, strip_baseline_args(argv))
    if args.plot:
        plot_result(plot, res, outs)


def run(args: argparse.Namespace, bar, child_argv: list[str]) -> tuple[dict, list[Path]]:
    """Every run of the plan; ``bar.done()`` between them (outside the timed windows)."""
    import transformers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    dev = torch.device(args.device)
    if args.tiny:
        shape, n_req, prefix_len, uniq, new, plain_bs = SHAPES["tiny"], 8, 64, 8, 8, 4
    else:
        shape, n_req, prefix_len, uniq, new, plain_bs = SHAPES[args.config], 256, 1024, 32, 128, 64
    n_req = args.requests or n_req
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    res: dict = dict(
        date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
        transformers=transformers.__version__, device=str(dev), config=args.config,
        shape="tiny" if args.tiny else args.config,
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        requests=n_req, prefix=prefix_len, unique=uniq, new_tokens=new, dtype=str(dtype),
        kv_dtype=args.kv_dtype,
    )  # fmt: skip
    out = Path(args.out)
    if out.is_dir() or not out.suffix:  # a folder: name the file after the run
        out = out / f"bench_e2e_{args.config}{_kv_tag(args)}.json"
    outs = [out] + (
        [Path(os.environ["OUT"]) / f"bench_e2e_{args.config}{_kv_tag(args)}.json"]
        if os.environ.get("OUT") else []
    )  # fmt: skip

    def dump():
        for p in outs:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(res, indent=1))

    cfg = LlamaConfig(
        **shape, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    model = model.to(dev).eval()
    model.generation_config.eos_token_id = None
    res["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    vocab = shape["vocab_size"]
    g = torch.Generator().manual_seed(1234)

    def rand_ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    prefix = rand_ids(prefix_len)
    workloads = {
        "a": [prefix + rand_ids(uniq) for _ in range(n_req)],
        "b": [rand_ids(prefix_len + uniq) for _ in range(n_req)],
    }
    # Warm-up of the same shape as the timed runs (batch size, prompt length, so the
    # same CUDA-graph buckets), few new tokens, other token ids: kernels compile and
    # graphs are captured outside the timed window. Both engines get the same warm-up.
    warm = [rand_ids(prefix_len + uniq) for _ in range(n_req)]
    warm_new = min(new, 8)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def mem_reset():
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib():
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None

    model_gib = peak_gib()
    plan = args.plan.split(",")
    first_tokens: dict = {}

    # ---------------------------------------------------------------- pagedkv
    if "pk" in plan:
        from pagedkv.engine import Engine, SamplingParams

        need = -(-(prefix_len + uniq + new) // 16) * n_req + 64
        blocks = args.num_blocks or need
        try:
            mem_reset()
            t = time.perf_counter()
            engine = Engine(
                model, num_blocks=blocks, block_size=16, max_batch_tokens=8192,
                max_num_seqs=max(n_req, 16), cuda_graphs=not args.no_graphs,
                kv_dtype=args.kv_dtype, torch_compile=args.torch_compile,
            )  # fmt: skip
            sp = SamplingParams(max_new_tokens=new, ignore_eos=True)
            warm_sp = SamplingParams(max_new_tokens=warm_new, ignore_eos=True)
            sync()
            t_built = time.perf_counter()
            res["pk_build_s"] = round(t_built - t, 2)
            if hasattr(engine, "warmup"):  # every kernel and graph bucket, up front
                wu = engine.warmup()  # (torch.compile of the decode forward: here)
                res["pk_warmup"] = {k: round(getattr(wu, k), 2) for k in ("kernels", "forwards",
                                    "graphs", "compiles", "seconds") if hasattr(wu, k)}  # fmt: skip
            sync()
            t_warm = time.perf_counter()
            res["pk_warmup_s"] = round(t_warm - t_built, 2)
            engine.generate(warm, warm_sp)  # the same shape class as the timed runs
            engine.generate(warm[:3], sp)
            sync()
            res["pk_warm_runs_s"] = round(time.perf_counter() - t_warm, 2)
            # build + warm-up (compiles, graph captures) + warm runs: none of it is timed
            res["pk_setup_s"] = round(time.perf_counter() - t, 2)
            res["pk_torch_compile"] = args.torch_compile
            compiled = getattr(engine.runner, "compiled", None)
            compiles_warm = getattr(compiled, "graphs", None)
            print(f"pk setup {res['pk_setup_s']} s: build {res['pk_build_s']} s, warm-up "
                  f"{res['pk_warmup_s']} s {res.get('pk_warmup', '')}, warm runs "
                  f"{res['pk_warm_runs_s']} s", flush=True)  # fmt: skip
            res["pagedkv_src"] = str(Path(sys.modules["pagedkv"].__file__).parent)
            res["bandwidth_GBps"] = round(copy_bandwidth(dev) / 1e9, 1)
            bar.done()
            for w in args.workloads.split(","):
                before = engine.stats()

                def one_run(w=w):
                    engine.cache.manager.reset_prefix_cache()
                    return engine.generate(workloads[w], sp)

                runs = timed_runs(one_run, dev, args.repeat)
                outs_pk = runs.pop("result")
                s = engine.stats()
                n_runs = 1 + args.repeat
                gen = sum(len(o.token_ids) for o in outs_pk)
                first_tokens[f"pk_{w}"] = outs_pk[0].token_ids[:16]
                bpb = engine.cache.layout.bytes_per_block
                fl = floor(model, n_req=n_req, prefix=prefix_len, unique=uniq, new=new,
                           shared=w == "a", bandwidth=res["bandwidth_GBps"] * 1e9)  # fmt: skip
                tok_s = gen / runs["steady_s"]
                r = res[f"pk_{w}"] = dict(
                    **runs, wall_s=runs["steady_s"], generated_tokens=gen,
                    tok_per_s=round(tok_s, 1), first_tok_per_s=round(gen / runs["first_s"], 1),
                    first_over_steady=round(runs["first_s"] / runs["steady_s"], 3),
                    pct_of_floor_no_sharing=round(
                        100 * tok_s / fl["floor_no_sharing_tok_per_s"], 1
                    ),
                    floor=fl,
                    prompt_tokens=(s.prompt_tokens - before.prompt_tokens) // n_runs,
                    cached_tokens=(s.cached_tokens - before.cached_tokens) // n_runs,
                    prefill_tokens=(s.prefill_tokens - before.prefill_tokens) // n_runs,
                    steps=(s.steps - before.steps) // n_runs,
                    preemptions=s.preemptions - before.preemptions,
                    kv_pool_GiB=round(blocks * bpb / 2**30, 2),
                    kv_peak_used_GiB=round(s.blocks_peak * bpb / 2**30, 2),
                    peak_mem_GiB=peak_gib(),
                    graphs=None if engine.runner.graphs is None else
                    dict(captured=len(engine.runner.graphs.graphs),
                         disabled=engine.runner.graphs.disabled),
                )  # fmt: skip
                if "floor_shared_tok_per_s" in fl:
                    r["pct_of_floor_shared"] = round(100 * tok_s / fl["floor_shared_tok_per_s"], 1)
                r["step_ms"] = round(1e3 * runs["steady_s"] / max(1, r["steps"]), 3)
                if not args.no_breakdown:
                    prof_sp = SamplingParams(max_new_tokens=min(new, 32), ignore_eos=True)

                    def profiled(w=w, sp=prof_sp):
                        engine.cache.manager.reset_prefix_cache()
                        return engine.generate(workloads[w], sp)

                    try:  # a profiler failure loses the breakdown, not the run
                        bd = device_breakdown(profiled, dev, lambda: engine.stats().steps)
                        r["breakdown"] = dict(bd, new_tokens=prof_sp.max_new_tokens)
                    except Exception as exc:
                        r["breakdown"] = dict(error=repr(exc))
                if args.torch_compile:  # still compiled? and did the timed runs recompile?
                    from torch._dynamo.utils import counters

                    compiled = getattr(engine.runner, "compiled", None)
                    r["compiled"] = dict(
                        active=compiled is not None, graphs_after_warmup=compiles_warm,
                        graphs_now=getattr(compiled, "graphs", None),
                        dynamo_graph_breaks=sum(counters["graph_break"].values()),
                        dynamo_unique_graphs=counters["stats"]["unique_graphs"],
                    )  # fmt: skip
                print(f"pk_{w}", json.dumps(r), flush=True)
                dump()
                bar.done()
            del engine, outs_pk
        except Exception as e:
            res["pk_error"] = dict(error=repr(e), traceback=traceback.format_exc()[-3000:])
            print("pk error", traceback.format_exc(), flush=True)
        dump()

    # ------------------------------------------------- transformers continuous batching
    model.set_attn_implementation("sdpa")
    gen_cfg = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    if "tf" in plan:
        try:
            from transformers import ContinuousBatchingConfig
        except ImportError:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig
        try:
            mem_reset()
            warm_cfg = GenerationConfig(
                max_new_tokens=warm_new, do_sample=False, eos_token_id=-1, pad_token_id=0
            )
            model.generate_batch(inputs=warm, generation_config=warm_cfg,
                                 continuous_batching_config=ContinuousBatchingConfig(),
                                 progress_bar=False)  # fmt: skip
            bar.done()
            for w in args.workloads.split(","):
                mem_reset()

                def one_run(w=w):
                    return model.generate_batch(
                        inputs=workloads[w], generation_config=gen_cfg,
                        continuous_batching_config=ContinuousBatchingConfig(), progress_bar=False,
                    )  # fmt: skip

                runs = timed_runs(one_run, dev, args.tf_repeat)
                out = runs.pop("result")
                gen = sum(len(o.generated_tokens) for o in out.values())
                first = out[sorted(out)[0]] if out else None
                if first is not None:
                    first_tokens[f"tf_{w}"] = list(first.generated_tokens[:16])
                res[f"tf_{w}"] = dict(
                    **runs, wall_s=runs["steady_s"], generated_tokens=gen,
                    tok_per_s=round(gen / runs["steady_s"], 1),
                    first_tok_per_s=round(gen / runs["first_s"], 1), peak_mem_GiB=peak_gib(),
                )  # fmt: skip
                print(f"tf_{w}", json.dumps(res[f"tf_{w}"]), flush=True)
                dump()
                bar.done()
        except Exception as e:
            res["tf_error"] = dict(error=repr(e), traceback=traceback.format_exc()[-3000:])
            print("tf error", traceback.format_exc(), flush=True)

    # ------------------------------------------------------------ plain generate()
    if "plain" in plan:
        try:
            mem_reset()
            ids = torch.tensor(workloads["b"][:plain_bs], device=dev)
            am = torch.ones_like(ids)
            model.generate(input_ids=ids[:2, :64], attention_mask=am[:2, :64], max_new_tokens=4,
                           do_sample=False, pad_token_id=0)  # fmt: skip
            sync()
            t = time.perf_counter()
            o = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=0)  # fmt: skip
            sync()
            wall = time.perf_counter() - t
            gen = (o.shape[1] - ids.shape[1]) * ids.shape[0]
            res["plain_b"] = dict(
                batch=plain_bs, wall_s=round(wall, 3), generated_tokens=gen,
                tok_per_s=round(gen / wall, 1), peak_mem_GiB=peak_gib(),
            )  # fmt: skip
            print("plain_b", json.dumps(res["plain_b"]), flush=True)
            bar.done()
        except Exception as e:
            res["plain_error"] = dict(error=repr(e), traceback=traceback.format_exc()[-3000:])

    # ------------------------------------------------------- the older source tree
    if args.baseline_src and "pk" in plan:
        dump()
        mem_reset()
        base = run_baseline(args.baseline_src, child_argv, args.baseline_timeout)
        res["baseline"] = {k: v for k, v in base.items() if k == "error" or k.startswith("pk")}
        res["baseline"]["src"] = base.get("pagedkv_src", args.baseline_src)
        for w in args.workloads.split(","):
            old, cur = base.get(f"pk_{w}"), res.get(f"pk_{w}")
            if old and cur:
                res[f"ratio_{w}_pk_over_baseline"] = round(cur["tok_per_s"] / old["tok_per_s"], 2)
                res[f"ratio_{w}_pk_over_baseline_first"] = round(
                    cur["first_tok_per_s"] / old.get("first_tok_per_s", old["tok_per_s"]), 2
                )
        print("baseline", json.dumps(res["baseline"])[:3000], flush=True)

    # ------------------------------------------------------------------ summary
    res["model_GiB"] = model_gib
    res["first_tokens"] = first_tokens
    for w in args.workloads.split(","):
        pk, tf = res.get(f"pk_{w}"), res.get(f"tf_{w}")
        if pk and tf:
            res[f"ratio_{w}_pk_over_tf"] = round(pk["tok_per_s"] / tf["tok_per_s"], 2)
        if pk and res.get("plain_b"):
            res[f"ratio_{w}_pk_over_plain"] = round(
                pk["tok_per_s"] / res["plain_b"]["tok_per_s"], 2
            )
    dump()
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"end-to-end generation, {res['device_name']}, {n_req} requests")
    cols = ("run", "tok/s (steady)", "first / steady", "floor tok/s", "% of floor",
            "device ms/step", "host+idle ms/step", "prefill computed", "from cache")  # fmt: skip
    for col in cols:
        table.add_column(col)
    rows = {k: v for k, v in res.items() if k[:3] in ("pk_", "tf_") or k == "plain_b"}
    rows.update({f"baseline {k}": v for k, v in res.get("baseline", {}).items()})
    for key, r in rows.items():
        if not isinstance(r, dict) or "tok_per_s" not in r:
            continue
        fl, bd = r.get("floor") or {}, r.get("breakdown") or {}
        ratio = r.get("first_over_steady")
        table.add_row(
            key, f"{r['tok_per_s']:,.0f}", "" if ratio is None else f"{ratio:.2f}",
            f"{fl.get('floor_no_sharing_tok_per_s', 0):,.0f}" if fl else "",
            str(r.get("pct_of_floor_no_sharing", "")), str(bd.get("device_ms_per_step", "")),
            str(bd.get("host_or_idle_ms_per_step", "")), str(r.get("prefill_tokens", "")),
            str(r.get("cached_tokens", "")),
        )  # fmt: skip
    Console().print(table)
    print({k: v for k, v in res.items() if k.startswith("ratio")}, flush=True)
    return res, outs


if __name__ == "__main__":
    main()
