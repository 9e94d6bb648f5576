"""The lean eager path (issue 14): memoised checks, bound launches, no recompiles.

Without CUDA the kernels run in the Triton interpreter; the compile counting then
rebuilds Triton's JIT cache key of every launch with Triton's own binder
(tests/_triton_keys.py). On CUDA the gpu tests count the JIT cache itself.
"""

from __future__ import annotations

import types

import pytest
import torch

from _kvcases import assert_close, paged_case

pytest.importorskip("triton")

import _triton_keys as _keys  # noqa: E402
from pagedkv import ops  # noqa: E402
from pagedkv.ops import _launch, _specs  # noqa: E402
from pagedkv.ops import triton_decode as td  # noqa: E402
from pagedkv.ops import triton_memory as tm  # noqa: E402
from pagedkv.ops import triton_prefill as tp  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
KERNELS = [td._decode_split_kernel, td._decode_merge_kernel, tp._prefill_kernel,
           tm._write_kv_kernel]  # fmt: skip


# ---------------------------------------------------------------- memoised checks


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_memoised_checks_still_reject_bad_input(backend):
    """A shape class seen before does not let a bad call through: every argument the
    full checks read is either in the key or checked per call."""
    k, v, bt, sl = paged_case([5, 9], 4, 2, 16, 4, torch.float32, DEV)
    q = torch.randn(2, 4, 16, device=DEV)
    good = ops.decode_attention(q, k, v, bt, sl, backend=backend, check=False)
    again = ops.decode_attention(q, k, v, bt, sl, backend=backend, check=False)
    assert torch.equal(good, again)
    ops.decode_attention(q, k, v, bt, sl, window=1, backend=backend, check=False)
    with pytest.raises(ValueError, match="must have 1 rows"):
        ops.decode_attention(q[:1], k, v, bt, sl, backend=backend, check=False)
    with pytest.raises(ValueError, match="must have 2 rows"):
        ops.decode_attention(q, k, v, bt[:1], sl, backend=backend, check=False)
    with pytest.raises(TypeError, match="dtype"):
        ops.decode_attention(q.double(), k, v, bt, sl, backend=backend, check=False)
    with pytest.raises(TypeError, match="window must be an int"):  # True == 1, hash(True) == 1
        ops.decode_attention(q, k, v, bt, sl, window=True, backend=backend, check=False)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.decode_attention(q.tolist(), k, v, bt, sl, backend=backend, check=False)
    with pytest.raises(ValueError, match="dimension"):
        ops.decode_attention(q, k, v, bt, sl[:, None], backend=backend, check=False)
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.decode_attention(q, k, v, bt.float(), sl, backend=backend, check=False)
    bad = bt.clone()
    bad[0, 0] = 10**6
    with pytest.raises(ValueError, match="out of range"):  # value checks stay per call
        ops.decode_attention(q, k, v, bad, sl, backend=backend)

    cu = torch.tensor([0, 2, 3], dtype=torch.int32, device=DEV)
    qp = torch.randn(3, 4, 16, device=DEV)
    ops.prefill_attention(qp, cu, k, v, bt, sl, backend=backend, check=False)
    with pytest.raises(ValueError, match="must have 1 rows"):
        ops.prefill_attention(qp, cu[:2], k, v, bt, sl, backend=backend, check=False)
    with pytest.raises(ValueError, match="end at T"):
        ops.prefill_attention(qp[:2], cu, k, v, bt, sl, backend=backend)

    slots = torch.tensor([0, 5], device=DEV)
    kn = torch.randn(2, 2, 16, device=DEV)
    ops.write_kv(k.clone(), v.clone(), slots, kn, kn, backend=backend, check=False)
    with pytest.raises(ValueError, match="slots has 1 entries"):
        ops.write_kv(k, v, slots[:1], kn, kn, backend=backend, check=False)
    with pytest.raises(ValueError, match="k has 2 tokens but v has 1"):
        ops.write_kv(k, v, slots, kn, kn[:1], backend=backend, check=False)
    with pytest.raises(TypeError, match="cast it first"):
        ops.write_kv(k, v, slots, kn.double(), kn.double(), backend=backend, check=False)


# ------------------------------------------------------ exact results, both launch paths

FEATURES = [
    dict(),
    dict(window=9),
    dict(softcap=4.0, sinks=True),
    dict(window=20, softcap=3.0, sinks=True, batch_invariant=True),
]


