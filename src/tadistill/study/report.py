"""The study report: table (Markdown, CSV, JSON), what training added, PNG plots, every cell's resolved config.

``tadistill report DIR`` rebuilds it from the files a study left (cells/*/status.json with the
evaluation results, cells/*/metrics.jsonl, cells/init*/summary.json, report/teacher.json), without training
or evaluating.

Rows: the teacher; each student shape at its initialisation (``init`` rows, ``study/init_rows.py``); the
cells; the replicates trained with other seeds (``study.noise``). ``study.md`` then gives each cell's gain
over its initialisation row and, per student shape, each cell's difference to the best cell, marking the
differences that exceed the training noise measured by the replicates (``reports/gains.py``);
``gains.json`` holds the same numbers.
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
from tadistill.reports.gains import MARK, gains_over_init, signed, training_noise, versus_best
from tadistill.reports.plots import plot_score_vs_latency, plot_score_vs_params, plot_training_curves, read_curve
from tadistill.reports.tables import markdown_table, study_table, write_results
from tadistill.study.cells import INIT, replicate_name
from tadistill.study.config import NoiseSpec, StudentShape

STUDY_FILE = "study.yaml"  # as compare writes it (study/studydir.py)

# Columns of the study table besides the task metrics (the full rows are in results.csv / .json).
SUMMARY_KEYS = (
    "flops_per_token", "latency_b1_ms", "speedup_b1", "fidelity/final_cka", "fidelity/relation_kl",
    "fidelity/embedding_cosine", "fidelity/nn_overlap@10", "fidelity/output_kl", "intrinsic/mlm_perplexity",
    "intrinsic/perplexity",
)
# Higher-is-better fidelity metrics whose gain over initialisation the report gives beside the task scores.
GAIN_FIDELITY = ("fidelity/final_cka", "fidelity/embedding_cosine")


# Why teacher latency / student latency equals the speedup column (evaluation/suite.py, latency.in_reference_time).
LATENCY_NOTE = (
    "\nLatency: median ms of one forward pass at batch 1. Each student was timed interleaved with the teacher "
    "(speedup_b1); its latency is the teacher row's latency divided by that speedup, so one measurement "
    "feeds both columns (the raw interleaved medians are in results.csv).\n"
)


def _read_study(out: Path) -> tuple[list[str], list[StudentShape], NoiseSpec | None]:
    """Method names, student shapes and replicates of the study.yaml compare wrote into ``out`` (all the report
    needs, so an older study still reports); a damaged file is refused in one line."""
    path = out / STUDY_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        methods = [m["name"] for m in data["methods"]]
        shapes = [StudentShape.model_validate(shape) for shape in data["students"]]
        noise = NoiseSpec.model_validate(data["noise"]) if data.get("noise") else None
        if not all(isinstance(name, str) for name in methods):
            raise TypeError("method names")
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:  # ValueError: UTF-8
        why = ("not a study config" if isinstance(exc, (ValidationError, KeyError, TypeError, AttributeError))
               else type(exc).__name__)
        raise RunDirError(f"{path} is damaged ({why}): run tadistill compare again with --out {out}") from None
    return methods, shapes, noise


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


def _status_row(out: Path, name: str, method: str, shape: str, **extra: Any) -> dict[str, Any]:
    status_file = out / "cells" / name / "status.json"
    status = _read_json(status_file, "cell status") or {"state": "new"}
    row: dict[str, Any] = {"model": name, "method": method, "student": shape, **extra}
    results = status.get("results")
    if status.get("state") == "evaluated" and isinstance(results, dict):
        row.update({k: v for k, v in results.items() if k not in ("model", "path")})
    elif status.get("state") == "failed":
        row["error"] = str(status.get("error"))
    else:
        row["error"] = f"not finished ({status.get('state')}): run compare again with --resume"
    return row


def _init_rows(out: Path, shapes: list[StudentShape]) -> list[dict[str, Any]]:
    """The initialisation rows a study saved (cells/init*/summary.json names the cells each one serves), by shape."""
    found = []
    folder = out / "cells"
    for path in sorted(folder.glob(f"{INIT}*/summary.json")) if folder.is_dir() else []:
        summary = _read_json(path, "initialisation summary") or {}
        if summary.get("init") and isinstance(summary.get("serves"), list):
            found.append((path.parent.name, str(summary.get("shape", "")), [str(c) for c in summary["serves"]]))
    order = [s.name for s in shapes]
    found.sort(key=lambda item: (order.index(item[1]) if item[1] in order else len(order), item[0]))
    return [_status_row(out, name, INIT, shape, serves=serves) for name, shape, serves in found]


def _rows(out: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(initialisation rows, cells, replicates) of the study in ``out``; each cell names its ``init_row``."""
    methods, shapes, noise = _read_study(out)
    cells = [_status_row(out, f"{method}_{shape.name}", method, shape.name) for method in methods for shape in shapes]
    inits = _init_rows(out, shapes)
    served = {cell: init["model"] for init in inits for cell in init["serves"]}
    for cell in cells:
        cell["init_row"] = served.get(cell["model"])
    replicates = []
    if noise is not None:
        by_name = {c["model"]: c for c in cells}
        for name in noise.cells:
            base = by_name.get(name)
            if base is None:
                continue
            for seed in noise.seeds:
                replicates.append(_status_row(out, replicate_name(name, seed), base["method"], base["student"],
                                              replicate_of=name, seed=seed, init_row=base.get("init_row")))
    return inits, cells, replicates


