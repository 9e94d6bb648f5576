"""Secrets: a password (or token) from a URL or ``password=`` never shows.

A sentinel password is put in every place a user can put one (URL user information,
``?password=``, ``password=``), and every public object that can hold it is checked:
``repr``, ``str``, ``stats()``; every log record emitted during workloads (caplog at
DEBUG: a dead port, a real ``redis-server``, a wrong password, an ACL refusal, the
snapshot CLI) with its formatted traceback; and every exception raised, with its whole
chain as a traceback prints it.
"""

from __future__ import annotations

import logging
import secrets
import socket
import traceback

import pytest
import torch
from typer.testing import CliRunner

from pagedkv import KVCache
from pagedkv.errors import StoreError, StoreUnavailable
from pagedkv.snapshot import SnapshotStore
from pagedkv.snapshot.cli import app as snapshot_cli
from pagedkv.storage import KVLayout
from pagedkv.stores import FramedStore, RedisStore, open_store
from pagedkv.stores.base import redact_url
from pagedkv.testing import SyntheticPager
from pagedkv.tiers import CPUTier, RedisTier, TieredStore

pytestmark = pytest.mark.redis

SENTINEL = "S3ntinel" + secrets.token_hex(8)  # a password that must never show
WRONG = "Wr0ngSentinel" + secrets.token_hex(8)  # a rejected one must not show either
USER = "pagedkv-secrets-test"
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float16)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def assert_clean(*things: object) -> None:
    """No sentinel in the repr or str of anything given (or of what it holds)."""
    for thing in things:
        for text in (repr(thing), str(thing)):
            assert SENTINEL not in text and WRONG not in text, text


