"""The study folder (``compare --out DIR``): what makes a folder a study, and each cell's status.

Kept apart from ``compare.py`` (which trains and evaluates) so that the rules that protect a user's
folder live in one small file, next to the run directory's own rules in ``training/rundir.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from tadistill.errors import RunDirError
from tadistill.fileio import atomic_write_text
from tadistill.study.config import StudyConfig

STUDY_FILE = "study.yaml"


# ------------------------------------------------------------------------------------------ status


def _status_path(out: Path, cell: str) -> Path:
    return out / "cells" / cell / "status.json"


def read_status(out: Path, cell: str) -> dict[str, Any]:
    path = _status_path(out, cell)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"state": "new"}


def write_status(out: Path, cell: str, state: str, **extra: Any) -> None:
    atomic_write_text(_status_path(out, cell), json.dumps({"state": state, **extra}, indent=2))


# ------------------------------------------------------------------------------------------ folder


def _comparable(study: dict) -> dict:
    """A study as compared on --resume: re-validated (so fields added with defaults since it was written
    compare equal), and without train.stop_at (which only splits the pass into jobs)."""
    study = StudyConfig.model_validate(study).model_dump(mode="json")
    study["train"].pop("stop_at", None)
    return study


def _prepare_study_dir(study: StudyConfig, out: Path, *, resume: bool, overwrite: bool, create: bool = True) -> None:
    """Refuse an --out that cannot take this study; with ``create``, then write it (study.yaml).

    Under several processes every one checks (so that all refuse alike) and only the main one creates.
    """
    path = out / STUDY_FILE
    resolved = yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pass one of them")
    if path.is_file():
        if resume:
            if _comparable(yaml.safe_load(path.read_text(encoding="utf-8"))) != _comparable(yaml.safe_load(resolved)):
                raise RunDirError(f"cannot resume {out}: it holds a different study; choose another --out")
            if create:
                atomic_write_text(path, resolved)
            return
        if not overwrite:
            raise RunDirError(f"{out} already holds a study: pass --resume to continue it, --overwrite to replace it")
        if create:
            shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        raise RunDirError(f"--out {out} exists and is not a tadistill study: choose another directory")
    elif resume:
        raise RunDirError(f"nothing to resume in {out}: it holds no study")
    if create:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, resolved)
