"""Benchmark plots: PNG files drawn on matplotlib's Agg canvas (no pyplot, no display).

Each benchmark has a ``plot(result) -> Figure`` that draws its JSON result, and calls
:func:`write` to save it next to the JSON files it wrote (``--plot``, the default;
``--no-plot`` skips it). ``--replot RESULT.json`` redraws a saved result without running
anything (e.g. a GPU run's JSON, plotted on a machine that has matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pagedkv._extras import MissingDependencyError, require

RAW = "#8c8c8c"  # raw / peer ceilings are grey; pagedkv's own series are coloured
LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.3}
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def add_plot_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--plot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write a PNG next to the JSON result (default: on)",
    )
    ap.add_argument(
        "--replot",
        type=Path,
        metavar="RESULT.json",
        help="only draw the PNG of a saved result (written next to it), run nothing",
    )


def figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (7.0, 4.5), title=""):
    """A new figure and its axes (a flat list), constrained layout."""
    mfigure = require("matplotlib.figure", feature="benchmark plotting")
    fig = mfigure.Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    if title:
        fig.suptitle(title)
    return fig, axes


def load(result: dict[str, Any]) -> str:
    """``", load avg 4.7"`` for a title when the result recorded the machine's load."""
    avg = result.get("load_avg_1min")
    return "" if avg is None else f", load avg {avg:.1f}"


def bars(ax, groups: Sequence[str], series: dict[str, Sequence[float | None]], *,
         ylabel: str, log: bool = False, fmt: Callable[[float], str] = "{:.3g}".format,
         colors: dict[str, str] | None = None) -> None:  # fmt: skip
    """Grouped vertical bars: one group per label in ``groups``, one bar per series.

    A ``None`` value leaves its slot empty; every bar is annotated with ``fmt(value)``
    (standing up when there are many bars).
    """
    n = max(1, len(series))
    width = 0.8 / n
    crowded = n * len(groups) > 24  # labels would overlap side by side: stand them up
    for i, (name, values) in enumerate(series.items()):
        color = (colors or {}).get(name, COLORS[i % len(COLORS)])
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        pts = [(x, v) for x, v in zip(xs, values) if v is not None]
        if not pts:
            continue
        drawn = ax.bar([x for x, _ in pts], [v for _, v in pts], width, label=name, color=color)
        ax.bar_label(drawn, labels=[fmt(v) for _, v in pts], fontsize=7, padding=1,
                     rotation=90 if crowded else 0, bbox=LABEL_BOX)  # fmt: skip
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.margins(y=0.25 if crowded else 0.15)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def write(fig, json_paths: Sequence[Path | str]) -> list[Path]:
    """Save ``fig`` as PNG next to each JSON path (same name, ``.png``); return the paths."""
    out = []
    for p in json_paths:
        png = Path(p).with_suffix(".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=110)
        out.append(png)
    return out


def plot_result(plot: Callable[[dict[str, Any]], Any], result: dict[str, Any],
                json_paths: Sequence[Path | str]) -> list[Path]:  # fmt: skip
    """Draw and save ``result``; without matplotlib (or rows to draw) say so and go on:
    the JSON is written already, a missing picture must not fail the run."""
    try:
        fig = plot(result)
    except (MissingDependencyError, ValueError) as e:
        print(f"no plot: {e}", file=sys.stderr)
        return []
    pngs = write(fig, json_paths)
    for png in pngs:
        print(f"wrote {png}")
    return pngs


def replot(plot: Callable[[dict[str, Any]], Any], path: Path) -> int:
    """``--replot``: draw the PNG of the saved result at ``path``; exit status."""
    result = json.loads(Path(path).read_text())
    return 0 if plot_result(plot, result, [path]) else 1
