"""The run directory: what a run leaves on disk, and the rules that keep it from being lost.

Layout of ``--out DIR``::

    DIR/.tadistill-run       marker: this folder is a tadistill run (JSON: format, kind, created)
    DIR/.tadistill-lock      held (flock) by the process running in DIR; removed when it ends
    DIR/config.yaml          resolved config (also copied into every checkpoint)
    DIR/metrics.jsonl        one JSON object per logged step / evaluation
    DIR/tensorboard/         TensorBoard events
    DIR/checkpoints/step-N/  model, optimizer and per-process state (safetensors + JSON) + manifest.json
    DIR/student/             the final student: save_pretrained + the teacher's tokenizer
    DIR/summary.json         parameters, held-out loss at start and end, fidelity

Rules (see ``tadistill/outdir.py``): a folder is a run only if it holds the marker; a run is never
replaced silently (``--overwrite`` or ``--resume`` must be given) and ``--overwrite`` removes only
the names in ``RUN_CONTENTS``, never the user's other files; a folder that is not a run is never
touched; one process at a time (``lock``); every file is written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tadistill.config import RESUMABLE_FIELDS, DistillConfig
from tadistill.errors import RunDirError
from tadistill.fileio import atomic_write_text
from tadistill.outdir import MARKER, check_out_path, hold_lock, read_marker, remove_contents, user_entries, write_marker

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
# Everything tadistill writes into a run directory: what --overwrite may remove.
RUN_CONTENTS = (
    CONFIG_FILE, METRICS_FILE, "tensorboard", "checkpoints", "student", "summary.json", "modules.safetensors",
    "evaluation", "assistant", "stages", "status.json", MARKER,
)


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


def _with_defaults(stored: dict) -> dict:
    """A saved config with the fields added since it was written at their defaults, so that a run started before
    an upgrade resumes (a field it could not have set is no difference); as saved if it no longer validates."""
    try:
        return DistillConfig.model_validate(stored).model_dump(mode="json")
    except ValueError:
        return stored


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

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold this run directory for the whole run: a second process gets a RunDirError naming the holder.

        Take it before ``check``: it works before the folder exists (and removes the folder again if
        the run is refused before writing anything). Re-entrant within one process.
        """
        with hold_lock(self.root, what="run"):
            yield

    def stored_config(self) -> dict[str, Any]:
        """The config.yaml of this run, parsed; one line when it is missing, unreadable or not a config."""
        path = self.config_path
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunDirError(f"{path} is missing: the run cannot be resumed; start again with --overwrite "
                              "or choose another --out") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            reason = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else "not valid YAML"
            if isinstance(exc, OSError):
                reason = f"unreadable ({exc.strerror})"
            raise RunDirError(f"{path} is {reason}: restore it, or start again with --overwrite or another "
                              "--out") from None
        if not isinstance(data, dict):
            raise RunDirError(f"{path} is {'empty' if data is None else 'not a config'}: restore it, or start "
                              "again with --overwrite or another --out")
        return data

    def check(self, config: DistillConfig, *, resume: bool, overwrite: bool) -> None:
        """Raise unless ``prepare`` with the same arguments may proceed; changes nothing on disk."""
        if resume and overwrite:
            raise RunDirError("--resume and --overwrite contradict each other: pass one of them")
        root = self.root
        check_out_path(root)
        marker = read_marker(root)
        if marker is not None and marker["kind"] != "run":
            raise RunDirError(f"{root} holds a tadistill {marker['kind']}, not a run: choose another --out")
        entries = user_entries(root)
        if marker is None and CONFIG_FILE in entries:
            # A run written before the marker existed (or a user's folder that happens to hold a config.yaml):
            # neither can be told apart from the other, so neither is resumed nor deleted.
            raise RunDirError(f"--out {root} holds a config.yaml but no {MARKER} marker, so it is not a tadistill "
                              "run (or one written before runs were marked, which cannot be resumed safely): it is "
                              "left alone; choose another directory")
        if resume:
            if marker is None:
                raise RunDirError(f"nothing to resume in {root}: it holds no tadistill run")
            diff = _differences(_with_defaults(self.stored_config()), config.model_dump(mode="json"))
            if diff:
                shown = "; ".join(diff[:3]) + (" ..." if len(diff) > 3 else "")
                raise RunDirError(
                    f"cannot resume {root}: its config differs ({shown}); resume with the same settings "
                    "or choose another --out"
                )
        elif marker is None and entries:
            raise RunDirError(f"--out {root} exists and is not a tadistill run: choose another directory")
        elif marker is not None and CONFIG_FILE in entries and not overwrite:
            raise RunDirError(
                f"{root} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                "or choose another --out"
            )

    def prepare(self, config: DistillConfig, *, resume: bool, overwrite: bool) -> None:
        """Create the run directory (replacing a run of ours only with ``overwrite``); raise when refused."""
        self.check(config, resume=resume, overwrite=overwrite)
        root = self.root
        if not resume and read_marker(root) is not None:
            # Ours (the marker says so), and the user asked to replace it (or it never got a config):
            # remove what a run writes, and only that.
            remove_contents(root, RUN_CONTENTS)
        root.mkdir(parents=True, exist_ok=True)
        if not (root / MARKER).is_file():
            write_marker(root, "run")  # first: from here on the folder is recognised as ours
        atomic_write_text(self.config_path, config_to_yaml(config))

    # -------------------------------------------------------------------------------------- metrics

    def log(self, row: dict[str, Any]) -> None:
        """Append one row to metrics.jsonl (flushed, so a crash keeps everything logged so far)."""
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl; a partial last line (a crash while appending it) is skipped."""
        if not self.metrics_path.exists():
            return []
        try:
            text = self.metrics_path.read_text(encoding="utf-8", errors="strict")
        except UnicodeDecodeError:
            text = self.metrics_path.read_bytes().decode("utf-8", errors="replace")
        lines = text.split("\n")
        rows = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict):
                if number == len(lines):  # no newline after it: the write was cut short
                    break
                raise RunDirError(f"{self.metrics_path} line {number} is not a JSON row: fix or remove that line")
            rows.append(row)
        return rows

    def truncate_metrics(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run replays those steps exactly) and a partial last line."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