@pytest.mark.parametrize(
    "dtype, feats",
    [
        (torch.float32, FEATURES[0]),
        (torch.float32, FEATURES[1]),
        (torch.bfloat16, FEATURES[2]),
        (torch.bfloat16, FEATURES[3]),
    ],  # fmt: skip
    ids=lambda x: str(x)[6:] if isinstance(x, torch.dtype) else "-".join(x) or "plain",
)
def test_first_and_bound_launches_agree_bitwise(monkeypatch, dtype, feats):
    """The first call of a shape class launches through ``kernel[grid]`` (and compiles);
    later ones through the bound kernel (on CUDA). Same bits, and the reference agrees."""
    for mod, name in ((td, "_KERNELS"), (tp, "_KERNELS"), (_specs, "_DECODE"),
                      (_specs, "_PREFILL")):  # fmt: skip
        monkeypatch.setattr(mod, name, {})  # fresh classes: nothing bound yet
    feats = dict(feats)
    hq, hkv, d, bs = 4, 2, 32, 8
    lens = [1, 8, 11, 0, 150, 77]
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, dtype, DEV)
    q = torch.randn(len(lens), hq, d, device=DEV).to(dtype)
    if feats.pop("sinks", False):
        feats["sinks"] = torch.randn(hq, device=DEV)
    inv = feats.pop("batch_invariant", False)
    run = dict(backend="triton", batch_invariant=inv, check=False, **feats)
    first = ops.decode_attention(q, k, v, bt, sl, **run)
    bound = ops.decode_attention(q, k, v, bt, sl, **run)
    assert torch.equal(first, bound)
    assert torch.equal(first, td.decode(q, k, v, bt, sl, d**-0.5, batch_invariant=inv, **feats))
    ref = ops.decode_attention(q, k, v, bt, sl, backend="reference", batch_invariant=inv, **feats)
    assert_close(first, ref, 2e-5 if dtype == torch.float32 else 3e-2, what=f"decode {feats}")
    if HAS_CUDA:  # every kernel the calls used is bound now
        (kern,) = td._KERNELS.values()
        sp, s_pad = kern.plan(len(lens), bt.shape[1], feats.get("window"))
        if sp.num_splits == 1 and not inv:
            used = [kern.direct]
        else:  # eager split decode merges in the split kernel, except batch-invariant
            used = [kern.parts, kern.merge(s_pad)] if inv else [kern.merge(s_pad, True)]
        assert all(la.bound_devices for la in used)

    cu = torch.tensor([0, 1, 4, 4, 4, 24, 44], dtype=torch.int32, device=DEV)
    qp = torch.randn(44, hq, d, device=DEV).to(dtype)
    pre = dict(backend="triton", check=False, **feats)
    first = ops.prefill_attention(qp, cu, k, v, bt, sl, max_q_len=20, **pre)
    bound = ops.prefill_attention(qp, cu, k, v, bt, sl, max_q_len=20, **pre)
    assert torch.equal(first, bound)
    ref = ops.prefill_attention(qp, cu, k, v, bt, sl, backend="reference", **feats)
    assert_close(first, ref, 2e-5 if dtype == torch.float32 else 3e-2, what=f"prefill {feats}")


# ------------------------------------------------------------------- the Launcher


class _Compiled:
    """Stands in for a Triton CompiledKernel: records the calls of its launcher."""

    function = 7
    packed_metadata = (4, 1, 0)

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def run(self, *args) -> None:
        self.calls.append(args)


class _Kernel:
    """Stands in for a JITFunction: ``kernel[grid](*args, **options)`` -> compiled."""

    def __init__(self, compiled) -> None:
        self.compiled = compiled
        self.slow: list[tuple] = []

    def __getitem__(self, grid):
        def launch(*args, **options):
            self.slow.append((grid, args, options))
            return self.compiled

        return launch


