"""Prometheus metrics: a real scrape over loopback after a real workload equals stats().

The expected series are written out here from ``stats()`` / ``tier_stats()`` /
``Engine.stats()`` field by field (not through the collector's own tables), and the
exposition text is parsed with prometheus_client's parser, as Prometheus would read it.
"""

from __future__ import annotations

import gc
import json
import logging
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from _models import tiny
from pagedkv import KVCache, KVCacheGroup, KVLayout, metrics
from pagedkv.engine import Engine, SamplingParams
from pagedkv.metrics.server import _check_addr
from pagedkv.tiers import CPUTier

pytestmark = pytest.mark.usefixtures("single_thread")

LAYOUT = KVLayout(2, 2, 8, 4, torch.float32)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """GET ``url`` and parse it: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return parse(text)


def parse(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"series {key} twice"
            out[key] = s.value
    return out


def pagedkv_only(series: dict) -> dict:
    return {k: v for k, v in series.items() if k[0].startswith("pagedkv_")}


def local(registry: CollectorRegistry) -> dict:
    from prometheus_client import generate_latest

    return parse(generate_latest(registry).decode())


# ------------------------------------------------------ expected series, field by field
def cache_series(s, ts, **labels) -> dict:
    """What a KVCache with ``stats() == s`` and ``tier_stats() == ts`` must export."""

    def key(name, **extra):
        return (name, tuple(sorted({**labels, **extra}.items())))

    exp = {
        key("pagedkv_cache_blocks", state="free"): s.free_blocks,
        key("pagedkv_cache_blocks", state="used"): s.used_blocks,
        key("pagedkv_cache_blocks", state="cached"): s.cached_blocks - s.pinned_blocks,
        key("pagedkv_cache_blocks", state="pinned"): s.pinned_blocks,
        key("pagedkv_cache_capacity_blocks"): s.num_blocks,
        key("pagedkv_cache_block_size_tokens"): s.block_size,
        key("pagedkv_cache_sequences"): s.num_sequences,
        key("pagedkv_prefix_query_tokens_total"): s.query_tokens,
        key("pagedkv_prefix_hit_tokens_total"): s.hit_tokens,
        key("pagedkv_cache_evictions_total"): s.evictions,
        key("pagedkv_cache_cow_copies_total"): s.cow_copies,
        key("pagedkv_cache_allocated_blocks_total"): s.blocks_allocated,
        key("pagedkv_cache_fragmentation_ratio"): s.fragmentation,
        key("pagedkv_cache_memory_pressure"): int(s.pressure),
        key("pagedkv_cache_invalidated_blocks"): s.invalidated_blocks,
    }
    if not ts:
        return exp
    for name, t in ts["tiers"].items():
        exp[key("pagedkv_tier_hit_blocks_total", tier=name)] = t["hits"]
        exp[key("pagedkv_tier_stored_blocks_total", tier=name)] = t["puts"]
        exp[key("pagedkv_tier_spilled_blocks_total", tier=name)] = t["spilled"]
        exp[key("pagedkv_tier_corrupt_entries_total", tier=name)] = t["corrupt"]
        exp[key("pagedkv_tier_errors_total", tier=name)] = t["errors"]
        exp[key("pagedkv_tier_up", tier=name)] = 1 if t["available"] else 0
        exp[key("pagedkv_tier_entries", tier=name)] = t["entries"]
        exp[key("pagedkv_tier_used_bytes", tier=name)] = t["bytes_used"]
        exp[key("pagedkv_tier_capacity_bytes", tier=name)] = t["capacity_bytes"]
    exp |= {
        key("pagedkv_tier_hit_tokens_total"): ts["tier_hit_tokens"],
        key("pagedkv_tier_lookup_blocks_total"): ts["lookups"],
        key("pagedkv_tier_promoted_blocks_total"): ts["promoted"],
        key("pagedkv_tier_pending_hits_total"): ts["pending_hits"],
        key("pagedkv_tier_demoted_blocks_total"): ts["demoted"],
        key("pagedkv_tier_written_through_blocks_total"): ts["written_through"],
        key("pagedkv_tier_pending_bytes"): ts["pending_bytes"],
        key("pagedkv_swap_sequences"): ts["swapped_sequences"],
        key("pagedkv_swap_used_bytes"): ts["swapped_bytes"],
        key("pagedkv_swap_capacity_bytes"): ts["swap_capacity_bytes"],
    }
    return exp


def engine_series(e) -> dict:
    """What an engine with ``stats() == e`` must export (its cache aside)."""
    exp = {
        "pagedkv_engine_requests_total": e.requests,
        "pagedkv_engine_prompt_tokens_total": e.prompt_tokens,
        "pagedkv_engine_cached_tokens_total": e.cached_tokens,
        "pagedkv_engine_prefill_tokens_total": e.prefill_tokens,
        "pagedkv_engine_generated_tokens_total": e.generated_tokens,
        "pagedkv_engine_step_seconds_total": e.step_seconds,
        "pagedkv_engine_steps_total": e.steps,
        "pagedkv_engine_preemptions_total": e.preemptions,
        "pagedkv_engine_blocks_in_use": e.blocks_in_use,
        "pagedkv_engine_blocks_peak": e.blocks_peak,
        "pagedkv_engine_retained_sequences": e.retained_seqs,
    }
    return {(name, ()): value for name, value in exp.items()}


# The metrics issue 19 lists, by exported family (every one must be in the scrape).
REQUIRED = {
    "pagedkv_prefix_query_tokens_total", "pagedkv_prefix_hit_tokens_total",
    "pagedkv_tier_hit_blocks_total", "pagedkv_cache_blocks", "pagedkv_cache_evictions_total",
    "pagedkv_cache_cow_copies_total", "pagedkv_tier_used_bytes", "pagedkv_tier_capacity_bytes",
    "pagedkv_tier_corrupt_entries_total", "pagedkv_engine_generated_tokens_total",
    "pagedkv_engine_prompt_tokens_total", "pagedkv_engine_cached_tokens_total",
    "pagedkv_engine_prefill_tokens_total", "pagedkv_engine_preemptions_total",
    "pagedkv_engine_steps_total", "pagedkv_engine_blocks_in_use", "pagedkv_engine_blocks_peak",
}  # fmt: skip
HOOKED = {
    "pagedkv_engine_running_requests", "pagedkv_engine_waiting_requests",
    "pagedkv_engine_time_to_first_token_seconds_count",
    "pagedkv_engine_inter_token_latency_seconds_count",
}  # fmt: skip


def workload_engine() -> Engine:
    """A tiny engine with a CPU tier and a pool small enough to preempt."""
    model = tiny("llama")
    probe = KVLayout(2, 2, 16, 4, torch.float32)  # tiny()'s geometry, block_size 4
    return Engine(
        model, num_blocks=24, block_size=4, max_batch_tokens=64,
        tiers=[CPUTier(128 * probe.bytes_per_block)],
    )  # fmt: skip


def run_workload(engine: Engine) -> None:
    system = list(range(100, 124))  # 24 shared tokens: prefix hits
    g = torch.Generator().manual_seed(0)
    prompts = [system + torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 7, 9, 6)]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    engine.generate(prompts, params)  # 4 x (29..33 + 12) tokens on 24 blocks x 4: preempts
    other = [torch.randint(3, 256, (60,), generator=g).tolist()]
    engine.generate(other, params)  # evicts the system prompt down to the CPU tier
    engine.generate(prompts[:2], params)  # ... where these find it again
    engine.cache.flush()


@pytest.fixture(scope="module")
def served():
    """The acceptance workload, registered and served on 127.0.0.1:0 (module-wide)."""
    registry = CollectorRegistry()
    engine = workload_engine()
    handle = metrics.register(engine, registry)
    server = metrics.serve(0, registry=registry)
    run_workload(engine)
    yield engine, handle, server, registry
    server.close()
    handle.unregister()
    engine.close()


def test_a_scrape_after_a_workload_equals_stats(served):
    engine, handle, server, _ = served
    assert server.addr == "127.0.0.1" and server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}/metrics"
    got = pagedkv_only(scrape(server.url))
    s, ts, e = engine.cache.stats(), engine.cache.tier_stats(), engine.stats()
    # the workload did what it is meant to exercise
    assert e.preemptions > 0 and s.hit_tokens > 0 and ts["tier_hit_tokens"] > 0
    assert s.evictions > 0 and ts["tiers"]["cpu"]["hits"] > 0
    expected = cache_series(s, ts) | engine_series(e)
    expected[("pagedkv_engine_running_requests", ())] = e.running_requests
    expected[("pagedkv_engine_waiting_requests", ())] = e.waiting_requests
    hist = {k: v for k, v in got.items() if "_seconds_" in k[0] and "step" not in k[0]}
    assert {k: v for k, v in got.items() if k not in hist} == pytest.approx(expected)
    names = {name for name, _ in got}
    assert names >= REQUIRED
    assert names >= HOOKED and handle.latency_histograms
    # one first token per request, the other tokens are inter-token gaps
    assert hist[("pagedkv_engine_time_to_first_token_seconds_count", ())] == e.requests
    itl = hist[("pagedkv_engine_inter_token_latency_seconds_count", ())]
    assert itl == e.generated_tokens - e.requests
    assert sum(v for (n, _), v in got.items() if n == "pagedkv_cache_blocks") == s.num_blocks


def test_the_hit_rate_is_the_ratio_of_the_two_counters(served):
    engine, _, server, _ = served
    got = scrape(server.url)
    hit = got[("pagedkv_prefix_hit_tokens_total", ())]
    query = got[("pagedkv_prefix_query_tokens_total", ())]
    assert hit / query == engine.cache.stats().hit_rate > 0


def test_the_engine_hook_feeds_latency_histograms_and_queue_gauges():
    registry = CollectorRegistry()
    engine = workload_engine()
    with metrics.serve_for(engine, 0, registry=registry) as server:
        params = SamplingParams(max_new_tokens=6, ignore_eos=True)
        for n in range(10):  # more than a step admits: some wait
            engine.add_request(list(range(3 + n, 40 + n)), params)
        engine.step()
        got, e = scrape(server.url), engine.stats()
        assert e.running_requests > 0 and e.waiting_requests > 0
        assert got[("pagedkv_engine_running_requests", ())] == e.running_requests
        assert got[("pagedkv_engine_waiting_requests", ())] == e.waiting_requests
        while engine.has_unfinished():
            engine.step()
        got, e = scrape(server.url), engine.stats()
        ttft = got[("pagedkv_engine_time_to_first_token_seconds_count", ())]
        itl = got[("pagedkv_engine_inter_token_latency_seconds_count", ())]
        assert ttft == e.requests == 10  # one first token per request
        assert itl == e.generated_tokens - e.requests == 50  # and the others
        assert got[("pagedkv_engine_inter_token_latency_seconds_sum", ())] > 0
        inf = ("pagedkv_engine_time_to_first_token_seconds_bucket", (("le", "+Inf"),))
        assert got[inf] == 10
    with pytest.raises(urllib.error.URLError):  # closed: nothing listens there any more
        scrape(server.url)
    assert local(registry) == {}  # and serve_for's registration is gone
    engine.close()


def test_on_step_drops_a_raising_callback_and_unsubscribes(caplog):
    engine = Engine(tiny("llama"), num_blocks=32, block_size=4)
    seen, bad_calls = [], []

    def bad(event):
        bad_calls.append(event)
        raise ValueError("observer bug")

    unsubscribe = engine.on_step(seen.append)
    engine.on_step(bad)
    with caplog.at_level(logging.WARNING, logger="pagedkv.engine"):
        out = engine.generate([list(range(3, 12))], SamplingParams(max_new_tokens=3))
    assert len(out[0].token_ids) == 3  # the raising observer failed no step
    assert len(bad_calls) == 1 and "on_step callback raised" in caplog.text
    assert [len(e.time_to_first_token) for e in seen] == [1, 0, 0]
    assert [len(e.inter_token) for e in seen] == [0, 1, 1]
    assert all(x > 0 for e in seen for x in (*e.time_to_first_token, *e.inter_token))
    unsubscribe()
    unsubscribe()  # idempotent
    engine.generate([list(range(3, 12))], SamplingParams(max_new_tokens=2))
    assert len(seen) == 3
    with pytest.raises(TypeError, match="callback must be callable"):
        engine.on_step("not a function")
    engine.close()


# ------------------------------------------------------------------ KVCache alone
def small_cache(**options) -> KVCache:
    return KVCache(LAYOUT, 16, **options)


def test_a_cache_without_tiers_exports_no_tier_series():
    registry = CollectorRegistry()
    cache = small_cache()
    cache.allocate("a", list(range(10)))
    cache.allocate("b", list(range(10)))  # a prefix hit
    cache.fork("a", "c")
    cache.append("c", [7])  # a copy-on-write copy
    with metrics.register(cache, registry):
        got = local(registry)
        assert got == pytest.approx(cache_series(cache.stats(), {}))
        assert not any(n.startswith(("pagedkv_tier", "pagedkv_swap")) for n, _ in got)
        assert got[("pagedkv_cache_cow_copies_total", ())] == 1
        assert got[("pagedkv_prefix_hit_tokens_total", ())] == 8


def test_a_cache_with_a_tier_matches_tier_stats_and_unregister_removes_it():
    registry = CollectorRegistry()
    cache = small_cache(tiers=[CPUTier(64 * LAYOUT.bytes_per_block)])
    for i in range(6):  # 6 x 3 blocks on 16: evictions demote to the tier
        cache.allocate(i, list(range(i * 50, i * 50 + 12)))
        cache.free(i)
    cache.allocate("again", list(range(12)))  # found in the tier
    cache.flush()
    handle = metrics.register(cache, registry, labels={"model": "m"})
    got = local(registry)
    ts = cache.tier_stats()
    assert ts["tier_hit_tokens"] > 0
    assert got == pytest.approx(cache_series(cache.stats(), ts, model="m"))
    handle.unregister()
    assert local(registry) == {} and not handle.registered
    handle.unregister()  # idempotent
    assert list(registry.collect()) == []
    with metrics.register(cache, registry):  # and it can be registered again
        assert local(registry)
    cache.close()


def test_objects_in_one_registry_share_families_told_apart_by_labels():
    registry = CollectorRegistry()
    a, b = small_cache(), small_cache()
    b.allocate(0, list(range(9)))
    with metrics.register(a, registry, labels={"cache": "a"}):
        with metrics.register(b, registry, labels={"cache": "b"}):
            got = local(registry)  # parse() fails on a series given twice
            assert got == pytest.approx(
                cache_series(a.stats(), {}, cache="a") | cache_series(b.stats(), {}, cache="b")
            )
        assert got != local(registry) == pytest.approx(cache_series(a.stats(), {}, cache="a"))


def test_a_collected_object_is_not_kept_alive_and_leaves_no_series():
    registry = CollectorRegistry()
    cache = small_cache()
    handle = metrics.register(cache, registry)
    ref = weakref.ref(cache)
    assert handle.registered
    del cache
    gc.collect()
    assert ref() is None and not handle.registered
    assert local(registry) == {}
    handle.unregister()  # the collector leaves the registry: its names are free again
    from prometheus_client import Counter

    Counter("pagedkv_cache_evictions", "now someone else's", registry=registry)


def test_a_hook_that_refuses_the_subscription_leaves_nothing_registered():
    registry = CollectorRegistry()
    engine = FakeEngine()

    def refuse(callback):
        raise RuntimeError("closed")

    engine.on_step = refuse
    with pytest.raises(RuntimeError, match="closed"):
        metrics.register(engine, registry)
    assert list(registry.collect()) == []
    engine.on_step = engine._on_step  # the same engine registers once it can subscribe
    with metrics.register(engine, registry) as handle:
        assert handle.latency_histograms and len(engine.callbacks) == 1


def test_a_group_exports_each_member_and_its_counters():
    registry = CollectorRegistry()
    group = KVCacheGroup.create(LAYOUT, 16, ["cpu", "cpu"], names=["a", "b"])
    group.allocate(1, list(range(9)), device="a")
    group.allocate(2, list(range(9)))  # prefix affinity: to "a", a hit
    group.move(2, "b")
    with metrics.register(group, registry, labels={"model": "m"}):
        got = local(registry)
    expected = {}
    for name, d in group.device_stats().items():
        expected |= cache_series(d.cache, {}, model="m", member=name)
        m = (("member", name), ("model", "m"))
        expected[("pagedkv_group_placements_total", m)] = d.placements
        expected[("pagedkv_group_prefix_hits_total", m)] = d.prefix_hits
        expected[("pagedkv_group_prefix_hit_tokens_total", m)] = d.prefix_hit_tokens
        expected[("pagedkv_group_moves_total", (("direction", "in"), *m))] = d.moves_in
        expected[("pagedkv_group_moves_total", (("direction", "out"), *m))] = d.moves_out
        expected[("pagedkv_group_copied_blocks_total", m)] = d.blocks_copied_in
        expected[("pagedkv_group_reused_blocks_total", m)] = d.blocks_reused_in
    assert got == pytest.approx(expected)
    assert got[("pagedkv_group_moves_total", (("direction", "in"), ("member", "b"),
                                              ("model", "m")))] == 1  # fmt: skip


# ------------------------------------------------------------ one registration each
def test_registering_an_object_twice_is_a_clear_error():
    registry = CollectorRegistry()
    cache = small_cache()
    with metrics.register(cache, registry):
        with pytest.raises(ValueError, match="already registered in this registry"):
            metrics.register(cache, registry)
        with pytest.raises(ValueError, match="already registered"):  # another namespace too
            metrics.register(cache, registry, namespace="other", labels={"x": "y"})
        other = small_cache()
        with pytest.raises(ValueError, match="with labels {}: give each its own"):
            metrics.register(other, registry)
        with pytest.raises(ValueError, match="same label names"):
            metrics.register(other, registry, labels={"cache": "b"})
    group = KVCacheGroup({"a": cache})
    match = "this object is already registered"
    with metrics.register(group, registry), pytest.raises(ValueError, match=match):
        metrics.register(cache, registry)
    match = "its KVCache is already registered"
    with metrics.register(cache, registry), pytest.raises(ValueError, match=match):
        metrics.register(group, registry)
    with metrics.register(cache, CollectorRegistry()):  # another registry is another scope
        pass


def test_an_engine_covers_its_cache(served):
    engine, _, _, registry = served
    with pytest.raises(ValueError, match="this object is already registered"):
        metrics.register(engine, registry)
    with pytest.raises(ValueError, match="already registered"):
        metrics.register(engine.cache, registry, labels={})


# ------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"namespace": "my-ns"}, ValueError, "namespace must match"),
        ({"namespace": 3}, ValueError, "namespace must match"),
        ({"labels": {"tier": "x"}}, ValueError, "set by pagedkv itself"),
        ({"labels": {"__x": "y"}}, ValueError, "not starting with __"),
        ({"labels": {"a-b": "y"}}, ValueError, "is not valid"),
        ({"labels": {"model": 1}}, TypeError, "must have a str value"),
        ({"labels": [("a", "b")]}, TypeError, "labels must be a dict"),
        ({"ttft_buckets": (0.1, 0.1)}, ValueError, "strictly increasing"),
        ({"ttft_buckets": ()}, ValueError, "at least one"),
        ({"itl_buckets": (0.0, 1.0)}, ValueError, "finite seconds > 0"),
        ({"itl_buckets": "0.1"}, TypeError, "sequence of seconds"),
        ({"itl_buckets": (True,)}, TypeError, "numbers of seconds"),
    ],
)
def test_bad_register_arguments_are_clear_and_register_nothing(kwargs, error, match):
    registry = CollectorRegistry()
    cache = small_cache()
    with pytest.raises(error, match=match):
        metrics.register(cache, registry, **kwargs)
    assert list(registry.collect()) == []
    with metrics.register(cache, registry):  # nothing was left behind
        assert local(registry)


def test_register_refuses_what_it_cannot_read():
    with pytest.raises(
        TypeError, match="takes a KVCache, an Engine, a KVCacheGroup or a SnapshotStore, got dict"
    ):
        metrics.register({}, CollectorRegistry())
    with pytest.raises(TypeError, match="CollectorRegistry"):
        metrics.register(small_cache(), registry="global")


def test_names_another_collector_exports_are_refused():
    from prometheus_client import Counter

    registry = CollectorRegistry()
    Counter("pagedkv_cache_evictions", "someone else's", registry=registry)
    cache = small_cache()
    with pytest.raises(ValueError, match="pass another namespace="):
        metrics.register(cache, registry)
    with metrics.register(cache, registry, namespace="kv"):
        assert ("kv_cache_evictions_total", ()) in local(registry)


@pytest.mark.parametrize(
    "port, addr, error, match",
    [
        (-1, "127.0.0.1", ValueError, "port must be in 0-65535"),
        (65536, "127.0.0.1", ValueError, "port must be in 0-65535"),
        ("9400", "127.0.0.1", TypeError, "port must be an int"),
        (True, "127.0.0.1", TypeError, "port must be an int"),
        (0, "metrics.example.com", ValueError, "addr must be an IP address"),
        (0, 127001, TypeError, "addr must be an IP address as a str"),
    ],
)
def test_bad_serve_arguments_are_clear(port, addr, error, match):
    with pytest.raises(error, match=match):
        metrics.serve(port, addr, registry=CollectorRegistry())


def test_serve_defaults_to_loopback_and_names_a_port_in_use():
    assert _check_addr("127.0.0.1") and _check_addr("::1") and _check_addr("localhost")
    assert not _check_addr("0.0.0.0") and not _check_addr("10.1.2.3")  # explicit only
    with pytest.raises(TypeError, match="CollectorRegistry"):
        metrics.serve(0, registry=object())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: .*pick another"):
            metrics.serve(port, registry=CollectorRegistry())


def test_serve_for_leaves_nothing_registered_when_the_port_is_taken():
    registry = CollectorRegistry()
    cache = small_cache()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            metrics.serve_for(cache, taken.getsockname()[1], registry=registry)
    assert list(registry.collect()) == []
    server = metrics.serve_for(cache, 0, registry=registry)
    assert ("pagedkv_cache_capacity_blocks", ()) in scrape(server.url)
    server.close()
    server.close()  # idempotent
    assert server.closed and list(registry.collect()) == []


# ----------------------------------------------------- latency histograms, fake engine
class FakeEngine:
    """Offers what the collector reads of an engine: stats(), cache and the on_step hook."""

    FIELDS = ("requests", "prompt_tokens", "cached_tokens", "prefill_tokens",
              "generated_tokens", "steps", "preemptions", "blocks_in_use", "blocks_peak",
              "retained_seqs", "running_requests", "waiting_requests")  # fmt: skip

    def __init__(self, hook: bool = True) -> None:
        self.cache = small_cache()
        self.callbacks: list = []
        self.fields = self.FIELDS if hook else self.FIELDS[:-2]  # the hook's stats fields
        if hook:
            self.on_step = self._on_step

    def _on_step(self, callback):
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)

    def step(self, ttft=(), itl=()) -> None:
        event = SimpleNamespace(time=0.0, time_to_first_token=tuple(ttft), inter_token=itl)
        for cb in list(self.callbacks):
            cb(event)

    def stats(self):
        return SimpleNamespace(step_seconds=1.5, **{n: i for i, n in enumerate(self.fields)})


def test_latency_histograms_bin_the_hooks_observations():
    registry = CollectorRegistry()
    engine = FakeEngine()
    handle = metrics.register(engine, registry, ttft_buckets=(0.01, 0.1, 1.0),
                              itl_buckets=(0.005, 0.05, float("inf")))  # fmt: skip
    assert handle.latency_histograms and len(engine.callbacks) == 1
    engine.step(ttft=[0.003, 0.1, 0.5])  # 0.1 is in the le=0.1 bucket
    engine.step(ttft=[700.0], itl=[0.005, 0.02, 0.02, 9.0])
    got = local(registry)
    t = "pagedkv_engine_time_to_first_token_seconds"
    i = "pagedkv_engine_inter_token_latency_seconds"
    assert {k[1]: v for k, v in got.items() if k[0] == t + "_bucket"} == {
        (("le", "0.01"),): 1, (("le", "0.1"),): 2, (("le", "1.0"),): 3, (("le", "+Inf"),): 4,
    }  # fmt: skip
    assert {k[1]: v for k, v in got.items() if k[0] == i + "_bucket"} == {
        (("le", "0.005"),): 1, (("le", "0.05"),): 3, (("le", "+Inf"),): 4,
    }  # fmt: skip
    assert got[(t + "_count", ())] == 4 and got[(t + "_sum", ())] == pytest.approx(700.603)
    assert got[(i + "_count", ())] == 4 and got[(i + "_sum", ())] == pytest.approx(9.045)
    assert got[("pagedkv_engine_running_requests", ())] == 10
    assert got[("pagedkv_engine_step_seconds_total", ())] == 1.5
    handle.unregister()
    assert engine.callbacks == []  # unsubscribed from the hook
    assert local(registry) == {}


def test_an_engine_without_the_hook_exports_everything_but_latencies(caplog):
    registry = CollectorRegistry()
    engine = FakeEngine(hook=False)
    with caplog.at_level(logging.INFO, logger="pagedkv.metrics"):
        handle = metrics.register(engine, registry)
    assert not handle.latency_histograms and "no on_step hook" in caplog.text
    got = local(registry)
    assert got == pytest.approx(
        engine_series(engine.stats()) | cache_series(engine.cache.stats(), {})
    )  # no running/waiting gauges either: those come with the hook
    handle.unregister()


# ------------------------------------------------------------ threads and imports
def test_a_read_racing_a_mutation_is_repeated_and_other_errors_propagate():
    registry = CollectorRegistry()
    cache = small_cache()
    calls = []

    class Racy:  # stats() as it fails when another thread resizes a dict under it
        tier_stats = staticmethod(cache.tier_stats)

        def stats(self):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("dictionary changed size during iteration")
            if len(calls) == 2:
                raise RuntimeError("dictionary keys changed during iteration")
            return cache.stats()

    racy = Racy()
    with metrics.register(racy, registry):
        assert local(registry) == pytest.approx(cache_series(cache.stats(), {}))
        assert len(calls) == 3
        racy.stats = lambda: (_ for _ in ()).throw(RuntimeError("a real bug"))
        with pytest.raises(RuntimeError, match="a real bug"):
            local(registry)


def test_scrapes_from_the_server_thread_while_the_cache_runs():
    import threading

    registry = CollectorRegistry()
    cache = KVCache(LAYOUT, 64, tiers=[CPUTier(64 * LAYOUT.bytes_per_block)])
    stop, errors, scrapes = threading.Event(), [], []
    with metrics.serve_for(cache, 0, registry=registry) as server:

        def scraper():
            while not stop.is_set():
                try:
                    scrapes.append(scrape(server.url))
                except Exception as e:  # reported below, with the main thread's state
                    errors.append(e)
                    return

        thread = threading.Thread(target=scraper)
        thread.start()
        deadline, i = time.monotonic() + 30, 0
        try:  # sequences come and go under 30 scrapes
            while len(scrapes) < 30 and not errors and time.monotonic() < deadline:
                cache.allocate(i, list(range(i % 7, i % 7 + 9 + i % 5)))
                if i >= 4:
                    cache.free(i - 4)
                i += 1
        finally:
            stop.set()
            thread.join()
    assert not errors, errors
    assert len(scrapes) >= 30 and i > 30
    assert all(("pagedkv_cache_sequences", ()) in got for got in scrapes)
    cache.close()


def test_docs_list_every_metric_as_the_table_defines_it():
    from pathlib import Path

    from pagedkv.metrics.specs import ALL, COUNTER

    text = (Path(__file__).parents[1] / "docs" / "METRICS.md").read_text()
    for s in ALL.values():
        name = f"pagedkv_{s.name}" + ("_total" if s.kind == COUNTER else "")
        assert f"| `{name}` | {s.kind} | {', '.join(s.labels)} | {s.help} |" in text, name


def test_without_prometheus_client_the_import_error_is_one_line():
    code = (
        "import json, sys\nsys.modules['prometheus_client'] = None\n"
        "try:\n    import pagedkv.metrics\nexcept ImportError as e:\n"
        "    print(json.dumps([type(e).__name__, str(e)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout) == [
        "MissingDependencyError",
        'pagedkv.metrics needs prometheus-client: pip install "pagedkv[metrics]"',
    ]


# ------------------------------------------------------------------ SnapshotStore
def test_a_snapshot_store_exports_its_saves_loads_and_bytes(tmp_path):
    from pagedkv.snapshot import SnapshotStore

    registry = CollectorRegistry()
    store = SnapshotStore(tmp_path / "snaps")
    cache = small_cache()
    cache.allocate("a", list(range(10)))
    with metrics.register(store, registry):
        assert local(registry)[("pagedkv_snapshot_saves_total", ())] == 0
        saved = store.save(cache, ["a"], "one")
        store.save(cache, ["a"], "two")  # the same pages: nothing new written
        loaded = store.load(small_cache(), "one")
        got, s = local(registry), store.stats()
    assert (s.saves, s.loads) == (2, 1) and s.written_bytes == saved.written_bytes > 0
    assert s.read_bytes == loaded.bytes > 0 and s.save_seconds > 0 and s.load_seconds > 0
    assert got == {
        ("pagedkv_snapshot_saves_total", ()): 2,
        ("pagedkv_snapshot_loads_total", ()): 1,
        ("pagedkv_snapshot_written_bytes_total", ()): s.written_bytes,
        ("pagedkv_snapshot_read_bytes_total", ()): s.read_bytes,
        ("pagedkv_snapshot_save_seconds_total", ()): pytest.approx(s.save_seconds),
        ("pagedkv_snapshot_load_seconds_total", ()): pytest.approx(s.load_seconds),
    }
    # an engine built with a SnapshotStore object exports its counters too, and covers it
    engine = Engine(tiny("llama"), num_blocks=32, block_size=4, snapshot_store=store)
    out = engine.generate([list(range(3, 12))], SamplingParams(max_new_tokens=2), retain=True)
    engine.snapshot(out[0], "engine")
    with metrics.register(engine, registry):
        assert local(registry)[("pagedkv_snapshot_saves_total", ())] == 3
        with pytest.raises(ValueError, match="already registered"):
            metrics.register(store, registry)
    engine.close()
