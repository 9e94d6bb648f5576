"""`pagedkv snapshot ls | show | verify | rm | gc` through typer's CliRunner."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pagedkv.snapshot import SnapshotStore, SyntheticPager
from pagedkv.snapshot.cli import app
from pagedkv.snapshot.store import page_key
from pagedkv.storage.layout import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float16)


@pytest.fixture
def store_dir(tmp_path):
    gen = torch.Generator().manual_seed(0)
    pager = SyntheticPager(LAYOUT, 64, fingerprint="tiny-model@1")
    pager.allocate("chat", list(range(30)), salt="alice")
    pager.allocate(2, list(range(30)) + [7, 8, 9])
    pager.fill_random("chat", gen)
    pager.fill_random(2, gen)
    path = tmp_path / "snaps"
    with SnapshotStore(path) as s:
        s.save(pager, name="base", metadata={"user": "ada"})
        s.fork("base", "branch", seq_ids=[2])
    return str(path)


def run(*args, env=None):
    result = CliRunner().invoke(app, list(args), env=env, terminal_width=200)
    return result.exit_code, result.output


def test_ls_shows_sizes_dedup_and_sequences(store_dir):
    code, out = run("ls", "--store", store_dir)
    assert code == 0, out
    assert "base" in out and "branch" in out and "dedup" in out
    assert "2 snapshots, 17 pages, 8.5 KiB stored for 13.0 KiB" in out  # the salt: no sharing
    code, out2 = run("ls", env={"PAGEDKV_SNAPSHOT_STORE": store_dir})
    assert code == 0 and "branch" in out2


def test_show_text_and_json(store_dir):
    code, out = run("show", "base", "--store", store_dir)
    assert code == 0, out
    assert "tiny-model@1" in out and "'chat'" in out and "'alice'" in out and "ada" in out
    code, out = run("show", "branch", "--store", store_dir, "--json")
    doc = json.loads(out)
    assert doc["parent"] == "base" and [s["seq_id"] for s in doc["sequences"]] == [2]


def test_verify_ok_then_damaged(store_dir):
    code, out = run("verify", "base", "--store", store_dir)
    assert code == 0 and "ok" in out
    with SnapshotStore(store_dir) as s:
        digest = sorted(s.manifest("base").page_digests())[0]
        s.backend.put_many([(page_key(digest), b"garbage")])
    code, out = run("verify", "base", "--store", store_dir)
    assert code == 1 and "FAILED" in out and f"corrupt {digest}" in out


def test_rm_and_gc(store_dir):
    code, out = run("rm", "base", "--store", store_dir)
    assert code == 0, out
    code, out = run("gc", "--store", store_dir)
    assert code == 0 and "deleted 8 pages" in out  # chat's own pages: branch keeps the rest
    code, out = run("rm", "base", "--store", store_dir)
    assert code == 1 and "no snapshot named 'base'" in out
    code, out = run("show", "../etc", "--store", store_dir)
    assert code == 1 and "invalid snapshot name" in out
