"""RedisStore against a real redis-server (fixtures in tests/_redis.py)."""

from __future__ import annotations

import os
import random
import time

import pytest
import redis

from pagedkv.errors import StoreError, StoreUnavailable
from pagedkv.stores import BlockStore, FramedStore, RedisStore
from pagedkv.stores.framing import HEADER_BYTES

pytestmark = pytest.mark.redis


@pytest.fixture
def store(redis_url):
    s = RedisStore(redis_url, socket_timeout=0.5, connect_timeout=0.5)
    yield s
    s.close()


@pytest.fixture
def raw(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_roundtrip_bit_exact(store, raw):
    assert isinstance(store, BlockStore) and store.ping() is True
    rng = random.Random(0)
    sizes = [0, 1, 2, 255, 4096, 100_000, 3 << 20]
    items = [(f"k{i}", rng.randbytes(n)) for i, n in enumerate(sizes)]
    items.append(("mv", memoryview(b"\x00\x01\x02")))
    items.append(("ba", bytearray(b"\xff" * 9)))
    assert store.put_many(items) == len(items)
    got = store.get_many([k for k, _ in items] + ["absent"])
    assert got == [bytes(v) for _, v in items] + [None]
    assert raw.get("pagedkv:k1") == items[1][1]  # stored raw, under the prefix
    assert store.contains_many(["k0", "absent", "mv"]) == [True, False, True]
    assert store.delete_many(["k0", "k0", "absent"]) == 1
    assert store.get_many(["k0"]) == [None]
    s = store.stats()
    assert (s.entries, s.bytes_used, s.capacity_bytes) == (None, None, None)
    assert (s.hits, s.misses, s.puts, s.errors) == (len(items), 2, len(items), 0)
    assert store.get_many([]) == [] and store.put_many([]) == 0 and store.delete_many([]) == 0


def test_one_round_trip_per_batch(store, monkeypatch):
    sends = []
    real = redis.connection.AbstractConnection.send_packed_command

    def counting(self, command, check_health=True):
        sends.append(1)
        return real(self, command, check_health)

    store.ping()  # connect (HELLO/AUTH) before counting
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    items = [(f"b{i:03d}", os.urandom(64 + i)) for i in range(256)]
    keys = [k for k, _ in items]
    for call, expected in [
        (lambda: store.put_many(items), 256),
        (lambda: store.get_many(keys), [v for _, v in items]),
        (lambda: store.contains_many(keys), [True] * 256),
        (lambda: store.delete_many(keys), 256),
    ]:
        sends.clear()
        assert call() == expected
        assert len(sends) == 1, f"{len(sends)} round trips for one batch"


def test_key_prefix_isolation_and_scan(redis_url):
    a = RedisStore(redis_url, key_prefix="tenantA:")
    b = RedisStore(redis_url, key_prefix="t*[B]?:")  # glob characters are escaped in SCAN
    c = RedisStore(redis_url, key_prefix="")
    a.put_many([("k", b"A"), ("x1", b"1")])
    b.put_many([("k", b"B")])
    assert a.get_many(["k"]) == [b"A"] and b.get_many(["k"]) == [b"B"]
    assert sorted(a.keys()) == ["k", "x1"] and list(b.keys()) == ["k"]
    assert sorted(c.keys()) == ["t*[B]?:k", "tenantA:k", "tenantA:x1"]
    assert b.delete_many(["k"]) == 1 and a.get_many(["k"]) == [b"A"]

    many = [(f"s{i:05d}", b"v") for i in range(2500)]  # several SCAN cursors
    a.put_many(many)
    assert sorted(a.keys("s")) == [k for k, _ in many]
    assert sorted(a.keys("s0001")) == [f"s0001{i}" for i in range(10)]
    assert list(a.keys("nothing")) == []
    with pytest.raises(ValueError):
        a.keys("*")


def test_ttl_slides_on_get(redis_url, raw):
    store = RedisStore(redis_url, ttl_seconds=100)
    store.put_many([("t", b"v")])
    assert 0 < raw.ttl("pagedkv:t") <= 100
    raw.expire("pagedkv:t", 5)
    assert store.get_many(["t", "none"]) == [b"v", None]
    assert raw.ttl("pagedkv:t") > 5
    assert RedisStore(redis_url).put_many([("u", b"v")]) == 1 and raw.ttl("pagedkv:u") == -1


def test_killed_server_raises_quickly_then_recovers(redis_server, redis_url, store):
    store.put_many([("a", b"1")])
    redis_server.kill()
    for op in (
        lambda: store.get_many(["a"]),
        lambda: store.put_many([("b", b"2")]),
        lambda: store.contains_many(["a"]),
        lambda: store.delete_many(["a"]),
        lambda: list(store.keys()),
    ):
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="unavailable"):
            op()
        assert time.monotonic() - t0 < 1.5
    assert store.ping() is False
    assert store.stats().errors >= 5
    redis_server.restart()
    assert store.ping() is True
    assert store.get_many(["a"]) == [None]  # no persistence: data went with the server
    store.put_many([("a", b"again")])
    assert store.get_many(["a"]) == [b"again"]


def test_hung_server_times_out(redis_server, redis_url, store):
    store.put_many([("a", b"1")])
    redis_server.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable, match="imeout"):
            store.get_many(["a"])
        assert time.monotonic() - t0 < 2.0  # socket_timeout=0.5, no retry on timeouts
    finally:
        redis_server.resume()
    assert store.get_many(["a"]) == [b"1"]


def test_down_server_at_construction(redis_server):
    port = redis_server.port + 1 if redis_server.port < 65535 else redis_server.port - 1
    store = RedisStore(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3, connect_timeout=0.3)
    assert store.ping() is False
    with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{port}"):
        store.get_many(["x"])


