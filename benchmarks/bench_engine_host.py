"""Host cost of one engine decode step, apart from the model forward (issue 14).

    PYTHONPATH=src python benchmarks/bench_engine_host.py [--batch 256,64]
        [--baseline-src /work/main/src] [--sampling greedy,mixed] [--path graphs,eager]

Runs a real :class:`~pagedkv.Engine` (scheduler, chunks, metadata / block tables /
positions, sampling, ``update()``, stop checks, stats; ``overlap=True``) over a tiny
Llama whose forward is replaced by a stub costing almost nothing: logits are rows of a
fixed random matrix picked by each logit row's input id and position, so tokens still
depend on what the engine feeds the model (a wrong id or position changes the outputs,
whose hash is compared with the baseline's). Workload: ``--batch`` requests sharing a
1,024-token prefix + 32 own tokens, 128 new tokens each (workload (a) of bench_e2e.py).

``--path graphs`` (default, what a GPU runs): decode steps go through
:class:`~pagedkv.engine.cuda_graphs.DecodeGraphs` with a "graph" that replays its
captured forward eagerly on the CPU, so the host side of ``DecodeGraphs.run`` (packing,
table deltas, cascade grouping) is measured as on the GPU; ``eager``: the runner's
``prepare`` path. ``--sampling greedy``: all greedy (bench_e2e); ``mixed``: every other
request seeded (temperature 0.8, top-p 0.9).

Reports per-step and per-row microseconds (CPU time of the stepping thread, so other
load on a shared machine counts little) of the full-batch decode steps (median over
the steps), by phase: schedule, launch (of it: pack = graph run / prepare, sample),
commit, resolve (of it: update), the rest of ``step()``; with ``--baseline-src`` the
same runs on that source tree, both trees in subprocesses, alternating ``--passes``
times (the cheapest pass of each kept), and the ratio. Writes JSON to
benchmarks/out/bench_engine_host.json (and $OUT when set).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: the step's and phases' clock: CPU time of this thread (other processes on a shared
#: machine preempt it; wall time would count their share)
CLOCK = time.thread_time
PHASES = ("schedule", "launch", "pack", "sample", "commit", "resolve", "update")


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", default="256,64", help="batch sizes (comma separated)")
    ap.add_argument("--sampling", default="greedy,mixed")
    ap.add_argument("--path", default="graphs,eager")
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--unique", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="timed generations per case")
    ap.add_argument("--baseline-src", default=None, help="an older src/ tree to compare")
    ap.add_argument("--passes", type=int, default=2, help="alternating passes per tree")
    ap.add_argument("--src", default=str(HERE.parent / "src"), help=argparse.SUPPRESS)
    ap.add_argument("--json-stdout", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "out" / "bench_engine_host.json"))
    return ap.parse_args()


def timed(totals: dict, name: str, fn):
    """``fn`` wrapped to add its wall time to ``totals[name]``."""

    def wrapper(*a, **kw):
        t = CLOCK()
        try:
            return fn(*a, **kw)
        finally:
            totals[name] = totals.get(name, 0.0) + CLOCK() - t

    return wrapper


def build(args, batch: int, path: str):
    import torch
    import transformers

    from pagedkv.engine import Engine, cuda_graphs

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=4096, num_hidden_layers=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    model.generation_config.eos_token_id = None
    need = -(-(args.prefix + args.unique + args.new) // 16) * batch + 64
    engine = Engine(
        model, num_blocks=need, block_size=16, max_batch_tokens=8192,
        max_num_seqs=batch, overlap=True, cuda_graphs=False,
    )  # fmt: skip
    runner = engine.runner
    table = torch.randn(cfg.vocab_size, cfg.vocab_size)

    def forward(ids, pos, meta, logit_rows):  # the model stub: almost free
        return table[(ids[logit_rows] * 7 + pos[logit_rows]) % cfg.vocab_size]

    runner.forward = forward
    if path == "graphs":
        if not torch.cuda.is_available():  # the graphs' packing pins; nothing to pin here
            pinned = cuda_graphs.host_int64
            cuda_graphs.host_int64 = lambda values, pin: pinned(values, False)

        class EagerReplay:
            def __init__(self, graphs, key):
                self.graphs, self.key = graphs, key

            def replay(self):
                g, (b, wb, cascade, _) = self.graphs, self.key
                out = g._forward(b, wb, cascade)
                if g.logits is None:
                    g.logits = torch.empty(g.max_batch, out.shape[-1], dtype=out.dtype)
                g.logits[:b].copy_(out)

        class CPUGraphs(cuda_graphs.DecodeGraphs):
            def _capture(self, key):
                b, wb, cascade, _ = key
                if cascade and (b, wb) not in self.plans:
                    self.plans[b, wb] = self._plan(b, wb)
                    self.plans[b, wb].grouping.refill(())
                    self._grouped[b] = None
                self.graphs[key] = EagerReplay(self, key)
                self._tables_key = None

        runner.graphs = CPUGraphs(runner, max_batch=batch)
    return engine


def workload(args, batch: int, sampling: str, seed: int = 0):
    import random

    from pagedkv.engine import SamplingParams

    rng = random.Random(seed)
    prefix = [rng.randrange(256) for _ in range(args.prefix)]
    prompts = [prefix + [rng.randrange(256) for _ in range(args.unique)] for _ in range(batch)]
    greedy = SamplingParams(max_new_tokens=args.new, ignore_eos=True)
    params = []
    for i in range(batch):
        if sampling == "mixed" and i % 2:
            params.append(SamplingParams(
                max_new_tokens=args.new, ignore_eos=True, temperature=0.8, top_p=0.9, seed=i
            ))  # fmt: skip
        else:
            params.append(greedy)
    return prompts, params


def measure(args, batch: int, sampling: str, path: str) -> dict:
    engine = build(args, batch, path)
    core, sched, runner = engine.core, engine.scheduler, engine.runner
    prompts, params = workload(args, batch, sampling)
    engine.generate(prompts[:4], params[:4])  # warm-up (first calls, graph "captures")
    totals: dict[str, float] = {}
    sched.schedule = timed(totals, "schedule", sched.schedule)
    sched.commit = timed(totals, "commit", sched.commit)
    sched.update = timed(totals, "update", sched.update)
    core._resolve = timed(totals, "resolve", core._resolve)
    runner.launch = timed(totals, "launch", runner.launch)
    runner._sample = timed(totals, "sample", runner._sample)
    if runner.graphs is not None:
        runner.graphs.run = timed(totals, "pack", runner.graphs.run)
    else:
        runner.prepare = timed(totals, "pack", runner.prepare)
    launched: list[int] = []
    launch = runner.launch

    def counting_launch(chunks):
        decode = all(c.end - c.start == 1 for c in chunks)
        launched.append(len(chunks) if decode else -1)
        return launch(chunks)

    runner.launch = counting_launch
    steps, digest, walls = [], hashlib.sha256(), []
    for r in range(args.rounds):
        t_run = time.perf_counter()
        engine.cache.manager.reset_prefix_cache()
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        outs = {}
        while engine.has_unfinished():
            totals.clear()
            n0 = len(launched)
            t = CLOCK()
            for o in engine.step():
                outs[o.request_id] = o
            wall = CLOCK() - t
            full = len(launched) == n0 + 1 and launched[-1] == batch
            if full:
                steps.append(dict(totals, step=wall))
        walls.append(time.perf_counter() - t_run)
        if r == 0:
            for i in ids:
                digest.update(repr(outs[i].token_ids).encode())
    med = {k: statistics.median(s.get(k, 0.0) for s in steps) * 1e6 for k in (*PHASES, "step")}
    other = med["step"] - med["schedule"] - med["launch"] - med["commit"] - med["resolve"]
    return dict(
        batch=batch, sampling=sampling, path=path, decode_steps=len(steps),
        step_us=round(med["step"], 1), per_row_us=round(med["step"] / batch, 2),
        phases_us={**{k: round(med[k], 1) for k in PHASES}, "other": round(other, 1)},
        run_s=round(statistics.median(walls), 4),
        run_us_per_token=round(1e6 * statistics.median(walls) / (batch * args.new), 2),
        outputs_sha256=digest.hexdigest()[:16],
    )  # fmt: skip


def run_all(args) -> list[dict]:
    res = []
    for path in args.path.split(","):
        for sampling in args.sampling.split(","):
            for b in (int(x) for x in args.batch.split(",")):
                res.append(measure(args, b, sampling, path))
                if not args.json_stdout:
                    print(json.dumps(res[-1]), flush=True)
    return res


def in_subprocess(args, src: str) -> list[dict] | dict:
    """run_all() on the source tree ``src``, in a fresh interpreter."""
    argv = [sys.executable, __file__, "--src", src, "--json-stdout",
            "--batch", args.batch, "--sampling", args.sampling, "--path", args.path,
            "--prefix", str(args.prefix), "--unique", str(args.unique), "--new", str(args.new),
            "--rounds", str(args.rounds)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=src)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode:
        return dict(error=proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best(runs: list[list[dict]]) -> list[dict]:
    """Per case, the pass with the cheapest step (the least disturbed by other load)."""
    return [min(cases, key=lambda c: c["step_us"]) for cases in zip(*runs)]


def compare(args) -> tuple[list[dict], list[dict] | dict]:
    """This tree and the baseline alternately, ``--passes`` times each (other load on the
    machine changes over minutes: alternating spreads it over both)."""
    new_runs, base_runs = [], []
    for _ in range(args.passes):
        for src, runs in ((args.src, new_runs), (args.baseline_src, base_runs)):
            got = in_subprocess(args, src)
            if isinstance(got, dict):
                return new_runs[0] if new_runs else [], got
            runs.append(got)
    return best(new_runs), best(base_runs)


def main() -> None:
    args = parse()
    sys.path.insert(0, args.src)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    torch.set_num_threads(1)  # host cost, not intra-op parallelism
    if args.json_stdout:
        print(json.dumps(run_all(args)))
        return
    import pagedkv

    if args.baseline_src:
        res, base = compare(args)
    else:
        res, base = run_all(args), None
    out = dict(date=time.strftime("%Y-%m-%d"), src=str(Path(pagedkv.__file__).parent),
               torch=torch.__version__, passes=args.passes, cases=res)  # fmt: skip
    if args.baseline_src:
        out["baseline_src"], out["baseline"] = args.baseline_src, base
        if isinstance(base, list):
            print(f"{'case':28} {'base us/step':>12} {'new us/step':>12} {'x faster':>9} same")
            for new, old in zip(res, base):
                name = f"{new['path']} {new['sampling']} B={new['batch']}"
                ratio = old["step_us"] / new["step_us"]
                new["speedup_vs_baseline"] = round(ratio, 2)
                same = new["outputs_sha256"] == old["outputs_sha256"]
                new["outputs_match_baseline"] = same
                print(f"{name:28} {old['step_us']:12.1f} {new['step_us']:12.1f} "
                      f"{ratio:9.2f} {same}")  # fmt: skip
            print("phases (us/step, new | base):")
            for new, old in zip(res, base):
                name = f"{new['path']} {new['sampling']} B={new['batch']}"
                ph = " ".join(f"{k} {v:.0f}|{old['phases_us'][k]:.0f}"
                              for k, v in new["phases_us"].items())  # fmt: skip
                print(f"  {name:26} {ph}")
        else:
            print("baseline failed:", base["error"])
    paths = [Path(args.out)] + ([Path(os.environ["OUT"]) / "bench_engine_host.json"]
                                if os.environ.get("OUT") else [])  # fmt: skip
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
