"""Publishing (``tadistill push``, issue 15 item 4): the student of a finished run, with the hub mocked."""

from __future__ import annotations

from typing import ClassVar

import pytest

from tadistill.cli.main import main
from tadistill.errors import RunDirError
from tadistill.publish import push_student

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records the calls, reaches nothing."""

    calls: ClassVar[list[tuple]] = []
    fail: ClassVar[str | None] = None

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        if FakeApi.fail:
            raise RuntimeError(FakeApi.fail + "\nmore details")
        FakeApi.calls.append(("create_commit", repo_id, operations, kwargs))


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub

    FakeApi.calls, FakeApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    return FakeApi


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_teacher, tiny_corpus):
    """A finished run and one stopped by train.stop_at (checkpoint, no student)."""
    root = tmp_path_factory.mktemp("runs")
    sets = [f"teacher={tiny_teacher}", f"data.source={tiny_corpus}", f"data.cache_dir={root / 'cache'}",
            "data.max_length=24", "data.heldout_fraction=0.2", "train.steps=2", "train.batch_size=4",
            "train.eval_batches=1"]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["distill", "hs", *args, "--out", str(root / "done"), "--no-progress"]) == 0
    assert main(["distill", "hs", *args, "--set", "train.stop_at=1", "--out", str(root / "stopped"),
                 "--no-progress"]) == 0
    return root


def test_push_uploads_the_student_with_a_card(hub, runs):
    url = push_student(runs / "done", "me/tiny-student", private=True)
    assert url == "https://huggingface.co/me/tiny-student"
    kinds = [c[0] for c in hub.calls]
    assert kinds == ["init", "create_repo", "create_commit"]
    assert hub.calls[1][2]["private"] is True
    _, repo, operations, _ = hub.calls[2]
    assert repo == "me/tiny-student"
    paths = sorted(op.path_in_repo for op in operations)
    student = runs / "done" / "student"
    assert paths == sorted([p.relative_to(student).as_posix() for p in student.rglob("*") if p.is_file()]
                           + ["README.md"])
    assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= set(paths)
    card = next(op for op in operations if op.path_in_repo == "README.md").path_or_fileobj.decode()
    assert "distilled from" in card and "recipe `hs`" in card and "| steps | 2 |" in card


def test_an_unfinished_run_is_refused_before_the_hub(hub, runs, tmp_path):
    with pytest.raises(RunDirError, match="has not finished"):
        push_student(runs / "stopped", "me/x")
    with pytest.raises(RunDirError, match="not a tadistill run"):
        push_student(tmp_path, "me/x")
    assert hub.calls == []


def test_push_through_the_cli(hub, runs, capsys):
    assert main(["push", str(runs / "done"), "--repo-id", "me/tiny-student"]) == 0
    assert "https://huggingface.co/me/tiny-student" in capsys.readouterr().out
    assert main(["push", str(runs / "stopped"), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run ") and "has not finished" in err and "\n" not in err
    hub.fail = "401 Client Error: Unauthorized"
    assert main(["push", str(runs / "done"), "--repo-id", "me/tiny-student"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not push to 'me/tiny-student' (401 Client Error: Unauthorized)")
    assert "\n" not in err
