"""Host (CPU) cost per eager call of the ops, vs a raw Triton launch and FlashInfer.

    PYTHONPATH=src python benchmarks/bench_host.py [--cpu] [--no-flashinfer] [--calls 200]

On CUDA: the full host cost of one eager call with the GPU busy. A long sleep kernel is
queued first, then ``--calls`` back-to-back calls are timed on the CPU without a sync
(as FlashInfer's benchmarks time ``run``); the sleep must still be running when the loop
ends (column ``busy``), so no call waited for the GPU. Median of 7 rounds. Rows:
pagedkv ops (``check=False``) at B=1 ctx 512 (split decode: one kernel that also
merges, two before issue 14's fused merge; batch-invariant: split + merge kernel), B=64
ctx 512 (one kernel), ``DecodePlan.run`` (split + merge kernel), prefill and KV write;
the same decode kernel launched the ordinary Triton way (``kernel[grid](...)``) and
through pagedkv's bound launcher; FlashInfer ``BatchDecodeWithPagedKVCacheWrapper.run``
on the same pool (if importable; its first use may JIT-build); ``torch.empty`` for scale.

On CPU (``--cpu`` or no CUDA): the Python wrapper cost per call up to the kernel
launch: the Triton backend (through the interpreter's import) with every Launcher on
its bound fast path (its own Python runs, the compiled kernel's launcher is a no-op),
splits planned as on an H200 (132 SMs), and the torch reference's kernels as no-ops.
Run against another tree with a copy of this file outside the repository (its src/ is
put first on sys.path): ``PYTHONPATH=<tree>/src python /tmp/bench_host.py --cpu``.

Shapes: Hq 32, Hkv 8, D 128, block 16, bf16. Prints a table; writes JSON to
benchmarks/out/bench_host.json and to $OUT when set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--cpu", action="store_true", help="wrapper cost on the CPU (no GPU)")
ARGS.add_argument("--no-flashinfer", action="store_true")
ARGS.add_argument("--calls", type=int, default=200, help="calls per timed round")
ARGS.add_argument("--rounds", type=int, default=7)
CUDA = torch.cuda.is_available() and "--cpu" not in sys.argv
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from pagedkv import ops  # noqa: E402
from pagedkv.ops import _launch, reference  # noqa: E402
from pagedkv.storage import KVLayout, KVPool  # noqa: E402

HQ, HKV, D, BS, DT = 32, 8, 128, 16, torch.bfloat16


def make_case(b: int, ctx: int, dev):
    """A one-layer pool with b sequences of ctx tokens (blocks in random order)."""
    nb = b * -(-ctx // BS)
    pool = KVPool(KVLayout(1, HKV, D, BS, DT), nb, dev)
    tables = torch.randperm(nb, device=dev).to(torch.int32).view(b, -1)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(b, HQ, D, device=dev).to(DT)
    return pool, tables, lens, q


def calls(dev) -> dict:
    """name -> zero-argument callable doing one eager call."""
    pool, tables, lens, q = make_case(1, 512, dev)
    k, v = pool.k(0), pool.v(0)
    big, big_t, big_l, big_q = make_case(64, 512, dev)
    bk, bv = big.k(0), big.v(0)
    plan = ops.DecodePlan(64, HQ, HKV, D, BS, 512, dtype=DT, device=dev)
    cu = torch.tensor([0, 16], dtype=torch.int32, device=dev)
    qp = torch.randn(16, HQ, D, device=dev).to(DT)
    slots = torch.arange(64, dtype=torch.int64, device=dev)
    kn = torch.randn(64, HKV, D, device=dev).to(DT)
    fns = {
        "ops.decode_attention B=1 ctx 512 (split)": lambda: ops.decode_attention(
            q, k, v, tables, lens, check=False
        ),
        "ops.decode_attention B=1 ctx 512 invariant (2 kernels)": lambda: ops.decode_attention(
            q, k, v, tables, lens, check=False, batch_invariant=True
        ),
        "ops.decode_attention B=64 ctx 512 (1 kernel)": lambda: ops.decode_attention(
            big_q, bk, bv, big_t, big_l, check=False
        ),
        "ops.paged_decode B=1 ctx 512": lambda: ops.paged_decode(
            q, pool, 0, tables, lens, check=False
        ),
        "DecodePlan.run B=1 ctx 512": lambda: plan.run(q, k, v, tables, lens, check=False),
        "ops.prefill_attention 16 tokens": lambda: ops.prefill_attention(
            qp, cu, k, v, tables, lens, max_q_len=16, check=False
        ),
        "ops.write_kv 64 tokens": lambda: ops.write_kv(k, v, slots, kn, kn, check=False),
    }
    if CUDA:
        fns.update(raw_launches(big_q, bk, bv, big_t, big_l))
        fns["torch.empty (one allocation)"] = lambda: torch.empty(HQ, D, dtype=DT, device=dev)
        if not ARGS.parse_args().no_flashinfer:
            fns.update(flashinfer_run(q, k, v, tables, lens))
    return fns


def raw_launches(q, k, v, tables, lens) -> dict:
    """The direct decode kernel at B=64: Triton's own launch path vs the bound one. The
    launch arguments are the ones the library passes (recorded from one call), so this
    follows the kernel's signature whatever it becomes."""
    seen: list = []
    real = _launch.Launcher.__call__

    def spy(self, grid, *args):
        seen.append((self, grid, args))
        return real(self, grid, *args)

    _launch.Launcher.__call__ = spy
    try:
        ops.decode_attention(q, k, v, tables, lens, check=False)
    finally:
        _launch.Launcher.__call__ = real
    torch.cuda.synchronize()
    la, grid, args = seen[0]  # split-free at B=64 ctx 512: the direct kernel alone
    jit = la.kernel
    return {
        f"Triton kernel[grid](...) ({len(seen)} kernel)": lambda: jit[grid](
            *args, *la.tail, **la.options
        ),
        "pagedkv bound launch (same kernel)": lambda: la(grid, *args),
    }


