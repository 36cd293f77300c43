"""Result tables: one row per model (or per study cell), written as JSON, CSV and Markdown.

A results row is a flat dict. Conventions of its keys:

- ``"model"``: the row's name; the teacher's row carries ``teacher_name`` (default ``"teacher"``).
- cost keys, no slash: ``params``, ``params_non_embedding``, ``flops_per_token``, ``size_bytes``,
  ``latency_b<B>_ms``, ``tokens_per_s_b<B>``, ``speedup_b<B>`` ... (see ``COST_PREFIXES``).
- task metrics, ``"<task>/<metric>"`` (``"stdlib-topic/accuracy"``, ``"sst2/accuracy"``): scores
  where higher is better; a spread over seeds is ``"<task>/<metric>_std"``.
- other measurements under a reserved prefix (``NON_TASK_PREFIXES``): ``"fidelity/final_cka"``,
  ``"intrinsic/mlm_perplexity"``; these compare a student with its teacher, or are lower-is-better,
  so they get no retention column.
- ``"error"``: the one-line error of a model or cell that failed.

Retention, the student's score as a percentage of the teacher's, is how distillation papers report
what was kept (DistilBERT, Sanh et al. 2019: "97% of BERT's performance").
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tadistill.errors import ConfigError, did_you_mean
from tadistill.fileio import atomic_write_text

# Cost columns come in this order, each prefix's keys in first-seen order.
COST_PREFIXES = ("params", "flops", "size", "latency", "tokens_per_s", "sequences_per_s", "speedup")
NON_TASK_PREFIXES = ("fidelity", "intrinsic", "eval", "loss", "train")
RETENTION_SUFFIX = " (% of teacher)"


def retention(student: float | None, teacher: float | None) -> float | None:
    """100 * student / teacher; None when either is missing or the teacher's score is 0 or not finite.

    A negative teacher score (Matthews correlation can be) gives a percentage of doubtful meaning but
    is returned as computed.
    """
    if student is None or teacher is None or teacher == 0 or not math.isfinite(teacher):
        return None
    return 100.0 * float(student) / float(teacher)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_task_metric(key: str) -> bool:
    prefix, slash, metric = key.partition("/")
    return bool(slash) and prefix not in NON_TASK_PREFIXES and not metric.endswith("_std")


def _first_seen(rows: Iterable[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return list(keys)


def order_columns(rows: list[dict]) -> list[str]:
    """Union of the rows' keys: model, descriptors, cost, task metrics, other metrics, error.

    Within each group the order is the order of first appearance, so it is stable for a given input.
    """
    keys = [k for k in _first_seen(rows) if k not in ("model", "error")]

    def cost_rank(key: str) -> int | None:
        return next((i for i, p in enumerate(COST_PREFIXES) if key.startswith(p)), None)

    plain = [k for k in keys if "/" not in k]
    cost = sorted((k for k in plain if cost_rank(k) is not None), key=cost_rank)  # sort is stable
    descriptors = [k for k in plain if cost_rank(k) is None]
    slashed = [k for k in keys if "/" in k]
    tasks = [k for k in slashed if k.partition("/")[0] not in NON_TASK_PREFIXES]
    others = [k for k in slashed if k.partition("/")[0] in NON_TASK_PREFIXES]
    tail = ["error"] if any("error" in r for r in rows) else []
    return ["model", *descriptors, *cost, *tasks, *others, *tail]


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, floatfmt)
    text = " ".join(str(value).split())  # a Markdown cell is one line
    return text.replace("|", "\\|")


def markdown_table(rows: list[dict], columns: list[str], *, floatfmt: str = ".4g") -> str:
    """A GitHub-flavoured Markdown table of ``rows`` restricted to ``columns`` (missing cells empty).

    Floats are formatted with ``floatfmt``, integers and strings as they are (``|`` escaped,
    newlines folded into spaces). Numeric columns are right-aligned.
    """
    if not columns:
        raise ValueError("markdown_table needs at least one column")
    numeric = [any(_is_number(r.get(c)) for r in rows) and all(r.get(c) is None or _is_number(r.get(c)) for r in rows)
               for c in columns]
    lines = [
        "| " + " | ".join(_cell(c, floatfmt) for c in columns) + " |",
        "|" + "|".join("---:" if num else ":---" for num in numeric) + "|",
    ]
    lines += ["| " + " | ".join(_cell(r.get(c), floatfmt) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    # json.dumps writes NaN / Infinity, which strict JSON readers reject: store them as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_rows(rows: list[dict]) -> None:
    if not rows:
        raise ConfigError("no result rows to write: evaluate at least one model first")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("model"), str):
            raise ConfigError(f"result row {i} has no string 'model' key: give every row a model name")


def _with_retention(rows: list[dict], columns: list[str], teacher: dict | None) -> tuple[list[dict], list[str]]:
    """Insert a "<metric> (% of teacher)" column after every task metric (teacher row: 100.0)."""
    if teacher is None:
        return rows, columns
    out_columns: list[str] = []
    for column in columns:
        out_columns.append(column)
        if _is_task_metric(column):
            out_columns.append(column + RETENTION_SUFFIX)
    out_rows = []
    for row in rows:
        extended = dict(row)
        for column in columns:
            if _is_task_metric(column):
                s, t = row.get(column), teacher.get(column)
                kept = retention(s, t) if _is_number(s) and _is_number(t) else None
                extended[column + RETENTION_SUFFIX] = None if kept is None else f"{kept:.1f}"
        out_rows.append(extended)
    return out_rows, out_columns


def write_results(
    folder: str | Path, rows: list[dict], *, teacher_name: str = "teacher", headline: list[str] | None = None
) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv`` and ``results.md`` into ``folder`` (atomically).

    - results.json: the rows as given (non-finite floats stored as null).
    - results.csv: one column per key of any row, in ``order_columns`` order; missing cells empty.
    - results.md: a Markdown table; ``headline`` picks its metric columns (all when None), and each
      task metric is followed by its retention column "(% of teacher)" computed against the row whose
      ``model`` is ``teacher_name`` (omitted, with a note, when there is no such row).

    Returns:
        ``{"json": path, "csv": path, "md": path}``.

    Raises:
        ConfigError: no rows, a row without a ``model`` name, or an unknown ``headline`` column.
    """
    _check_rows(rows)
    folder = Path(folder)
    columns = order_columns(rows)
    paths = {"json": folder / "results.json", "csv": folder / "results.csv", "md": folder / "results.md"}

    safe_rows = [{k: _json_safe(v) for k, v in r.items()} for r in rows]
    atomic_write_text(paths["json"], json.dumps(safe_rows, indent=2, default=str) + "\n")

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    # csv writes floats with repr(), so they parse back to the same value.
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    atomic_write_text(paths["csv"], buffer.getvalue())

    if headline is not None:
        for name in headline:
            if name not in columns:
                raise ConfigError(f"headline column {name!r} is in no result row{did_you_mean(name, columns)}: "
                                  "use one of the row keys")
        shown = ["model", *[h for h in headline if h != "model"]]
    else:
        shown = columns
    teacher = next((r for r in rows if r["model"] == teacher_name), None)
    md_rows, md_columns = _with_retention(rows, shown, teacher)
    text = "# Results\n\n" + markdown_table(md_rows, md_columns)
    if teacher is None and any(_is_task_metric(c) for c in shown):
        text += f"\nNo row named {teacher_name!r}: retention columns omitted.\n"
    atomic_write_text(paths["md"], text)
    return paths


