"""Result tables and study figures (reports/)."""

from __future__ import annotations

import csv
import json
import math
import struct

import pytest

from tadistill.errors import ConfigError, RunDirError
from tadistill.reports import (
    markdown_table,
    order_columns,
    plot_score_vs_latency,
    plot_score_vs_params,
    plot_training_curves,
    read_curve,
    retention,
    study_table,
    write_results,
)

ROWS = [
    {"model": "teacher", "params": 4_386_000, "flops_per_token": 1_000_000, "latency_b1_ms": 2.5,
     "stdlib-topic/accuracy": 0.8, "sst2/accuracy": 0.9},
    {"model": "minilmv2-L2", "latency_b1_ms": 0.9, "params": 1_200_000, "flops_per_token": 250_000,
     "stdlib-topic/accuracy": 0.6, "sst2/accuracy": 0.81, "fidelity/final_cka": 0.71},
]

CELLS = [
    {"method": "teacher", "student": "L4xH32", "params": 4_386_000, "latency_b1_ms": 2.5, "sst2/accuracy": 0.9},
    {"method": "hs", "student": "L2xH32", "params": 1_200_000, "latency_b1_ms": 1.1, "sst2/accuracy": 0.8},
    {"method": "hs", "student": "L1xH32", "params": 700_000, "latency_b1_ms": 0.6, "sst2/accuracy": 0.7},
    {"method": "mha", "student": "L2xH32", "params": 1_200_000, "latency_b1_ms": 1.0, "sst2/accuracy": 0.85},
    {"method": "od", "student": "L2xH32", "error": "loss is NaN at step 3: lower train.lr\nTraceback ..."},
]


def test_retention_values() -> None:
    assert retention(0.45, 0.9) == pytest.approx(50.0)
    assert retention(0.9, 0.9) == pytest.approx(100.0)
    assert retention(1.0, 0.5) == pytest.approx(200.0)
    assert retention(0.5, 0.0) is None
    assert retention(0.5, None) is None
    assert retention(None, 0.5) is None


def test_column_order_model_cost_tasks() -> None:
    columns = order_columns(ROWS)
    assert columns == ["model", "params", "flops_per_token", "latency_b1_ms", "stdlib-topic/accuracy",
                       "sst2/accuracy", "fidelity/final_cka"]


def test_write_results_round_trip(tmp_path) -> None:
    paths = write_results(tmp_path / "report", ROWS)
    assert set(paths) == {"json", "csv", "md"}
    assert all(p.is_file() for p in paths.values())
    assert json.loads(paths["json"].read_text()) == ROWS

    with paths["csv"].open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == order_columns(ROWS)
        parsed = list(reader)
    assert [r["model"] for r in parsed] == ["teacher", "minilmv2-L2"]
    for original, back in zip(ROWS, parsed):
        for key in order_columns(ROWS)[1:]:
            if key in original:
                assert float(back[key]) == original[key], key
            else:
                assert back[key] == "", key

    md = paths["md"].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    # A retention column right after every task metric, none for the fidelity metric.
    i = cells.index("stdlib-topic/accuracy")
    assert cells[i + 1] == "stdlib-topic/accuracy (% of teacher)"
    assert "sst2/accuracy (% of teacher)" in cells
    assert "fidelity/final_cka (% of teacher)" not in cells

    def row(name: str) -> list[str]:
        line = next(line for line in md.splitlines() if line.startswith(f"| {name} "))
        return [c.strip() for c in line.strip("|").split("|")]

    assert row("teacher")[i + 1] == "100.0"
    assert row("teacher")[cells.index("sst2/accuracy (% of teacher)")] == "100.0"
    assert row("minilmv2-L2")[i + 1] == "75.0"
    assert row("minilmv2-L2")[cells.index("sst2/accuracy (% of teacher)")] == "90.0"


def test_write_results_headline_and_errors(tmp_path) -> None:
    paths = write_results(tmp_path, ROWS, headline=["params", "sst2/accuracy"])
    header = paths["md"].read_text().splitlines()[2]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "model", "params", "sst2/accuracy", "sst2/accuracy (% of teacher)"]
    # The CSV keeps every column whatever the headline.
    assert "stdlib-topic/accuracy" in paths["csv"].read_text().splitlines()[0]
    with pytest.raises(ConfigError, match="did you mean 'sst2/accuracy'"):
        write_results(tmp_path, ROWS, headline=["sst2/acuracy"])
    with pytest.raises(ConfigError, match="no result rows"):
        write_results(tmp_path, [])
    with pytest.raises(ConfigError, match="'model'"):
        write_results(tmp_path, [{"params": 1}])


def test_write_results_without_teacher_row_and_nan(tmp_path) -> None:
    rows = [{"model": "student", "sst2/accuracy": float("nan")}]
    paths = write_results(tmp_path, rows, teacher_name="bert-base")
    md = paths["md"].read_text()
    assert "% of teacher" not in md and "No row named 'bert-base'" in md
    assert json.loads(paths["json"].read_text()) == [{"model": "student", "sst2/accuracy": None}]