def assert_clean_exception(exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    assert SENTINEL not in text and WRONG not in text, text
    assert_clean(exc)


def assert_clean_logs(caplog) -> None:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    assert caplog.records, "the workload should have logged something"
    for record in caplog.records:
        text = formatter.format(record)  # message, args and any traceback
        assert SENTINEL not in text and WRONG not in text, text


def url_variants(host_port: str, user: str = "") -> list[tuple[str, dict]]:
    """(url, kwargs) pairs carrying SENTINEL in each place a password can go."""
    return [
        (f"redis://{user}:{SENTINEL}@{host_port}/0", {}),
        (f"redis://{user + '@' if user else ''}{host_port}/0?password={SENTINEL}", {}),
        (f"redis://{user + '@' if user else ''}{host_port}/0", {"password": SENTINEL}),
        (f"redis://{user}:{WRONG}@{host_port}/0", {"password": SENTINEL}),
    ]


@pytest.fixture
def sentinel_user(redis_server, redis_url):
    """An ACL user on the real server whose password is SENTINEL (removed afterwards)."""
    import redis

    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", USER, "on", f">{SENTINEL}", "~*", "&*", "+@all")
    try:
        yield f"127.0.0.1:{redis_server.port}"
    finally:
        admin.execute_command("ACL", "DELUSER", USER)
        admin.close()


def test_redact_url():
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert (
        redact_url("rediss://u:pw@h/1?password=pw&db=1") == "rediss://u:***@h/1?password=***&db=1"
    )
    assert redact_url("redis://h/0?token=t#frag") == "redis://h/0?token=***"
    for odd in (
        "redis://:pa/ss@h/0",
        "redis://:pa?ss@h/0",
        "redis://:p@ss@h/0",
        "redis://:pa#ss@h",
    ):
        assert "pa" not in redact_url(odd).replace("redis", "") and "ss" not in redact_url(odd)
    assert redact_url("/var/lib/user@host/snaps") == "/var/lib/user@host/snaps"  # a path


def test_objects_never_show_the_password():
    for url, kw in url_variants("127.0.0.1:6390"):
        tier = RedisTier(url, **kw)
        store = RedisStore(url, **kw)
        assert_clean(tier, store, store.url, store.stats(), FramedStore(store, "fp"))
        assert_clean(open_store(url, **kw))
        assert "***" in repr(tier) and ("***" in store.url or "password" in kw)
        if not kw:
            snaps = SnapshotStore(url)
            assert_clean(snaps, snaps.location, snaps.backend)
            snaps.close()
        store.close()
    from _models import tiny
    from pagedkv.engine import Engine

    url = url_variants("127.0.0.1:6390")[0][0]
    engine = Engine(tiny(), num_blocks=16, tiers=[RedisTier(url)], snapshot_store=url)
    assert_clean(engine, engine.stats(), engine.cache, engine.cache.tiers)
    engine.cache.close()
    # bad arguments: the error names the problem, not the secret
    for bad in (
        lambda: RedisStore(f"redis://:{SENTINEL}@host:notaport/0"),
        lambda: RedisStore(f"redis://:{SENTINEL}@host/notadb"),
        lambda: RedisStore(f"redis://:{SENTINEL}@/0"),
        lambda: RedisStore(f"redis://:{SENTINEL}@host/0?socket_timeout=x{SENTINEL}"),
        lambda: RedisTier(f"redis://:{SENTINEL}@host/0".encode()),
        lambda: RedisTier(f"redis://:{SENTINEL}@host/0", timeout_s=-1),
    ):
        with pytest.raises((ValueError, TypeError)) as info:
            bad()
        assert_clean_exception(info.value)


def every_op_unavailable_and_clean(store) -> None:
    """Reads, writes and listing of an unreachable ``store`` raise StoreUnavailable with no
    password in the error (or its chain)."""
    for op in (
        lambda: store.get_many(["k"]),
        lambda: store.put_many([("k", b"v")]),
        lambda: list(store.keys()),
    ):
        with pytest.raises(StoreUnavailable) as info:
            op()
        assert_clean_exception(info.value)


def cache_over_down_tier(url: str, kw: dict, n: int) -> KVCache:
    """A cache whose only tier is the unreachable Redis ``url``, after ``n`` sequences were
    freed into it (demotions fail) and one more was looked up there (the lookup fails);
    it, its tiers and their stats show no password."""
    cache = KVCache(LAYOUT, 4, tiers=[RedisTier(url, timeout_s=0.2, **kw)])
    for i in range(n):
        cache.allocate(i, list(range(i * 10, i * 10 + 9)))
        cache.free(i)
    cache.flush()
    cache.allocate("again", list(range(9)))
    assert_clean(cache, cache.tiers, cache.tier_stats(), *cache.tiers.levels)
    return cache


def test_dead_port_logs_and_errors_never_show_the_password(caplog):
    caplog.set_level(logging.DEBUG)
    port = _dead_port()
    for url, kw in url_variants(f"127.0.0.1:{port}"):
        store = RedisStore(url, socket_timeout=0.2, connect_timeout=0.2, **kw)
        every_op_unavailable_and_clean(store)
        assert store.ping() is False
        assert_clean(store, store.stats())
        store.close()
        # a cache whose Redis tier is down: demotions and lookups fail, logged
        cache = cache_over_down_tier(url, kw, 4)
        assert_clean(*(level.backoff.name for level in cache.tiers.levels))
        cache.close()
        with pytest.raises(StoreUnavailable) as info:
            SnapshotStore(url).list()
        assert_clean_exception(info.value)
    assert_clean_logs(caplog)
    assert any("treating it as missing" in r.getMessage() for r in caplog.records)


def test_real_server_workload_never_shows_the_password(sentinel_user, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    host_port = sentinel_user
    pager = SyntheticPager(LAYOUT, 32, fingerprint="fp")
    pager.allocate("a", list(range(13)))
    pager.fill_random("a", torch.Generator().manual_seed(0))
    for url, kw in url_variants(host_port, USER)[:3]:
        store = RedisStore(url, **kw)
        assert store.ping() is True
        store.put_many([("k", b"v")])
        assert store.get_many(["k"]) == [b"v"]
        assert_clean(store, store.stats())
        store.close()
        tiers = [CPUTier(2 * LAYOUT.bytes_per_block), RedisTier(url, **kw)]
        cache = KVCache(LAYOUT, 4, tiers=tiers)
        for i in range(6):
            cache.allocate(i, list(range(i * 10, i * 10 + 9)))
            cache.free(i)
        cache.flush()
        assert cache.allocate("again", list(range(9))) == 8  # through CPU -> Redis and back
        assert_clean(cache, cache.tiers, cache.tier_stats(), *cache.tiers.levels)
        cache.close()
    url = url_variants(host_port, USER)[0][0]
    with SnapshotStore(url) as snaps:
        snaps.save(pager, name="s")
        snaps.fork("s", "s2")
        assert snaps.verify("s2").ok
        assert [i.name for i in snaps.list()] == ["s", "s2"]
        snaps.delete("s")
        snaps.gc()
        assert_clean(snaps, snaps.location, snaps.backend, snaps.list())
    code, out = _cli("ls", "--store", url)
    assert code == 0 and "s2" in out and SENTINEL not in out
    chain = TieredStore([RedisTier(url)], LAYOUT, "fp")
    assert_clean(chain, chain.stats())
    chain.close()
    assert_clean_logs(caplog)


def test_rejected_credentials_never_show_the_password(sentinel_user, redis_server, caplog):
    caplog.set_level(logging.DEBUG)
    host_port = sentinel_user
    attempts = [
        (f"redis://{USER}:{WRONG}@{host_port}/0", {}),  # the user exists, wrong password
        (f"redis://:{WRONG}@{host_port}/0", {}),  # the default user, wrong password
        (f"redis://{host_port}/0", {"password": WRONG}),
        (f"redis://nobody:{SENTINEL}@{host_port}/0", {}),  # no such user
        (f"redis://{host_port}/0", {}),  # no password where one is required
    ]
    for url, kw in attempts:
        store = RedisStore(url, **kw)
        with pytest.raises(StoreError, match="rejected the credentials") as info:
            store.get_many(["k"])
        assert_clean_exception(info.value)
        with pytest.raises(StoreError) as info:
            store.ping()
        assert_clean_exception(info.value)
        store.close()
        cache = KVCache(LAYOUT, 4, tiers=[RedisTier(url, **kw)])
        for i in range(3):
            cache.allocate(i, list(range(i * 10, i * 10 + 9)))
            cache.free(i)
        cache.flush()
        cache.close()
        code, out = _cli("ls", "--store", url)
        assert code == 1 and "rejected the credentials" in out
        assert SENTINEL not in out and WRONG not in out
    assert_clean_logs(caplog)


def test_acl_refusal_never_shows_the_password(redis_url, redis_server, caplog):
    import redis

    caplog.set_level(logging.DEBUG)
    admin = redis.Redis.from_url(redis_url)
    limited = USER + "-limited"
    admin.execute_command("ACL", "SETUSER", limited, "on", f">{SENTINEL}", "~only:*", "+@all")
    try:
        url = f"redis://{limited}:{SENTINEL}@127.0.0.1:{redis_server.port}/0"
        store = RedisStore(url)  # key_prefix "pagedkv:" is outside ~only:*
        with pytest.raises(StoreError, match="refused") as info:
            store.put_many([("k", b"v")])
        assert_clean_exception(info.value)
        store.close()
    finally:
        admin.execute_command("ACL", "DELUSER", limited)
        admin.close()


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(snapshot_cli, list(args), terminal_width=200)
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


# -- Redis Cluster ------------------------------------------------------------------------


def cluster_variants(hosts: str) -> list[tuple[str, dict]]:
    """(url, kwargs) pairs of a redis+cluster:// URL carrying SENTINEL in each place."""
    return [
        (f"redis+cluster://:{SENTINEL}@{hosts}", {}),
        (f"rediss+cluster://user:{SENTINEL}@{hosts}", {}),
        (f"redis+cluster://{hosts}?password={SENTINEL}", {}),
        (f"redis+cluster://{hosts}", {"password": SENTINEL}),
        (f"redis+cluster://:{WRONG}@{hosts}", {"password": SENTINEL}),
    ]


def test_cluster_objects_and_dead_nodes_never_show_the_password(caplog):
    from pagedkv.stores import RedisClusterStore

    caplog.set_level(logging.DEBUG)
    hosts = f"127.0.0.1:{_dead_port()},127.0.0.1:{_dead_port()}"
    for url, kw in cluster_variants(hosts):
        tier = RedisTier(url, **kw, timeout_s=0.2)
        store = RedisClusterStore(url, **kw, socket_timeout=0.2, connect_timeout=0.2)
        assert_clean(tier, store, store.url, store.stats(), FramedStore(store, "fp"))
        assert_clean(open_store(url, **kw))
        every_op_unavailable_and_clean(store)
        assert store.ping() is False
        store.close()
        cache_over_down_tier(url, kw, 3).close()
        if not kw:
            snaps = SnapshotStore(url)
            assert_clean(snaps, snaps.location, snaps.backend)
            with pytest.raises(StoreUnavailable) as info:
                snaps.list()
            assert_clean_exception(info.value)
    for bad in (
        lambda: RedisClusterStore(f"redis+cluster://:{SENTINEL}@host:notaport"),
        lambda: RedisClusterStore(f"redis+cluster://:{SENTINEL}@host:1/3"),
        lambda: RedisClusterStore(f"redis+cluster://:{SENTINEL}@host:1?bogus={SENTINEL}"),
        lambda: RedisClusterStore(f"redis+cluster://:{SENTINEL}@h:1?max_connections={SENTINEL}"),
        lambda: RedisTier(f"redis+cluster://:{SENTINEL}@,h:1"),
    ):
        with pytest.raises((ValueError, TypeError)) as info:
            bad()
        assert_clean_exception(info.value)
    assert_clean_logs(caplog)


def test_real_cluster_workload_and_wrong_password_never_show_it(redis_cluster, caplog):
    """The cluster's own password (and a wrong one) never shows: reprs, logs, errors,
    through a master killed mid-workload."""
    caplog.set_level(logging.DEBUG)
    secret, url = redis_cluster.password, redis_cluster.url

    def clean(*things: object) -> None:
        for thing in things:
            for text in (repr(thing), str(thing)):
                assert secret not in text and WRONG not in text, text

    tiers = [CPUTier(2 * LAYOUT.bytes_per_block), RedisTier(url, timeout_s=0.3)]
    cache = KVCache(LAYOUT, 4, tiers=tiers)
    for i in range(8):
        if i == 4:
            redis_cluster.kill(1)
        cache.allocate(i, list(range(i * 10, i * 10 + 9)))
        cache.free(i)
    cache.flush()
    clean(cache, cache.tiers, cache.tier_stats(), *cache.tiers.levels)
    cache.close()
    pager = SyntheticPager(LAYOUT, 8, fingerprint="fp")
    pager.allocate("a", list(range(9)))
    pager.fill_random("a", torch.Generator().manual_seed(0))
    snaps = SnapshotStore(url)
    with pytest.raises(StoreUnavailable) as info:  # a master is down: the save says so
        snaps.save(pager, name="s")
    clean(snaps, snaps.location, info.value, "".join(traceback.format_exception(info.value)))
    snaps.close()
    # the cluster whole again: with a node down, the client may try the dead one first
    # and report the cluster unavailable before any node judges the password
    redis_cluster.restart(1)
    wrong = url.replace(secret, WRONG)
    from pagedkv.stores import RedisClusterStore

    with pytest.raises(StoreError, match="rejected the credentials") as info:
        RedisClusterStore(wrong).get_many(["k"])
    clean(info.value, "".join(traceback.format_exception(info.value)))
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    assert any("Redis Cluster master" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        text = formatter.format(record)
        assert secret not in text and WRONG not in text, text
