"""`pagedkv snapshot ls | show | verify | rm | gc` through typer's CliRunner."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from pagedkv.snapshot import SnapshotStore
from pagedkv.snapshot.cli import app
from pagedkv.snapshot.store import page_key
from pagedkv.storage.layout import KVLayout
from pagedkv.testing import SyntheticPager

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


def invoke(*args):
    result = CliRunner().invoke(app, list(args), terminal_width=200)
    # typer.Exit surfaces as SystemExit; anything else is an uncaught error (a traceback)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def test_damaged_manifests_are_one_line_each_never_a_traceback(store_dir):
    from pagedkv.snapshot.manifest import _checksum

    with SnapshotStore(store_dir) as s:
        s.backend.put_many([("snap.m.deep", b"[" * 100_000)])
        doc = json.loads(s.backend.get_many(["snap.m.base"])[0])
        body = {k: v for k, v in doc.items() if k != "checksum"} | {"name": "[/red]"}
        signed = json.dumps(body | {"checksum": _checksum(body)}).encode()
        s.backend.put_many([("snap.m.markup", signed)])
    code, out = invoke("ls", "--store", store_dir)
    assert code == 1 and "base" in out and "branch" in out  # the good ones are listed
    assert "DAMAGED deep: manifest of snapshot 'deep' nests 100000 levels" in out
    assert "DAMAGED markup:" in out and "'[/red]'" in out  # shown as text, not as markup
    assert "2 unreadable snapshot manifests" in out
    code, out = invoke("verify", "deep", "--store", store_dir)
    assert code == 1 and "FAILED deep" in out and "nests" in out
    code, out = invoke("show", "markup", "--store", store_dir)
    assert code == 1 and "error:" in out and "field 'name'" in out and "'[/red]'" in out
    code, out = invoke("gc", "--store", store_dir)
    assert code == 1 and "deleted 0 pages" in out and "deleted no page: 2 snapshot" in out
    code, out = invoke("gc", "--store", store_dir, "--drop-damaged")
    assert code == 0 and "dropped damaged snapshot deep" in out and "markup" in out
    code, out = invoke("ls", "--store", store_dir)
    assert code == 0 and "DAMAGED" not in out
    assert invoke("verify", "base", "--store", store_dir)[0] == 0


def test_commands_on_a_missing_or_unknown_store_create_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["ls"], ["show", "x"], ["verify", "x"], ["rm", "x"], ["gc"]):
        code, out = invoke(*args, "--store", "typo")
        assert code == 1 and "no snapshot store at" in out and "typo" in out, (args, out)
        code, out = invoke(*args, "--store", "redis+sentinel://h:7000")
        assert code == 1 and "unknown scheme 'redis+sentinel://'" in out, (args, out)
    assert os.listdir(tmp_path) == []
