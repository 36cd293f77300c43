"""Checkpoints without pickle: state trees, the manifest, fallback to an intact checkpoint, disk full.

A real (single-process) Accelerator with a tiny model and AdamW; the end-to-end path through the CLI is in
test_crash.py and at the end of this file.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import stat

import pytest
import torch
from torch import nn

from tadistill.errors import RunDirError
from tadistill.fileio import sha256_of
from tadistill.training import checkpoint as ckpt
from tadistill.training.checkpoint import (
    MANIFEST,
    checkpoint_dirs,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from tadistill.training.setup import new_accelerator
from tadistill.training.statefile import StateFileError, load_tree, save_tree

pytestmark = pytest.mark.usefixtures("one_thread")


class Planted:
    """A pickle that, when unpickled, creates a folder: the evidence that something ran code from it."""

    def __init__(self, evidence):
        self.evidence = str(evidence)

    def __reduce__(self):
        return os.mkdir, (self.evidence,)


def _trained(seed: int = 0, steps: int = 2):
    """A prepared tiny model and AdamW after ``steps`` updates (so the optimizer has moments and a step)."""
    torch.manual_seed(seed)
    acc = new_accelerator("no")
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model[2].weight = nn.Parameter(model[2].weight)  # its own tensor; the tied case is below
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    model, optimizer = acc.prepare(model, optimizer)
    for _ in range(steps):
        loss = model(torch.randn(4, 5)).pow(2).mean()
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return acc, model, optimizer


def _extra():
    return {"rng": {"cpu": torch.get_rng_state()}, "tokens_seen": 96, "failed": None,
            "lanes": {"student": {"scheduler": {"last_epoch": 2, "base_lrs": [0.01], "_last_lr": [0.005]},
                                  "methods": {"replay": {"tokens": torch.arange(7), "lengths": [3, 4],
                                                         "entries": [torch.tensor([1, 2]), torch.tensor([3])]}}}}}


def _save(acc, folder, step, keep=3, extra=None):
    return save_checkpoint(acc, folder, step, config_yaml="recipe: hs\n", keep=keep,
                           extra=_extra() if extra is None else extra)


def _same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return (a != a and b != b) or (type(a) is type(b) and a == b)  # NaN equals NaN here


# ------------------------------------------------------------------------------------ state trees


def test_state_tree_round_trip_is_exact(tmp_path):
    _, _, optimizer = _trained()
    tree = {
        "optimizer": optimizer.state_dict(),  # int keys, tuples (betas), 0-dim step tensors
        "python_rng": random.getstate(),  # a tuple of 625 ints
        "odd": [float("nan"), float("inf"), -0.0, True, 1, "x", None, (), []],
        "dtypes": [torch.zeros(0, dtype=torch.int64), torch.ones(2, 3, dtype=torch.bfloat16),
                   torch.get_rng_state(), torch.tensor([True, False]), torch.arange(6).view(2, 3).t()],
        "__looks_like_a_tag": {"__tensor__": "0"},
        7: "int key",
    }
    save_tree(tree, tmp_path / "t.safetensors")
    back = load_tree(tmp_path / "t.safetensors")
    assert _same_tree(tree, back)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert back["python_rng"] == random.getstate()


def test_state_tree_refuses_what_it_cannot_store_exactly(tmp_path):
    with pytest.raises(TypeError, match=r"lanes\.x is a set"):
        save_tree({"lanes": {"x": {1, 2}}}, tmp_path / "t.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(StateFileError, match="not a readable safetensors file"):
        load_tree(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------------ save / load


def test_restore_brings_back_weights_optimizer_and_extra_and_writes_no_pickle(tmp_path):
    acc, model, optimizer = _trained()
    extra = _extra()
    folder = tmp_path / "checkpoints"
    os.umask(0o022)
    path = _save(acc, folder, 2, extra=extra)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = optimizer.state_dict()

    acc2, model2, optimizer2 = _trained(seed=1, steps=1)  # another state, to be overwritten
    restored, step, back = restore_checkpoint(acc2, folder)
    assert (restored, step) == (path, 2)
    assert _same_tree(back, extra)
    assert all(torch.equal(weights[k], v) for k, v in model2.state_dict().items())
    assert _same_tree(optimizer2.state_dict(), moments)
    names = sorted(p.name for p in path.iterdir())
    assert names == ["config.yaml", "extra_0.safetensors", MANIFEST, "model.safetensors", "optimizer.safetensors",
                     "trainer_state.json"]
    for file in path.iterdir():  # the user's umask, not safetensors' 0600
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file.name


def test_tied_weights_are_saved_once_and_restored(tmp_path):
    acc = new_accelerator("no")
    embed = nn.Embedding(11, 4)
    head = nn.Linear(4, 11, bias=False)
    head.weight = embed.weight
    model = acc.prepare(nn.ModuleDict({"embed": embed, "head": head}))
    path = _save(acc, tmp_path / "c", 1)
    with torch.no_grad():
        embed.weight.add_(1.0)
    restore_checkpoint(acc, tmp_path / "c")
    assert model.head.weight is model.embed.weight
    assert path.joinpath("model.safetensors").stat().st_size < 11 * 4 * 4 * 2  # one copy, not two


def test_keep_prunes_oldest_and_a_step_saved_again_is_replaced(tmp_path):
    acc, _, _ = _trained()
    folder = tmp_path / "c"
    for step in (1, 2, 3):
        _save(acc, folder, step, keep=2)
    assert [p.name for p in checkpoint_dirs(folder)] == ["step-00000002", "step-00000003"]
    _save(acc, folder, 3, keep=2, extra={"again": True})
    assert restore_checkpoint(acc, folder)[2] == {"again": True}
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000002", "step-00000003"]  # no leftovers


# --------------------------------------------------------------------------------------- fallback


def test_damaged_newest_falls_back_to_the_previous_with_a_warning(tmp_path, capsys):
    acc, _, _ = _trained()
    folder = tmp_path / "c"
    _save(acc, folder, 1, extra={"step": 1})
    newest = _save(acc, folder, 2, extra={"step": 2})
    model_file = newest / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated, as by a full disk or a copy cut short
    path, step, extra = restore_checkpoint(acc, folder)
    assert (path.name, step, extra) == ("step-00000001", 1, {"step": 1})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-00000002" in err[0] and "model.safetensors is truncated" in err[0]


@pytest.mark.parametrize("damage, reason", [
    (lambda p: (p / "trainer_state.json").unlink(), "trainer_state.json is missing"),
    (lambda p: (p / "extra_0.safetensors").write_bytes(b"garbage" * 9999), "extra_0.safetensors has 69993 bytes"),
    (lambda p: (p / MANIFEST).unlink(), "no manifest.json"),
    (lambda p: (p / MANIFEST).write_text("{"), "manifest.json is damaged"),
    (lambda p: (p / "optimizer.safetensors").write_bytes(  # same size, other bytes
        bytes(b ^ 1 for b in (p / "optimizer.safetensors").read_bytes())), "does not match its checksum"),
])
def test_every_kind_of_damage_is_detected_and_none_left_is_one_line(damage, reason, tmp_path):
    acc, _, _ = _trained()
    folder = tmp_path / "c"
    damage(_save(acc, folder, 1))
    assert reason in verify_checkpoint(folder / "step-00000001")
    with pytest.raises(RunDirError) as info:
        restore_checkpoint(acc, folder)
    message = str(info.value)
    assert "\n" not in message and "no checkpoint in" in message and reason in message and "--overwrite" in message


def test_no_checkpoint_at_all_is_none(tmp_path):
    acc, _, _ = _trained()
    assert restore_checkpoint(acc, tmp_path / "missing") is None
    (tmp_path / "c" / ".step-00000003.tmp").mkdir(parents=True)  # a save killed midway is not a checkpoint
    assert restore_checkpoint(acc, tmp_path / "c") is None
    assert latest_checkpoint(tmp_path / "c") is None


# ------------------------------------------------------------------------------------ no unpickling


def _plant(path, name, evidence):
    """Replace (or add) ``name`` with a malicious pickle, and re-sign the manifest so the loader reads it."""
    if name != MANIFEST:
        (path / name).write_bytes(pickle.dumps(Planted(evidence)))
        manifest = json.loads((path / MANIFEST).read_text())
        manifest["files"][name] = {"size": (path / name).stat().st_size, "sha256": sha256_of(path / name)}
        (path / MANIFEST).write_text(json.dumps(manifest))
    else:
        (path / name).write_bytes(pickle.dumps(Planted(evidence)))


def test_the_planted_pickle_does_run_code_when_unpickled(tmp_path):
    """The control: without it the tests below could pass with a pickle that does nothing."""
    pickle.loads(pickle.dumps(Planted(tmp_path / "pwned")))
    assert (tmp_path / "pwned").is_dir()


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "extra_0.safetensors",
                                  "trainer_state.json", "config.yaml", MANIFEST,
                                  # Accelerate's names, which older checkpoints held and its loader unpickles
                                  "random_states_0.pkl", "custom_checkpoint_0.pkl", "optimizer.bin", "extra_0.pt"])
def test_a_planted_pickle_is_never_executed(name, tmp_path, capsys):
    acc, _, _ = _trained()
    folder = tmp_path / "c"
    _save(acc, folder, 1, extra={"step": 1})
    newest = _save(acc, folder, 2, extra={"step": 2})
    evidence = tmp_path / "pwned"
    _plant(newest, name, evidence)
    path, step, _ = restore_checkpoint(acc, folder)
    assert not evidence.exists()
    # Files tadistill never reads change nothing; any other one makes the checkpoint unusable: the previous one is used.
    unused = name in ("config.yaml", "random_states_0.pkl", "custom_checkpoint_0.pkl", "optimizer.bin", "extra_0.pt")
    assert step == (2 if unused else 1), capsys.readouterr().err


# ------------------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    "safetensors",  # safetensors reports ENOSPC in its own exception type
])
def test_disk_full_while_saving_is_one_line_and_leaves_no_partial_checkpoint(failure, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    acc, _, _ = _trained()
    folder = tmp_path / "c"
    _save(acc, folder, 1)
    if failure == "safetensors":
        failure = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(ckpt, "save_tree", full)
    with pytest.raises(RunDirError) as info:
        _save(acc, folder, 2)
    message = str(info.value)
    assert message.startswith("no space left while writing checkpoint 2") and "\n" not in message
    assert "step-00000001 is intact" in message
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000001"]  # the .step-2.tmp folder is gone
    monkeypatch.undo()
    assert restore_checkpoint(acc, folder)[1] == 1


def test_a_value_that_cannot_be_saved_is_a_bug_not_a_full_disk(tmp_path):
    acc, _, _ = _trained()
    with pytest.raises(TypeError, match="is a object"):
        _save(acc, tmp_path / "c", 1, extra={"x": object()})
    assert list((tmp_path / "c").iterdir()) == []


# ------------------------------------------------------------------------------------- through the CLI


def test_resume_through_the_cli_ignores_planted_pickles_and_skips_a_poisoned_checkpoint(tiny_args, tmp_path, capsys):
    from tadistill.cli.main import main

    args = ["distill", "hs", *tiny_args("train.steps=3", "train.save_every=1", "train.eval_every=0"), "--no-progress"]
    out = tmp_path / "run"
    assert main([*args, "--set", "train.stop_at=2", "--out", str(out)]) == 0
    evidence = tmp_path / "pwned"
    older, newest = checkpoint_dirs(out / "checkpoints")
    for name in [p.name for p in newest.iterdir() if p.name != MANIFEST]:
        _plant(newest, name, evidence)  # every file of the newest checkpoint is a malicious pickle, re-signed
    for name in ("random_states_0.pkl", "custom_checkpoint_0.pkl", "optimizer.bin", "extra_0.pt", "scheduler.bin"):
        _plant(older, name, evidence)  # the older one is intact, plus pickles under Accelerate's names
    capsys.readouterr()
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert not evidence.exists()
    err = capsys.readouterr().err
    assert "skipped checkpoint" in err and newest.name in err and "cannot be loaded" in err  # read, not run
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # resumed after step 1, not from scratch


@pytest.mark.slow
def test_two_processes_save_and_resume_their_own_state(tiny_args, tiny_teacher_no_dropout, tmp_path):
    """Under torchrun each process writes and reads back its own extra_<rank>; the resumed pair ends where one
    process with the same global batch ends (up to float summation order, as in test_distributed.py)."""
    import signal
    import subprocess
    import sys

    from tadistill.cli.main import main

    args = ["distill", "hs", *tiny_args("train.steps=4", "train.save_every=1", "train.eval_every=0",
                                        teacher=tiny_teacher_no_dropout), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    two = tmp_path / "two"

    def launch(*extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "tadistill", *args, "--set", "train.batch_size=2", *extra, "--out", str(two)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        assert proc.returncode == 0, err[-3000:]

    launch("--set", "train.stop_at=2")
    newest = checkpoint_dirs(two / "checkpoints")[-1]
    assert sorted(p.name for p in newest.glob("extra_*")) == ["extra_0.safetensors", "extra_1.safetensors"]
    assert load_tree(newest / "extra_0.safetensors")["rng"]["cpu"].dtype == torch.uint8
    launch("--resume")
    one = tmp_path / "one"
    assert main([*args, "--set", "train.batch_size=4", "--out", str(one)]) == 0

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert len(losses(two)) == 4
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=1e-5, atol=1e-7)
