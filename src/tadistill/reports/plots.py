"""Study figures: score against size, score against latency, and training curves; one PNG per figure.

Figures are drawn with matplotlib's object API on an Agg canvas: no pyplot, so no global figure state,
no GUI backend and nothing shown; the backend of a user's session is left alone. matplotlib is
imported when a figure is drawn, so ``import tadistill.reports`` stays cheap for the CLI.

Cells are the dicts described in ``tables.study_table`` (``method``, ``student``, ``params``, metric
keys, ``error``). A cell without a finite value on either axis, or with an error, is left out of the
figure rather than failing it: a study with one crashed cell still gets its plots.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from tadistill.errors import RunDirError
from tadistill.fileio import atomic_open

DPI = 120
TEACHER = "teacher"


def new_figure(size: tuple[float, float] = (6.4, 4.4)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot(1, 1, 1)


def save_figure(figure, path: str | Path) -> Path:
    """Tight layout, PNG at DPI, written atomically (a crash leaves the old file, not half an image)."""
    path = Path(path)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _points(cells: list[dict], x_key: str, y_key: str, x_scale: float) -> dict[str, list[tuple[float, float, str]]]:
    """{method: [(x, y, student label)]} of the cells that have both values and no error."""
    series: dict[str, list[tuple[float, float, str]]] = {}
    for cell in cells:
        x, y = _finite(cell.get(x_key)), _finite(cell.get(y_key))
        if cell.get("error") or x is None or y is None:
            continue
        method = str(cell.get("method", "?"))
        series.setdefault(method, []).append((x * x_scale, y, str(cell.get("student", ""))))
    return series


def _scatter(cells: list[dict], metric: str, path, x_key: str, x_scale: float, xlabel: str, title: str) -> Path:
    figure, ax = new_figure()
    series = _points(cells, x_key, metric, x_scale)
    for method, points in series.items():
        xs, ys, labels = zip(*sorted(points))
        if method == TEACHER:
            ax.scatter(xs, ys, marker="*", s=220, color="black", label=method, zorder=3)
        else:
            # Lines join one method's student shapes in order of x: the size/score trade-off curve.
            ax.plot(xs, ys, marker="o", linestyle="-", label=method, zorder=2)
        for x, y, label in zip(xs, ys, labels):
            if label:
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if series:
        ax.legend(title="method", fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no cell has both {x_key!r} and {metric!r}", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return save_figure(figure, path)


def plot_score_vs_params(cells: list[dict], metric: str, path: str | Path) -> Path:
    """Scatter of ``metric`` against parameters (millions), one series per method, teacher as a star.

    Returns the written PNG path.
    """
    return _scatter(cells, metric, path, "params", 1e-6, "parameters (M)", f"{metric} vs. model size")


def plot_score_vs_latency(
    cells: list[dict], metric: str, path: str | Path, latency_key: str = "latency_b1_ms"
) -> Path:
    """Scatter of ``metric`` against ``latency_key`` (milliseconds per call), one series per method.

    Returns the written PNG path.
    """
    return _scatter(cells, metric, path, latency_key, 1.0, f"{latency_key} (ms)", f"{metric} vs. latency")


def plot_training_curves(
    curves: dict[str, list[tuple[int, float]]], path: str | Path, *, ylabel: str = "training loss"
) -> Path:
    """One line per entry of ``curves`` ({label: [(step, value)]}); empty curves are skipped.

    The y axis is logarithmic when every value is positive and they span more than a factor of 10
    (distillation losses fall by orders of magnitude early on). Returns the written PNG path.
    """
    figure, ax = new_figure()
    values = []
    for label, points in curves.items():
        points = [(s, v) for s, v in points if _finite(v) is not None]
        if not points:
            continue
        steps, ys = zip(*points)
        ax.plot(steps, ys, label=label, linewidth=1.2)
        values += ys
    if values:
        ax.legend(title="method", fontsize=8)
        if min(values) > 0 and max(values) / min(values) > 10:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no curve has values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} during distillation")
    ax.grid(True, alpha=0.3)
    return save_figure(figure, path)


def read_curve(metrics_jsonl: str | Path, key: str = "loss") -> list[tuple[int, float]]:
    """``[(step, value)]`` of ``key`` from a run's metrics.jsonl (or the run directory), sorted by step.

    Rows without ``key`` (evaluation rows for "loss", training rows for "eval/loss") are skipped. A
    step logged twice (a resumed run that replayed it) keeps its last value. A cut-off last line (a
    crash during the write) is ignored.

    Raises:
        RunDirError: no metrics file, or a malformed line other than the last.
    """
    path = Path(metrics_jsonl)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise RunDirError(f"no metrics log at {path}: pass a run directory or its metrics.jsonl")
    lines = [(number, line) for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if line.strip()]
    by_step: dict[int, float] = {}
    for i, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise RunDirError(f"{path} line {number} is not JSON: fix or remove that line") from None
        value = _finite(row.get(key)) if isinstance(row, dict) else None
        if value is not None and isinstance(row.get("step"), int):
            by_step[row["step"]] = value
    return sorted(by_step.items())
