"""Live migration: N running requests moved from engine A to engine B while both keep serving.

For each pair of devices (``--pairs``; default: ``cuda:0>cuda:1`` with two GPUs,
``cuda:0>cuda:0`` (two engines on one GPU), ``cuda:0>cpu`` and ``cpu>cuda:0`` with one,
``cpu>cpu`` without a GPU) the same workload runs twice, one thread stepping A then B
(a "round"):

1. reference: A serves ``--requests`` requests (``--move`` of them to be moved) and B
   serves ``--requests-b``, with nothing moving, to the end;
2. migration: the same, but once every request decodes (after ``--warm`` rounds) the
   ``--move`` requests are started towards B (:class:`pagedkv.engine.Migrator`: their full
   blocks copied by one background thread while both engines keep stepping), and after
   each round up to ``--per-round`` migrations whose copy is done are finished (the
   stop-and-copy) between the steps.

Reported per pair: the pause each migrated request sees (time from its last token on A to
its first on B; the ordinary gap between two tokens is one round, shown beside it), the
stop-and-copy alone (``MigrationResult.pause_seconds``), blocks copied in the background
and in the stop, bytes, aggregate generated tok/s of both engines over the rounds of the
migration vs the same rounds of the reference run, and token identity of every request
(migrated or not) with the reference run (batch-invariant mode: ``EngineConfig.
batch_invariant`` when the engine has it, else ``pagedkv.ops.batch_invariant_mode()``
around the steps). Between a CUDA and a CPU engine the kernels differ, so identity with
the reference (which ran the request on A) is not expected there and is not asserted.

Model: a random-weight Llama with SmolLM2-135M's shape, bf16, for GPU pairs; a tiny
float32 one for pairs with the CPU (``--shape`` overrides). Prompts are random (no shared
prefix). Prints a table; writes JSON to benchmarks/out/migrate.json (and $OUT when set).

    python benchmarks/bench_migrate.py [--pairs cuda:0>cuda:1,cuda:0>cpu] [--move 64]
        [--requests 128] [--requests-b 64] [--prompt 192] [--new-tokens 64] [--graphs]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs uninstalled
from pagedkv.engine import Engine, EngineConfig, Migrator, SamplingParams  # noqa: E402
from pagedkv.ops import batch_invariant_mode  # noqa: E402

HERE = Path(__file__).resolve().parent
SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
}  # fmt: skip
HAS_INVARIANT_OPTION = "batch_invariant" in {f.name for f in dataclasses.fields(EngineConfig)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default=None, help="source>target,... (default: by devices)")
    ap.add_argument("--move", type=int, default=None, help="requests migrated (default 64)")
    ap.add_argument("--requests", type=int, default=None, help="on A, moved ones included")
    ap.add_argument("--requests-b", type=int, default=None, help="on B")
    ap.add_argument("--prompt", type=int, default=192, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--warm", type=int, default=4, help="rounds of decoding before moving")
    ap.add_argument("--per-round", type=int, default=16, help="switches at most per round")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--graphs", action="store_true", help="CUDA graphs for decode")
    ap.add_argument("--out", default=str(HERE / "out" / "migrate.json"))
    args = ap.parse_args(argv)
    if args.pairs is None:
        n = torch.cuda.device_count()
        args.pairs = {0: "cpu>cpu", 1: "cuda:0>cuda:0,cuda:0>cpu,cpu>cuda:0"}.get(
            n, "cuda:0>cuda:1,cuda:0>cuda:0,cuda:0>cpu"
        )
    pairs = [tuple(p.split(">")) for p in args.pairs.split(",")]
    if any(len(p) != 2 for p in pairs):
        ap.error(f"--pairs takes source>target,...; got {args.pairs!r}")
    args.pairs = pairs
    return args


def sizes(args, pair: tuple[str, str]) -> dict:
    """Requests and shape of one pair: GPU pairs take the full defaults, pairs with a CPU
    engine fewer requests on a tiny model (a CPU forward is slow)."""
    cpu = "cpu" in pair
    gpu_only = not cpu
    move = args.move or (64 if gpu_only else 16)
    return dict(
        move=move,
        requests=args.requests or (2 * move),
        requests_b=args.requests_b or move,
        shape=args.shape or ("smollm2" if gpu_only else "tiny"),
    )


def build_model(shape: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    return model


def engines(model, pair, args, num_blocks: int) -> tuple[Engine, Engine]:
    placed: dict[str, object] = {}
    out = []
    for dev in pair:
        if dev not in placed:
            placed[dev] = copy.deepcopy(model).to(dev) if placed else model.to(dev)
        opts = dict(num_blocks=num_blocks, block_size=args.block_size, cuda_graphs=args.graphs,
                    max_num_seqs=512)  # fmt: skip
        if HAS_INVARIANT_OPTION:
            opts["batch_invariant"] = True
        out.append(Engine(placed[dev], **opts))
    return out[0], out[1]


def invariant_scope():
    return contextlib.nullcontext() if HAS_INVARIANT_OPTION else batch_invariant_mode()


def workload(n_a: int, n_b: int, prompt: int, vocab: int) -> tuple[list, list]:
    g = torch.Generator().manual_seed(1)
    draw = lambda: torch.randint(3, vocab, (prompt,), generator=g).tolist()  # noqa: E731
    return [draw() for _ in range(n_a)], [draw() for _ in range(n_b)]


def sync(*engines: Engine) -> None:
    for e in engines:
        if e.device.type == "cuda":
            torch.cuda.synchronize(e.device)


class Run:
    """One pass of the workload over a fresh pair of engines; ``migrate=None`` moves
    nothing (the reference)."""

    def __init__(self, a: Engine, b: Engine, prompts_a, prompts_b, sp, moved: list[int]):
        self.a, self.b, self.sp = a, b, sp
        self.ids_a = [a.add_request(p, sp) for p in prompts_a]
        self.ids_b = [b.add_request(p, sp) for p in prompts_b]
        self.moved = moved  # indexes into prompts_a
        self.where = {i: (a, self.ids_a[i]) for i in moved}  # engine and id of each moved one
        self.last_a: dict[int, float] = {}
        self.first_b: dict[int, float] = {}
        self.seen = {i: 0 for i in moved}
        self.round_times: list[float] = []
        self.generated: list[int] = []  # both engines' generated tokens after each round
        self.outputs: tuple[dict, dict] = ({}, {})

    def tokens_done(self) -> int:
        return self.a.stats().generated_tokens + self.b.stats().generated_tokens

    def observe(self, engine: Engine, t: float) -> None:
        for i, (e, rid) in self.where.items():
            req = e.core.requests.get(rid) if e is engine else None
            if req is None or len(req.output) <= self.seen[i]:
                continue
            self.seen[i] = len(req.output)
            if e is self.a:
                self.last_a[i] = t
            elif i not in self.first_b:
                self.first_b[i] = t

    def round(self, between=None) -> None:
        """A.step, then ``between()`` (the switches: a request switched there decodes on B
        in this same round), then B.step."""
        t0 = time.perf_counter()
        for k, e in enumerate((self.a, self.b)):
            if k and between is not None:
                between()
            for o in e.step():
                self.outputs[k][o.request_id] = o.token_ids
            self.observe(e, time.perf_counter())
        self.round_times.append(time.perf_counter() - t0)
        self.generated.append(self.tokens_done())

    def busy(self) -> bool:
        return self.a.has_unfinished() or self.b.has_unfinished()

    def all_decoding(self) -> bool:
        reqs = [self.a.core.requests.get(r) for r in self.ids_a]
        return all(r is not None and r.output for r in reqs)


def run_pair(pair, args, bar=print) -> dict:
    sz = sizes(args, pair)
    cuda = any(d.startswith("cuda") for d in pair)
    dtype = (
        torch.bfloat16
        if sz["shape"] == "smollm2" and cuda and "cpu" not in pair
        else (torch.float32)
    )
    model = build_model(sz["shape"], dtype)
    sp = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    vocab = SHAPES[sz["shape"]]["vocab_size"]
    prompts_a, prompts_b = workload(sz["requests"], sz["requests_b"], args.prompt, vocab)
    moved = list(range(0, sz["requests"], max(1, sz["requests"] // sz["move"])))[: sz["move"]]
    per_req = -(-(args.prompt + args.new_tokens) // args.block_size) + 1
    num_blocks = per_req * (sz["requests"] + sz["requests_b"]) + 64
    res: dict = dict(pair=">".join(pair), **sz, dtype=str(dtype), prompt=args.prompt,
                     new_tokens=args.new_tokens, graphs=args.graphs)  # fmt: skip
    with invariant_scope():
        warm_a, warm_b = engines(model, pair, args, 256)  # compile kernels outside timing
        for e in (warm_a, warm_b):
            e.generate([prompts_a[0][:40], prompts_b[0][:33]], SamplingParams(max_new_tokens=4))
        del warm_a, warm_b
        bar(f"{res['pair']}: reference run")
        ref = Run(*engines(model, pair, args, num_blocks), prompts_a, prompts_b, sp, moved)
        while ref.busy():
            ref.round()
        bar(f"{res['pair']}: migration run")
        mig = Run(*engines(model, pair, args, num_blocks), prompts_a, prompts_b, sp, moved)
        while not mig.all_decoding():
            mig.round()
        for _ in range(args.warm):
            mig.round()
        r0 = len(mig.round_times)
        sync(mig.a, mig.b)
        t_start = time.perf_counter()
        results: list = []
        copy_done: list[float] = []
        with Migrator(mig.a, mig.b) as link:
            pending = [(i, link.start(mig.ids_a[i])) for i in moved]

            def switch() -> None:
                if not copy_done and all(m.ready() for _, m in pending):
                    copy_done.append(time.perf_counter() - t_start)
                for i, m in [p for p in pending if p[1].ready()][: args.per_round]:
                    r = m.finish()
                    results.append(r)
                    mig.where[i] = (mig.b, r.target_request_id)
                    pending.remove((i, m))

            while pending:
                mig.round(switch)
            r1 = len(mig.round_times)
        while mig.busy():
            mig.round()
    rounds = slice(r0, r1)
    res.update(summarize(ref, mig, rounds, results, moved, pair, (copy_done or [None])[0]))
    return res


def rate(run: Run, rounds: slice, before: int) -> float:
    """Generated tok/s of both engines over ``rounds`` (``before``: the round before)."""
    seconds = sum(run.round_times[rounds])
    tokens = run.generated[rounds.stop - 1] - run.generated[before]
    return tokens / seconds if seconds else float("nan")


def summarize(ref: Run, mig: Run, rounds: slice, results, moved, pair, copy_done) -> dict:
    before = rounds.start - 1
    pauses = [mig.first_b[i] - mig.last_a[i] for i in moved if i in mig.first_b]
    stops = [r.pause_seconds for r in results]
    ms = lambda xs, q: 1e3 * statistics.quantiles(xs, n=10)[q] if len(xs) > 1 else 1e3 * xs[0]  # noqa: E731
    same = sum(
        mig.outputs[0].get(rid) == ref.outputs[0][rid]
        for rid in ref.ids_a
        if rid not in {ref.ids_a[i] for i in moved}
    ) + sum(mig.outputs[1].get(rid) == ref.outputs[1][rid] for rid in ref.ids_b)
    moved_same = sum(
        mig.outputs[1].get(r.target_request_id) == ref.outputs[0][ref.ids_a[i]]
        for i, r in zip(moved, results)
    )
    others = len(ref.ids_a) - len(moved) + len(ref.ids_b)
    cross = len({d.split(":")[0] for d in pair}) > 1
    return dict(
        rounds=rounds.stop - rounds.start,
        round_ms_median=1e3 * statistics.median(ref.round_times[rounds]),
        pause_ms_median=1e3 * statistics.median(pauses),
        pause_ms_p90=ms(pauses, 8),
        pause_ms_max=1e3 * max(pauses),
        stop_copy_ms_median=1e3 * statistics.median(stops),
        stop_copy_ms_max=1e3 * max(stops),
        blocks_background=sum(r.blocks_background for r in results),
        blocks_final=sum(r.blocks_final for r in results),
        mib_moved=sum(r.bytes_copied for r in results) / 2**20,
        background_copy_s=copy_done,
        route=results[0].route,
        tok_s_without=rate(ref, rounds, before),
        tok_s_during=rate(mig, rounds, before),
        moved_identical=moved_same,
        others_identical=same,
        others=others,
        identity_expected=not cross,
    )


def table(rows: list[dict]) -> str:
    head = ("pair", "moved", "route", "pause ms med/p90/max", "stop ms med/max",
            "blocks bg/stop", "MiB", "tok/s without", "during", "ratio", "identical")  # fmt: skip
    lines = [" | ".join(head)]
    for r in rows:
        ident = f"{r['moved_identical']}/{r['move']} + {r['others_identical']}/{r['others']}"
        if not r["identity_expected"]:
            ident += " (kernels differ)"
        lines.append(" | ".join([
            r["pair"], str(r["move"]), str(r["route"]),
            f"{r['pause_ms_median']:.1f}/{r['pause_ms_p90']:.1f}/{r['pause_ms_max']:.1f} "
            f"(round {r['round_ms_median']:.1f})",
            f"{r['stop_copy_ms_median']:.2f}/{r['stop_copy_ms_max']:.2f}",
            f"{r['blocks_background']}/{r['blocks_final']}", f"{r['mib_moved']:.0f}",
            f"{r['tok_s_without']:,.0f}", f"{r['tok_s_during']:,.0f}",
            f"{r['tok_s_during'] / r['tok_s_without']:.2f}", ident,
        ]))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    t0 = time.perf_counter()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    out = dict(date=time.strftime("%Y-%m-%d"), host=platform.node(), torch=torch.__version__,
               devices=devices or ["cpu"], invariant_option=HAS_INVARIANT_OPTION,
               seconds=0.0, pairs=[])  # fmt: skip
    paths = [Path(args.out)] + ([Path(os.environ["OUT"]) / "migrate.json"]
                                if os.environ.get("OUT") else [])  # fmt: skip
    rows = out["pairs"]
    for pair in args.pairs:
        rows.append(run_pair(pair, args))
        out["seconds"] = time.perf_counter() - t0
        for p in paths:  # after each pair: a run cut short by a time limit keeps what it did
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(out, indent=1))
        print(table(rows[-1:]), flush=True)
    print(table(rows))
    print(
        f"({out['seconds']:.0f} s; one thread steps A then B; pause = last token on A to "
        "first on B, round = the ordinary gap between two tokens)"
    )
    bad = [r["pair"] for r in rows if r["identity_expected"] and (
        r["moved_identical"] != r["move"] or r["others_identical"] != r["others"])]  # fmt: skip
    if bad:
        raise SystemExit(f"token identity failed for {bad}")


if __name__ == "__main__":
    main()