def flashinfer_run(q, k, v, tables, lens) -> dict:
    try:
        import flashinfer

        b, nbps = tables.shape
        i32 = dict(dtype=torch.int32, device=q.device)
        ws = torch.zeros(128 << 20, dtype=torch.uint8, device=q.device)
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
        w.plan(torch.arange(0, b * nbps + 1, nbps, **i32), tables.reshape(-1),
               ((lens - 1) % BS + 1).to(torch.int32), HQ, HKV, D, BS,
               pos_encoding_mode="NONE", q_data_type=DT, kv_data_type=DT)  # fmt: skip
        out = torch.empty_like(q)
        w.run(q, (k, v), out=out)
        torch.cuda.synchronize()
        RES["flashinfer"] = flashinfer.__version__
        return {"FlashInfer decode run B=1 ctx 512": lambda: w.run(q, (k, v), out=out)}
    except Exception as e:  # not installed / not built: the row is left out
        RES["flashinfer_error"] = repr(e)[:300]
        return {}


def sleep_cycles_per_s() -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(10_000_000)
    b.record()
    b.synchronize()
    return 10_000_000 / (a.elapsed_time(b) / 1e3)


def time_cuda(fn, n: int, rounds: int, cps: float) -> tuple[float, bool]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    guess = time.perf_counter() - t0  # GPU not busy: an upper bound of the host time
    torch.cuda.synchronize()
    samples, busy = [], True
    for _ in range(rounds):
        torch.cuda._sleep(int(cps * (3 * guess + 0.02)))
        slept = torch.cuda.Event()
        slept.record()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
        busy &= not slept.query()  # the sleep still ran when the last call was queued
        torch.cuda.synchronize()
    return statistics.median(samples), busy


def time_cpu(fn, n: int, rounds: int) -> float:
    for _ in range(20):
        fn()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n)
    return min(samples)  # a shared CPU: the least disturbed round


RES: dict = {}


def fake_bound_launches() -> None:
    """CPU mode: everything up to the kernel launch runs, the launch does not. Every
    Launcher takes its fast path (as on CUDA once bound) into a no-op compiled launcher;
    splits are planned for an H200's 132 SMs (on the CPU the planner assumes 4)."""
    from pagedkv.ops import decode_splits

    decode_splits._sm_count = lambda device: 132
    hooks = type("Hooks", (), {"launch_enter_hook": None, "launch_exit_hook": None})()
    _launch._DRIVER[:] = [_launch._Driver(lambda: 0, lambda dev: 0, hooks)]
    init = _launch.Launcher.__init__

    def bound_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._bound[0] = _launch._Bound(lambda *a: None, 0, ())

    _launch.Launcher.__init__ = bound_init


def main() -> None:
    args = ARGS.parse_args()
    RES.update(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__, mode="cuda: full host cost, GPU busy" if CUDA else
        "cpu: wrapper cost up to the launch (launch / reference kernels are no-ops)",
    )  # fmt: skip
    import triton

    RES["triton"] = triton.__version__
    rows = []
    if CUDA:
        dev = torch.device("cuda")
        RES["device"] = torch.cuda.get_device_name()
        fns = calls(dev)
        for name in [n for n in fns if n.startswith("ops.") or n.startswith("DecodePlan")]:
            fns[name]()  # compile outside the timed loop (ops.warmup would do it too)
        torch.cuda.synchronize()
        cps = sleep_cycles_per_s()
        for name, fn in fns.items():
            t, busy = time_cuda(fn, args.calls, args.rounds, cps)
            rows.append(dict(call=name, us=t * 1e6, busy=busy))
            print(f"{name:48s} {t * 1e6:7.1f} us/call  busy={busy}", flush=True)
    else:
        RES["device"] = "cpu"
        dev = torch.device("cpu")
        fake_bound_launches()
        for backend in ("triton", "reference"):
            if backend == "reference":
                for name in ("decode", "prefill", "write_kv"):
                    setattr(reference, name, lambda x, *a, **kw: x)
            with ops.use_backend(backend):
                for name, fn in calls(dev).items():
                    t = time_cpu(fn, args.calls * 10, args.rounds)
                    rows.append(dict(call=name, backend=backend, us=t * 1e6))
                    print(f"{backend:9s} {name:48s} {t * 1e6:7.2f} us/call", flush=True)
    RES["rows"] = rows
    for d in {os.path.join(os.path.dirname(__file__), "out"), os.environ.get("OUT") or None}:
        if d:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "bench_host.json"), "w") as f:
                json.dump(RES, f, indent=1)


if __name__ == "__main__":
    main()