def headline_metrics(rows: list[dict]) -> list[str]:
    """The headline score of each task: its first metric key (``<task>/<metric>``), in first-seen order."""
    tasks: dict[str, str] = {}
    for row in rows:
        for key in row:
            task, slash, metric = key.partition("/")
            if slash and not metric.endswith("_std") and not task.startswith(("fidelity", "intrinsic")):
                tasks.setdefault(task, key)
    return list(tasks.values())


def _noise_groups(cells: list[dict], replicates: list[dict]) -> list[list[dict]]:
    """Each replicated cell with its replicates: rows that differ only in the training seed."""
    groups: dict[str, list[dict]] = {}
    for row in replicates:
        groups.setdefault(row["replicate_of"], [next(c for c in cells if c["model"] == row["replicate_of"])])
        groups[row["replicate_of"]].append(row)
    return [[r for r in rows if "error" not in r] for rows in groups.values()]


def _gains_section(inits: list[dict], cells: list[dict], replicates: list[dict], metrics: list[str]) -> tuple[str, dict]:
    """What training added (gain over the initialisation row) and the ranking per shape, with the noise marks."""
    ok = [c for c in cells if "error" not in c]
    noise = training_noise(_noise_groups(cells, replicates), metrics)
    gains = gains_over_init(ok, {r["model"]: r for r in inits if "error" not in r}, metrics, noise)
    lines = ["## What training added", ""]
    if noise:
        sizes = sorted({len(g) for g in _noise_groups(cells, replicates)})
        lines.append(f"Training noise: the standard deviation of a score over training seeds, pooled over the "
                     f"replicated cells ({', '.join(sorted({r['replicate_of'] for r in replicates}))}; "
                     f"{'/'.join(map(str, sizes))} seeds each): "
                     + "; ".join(f"{m} {sigma:.4f} ({dof} df)" for m, (sigma, dof) in noise.items()) + ".")
        lines.append(f"{MARK} marks a gain over the initialisation row beyond 2 sigma, and a difference between two "
                     f"trained cells beyond 2 sqrt(2) sigma. With so few seeds sigma is itself uncertain (by a factor "
                     f"of 2 or more at 1-2 df): a mark is a screen, not a test.")
    else:
        lines.append("No cell was trained with a second seed (add `noise:` to the study), so no difference is "
                     "marked: the training noise is unknown.")
    lines.append("")
    rows = []
    for entry in gains:
        row = {"method": entry["method"], "student": entry["student"], "init row": entry["init_row"]}
        for metric in metrics:
            if metric in entry:
                value = entry[metric]
                row[metric] = f"{value['value']:.4f}"
                row[f"gain {metric}"] = signed(value["gain"], value["beyond_noise"])
        if len(row) > 3:
            rows.append(row)
    columns = ["method", "student", "init row"]
    for metric in metrics:
        if any(metric in r for r in rows):
            columns += [metric, f"gain {metric}"]
    if rows:
        lines += ["Each cell's score beside its initialisation row's, and the gain (cell - init):", "",
                  markdown_table(rows, columns)]
    else:
        lines.append("No cell has a score and an initialisation row to compare it with.\n")
    ranking: dict[str, dict] = {}
    for metric in metrics:
        versus = versus_best(ok, metric, noise)
        if not versus:
            continue
        ranking[metric] = versus
        shapes = list(dict.fromkeys(c["student"] for c in ok if c["model"] in versus))
        table = []
        for method in dict.fromkeys(c["method"] for c in ok):
            row = {"method": method}
            for shape in shapes:
                model = next((c["model"] for c in ok if c["method"] == method and c["student"] == shape), None)
                if model in versus:
                    d = versus[model]
                    row[shape] = "best" if d["difference"] == 0 else signed(d["difference"], d["beyond_noise"])
            table.append(row)
        lines += [f"### Difference to the best cell of each shape: {metric}", "", markdown_table(table, ["method", *shapes])]
    data = {"metrics": metrics, "noise": {m: {"sigma": s, "dof": d} for m, (s, d) in noise.items()},
            "gains": gains, "versus_best": ranking}
    return "\n".join(lines) + "\n", data


