"""Fuzzing manifests, leases and gc markers (hypothesis): whatever bytes a store holds,

- reading one snapshot either loads it correctly or raises ``SnapshotError`` (a
  mismatch or damage; ``OutOfBlocks`` if it does not fit), and a failed load leaves the
  target ``KVCache`` exactly as it was (block tables, free blocks, KV bytes, integrity);
- ``list``/``catalogue``/``verify``/``gc`` never raise on a damaged entry, report it,
  and a gc that meets one deletes no page;
- a damaged lease or marker never breaks (nor stalls) a save, fork or gc, and the next
  gc removes it.

Documents are arbitrary bytes, arbitrary JSON, and edits of a real manifest / lease
(replace, delete, insert or nudge any field, then re-sign the checksum so the schema
checks are what stands in the way, or not).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import socket
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pagedkv.cache import KVCache
from pagedkv.errors import OutOfBlocks, SnapshotError
from pagedkv.snapshot import SnapshotStore
from pagedkv.snapshot.leases import Lease, parse_lease
from pagedkv.snapshot.manifest import _checksum
from pagedkv.snapshot.store import MANIFEST_PREFIX, page_key
from pagedkv.storage import KVLayout

LAYOUT = KVLayout(num_layers=1, num_kv_heads=2, head_dim=4, block_size=4, dtype=torch.float16)
FUZZ = "fuzz"
_SETTINGS = dict(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=10,
)
HOSTILE = st.sampled_from(
    [
        10**19,
        10**20,
        -(10**21),
        10**400,
        2**63,
        -1,
        0,
        True,
        1e308,
        1e-320,
        -0.0,
        "",
        "\n",
        "\ud800",
    ]
)


def _write_kv(cache: KVCache, seq_id, gen: torch.Generator) -> None:
    slots = torch.tensor(cache.slot_mapping(seq_id), dtype=torch.long)
    for layer in range(LAYOUT.num_layers):
        k, v = (torch.randn(len(slots), 2, 4, generator=gen).half() for _ in range(2))
        cache.write(layer, slots, k, v)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One store with snapshot ``good`` (of a real KVCache), and a target cache."""
    gen = torch.Generator().manual_seed(0)
    src = KVCache(LAYOUT, 32, model_fingerprint="tiny@1")
    for sid, tokens, salt in [("a", range(10), None), (7, range(40, 45), "tenant")]:
        src.allocate(sid, list(tokens), salt=salt)
        _write_kv(src, sid, gen)
    # grace 0: a lease or marker from "another host" is never live, so no fuzzed marker
    # can make a save wait for a gc that does not exist
    store = SnapshotStore(tmp_path_factory.mktemp("fuzz") / "store", grace_seconds=0.0)
    store.save(src, name="good", metadata={"user": "ada"})
    dst = KVCache(LAYOUT, 12, model_fingerprint="tiny@1")
    dst.allocate("resident", list(range(100, 109)))
    _write_kv(dst, "resident", gen)
    # the document edits start from: "good", as if saved under the fuzzed name
    base = json.loads(store.backend.get_many([MANIFEST_PREFIX + "good"])[0])
    base = {k: v for k, v in base.items() if k != "checksum"} | {"name": FUZZ}
    base["checksum"] = _checksum(base)
    lease = Lease("snap.l.fuzz.000000", "good", 1000.0, "elsewhere.invalid", 4242, [])
    yield SimpleNamespace(
        store=store, src=src, dst=dst, base=base, lease=json.loads(lease.encode())
    )
    store.close()


# -- documents ------------------------------------------------------------------------


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _nudge(value, draw):
    if isinstance(value, bool) or value is None:
        return draw(st.sampled_from([0, 1, not value, "true"]))
    if isinstance(value, int):
        as_float = float(value) if abs(value) < 2**1000 else math.inf
        return draw(st.sampled_from([value + 1, value - 1, -value, value * 2**40, as_float]))
    if isinstance(value, float):
        return draw(st.sampled_from([math.inf, -math.inf, math.nan, value * 1e300, -value]))
    if isinstance(value, str):
        return draw(st.sampled_from([value + "\n", value.upper(), value[:-1], " " + value]))
    return draw(JSON)


