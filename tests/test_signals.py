"""SIGTERM / SIGINT: a real signal to a real run writes a checkpoint, and --resume ends where a straight run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tadistill.cli.main import main
from tadistill.training.signals import StopSignals

pytestmark = pytest.mark.usefixtures("one_thread")


def _losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_stop_signals_set_a_flag_and_restore_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_and_resume_matches_a_straight_run(sig, tiny_args, tmp_path):
    args = tiny_args("train.steps=400", "train.save_every=0", "train.eval_every=0", "train.log_every=1",
                     "objectives.minilmv2.relation_heads=4")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tadistill", "distill", "minilmv2", *args, "--out", str(out),
                             "--no-progress"], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training is under way
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(_losses(out)) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    stopped = _losses(out)[-1][0]
    assert 3 <= stopped < 400 and "--resume" in err
    assert (out / "checkpoints" / f"step-{stopped:08d}").is_dir()
    # Resume to a short end, and compare with a straight run to the same end.
    end = stopped + 3
    assert main(["distill", "minilmv2", *args, "--set", f"train.stop_at={end}", "--out", str(out), "--resume",
                 "--no-progress"]) == 0
    straight = tmp_path / "straight"
    assert main(["distill", "minilmv2", *args, "--set", f"train.stop_at={end}", "--out", str(straight),
                 "--no-progress"]) == 0
    assert _losses(out) == _losses(straight)
