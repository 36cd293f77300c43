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

from tadistill.errors import RunDirError
from tadistill.fileio import atomic_write_text
from tadistill.reports.plots import plot_score_vs_latency, plot_score_vs_params, plot_training_curves, read_curve
from tadistill.reports.tables import study_table, write_results

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


def _cell_rows(out: Path) -> list[dict[str, Any]]:
    study = yaml.safe_load((out / "study.yaml").read_text(encoding="utf-8"))
    rows = []
    for method in study["methods"]:
        for shape in study["students"]:
            label = f"{shape['layers']}x{shape['hidden'] or 'T'}" + (f"x{shape['heads']}" if shape["heads"] else "")
            name = f"{method['name']}_{label}"
            status_file = out / "cells" / name / "status.json"
            status = json.loads(status_file.read_text(encoding="utf-8")) if status_file.is_file() else {"state": "new"}
            row: dict[str, Any] = {"model": name, "method": method["name"], "student": label}
            if status["state"] == "evaluated":
                row.update({k: v for k, v in status["results"].items() if k not in ("model", "path")})
            elif status["state"] == "failed":
                row["error"] = status["error"]
            else:
                row["error"] = f"not finished ({status['state']}): run compare again with --resume"
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
    if not (out / "study.yaml").is_file():
        raise RunDirError(f"{out} holds no study (no study.yaml): give the --out folder of tadistill compare")
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    cells = _cell_rows(out)
    teacher_file = report / "teacher.json"
    teacher = json.loads(teacher_file.read_text(encoding="utf-8")) if teacher_file.is_file() else None
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
    curves = {}
    for cell in cells:
        metrics = out / "cells" / cell["model"] / "metrics.jsonl"
        if metrics.is_file():
            curves[cell["model"]] = read_curve(metrics, "loss")
    plot_training_curves(curves, report / "training_curves.png")

    configs = report / "configs"
    configs.mkdir(exist_ok=True)
    for cell in cells:
        config = out / "cells" / cell["model"] / "config.yaml"
        if config.is_file():
            shutil.copy2(config, configs / f"{cell['model']}.yaml")
    return report