@st.composite
def edits(draw, base: dict, resign: bool) -> bytes:
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        *head, last = draw(st.sampled_from(paths))
        parent = doc
        for step in head:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "hostile", "delete", "nudge", "insert"]))
        if action == "replace":
            parent[last] = draw(JSON)
        elif action == "hostile":
            parent[last] = draw(HOSTILE)
        elif action == "delete":
            del parent[last]
        elif action == "nudge":
            parent[last] = _nudge(parent[last], draw)
        elif isinstance(parent[last], dict):
            parent[last][draw(st.text(max_size=6))] = draw(JSON)
        elif isinstance(parent[last], list):
            parent[last].insert(draw(st.integers(0, len(parent[last]))), draw(JSON))
    if resign and isinstance(doc, dict):
        body = {k: v for k, v in doc.items() if k != "checksum"}
        with contextlib.suppress(ValueError):  # an int too long for str(): left unsigned
            doc = {**body, "checksum": _checksum(body)}
    try:
        return json.dumps(doc).encode("utf-8", "surrogatepass")
    except ValueError:  # an int too long for str(): write it as the text it would be
        return b'{"format":"pagedkv.snapshot","version":1,"created":' + b"9" * 5000 + b"}"


FINITE_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**62), 2**62)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3)
    ),
    max_leaves=8,
)


_BENIGN = ["metadata", "created", "model", "drop", "swap", "id", "salt", "tokens"]
_BENIGN += ["copies", "fingerprint"]


@st.composite
def benign_edits(draw, base: dict) -> bytes:
    """Re-signed edits that keep the manifest valid (mostly): the loads that succeed."""
    doc = copy.deepcopy(base)
    seqs = doc["sequences"]
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(_BENIGN))
        s = seqs[draw(st.integers(0, len(seqs) - 1))] if seqs else None
        if what == "metadata":
            doc["metadata"] = draw(st.dictionaries(st.text(max_size=6), FINITE_JSON, max_size=3))
        elif what == "created":
            doc["created"] = draw(st.floats(0, 4e9))
        elif what == "model":
            doc["model"] = draw(st.none() | st.text(max_size=10))
        elif what == "drop" and seqs:
            seqs.remove(s)
        elif what == "swap":
            seqs.reverse()
        elif what == "id" and s:
            s["seq_id"] = draw(st.integers(-(2**63) + 1, 2**63 - 1) | st.text(max_size=10))
        elif what == "salt" and s:
            s["salt"] = draw(
                st.none()
                | st.builds(lambda v: {"type": "str", "value": v}, st.text(max_size=5))
                | st.builds(lambda v: {"type": "bytes", "value": v.hex()}, st.binary(max_size=5))
                | st.builds(
                    lambda v: {"type": "int", "value": v}, st.integers(-(2**63) + 1, 2**63 - 1)
                )
            )
        elif what == "tokens" and s:
            s["token_ids"] = [draw(st.integers(0, 2**32 - 1)) for _ in s["token_ids"]]
        elif what == "copies" and s:  # enough of them and the target runs out of blocks
            for i in range(draw(st.integers(1, 12))):
                seqs.append({**s, "seq_id": f"copy-{i}"})
        elif what == "fingerprint":  # a valid manifest of another model: refused
            doc["fingerprint"] = draw(st.text(max_size=10))
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return json.dumps({**body, "checksum": _checksum(body)}).encode("utf-8", "surrogatepass")


