"""Split decode with the merge fused into the split kernel (issue 14: one launch per call).

The last program of each (sequence, KV head) to finish merges that row's splits; the
count of arrivals lives in a reused int32 buffer that the kernel leaves zero. Without
CUDA the kernels run in the Triton interpreter (programs one after another); the gpu
tests run them concurrently, many times over (a missed arrival or a partial read
before it was written would change the result from call to call).
"""

from __future__ import annotations

import pytest
import torch

from _kvcases import assert_close, paged_case

pytest.importorskip("triton")

from pagedkv import ops  # noqa: E402
from pagedkv.ops import _launch, _specs, decode_splits  # noqa: E402
from pagedkv.ops import triton_decode as td  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _counters_zero() -> bool:
    return all(int(buf.abs().sum()) == 0 for buf in td._SCRATCH._counts.values())


def _run(kern, q, k, v, bt, sl, feats, splits, **kw):
    sinks = feats.get("sinks")
    scal = td.scalars(q.shape[-1] ** -0.5, feats.get("softcap"), feats.get("window"))
    return kern.run(q, k, v, bt, sl, sinks, scal, feats.get("window"), splits=splits, **kw)


@pytest.mark.parametrize(
    "dtype, hq, hkv, split_tokens, feats",
    [
        (torch.float32, 4, 2, 16, {}),  # 10 splits: the tree merge (S_PAD 16)
        (torch.float32, 6, 2, 8, dict(window=40)),  # G = 3, windowed splits
        (torch.bfloat16, 4, 1, 32, dict(softcap=3.0, sinks=True)),
        (torch.float32, 4, 2, 1, {}),  # 150 splits: more than MAX_VECTOR_MERGE, one by one
    ],
    ids=["tree", "gqa3-window", "bf16-softcap-sinks", "sequential"],
)
def test_fused_merge_matches_the_merge_kernel_and_the_reference(dtype, hq, hkv, split_tokens,
                                                                 feats):  # fmt: skip
    d, bs = 16, 8
    lens = [150, 0, 1, 77] if split_tokens > 1 else [150, 9]
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, dtype, DEV)
    q = torch.randn(len(lens), hq, d, device=DEV).to(dtype)
    feats = dict(feats)
    if feats.pop("sinks", False):
        feats["sinks"] = torch.randn(hq, device=DEV)
    kern = td.kernels(q, k, v, bt, sl, feats.get("sinks"), "softcap" in feats, False)
    splits = td.plan_splits(len(lens), hkv, bt.shape[1] * bs, feats.get("window"),
                            kern.block_n, q.device, False, split_tokens)  # fmt: skip
    assert splits.num_splits > 1
    fused = _run(kern, q, k, v, bt, sl, feats, splits)
    assert _counters_zero()  # left zero for the next launch
    two = _run(kern, q, k, v, bt, sl, feats, splits, fused=False)
    again = _run(kern, q, k, v, bt, sl, feats, splits)
    assert torch.equal(fused, again)  # the counters' reuse changes nothing
    ref = ops.decode_attention(q, k, v, bt, sl, backend="reference", **feats)
    assert_close(fused, ref, TOL[dtype], what=f"fused {feats}")
    assert_close(fused, two, TOL[dtype], what="fused vs merge kernel")
    for row, n in enumerate(lens):
        if n == 0:  # an empty sequence: zeros, as the merge kernel writes
            assert not fused[row].any()


def _launches(monkeypatch) -> list:
    seen: list = []
    real = _launch.Launcher.__call__

    def spy(self, grid, *args):
        seen.append(self.kernel)
        return real(self, grid, *args)

    monkeypatch.setattr(_launch.Launcher, "__call__", spy)
    return seen


def test_eager_split_decode_is_one_launch_except_invariant_and_plans(monkeypatch):
    """ops.decode_attention with splits launches only the split kernel (it merges);
    batch-invariant mode and DecodePlan (its own workspace) still launch the merge
    kernel, whose results stay as before."""
    hq, hkv, d, bs = 4, 2, 16, 8
    lens = [600, 3]
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, torch.float32, DEV)
    q = torch.randn(2, hq, d, device=DEV)
    monkeypatch.setattr(decode_splits, "_sm_count", lambda dev: 16)  # several splits here
    for mod, name in ((td, "_KERNELS"), (_specs, "_DECODE")):
        monkeypatch.setattr(mod, name, {})  # fresh classes: plans made with that count
    seen = _launches(monkeypatch)
    out = ops.decode_attention(q, k, v, bt, sl, backend="triton", check=False)
    assert seen == [td._decode_split_kernel]
    ref = ops.decode_attention(q, k, v, bt, sl, backend="reference")
    assert_close(out, ref, TOL[torch.float32], what="eager fused")
    seen.clear()
    inv = ops.decode_attention(q, k, v, bt, sl, backend="triton", batch_invariant=True)
    assert seen == [td._decode_split_kernel, td._decode_merge_kernel]
    assert_close(inv, ref, TOL[torch.float32], what="invariant")
    seen.clear()
    plan = ops.DecodePlan(2, hq, hkv, d, bs, bt.shape[1] * bs, dtype=torch.float32,
                          device=DEV, backend="triton")  # fmt: skip
    res = plan.run(q, k, v, bt, sl)
    assert seen == [td._decode_split_kernel, td._decode_merge_kernel]
    assert_close(res, ref, TOL[torch.float32], what="DecodePlan")


