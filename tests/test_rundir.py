"""Run directories: the marker, --overwrite that removes only a run's own files, the lock, --out checks,
damaged config.yaml / metrics.jsonl, the user's umask."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tadistill.errors import RunDirError
from tadistill.fileio import atomic_write_text
from tadistill.outdir import LOCK, MARKER, hold_lock
from tadistill.resolve import resolve_config
from tadistill.training.rundir import RunDir


@pytest.fixture(scope="module")
def config():
    return resolve_config("hs", overrides=["train.steps=3"])


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


def _made_run(root: Path, config) -> RunDir:
    run = RunDir(root)
    run.prepare(config, resume=False, overwrite=False)
    for name in ("checkpoints/step-00000002/model.safetensors", "student/config.json", "tensorboard/events",
                 "stages/assistant/config.yaml", "evaluation/results.json"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    run.log({"step": 1, "loss": 2.0})
    atomic_write_text(run.summary_path, "{}")
    return run


# --------------------------------------------------------------------------------- marker, overwrite


def test_overwrite_removes_only_what_a_run_writes(config, tmp_path):
    root = tmp_path / "run"
    _made_run(root, config)
    (root / "notes.txt").write_text("mine")
    (root / "sub").mkdir()
    (root / "sub" / "data.csv").write_text("a,b")
    (root / ".config.yaml.abcd1234.tmp").write_text("left by a killed writer")
    with pytest.raises(RunDirError) as info:  # no flag: refused, and the message offers both ways on
        RunDir(root).prepare(config, resume=False, overwrite=False)
    assert "--resume" in _one_line(info) and "--overwrite" in _one_line(info)

    RunDir(root).prepare(config, resume=False, overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == sorted([MARKER, "config.yaml", "notes.txt", "sub"])
    assert (root / "notes.txt").read_text() == "mine" and (root / "sub" / "data.csv").read_text() == "a,b"
    assert json.loads((root / MARKER).read_text())["kind"] == "run"


@pytest.mark.parametrize("resume, overwrite", [(False, True), (True, False), (False, False)])
def test_a_folder_with_a_config_yaml_but_no_marker_is_left_alone(resume, overwrite, config, tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "config.yaml").write_text("my: own config\n")
    (root / "data.csv").write_text("1,2")
    before = _snapshot(root)
    with pytest.raises(RunDirError) as info:
        RunDir(root).prepare(config, resume=resume, overwrite=overwrite)
    message = _one_line(info)
    assert "not a tadistill run" in message and "--overwrite" not in message and "choose another" in message
    assert _snapshot(root) == before


def test_a_folder_that_is_not_a_run_is_refused_without_suggesting_overwrite(config, tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "cat.jpg").write_bytes(b"\xff\xd8")
    for resume, overwrite in [(False, True), (False, False)]:
        with pytest.raises(RunDirError) as info:
            RunDir(root).check(config, resume=resume, overwrite=overwrite)
        assert "not a tadistill run" in _one_line(info) and "--overwrite" not in _one_line(info)
    with pytest.raises(RunDirError, match="nothing to resume"):
        RunDir(root).check(config, resume=True, overwrite=False)
    assert [p.name for p in root.iterdir()] == ["cat.jpg"]


def test_an_empty_folder_and_a_marked_folder_without_config_can_be_used(config, tmp_path):
    (tmp_path / "empty").mkdir()
    RunDir(tmp_path / "empty").prepare(config, resume=False, overwrite=False)
    half = tmp_path / "half"  # killed between writing the marker and the config: nothing to lose
    half.mkdir()
    (half / MARKER).write_text(json.dumps({"format": 1, "kind": "run", "created": "x"}))
    RunDir(half).prepare(config, resume=False, overwrite=False)
    assert (half / "config.yaml").is_file()


def test_a_study_folder_is_not_a_run_and_a_damaged_marker_is_one_line(config, tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    (study / MARKER).write_text(json.dumps({"format": 1, "kind": "study", "created": "x"}))
    with pytest.raises(RunDirError, match="holds a tadistill study, not a run"):
        RunDir(study).check(config, resume=False, overwrite=True)
    (study / MARKER).write_bytes(b"\x00\xff")
    with pytest.raises(RunDirError) as info:
        RunDir(study).check(config, resume=True, overwrite=False)
    assert "damaged" in _one_line(info)


def test_overwrite_through_the_cli_keeps_the_users_files(tiny_args, tmp_path, capsys):
    from tadistill.cli.main import main

    out = tmp_path / "run"
    argv = ["distill", "hs", *tiny_args(), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    (out / "notes.txt").write_text("keep me")
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "student" / "config.json").is_file()
    assert not (out / LOCK).exists()  # released at the end


# ------------------------------------------------------------------------------------------ --out


def test_out_paths_that_cannot_be_folders_are_one_line(config, tmp_path, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "gone")
    cases = {a_file: "is a file", a_file / "run": "is a file, not a folder", dangling: "does not exist",
             dangling / "run": "does not exist"}
    for out, expected in cases.items():
        with pytest.raises(RunDirError) as info:
            RunDir(out).check(config, resume=False, overwrite=False)
        assert expected in _one_line(info), out
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # the tests run as root, who may write anywhere
    with pytest.raises(RunDirError) as info:
        RunDir(tmp_path / "new" / "run").check(config, resume=False, overwrite=False)
    assert f"no permission to write in {tmp_path}" in _one_line(info)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "link"]  # nothing was created


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in a read-only folder")
def test_an_unwritable_parent_is_one_line(config, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    with pytest.raises(RunDirError, match="no permission"):
        RunDir(parent / "run").check(config, resume=False, overwrite=False)


def test_bad_out_through_the_cli_is_refused_before_any_work(tiny_args, tmp_path, capsys):
    from tadistill.cli.main import main

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out in (a_file, a_file / "run"):
        code = main(["distill", "hs", *tiny_args(), "--out", str(out), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: --out"), err
    assert not (tmp_path / "cache").exists()  # refused before the corpus was even tokenized


# --------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"), (b"\xff\xfe\x00garbage", "not UTF-8"), (b"a: [1, 2\n", "not valid YAML"),
    (b"just a string\n", "not a config"),
])
def test_a_damaged_config_yaml_on_resume_is_one_line(content, expected, config, tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare(config, resume=False, overwrite=False)
    run.config_path.write_bytes(content)
    with pytest.raises(RunDirError) as info:
        run.check(config, resume=True, overwrite=False)
    assert expected in _one_line(info) and "config.yaml" in _one_line(info)


def test_a_partial_last_metrics_line_is_skipped_and_dropped_on_resume(config, tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare(config, resume=False, overwrite=False)
    run.log({"step": 1, "loss": 2.0})
    run.log({"step": 2, "loss": 1.5})
    with run.metrics_path.open("ab") as f:
        f.write(b'{"step": 3, "lo\xe2\x82')  # killed mid-write, even mid-character
    assert run.read_metrics() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    run.truncate_metrics(5)
    assert run.metrics_path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    with run.metrics_path.open("a") as f:
        f.write("not json\n" + json.dumps({"step": 3}) + "\n")  # damage that no crash explains
    with pytest.raises(RunDirError) as info:
        run.read_metrics()
    assert "line 3 is not a JSON row" in _one_line(info)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_of_a_run_get_the_users_umask(umask, config, tmp_path):
    before = os.umask(umask)
    try:
        run = RunDir(tmp_path / "run")
        run.prepare(config, resume=False, overwrite=False)
        run.truncate_metrics(0)
    finally:
        os.umask(before)
    for path in (run.config_path, run.root / MARKER, run.metrics_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


# ------------------------------------------------------------------------------------------- lock

_HOLDER = textwrap.dedent("""
    import sys
    from tadistill.outdir import hold_lock
    with hold_lock(sys.argv[1], what=sys.argv[2]):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes our stdin