def test_wrong_or_missing_password(redis_server, redis_url):
    wrong = RedisStore(redis_url, password="not-the-password")
    with pytest.raises(StoreError, match="password") as info:
        wrong.get_many(["x"])
    assert "not-the-password" not in str(info.value)
    with pytest.raises(StoreError, match="password"):
        wrong.ping()
    anonymous = RedisStore(f"redis://127.0.0.1:{redis_server.port}/0")
    with pytest.raises(StoreError, match="password") as info:
        anonymous.put_many([("x", b"1")])
    assert redis_server.password not in str(info.value)
    # password= overrides the URL's (or supplies a missing one)
    other = redis_url.replace(redis_server.password, "x")
    assert RedisStore(other, password=redis_server.password).ping()
    bare = f"redis://127.0.0.1:{redis_server.port}/0"
    assert RedisStore(bare, password=redis_server.password).ping()


@pytest.mark.parametrize(
    "url",
    ["http://localhost:6379", "redis://", "redis://host:notaport/0", "redis://h:6379/db1",
     "unix:///tmp/redis.sock", "localhost:6379", 6379],
)  # fmt: skip
def test_bad_url(url):
    with pytest.raises(ValueError, match="RedisStore"):
        RedisStore(url)


def test_bad_options():
    with pytest.raises(ValueError, match="socket_timeout"):
        RedisStore("redis://h", socket_timeout=0)
    with pytest.raises(ValueError, match="ttl_seconds"):
        RedisStore("redis://h", ttl_seconds=0)
    with pytest.raises(ValueError, match="key_prefix"):
        RedisStore("redis://h", key_prefix=None)


def test_invalid_keys(store):
    with pytest.raises(ValueError, match="'a b'"):
        store.put_many([("a b", b"1")])
    with pytest.raises(ValueError, match="invalid block-store key"):
        store.get_many([""])


def test_framed_over_redis_deletes_corrupt(store, raw):
    framed = FramedStore(store, "fp")
    framed.put_many([("a", b"payload"), ("b", b"other")])
    blob = bytearray(raw.get("pagedkv:a"))
    blob[HEADER_BYTES] ^= 1
    raw.set("pagedkv:a", bytes(blob))
    assert framed.get_many(["a", "b"]) == [None, b"other"]
    assert raw.exists("pagedkv:a") == 0 and framed.stats().corrupt == 1


def test_closed(store):
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.get_many(["a"])


def _readme_acl() -> list[str]:
    """The ``ACL SETUSER pagedkv ...`` line of the README, as arguments."""
    readme = os.path.join(os.path.dirname(__file__), "..", "README.md")
    with open(readme) as f:
        (line,) = [ln for ln in f if ln.startswith("ACL SETUSER pagedkv ")]
    return line.split()[2:]


def test_the_readme_acl_user_can_do_everything_pagedkv_does(redis_url, redis_server, raw, tmp_path):
    """Every store, tier and snapshot operation as the README's ACL user: nothing denied
    (the server's ACL LOG stays empty), and a key outside its prefixes is refused."""
    import secrets

    import torch

    from pagedkv import KVCache
    from pagedkv.snapshot import SnapshotStore
    from pagedkv.storage import KVLayout
    from pagedkv.testing import SyntheticPager
    from pagedkv.tiers import CPUTier, RedisTier

    user, password = "pagedkv-acl-test", secrets.token_hex(8)
    args = _readme_acl()
    args = [user] + [f">{password}" if a == ">CHANGE-ME" else a for a in args[1:]]
    raw.execute_command("ACL", "SETUSER", *args)
    raw.execute_command("ACL", "LOG", "RESET")
    base = f"redis://{user}:{password}@127.0.0.1:{redis_server.port}"
    try:
        for db, ttl in (("0", None), ("1", 60)):  # /1: SELECT; a TTL: SET EX and GETEX
            s = RedisStore(f"{base}/{db}", ttl_seconds=ttl)
            assert s.ping() is True
            s.put_many([("a", b"1"), ("b", b"2")])
            assert s.get_many(["a", "b", "c"]) == [b"1", b"2", None]
            assert s.contains_many(["a", "c"]) == [True, False]
            assert sorted(s.keys()) == ["a", "b"]
            assert s.delete_many(["a", "b"]) == 2
            s.close()
        layout = KVLayout(2, 2, 8, 4, torch.float16)
        tiers = [CPUTier(2 * layout.bytes_per_block), RedisTier(f"{base}/0")]
        cache = KVCache(layout, 4, tiers=tiers)
        for i in range(6):
            cache.allocate(i, list(range(i * 10, i * 10 + 9)))
            cache.free(i)
        cache.flush()
        assert cache.allocate("again", list(range(9))) == 8
        assert cache.tier_stats()["tiers"]["redis"]["errors"] == 0
        cache.close()
        pager = SyntheticPager(layout, 16, fingerprint="fp")
        pager.allocate("a", list(range(13)))
        pager.fill_random("a", torch.Generator().manual_seed(0))
        with SnapshotStore(f"{base}/0") as snaps:
            snaps.save(pager, name="s")
            snaps.fork("s", "s2")
            assert snaps.verify("s2").ok and [i.name for i in snaps.list()] == ["s", "s2"]
            assert len(snaps.load(SyntheticPager(layout, 16, fingerprint="fp"), "s")) == 1
            snaps.delete("s")
            snaps.gc()
        assert raw.execute_command("ACL", "LOG") == []  # nothing pagedkv sent was denied
        outside = RedisStore(f"{base}/0", key_prefix="other:")
        with pytest.raises(StoreError, match="refused"):
            outside.put_many([("a", b"1")])
        outside.close()
    finally:
        raw.execute_command("ACL", "DELUSER", user)
        raw.execute_command("ACL", "LOG", "RESET")
