"""The study folder (``compare --out DIR``): what makes a folder a study, its lock, and each cell's status.

Kept apart from ``compare.py`` (which trains and evaluates) so that the rules that protect a user's
folder live in one small file, next to the run directory's own rules in ``training/rundir.py``:
a study is recognised by the marker ``.tadistill-run`` (kind ``study``), ``--overwrite`` removes only
``STUDY_CONTENTS``, one process at a time holds the folder (``study_lock``), and ``--resume`` accepts
a study whose training settings are the same, whatever its ``evaluation:`` says (the students are
then evaluated again with the new settings, without retraining).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tadistill.errors import RunDirError
from tadistill.fileio import atomic_write_text
from tadistill.outdir import MARKER, check_out_path, hold_lock, read_marker, remove_contents, user_entries, write_marker
from tadistill.study.config import StudyConfig

STUDY_FILE = "study.yaml"
# Everything ``compare`` writes into a study folder: what --overwrite may remove.
STUDY_CONTENTS = (STUDY_FILE, "cells", "checkpoints", "pass.json", "report", MARKER)


@contextmanager
def study_lock(out: str | Path) -> Iterator[None]:
    """Hold the study folder for the whole study (see ``outdir.hold_lock``); a second process is refused."""
    with hold_lock(out, what="study"):
        yield


# ------------------------------------------------------------------------------------------ status


def _status_path(out: Path, cell: str) -> Path:
    return out / "cells" / cell / "status.json"


def read_status(out: Path, cell: str) -> dict[str, Any]:
    path = _status_path(out, cell)
    if not path.is_file():
        return {"state": "new"}
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        status = None
    if not isinstance(status, dict) or not isinstance(status.get("state"), str):
        raise RunDirError(f"{path} is damaged: delete the folder {path.parent} to train that cell again")
    return status


def write_status(out: Path, cell: str, state: str, **extra: Any) -> None:
    atomic_write_text(_status_path(out, cell), json.dumps({"state": state, **extra}, indent=2))


def _trained(out: Path, cell: str) -> bool:
    """Whether the cell's student was saved completely (summary.json is written after it)."""
    folder = out / "cells" / cell
    return (folder / "student" / "config.json").is_file() and (folder / "summary.json").is_file()


def _evaluate_again(out: Path, *, all_cells: bool) -> None:
    """Mark trained students for evaluation: those whose evaluation failed, or (``all_cells``) every one."""
    cells = out / "cells"
    if not cells.is_dir():
        return
    for folder in sorted(p for p in cells.iterdir() if p.is_dir()):
        state = read_status(out, folder.name)["state"]
        if _trained(out, folder.name) and (state == "failed" or (all_cells and state == "evaluated")):
            write_status(out, folder.name, "trained")


# ------------------------------------------------------------------------------------------ folder


def _comparable(study: dict) -> dict:
    """A study as compared on --resume: re-validated (so fields added with defaults since it was written
    compare equal), without train.stop_at (which only splits the pass into jobs) and without evaluation
    (which may change: the trained students are evaluated again)."""
    study = StudyConfig.model_validate(study).model_dump(mode="json")
    study["train"].pop("stop_at", None)
    study.pop("evaluation", None)
    return study


def _stored_study(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        StudyConfig.model_validate(data)
        return data
    except FileNotFoundError:
        raise RunDirError(f"nothing to resume in {path.parent}: it holds no {STUDY_FILE}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValidationError):
        raise RunDirError(f"{path} is damaged: restore it, or start again with --overwrite or another --out") from None


def _prepare_study_dir(study: StudyConfig, out: Path, *, resume: bool, overwrite: bool, create: bool = True) -> None:
    """Refuse an --out that cannot take this study; with ``create``, then write it (marker, study.yaml).

    Under several processes every one checks (so that all refuse alike) and only the main one creates.
    """
    path = out / STUDY_FILE
    resolved = yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pass one of them")
    check_out_path(out)
    marker = read_marker(out)
    if marker is not None and marker["kind"] != "study":
        raise RunDirError(f"{out} holds a tadistill {marker['kind']}, not a study: choose another --out")
    entries = user_entries(out)
    if marker is None and STUDY_FILE in entries:
        raise RunDirError(f"--out {out} holds a {STUDY_FILE} but no {MARKER} marker, so it is not a tadistill study "
                          "(or one written before studies were marked, which cannot be resumed safely): it is left "
                          "alone; choose another directory")
    if resume:
        if marker is None:
            raise RunDirError(f"nothing to resume in {out}: it holds no study")
        stored = _stored_study(path)
        if _comparable(stored) != _comparable(yaml.safe_load(resolved)):
            raise RunDirError(f"cannot resume {out}: it holds a different study; choose another --out")
        if create:
            changed = StudyConfig.model_validate(stored).evaluation != study.evaluation
            _evaluate_again(out, all_cells=changed)
            if changed:
                (out / "report" / "teacher.json").unlink(missing_ok=True)  # scored with the old settings
            atomic_write_text(path, resolved)
        return
    if marker is None and entries:
        raise RunDirError(f"--out {out} exists and is not a tadistill study: choose another directory")
    if marker is not None and STUDY_FILE in entries and not overwrite:
        raise RunDirError(f"{out} already holds a study: pass --resume to continue it, --overwrite to replace it")
    if create:
        if marker is not None:
            remove_contents(out, STUDY_CONTENTS)
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, "study")
        atomic_write_text(path, resolved)
