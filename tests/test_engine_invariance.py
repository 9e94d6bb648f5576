"""End-to-end batch invariance: with ``Engine(batch_invariant=True)`` a request's tokens
(seeded sampling at temperature 1, where any numeric difference can change a token) and
the logits they were drawn from are bit-identical whatever shares its batch, however its
prompt is chunked, and wherever its prefix KV came from: computed, hit in the device
cache, promoted from a CPU tier, loaded from a snapshot, recomputed after a preemption.

Every supported family (``TESTED_MODEL_TYPES``), bf16 and float32, runs every case of
the acceptance (alone, device prefix hit, in a batch of 7 other random requests, chunked
prefill at two budgets inside that batch, CPU-tier round trip, snapshot save / load). A
representative subset (plain GQA, windows + softcaps, sinks + MoE, q/k/v bias + windowed
layers) also runs more budgets and a preemption, and the same cases without the mode:
how many of those differ is printed, not asserted (on CPU most differences stay below
what flips a sampled token, and which ones differ depends on the CPU's BLAS).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from _models import FAMILIES, tiny_family
from pagedkv.engine import Engine, SamplingParams, model_runner
from pagedkv.integrations.support import TESTED_MODEL_TYPES, kv_geometry
from pagedkv.storage import KVLayout
from pagedkv.tiers import CPUTier

pytestmark = pytest.mark.usefixtures("single_thread")

NEW = 10
SEED = 4242  # the target request's seed; the others have their own
BS = 8
PREFIX_HIT = 32  # the full blocks of the target's 37-token prompt
DTYPES = [torch.bfloat16, torch.float32]
BUDGETS = (5, 11)  # chunk budgets prime to the block size: chunks end mid-block
MORE_BUDGETS = (3, 13)
EXPENSIVE = ["llama", "gemma2", "gpt_oss", "qwen2"]


def params(n: int = NEW, seed: int = SEED) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=1.0, seed=seed, ignore_eos=True)


@dataclass
class Run:
    """What the target request got: its tokens and the logits rows they were drawn from."""

    tokens: list[int]
    logits: list[torch.Tensor]

    def same_logits(self, other: Run) -> bool:
        return len(self.logits) == len(other.logits) and all(
            torch.equal(a, b) for a, b in zip(self.logits, other.logits)
        )


class Recorder:
    """Keeps the logits row of every token sampled for the target (the request whose
    params carry SEED), by wrapping the sampler the model runner calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows: list[torch.Tensor] = []
        sample = model_runner.sample

        def recording(logits, params_list, generators, **kw):
            self.rows += [logits[i].clone() for i, p in enumerate(params_list) if p.seed == SEED]
            return sample(logits, params_list, generators, **kw)

        monkeypatch.setattr(model_runner, "sample", recording)

    def take(self, tokens: list[int]) -> Run:
        run, self.rows = Run(list(tokens), self.rows), []
        return run


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    return Recorder(monkeypatch)


@dataclass
class Prompts:
    target: list[int]  # a 24-token system prefix + 13 tokens
    others: list[list[int]]  # 7 random requests; one shares the system prefix
    evictor: list[int]  # unrelated, long enough to push the target's blocks out of a small pool


def prompts_for(family: str) -> Prompts:
    g = torch.Generator().manual_seed(sum(map(ord, family)))

    def rand(n):
        return torch.randint(3, 256, (n,), generator=g).tolist()

    system = rand(24)
    others = [rand(int(n)) for n in torch.randint(3, 30, (7,), generator=g)]
    others[1] = system + others[1]
    return Prompts(system + rand(13), others, rand(95))


def engine(model, invariant: bool, **options) -> Engine:
    options.setdefault("num_blocks", 96)
    # The cases test where a prefix's KV comes from; a whole repeated prompt would be
    # answered from its stored logits (zero-compute repeats) and skip those paths.
    options.setdefault("repeat_cache_bytes", 0)
    return Engine(model, block_size=BS, batch_invariant=invariant, **options)


# -- the cases: each returns the target's Run(s) --------------------------------------


def alone_hit_tier(model, pr, inv, rec) -> dict[str, Run]:
    """Alone in a fresh engine; again (its prompt's full blocks hit on the device); again
    after unrelated traffic evicted them to a CPU tier (they come back from there)."""
    layers, kv_heads, head_dim = kv_geometry(model.config)
    layout = KVLayout(layers, kv_heads, head_dim, BS, next(model.parameters()).dtype)
    e = engine(model, inv, num_blocks=12, tiers=[CPUTier(64 * layout.bytes_per_block)])
    runs = {"alone": rec.take(e.generate([pr.target], params())[0].token_ids)}
    out = e.generate([pr.target], params())[0]
    assert out.num_cached_tokens == PREFIX_HIT, "the prefix did not hit on the device"
    runs["prefix_hit"] = rec.take(out.token_ids)
    e.generate([pr.evictor], params(1, seed=1))  # takes all 12 blocks: evicts the target's
    hits = e.cache.tier_stats()["tier_hit_tokens"]
    out = e.generate([pr.target], params())[0]
    assert e.cache.tier_stats()["tier_hit_tokens"] - hits == PREFIX_HIT, "no CPU-tier hit"
    runs["cpu_tier"] = rec.take(out.token_ids)
    e.close()
    return runs


