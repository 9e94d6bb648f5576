"""Redis Cluster against a real local 3-master cluster (tests/_redis.py): the store, the
tier, the snapshot store; a master killed mid-workload, recovery, two processes, TLS."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch

import _tiercases
from _redis import RedisClusterNodes
from _tiercases import BPB, LAYOUT, hashes
from pagedkv import KVCache
from pagedkv.errors import StoreError, StoreUnavailable
from pagedkv.snapshot import SnapshotStore
from pagedkv.storage import KVLayout
from pagedkv.stores import RedisClusterStore, open_store, parse_location
from pagedkv.stores.cluster_url import parse_cluster_url
from pagedkv.testing import SyntheticPager
from pagedkv.tiers import CPUTier, RedisTier, TieredStore

pytestmark = pytest.mark.redis

# Quick retries; a killed master refuses connections at once, so the round-trip timeout
# can stay generous (a live master slowed by a loaded CI machine is not "down").
FAST = {"timeout_seconds": 2.0, "retry_initial_seconds": 0.05, "retry_max_seconds": 0.2}


def chain(tiers, **kw) -> TieredStore:
    return _tiercases.chain(tiers, num_blocks=64, **kw)


def admin(cluster: RedisClusterNodes):
    """A plain redis-py cluster client, to look at where keys are."""
    from redis.cluster import ClusterNode, RedisCluster

    nodes = [ClusterNode("127.0.0.1", p) for p in cluster.ports]
    kw = {} if cluster.tls is None else {"ssl": True, "ssl_ca_certs": f"{cluster.certs}/ca.crt"}
    return RedisCluster(startup_nodes=nodes, password=cluster.password, **kw)


def owner_port(client, redis_key: str) -> int:
    return client.get_node_from_key(redis_key).port


# -- locations and URLs (no server) ------------------------------------------------------


def test_cluster_urls_parse_and_construction_never_connects():
    u = parse_cluster_url("rediss+cluster://u:p%40ss@h1:7000,[::1]:7001,h3?ssl_ca_certs=/ca.pem")
    assert u.nodes == [("h1", 7000), ("::1", 7001), ("h3", 6379)] and u.tls
    assert u.options == {
        "username": "u",
        "password": "p@ss",
        "ssl_ca_certs": "/ca.pem",
        "ssl": True,
    }
    assert "p%40ss" in u.secrets and "p@ss" in u.secrets
    assert parse_cluster_url("redis+cluster://h:1/0?ssl_check_hostname=false").options == {
        "ssl_check_hostname": False
    }
    loc = parse_location("REDIS+CLUSTER://:pw@h1:1,h2:2")
    assert loc.kind == "redis-cluster" and loc.shown == "redis+cluster://h1:1,h2:2"
    dead = "redis+cluster://:pw@127.0.0.1:1,127.0.0.1:2"  # nothing listens: no connection made
    assert isinstance(open_store(dead), RedisClusterStore)
    tier = RedisTier(dead)
    assert "pw" not in repr(tier)
    snaps = SnapshotStore(dead)
    assert isinstance(snaps.backend, RedisClusterStore) and snaps.location == loc.shown.replace(
        "h1:1,h2:2", "127.0.0.1:1,127.0.0.1:2"
    )
    assert snaps.backend.redis_key("snap.m.x") == "pagedkv-snap:{snap.}m.x"  # colocated
    assert snaps.backend.redis_key("ab.pg") == "pagedkv-snap:ab.pg"  # pages spread
    snaps.close()
    for bad, match in [
        ("redis+cluster://:pw@h:1/2", "only database 0"),
        ("redis+cluster://:pw@h:x", "port"),
        ("redis+cluster://:pw@h:1,,h:2", "empty node"),
        ("redis+cluster://:pw@h:1?sockettimeout=1", "unknown option 'sockettimeout'"),
        ("redis+cluster://:pw@h:1?ssl_check_hostname=maybe", "bad value"),
        ("redis://:pw@h:1", "not a Redis Cluster URL"),
    ]:
        with pytest.raises(ValueError, match=match) as info:
            RedisClusterStore(bad)
        assert ":pw@" not in str(info.value)
    with pytest.raises(ValueError, match="hash tag"):
        RedisClusterStore(dead, key_prefix="app{1}:")
    with pytest.raises(ValueError, match="retry"):
        RedisTier(dead, retry_initial_seconds=2, retry_max_seconds=1)


# -- the store ---------------------------------------------------------------------------


def test_store_round_trip_spreads_keys_over_every_master(redis_cluster):
    store = RedisClusterStore(redis_cluster.url, ttl_seconds=600)
    keys = [f"k{i:03d}" for i in range(300)]
    assert store.put_many([(k, k.encode() * 3) for k in keys]) == 300
    sizes = [redis_cluster.dbsize(i) for i in range(3)]
    assert sum(sizes) == 300 and min(sizes) >= 60, sizes  # ~1/3 each (slots split evenly)
    assert store.get_many(keys[:3] + ["nope"]) == [b"k000" * 3, b"k001" * 3, b"k002" * 3, None]
    assert store.contains_many(["k010", "nope"]) == [True, False]
    assert sorted(store.keys()) == keys and sorted(store.keys("k29")) == keys[290:]
    client = admin(redis_cluster)
    assert 0 < client.ttl("pagedkv:k005") <= 600  # a sliding expiry on each key
    assert store.delete_many(["k000", "k000", "k001", "nope"]) == 2
    assert store.get_many(["k000", "k001"]) == [None, None]
    st = store.stats()
    assert (st.puts, st.hits, st.misses, st.errors) == (300, 3, 3, 0)
    assert store.ping()
    client.close()
    store.close()


def test_colocated_keys_share_one_master(redis_cluster):
    store = RedisClusterStore(redis_cluster.url, colocate=("meta.",))
    store.put_many([(f"meta.m.{i}", b"x") for i in range(20)] + [("page", b"p")])
    sizes = sorted(redis_cluster.dbsize(i) for i in range(3))
    assert sizes[-1] >= 20 and sum(sizes) == 21  # the 20 are on one master
    assert sorted(store.keys("meta.m.")) == sorted(f"meta.m.{i}" for i in range(20))
    assert len(list(store.keys())) == 21 and list(store.keys("pa")) == ["page"]
    assert sorted(store.keys("me")) == sorted(store.keys("meta.")) != []  # a group's prefix
    client = admin(redis_cluster)
    assert client.exists("pagedkv:{meta.}m.3") == 1
    client.close()
    store.close()


def test_stale_slot_map_moved_and_migrating_slot_ask_are_followed(redis_cluster):
    store = RedisClusterStore(redis_cluster.url, colocate=("grp.",))
    store.put_many([("grp.a", b"A"), ("grp.b", b"B")])
    client = store.masters.client("test")
    from redis.crc import key_slot

    slot = key_slot(store.redis_key("grp.a").encode())
    home = client.nodes_manager.get_node_from_slot(slot)
    other = next(n for n in client.get_primaries() if n.name != home.name)
    # MOVED: the client's map points the slot at the wrong master
    client.nodes_manager.slots_cache[slot] = [other]
    assert store.get_many(["grp.a", "grp.b"]) == [b"A", b"B"]
    assert client.nodes_manager.get_node_from_slot(slot).name == home.name  # refreshed
    # ASK: the slot is migrating home -> other and grp.a has already moved
    a = admin(redis_cluster)
    src, dst = a.get_redis_connection(home), a.get_redis_connection(other)
    src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
    try:
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        src.execute_command(
            "MIGRATE", "127.0.0.1", other.port, store.redis_key("grp.a"), 0, 5000,
            "AUTH", redis_cluster.password,
        )  # fmt: skip
        assert store.get_many(["grp.a", "grp.b"]) == [b"A", b"B"]  # ASK, then the source
        assert store.contains_many(["grp.a", "grp.b", "grp.c"]) == [True, True, False]
    finally:
        for conn in (src, dst):
            conn.execute_command("CLUSTER SETSLOT", slot, "STABLE")
        a.close()
    store.close()


def test_credentials_rejected_and_strict_store_raises_when_a_master_is_down(redis_cluster):
    wrong = redis_cluster.url.replace(redis_cluster.password, "wrong-password")
    with pytest.raises(StoreError, match="rejected the credentials") as info:
        RedisClusterStore(wrong).get_many(["k"])
    assert "wrong-password" not in str(info.value)
    cache = KVCache(LAYOUT, 4, tiers=[RedisTier(wrong, **FAST)])  # a tier never raises
    for i in range(3):
        cache.allocate(i, list(range(i * 10, i * 10 + 9)))
        cache.free(i)
    cache.flush()
    cache.close()
    strict = RedisClusterStore(redis_cluster.url, socket_timeout=0.3, connect_timeout=0.3)
    keys = [f"s{i}" for i in range(30)]
    strict.put_many([(k, b"v") for k in keys])
    redis_cluster.kill(2)
    with pytest.raises(StoreUnavailable, match=str(redis_cluster.ports[2])):
        strict.get_many(keys)
    with pytest.raises(StoreUnavailable):
        list(strict.keys())
    assert strict.ping() is False
    strict.close()


# -- the tier ----------------------------------------------------------------------------


def test_tier_round_trip_and_a_fresh_cache_finds_the_blocks(redis_cluster):
    ts = chain([CPUTier(2 * BPB), RedisTier(redis_cluster.url, **FAST)])
    hs = hashes(12)
    before = ts._transfer.pool.read_blocks(list(range(12))).clone()
    for i in range(12):
        ts.demote([(i, hs[i])])
    ts.flush()
    st = ts.stats()["tiers"]
    assert st["cpu"]["spilled"] == 10 and st["redis"]["puts"] == 10
    ts._transfer.pool.kv.zero_()
    assert ts.promote(hs, list(range(20, 32))) == 12
    assert torch.equal(ts._transfer.pool.read_blocks(list(range(20, 32))), before)
    ts.close()
    assert min(redis_cluster.dbsize(i) for i in range(3)) >= 1  # spread over the masters
    only = chain([RedisTier(redis_cluster.url, **FAST)], seed=1)
    assert only.promote(hs[:10], list(range(10))) == 10
    assert torch.equal(only._transfer.pool.read_blocks(list(range(10))), before[:10])
    only.close()


def test_master_killed_mid_workload_misses_only_its_slots_then_recovers(redis_cluster, caplog):
    caplog.set_level(logging.INFO, logger="pagedkv")
    ts = chain([RedisTier(redis_cluster.url, **FAST)])
    hs = hashes(48, "w")
    for start in range(0, 48, 16):
        ts.demote([(i % 64, hs[i]) for i in range(start, start + 16)])
    ts.flush()
    client = admin(redis_cluster)
    owner = [owner_port(client, "pagedkv:" + ts.key(h)) for h in hs]
    client.close()
    victim = 1
    dead = redis_cluster.ports[victim]
    assert dead in owner and set(owner) - {dead}
    redis_cluster.kill(victim)
    for _ in range(2):  # twice: the second time the dead master is in back-off (no I/O)
        hits = [ts.promote([h], [63]) for h in hs]  # never an exception
        assert hits == [int(o != dead) for o in owner]
    # puts while it is down: stored on the live masters, dropped for the dead one
    fresh = hashes(32, "down")
    ts.demote([(i, fresh[i]) for i in range(32)])
    ts.flush()
    st = ts.stats()["tiers"]["redis"]
    assert st["available"] and st["puts"] == 48 + sum(1 for h in fresh if owner_of(ts, h) != dead)
    cache = KVCache(LAYOUT, 8, tiers=[RedisTier(redis_cluster.url, **FAST)])
    for i in range(12):  # a cache workload over the half-dead cluster: no exception
        cache.allocate(i, list(range(i * 10, i * 10 + 9)))
        cache.free(i)
    cache.flush()
    cache.check_integrity()
    cache.close()
    down = [r for r in caplog.records if "failed" in r.getMessage()]
    assert {r.name for r in down} == {"pagedkv.stores"}  # the master, not the whole tier
    assert all(str(dead) in r.getMessage() for r in down)
    assert len([r for r in down if r.levelno >= logging.WARNING]) == 2  # once per client
    redis_cluster.restart(victim)  # same node (nodes.conf), its data gone
    deadline = time.monotonic() + 10
    mine = [h for h in hashes(64, "back") if owner_of(ts, h) == dead][:3]
    while time.monotonic() < deadline:
        ts.demote([(40 + j, h) for j, h in enumerate(mine)])
        ts.flush()
        if ts.promote(mine, [50, 51, 52]) == 3:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the restarted master's slots did not come back")
    assert torch.equal(
        ts._transfer.pool.read_blocks([50, 51, 52]), ts._transfer.pool.read_blocks([40, 41, 42])
    )
    assert any("is back" in r.getMessage() for r in caplog.records)
    ts.close()


def owner_of(ts: TieredStore, h: bytes) -> int:
    return ts.levels[-1].store.inner.node_of(ts.key(h)).port


def test_master_killed_while_a_cache_writes_back_costs_exactly_its_blocks(redis_cluster):
    """A KVCache runs prompts (evictions written back by its thread, never flushed)
    and a master is SIGKILLed in the middle: no exception; a fresh cache then finds
    each prompt's leading full blocks up to the first one the dead master owned. After
    the master returns, a second round is stored whole."""
    tier = RedisTier(redis_cluster.url, **FAST)
    a = KVCache(LAYOUT, 8, model_fingerprint="m", tiers=[tier])
    victim, dead = 0, redis_cluster.ports[0]

    def run(prompts: list[list[int]], kill_at: int | None = None) -> None:
        for i, toks in enumerate(prompts):
            if i == kill_at:
                redis_cluster.kill(victim)  # write-backs to it may be in flight
            a.allocate("p", toks)
            a.free("p")
        a.allocate("sweep", list(range(90000, 90032)))  # evicts every cached block
        a.free("sweep")
        a.flush()
        a.check_integrity()

    def live_prefix(toks: list[int]) -> int:
        ports = [owner_of(a.tiers, h) for h in a.manager.hash_blocks(toks)]
        return 4 * next((j for j, p in enumerate(ports) if p == dead), len(ports))

    def found(prompts: list[list[int]]) -> list[int]:
        b = KVCache(LAYOUT, 64, model_fingerprint="m", tiers=[tier])
        hits = []
        for toks in prompts:
            hits.append(b.allocate("q", toks))
            b.free("q")
        b.close()
        return hits

    first = [list(range(i * 100, i * 100 + 9)) for i in range(24)]  # 2 full blocks each
    run(first, kill_at=8)
    expected = [live_prefix(t) for t in first]
    assert 0 < sum(expected) < 8 * len(first)  # the victim owned some, not all
    assert found(first) == expected
    assert a.tier_stats()["tiers"]["redis"]["available"]  # a partial outage, not the tier's
    redis_cluster.restart(victim)
    deadline = time.monotonic() + 10
    for round_ in range(1, 1000):
        again = [list(range(round_ * 10000 + i * 100, round_ * 10000 + i * 100 + 9))
                 for i in range(6)]  # fmt: skip
        run(again)
        if found(again) == [8] * 6:
            break
        assert time.monotonic() < deadline, "the restarted master's slots did not come back"
        time.sleep(0.05)
    a.close()


def test_every_master_down_is_a_tier_outage_then_recovery(redis_cluster, caplog):
    caplog.set_level(logging.WARNING, logger="pagedkv")
    ts = chain([RedisTier(redis_cluster.url, **FAST)])
    hs = hashes(6, "all")
    ts.demote([(i, hs[i]) for i in range(6)])
    ts.flush()
    for i in range(3):
        redis_cluster.kill(i)
    assert ts.promote(hs, list(range(10, 16))) == 0  # no exception
    ts.demote([(20, hashes(1, "x")[0])])
    ts.flush()
    assert not ts.stats()["tiers"]["redis"]["available"]
    assert any(r.name == "pagedkv.tiers" for r in caplog.records)  # the tier, as for one Redis
    for i in range(3):
        redis_cluster.start(i)
    redis_cluster.wait_ok()
    deadline = time.monotonic() + 10
    fresh = hashes(3, "again")
    while time.monotonic() < deadline:
        ts.demote([(30 + i, fresh[i]) for i in range(3)])
        ts.flush()
        if ts.promote(fresh, [40, 41, 42]) == 3:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the cluster tier did not come back")
    assert ts.stats()["tiers"]["redis"]["available"]
    ts.close()


def test_two_processes_share_the_cluster_tier(redis_cluster):
    """This process writes a prompt's blocks through the tier; a child process (the
    reader of tests/test_tiers_processes.py) finds them bit-exact, another model not."""
    from test_tiers_processes import SHARE, _run

    layout = KVLayout(2, 2, 8, 4, torch.bfloat16)  # as in SHARE
    cache = KVCache(layout, 4, model_fingerprint="model-a", tiers=[RedisTier(redis_cluster.url)])
    cache.allocate("p", list(range(1000, 1013)))  # SHARE's prompt: 3 full blocks + 1 token
    table = cache.block_table("p")
    g = torch.Generator().manual_seed(1234)
    data = torch.randint(0, 256, (len(table), layout.bytes_per_block), dtype=torch.uint8,
                         generator=g)  # fmt: skip
    cache.write_blocks(table, data)
    cache.free("p")
    cache.allocate("other", list(range(5000, 5016)))  # evicts the prompt into the cluster
    cache.close()
    read = _run(SHARE, "reader", redis_cluster.url)
    same, other = read["model-a"], read["model-b"]
    assert same["cached"] == 12 and same["redis_hits"] == 3
    assert same["digest"] == hashlib.sha256(data[:3].numpy().tobytes()).hexdigest()
    assert other["cached"] == 0 and other["redis_hits"] == 0  # another model: no hit


def test_warm_restart_persists_the_device_blocks_into_the_cluster(redis_cluster):
    """close(persist=True) writes the device's cached blocks across the masters; a new
    cache (as a new process would) hits every full block, bit-exact."""
    seqs = {f"p{i}": list(range(i * 100, i * 100 + 13)) for i in range(4)}  # 3 full blocks
    a = KVCache(LAYOUT, 16, model_fingerprint="m", tiers=[RedisTier(redis_cluster.url, **FAST)])
    g = torch.Generator().manual_seed(7)
    written = {}
    for sid, toks in seqs.items():
        a.allocate(sid, toks)
        table = a.block_table(sid)
        data = torch.randint(0, 256, (len(table), BPB), dtype=torch.uint8, generator=g)
        a.write_blocks(table, data)
        written[sid] = data[:3]
        a.free(sid)
    assert a.tier_stats()["tiers"]["redis"]["puts"] == 0  # all still on the device
    a.close(persist=True)
    assert a.tier_stats()["persisted"] == 12
    assert min(redis_cluster.dbsize(i) for i in range(3)) >= 1  # spread over the masters
    b = KVCache(LAYOUT, 16, model_fingerprint="m", tiers=[RedisTier(redis_cluster.url, **FAST)])
    for sid, toks in seqs.items():
        assert b.allocate(sid, toks) == 12, sid
        assert torch.equal(b.read_blocks(b.block_table(sid)[:3]), written[sid]), sid
    assert b.tier_stats()["tiers"]["redis"]["hits"] == 12
    b.check_integrity()
    b.close()


# -- the snapshot store ------------------------------------------------------------------


def test_snapshot_store_round_trip_metadata_on_one_master(redis_cluster):
    pager = SyntheticPager(LAYOUT, 64, fingerprint="fp")
    for i in range(4):
        pager.allocate(f"s{i}", list(range(i * 100, i * 100 + 32)))  # full blocks only
        pager.fill_random(f"s{i}", torch.Generator().manual_seed(i))
    snaps = SnapshotStore(redis_cluster.url)
    info = snaps.save(pager, name="one")
    assert info.num_sequences == 4
    snaps.fork("one", "two", seq_ids=["s0", "s1"])
    assert [s.name for s in snaps.list()] == ["one", "two"] and snaps.verify("one").ok
    client = admin(redis_cluster)
    meta_nodes = {owner_port(client, k.decode()) for k in client.scan_iter(match="*{snap.}*")}
    page_nodes = {owner_port(client, k.decode()) for k in client.scan_iter(match="*.pg")}
    client.close()
    assert len(meta_nodes) == 1 and len(page_nodes) == 3
    target = SyntheticPager(LAYOUT, 64, fingerprint="fp")
    mapping = snaps.load(target, "one")
    for old, new in mapping.items():
        assert torch.equal(
            target.read_blocks(target.block_table(new)), pager.read_blocks(pager.block_table(old))
        )
    snaps.delete("one")
    report = snaps.gc()
    assert report.pages_deleted == info.unique_pages - 16  # two's 2 x 8 pages stay
    assert snaps.verify("two").ok
    # strict: a master down is never read as missing pages or a partial listing
    (meta,) = meta_nodes
    pages_only = next(i for i, p in enumerate(redis_cluster.ports) if p != meta)
    redis_cluster.kill(pages_only)
    assert [s.name for s in snaps.list()] == ["two"]  # the metadata master answers
    with pytest.raises(StoreUnavailable):  # not "damaged": unavailable
        snaps.load(SyntheticPager(LAYOUT, 64, fingerprint="fp"), "two")
    redis_cluster.kill(redis_cluster.ports.index(meta))
    with pytest.raises(StoreUnavailable):
        snaps.list()
    snaps.close()


# -- TLS ---------------------------------------------------------------------------------


def test_tls_cluster_tier_and_snapshot_round_trip():
    binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if binary is None or cli is None or shutil.which("openssl") is None:
        pytest.fail("needs redis-server, redis-cli and openssl on PATH (make setup installs them)")
    cluster = RedisClusterNodes(binary, cli, tls=True)
    try:
        assert cluster.url.startswith("rediss+cluster://")
        ts = chain([RedisTier(cluster.url, **FAST)])
        hs = hashes(9, "tls")
        ts.demote([(i, hs[i]) for i in range(9)])
        ts.flush()
        assert ts.promote(hs, list(range(20, 29))) == 9
        assert torch.equal(
            ts._transfer.pool.read_blocks(list(range(9))),
            ts._transfer.pool.read_blocks(list(range(20, 29))),
        )
        ts.close()
        pager = SyntheticPager(LAYOUT, 16, fingerprint="fp")
        pager.allocate("a", list(range(13)))
        pager.fill_random("a", torch.Generator().manual_seed(0))
        with SnapshotStore(cluster.url) as snaps:
            snaps.save(pager, name="t")
            assert snaps.verify("t").ok
        plain = cluster.url.replace("rediss+", "redis+").partition("?")[0]
        with pytest.raises(StoreUnavailable):  # plain text to a TLS port: no answer
            RedisClusterStore(plain, socket_timeout=0.5, connect_timeout=0.5).get_many(["k"])
    finally:
        cluster.stop()


def test_the_readme_acl_user_with_the_cluster_commands_can_do_everything(redis_cluster):
    import secrets

    import redis

    from test_stores_redis import _readme_acl

    extra = ["+cluster|slots", "+command", "+asking"]
    with open(Path(__file__).resolve().parents[1] / "README.md") as f:
        readme = f.read()
    assert "`+cluster|slots +command`" in readme and "`+asking`" in readme  # as documented
    user, password = "pagedkv-cluster-acl", secrets.token_hex(8)
    args = [user] + [f">{password}" if a == ">CHANGE-ME" else a for a in _readme_acl()[1:]]
    raws = [redis.Redis(port=p, password=redis_cluster.password) for p in redis_cluster.ports]
    for raw in raws:
        raw.execute_command("ACL", "SETUSER", *args, *extra)
        raw.execute_command("ACL", "LOG", "RESET")
    hosts = ",".join(f"127.0.0.1:{p}" for p in redis_cluster.ports)
    url = f"redis+cluster://{user}:{password}@{hosts}"
    try:
        store = RedisClusterStore(url, ttl_seconds=60)
        assert store.ping()
        store.put_many([(f"k{i}", b"v") for i in range(30)])
        assert store.get_many(["k1", "zz"]) == [b"v", None] and len(list(store.keys())) == 30
        assert store.contains_many(["k2"]) == [True] and store.delete_many(["k2"]) == 1
        store.close()
        cache = KVCache(LAYOUT, 4, tiers=[CPUTier(2 * BPB), RedisTier(url)])
        for i in range(6):
            cache.allocate(i, list(range(i * 10, i * 10 + 9)))
            cache.free(i)
        cache.flush()
        assert cache.allocate("again", list(range(9))) == 8
        cache.close()
        pager = SyntheticPager(LAYOUT, 16, fingerprint="fp")
        pager.allocate("a", list(range(13)))
        pager.fill_random("a", torch.Generator().manual_seed(0))
        with SnapshotStore(url) as snaps:
            snaps.save(pager, name="s")
            snaps.fork("s", "s2")
            assert snaps.verify("s2").ok
            snaps.delete("s")
            snaps.gc()
        assert all(raw.acl_log() == [] for raw in raws)  # nothing pagedkv sent was denied
    finally:
        for raw in raws:
            raw.execute_command("ACL", "DELUSER", user)
            raw.close()
