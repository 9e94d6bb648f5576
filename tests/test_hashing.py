"""Chained block hashes: formula, stability across processes, namespaces (salt, extra keys)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys

import pytest
import xxhash

from pagedkv import BlockManager
from pagedkv.manager import chain_hashes, namespace
from pagedkv.manager.hashing import ROOT, as_token_array, hash_function

TOKENS = [7, 0, 2**32 - 1, 12345, 99, 3, 3, 3, 1, 2, 65536, 4]  # 3 full blocks of 4 (+0)


def ref_namespace(salt=None, extra_keys=()) -> bytes:
    """Independent re-statement of the namespace format (pins it across versions)."""
    h = hashlib.sha256(b"pagedkv-ns-v1")
    for part in (salt, *extra_keys):
        if part is None:
            h.update(b"N")
        elif isinstance(part, bytes):
            h.update(b"B%d:" % len(part) + part)
        elif isinstance(part, str):
            h.update(b"S%d:" % len(part.encode()) + part.encode())
        else:
            h.update(b"I%d;" % part)
    return h.digest()[:16]


def ref_chain(tokens, bs, ns, digest) -> list[bytes]:
    """h_i = H(h_{i-1} || ns || little-endian uint32 tokens of block i), full blocks only."""
    out, parent = [], b"\x00" * 16
    for i in range(len(tokens) // bs):
        parent = digest(parent + ns + struct.pack(f"<{bs}I", *tokens[i * bs : (i + 1) * bs]))
        out.append(parent)
    return out


SHA = lambda b: hashlib.sha256(b).digest()
XXH = xxhash.xxh3_128_digest


@pytest.mark.parametrize("algo, digest", [("sha256", SHA), ("xxh3_128", XXH)])
@pytest.mark.parametrize("salt, extra", [(None, ()), ("tenant-a", ("model-v2",)), (7, (b"x", 3))])
def test_chain_formula(algo, digest, salt, extra):
    ns = namespace(salt, extra)
    assert ns == ref_namespace(salt, extra) and len(ns) == 16
    want = ref_chain(TOKENS + [5, 6], 4, ns, digest)  # the partial block is not hashed
    assert len(want) == 3
    assert chain_hashes(TOKENS + [5, 6], 4, ns, hash_function(algo)) == want
    m = BlockManager(16, 4, hash_algo=algo, extra_keys=extra)
    assert m.hash_blocks(TOKENS + [5, 6], salt=salt) == want
    m.allocate("s", TOKENS + [5, 6], salt=salt)
    assert m.block_hashes("s") == want
    m.append("s", [8, 9])  # fills block 3: its hash continues the chain
    assert m.block_hashes("s") == ref_chain(TOKENS + [5, 6, 8, 9], 4, ns, digest)
    assert len(want[0]) == (32 if algo == "sha256" else 16)


def test_root_and_packing():
    assert ROOT == b"\x00" * 16
    arr = as_token_array([1, 2**32 - 1])
    assert arr.tobytes() == struct.pack("<2I", 1, 2**32 - 1)
    assert as_token_array(arr) == arr and as_token_array((3,)).tolist() == [3]


def test_chain_depends_on_prefix_and_position():
    m = BlockManager(16, 2)
    a = m.hash_blocks([1, 2, 3, 4])
    b = m.hash_blocks([9, 9, 3, 4])
    c = m.hash_blocks([3, 4, 1, 2])
    assert a[0] != b[0] and a[1] != b[1]  # same block tokens, different parent
    assert a[1] != c[0] and a[0] != c[1]
    assert m.hash_blocks([1, 2, 3, 4, 5]) == a
    assert m.hash_blocks([1]) == []


def test_algorithms_differ_and_unknown_rejected():
    s = BlockManager(4, 4, hash_algo="sha256").hash_blocks(TOKENS)
    x = BlockManager(4, 4, hash_algo="xxh3_128").hash_blocks(TOKENS)
    assert s != x and len(set(s)) == 3 and len(set(x)) == 3
    with pytest.raises(ValueError, match="hash_algo"):
        BlockManager(4, 4, hash_algo="md5")
    with pytest.raises(ValueError, match="hash_algo"):
        hash_function("crc32")


_CHILD = """
import json, sys
from pagedkv import BlockManager
from pagedkv.manager import namespace
toks = json.loads(sys.argv[1])
out = {}
for algo in ("sha256", "xxh3_128"):
    for salt in (None, "t", 5, b"b"):
        m = BlockManager(8, 4, hash_algo=algo, extra_keys=("model", 1))
        out[f"{algo}/{salt!r}"] = [h.hex() for h in m.hash_blocks(toks, salt=salt)]