def test_launcher_binds_the_compiled_kernel_then_calls_it(monkeypatch):
    device = [0]
    runtime = types.SimpleNamespace(
        launch_enter_hook=types.SimpleNamespace(calls=[]),
        launch_exit_hook=types.SimpleNamespace(calls=[]),
    )
    driver = _launch._Driver(lambda: device[0], lambda dev: 1000 + dev, runtime)
    monkeypatch.setattr(_launch, "_DRIVER", [driver])
    kern = _Kernel(_Compiled())
    la = _launch.Launcher(kern, 2, 1, (3, "C"), num_warps=4)  # 2 pointers, 1 specialized int
    la._fast = True  # the interpreter turns it off
    a, b = torch.zeros(8), torch.zeros(8)

    la((2, 1, 1), a, b, 32, 9)  # first launch: Triton's path, then bound
    assert kern.slow == [((2, 1, 1), (a, b, 32, 9, 3, "C"), {"num_warps": 4})]
    assert la.bound_devices == (0,)
    la((5, 2, 1), a, b, 48, 11)  # bound: raw pointers, the per-call ints, the fixed tail
    assert len(kern.slow) == 1
    assert kern.compiled.calls == [
        (
            5,
            2,
            1,
            1000,
            7,
            (4, 1, 0),
            None,
            None,
            None,
            a.data_ptr(),
            b.data_ptr(),
            48,
            11,
            3,
            "C",
        )  # fmt: skip
    ]
    odd = torch.zeros(9)[1:]  # 4 bytes past an aligned start: Triton specializes on that
    la((1, 1, 1), odd, b, 16, 1)
    for other in (40, 1, 2**31, -16):  # not a multiple of 16 / 1 / i64 / negative
        la((1, 1, 1), a, b, other, 1)
    assert len(kern.slow) == 6 and len(kern.compiled.calls) == 1
    runtime.launch_enter_hook.calls.append(print)  # a profiler's hook: Triton's path
    la((1, 1, 1), a, b, 16, 1)
    assert len(kern.slow) == 7 and len(kern.compiled.calls) == 1
    runtime.launch_enter_hook.calls.clear()
    device[0] = 1  # another device: its own compiled kernel
    la((1, 1, 1), a, b, 16, 1)
    assert len(kern.slow) == 8 and la.bound_devices == (0, 1)
    la((1, 1, 1), a, b, 16, 1)
    assert len(kern.slow) == 8 and kern.compiled.calls[-1][3] == 1001
    assert kern.compiled.calls[-1][-4:] == (16, 1, 3, "C")
    la((7, 3), a, b, 16, 1)  # a 2-D grid (the split-merge kernel's) is padded with 1
    la((4,), a, b, 16, 1)
    assert [c[:3] for c in kern.compiled.calls[-2:]] == [(7, 3, 1), (4, 1, 1)]

    fresh = _Kernel(_Compiled())  # a first launch outside the bound class binds nothing
    la = _launch.Launcher(fresh, 1, 1, ())
    la._fast = True
    la((1,), a, 40)
    assert not la.bound_devices

    class Old:  # a Triton whose compiled kernels lack the attributes: always Triton's path
        run = None

    old = _Kernel(Old())
    la = _launch.Launcher(old, 1, 0, ())
    la._fast = True
    la((1,), a)
    la((1,), a)
    assert len(old.slow) == 2 and not la.bound_devices


# --------------------------------------------------------------- no recompiles


