"""Snapshots of a compressed cache: bit-exact into the same format, dequantized into an
unquantized cache of the same model, refused into another compressed format; a page
whose scales were corrupted is detected like one whose payload was."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pagedkv.cache import KVCache
from pagedkv.errors import SnapshotError
from pagedkv.snapshot import SnapshotStore
from pagedkv.snapshot.manifest import layout_dict, parse_manifest
from pagedkv.snapshot.store import page_key
from pagedkv.storage import KVLayout, convert_rows

BF16 = torch.bfloat16
LAYOUT = KVLayout(2, 2, 16, 4, BF16)
FP8 = LAYOUT.with_kv_dtype("fp8")
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state (unseeded draws included)."""
    torch.manual_seed(0)


def filled(layout: KVLayout, seed: int = 0) -> tuple[KVCache, dict]:
    """A cache with two sequences (one ends in a partly filled block) of random K/V; also
    the K/V written, per sequence: [L, 2, tokens, H, D] float32."""
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(layout, 32, model_fingerprint="tiny@1")
    written = {}
    for sid, n in (("a", 13), ("b", 8)):
        cache.allocate(sid, list(range(100 * len(written), 100 * len(written) + n)))
        slots = torch.tensor(cache.slot_mapping(sid))
        per_layer = []
        for layer in range(2):
            k, v = (torch.randn(n, 2, 16, generator=g).to(BF16) for _ in range(2))
            cache.write(layer, slots, k, v)
            per_layer.append(torch.stack([k, v]).float())
        written[sid] = torch.stack(per_layer)
    return cache, written


def state(cache: KVCache) -> tuple:
    scales = cache.pool.scales
    ids = sorted(map(str, cache.seq_ids()))
    return (
        ids,
        cache.num_free_blocks,
        cache.pool.kv.clone(),
        None if scales is None else scales.clone(),
    )


def same_state(a: tuple, b: tuple) -> bool:
    return a[:2] == b[:2] and torch.equal(a[2], b[2]) and (
        a[3] is None if b[3] is None else torch.equal(a[3], b[3]))  # fmt: skip


def test_fp8_snapshot_into_an_fp8_cache_is_bit_exact(tmp_path):
    src, _ = filled(FP8)
    with SnapshotStore(tmp_path) as store:
        store.save(src, name="kv")
        m = store.manifest("kv")
        assert m.layout["kv_dtype"] == "float8_e4m3fn"
        assert m.layout["bytes_per_block"] == FP8.bytes_per_block
        dst = KVCache(FP8, 32, model_fingerprint="tiny@1")
        mapping = store.load(dst, "kv")
        for old, new in mapping.items():
            # bytes and scales of every block (the fresh pools hold zeros past the fills)
            a = src.read_blocks(src.block_table(old))
            b = dst.read_blocks(dst.block_table(new))
            assert torch.equal(a, b)
        dst.check_integrity()


def test_fp8_snapshot_into_a_bf16_cache_is_dequantized(tmp_path):
    """Pages are dequantized once (float32, rounded to bf16): the restored values are those
    of convert_rows, within the fp8 bound of what was written."""
    src, written = filled(FP8, seed=1)
    with SnapshotStore(tmp_path) as store:
        store.save(src, name="kv")
        dst = KVCache(LAYOUT, 32, model_fingerprint="tiny@1")
        mapping = store.load(dst, "kv")
        for old, new in mapping.items():
            expect = convert_rows(src.read_blocks(src.block_table(old)), FP8, LAYOUT)
            got = dst.read_blocks(dst.block_table(new))
            n = src.num_tokens(old)
            # the last block's slots past its fill are zero in the snapshot, not in src
            live = torch.arange(len(src.block_table(old)) * 4) < n
            e = expect.view(BF16).view(-1, 2, 2, 4, 2, 16).float()
            g = got.view(BF16).view(-1, 2, 2, 4, 2, 16).float()
            e, g = (t.permute(1, 2, 0, 3, 4, 5).flatten(2, 3) for t in (e, g))
            assert torch.equal(e[:, :, live], g[:, :, live])
            x = written[old]
            amax = x.abs().amax(dim=(2, 4), keepdim=True)  # loose: the max over the sequence
            assert bool(((g[:, :, live] - x).abs() <= amax * (2.0**-4 + 2.0**-8)).all())
        dst.check_integrity()
        # the other way: an unquantized snapshot never loads into a compressed cache
        store.save(dst, name="wide")
        fp8 = KVCache(FP8, 32, model_fingerprint="tiny@1")
        before = state(fp8)
        with pytest.raises(SnapshotError, match="does not load into a float8_e4m3fn cache"):
            store.load(fp8, "wide")
        assert same_state(state(fp8), before)


def test_refused_format_pairs_change_nothing(tmp_path):
    src, _ = filled(FP8, seed=2)
    with SnapshotStore(tmp_path) as store:
        store.save(src, name="kv")
        int8 = KVCache(LAYOUT.with_kv_dtype("int8"), 32, model_fingerprint="tiny@1")
        int8.allocate("mine", list(range(9)))
        before = state(int8)
        with pytest.raises(SnapshotError, match="not into int8, which would round it twice"):
            store.load(int8, "kv")
        assert same_state(state(int8), before)
        other = KVCache(LAYOUT, 32, model_fingerprint="tiny@2")  # another model: refused
        with pytest.raises(SnapshotError, match="fingerprint"):
            store.load(other, "kv")
        assert other.seq_ids() == []


@pytest.mark.parametrize("where", ["payload", "scale"])
def test_a_corrupted_scale_is_detected_like_a_corrupted_payload(tmp_path, where):
    src, _ = filled(FP8, seed=3)
    with SnapshotStore(tmp_path) as store:
        store.save(src, name="kv")
        digest = store.manifest("kv").sequences[0].pages[0]
        (value,) = store.backend.get_many([page_key(digest)])
        bad = bytearray(value)
        at = FP8.payload_bytes // 3 if where == "payload" else FP8.payload_bytes + 6
        bad[at] ^= 0x01  # one bit: a scale 2**-22 off, a payload element one grid step
        store.backend.put_many([(page_key(digest), bytes(bad))])
        report = store.verify("kv")
        assert report.corrupt == [digest]
        dst = KVCache(FP8, 32, model_fingerprint="tiny@1")
        before = state(dst)
        with pytest.raises(SnapshotError, match="damaged"):
            store.load(dst, "kv")
        assert same_state(state(dst), before)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ({"kv_dtype": "float4"}, "kv_dtype"),
        ({"bytes_per_block": 1 << 10}, "bytes_per_block"),
        ({"kv_dtype": None}, "bytes_per_block"),
    ],  # fmt: skip
)
def test_manifest_layout_of_a_compressed_cache_is_checked(tmp_path, edit, words):
    """A compressed layout edited by hand (checksum and all) is refused, naming the field."""
    src, _ = filled(FP8)
    with SnapshotStore(tmp_path) as store:
        store.save(src, name="kv")
        m = store.manifest("kv")
        assert "kv_dtype" not in layout_dict(LAYOUT)  # unquantized manifests are unchanged
        lay = {**m.layout, **edit}
        lay = {k: v for k, v in lay.items() if v is not None}
        doc = dataclasses.replace(m, layout=lay).encode()
        with pytest.raises(SnapshotError, match=words):
            parse_manifest(doc)
        assert parse_manifest(m.encode()).layout == m.layout
