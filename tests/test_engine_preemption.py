"""Preemption policies and request priorities.

The exact victims of every built-in policy under forced pressure (on the scheduler
over a real KVCache, and through the engine with a tiny model), priority-ordered
admission, token-identical outputs whatever the policy, and user policies: the happy
path and every way one can be wrong (a clear error, nothing changed).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from _models import tiny
from pagedkv.cache import KVCache
from pagedkv.engine import Engine, EngineConfig, SamplingParams
from pagedkv.engine.preemption import (
    POLICIES,
    PreemptionPolicyError,
    RunningRequest,
    make_preemption_policy,
)
from pagedkv.engine.request import Request
from pagedkv.engine.scheduler import Scheduler
from pagedkv.engine.waiting import WaitingQueue
from pagedkv.storage import KVLayout
from pagedkv.tiers import CPUTier
from test_engine import GREEDY, prompts_of, reference

pytestmark = pytest.mark.usefixtures("single_thread")

BS = 4
NAMES = ["newest", "oldest", "lru", "fewest_blocks", "priority"]


# ------------------------------------------------------------------ the policies alone
def view(rid, *, priority=0, admitted=None, last_step=0, blocks=1, requesting=False):
    admitted = rid if admitted is None else admitted
    return RunningRequest(rid, priority, admitted, last_step, 0.0, blocks, 4, 5, requesting)


def test_builtin_policies_order_running_requests_as_documented():
    # admission order 0..3; lru, blocks and priority each disagree with it
    running = (
        view(0, priority=2, last_step=7, blocks=3),
        view(1, priority=0, last_step=5, blocks=2),
        view(2, priority=0, last_step=7, blocks=2),
        view(3, priority=1, last_step=6, blocks=5, requesting=True),
    )

    def order(name):
        return [r.request_id for r in make_preemption_policy(name).select_victims(running, 1)]

    assert order("newest") == [3, 2, 1, 0]
    assert order("oldest") == [0, 1, 2, 3]
    assert order("lru") == [1, 3, 2, 0]  # last_step 5, 6, then the 7s newest first
    assert order("fewest_blocks") == [2, 1, 0, 3]  # 2 blocks (newest first), 3, 5
    assert order("priority") == [2, 1, 3, 0]  # priority 0 (newest first), 1, 2
    assert order("LRU") == order("lru")  # names are case-insensitive, as eviction's


def test_make_preemption_policy_rejects_bad_specs():
    with pytest.raises(ValueError, match=r"'nope' is not a known policy.*\['fewest_blocks', "):
        make_preemption_policy("nope")
    for bad in (3, None, ["newest"], b"newest"):
        with pytest.raises(TypeError, match="preemption_policy must be a policy name"):
            make_preemption_policy(bad)
    assert sorted(POLICIES) == sorted(NAMES)


def test_policy_objects_and_functions_are_accepted():
    class Mine:
        name = "mine"

        def select_victims(self, running, blocks_needed):
            return list(running)

    def my_fn(running, blocks_needed):
        return list(running)

    assert make_preemption_policy(Mine()).name == "mine"
    assert make_preemption_policy(my_fn).name.endswith("my_fn")
    running = (view(0), view(1, requesting=True))
    assert make_preemption_policy(Mine()).select_victims(running, 1) == list(running)


# ------------------------------------------------------------------ the waiting queue
def waiting_req(rid, priority=0):
    return Request(rid, [1], SamplingParams(), None, frozenset(), priority=priority)


def test_waiting_queue_is_priority_first_fifo_within_a_level():
    q = WaitingQueue()
    reqs = [waiting_req(i, p) for i, p in enumerate([0, 2, 1, 2, 0, -1])]
    for r in reqs:
        q.append(r)
    assert [r.request_id for r in q] == [1, 3, 2, 0, 4, 5]
    assert q[0] is reqs[1] and q[-1] is reqs[5] and q[2] is reqs[2] and len(q) == 6
    back = waiting_req(9, 1)
    q.appendleft(back)  # a preempted request: the front of its level, not of the queue
    assert [r.request_id for r in q] == [1, 3, 9, 2, 0, 4, 5]
    q.remove(reqs[3])
    assert reqs[3] not in q and back in q and waiting_req(7) not in q
    with pytest.raises(ValueError):
        q.remove(waiting_req(8, 5))
    assert [q.popleft().request_id for _ in range(len(q))] == [1, 9, 2, 0, 4, 5]
    assert not q
    with pytest.raises(IndexError):
        q.popleft()
    with pytest.raises(IndexError):
        q[0]


# ------------------------------------------------------------------ the scheduler alone
def scheduler(policy, num_blocks=13, prefix_caching=False):
    layout = KVLayout(1, 1, 2, BS, torch.float32)
    cache = KVCache(layout, num_blocks, model_fingerprint="t", prefix_caching=prefix_caching)
    config = EngineConfig(max_batch_tokens=64, max_num_seqs=16, preemption_policy=policy)
    return Scheduler(cache, config)


def sreq(rid, prompt, priority=0):
    params = SamplingParams(max_new_tokens=100, ignore_eos=True)
    return Request(rid, list(prompt), params, None, frozenset(), priority=priority)


def fake_step(s):
    """What Engine.step does with a schedule, without a model (token 3 is sampled)."""
    chunks = s.schedule()
    for c in chunks:
        c.req.num_computed = c.end
        if c.sample:
            c.req.output.append(3)
    s.cache.check_integrity()
    return chunks


def pressure(policy):
    """Four decoding requests admitted one per step (A..D = ids 0..3, priorities
    1, 2, 0, 3), then E (id 4, priority 5) with a 40-token prompt admitted with a
    5-token chunk. In the sixth step E's next chunk [5, 21) needs 4 new blocks and one
    is free: A..D hold 2, 5, 2, 1 blocks, E 2, and none of A..D needs a block."""
    s = scheduler(policy)
    for rid, (n, p) in enumerate([(2, 1), (14, 2), (3, 0), (1, 3)]):
        s.add(sreq(rid, range(10 + 20 * rid, 10 + 20 * rid + n), p))
        fake_step(s)
    s.max_batch_tokens = 4 + 5
    s.add(sreq(4, range(100, 140), priority=5))
    fake_step(s)
    held = {r.request_id: -(-r.num_allocated // BS) for r in s.running}
    assert held == {0: 2, 1: 5, 2: 2, 3: 1, 4: 2} and s.cache.num_free_blocks == 1
    s.max_batch_tokens = 4 + 16
    return s


@pytest.mark.parametrize(
    "policy, victims, runs",
    [
        ("newest", [4], [0, 1, 2, 3]),  # E itself (as before policies existed)
        ("lru", [4], [0, 1, 2, 3]),  # all ran in step 5: ties go to the newest
        ("oldest", [0, 1], [2, 3, 4]),  # A frees 2 (3 free), B 5
        ("fewest_blocks", [3, 4], [0, 1, 2]),  # D (1 block), then E (2, newest of A, C, E)
        ("priority", [2, 0], [1, 3, 4]),  # C (priority 0) frees 2, A (1) 2 more
    ],
)
def test_exact_victims_of_each_policy(policy, victims, runs):
    s = pressure(policy)
    chunks = fake_step(s)
    assert [r.request_id for r in s.preempted] == victims
    assert [c.req.request_id for c in chunks] == runs  # planned victims lost their chunks
    if 4 in runs:
        assert (chunks[-1].start, chunks[-1].end) == (5, 21)
    assert s.counters.preemptions == len(victims)
    assert {r.request_id for r in s.waiting} == set(victims)
    assert all(r.num_allocated == 0 for r in s.waiting)  # recompute: blocks freed


def test_preempted_requests_go_to_the_front_of_their_priority_level():
    s = pressure("oldest")
    s.add(sreq(7, [5, 6], priority=1))  # queued before the preemption, A's level
    fake_step(s)  # A (priority 1) and B (priority 2) are preempted; nothing is admitted
    assert [r.request_id for r in s.waiting] == [1, 0, 7]


def test_lru_picks_the_request_the_budget_left_behind():
    """With the budget spent in admission order, the requests not scheduled lately are
    the tail ones: lru and newest agree, and last_step shows why."""
    s = scheduler("lru", num_blocks=5)
    for rid in range(3):
        s.add(sreq(rid, range(10 * rid, 10 * rid + 3)))
    fake_step(s)  # step 1: all three admitted (1 block each)
    s.max_batch_tokens = 2  # from now on only 0 and 1 fit the budget
    while not s.preempted:
        stamps = [r.last_step for r in s.running]
        fake_step(s)
    # step 3 gave 0 and 1 their second blocks (the pool is full); in step 7 both need a
    # third: for 0, 2 (scheduled last in step 1) goes; for 1, 0 and 1 tie (step 6) and
    # 1, the newer, gives way itself
    assert s.steps == 7 and stamps == [6, 6, 1]
    assert [r.request_id for r in s.preempted] == [2, 1]


def test_a_policy_that_frees_shared_blocks_is_asked_again():
    """Victims that hold enough blocks on paper but share them (a common prefix) free
    fewer: the scheduler asks again with the remaining shortfall."""
    calls = []

    def most_computed(running, blocks_needed):  # one victim per call
        calls.append(([r.request_id for r in running], blocks_needed))
        return [max(running, key=lambda r: r.num_computed)]

    s = scheduler(most_computed, num_blocks=5, prefix_caching=True)
    prefix = list(range(50, 58))  # two full blocks
    s.add(sreq(0, prefix + [1]))  # 3 blocks
    s.add(sreq(1, prefix + [2, 3]))  # shares 0's two full blocks, 1 of its own
    fake_step(s)
    s.max_batch_tokens = 2 + 4
    s.add(sreq(2, range(100, 116)))  # admitted with a 4-token chunk: the last free block
    fake_step(s)
    assert s.cache.num_free_blocks == 0
    s.max_batch_tokens = 2 + 8
    chunks = fake_step(s)  # 2's next chunk [4, 12) needs 2 blocks
    # 1 holds 3 blocks but frees 1 (the prefix stays with 0): asked again for 1 more
    assert calls == [([0, 1, 2], 2), ([0, 2], 1)]
    assert [r.request_id for r in s.preempted] == [1, 0]
    assert [(c.req.request_id, c.start, c.end) for c in chunks] == [(2, 4, 12)]


# ------------------------------------------------------------------ through the engine
LENS, PRIOS, NEW = (7, 1, 13, 8), (2, 3, 0, 1), 12


@pytest.fixture(scope="module")
def model():
    return tiny("llama")


@pytest.fixture(scope="module")
def staged(model):
    """Prompts A..D (7, 1, 13 and 8 tokens, priorities 2, 3, 0, 1) submitted one per
    step, and their outputs with ample blocks."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in LENS]
    params = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    outs = Engine(model, num_blocks=64, block_size=BS).generate(prompts, params)
    ref = [o.token_ids for o in outs]
    return prompts, params, ref