def one_line(error: Any, limit: int = 200) -> str:
    """The first non-empty line of an error message, cut to ``limit`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__ if isinstance(error, BaseException) else "failed"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_params(params: Any) -> str | None:
    """Parameter count in millions, e.g. 22713216 -> "22.71M" (None stays None)."""
    return f"{params / 1e6:.2f}M" if _is_number(params) else None


def study_table(cells: list[dict]) -> str:
    """Markdown table of a study: one row per cell (method x student shape), grouped by method.

    A cell is a dict with ``"method"``, ``"student"`` (a shape label such as ``"L2xH128"``),
    optional ``"params"``, numeric metric keys, and ``"error"`` (a string) when the cell failed.
    Columns: method, student, params (in millions), then every numeric key of any cell in first-seen
    order, then ``status``: "ok", or "failed: <the error's first line>" (its metrics are left empty).
    Methods appear in first-seen order; cells keep their order within a method.
    """
    if not cells:
        raise ConfigError("the study has no cells: configure at least one method and one student")
    methods = list(dict.fromkeys(str(c.get("method", "")) for c in cells))
    ordered = sorted(cells, key=lambda c: methods.index(str(c.get("method", ""))))  # stable: keeps cell order
    skip = {"method", "student", "params", "error"}
    metrics = [k for k in _first_seen(cells) if k not in skip and any(_is_number(c.get(k)) for c in cells)]
    rows = []
    for cell in ordered:
        failed = bool(cell.get("error"))
        row = {"method": cell.get("method"), "student": cell.get("student"),
               "params": format_params(cell.get("params"))}
        row.update({m: (None if failed else cell.get(m)) for m in metrics})
        row["status"] = f"failed: {one_line(cell['error'])}" if failed else "ok"
        rows.append(row)
    return markdown_table(rows, ["method", "student", "params", *metrics, "status"])