""")


def _holder(folder: Path, what: str = "run") -> subprocess.Popen:
    env = {**os.environ, "RANK": "0"}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), what], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


def test_a_second_process_is_refused_with_the_holders_pid(config, tmp_path):
    root = tmp_path / "not-yet" / "run"  # the lock works before the folder exists
    proc = _holder(root)
    try:
        with pytest.raises(RunDirError) as info:
            with RunDir(root).lock():
                pass
        assert f"pid {proc.pid}" in _one_line(info) and "in use by another tadistill run" in _one_line(info)
    finally:
        _release(proc)
    assert not (tmp_path / "not-yet").exists()  # the holder wrote nothing: the folders it made are gone
    with RunDir(root).lock():  # free again
        RunDir(root).prepare(config, resume=False, overwrite=False)
    assert sorted(p.name for p in root.iterdir()) == [MARKER, "config.yaml"]


def test_the_holders_overwrite_keeps_its_lock(config, tmp_path):
    root = tmp_path / "run"
    _made_run(root, config)
    with RunDir(root).lock():
        RunDir(root).prepare(config, resume=False, overwrite=True)
        assert (root / LOCK).is_file()
        env = {**os.environ, "RANK": "0"}
        probe = subprocess.run([sys.executable, "-c", _HOLDER, str(root), "run"], input="", capture_output=True,
                               text=True, env=env)
        assert probe.returncode != 0 and f"pid {os.getpid()}" in probe.stderr
        with RunDir(root).lock():  # re-entrant in the process that holds it
            pass
        assert (root / LOCK).is_file()


def test_only_rank_zero_of_a_launch_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with hold_lock(tmp_path / "run"):
        assert not (tmp_path / "run").exists()


def test_a_run_saved_before_a_field_existed_resumes_and_a_real_change_is_still_refused(config, tmp_path):
    run = RunDir(tmp_path / "run")
    run.prepare(config, resume=False, overwrite=False)
    saved = yaml.safe_load(run.config_path.read_text())
    del saved["teacher_dtype"]  # as written by a version without the field
    del saved["data"]["packing"]
    run.config_path.write_text(yaml.safe_dump(saved))
    run.check(config, resume=True, overwrite=False)  # the defaults fill in: no difference
    changed = config.model_copy(update={"teacher_dtype": "bfloat16"})
    with pytest.raises(RunDirError) as info:
        run.check(changed, resume=True, overwrite=False)
    assert "teacher_dtype" in _one_line(info)
