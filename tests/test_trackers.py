"""Trackers (``train.report_to``, issue 15 item 4): every logged row reaches every tracker; packages are optional."""

from __future__ import annotations

import json
from typing import ClassVar

import pytest

from tadistill.cli.main import main
from tadistill.training import trackers as T

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeTracker:
    """Records what the loop sends, with the interface of Accelerate's trackers."""

    made: ClassVar[list[FakeTracker]] = []

    def __init__(self, run_dir, run_name):
        self.run_dir, self.run_name = run_dir, run_name
        self.rows: list[tuple[int, dict]] = []
        self.config: dict = {}
        self.finished = False
        FakeTracker.made.append(self)

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step):
        self.rows.append((step, values))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_mlflow(monkeypatch):
    """'mlflow' served by FakeTracker (its package check passes on a module that exists)."""
    FakeTracker.made = []
    monkeypatch.setitem(T.PACKAGES, "mlflow", ("json", "mlflow"))
    monkeypatch.setitem(T.FACTORIES, "mlflow", FakeTracker)
    return FakeTracker


def test_every_logged_row_reaches_the_tracker(fake_mlflow, tiny_args, tmp_path):
    out = tmp_path / "run"
    args = tiny_args("train.steps=3", "train.eval_every=2", "train.report_to=[tensorboard, mlflow]")
    assert main(["distill", "hs", *args, "--out", str(out), "--no-progress"]) == 0
    (tracker,) = fake_mlflow.made
    assert tracker.finished and tracker.run_name == "run"
    assert tracker.config["train.steps"] == 3 and tracker.config["recipe"] == "hs"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [(r["step"], {k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float))}) for r in rows]
    assert tracker.rows == expected
    assert {"loss", "eval/loss", "lr"} <= {k for _, values in tracker.rows for k in values}
    assert any((out / "tensorboard").iterdir())  # the TensorBoard writer still writes its events


def test_no_tracker_writes_only_the_metrics_log(tiny_args, tmp_path):
    out = tmp_path / "run"
    assert main(["distill", "hs", *tiny_args("train.report_to=[]"), "--out", str(out), "--no-progress"]) == 0
    assert (out / "metrics.jsonl").is_file() and not (out / "tensorboard").exists()


def test_a_missing_tracker_package_is_one_line(monkeypatch, tiny_args, tmp_path, capsys):
    monkeypatch.setitem(T.PACKAGES, "wandb", ("tadistill_no_such_module", "wandb"))
    out = tmp_path / "run"
    assert main(["distill", "hs", *tiny_args("train.report_to=[tensorboard, wandb]"), "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: train.report_to lists wandb but the package is not installed: pip install wandb (or "
                   "remove it from train.report_to)")
    assert not out.exists()


def test_unknown_tracker_is_refused_by_the_config():
    from tadistill.config import TrainConfig

    with pytest.raises(ValueError, match="report_to"):
        TrainConfig(report_to=["neptune"])


def test_rows_send_numbers_only_and_flatten_config(tmp_path, fake_mlflow):
    trackers = T.Trackers(["mlflow"], tmp_path, config={"train": {"lr": 1e-3, "betas": [0.9, 0.99]}, "seed": 1})
    trackers.log({"step": 4, "loss": 1.5, "failed": "loss is nan", "flag": True})
    trackers.log({"step": 5, "failed": "text only"})
    (tracker,) = fake_mlflow.made
    assert tracker.rows == [(4, {"loss": 1.5})]
    assert tracker.config == {"train.lr": 1e-3, "train.betas": "[0.9, 0.99]", "seed": 1}
    trackers.close()
    assert tracker.finished


def test_mlflow_file_store_offline(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trackers = T.Trackers(["mlflow"], tmp_path, run_name="lane", config={"train": {"lr": 0.1}})
    trackers.log({"step": 1, "loss": 2.0})
    trackers.log({"step": 2, "loss": 1.0})
    trackers.close()
    client = mlflow.tracking.MlflowClient((tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tadistill").experiment_id])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [2.0, 1.0]