def _workload(k, v, hq, sinks, dtype):
    """Decode, prefill, DecodePlan and KV writes at batch sizes, lengths and table widths
    the warm-up never saw."""
    bs, nb = k.shape[1], k.shape[0]
    d = k.shape[-1]
    gen = torch.Generator().manual_seed(0)
    combos = [dict(), dict(window=10, sinks=sinks), dict(softcap=30.0, batch_invariant=True),
              dict(window=10, softcap=30.0, sinks=sinks, batch_invariant=True)]  # fmt: skip
    for i, (b, width) in enumerate(((1, 40), (3, 5), (7, 12), (16, 1), (2, 33))):
        bt = torch.randint(0, nb, (b, width), generator=gen, dtype=torch.int32).to(DEV)
        sl = torch.randint(0, width * bs + 1, (b,), generator=gen, dtype=torch.int32).to(DEV)
        q = torch.randn(b, hq, d, generator=gen).to(dtype).to(DEV)
        ops.decode_attention(q, k, v, bt, sl, check=False, **combos[i % 4])
        ops.decode_attention(q, k, v, bt, sl, check=False, **combos[(i + 1) % 4])
        # at most the table's tokens: with check=False a longer sequence would read past
        # its row of the table (past the tensor for the last row: a segfault under the
        # interpreter now and then)
        q_lens = torch.randint(0, min(20, width * bs + 1), (b,), generator=gen)
        sl = torch.maximum(sl, q_lens.to(DEV, torch.int32))
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)]).to(DEV, torch.int32)
        qp = torch.randn(int(cu[-1]), hq, d, generator=gen).to(dtype).to(DEV)
        feats = {k_: v_ for k_, v_ in combos[i % 4].items() if k_ != "batch_invariant"}
        ops.prefill_attention(qp, cu, k, v, bt, sl, max_q_len=int(q_lens.max()), check=False,
                              **feats)  # fmt: skip
        n = int(q_lens.sum())
        slots = torch.randint(-1, nb * bs, (n,), generator=gen).to(DEV)
        kn = torch.randn(n, k.shape[2], d, generator=gen).to(dtype).to(DEV)
        ops.write_kv(k, v, slots, kn, kn, check=False)
    plan = ops.DecodePlan(4, hq, k.shape[2], d, bs, 40 * bs, dtype=dtype, device=DEV)
    for b in (1, 4):
        q = torch.randn(b, hq, d, generator=gen).to(dtype).to(DEV)
        bt = torch.randint(0, nb, (b, 40), generator=gen, dtype=torch.int32).to(DEV)
        sl = torch.randint(0, 40 * bs + 1, (b,), generator=gen, dtype=torch.int32).to(DEV)
        plan.run(q, k, v, bt, sl, check=False)


def _warm(k, v, hq, blocks=False):
    return ops.warmup(k, v, hq, windows=(None, 10), softcaps=(None, 30.0),
                      sinks=(None, torch.float32), batch_invariant=(False, True),
                      blocks=blocks)  # fmt: skip


@pytest.mark.skipif(HAS_CUDA, reason="counts rebuilt keys under the interpreter; see the gpu test")
def test_no_compiles_after_warmup(monkeypatch):
    """After ops.warmup, new batch sizes, lengths, table widths, windows and split counts
    launch only kernel variants the warm-up launched (no JIT cache key is new)."""
    hq, hkv, d, bs, dtype = 4, 2, 16, 8, torch.float32
    k, v, _, _ = paged_case([48 * bs], hq, hkv, d, bs, dtype, DEV, spare_blocks=16)
    sinks = torch.randn(hq)
    counter = _keys.CompileCounter(monkeypatch, KERNELS)
    try:
        with ops.use_backend("triton"):
            res = _warm(k, v, hq)
            warm = set(counter.keys)
            assert res.launches == counter.launched >= len(warm)
            _workload(k, v, hq, sinks, dtype)
            new = counter.keys - warm
            assert not new, f"{len(new)} launch(es) would compile after the warm-up: {new}"
            assert counter.launched > 3 * len(warm)
            assert counter.ran == counter.launched  # every kernel launch went through a Launcher
            # plain @triton.jit (ints specialized on ==1 / %16) would have compiled more
            assert len(counter.loose_keys) > len(counter.keys)
            # each Launcher binds one compiled kernel: it must only ever see one key
            assert all(len(keys) == 1 for keys in counter.by_launcher.values())
            # and the counter does see a new class: float16 KV was never warmed up
            k16, v16, bt, sl = paged_case([9], hq, hkv, d, bs, torch.float16, DEV)
            ops.decode_attention(torch.randn(1, hq, d).half(), k16, v16, bt, sl, check=False)
            assert counter.keys - warm
    finally:
        counter.close()


@pytest.mark.gpu
def test_no_compiles_after_warmup_cuda():
    """Triton's JIT cache does not grow once ops.warmup has run (real compiles)."""
    from pagedkv.storage import KVLayout, KVPool

    hq, hkv, d, bs, dtype = 8, 2, 64, 16, torch.bfloat16
    pool = KVPool(KVLayout(2, hkv, d, bs, dtype), 64, DEV)
    pool.kv.normal_()
    k, v = pool.k(1), pool.v(1)
    sinks = torch.randn(hq, device=DEV)
    dev = torch.cuda.current_device()
    kernels = [*KERNELS, tm._block_rows_kernel]

    def compiled():
        return sum(len(kern.device_caches[dev][0]) for kern in kernels)

    _warm(k, v, hq, blocks=True)
    before = compiled()
    _workload(k, v, hq, sinks, dtype)
    pool.copy_blocks([(3, 9), (4, 10)])  # the swap / copy-on-write kernels, on the real pool
    pool.write_blocks([11, 12], pool.read_blocks([1, 2]))
    torch.cuda.synchronize()
    assert compiled() == before