def test_counters_are_per_stream_thread_and_grow_zeroed():
    """The counters are kept per (device, stream, thread) beside the float32 workspace,
    grow zeroed, and another thread gets its own."""
    import threading

    scratch = _launch.Scratch()
    like = torch.empty(1, device=DEV)
    buf, a = scratch.counted(like, 64, 10)
    assert buf.dtype == torch.float32 and buf.numel() >= 64
    assert a.dtype == torch.int32 and a.numel() >= 10 and not a.any()
    assert scratch.counted(like, 8, 5)[1].data_ptr() == a.data_ptr()  # reused
    _, b = scratch.counted(like, 8, 100)
    assert b.numel() >= 100 and not b.any()
    other: list = []
    t = threading.Thread(target=lambda: other.append(scratch.counted(like, 8, 10)[1]))
    t.start()
    t.join()
    assert other[0].data_ptr() != b.data_ptr() and not other[0].any()


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, hq, hkv, d, bs, lens",
    [
        (torch.bfloat16, 32, 8, 128, 16, [512]),  # the bench_host case: 8 splits
        (torch.bfloat16, 9, 3, 64, 16, [640]),  # SmolLM2's heads at B=1: G = 3
        (torch.bfloat16, 32, 8, 128, 16, [1, 16, 4097, 0, 2500, 333, 8191, 70000]),
        (torch.float32, 16, 1, 128, 16, [30000, 5]),  # > MAX_VECTOR_MERGE splits
    ],
)
def test_cuda_fused_merge_is_stable_and_matches(dtype, hq, hkv, d, bs, lens):
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, dtype, DEV)
    q = torch.randn(len(lens), hq, d, device=DEV).to(dtype)
    first = ops.decode_attention(q, k, v, bt, sl, check=False)
    outs = [ops.decode_attention(q, k, v, bt, sl, check=False) for _ in range(200)]
    torch.cuda.synchronize()
    assert all(torch.equal(first, o) for o in outs)  # no race: the same bits every time
    assert _counters_zero()
    kern = td.kernels(q, k, v, bt, sl, None, False, False)
    two = kern.run(q, k, v, bt, sl, None, td.scalars(d**-0.5, None, None), None, fused=False)
    ref = ops.decode_attention(q, k, v, bt, sl, backend="reference")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert_close(first, ref, tol, what="fused vs reference")
    assert_close(first, two, tol, what="fused vs merge kernel")


@pytest.mark.gpu
def test_cuda_fused_merge_on_two_streams_and_in_a_graph():
    hq, hkv, d, bs = 32, 8, 128, 16
    k, v, bt, sl = paged_case([3000, 40, 1], hq, hkv, d, bs, torch.bfloat16, DEV)
    q = torch.randn(3, hq, d, device=DEV).to(torch.bfloat16)
    want = ops.decode_attention(q, k, v, bt, sl, check=False).clone()
    streams = [torch.cuda.Stream() for _ in range(2)]
    got: list = []
    torch.cuda.synchronize()
    for _ in range(50):
        for s in streams:
            with torch.cuda.stream(s):
                got.append(ops.decode_attention(q, k, v, bt, sl, check=False))
    torch.cuda.synchronize()
    assert all(torch.equal(want, o) for o in got)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.decode_attention(q, k, v, bt, sl, check=False)
    for _ in range(3):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)  # the graph's own zeroed counters, every replay
    assert _counters_zero()


# ------------------------------------------------------- the sm_90 code (no GPU needed)


def test_fused_kernel_code_for_sm90_orders_the_count_after_the_partials():
    """What the interpreter cannot show: on the GPU every thread's partials are stored
    before one thread's gpu-scope acq_rel increment (a CTA barrier between), its result
    reaches every thread through shared memory, the merge reads past L1, and fusing
    costs no shared memory and no pipelined copies. Compiled in a child process (the
    tests run under the interpreter) by tests/_sm90_code.py."""
    import json
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent / "src"), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(here / "_sm90_code.py")], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    if run.returncode == 3:  # this Triton cannot compile for CUDA without a GPU
        pytest.skip(run.stdout.strip()[-300:])
    assert run.returncode == 0, run.stderr[-2000:]
    code = json.loads(run.stdout)
    ptx, parts = code["fused"]["ptx"], code["parts"]["ptx"]
    (atom,) = re.findall(r"@%p\d+ atom\.global\.gpu\.acq_rel\.add\.u32", ptx)
    before, after = ptx[: ptx.index(atom)], ptx[ptx.index(atom) :]
    assert before.rfind("bar.sync") > before.rfind("st.global")  # stores, barrier, atom
    assert re.search(r"st\.shared[^\n]*\n(?:.*\n){0,6}\s*bar\.sync", after)  # broadcast
    assert "ld.global.cg" in after and "ld.global.cg" not in parts
    assert code["fused"]["shared"] == code["parts"]["shared"]
    assert len(re.findall(r"cp\.async", ptx)) == len(re.findall(r"cp\.async", parts))
