"""Every benchmark draws its PNG: from a small real run on CPU, or (GPU benchmarks) from a
synthetic result through ``--replot``; the progress helper stays silent off a terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _plot  # noqa: E402
import _progress  # noqa: E402
import bench_attention  # noqa: E402
import bench_e2e  # noqa: E402
import bench_manager  # noqa: E402
import bench_offload  # noqa: E402
import bench_snapshot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_readable_png(path: Path, fig=None) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, f"{path}: not a drawn PNG"
    if fig is None:
        return
    assert fig._suptitle is not None and fig._suptitle.get_text()
    drawn = [ax for ax in fig.axes if ax.axison]
    assert drawn
    for ax in drawn:  # every panel says what it shows, in which unit; series are named
        assert ax.get_ylabel(), ax
        if len(ax.get_legend_handles_labels()[0]) > 1:
            assert ax.get_legend() is not None, ax.get_ylabel()
        assert ax.get_xlabel() or [t.get_text() for t in ax.get_xticklabels()], ax


def test_manager_run_writes_its_png_by_default(tmp_path, capsys):
    assert bench_manager.main(["--requests", "60", "--repeat", "1", "--out", str(tmp_path)]) == 0
    assert_readable_png(tmp_path / "bench_manager.png")
    result = json.loads((tmp_path / "bench_manager.json").read_text())
    assert_readable_png(_plot.write(bench_manager.plot(result), [tmp_path / "again.json"])[0],
                        bench_manager.plot(result))  # fmt: skip
    assert "wrote" in capsys.readouterr().out


def test_snapshot_run_writes_its_png(tmp_path):
    out = tmp_path / "bench_snapshot.json"
    args = ["--size-mb", "32", "--repeats", "1", "--dir", str(tmp_path / "disk"), "--out", str(out)]
    bench_snapshot.main(args)
    result = json.loads(out.read_text())
    fig = bench_snapshot.plot(result)
    assert_readable_png(out.with_suffix(".png"), fig)
    assert set(result["best_gbps"]) >= {"raw_write", "save", "raw_read", "load", "verify"}


def test_offload_run_writes_its_png(tmp_path):
    args = ["--device", "cpu", "--skip", "disk,redis,ttft", "--swap-blocks", "2,4",
            "--repeat", "1", "--out", str(tmp_path), "--quiet"]  # fmt: skip
    bench_offload.main(args)
    result = json.loads((tmp_path / "offload.json").read_text())
    assert [r["blocks"] for r in result["swap"]] == [2, 4]
    assert_readable_png(tmp_path / "offload.png", bench_offload.plot(result))


def test_offload_plot_has_a_panel_per_measured_tier(tmp_path):
    row = lambda n, keys: {"blocks": n, **{k: 1.0 + n / 64 for k in keys}}  # noqa: E731
    disk = ("tier_write_GBps", "tier_read_GBps", "raw_write_GBps", "raw_read_GBps")
    swap = ("swap_out_GBps", "swap_in_GBps", "raw_d2h_GBps", "raw_h2d_GBps")
    result = {"device": "cpu", "cpus": 2, "date": "2026-12-01", "bytes_per_block": 2 << 20,
              "swap": [row(n, swap) for n in (16, 64)], "disk": [row(n, disk) for n in (16, 64)],
              "redis": {"skipped": "redis-server is not on PATH"}}  # fmt: skip
    fig = bench_offload.plot(result)
    assert [ax.get_title() for ax in fig.axes] == [
        bench_offload.PANELS["swap"][0],
        bench_offload.PANELS["disk"][0],
    ]
    path = tmp_path / "offload.json"
    path.write_text(json.dumps(result))
    with pytest.raises(SystemExit) as exc:
        bench_offload.main(["--replot", str(path)])
    assert exc.value.code == 0
    assert_readable_png(path.with_suffix(".png"), fig)
    with pytest.raises(ValueError, match="no swap, disk or redis rows"):
        bench_offload.plot({**result, "swap": [], "disk": {"skipped": "x"}})


def _attention_result(with_flashinfer: bool) -> dict:
    rows = []
    for b, ctx, t in ((1, 512, 20e-6), (16, 4096, 100e-6), (64, 16384, 1.4e-3)):
        r = {"B": b, "L": ctx, "t_s": t * 1.2, "t_graph_s": t, "sdpa_s": t * 1.3,
             "frac_d2d": 0.8, "frac_d2d_graph": 0.9}  # fmt: skip
        if with_flashinfer:
            r.update(fi_best_s=t * 1.1, fi_best_graph_s=t * 1.02)
        rows.append(r)
    res = {"device": "NVIDIA H200 (synthetic)", "date": "2026-12-01", "configs": rows}
    if not with_flashinfer:
        res["flashinfer_error"] = "ModuleNotFoundError('flashinfer')"
    return res


@pytest.mark.parametrize("with_flashinfer", [True, False])
def test_attention_replot_from_a_saved_result(tmp_path, with_flashinfer):
    path = tmp_path / "bench_attention.json"
    result = _attention_result(with_flashinfer)
    path.write_text(json.dumps(result))
    with pytest.raises(SystemExit) as exc:
        bench_attention.main(["--replot", str(path)])  # no CUDA needed to draw it
    assert exc.value.code == 0
    fig = bench_attention.plot(result)
    assert_readable_png(path.with_suffix(".png"), fig)
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == (2 if with_flashinfer else 1)
    if with_flashinfer:  # the ratio panel draws the parity line at 1
        assert any(list(line.get_ydata()) == [1.0, 1.0] for line in panels[1].get_lines())


def test_e2e_replot_from_a_saved_result(tmp_path):
    result = {"device_name": "NVIDIA H200 (synthetic)", "date": "2026-12-01",
              "config": "smollm2", "shape": "smollm2", "params_M": 134.5, "dtype": "bf16",
              "requests": 256, "new_tokens": 128, "prefix": 1024, "unique": 32,
              "pk_a": {"tok_per_s": 30000.0}, "tf_a": {"tok_per_s": 800.0},
              "pk_b": {"tok_per_s": 13000.0}, "tf_b": {"tok_per_s": 600.0},
              "plain_b": {"tok_per_s": 650.0, "batch": 64},
              "ratio_a_pk_over_tf": 37.5, "ratio_b_pk_over_tf": 21.7}  # fmt: skip
    path = tmp_path / "bench_e2e_smollm2.json"
    path.write_text(json.dumps(result))
    with pytest.raises(SystemExit) as exc:
        bench_e2e.main(["--replot", str(path)])
    assert exc.value.code == 0
    fig = bench_e2e.plot(result)
    assert_readable_png(path.with_suffix(".png"), fig)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert "37.5x generate_batch" in labels[0] and "(b) unrelated" in labels[1]


def test_without_matplotlib_the_run_says_how_to_get_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = _attention_result(True)
    assert _plot.plot_result(bench_attention.plot, result, [tmp_path / "a.json"]) == []
    assert (
        'benchmark plotting needs matplotlib: pip install "pagedkv[bench]"'
        in capsys.readouterr().err
    )
    assert not (tmp_path / "a.png").exists()


def test_progress_is_silent_off_a_terminal_and_when_quiet(capsys):
    for quiet in (False, True):  # pytest's captured stdout is not a TTY
        with _progress.steps(3, "work", quiet=quiet) as bar:
            for _ in range(3):
                bar.done()
    assert capsys.readouterr().out == ""


def test_a_result_with_nothing_to_draw_is_reported_not_raised(tmp_path, capsys):
    empty = {"device": "x", "date": "2026-12-01", "configs": [{"B": 1, "L": 512, "error": "e"}]}
    assert _plot.plot_result(bench_attention.plot, empty, [tmp_path / "a.json"]) == []
    assert "no plot: no decode rows" in capsys.readouterr().err