def build_report(out: str | Path) -> Path:
    out = Path(out)
    if not (out / STUDY_FILE).is_file():
        raise RunDirError(f"{out} holds no study (no {STUDY_FILE}): give the --out folder of tadistill compare")
    report = out / "report"
    if report.exists() and not report.is_dir():
        raise RunDirError(f"{report} is a file, where the study's report folder belongs: move it away")
    inits, cells, replicates = _rows(out)  # every file is read (and may be refused) before anything is written
    teacher = _read_json(report / "teacher.json", "teacher results")
    curves = {}
    for cell in cells + replicates:
        metrics = out / "cells" / cell["model"] / "metrics.jsonl"
        if metrics.is_file():
            curves[cell["model"]] = read_curve(metrics, "loss")
    report.mkdir(parents=True, exist_ok=True)
    teacher_row = [{**teacher, "model": "teacher", "method": "teacher", "student": "teacher"}] if teacher else []
    every = teacher_row + inits + cells + replicates
    headlines = headline_metrics(every)

    write_results(report, every, headline=headlines)
    keys = ["params", *headlines, *SUMMARY_KEYS]
    table_rows = []
    for r in every:
        row = {k: r.get(k) for k in ["method", "student", *keys, "error"] if k in r or k in ("method", "student")}
        if r.get("replicate_of"):
            row["method"] = f"{r['method']} (seed {r['seed']})"
        table_rows.append(row)
    note = LATENCY_NOTE if any("latency_b1_ms" in r for r in table_rows) else ""
    gain_metrics = [*headlines, *(m for m in GAIN_FIDELITY if any(m in r for r in cells))]
    section, gains = _gains_section(inits, cells, replicates, gain_metrics)
    atomic_write_text(report / "gains.json", json.dumps(gains, indent=2, default=str) + "\n")
    atomic_write_text(report / "study.md", f"# Study: {out.name}\n\n{study_table(table_rows)}{note}\n{section}")

    score = headlines[0] if headlines else "fidelity/final_cka"
    plot_rows = teacher_row + [c for c in inits + cells if "error" not in c]
    plot_score_vs_params(plot_rows, score, report / "score_vs_params.png")
    plot_score_vs_latency(plot_rows, score, report / "score_vs_latency.png")
    plot_training_curves(curves, report / "training_curves.png")

    configs = report / "configs"
    configs.mkdir(exist_ok=True)
    for cell in cells + replicates:
        config = out / "cells" / cell["model"] / "config.yaml"
        if config.is_file():
            shutil.copy2(config, configs / f"{cell['model']}.yaml")
    return report