def test_markdown_table_formatting() -> None:
    table = markdown_table([{"a": 1.234567, "b": "x|y\nz"}, {"a": 12}], ["a", "b", "c"], floatfmt=".2f")
    lines = table.splitlines()
    assert lines[0] == "| a | b | c |"
    assert lines[1] == "|---:|:---|:---|"
    assert lines[2] == "| 1.23 | x\\|y z |  |"
    assert lines[3] == "| 12 |  |  |"


def test_study_table_shows_failed_cell() -> None:
    table = study_table(CELLS)
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["method", "student", "params", "latency_b1_ms", "sst2/accuracy", "status"]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[0] for r in body] == ["teacher", "hs", "hs", "mha", "od"]
    assert body[1][:3] == ["hs", "L2xH32", "1.20M"]
    failed = body[-1]
    assert failed[-1] == "failed: loss is NaN at step 3: lower train.lr"  # first line only
    assert failed[3] == failed[4] == ""
    assert body[0][-1] == "ok"


def test_study_table_groups_methods() -> None:
    cells = [{"method": "a", "student": "s1", "x": 1.0}, {"method": "b", "student": "s1", "x": 2.0},
             {"method": "a", "student": "s2", "x": 3.0}]
    body = [line.split("|")[1:3] for line in study_table(cells).splitlines()[2:]]
    assert [(m.strip(), s.strip()) for m, s in body] == [("a", "s1"), ("a", "s2"), ("b", "s1")]


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plots_write_valid_png_with_failed_cell(tmp_path) -> None:
    for path in (
        plot_score_vs_params(CELLS, "sst2/accuracy", tmp_path / "params.png"),
        plot_score_vs_latency(CELLS, "sst2/accuracy", tmp_path / "latency.png"),
        # No cell has this metric: the figure says so instead of failing.
        plot_score_vs_params(CELLS, "missing/metric", tmp_path / "empty.png"),
    ):
        assert path.is_file()
        width, height = png_size(path)
        assert width > 0 and height > 0
    assert png_size(tmp_path / "params.png") == (round(6.4 * 120), round(4.4 * 120))


def test_training_curves_from_metrics_log(tmp_path) -> None:
    log = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 4.0, "loss/kl": 4.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval/loss": 3.0},
            {"step": 3, "loss": float("nan")}, {"step": 2, "loss": 1.5}]  # step 2 replayed after a resume
    log.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 4, "lo')  # cut-off last line
    assert read_curve(log) == [(1, 4.0), (2, 1.5)]
    assert read_curve(tmp_path, key="eval/loss") == [(2, 3.0)]
    path = plot_training_curves({"hs": read_curve(log), "od": [(1, 5.0), (2, 0.1)], "empty": []},
                                tmp_path / "curves.png")
    assert min(png_size(path)) > 0


def test_read_curve_errors(tmp_path) -> None:
    with pytest.raises(RunDirError, match="no metrics log"):
        read_curve(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(RunDirError, match="line 2"):
        read_curve(tmp_path)


def test_plot_values_are_finite_only(tmp_path) -> None:
    cells = [{"method": "hs", "student": "L1", "params": 1e6, "m": math.inf},
             {"method": "hs", "student": "L2", "params": True, "m": 0.5}]
    assert png_size(plot_score_vs_params(cells, "m", tmp_path / "x.png"))[0] > 0


def test_study_report_latency_columns_agree_with_the_speedup(tmp_path) -> None:
    """A study evaluated by the suite: the study table's teacher latency / student latency is the speedup column."""
    import yaml

    from tadistill.study.report import build_report

    out = tmp_path / "study"
    (out / "report").mkdir(parents=True)
    (out / "cells" / "hs_2x32").mkdir(parents=True)
    (out / "study.yaml").write_text(yaml.safe_dump(
        {"methods": [{"name": "hs"}], "students": [{"layers": 2, "hidden": 32, "heads": None}]}))
    (out / "report" / "teacher.json").write_text(json.dumps({"model": "teacher", "params": 4_000_000,
                                                             "latency_b1_ms": 2.0}))
    # The row evaluate_student writes: teacher timed at 2.4 ms next to the student's 0.6 (speedup 4), shown in
    # the teacher row's time base: 2.0 / 4 = 0.5 ms.
    results = {"params": 1_000_000, "latency_b1_ms": 0.5, "speedup_b1": 4.0, "latency_b1_interleaved_ms": 0.6,
               "latency_b1_teacher_interleaved_ms": 2.4}
    (out / "cells" / "hs_2x32" / "status.json").write_text(json.dumps({"state": "evaluated", "results": results}))
    report = build_report(out)
    text = (report / "study.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    values = {row[0]: dict(zip(header, row)) for row in
              ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    teacher, student = float(values["teacher"]["latency_b1_ms"]), float(values["hs"]["latency_b1_ms"])
    assert teacher / student == pytest.approx(float(values["hs"]["speedup_b1"]))
    assert "one measurement feeds both" in text
    csv_row = next(r for r in csv.DictReader((report / "results.csv").open()) if r["model"] == "hs_2x32")
    assert float(csv_row["latency_b1_teacher_interleaved_ms"]) == 2.4  # the raw timings stay in results.csv
