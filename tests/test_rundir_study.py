"""Study folders: the marker, --overwrite that keeps the user's files, the lock, safe cell names, and
--resume that accepts new evaluation settings (students evaluated again, not retrained)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tadistill.errors import ConfigError, RunDirError
from tadistill.outdir import MARKER
from tadistill.study.config import StudyConfig
from tadistill.study.studydir import _prepare_study_dir, read_status, study_lock, write_status

pytestmark = pytest.mark.usefixtures("one_thread")


def _study(**changes) -> StudyConfig:
    data = {"name": "s", "teacher": "builtin", "train": {"steps": 4},
            "methods": [{"name": "hs", "recipe": "hs"}], "students": ["2x32"],
            "evaluation": {"tasks": ["stdlib-topic"], "seeds": [0]}}
    for key, value in changes.items():
        data[key] = value
    return StudyConfig.model_validate(data)


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


def _cell(out, name, state, *, student=True, **extra):
    folder = out / "cells" / name
    if student:
        (folder / "student").mkdir(parents=True)
        (folder / "student" / "config.json").write_text("{}")
        (folder / "summary.json").write_text("{}")
    write_status(out, name, state, **extra)


def test_overwrite_removes_only_what_a_study_writes(tmp_path):
    out = tmp_path / "study"
    _prepare_study_dir(_study(), out, resume=False, overwrite=False)
    assert json.loads((out / MARKER).read_text())["kind"] == "study"
    _cell(out, "hs_2x32", "evaluated")
    (out / "report").mkdir()
    (out / "report" / "study.md").write_text("table")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="already holds a study"):
        _prepare_study_dir(_study(), out, resume=False, overwrite=False)
    _prepare_study_dir(_study(), out, resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "notes.txt", "study.yaml"]


@pytest.mark.parametrize("resume, overwrite", [(False, True), (True, False)])
def test_a_folder_that_is_not_a_study_is_left_alone(resume, overwrite, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "study.yaml").write_text("my: notes\n")
    (out / "data.csv").write_text("1,2")
    with pytest.raises(RunDirError) as info:
        _prepare_study_dir(_study(), out, resume=resume, overwrite=overwrite)
    assert "not a tadistill study" in _one_line(info) and "--overwrite" not in _one_line(info)
    assert sorted(p.name for p in out.iterdir()) == ["data.csv", "study.yaml"]
    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text(json.dumps({"format": 1, "kind": "run", "created": "x"}))
    with pytest.raises(RunDirError, match="holds a tadistill run, not a study"):
        _prepare_study_dir(_study(), run, resume=False, overwrite=True)


def test_resume_accepts_new_evaluation_settings_and_evaluates_the_students_again(tmp_path):
    out = tmp_path / "study"
    _prepare_study_dir(_study(), out, resume=False, overwrite=False)
    _cell(out, "a", "evaluated", results={"x": 1})
    _cell(out, "b", "failed", error="evaluation: task file missing")
    _cell(out, "c", "failed", student=False, error="loss is nan at step 3")
    (out / "report").mkdir()
    (out / "report" / "teacher.json").write_text("{}")

    with pytest.raises(RunDirError, match="different study"):  # training settings must still match
        _prepare_study_dir(_study(train={"steps": 5}), out, resume=True, overwrite=False)

    _prepare_study_dir(_study(), out, resume=True, overwrite=False)  # same settings: retry failed evaluations
    assert [read_status(out, c)["state"] for c in "abc"] == ["evaluated", "trained", "failed"]
    assert (out / "report" / "teacher.json").is_file()

    new = _study(evaluation={"tasks": ["stdlib-topic"], "seeds": [0, 1, 2]})
    _prepare_study_dir(new, out, resume=True, overwrite=False)  # new settings: every student again
    assert [read_status(out, c)["state"] for c in "abc"] == ["trained", "trained", "failed"]
    assert not (out / "report" / "teacher.json").exists()
    assert yaml.safe_load((out / "study.yaml").read_text())["evaluation"]["seeds"] == [0, 1, 2]


def test_a_damaged_status_or_study_file_is_one_line(tmp_path):
    out = tmp_path / "study"
    _prepare_study_dir(_study(), out, resume=False, overwrite=False)
    _cell(out, "a", "trained")
    (out / "cells" / "a" / "status.json").write_text("{trunc")
    with pytest.raises(RunDirError) as info:
        read_status(out, "a")
    assert "status.json is damaged" in _one_line(info)
    (out / "study.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(RunDirError) as info:
        _prepare_study_dir(_study(), out, resume=True, overwrite=False)
    assert "study.yaml is damaged" in _one_line(info)


def test_a_second_process_cannot_take_a_study_folder(tmp_path):
    holder = ("import sys\nfrom tadistill.study.studydir import study_lock\nwith study_lock(sys.argv[1]):\n"
              "    print('held', flush=True)\n    sys.stdin.read()\n")
    out = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-c", holder, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "RANK": "0"})
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError) as info:
            with study_lock(out):
                pass
        assert f"in use by another tadistill study (pid {proc.pid})" in _one_line(info)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    with study_lock(out):
        pass


@pytest.mark.parametrize("name", ["../../../x", "a/b", ".hidden", "", "x" * 81, "a b"])
def test_unsafe_method_names_are_refused(name, tmp_path, capsys):
    from tadistill.cli.main import main
    from tadistill.study.compare import load_study

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"methods": [{"name": name, "recipe": "hs"}], "students": ["2x32"]}))
    with pytest.raises(ConfigError) as info:
        load_study(path)
    assert "methods.0.name" in _one_line(info) and "plain file name" in _one_line(info)
    out = tmp_path / "out"
    assert main(["compare", str(path), "--out", str(out), "--no-progress"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # nothing written, inside --out or out


def test_a_study_whose_evaluation_failed_is_evaluated_on_resume_without_retraining(
        tmp_path, tiny_teacher, tiny_corpus, monkeypatch):
    from tadistill.cli.main import main
    from tadistill.errors import DataError
    from tadistill.evaluation.suite import EvaluationSuite

    task = tmp_path / "task.csv"
    task.write_text("text,label\n" + "".join(f"the quick brown fox {i},{'ab'[i % 2]}\n" for i in range(24)))
    study = {"name": "tiny", "teacher": str(tiny_teacher),
             "data": {"source": str(tiny_corpus), "max_length": 24, "heldout_fraction": 0.3,
                      "cache_dir": str(tmp_path / "cache")},
             "train": {"steps": 2, "batch_size": 4, "eval_every": 0, "save_every": 0, "eval_batches": 1},
             "methods": [{"name": "hs", "recipe": "hs"}], "students": ["1x16x4"],
             "evaluation": {"tasks": [str(task)], "seeds": [0], "fidelity_texts": 12, "max_train": 16,
                            "max_eval": 8, "latency": False}}
    path, out = tmp_path / "study.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(study))

    def broken(self, *args, **kwargs):
        raise DataError("the evaluation broke")

    with monkeypatch.context() as patch:
        patch.setattr(EvaluationSuite, "evaluate_student", broken)
        assert main(["compare", str(path), "--out", str(out), "--no-progress"]) == 0
    status = read_status(out, "hs_1x16x4")
    assert status["state"] == "failed" and "the evaluation broke" in status["error"]
    weights = out / "cells" / "hs_1x16x4" / "student" / "model.safetensors"
    trained = weights.stat().st_mtime_ns

    study["evaluation"]["seeds"] = [0, 1]  # a changed evaluation is accepted on --resume
    path.write_text(yaml.safe_dump(study))
    assert main(["compare", str(path), "--out", str(out), "--resume", "--no-progress"]) == 0
    status = read_status(out, "hs_1x16x4")
    assert status["state"] == "evaluated" and f"{task}/accuracy" in status["results"]
    assert weights.stat().st_mtime_ns == trained  # evaluated again, not retrained