out["ns"] = namespace("t", ("model", 1)).hex()
print(json.dumps(out))
"""


def _hashes_here() -> dict:
    out = {}
    for algo in ("sha256", "xxh3_128"):
        for salt in (None, "t", 5, b"b"):
            m = BlockManager(8, 4, hash_algo=algo, extra_keys=("model", 1))
            out[f"{algo}/{salt!r}"] = [h.hex() for h in m.hash_blocks(TOKENS, salt=salt)]
    out["ns"] = namespace("t", ("model", 1)).hex()
    return out


def test_identical_across_processes():
    here = _hashes_here()
    for seed in ("0", "12345"):  # a different str-hash seed must not matter
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(TOKENS)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        assert json.loads(proc.stdout) == here
    assert len({tuple(v) for k, v in here.items() if k != "ns"}) == 8  # all distinct


def test_namespaces_are_distinct():
    salts = [None, "1", b"1", 1, 0, "", b"", "a", "A", -1]
    nss = [namespace(s) for s in salts]
    assert len(set(nss)) == len(salts)
    assert namespace("a", ("b",)) != namespace("ab") != namespace(None, ("ab",))
    assert namespace(None, ("k1",)) != namespace(None, ("k2",)) != namespace(None)
    assert namespace(None, (1, 2)) != namespace(None, (2, 1))


@pytest.mark.parametrize("bad", [True, False, 1.5, [1], ("a",), object()])
def test_bad_salt_type_rejected_regardless_of_history(bad):
    m = BlockManager(8, 4)
    # Warm the namespace cache with values equal to the bad salts (True == 1, False == 0).
    m.allocate("a", [1, 2, 3, 4, 5], salt=1)
    m.allocate("b", [1, 2, 3, 4, 5], salt=0)
    m.allocate("c", [1, 2, 3, 4, 5], salt="a")
    for call in (
        lambda: m.lookup([1, 2, 3, 4, 5], salt=bad),
        lambda: m.allocate("d", [1, 2, 3, 4, 5], salt=bad),
        lambda: m.hash_blocks([1, 2, 3, 4], salt=bad),
        lambda: m.pin([1, 2, 3, 4], salt=bad),
    ):
        with pytest.raises(TypeError, match="salt"):
            call()
    assert "d" not in m
    m.check_integrity()


def test_different_salts_never_share_blocks():
    m = BlockManager(64, 4)
    prompt = list(range(13))
    assert m.allocate("a", prompt, salt="t1") == 0
    assert m.allocate("b", prompt, salt="t2") == 0
    assert m.allocate("c", prompt) == 0
    assert m.allocate("d", prompt, salt=b"t1") == 0  # bytes and str salts differ
    assert m.allocate("e", prompt, salt="t1") == 12
    tables = [set(m.block_table(s)) for s in "abcd"]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not tables[i] & tables[j]
    assert m.block_table("e")[:3] == m.block_table("a")[:3]
    for s in "abcd":
        m.free(s)
    m.free("e")
    assert m.lookup(prompt, salt="t2") == 12 and m.lookup(prompt, salt="t3") == 0
    m.check_integrity()


def test_different_extra_keys_never_share():
    prompt = list(range(9))
    h1 = BlockManager(8, 4, extra_keys=("model-v1",)).hash_blocks(prompt)
    h2 = BlockManager(8, 4, extra_keys=("model-v2",)).hash_blocks(prompt)
    h0 = BlockManager(8, 4).hash_blocks(prompt)
    assert not set(h1) & set(h2) and not set(h0) & set(h1)
    assert BlockManager(8, 4, extra_keys=["model-v1"]).hash_blocks(prompt) == h1
    # Extra keys and salt are separate parts of the namespace.
    assert BlockManager(8, 4, extra_keys=("x",)).hash_blocks(prompt) != BlockManager(
        8, 4
    ).hash_blocks(prompt, salt="x")