# ------------------------------------------------------------------- warmup API


def test_warmup_validates_and_is_a_noop_on_the_reference():
    k, v, _, _ = paged_case([9], 4, 2, 16, 4, torch.float32, DEV)
    assert ops.warmup(k, v, 4, backend="reference") == ops.WarmupResult(0, 0.0)
    with pytest.raises(ValueError, match="not a multiple"):
        ops.warmup(k, v, 3)
    with pytest.raises(ValueError, match="positive int"):
        ops.warmup(k, v, 0)
    with pytest.raises(ValueError, match="window must be >= 1"):
        ops.warmup(k, v, 4, windows=(0,))
    with pytest.raises(ValueError, match="same shape"):
        ops.warmup(k, v[:, :2], 4)


@pytest.mark.gpu
def test_eager_split_decode_in_a_cuda_graph_survives_scratch_reuse():
    """Captured eager calls get their own split workspace: eager calls between replays
    (which reuse, and here grow, the shared scratch buffer) do not disturb the graph."""
    hq, hkv, d, bs = 32, 8, 128, 16
    k, v, bt, sl = paged_case([3000, 40, 1], hq, hkv, d, bs, torch.bfloat16, DEV)
    q = torch.randn(3, hq, d, device=DEV).to(torch.bfloat16)
    ops.decode_attention(q, k, v, bt, sl, check=False)  # compile and bind outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.decode_attention(q, k, v, bt, sl, check=False)
    kb, vb, btb, slb = paged_case([5000] * 8, hq, hkv, d, bs, torch.bfloat16, DEV)
    qb = torch.randn(8, hq, d, device=DEV).to(torch.bfloat16)
    for _ in range(2):
        q.copy_(torch.randn_like(q, dtype=torch.float32))
        eager = ops.decode_attention(qb, kb, vb, btb, slb, check=False)  # more splits
        g.replay()
        ref = ops.decode_attention(q, k, v, bt, sl, backend="reference")
        assert_close(out, ref, 3e-2, what="graph replay")
        ref_b = ops.decode_attention(qb, kb, vb, btb, slb, backend="reference")
        assert_close(eager, ref_b, 3e-2, what="eager between replays")


@pytest.mark.gpu
@pytest.mark.parametrize("width_pad, feats", [(0, {}), (7, dict(window=100, softcap=20.0))])
def test_unspecialized_ints_change_no_bits(monkeypatch, width_pad, feats):
    """The same kernels jitted without ``do_not_specialize`` (every int specialized on
    == 1 / % 16, as before issue 14) give the same bits: only index arithmetic differs."""
    import triton

    hq, hkv, d, bs = 32, 8, 128, 16
    lens = [1, 16, 700, 2048]
    k, v, bt, sl = paged_case(lens, hq, hkv, d, bs, torch.bfloat16, DEV, pad_cols=width_pad)
    q = torch.randn(len(lens), hq, d, device=DEV).to(torch.bfloat16)
    cu = torch.tensor([0, 1, 17, 33, 49], dtype=torch.int32, device=DEV)
    qp = torch.randn(49, hq, d, device=DEV).to(torch.bfloat16)

    def run():
        for mod, name in ((td, "_KERNELS"), (tp, "_KERNELS"), (_specs, "_DECODE"),
                          (_specs, "_PREFILL")):  # fmt: skip
            monkeypatch.setattr(mod, name, {})
        return [
            ops.decode_attention(q, k, v, bt, sl, check=False, batch_invariant=inv, **feats)
            for inv in (False, True)
        ] + [ops.prefill_attention(qp, cu, k, v, bt, sl, max_q_len=16, check=False, **feats)]

    lean = run()
    for mod, name in ((td, "_decode_split_kernel"), (td, "_decode_merge_kernel"),
                      (tp, "_prefill_kernel")):  # fmt: skip
        monkeypatch.setattr(mod, name, triton.JITFunction(getattr(mod, name).fn))
    plain = run()
    for a, b in zip(lean, plain):
        assert torch.equal(a, b)
