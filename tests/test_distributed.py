"""Data parallelism: two CPU processes (gloo, launched by torchrun) give the losses and weights of one process
(hidden states, MiniLMv2 relations, and on-policy GKD with sampling in each process).

Each process takes every other micro-batch of the same order and the loss is divided by the global
token count, so 2 processes x batch 2 must equal 1 process x batch 4 (and 1 process x batch 2 x 2
accumulation steps) up to float summation order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tadistill.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def _two_processes(args: list[str], out: Path) -> None:
    """``tadistill distill ARGS`` in two gloo CPU processes under torchrun."""
    _launch(["distill", *args], out)


def _launch(args: list[str], out: Path) -> str:
    """``tadistill ARGS`` in two gloo CPU processes under torchrun (killed whole if it hangs); its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tadistill", *args, "--out", str(out), "--no-progress"]
    # A new session, so that a hung launch can be killed with all its workers.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    return stdout


@pytest.mark.parametrize("recipe", ["hs", "minilmv2"])
def test_two_processes_equal_one_with_the_same_global_batch(recipe, tiny_args, tiny_teacher_no_dropout, tmp_path):
    extra = ["train.steps=3", "objectives.minilmv2.relation_heads=4"] if recipe == "minilmv2" else ["train.steps=3"]
    args = tiny_args(*extra, teacher=tiny_teacher_no_dropout)
    one = tmp_path / "one"
    assert main(["distill", recipe, *args, "--set", "train.batch_size=4", "--out", str(one), "--no-progress"]) == 0
    two = tmp_path / "two"
    _two_processes([recipe, *args, "--set", "train.batch_size=2"], two)
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 3
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-7)
    w1, w2 = load_file(one / "student" / "model.safetensors"), load_file(two / "student" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed-zero2"])
def test_shipped_accelerate_configs_load(name):
    """The configs parse with Accelerate's own loader (unknown keys would raise) and name their engine."""
    from accelerate.commands.config.config_args import ClusterConfig

    path = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / f"{name}.yaml"
    config = ClusterConfig.from_yaml_file(str(path))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed-zero2": "DEEPSPEED"}[name]
    assert str(config.distributed_type).endswith(expected) and config.mixed_precision == "bf16"


def test_on_policy_sampling_in_two_processes_equals_accumulation(tiny_gpt2, tiny_corpus, tmp_path):
    """GKD: each process samples its own micro-batches from generators seeded by (seed, batch number), so two
    processes with batch 2 draw and train exactly what one process does with batch 2 x 2 accumulation steps."""
    sets = [f"teacher={tiny_gpt2}", f"data.source={tiny_corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_length=24", "data.heldout_fraction=0.2", "data.prompt_tokens=6", "train.steps=3",
            "train.batch_size=2", "train.eval_batches=1", "train.log_every=1", "student.num_layers=2",
            "on_policy.fraction=0.5"]
    args = ["gkd", *[a for s in sets for a in ("--set", s)]]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["distill", *args, "--set", "train.grad_accum=2", "--out", str(one), "--no-progress"]) == 0
    _two_processes(args, two)
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 3
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-7)
    w1, w2 = load_file(one / "student" / "model.safetensors"), load_file(two / "student" / "model.safetensors")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-6)


def test_study_in_two_processes_equals_one(tiny_teacher_no_dropout, tiny_corpus, tmp_path):
    """tadistill compare under torchrun: one shared pass, each process a share of every batch; the main process
    alone writes the study, evaluates and reports. The cells equal a one-process study with the global batch."""
    import yaml

    def study(batch_size: int) -> Path:
        path = tmp_path / f"study-{batch_size}.yaml"
        path.write_text(yaml.safe_dump({
            "name": "tiny", "teacher": str(tiny_teacher_no_dropout),
            "data": {"source": str(tiny_corpus), "max_length": 24, "heldout_fraction": 0.3,
                     "cache_dir": str(tmp_path / "cache")},
            "train": {"steps": 3, "batch_size": batch_size, "eval_every": 0, "save_every": 0, "eval_batches": 1,
                      "log_every": 1},
            "methods": [{"name": "hs", "recipe": "hs"},
                        {"name": "mlv2", "recipe": "minilmv2", "set": ["objectives.minilmv2.relation_heads=4"]}],
            "students": ["2x32"],
            "evaluation": {"tasks": [], "seeds": [0], "fidelity_texts": 12, "latency": False},
        }))
        return path

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["compare", str(study(4)), "--out", str(one), "--no-progress"]) == 0
    printed = _launch(["compare", str(study(2))], two)
    assert printed.count("report: ") == 1  # the main process alone prints
    assert (two / "report" / "study.md").is_file() and not (two / "pass.json").exists()
    for cell in ("hs_2x32", "mlv2_2x32"):
        a, b = _losses(one / "cells" / cell), _losses(two / "cells" / cell)
        assert len(a) == len(b) == 3
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-7)
