"""Each student shape at its initialisation, saved and evaluated like the trained cells (house style rule 15).

A student started from teacher blocks can score well before a single step; a table without that row
credits the method with what the initialisation gave. So every study saves, for each student shape, the
very student its cells start from (built by ``training.lane.build_lane``, the function that builds a
lane's student, with the cell's seed) into ``cells/init_<shape>/student``, and evaluates it with the same
suite; the report gives each cell's gain over it.

Cells whose students start from the same weights share one row: same teacher, same ``student`` settings,
same ``train.seed`` and the same head. The head counts: transformers draws a randomly initialised body
differently under ``BertForMaskedLM`` than under ``BertModel`` (tested), so an OD cell (MLM head) and an HS
cell (none) of one shape get a row each even when, started from the teacher, their bodies are the same
copy. The shape's row serving the most cells is ``init_<shape>``; any other is ``init-<its first
method>_<shape>`` (``init-od_3x384``). Replicates (``study.noise``) are measured against their cell's row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from tadistill.errors import TadistillError
from tadistill.fileio import atomic_write_text
from tadistill.loading import is_causal_lm, load_model_config, resolve_model_path
from tadistill.measure.parameters import count_parameters
from tadistill.study.cells import INIT, Cell
from tadistill.study.studydir import read_status, write_status
from tadistill.training.lane import build_lane, student_head
from tadistill.training.pipeline import save_student
from tadistill.training.rundir import RunDir, config_to_yaml
from tadistill.training.setup import load_teacher


@dataclass
class InitRow:
    name: str
    shape: str
    cells: list[Cell] = field(default_factory=list)  # the cells that start from this student


def _start_key(cell: Cell, causal: bool) -> str:
    """What determines a cell's initial student weights (see the module docstring)."""
    config = cell.config
    head = student_head(config, SimpleNamespace(causal=causal))  # it reads only whether the teacher is causal
    return json.dumps({"teacher": config.teacher, "trust_remote_code": config.trust_remote_code,
                       "student": config.student.model_dump(mode="json"), "seed": config.train.seed,
                       "head": head}, sort_keys=True)


def init_rows(cells: list[Cell]) -> list[InitRow]:
    """One row per shape and distinct start, in the order of the cells; replicates are left out."""
    groups: dict[tuple[str, str], InitRow] = {}
    causal: dict[str, bool] = {}
    for cell in cells:
        if cell.config is None or cell.method == INIT or cell.replicate_of:
            continue  # a replicate is measured against its cell's row: it only gives the training noise
        teacher = cell.config.teacher
        if teacher not in causal:
            causal[teacher] = is_causal_lm(load_model_config(teacher, trust_remote_code=cell.config.trust_remote_code))
        key = (cell.shape, _start_key(cell, causal[teacher]))
        if key not in groups:
            groups[key] = InitRow("", cell.shape)
        groups[key].cells.append(cell)
    rows = list(groups.values())
    mains: set[int] = set()
    for row in rows:
        main = max((r for r in rows if r.shape == row.shape), key=lambda r: len(r.cells))  # the first of the largest
        row.name = f"{INIT}_{row.shape}" if row is main else f"{INIT}-{row.cells[0].method}_{row.shape}"
        if row is main:
            mains.add(id(row))
    shapes = list(dict.fromkeys(r.shape for r in rows))
    return sorted(rows, key=lambda r: (shapes.index(r.shape), id(r) not in mains))  # by shape, its main row first


def _saved(out: Path, name: str) -> bool:
    folder = out / "cells" / name
    return (folder / "student" / "config.json").is_file() and (folder / "summary.json").is_file()


def save_init_students(cells: list[Cell], out: Path) -> list[Cell]:
    """Save each initialisation row's student (those not saved yet); return the rows as cells to evaluate.

    Main process only. A row that cannot be built is marked failed with its one-line error; the others go on.
    """
    rows = init_rows(cells)
    teacher = None
    result = []
    for row in rows:
        result.append(Cell(row.name, INIT, row.shape, row.cells[0].config))
        if _saved(out, row.name) and read_status(out, row.name)["state"] != "new":
            continue
        try:
            if teacher is None:  # loaded as the training pass loads it: with the head any of the cells reads
                tokenizer, teacher, arch = load_teacher([c.config for c in cells if c.config is not None])
            like = row.cells[0]
            config = like.config
            run = RunDir(out / "cells" / row.name)
            lane = build_lane(row.name, config, run, teacher=teacher, teacher_arch=arch, tokenizer=tokenizer)
            run.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run.config_path, config_to_yaml(config))
            save_student(lane.student, tokenizer, run.student, teacher_dir=Path(resolve_model_path(config.teacher)))
            summary = {"init": True, "shape": row.shape, "steps": 0, "tokens_seen": 0, "teacher": config.teacher,
                       "student_parameters": count_parameters(lane.student), "built_like": like.name,
                       "serves": [c.name for c in row.cells]}
            atomic_write_text(run.summary_path, json.dumps(summary, indent=2))  # after the student: marks it saved
            write_status(out, row.name, "trained")
        except TadistillError as exc:
            write_status(out, row.name, "failed", error=f"initialisation: {exc}")
    return result
