"""What training added, and which differences exceed the training noise (house style rule 15).

Rows are the flat result dicts of ``tables`` (``model``, ``method``, ``student``, metric keys). Three
quantities, all pure functions of the rows:

- the training noise of a metric: the spread of one cell's score over training seeds. Several replicated
  cells are pooled: sigma^2 = sum_i sum_j (x_ij - mean_i)^2 / sum_i (n_i - 1), the usual pooled sample
  variance, with its degrees of freedom. It contains the evaluation seeds' noise as well (each replicate is
  evaluated again);
- a cell's gain over its initialisation row: score(cell) - score(init), the part of the score training
  added; marked when |gain| > 2 sigma (the initialisation is deterministic, so only the cell's own
  training noise enters);
- a cell's difference to the best cell of its student shape: marked when |difference| > 2 sqrt(2) sigma,
  two trained cells each carrying sigma (the difference of two independent draws has variance 2 sigma^2).

Two sigmas is a screen, not a test: with one or two degrees of freedom sigma itself is uncertain by a
factor of two or more, which the report says next to every mark. Metrics here are higher-is-better
(task scores, CKA, cosine); lower-is-better ones (perplexity, KL) are not ranked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

MARK = "*"  # a difference beyond the training noise
TWO_SIGMA = 2.0


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def training_noise(groups: Iterable[Sequence[dict]], metrics: Sequence[str]) -> dict[str, tuple[float, int]]:
    """Pooled sample standard deviation of each metric over groups of rows that differ only in the training seed.

    Returns {metric: (sigma, degrees of freedom)} for the metrics with at least one group of two values or
    more; a row without a finite value for a metric is left out of that metric.
    """
    groups = [list(g) for g in groups]
    out: dict[str, tuple[float, int]] = {}
    for metric in metrics:
        squares, dof = 0.0, 0
        for rows in groups:
            values = [v for v in (_number(r.get(metric)) for r in rows) if v is not None]
            if len(values) < 2:
                continue
            mean = sum(values) / len(values)
            squares += sum((v - mean) ** 2 for v in values)
            dof += len(values) - 1
        if dof:
            out[metric] = (math.sqrt(squares / dof), dof)
    return out


def beyond_noise(difference: float, sigma: float | None, *, both_trained: bool) -> bool | None:
    """Whether |difference| exceeds 2 sigma (one trained side) or 2 sqrt(2) sigma (two); None without sigma."""
    if sigma is None:
        return None
    bound = TWO_SIGMA * sigma * (math.sqrt(2.0) if both_trained else 1.0)
    return abs(difference) > bound


def gains_over_init(cells: Sequence[dict], inits: dict[str, dict], metrics: Sequence[str],
                    noise: dict[str, tuple[float, int]]) -> list[dict]:
    """Per cell, per metric: its score, its initialisation row's, the gain and whether it exceeds the noise.

    ``cells`` carry ``"init_row"``, the ``model`` name of their row in ``inits``. Returns one dict per cell:
    {"model", "method", "student", "init_row", metric: {"value", "init", "gain", "beyond_noise"}} with the
    metrics both rows have.
    """
    out = []
    for cell in cells:
        init = inits.get(cell.get("init_row") or "")
        entry: dict[str, Any] = {k: cell.get(k) for k in ("model", "method", "student", "init_row")}
        for metric in metrics:
            value, start = _number(cell.get(metric)), _number((init or {}).get(metric))
            if value is None or start is None:
                continue
            gain = value - start
            sigma = noise.get(metric, (None, 0))[0]
            entry[metric] = {"value": value, "init": start, "gain": gain,
                             "beyond_noise": beyond_noise(gain, sigma, both_trained=False)}
        out.append(entry)
    return out


def versus_best(cells: Sequence[dict], metric: str, noise: dict[str, tuple[float, int]]) -> dict[str, dict]:
    """Per student shape: each cell's difference to the shape's best cell on ``metric`` (higher is better).

    Returns {model: {"difference": score - best (0 for the best), "best": the best cell's model,
    "beyond_noise": bool or None}}; cells without a finite score are left out.
    """
    sigma = noise.get(metric, (None, 0))[0]
    by_shape: dict[str, list[tuple[str, float]]] = {}
    for cell in cells:
        value = _number(cell.get(metric))
        if value is not None:
            by_shape.setdefault(str(cell.get("student")), []).append((cell["model"], value))
    out: dict[str, dict] = {}
    for scored in by_shape.values():
        best_model, best = max(scored, key=lambda item: item[1])
        for model, value in scored:
            difference = value - best
            out[model] = {"difference": difference, "best": best_model,
                          "beyond_noise": beyond_noise(difference, sigma, both_trained=True)}
    return out


def signed(value: float, mark: bool | None, fmt: str = "+.4f") -> str:
    """A difference for a table: ``+0.0123``, with ``MARK`` appended when it exceeds the noise."""
    return format(value, fmt) + (MARK if mark else "")
