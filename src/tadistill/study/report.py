"""The study report: table (Markdown, CSV, JSON), PNG plots and every cell's resolved config.

``tadistill report DIR`` rebuilds it from the files a study left (cells/*/status.json with the
evaluation results, cells/*/metrics.jsonl, report/teacher.json), without training or evaluating.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tadistill.errors import RunDirError
from tadistill.fileio import atomic_write_text
from tadistill.reports.plots import plot_score_vs_latency, plot_score_vs_params, plot_training_curves, read_curve
from tadistill.reports.tables import study_table, write_results
from tadistill.study.config import StudentShape

STUDY_FILE = "study.yaml"  # as compare writes it (study/studydir.py)

# Columns of the study table besides the task metrics (the full rows are in results.csv / .json).
SUMMARY_KEYS = (
    "flops_per_token", "latency_b1_ms", "speedup_b1", "fidelity/final_cka", "fidelity/relation_kl",
    "fidelity/embedding_cosine", "fidelity/nn_overlap@10", "fidelity/output_kl", "intrinsic/mlm_perplexity",
    "intrinsic/perplexity",
)


# Why teacher latency / student latency equals the speedup column (evaluation/suite.py, latency.in_reference_time).
LATENCY_NOTE = (
    "\nLatency: median ms of one forward pass at batch 1. Each student was timed interleaved with the teacher "
    "(speedup_b1); its latency is the teacher row's latency divided by that speedup, so one measurement "
    "feeds both columns (the raw interleaved medians are in results.csv).\n"
)


def _read_study(out: Path) -> tuple[list[str], list[StudentShape]]:
    """Method names and student shapes of the study.yaml compare wrote into ``out`` (all the report needs, so
    an older study still reports); a damaged file is refused in one line."""
    path = out / STUDY_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        methods = [m["name"] for m in data["methods"]]
        shapes = [StudentShape.model_validate(shape) for shape in data["students"]]
        if not all(isinstance(name, str) for name in methods):
            raise TypeError("method names")
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError) as exc:  # ValueError: not UTF-8, pydantic
        why = "not a study config" if isinstance(exc, (ValidationError, KeyError, TypeError)) else type(exc).__name__
        raise RunDirError(f"{path} is damaged ({why}): run tadistill compare again with --out {out}") from None
    return methods, shapes


def _read_json(path: Path, what: str) -> dict[str, Any] | None:
    """A JSON object the study wrote, None when absent; a damaged file is refused in one line."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, not UTF-8
        raise RunDirError(f"{what} {path} is damaged ({type(exc).__name__}): delete it and run tadistill compare "
                          "--resume to write it again") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{what} {path} is damaged (not a JSON object): delete it and run tadistill compare "
                          "--resume to write it again")
    return data


def _cell_rows(out: Path) -> list[dict[str, Any]]:
    methods, shapes = _read_study(out)
    rows = []
    for method in methods:
        for shape in shapes:
            name = f"{method}_{shape.name}"
            status_file = out / "cells" / name / "status.json"
            status = _read_json(status_file, "cell status") or {"state": "new"}
            row: dict[str, Any] = {"model": name, "method": method, "student": shape.name}
            results = status.get("results")
            if status.get("state") == "evaluated" and isinstance(results, dict):
                row.update({k: v for k, v in results.items() if k not in ("model", "path")})
            elif status.get("state") == "failed":
                row["error"] = str(status.get("error"))
            else:
                row["error"] = f"not finished ({status.get('state')}): run compare again with --resume"
            rows.append(row)
    return rows


def headline_metrics(rows: list[dict]) -> list[str]:
    """The headline score of each task: its first metric key (``<task>/<metric>``), in first-seen order."""
    tasks: dict[str, str] = {}
    for row in rows:
        for key in row:
            task, slash, metric = key.partition("/")
            if slash and not metric.endswith("_std") and not task.startswith(("fidelity", "intrinsic")):
                tasks.setdefault(task, key)
    return list(tasks.values())


def build_report(out: str | Path) -> Path:
    out = Path(out)
    if not (out / STUDY_FILE).is_file():
        raise RunDirError(f"{out} holds no study (no {STUDY_FILE}): give the --out folder of tadistill compare")
    report = out / "report"
    if report.exists() and not report.is_dir():
        raise RunDirError(f"{report} is a file, where the study's report folder belongs: move it away")
    cells = _cell_rows(out)  # every file is read (and may be refused) before anything is written
    teacher = _read_json(report / "teacher.json", "teacher results")
    curves = {}
    for cell in cells:
        metrics = out / "cells" / cell["model"] / "metrics.jsonl"
        if metrics.is_file():
            curves[cell["model"]] = read_curve(metrics, "loss")
    report.mkdir(parents=True, exist_ok=True)
    teacher_row = [{**teacher, "model": "teacher", "method": "teacher", "student": "teacher"}] if teacher else []
    headlines = headline_metrics(cells + teacher_row)

    write_results(report, teacher_row + cells, headline=headlines)
    keys = ["params", *headlines, *SUMMARY_KEYS]
    table_rows = [{k: r.get(k) for k in ["method", "student", *keys, "error"] if k in r or k in ("method", "student")}
                  for r in teacher_row + cells]
    note = LATENCY_NOTE if any("latency_b1_ms" in r for r in table_rows) else ""
    atomic_write_text(report / "study.md", f"# Study: {out.name}\n\n{study_table(table_rows)}{note}\n")

    score = headlines[0] if headlines else "fidelity/final_cka"
    plot_rows = teacher_row + [c for c in cells if "error" not in c]
    plot_score_vs_params(plot_rows, score, report / "score_vs_params.png")
    plot_score_vs_latency(plot_rows, score, report / "score_vs_latency.png")
    plot_training_curves(curves, report / "training_curves.png")

    configs = report / "configs"
    configs.mkdir(exist_ok=True)
    for cell in cells:
        config = out / "cells" / cell["model"] / "config.yaml"
        if config.is_file():
            shutil.copy2(config, configs / f"{cell['model']}.yaml")
    return report