@st.composite
def byte_damage(draw, base: dict) -> bytes:
    raw = bytearray(json.dumps(base).encode())
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(raw) - 1))
        kind = draw(st.sampled_from(["flip", "cut", "insert"]))
        if kind == "flip":
            raw[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del raw[i:]
            if not raw:
                break
        else:
            raw[i:i] = draw(st.binary(min_size=1, max_size=6))
    return bytes(raw)


def documents(base: dict, *, manifest: bool) -> st.SearchStrategy[bytes]:
    nest = st.integers(20, 50_000).map(lambda d: b"[" * d + b"]" * d)
    return st.one_of(
        st.binary(max_size=64),
        JSON.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")),
        nest,
        byte_damage(base),
        edits(base, resign=False),
        edits(base, resign=True),
        *([benign_edits(base)] * 3 if manifest else [edits(base, resign=False)]),
    )


# -- properties -------------------------------------------------------------------------


def _state(cache: KVCache) -> dict:
    return {
        "seqs": {
            s: (cache.token_ids(s), cache.block_table(s), cache.salt(s)) for s in cache.seq_ids()
        },
        "free": cache.num_free_blocks,
        "stats": cache.stats(),
        "kv": cache.pool.kv.clone(),
        "live_kv": _live_kv(cache),
    }


def _live_kv(cache: KVCache) -> torch.Tensor:
    """The KV bytes of every live sequence's blocks, in sequence order."""
    blocks = [b for s in cache.seq_ids() for b in cache.block_table(s)]
    return cache.read_blocks(blocks).clone()


def _same(a: dict, b: dict) -> bool:
    plain = [k for k in a if "kv" not in k]
    return [a[k] for k in plain] == [b[k] for k in plain] and torch.equal(a["kv"], b["kv"])


def _check_restored(world, manifest, mapping) -> None:
    """Each restored sequence holds the tokens, salt and page bytes the manifest names."""
    dst, bs = world.dst, LAYOUT.block_size
    by_id = {s.seq_id: s for s in manifest.sequences}
    for old, new in mapping.items():
        entry = by_id[old]
        assert dst.token_ids(new) == entry.token_ids and dst.salt(new) == entry.salt
        rows = dst.read_blocks(dst.block_table(new)).clone()
        fill = entry.last_page_fill
        rows[-1].view(2 * LAYOUT.num_layers, bs, -1)[:, fill:] = 0  # stored tails are zero
        pages = world.store.backend.get_many([page_key(d) for d in entry.pages])
        assert [bytes(r.numpy()) for r in rows] == pages, f"KV of {old!r} differs"


def _manifest_property(world, raw: bytes) -> None:
    store, dst = world.store, world.dst
    store.backend.put_many([(MANIFEST_PREFIX + FUZZ, raw)])
    try:
        try:
            manifest = store.manifest(FUZZ)
        except SnapshotError:
            manifest = None
        cat = store.catalogue()
        assert [i.name for i in store.list()] == [i.name for i in cat.snapshots]
        good = {i.name for i in cat.snapshots}
        damaged = {d.name for d in cat.damaged}
        assert good | damaged == set(store.names()) and not good & damaged
        assert "good" in good and FUZZ in good | damaged
        assert (FUZZ in good) == (manifest is not None)
        report = store.verify(FUZZ)
        assert report.ok or manifest is None or report.missing or report.corrupt
        assert manifest is not None or (not report.ok and report.error)

        before = _state(dst)
        try:
            mapping = store.load(dst, FUZZ)
        except (SnapshotError, OutOfBlocks) as e:
            event(f"load refused: {type(e).__name__}, manifest {'ok' if manifest else 'damaged'}")
            after = _state(dst)
            if isinstance(e, OutOfBlocks):
                # rolled back midway: as after any free(), the restored blocks stay in the
                # prefix cache (valid KV, evictable); every sequence and its KV is as it was
                assert after["seqs"] == before["seqs"] and after["free"] == before["free"]
                assert torch.equal(_live_kv(dst), before["live_kv"])
            else:  # refused before anything was allocated: nothing at all changed
                assert _same(after, before), "a failed load changed the cache"
        else:
            event("load succeeded")
            assert manifest is not None
            _check_restored(world, manifest, mapping)
            for new in mapping.values():
                dst.free(new)
        dst.check_integrity()

        gc = store.gc()
        assert gc.blocked == (manifest is None)
        if manifest is None:
            assert gc.pages_deleted == 0
        assert store.verify("good").ok
        assert store.verify(FUZZ).ok == report.ok  # gc took nothing a readable manifest needs
    finally:
        store.backend.delete_many([MANIFEST_PREFIX + FUZZ])


def _lease_property(world, key: str, raw: bytes) -> None:
    store = world.store
    store.backend.put_many([(key, raw)])
    try:
        lease = parse_lease(raw)
    except SnapshotError:
        lease = None
    try:
        store.save(world.src, ["a"], name="saved", overwrite=True)  # neither raises nor waits
        store.fork("saved", "forked", overwrite=True)
        gc = store.gc()
        assert not gc.blocked and list(store.backend.keys(key)) == []  # stale/damaged: removed
        assert gc.leases_removed >= 1 and (lease is None or lease.host != socket.gethostname())
        for name in ("good", "saved", "forked"):
            assert store.verify(name).ok, name
    finally:
        store.backend.delete_many([key, MANIFEST_PREFIX + "saved", MANIFEST_PREFIX + "forked"])


@settings(max_examples=120, **_SETTINGS)
@given(data=st.data())
def test_fuzzed_manifests(world, data):
    _manifest_property(world, data.draw(documents(world.base, manifest=True)))


@settings(max_examples=80, **_SETTINGS)
@given(data=st.data(), key=st.sampled_from(["snap.l.fuzz.000000", "snap.g.fuzz"]))
def test_fuzzed_leases_and_markers(world, data, key):
    _lease_property(world, key, data.draw(documents(world.lease, manifest=False)))


@pytest.mark.slow
@settings(max_examples=1500, **_SETTINGS)
@given(data=st.data())
def test_fuzzed_manifests_many(world, data):
    _manifest_property(world, data.draw(documents(world.base, manifest=True)))


@pytest.mark.slow
@settings(max_examples=600, **_SETTINGS)
@given(data=st.data(), key=st.sampled_from(["snap.l.fuzz.000000", "snap.g.fuzz"]))
def test_fuzzed_leases_and_markers_many(world, data, key):
    _lease_property(world, key, data.draw(documents(world.lease, manifest=False)))
