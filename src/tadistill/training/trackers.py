"""Experiment trackers: where the loop's logged rows go besides ``metrics.jsonl`` (``train.report_to``).

One ``Trackers`` object per lane, made by the main process when the loop starts and closed when it ends. The loop
calls ``log(row)`` with every row it writes to ``metrics.jsonl`` (training rows and evaluations alike); numeric
values go to each tracker at the row's step.

- ``tensorboard``: a ``SummaryWriter`` on ``RUN/tensorboard`` (the run directory's own folder, as before);
- every other name: Accelerate's tracker class of that name (``accelerate.tracking``: wandb, mlflow, trackio,
  comet_ml, aim, clearml, dvclive, swanlab), started directly, one run per lane, named after the run directory.

Each package is optional: ``check_trackers`` refuses a name whose package is missing, in one line saying what to
install, when the lane is built (before the run directory exists). Offline use: wandb honours
``WANDB_MODE=offline`` (its files go under the run directory); mlflow gets a file store in ``RUN/mlruns`` unless
``MLFLOW_TRACKING_URI`` is set; trackio is local by default; aim writes into the run directory.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tadistill.errors import ConfigError

# report_to name -> the module it imports (for the check) and the pip package that provides it.
PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
}


def check_trackers(names: list[str]) -> None:
    """Refuse, in one line, a tracker whose package is not installed."""
    missing = [name for name in names if importlib.util.find_spec(PACKAGES[name][0]) is None]
    if missing:
        packages = " ".join(PACKAGES[name][1] for name in missing)
        raise ConfigError(f"train.report_to lists {', '.join(missing)} but the package is not installed: pip install "
                          f"{packages} (or remove it from train.report_to)")


class _TensorBoard:
    """The run directory's TensorBoard writer, with the interface of Accelerate's trackers (log / finish)."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self) -> None:
        self.writer.close()


def _accelerate_tracker(name: str, run_dir: Path, run_name: str) -> Any:
    """Accelerate's tracker ``name`` for one lane, started; its files (if any) under the run directory."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls = LOGGER_TYPE_TO_CLASS[name]
    if name == "wandb":
        os.environ.setdefault("WANDB_DIR", str(run_dir))  # offline runs (WANDB_MODE=offline) write their files here
        tracker = cls("tadistill", name=run_name)
    elif name == "mlflow":
        if "MLFLOW_TRACKING_URI" not in os.environ:
            import mlflow

            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())  # a local file store, no server
        tracker = cls(experiment_name="tadistill", run_name=run_name)
    elif cls.requires_logging_directory:  # aim, and tensorboard if it were not ours
        tracker = cls(run_name, str(run_dir))
    else:
        tracker = cls(run_name)
    tracker.start()
    return tracker


# Name -> factory(run_dir, run_name); tests add fakes here.
FACTORIES: dict[str, Callable[[Path, str], Any]] = {
    "tensorboard": lambda run_dir, _: _TensorBoard(run_dir / "tensorboard"),
}


class Trackers:
    """The trackers of one lane: ``log(row)`` each logged row, ``close()`` at the end.

    ``run_dir``: the lane's run directory; ``run_name``: how the trackers name the run; ``config``: the resolved
    config, stored as the run's hyperparameters where a tracker keeps them (flattened, dotted keys).
    """

    def __init__(self, names: list[str], run_dir: Path, *, run_name: str | None = None,
                 config: dict[str, Any] | None = None):
        run_dir = Path(run_dir)
        run_name = run_name or run_dir.resolve().name
        self.trackers: dict[str, Any] = {}
        for name in dict.fromkeys(names):
            factory = FACTORIES.get(name)
            tracker = factory(run_dir, run_name) if factory else _accelerate_tracker(name, run_dir, run_name)
            if config and hasattr(tracker, "store_init_configuration"):
                tracker.store_init_configuration(flatten(config))
            self.trackers[name] = tracker

    def log(self, row: dict[str, Any]) -> None:
        """Send a metrics row's numbers at its step (text values such as a failure message stay in metrics.jsonl)."""
        values = {k: v for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not values:
            return
        for tracker in self.trackers.values():
            tracker.log(values, step=int(row["step"]))

    def close(self) -> None:
        for tracker in self.trackers.values():
            tracker.finish()
        self.trackers = {}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}; lists become strings (trackers take scalars only)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = str(value)
        else:
            out[name] = value
    return out
