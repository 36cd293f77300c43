"""Data parallelism: two CPU processes (gloo, launched by torchrun) give the losses and weights of one process.

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


@pytest.mark.parametrize("recipe", ["hs", "minilmv2"])
def test_two_processes_equal_one_with_the_same_global_batch(recipe, tiny_args, tiny_teacher_no_dropout, tmp_path):
    extra = ["train.steps=3", "objectives.minilmv2.relation_heads=4"] if recipe == "minilmv2" else ["train.steps=3"]
    args = tiny_args(*extra, teacher=tiny_teacher_no_dropout)
    one = tmp_path / "one"
    assert main(["distill", recipe, *args, "--set", "train.batch_size=4", "--out", str(one), "--no-progress"]) == 0
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tadistill", "distill", recipe, *args, "--set", "train.batch_size=2", "--out", str(two),
           "--no-progress"]
    # A new session, so that a hung launch can be killed with all its workers.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
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