def in_batch(model, pr, inv, rec, budget: int | None) -> Run:
    """Fourth of 8 requests (one shares its system prefix); ``budget`` chunks the step."""
    e = engine(model, inv, **({} if budget is None else {"max_batch_tokens": budget}))
    batch = pr.others[:3] + [pr.target] + pr.others[3:]
    seeds = [params(seed=i) for i in range(3)] + [params()] + [params(seed=i) for i in range(3, 7)]
    outs = e.generate(batch, seeds)
    if budget is not None:
        assert e.stats().steps > len(pr.target) // budget  # the prompt really was chunked
    return rec.take(outs[3].token_ids)


def batches(model, pr, inv, rec, budgets) -> dict[str, Run]:
    runs = {"batch": in_batch(model, pr, inv, rec, None)}
    runs |= {f"batch_chunked_{b}": in_batch(model, pr, inv, rec, b) for b in budgets}
    return runs


def snapshot(model, pr, inv, rec, path) -> Run:
    """Half the tokens, parked in a snapshot, the rest resumed by a fresh engine in a
    batch with three other requests."""
    half = NEW // 2
    a = engine(model, inv, snapshot_store=path)
    first = a.generate([pr.target], params(half), retain=True)[0]
    a.snapshot(first, "parked")
    b = engine(model, inv, snapshot_store=path)
    ids = [b.add_request(o, params(seed=i)) for i, o in enumerate(pr.others[4:])]
    rest = b.resume("parked", [], params(NEW - half))
    while b.has_unfinished():
        b.step()
    assert all(b.core.take(i).finished for i in ids)
    return rec.take(first.token_ids + rest.token_ids)


def preempted(model, pr, inv, rec) -> Run:
    """The target joins last (the "newest" policy preempts it first) in a pool too small
    for everyone: its KV is freed and recomputed, in other chunks than the first time."""
    others = [pr.others[i] for i in (0, 2, 3)]  # none shares a block with the target
    need = [-(-(len(p) + NEW) // BS) for p in [*others, pr.target]]
    e = engine(model, inv, num_blocks=sum(need) - 3, max_batch_tokens=32)  # short at the end
    ids = [e.add_request(o, params(seed=i)) for i, o in enumerate(others)]
    rid = e.add_request(pr.target, params())
    req = e.core.requests[rid]
    while e.has_unfinished():
        e.step()
    assert req.num_preemptions > 0, "the target was never preempted"
    for i in ids:
        e.core.take(i)
    return rec.take(e.core.take(rid).token_ids)


def assert_all_alike(family, dtype, runs: dict[str, Run]) -> None:
    ref = runs["alone"]
    assert len(ref.tokens) == NEW and len(ref.logits) == NEW
    for name, r in runs.items():
        assert r.tokens == ref.tokens, f"{family} {dtype} {name}: other tokens than alone"
        assert r.same_logits(ref), f"{family} {dtype} {name}: same tokens, other logits"


def report_differences(family, dtype, runs: dict[str, Run]) -> None:
    ref = runs["alone"]
    cases = {k: r for k, r in runs.items() if k != "alone"}
    tok = [k for k, r in cases.items() if r.tokens != ref.tokens]
    bits = [k for k, r in cases.items() if not r.same_logits(ref)]
    print(f"\n{family} {dtype} without the mode: tokens differ in {len(tok)}/{len(cases)} "
          f"cases {tok}, logits in {len(bits)}/{len(cases)} {bits}")  # fmt: skip


def _model(family, dtype):
    try:
        return tiny_family(family, dtype=dtype)
    except LookupError as exc:
        pytest.skip(str(exc))


def test_every_tested_family_is_covered():
    assert set(FAMILIES) == set(TESTED_MODEL_TYPES)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tokens_are_the_same_alone_batched_chunked_cached_tiered_and_restored(
    family, dtype, recorder, tmp_path
):
    model, pr = _model(family, dtype), prompts_for(family)
    runs = alone_hit_tier(model, pr, True, recorder)
    runs |= batches(model, pr, True, recorder, BUDGETS)
    runs["snapshot"] = snapshot(model, pr, True, recorder, tmp_path / "snap")
    assert_all_alike(family, dtype, runs)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", EXPENSIVE)
def test_tokens_survive_small_chunks_and_preemption(family, dtype, recorder, tmp_path):
    model, pr = _model(family, dtype), prompts_for(family)
    for inv in (True, False):
        runs = {"alone": alone_hit_tier(model, pr, inv, recorder)["alone"]}
        runs |= batches(model, pr, inv, recorder, MORE_BUDGETS)
        runs["preempted"] = preempted(model, pr, inv, recorder)
        if not inv:
            runs["snapshot"] = snapshot(model, pr, inv, recorder, tmp_path / "snap")
        (assert_all_alike if inv else report_differences)(family, dtype, runs)


@pytest.mark.gpu
@pytest.mark.parametrize("family", EXPENSIVE)
def test_on_cuda_through_the_triton_kernels_and_decode_graphs(family, recorder, tmp_path):
    """The same cases on CUDA in bf16: Triton GEMM / row / attention kernels, decode
    steps replayed from CUDA graphs captured in the mode, the CPU tier over a CUDA pool."""
    model, pr = _model(family, torch.bfloat16).cuda(), prompts_for(family)
    runs = alone_hit_tier(model, pr, True, recorder)
    runs |= batches(model, pr, True, recorder, BUDGETS + MORE_BUDGETS)
    runs["preempted"] = preempted(model, pr, True, recorder)
    runs["snapshot"] = snapshot(model, pr, True, recorder, tmp_path / "snap")
    assert_all_alike(family, "cuda bf16", runs)