def run_staged(model, staged, policy=None, **options):
    """Run the staged workload on 10 blocks; returns (outputs, [(step, victim ids)])."""
    prompts, params, _ = staged
    if policy is not None:
        options["preemption_policy"] = policy
    engine = Engine(model, num_blocks=10, block_size=BS, **options)
    ids, events, outs, step = [], [], {}, 0
    while len(outs) < len(prompts):
        if step < len(prompts):
            ids.append(engine.add_request(prompts[step], params, priority=PRIOS[step]))
        step += 1
        for o in engine.step():
            outs[o.request_id] = o.token_ids
        if engine.scheduler.preempted:
            events.append((step, [r.request_id for r in engine.scheduler.preempted]))
        engine.cache.check_integrity()
    assert engine.stats().blocks_in_use == 0
    return [outs[i] for i in ids], events


# In step 5 the pool (10 blocks) is full: A..D hold 3, 1, 4 and 2 blocks and only D
# needs one (its 9th token). newest/lru: D itself; oldest: A; fewest_blocks: B;
# priority: C. The second events, followed by hand: newest, step 7: C needs a block
# and is the newest running; oldest, step 9: D needs one, B is the oldest left;
# fewest_blocks, step 7: A needs one, D and A hold 3 blocks (D is newer), C 4;
# priority, step 10: B needs one, D has the lowest priority of A, B, D.
STAGED_EVENTS = {
    "newest": [(5, [3]), (7, [2])],
    "lru": [(5, [3]), (7, [2])],
    "oldest": [(5, [0]), (9, [1])],
    "fewest_blocks": [(5, [1]), (7, [3])],
    "priority": [(5, [2]), (10, [3])],
}


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no-prefix", "prefix"])
@pytest.mark.parametrize("policy", NAMES)
def test_engine_victims_and_outputs_per_policy(model, staged, policy, prefix_caching):
    outs, events = run_staged(model, staged, policy, prefix_caching=prefix_caching)
    assert events[:2] == STAGED_EVENTS[policy]
    assert outs == staged[2]  # greedy outputs do not depend on who was preempted


