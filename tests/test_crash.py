"""Crash consistency: a run killed with SIGKILL at any point of a checkpoint write resumes to the very
weights and losses of a run that was never interrupted, and a damaged newest checkpoint falls back to
the one before it.

The kills are real SIGKILLs of a real ``tadistill distill`` process, at each named point of
``save_checkpoint`` (``checkpoint._reached``) and in the middle of writing the weights file. To pay
for one process start only, the run forks when it begins saving the chosen step: each child goes on
saving and is killed at its point, then the parent copies what the child left on disk and puts the
folder back as it was for the next child.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tadistill.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")

KILL_STEP = 3
POINTS = ["begin", "model-half", "model", "optimizer", "extra", "metadata", "hashed", "renamed", "pruning", "pruned"]

_DRIVER = textwrap.dedent("""
    import json, os, shutil, signal, sys
    from pathlib import Path

    import torch
    torch.set_num_threads(1)
    import tadistill.training.checkpoint as ckpt
    from tadistill.cli.main import main

    out, snaps, step, points, argv = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:]
    killed = {}

    def half_written(model, filename, **kwargs):  # the weights file cut in the middle of its write
        real_save_model(model, filename, **kwargs)
        with open(filename, "r+b") as handle:
            handle.truncate(os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    real_save_model = ckpt.save_model
    target = None

    def reached(point, at):
        if at != step:
            return
        if point == target:
            os.kill(os.getpid(), signal.SIGKILL)
        if point == "end":
            os._exit(3)  # the point was never reached
        if point != "start" or target is not None:
            return
        backup = snaps / ".before"
        shutil.copytree(out, backup, symlinks=True)
        for name in points.split(","):
            pid = os.fork()
            if pid == 0:  # the child saves on, and dies at its point
                globals()["target"] = name
                if name == "model-half":
                    ckpt.save_model = half_written
                return
            _, status = os.waitpid(pid, 0)
            killed[name] = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            shutil.copytree(out, snaps / name, symlinks=True)
            shutil.rmtree(out)
            shutil.copytree(backup, out, symlinks=True)
        print(json.dumps(killed), flush=True)
        os._exit(0)

    ckpt._reached = reached
    sys.exit(main([*argv, "--out", str(out)]))
""")


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _state(run: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / f"step-{step:08d}"
    state = {**load_file(str(folder / "model.safetensors")),
             **{f"optimizer/{k}": v for k, v in load_file(str(folder / "optimizer.safetensors")).items()}}
    return {k: v.clone() for k, v in state.items()}  # not views of files the test is about to damage


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def argv(tiny_args):
    # Dropout is on (the tiny teacher's 0.1): the random state must come back exactly too.
    return ["distill", "hs", *tiny_args("train.steps=5", "train.stop_at=4", "train.save_every=1", "train.eval_every=0",
                                        "train.keep_checkpoints=2"), "--no-progress"]


def test_sigkill_at_every_point_of_a_checkpoint_write_resumes_exactly(argv, tmp_path):
    reference = tmp_path / "reference"
    assert main([*argv, "--out", str(reference)]) == 0
    expected, expected_losses = _state(reference, 4), _losses(reference)
    assert [s for s, _ in expected_losses] == [1, 2, 3, 4]

    snaps = tmp_path / "killed"
    snaps.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path / "work"), str(snaps), str(KILL_STEP),
                           ",".join(POINTS), *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    killed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert killed == {point: True for point in POINTS}  # every point was reached, and killed there

    published = POINTS.index("renamed")
    for i, point in enumerate(POINTS):
        run = snaps / point
        names = sorted(p.name for p in (run / "checkpoints").iterdir())
        # What the kill left: a temporary folder before the rename, the new checkpoint after it.
        assert (f"step-{KILL_STEP:08d}" in names) == (i >= published), (point, names)
        assert (f".step-{KILL_STEP:08d}.tmp" in names) == (i < published), (point, names)
        assert (".step-00000001.old" in names) == (point == "pruning"), (point, names)
        assert main([*argv, "--out", str(run), "--resume"]) == 0, point
        assert _losses(run) == expected_losses, point
        assert _same(_state(run, 4), expected), point


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(argv, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*argv, "--out", str(run)]) == 0
    expected, expected_losses = _state(run, 4), _losses(run)
    newest = run / "checkpoints" / "step-00000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])
    capsys.readouterr()
    assert main([*argv, "--out", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "skipped checkpoint" in err and "step-00000004" in err and "truncated" in err
    assert _losses(run) == expected_losses and _same(_state(run, 4), expected)  # step 4 trained again, the same

    for step in (3, 4):  # none left: one line, and the run is left as it was
        path = run / "checkpoints" / f"step-{step:08d}" / "optimizer.safetensors"
        path.write_bytes(b"\0" * path.stat().st_size)
    before = sorted(p.name for p in run.rglob("*"))
    assert main([*argv, "--out", str(run), "--resume"]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning:")]
    assert len(err) == 1 and "no checkpoint in" in err[0] and "does not match its checksum" in err[0]
    assert sorted(p.name for p in run.rglob("*")) == before
    shutil.rmtree(run)
