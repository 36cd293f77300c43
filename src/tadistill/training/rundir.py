"""The run directory: what a run leaves on disk, and the rules that keep it from being lost.

Layout of ``--out DIR``::

    DIR/config.yaml          resolved config (also copied into every checkpoint)
    DIR/metrics.jsonl        one JSON object per logged step / evaluation
    DIR/tensorboard/         TensorBoard events
    DIR/checkpoints/step-N/  Accelerate state (model, optimizer, scheduler, RNG) + trainer_state.json
    DIR/student/             the final student: save_pretrained + the teacher's tokenizer
    DIR/summary.json         parameters, held-out loss at start and end, fidelity

Rules: a directory that holds a different run is never overwritten silently (``--overwrite`` or
``--resume`` must be given), a directory that is not a tadistill run is never deleted, and every file
is written atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from tadistill.config import RESUMABLE_FIELDS, DistillConfig
from tadistill.errors import RunDirError
from tadistill.fileio import atomic_write_text

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


def config_to_yaml(config: DistillConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _differences(old: dict, new: dict, prefix: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ, ignoring the fields a resume may change."""
    out = []
    for key in sorted(set(old) | set(new)):
        path = (*prefix, key)
        if path in RESUMABLE_FIELDS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, path)
        elif a != b:
            out.append(f"{'.'.join(path)}: {a!r} -> {b!r}")
    return out


class RunDir:
    """Paths of one run plus the metrics log."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.json"

    # ------------------------------------------------------------------------------------ lifecycle

    def check(self, config: DistillConfig, *, resume: bool, overwrite: bool) -> None:
        """Raise unless ``prepare`` with the same arguments may proceed; changes nothing on disk."""
        if resume and overwrite:
            raise RunDirError("--resume and --overwrite contradict each other: pass one of them")
        root = self.root
        is_run = self.config_path.is_file()
        non_empty = root.exists() and any(root.iterdir())
        if root.exists() and not root.is_dir():
            raise RunDirError(f"--out {root} is a file: choose a directory")
        if resume:
            if not is_run:
                raise RunDirError(f"nothing to resume in {root}: it holds no tadistill run (no {CONFIG_FILE})")
            stored = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
            diff = _differences(stored, config.model_dump(mode="json"))
            if diff:
                shown = "; ".join(diff[:3]) + (" ..." if len(diff) > 3 else "")
                raise RunDirError(
                    f"cannot resume {root}: its config differs ({shown}); resume with the same settings "
                    "or choose another --out"
                )
        elif non_empty:
            if not is_run:
                raise RunDirError(f"--out {root} exists and is not a tadistill run: choose another directory")
            if not overwrite:
                raise RunDirError(
                    f"{root} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                    "or choose another --out"
                )

    def prepare(self, config: DistillConfig, *, resume: bool, overwrite: bool) -> None:
        """Create the run directory (replacing a run of ours only with ``overwrite``); raise when refused."""
        self.check(config, resume=resume, overwrite=overwrite)
        root = self.root
        if overwrite and self.config_path.is_file():
            # The user asked for it, and the folder is a run of ours: remove it whole.
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, config_to_yaml(config))

    # -------------------------------------------------------------------------------------- metrics

    def log(self, row: dict[str, Any]) -> None:
        """Append one row to metrics.jsonl (flushed, so a crash keeps everything logged so far)."""
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def truncate_metrics(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run replays those steps exactly)."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