def test_the_default_policy_is_newest(model, staged):
    assert Engine(model, num_blocks=8).scheduler.policy.name == "newest"
    assert EngineConfig().preemption_policy == "newest"
    outs, events = run_staged(model, staged)
    assert outs == staged[2]
    assert events == run_staged(model, staged, "newest")[1]
    assert events[:2] == STAGED_EVENTS["newest"]


@pytest.fixture(scope="module")
def shared_prefix(model):
    """test_engine's workload: five prompts behind a 40-token prefix, and transformers'
    greedy outputs."""
    prompts = prompts_of(prefix=list(range(100, 140)))
    return prompts, reference(model, prompts)


@pytest.mark.parametrize("policy", NAMES)
@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_outputs_unchanged_under_pressure_whatever_the_policy(
    model, shared_prefix, policy, preemption
):
    prompts, ref = shared_prefix
    tiers = [CPUTier(8 << 20)] if preemption == "swap" else None
    engine = Engine(
        model, num_blocks=40, block_size=4, preemption=preemption, tiers=tiers,
        preemption_policy=policy,
    )  # fmt: skip
    outs = engine.generate(prompts, GREEDY, priority=[0, 1, 2, 1, 0])
    assert [o.token_ids for o in outs] == ref
    assert engine.stats().preemptions > 0 and engine.stats().blocks_in_use == 0
    engine.cache.check_integrity()


