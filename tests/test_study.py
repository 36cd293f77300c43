"""Comparative studies end to end on tiny models: shared teacher pass, report, resume, failing cells."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tadistill.cli.main import main
from tadistill.study.compare import compare, load_study


@pytest.fixture
def task_csv(tmp_path):
    path = tmp_path / "task.csv"
    rows = [("the teacher model is distilled into a student", "model"), ("the quick brown fox jumps", "animal")]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(30):
            text, label = rows[i % 2]
            writer.writerow([f"{text} {i}", label])
    return path


def _study(tmp_path, tiny_teacher, tiny_corpus, task_csv, **extra) -> dict:
    study = {
        "name": "tiny",
        "teacher": str(tiny_teacher),
        "data": {"source": str(tiny_corpus), "max_length": 24, "heldout_fraction": 0.3,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "save_every": 2, "eval_batches": 1, "log_every": 1},
        "methods": [
            {"name": "hs", "recipe": "hs"},
            {"name": "mlv2", "recipe": "minilmv2", "set": ["objectives.minilmv2.relation_heads=4"]},
        ],
        "students": ["2x32", "1x16x4"],
        "evaluation": {"tasks": [str(task_csv)], "seeds": [0, 1], "fidelity_texts": 12, "max_train": 40,
                       "max_eval": 40},
    }
    study.update(extra)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _losses(cell_dir):
    return [json.loads(x)["loss"] for x in (cell_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_study_end_to_end_with_report(tmp_path, tiny_teacher, tiny_corpus, task_csv, capsys):
    path = _study(tmp_path, tiny_teacher, tiny_corpus, task_csv)
    out = tmp_path / "out"
    assert main(["compare", str(path), "--out", str(out), "--no-progress"]) == 0
    report = out / "report"
    table = (report / "study.md").read_text()
    for cell in ("hs", "mlv2"):
        assert cell in table
    assert "teacher" in table and "failed" not in table
    rows = list(csv.DictReader((report / "results.csv").open()))
    assert {r["model"] for r in rows} == {"teacher", "hs_2x32", "hs_1x16x4", "mlv2_2x32", "mlv2_1x16x4",
                                          "init_2x32", "init_1x16x4"}  # each shape before training
    student = next(r for r in rows if r["model"] == "hs_2x32")
    assert float(student["params"]) < float(next(r for r in rows if r["model"] == "teacher")["params"])
    assert 0.0 <= float(student["fidelity/final_cka"]) <= 1.0 + 1e-6
    for png in ("score_vs_params.png", "score_vs_latency.png", "training_curves.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (report / "configs").iterdir()) == sorted(
        f"{c}.yaml" for c in ("hs_2x32", "hs_1x16x4", "mlv2_2x32", "mlv2_1x16x4"))
    assert not (out / "checkpoints").exists()  # the pass is over

    # report rebuilds the same table from the files alone.
    (report / "study.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (report / "study.md").read_text() == table


def test_shared_pass_equals_training_alone(tmp_path, tiny_teacher, tiny_corpus, task_csv):
    study = load_study(_study(tmp_path, tiny_teacher, tiny_corpus, task_csv))
    from tadistill.study.compare import expand_cells, train_cells

    out = tmp_path / "shared"
    (out).mkdir()
    cells = expand_cells(study)
    train_cells(cells, out, progress=False)
    for cell in cells:
        solo = tmp_path / f"solo-{cell.name}"
        from tadistill.api import distill

        distill(cell.config, out=solo, progress=False)
        assert _losses(out / "cells" / cell.name) == _losses(solo), cell.name
        a = load_file(str(out / "cells" / cell.name / "student" / "model.safetensors"))
        b = load_file(str(solo / "student" / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), cell.name


def test_resume_a_partly_finished_study(tmp_path, tiny_teacher, tiny_corpus, task_csv):
    full = _study(tmp_path, tiny_teacher, tiny_corpus, task_csv)
    out = tmp_path / "out"
    study = load_study(full)
    stopped = study.model_copy(deep=True)
    stopped.train["stop_at"] = 2
    compare(stopped, out=out, progress=False)
    assert (out / "pass.json").is_file() and (out / "checkpoints").is_dir()
    assert not any((out / "cells").glob("*/student"))
    # Another study is refused; the same study (stop_at aside) continues the pass to the end.
    other = study.model_copy(deep=True)
    other.train["steps"] = 5
    with pytest.raises(Exception, match="different study"):
        compare(other, out=out, resume=True, progress=False)
    # A study written before a field with a default existed still resumes.
    stored = yaml.safe_load((out / "study.yaml").read_text())
    del stored["evaluation"]["zero_shot_tasks"]
    (out / "study.yaml").write_text(yaml.safe_dump(stored))
    compare(study, out=out, resume=True, progress=False)
    reference = tmp_path / "ref"
    compare(study, out=reference, progress=False)
    for cell in ("hs_2x32", "mlv2_1x16x4"):
        assert _losses(out / "cells" / cell) == _losses(reference / "cells" / cell)
    # A finished study resumes to nothing: no cell retrains.
    before = (out / "cells" / "hs_2x32" / "student" / "model.safetensors").stat().st_mtime_ns
    compare(study, out=out, resume=True, progress=False)
    assert (out / "cells" / "hs_2x32" / "student" / "model.safetensors").stat().st_mtime_ns == before


def test_failing_cells_are_reported_and_the_others_go_on(tmp_path, tiny_teacher, tiny_corpus, task_csv, monkeypatch):
    import tadistill.training.terms as terms

    real = terms.relation_kl

    def explode_on_narrow_students(student_x, teacher_x, mask, **kw):  # NaN only for the 16-wide student
        value = real(student_x, teacher_x, mask, **kw)
        return value * float("nan") if student_x.shape[-1] == 16 else value

    monkeypatch.setattr(terms, "relation_kl", explode_on_narrow_students)
    path = _study(tmp_path, tiny_teacher, tiny_corpus, task_csv, methods=[
        {"name": "mlv2", "recipe": "minilmv2", "set": ["objectives.minilmv2.relation_heads=4"]},
        {"name": "minilm", "recipe": "minilm"},  # the 1x16x4 student keeps 4 heads; 2x32 too
        {"name": "bad", "recipe": "minilm", "set": ["student.num_heads=2"]},  # unequal heads: setup error
    ])
    out = tmp_path / "out"
    assert main(["compare", str(path), "--out", str(out), "--no-progress"]) == 0
    status = {p.parent.name: json.loads(p.read_text()) for p in (out / "cells").glob("*/status.json")}
    assert status["bad_2x32"]["state"] == "failed" and "equal head counts" in status["bad_2x32"]["error"]
    assert status["mlv2_1x16x4"]["state"] == "failed" and "loss is nan" in status["mlv2_1x16x4"]["error"]
    assert status["mlv2_2x32"]["state"] == "evaluated"
    assert status["minilm_2x32"]["state"] == "evaluated"
    table = (out / "report" / "study.md").read_text()
    assert "failed: " in table and "equal head counts" in table


def test_multilingual_study_reports_fidelity_per_language(tmp_path, tiny_teacher, tiny_corpus, task_csv):
    from conftest import TEXTS

    second = tmp_path / "xx.txt"
    second.write_text("\n\n".join(f"{t[::-1]} abschnitt {i}." for i, t in enumerate(TEXTS)) + "\n")
    path = _study(tmp_path, tiny_teacher, tiny_corpus, task_csv,
                  languages={"en": str(tiny_corpus), "xx": str(second)},
                  methods=[{"name": "hs", "recipe": "hs"}], students=["2x32"])
    out = tmp_path / "out"
    report = compare(load_study(path), out=out, progress=False)
    cell = yaml.safe_load((out / "cells" / "hs_2x32" / "config.yaml").read_text())
    # Trained on both corpora, each a language sampled with XLM-R's smoothing (n_i^0.3), reported per language.
    assert cell["data"]["source"] == [{"path": str(tiny_corpus), "weight": None, "language": "en"},
                                      {"path": str(second), "weight": None, "language": "xx"}]
    assert cell["data"]["alpha"] == 0.3
    mixture = json.loads((out / "cells" / "hs_2x32" / "summary.json").read_text())["data_mixture"]
    assert set(mixture["languages"]) == {"en", "xx"}
    assert sum(lang["probability"] for lang in mixture["languages"].values()) == pytest.approx(1.0)
    row = next(r for r in csv.DictReader((report / "results.csv").open()) if r["model"] == "hs_2x32")
    assert float(row["fidelity[en]/final_cka"]) > 0 and float(row["fidelity[xx]/final_cka"]) > 0
    assert row["fidelity[en]/final_cka"] != row["fidelity[xx]/final_cka"]


def test_evaluate_cli_writes_results_with_teacher_row_and_retention(tmp_path, tiny_args, tiny_corpus, task_csv, capsys):
    run = tmp_path / "run"  # distilbert trains an MLM head: the student has a perplexity too
    assert main(["distill", "distilbert", *tiny_args(), "--out", str(run), "--no-progress"]) == 0
    teacher = yaml.safe_load((run / "config.yaml").read_text())["teacher"]
    out = tmp_path / "eval"
    code = main(["evaluate", str(run / "student"), "--teacher", teacher, "--tasks", str(task_csv), "--seeds", "0", "1",
                 "--texts", str(tiny_corpus), "--max-length", "24", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in rows] == ["teacher", "student"]
    teacher_row, student_row = rows
    assert student_row["params"] < teacher_row["params"]
    assert student_row["latency_b1_ms"] > 0 and "speedup_b32" in student_row
    assert 0 < student_row["fidelity/final_cka"] <= 1 + 1e-6 and "fidelity/relation_kl" in student_row
    assert student_row["intrinsic/mlm_perplexity"] > 1
    metric = f"{task_csv}/accuracy"
    assert 0 <= student_row[metric] <= 1 and f"{metric}_std" in student_row
    table = (out / "results.md").read_text()
    assert "% of teacher" in table and "teacher" in table


def test_causal_study_trains_sampling_and_teacher_free_cells_in_one_pass(tmp_path, tiny_gpt2, tiny_corpus):
    """The shape of `compare --example causal` on a tiny GPT-2: dataset, on-policy and teacher-free lanes."""
    study = {
        "name": "tiny-causal",
        "teacher": str(tiny_gpt2),
        "data": {"source": str(tiny_corpus), "max_length": 24, "heldout_fraction": 0.3, "prompt_tokens": 6,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 3, "batch_size": 4, "eval_every": 0, "save_every": 0, "eval_batches": 1, "log_every": 1},
        "methods": [  # teacher-free first: its lane must not hide the teacher from the lanes after it
            {"name": "tf", "recipe": "teacher-free"},
            {"name": "fkl", "recipe": "kd"},
            {"name": "gkd", "recipe": "gkd"},
        ],
        "students": ["2x32"],
        "evaluation": {"tasks": [], "seeds": [0], "fidelity_texts": 12, "latency": False},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "out"
    assert main(["compare", str(path), "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "report" / "results.json").read_text())
    rows = results["rows"] if isinstance(results, dict) else results
    students = [r for r in rows if r.get("method") in {"fkl", "gkd", "tf"}]
    assert len(students) == 3
    for row in students:
        assert row["intrinsic/perplexity"] > 1 and row["fidelity/output_kl"] >= 0
    table = (out / "report" / "study.md").read_text()
    assert "intrinsic/perplexity" in table and "fidelity/output_kl" in table


def test_a_chained_method_is_a_failed_cell_not_a_silent_single_stage(tmp_path, tiny_teacher, tiny_corpus, task_csv):
    from tadistill.study.compare import expand_cells

    methods = [{"name": "ta", "recipe": "minilm", "set": ["assistant.enabled=true"]}, {"name": "hs", "recipe": "hs"}]
    study = load_study(_study(tmp_path, tiny_teacher, tiny_corpus, task_csv, methods=methods))
    cells = {c.name: c for c in expand_cells(study)}
    assert all(c.config is None and "chained run" in c.error for n, c in cells.items() if n.startswith("ta_"))
    assert all(c.config is not None for n, c in cells.items() if n.startswith("hs_"))
