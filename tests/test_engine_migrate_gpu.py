"""Engine.migrate on a GPU machine (GPU only): a CUDA engine <-> a CPU engine, two engines on
one GPU, and cuda:0 <-> cuda:1 when there are two, with other requests on both sides.

Between engines of one device kind the migrated request must finish token-identically to
never having moved (batch-invariant mode). Between a CUDA and a CPU engine the kernels
differ, so the unmigrated runs of the two devices are not the reference; there the KV must
arrive bit-identical and the continuation must equal the slow path's (the request parked
in a store and resumed on the other engine from the same point), which carries the same
bytes and state.
"""

from __future__ import annotations

import pytest
import torch

import _models
from pagedkv.engine import Engine, SamplingParams
from pagedkv.ops import batch_invariant_mode

pytestmark = pytest.mark.gpu

BS = 8
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=0.9, seed=3)


@pytest.fixture(autouse=True)
def _invariant():
    torch.backends.cuda.matmul.allow_tf32 = False
    with batch_invariant_mode():
        yield


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def model_on(device: str):
    return _models.tiny(seed=0).to(device)


def engine(model, **kw) -> Engine:
    return Engine(model, **{"num_blocks": 96, "block_size": BS, "cuda_graphs": False, **kw})


def serve(*engines):
    out = [{} for _ in engines]
    while any(e.has_unfinished() for e in engines):
        for i, e in enumerate(engines):
            for o in e.step():
                out[i][o.request_id] = o.token_ids
    return out


def serve_beside_others(src, dst, p, sp, steps: int):
    """Submit ``p`` to ``src`` beside one other request on each engine, run ``steps``
    steps of both; ``p``'s request id."""
    rid = src.add_request(p, sp)
    src.add_request(prompt(17, 90), GREEDY)
    dst.add_request(prompt(33, 91), SEEDED)
    for _ in range(steps):
        src.step()
        dst.step()
    return rid


def run_migrated(src, dst, p, sp, *, steps=5, background=True, check_kv=True):
    """Serve ``p`` on ``src`` beside others, migrate it to ``dst`` after ``steps`` steps
    (both engines serving), return (its tokens, the result)."""
    rid = serve_beside_others(src, dst, p, sp, steps)
    m = src.migrate(rid, dst, background=True) if background else None
    if m is not None:
        src.step()
        dst.step()
    want = src.cache.read_blocks(src.cache.block_table(rid)).clone() if check_kv else None
    res = m.finish() if m is not None else src.migrate(rid, dst)
    if check_kv:
        got = dst.cache.read_blocks(dst.cache.block_table(res.target_request_id))
        assert torch.equal(got.cpu(), want.cpu()), "KV changed on the way"
    outs = serve(src, dst)
    for e in (src, dst):
        e.cache.check_integrity()
        assert e.stats().blocks_in_use == 0
    return outs[1][res.target_request_id], res


def run_parked(src, dst, p, sp, tmp_path, *, steps=5):
    """The slow path from the same point: park on ``src`` after ``steps`` steps (the same
    others), resume on ``dst``; its tokens."""
    rid = serve_beside_others(src, dst, p, sp, steps)
    res = src.migrate(rid, store=tmp_path, name="parked")
    new = dst.resume_migrated("parked", store=tmp_path)
    outs = serve(src, dst)
    return res, outs[1][new]


@pytest.mark.parametrize("sp", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("direction", ["cuda->cpu", "cpu->cuda"])
def test_cuda_and_cpu_engines(direction, sp, tmp_path):
    gpu, cpu = model_on("cuda"), model_on("cpu")
    order = (gpu, cpu) if direction == "cuda->cpu" else (cpu, gpu)
    p = prompt(29, 5)
    tokens, res = run_migrated(engine(order[0]), engine(order[1]), p, sp)
    assert res.route == ("d2h" if direction == "cuda->cpu" else "h2d") and res.kv_moved
    # the same switch point: 5 steps, then one more on the source during the copy
    _, slow = run_parked(engine(order[0]), engine(order[1]), p, sp, tmp_path, steps=6)
    assert tokens == slow
    alone = [engine(m).generate([p], sp)[0].token_ids for m in order]
    print(f"{direction}: migrated == unmigrated on source {tokens == alone[0]}, on target "
          f"{tokens == alone[1]}; pause {res.pause_seconds * 1e3:.2f} ms")  # fmt: skip


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("sp", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_two_engines_on_one_gpu(sp, graphs):
    model = model_on("cuda")
    p = prompt(41, 6)
    ref = engine(model, cuda_graphs=graphs).generate([p], sp)[0].token_ids
    a, b = engine(model, cuda_graphs=graphs), engine(model, cuda_graphs=graphs)
    tokens, res = run_migrated(a, b, p, sp)
    assert res.route == "device" and res.blocks_background > 0
    assert tokens == ref
    tokens, res = run_migrated(b, a, p, sp, background=False)  # and back, at once
    assert tokens == ref and res.blocks_background == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("sp", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_two_gpus(sp):
    a_model, b_model = model_on("cuda:0"), model_on("cuda:1")
    p = prompt(37, 7)
    ref = engine(a_model).generate([p], sp)[0].token_ids
    assert engine(b_model).generate([p], sp)[0].token_ids == ref  # same kernels, same bits
    tokens, res = run_migrated(engine(a_model), engine(b_model), p, sp)
    assert res.route == "peer" and tokens == ref
    tokens, res = run_migrated(engine(b_model), engine(a_model), p, sp)
    assert tokens == ref