def test_a_callable_policy_sees_the_running_requests_exactly(model, staged):
    seen = []

    def most_tokens(running, blocks_needed):
        seen.append((running, blocks_needed))
        return sorted(running, key=lambda r: -r.num_tokens)

    outs, events = run_staged(model, staged, most_tokens)
    assert outs == staged[2]
    running, needed = seen[0]
    # step 5 (see STAGED_EVENTS): A has 7 + 4 tokens, B 1 + 3, C 13 + 2, D 8 + 1
    assert [(r.request_id, r.priority, r.admitted, r.last_step) for r in running] == [
        (0, 2, 0, 4), (1, 3, 1, 4), (2, 0, 2, 4), (3, 1, 3, 4)
    ]  # fmt: skip
    assert [(r.num_blocks, r.num_computed, r.num_tokens) for r in running] == [
        (3, 10, 11), (1, 3, 4), (4, 14, 15), (2, 8, 9)
    ]  # fmt: skip
    assert [r.requesting for r in running] == [False, False, False, True] and needed == 1
    assert len({r.last_time for r in running}) == 1  # time.monotonic() of step 4
    assert events[0] == (5, [2])  # C holds the most tokens
    with pytest.raises(dataclasses.FrozenInstanceError):
        running[0].priority = 9  # type: ignore[misc]


def engine_state(engine: Engine) -> tuple:
    s = engine.scheduler
    reqs = [
        (r.request_id, r.status, r.num_computed, r.num_allocated, list(r.output))
        for r in engine.core.requests.values()
    ]
    return (
        engine.stats(), reqs, [r.request_id for r in s.waiting],
        [r.request_id for r in s.running], dataclasses.astuple(s.counters),
        engine.cache.num_free_blocks,
        engine.cache.seq_ids(), engine.cache.stats(),
        [engine.cache.block_table(r.request_id) for r in s.running],
    )  # fmt: skip


BAD_ANSWERS = [
    (lambda running, need: None, "returned NoneType, not a list"),
    (lambda running, need: 3, "returned int, not a list"),
    (lambda running, need: "oldest", "returned str, not a list"),
    (lambda running, need: running[0], "returned RunningRequest, not a list"),
    (lambda running, need: [running[0].request_id], r"returned int 0 at position 0, not a"),
    (lambda running, need: [{"request_id": 0}], r"returned dict .* at position 0"),
    (lambda running, need: [dataclasses.replace(running[0])], "not one of the running"),
    (lambda running, need: [running[1], running[0], running[1]], r"1 twice \(positions \[0, 2\]"),
    (lambda running, need: [], r"too few requests: \[\] hold 0 KV blocks, but request 3 needs 1"),
]  # fmt: skip


@pytest.mark.parametrize("answer, match", BAD_ANSWERS)
def test_a_wrong_policy_answer_raises_and_changes_nothing(model, staged, answer, match):
    prompts, params, ref = staged
    broken = [True]

    def policy(running, need):
        return answer(running, need) if broken[0] else list(reversed(running))

    engine = Engine(model, num_blocks=10, block_size=BS, preemption_policy=policy)
    ids = []
    for step in range(4):
        ids.append(engine.add_request(prompts[step], params, priority=PRIOS[step]))
        engine.step()
    before = engine_state(engine)
    with pytest.raises(PreemptionPolicyError, match=match) as info:
        engine.step()  # step 5: the pool is full and D needs a block
    assert "preemption policy 'test_a_wrong_policy_answer_raises_and_changes_nothing" in str(
        info.value
    )
    assert isinstance(info.value, ValueError)
    assert engine_state(engine) == before
    engine.cache.check_integrity()
    broken[0] = False  # the engine goes on from where it was
    outs = {}
    while engine.has_unfinished():
        outs.update((o.request_id, o.token_ids) for o in engine.step())
    assert [outs[i] for i in ids] == ref
    assert engine.stats().blocks_in_use == 0


