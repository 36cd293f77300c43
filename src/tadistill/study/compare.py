"""``tadistill compare``: train every cell of a study in one pass, evaluate each student, write the report.

Study folder (``--out DIR``)::

    DIR/study.yaml              the resolved study
    DIR/cells/<method>_<shape>/ a run directory per cell (config, metrics, student, summary) + status.json
    DIR/checkpoints/            the shared pass (all lanes of one Accelerate state), written atomically
    DIR/pass.json               the cells of the current pass
    DIR/report/                 study table (Markdown, CSV), PNG plots, the resolved config of every cell

A cell that fails (a config that cannot work, a NaN loss, an evaluation error) is reported with its
one-line error and the others go on. ``--resume`` skips finished cells and continues an interrupted
pass from its last checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tadistill.config import DistillConfig
from tadistill.data.prepare import heldout_texts
from tadistill.data.sources import source_paths
from tadistill.errors import ConfigError, TadistillError
from tadistill.fileio import atomic_write_text
from tadistill.resolve import resolve_config
from tadistill.study.cells import Cell, replicate_cells, training_passes
from tadistill.study.config import StudyConfig
from tadistill.study.init_rows import save_init_students
from tadistill.study.studydir import _prepare_study_dir, read_status, study_lock, write_status
from tadistill.training.lane import SHARED_TRAIN_FIELDS
from tadistill.training.rundir import RunDir
from tadistill.training.setup import Cell as TrainCell
from tadistill.training.setup import RunSetup, new_accelerator


def load_study(path: str | Path) -> StudyConfig:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"study file {path} is a folder: give the study's YAML file (or use --example)")
    if not path.is_file():
        raise ConfigError(f"study file {path} not found: check the path (or use --example)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return StudyConfig.model_validate(data)
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigError(f"study file {path} is not valid YAML (or not UTF-8 text): fix the file") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"study {path}: {loc}: {err['msg'].removeprefix('Value error, ')}") from None


MULTILINGUAL_ALPHA = 0.3  # XLM-R's language smoothing (Conneau et al. 2020); a study's data.alpha overrides it


def _shared_overrides(study: StudyConfig) -> list[str]:
    out = [f"teacher={study.teacher}", f"trust_remote_code={str(study.trust_remote_code).lower()}"]
    data = dict(study.data)
    if study.languages:
        # Each language a source of its own, sampled like multilingual pre-training (data.alpha, default 0.3
        # when the study sets none) and reported per language.
        data["source"] = [{"path": src, "language": lang} for lang, src in study.languages.items()]
        data.setdefault("alpha", MULTILINGUAL_ALPHA)
    for key, value in data.items():
        out.append(f"data.{key}={json.dumps(value)}")
    train = dict(study.train)
    if study.budget is not None:
        if study.budget.steps:
            train["steps"] = study.budget.steps
        else:
            per_step = train.get("batch_size", 32) * data.get("max_length", 128) * train.get("grad_accum", 1)
            train["steps"] = max(1, study.budget.tokens // per_step)
    for key, value in train.items():
        out.append(f"train.{key}={json.dumps(value)}")
    return out


def expand_cells(study: StudyConfig) -> list[Cell]:
    """methods x students -> cells with resolved configs (a cell whose config fails carries its error)."""
    shared = _shared_overrides(study)
    cells = []
    for method in study.methods:
        for shape in study.students:
            name = f"{method.name}_{shape.name}"
            try:
                for assignment in method.set:
                    key = assignment.split("=", 1)[0].strip()
                    shared_key = key.startswith("train.") and key.split(".", 1)[1] in SHARED_TRAIN_FIELDS
                    if shared_key or key.startswith("data.") or key == "teacher":
                        raise ConfigError(f"method {method.name} sets {key}, which every cell of a study shares")
                config = resolve_config(method.recipe, overrides=[*method.set, *shared, *shape.overrides()])
                if config.stages or config.assistant.enabled:
                    raise ConfigError(f"method {method.name} is a chained run (stages or assistant.enabled): a study "
                                      "trains one stage per cell; run it with tadistill distill instead")
                cells.append(Cell(name, method.name, shape.name, config))
            except TadistillError as exc:
                cells.append(Cell(name, method.name, shape.name, None, str(exc)))
    return cells + replicate_cells(cells, study.noise)  # trained in passes of their own (training_passes)


# ------------------------------------------------------------------------------------------- train


def train_cells(cells: list[Cell], out: Path, *, progress: bool) -> None:
    """One pass over the data for every cell still to train; the teacher runs once per batch.

    Under several processes (torchrun, accelerate launch) every process trains its share of each batch,
    and only the main one writes the study's files.
    """
    todo = [c for c in cells if c.config is not None and read_status(out, c.name)["state"] == "new"]
    if not todo:
        return
    pass_file = out / "pass.json"
    resuming = pass_file.is_file()
    if resuming:
        names = json.loads(pass_file.read_text(encoding="utf-8"))["cells"]
        todo = [c for c in cells if c.name in names]
    state = new_accelerator(todo[0].config.train.precision)  # before any file is written: the processes' barriers

    def failed(cell: TrainCell, error: str) -> None:
        next(c for c in todo if c.name == cell.name).error = error
        if state.is_main_process:
            write_status(out, cell.name, "failed", error=error)

    setup = RunSetup([TrainCell(c.name, c.config, RunDir(out / "cells" / c.name)) for c in todo],
                     accelerator=state, on_error=failed)
    lanes = setup.lanes
    if not lanes:
        return
    state.wait_for_everyone()  # every process has read the study's state before the main one changes it
    if state.is_main_process:
        for lane in lanes:
            lane.run.prepare(lane.config, resume=resuming, overwrite=False)
        atomic_write_text(pass_file, json.dumps({"cells": [lane.name for lane in lanes]}))
    state.wait_for_everyone()
    result = setup.train(out / "checkpoints", progress=progress, drop_failed_lanes=True)
    state.wait_for_everyone()
    if result.stopped_early and any(lane.failed is None for lane in lanes):
        return  # train.stop_at: the pass continues with --resume
    for lane in lanes:
        if lane.failed:
            if state.is_main_process:
                write_status(out, lane.name, "failed", error=lane.failed)
            continue
        setup.finish(lane, result)  # every process takes part (the full weights are gathered); the main one saves
        if state.is_main_process:
            write_status(out, lane.name, "trained")
    state.wait_for_everyone()
    if state.is_main_process:
        pass_file.unlink()
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the students are saved; the pass is over
    state.wait_for_everyone()


# ---------------------------------------------------------------------------------------- evaluate


def evaluation_texts(study: StudyConfig, config: DistillConfig) -> dict[str, list[str]]:
    """Held-out texts for fidelity: one list, or one per language of a multilingual study."""
    limit = study.evaluation.fidelity_texts
    seed = config.train.seed
    if study.languages:
        return {lang: heldout_texts(src, config.data, seed=seed, limit=limit) for lang, src in study.languages.items()}
    source = source_paths(config.data.source)[0]
    return {"": heldout_texts(source, config.data, seed=seed, limit=limit)}


def evaluate_cells(study: StudyConfig, cells: list[Cell], out: Path) -> dict[str, Any]:
    """Evaluate the teacher once and every trained student with the same suite; results per cell."""
    from tadistill.evaluation.suite import EvaluationSuite

    configs = [c.config for c in cells if c.config is not None]
    if not configs:
        return {}
    suite = EvaluationSuite(
        teacher=study.teacher, texts=evaluation_texts(study, configs[0]), spec=study.evaluation,
        max_length=configs[0].data.max_length, trust_remote_code=study.trust_remote_code,
    )
    teacher_path = out / "report" / "teacher.json"
    if teacher_path.is_file():
        teacher_row = json.loads(teacher_path.read_text(encoding="utf-8"))
    else:
        teacher_row = suite.evaluate_teacher()
        atomic_write_text(teacher_path, json.dumps(teacher_row, indent=2))
    rows = {"teacher": teacher_row}
    for cell in cells:
        status = read_status(out, cell.name)
        if status["state"] == "trained":
            try:
                row = suite.evaluate_student(out / "cells" / cell.name / "student", teacher_row=teacher_row)
                write_status(out, cell.name, "evaluated", results=row)
                status = read_status(out, cell.name)
            except TadistillError as exc:
                write_status(out, cell.name, "failed", error=f"evaluation: {exc}")
                status = read_status(out, cell.name)
        rows[cell.name] = status
    return rows


# ------------------------------------------------------------------------------------------ public


def compare(study: StudyConfig, *, out: str | Path, resume: bool = False, overwrite: bool = False,
            progress: bool = True) -> Path:
    """Train, evaluate and report a study; return the report folder."""
    out = Path(out)
    with study_lock(out):  # one process per study folder (a second one is refused in one line)
        return _compare(study, out, resume=resume, overwrite=overwrite, progress=progress)


def _compare(study: StudyConfig, out: Path, *, resume: bool, overwrite: bool, progress: bool) -> Path:
    from tadistill.study.report import build_report

    cells = expand_cells(study)
    valid = [c.config for c in cells if c.config is not None]
    # One process, or one of several launched by torchrun / accelerate launch.
    state = new_accelerator(valid[0].train.precision if valid else "no")
    _prepare_study_dir(study, out, resume=resume, overwrite=overwrite, create=False)  # every process refuses alike
    state.wait_for_everyone()
    if state.is_main_process:
        _prepare_study_dir(study, out, resume=resume, overwrite=overwrite)
        for cell in cells:
            if cell.error and read_status(out, cell.name)["state"] != "failed":
                write_status(out, cell.name, "failed", error=cell.error)
    state.wait_for_everyone()
    pass_file = out / "pass.json"
    pending = json.loads(pass_file.read_text(encoding="utf-8"))["cells"] if pass_file.is_file() else None
    for group in training_passes(cells, pending):  # one pass per training seed (replicates: study.noise)
        train_cells(group, out, progress=progress)
        if pass_file.is_file():
            return out / "report"  # stopped early (train.stop_at); --resume continues
    if state.is_main_process:  # evaluation runs in one process; the others wait for the report
        # Each shape at its initialisation, evaluated like the cells (house style rule 15).
        inits = save_init_students(cells, out)
        evaluate_cells(study, cells + inits, out)
        build_report(out)
    state.wait_for_everyone()
    return out / "report"
