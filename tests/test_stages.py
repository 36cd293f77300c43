"""Chained stages in one config and one run directory (training/stages.py)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tadistill.cli.main import main


def _config(tmp_path, stages, **top):
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump({"recipe": "hs", "student": {"num_layers": 2, "hidden_size": 16, "num_heads": 4},
                                    "stages": stages, **top}))
    return str(path)


def _evals(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval/loss" in x]


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


STAGES = [{"name": "first", "set": ["train.steps=3"]},
          {"name": "second", "recipe": "hs", "set": ["train.steps=2", "train.lr=1e-3"], "carry_modules": True}]


def test_second_stage_starts_from_the_first_students_and_modules(tiny_args, tmp_path):
    out = tmp_path / "run"
    args = tiny_args("train.eval_every=0")
    assert main(["distill", "--config", _config(tmp_path, STAGES), *args, "--out", str(out), "--no-progress"]) == 0
    first, second = out / "stages" / "first", out / "stages" / "second"
    # Same student, same projections, same held-out batches: stage 2 starts exactly where stage 1 ended.
    assert _evals(second)[0]["eval/loss"] == _evals(first)[-1]["eval/loss"]
    assert (first / "modules.safetensors").is_file()
    final = _weights(out / "student")
    assert all(torch.equal(final[k], v) for k, v in _weights(second / "student").items())
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["first", "second"] and summary["steps"] == 2


def test_resume_continues_inside_a_stage(tiny_args, tmp_path):
    config = _config(tmp_path, STAGES)
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["distill", "--config", config, *tiny_args("train.save_every=1"), "--no-progress"]
    assert main([*common, "--out", str(straight)]) == 0
    assert main([*common, "--set", "train.stop_at=1", "--out", str(split)]) == 0  # stops inside stage 1
    assert not (split / "student").exists() and not (split / "stages" / "second").exists()
    assert main([*common, "--out", str(split), "--resume"]) == 0
    a, b = _weights(straight / "student"), _weights(split / "student")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "set": ["teacher=stage:nowhere"]}], "names no earlier stage"),
    ([{"name": "a"}, {"name": "a"}], "stage names must be unique"),
    ([{"name": "a", "set": ["train.stepz=3"]}], "stage a: unknown config key"),
    ([{"name": "../x"}], "stages.0.name"),
])
def test_bad_stages_are_one_line_errors(tiny_args, tmp_path, capsys, stages, message):
    out = tmp_path / "bad"
    code = main(["distill", "--config", _config(tmp_path, stages), *tiny_args(), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists()