def test_too_few_victims_holding_too_few_blocks():
    s = pressure(lambda running, need: [running[3]])  # D holds 1 block, E needs 3 more
    before = ([r.request_id for r in s.running], s.cache.num_free_blocks, s.cache.stats())
    with pytest.raises(PreemptionPolicyError, match=r"\[3\] hold 1 KV blocks, but request 4 need"):
        s.schedule()
    assert ([r.request_id for r in s.running], s.cache.num_free_blocks, s.cache.stats()) == before
    assert [r.num_allocated for r in s.running] == [6, 17, 5, 2, 5]  # nothing reserved


def test_an_exception_inside_the_policy_propagates_and_changes_nothing(model, staged):
    prompts, params, _ = staged

    def policy(running, need):
        raise RuntimeError("policy bug")

    engine = Engine(model, num_blocks=10, block_size=BS, preemption_policy=policy)
    for step in range(4):
        engine.add_request(prompts[step], params, priority=PRIOS[step])
        engine.step()
    before = engine_state(engine)
    with pytest.raises(RuntimeError, match="policy bug"):
        engine.step()
    assert engine_state(engine) == before


# ------------------------------------------------------------------ priorities
def test_waiting_requests_are_admitted_by_priority_fifo_within_a_level(model):
    prompts = prompts_of((5, 9, 3, 7, 6, 4), seed=2)
    ref = reference(model, prompts, new=6)
    engine = Engine(model, num_blocks=64, block_size=BS, max_num_seqs=1)
    order = []
    outs = engine.generate(
        prompts, SamplingParams(max_new_tokens=6, ignore_eos=True),
        priority=[0, 2, 1, 2, 0, np.int64(1)], on_finish=lambda o: order.append(o.request_id),
    )  # fmt: skip
    first = outs[0].request_id
    assert [rid - first for rid in order] == [1, 3, 2, 5, 0, 4]
    assert [o.token_ids for o in outs] == ref


def test_one_priority_for_all_prompts_and_through_every_entry_point(model):
    engine = Engine(model, num_blocks=64, block_size=BS)
    rid = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=2), priority=-3)
    assert engine.core.requests[rid].priority == -3
    engine.abort(rid)
    outs = engine.generate([[5, 6], [7, 8]], SamplingParams(max_new_tokens=2), priority=4)
    assert all(o.finish_reason == "length" for o in outs)
    deltas = list(engine.stream([5, 6], SamplingParams(max_new_tokens=2), priority=1))
    assert deltas[-1].finish_reason == "length"


BAD_PRIORITIES = [
    (True, TypeError, "priority must be an int"),
    ("high", TypeError, "priority must be an int .* got str 'high'"),
    (1.0, TypeError, "priority must be an int .* got float 1.0"),
    (None, TypeError, "priority must be an int .* got NoneType"),
]


@pytest.mark.parametrize("priority, exc, match", BAD_PRIORITIES)
def test_bad_priorities_raise_and_queue_nothing(model, priority, exc, match):
    engine = Engine(model, num_blocks=64, block_size=BS)
    sp = SamplingParams(max_new_tokens=2)
    before = engine_state(engine)
    with pytest.raises(exc, match=match):
        engine.add_request([5, 6], sp, priority=priority)
    with pytest.raises(exc, match=match):
        engine.generate([[5, 6], [7]], sp, priority=priority)
    with pytest.raises(exc, match="prompt 1: " + match):
        engine.generate([[5, 6], [7]], sp, priority=[0, priority])
    with pytest.raises(exc, match=match):
        engine.stream([5, 6], sp, priority=priority)
    with pytest.raises(ValueError, match="1 priority values for 2 prompts"):
        engine.generate([[5, 6], [7]], sp, priority=[1])
    assert engine_state(engine) == before


def test_bad_policy_names_raise_before_the_model_is_touched(model):
    impl = model.config._attn_implementation
    with pytest.raises(ValueError, match=r"'newset' is not a known policy; choose one of \["):
        Engine(model, num_blocks=8, preemption_policy="newset")
    with pytest.raises(TypeError, match="preemption_policy must be a policy name"):
        Engine(model, num_blocks=8, preemption_policy=42)
    with pytest.raises(ValueError, match="not a known policy"):
        EngineConfig(preemption_policy="")
    assert model.config._attn_implementation == impl
