"""Chained runs: the stages of one config, each a run directory of its own under ``stages/``.

A stage starts from the previous stage's student (``student_from: previous``) and, with
``carry_modules``, from its learned modules (projections, masks ...); a teacher written ``stage:NAME`` is
the student of an earlier stage. MiniLM's teacher assistant (Wang et al. 2020, section 3.3) is the
two-stage run ``expand_stages`` makes of ``assistant.enabled``: first the teacher into an assistant of
the teacher's depth and the student's width, then the assistant into a fresh student. A stage with
``action: prune`` trains nothing: it prunes its teacher into the student's shape (``training/prune.py``;
Minitron's first stage), and the next stage starts from that student.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tadistill.config import DistillConfig, StageConfig
from tadistill.errors import ConfigError
from tadistill.loading import load_model_config
from tadistill.resolve import apply_override, build_config, recipe_dict
from tadistill.training.pipeline import MODULES_FILE  # noqa: F401  (re-exported for the stages' readers)
from tadistill.training.prune import check_prune

STAGES_DIR = "stages"
TEACHER_PREFIX = "stage:"


@dataclass
class Stage:
    name: str
    config: DistillConfig
    folder: Path
    carry_from: Path | None  # the previous stage's folder, when its modules start this stage's
    action: str = "distill"  # "prune": the teacher pruned into the student's shape (training/prune.py)


def _assistant_stages(config: DistillConfig) -> list[StageConfig]:
    teacher_cfg = load_model_config(config.teacher, trust_remote_code=config.trust_remote_code)
    assistant = [f"student.num_layers={teacher_cfg.num_hidden_layers}"]
    if config.assistant.steps:
        assistant.append(f"train.steps={config.assistant.steps}")
    return [StageConfig(name="assistant", set=assistant, student_from="config"),
            StageConfig(name="student", set=[f"teacher={TEACHER_PREFIX}assistant"], student_from="config")]


def expand_stages(config: DistillConfig, root: Path) -> list[Stage]:
    """The stages of ``config`` with their resolved configs; [] for a single-stage run."""
    specs = list(config.stages) or (_assistant_stages(config) if config.assistant.enabled else [])
    if not specs:
        return []
    base = config.model_dump(mode="json")
    base["stages"], base["assistant"] = [], {"enabled": False, "steps": None}
    folders = {spec.name: root / STAGES_DIR / spec.name for spec in specs}
    out: list[Stage] = []
    for spec in specs:
        try:
            stage_config = _stage_config(spec, base, out, folders)
            if spec.action == "prune" and stage_config.teacher not in {str(f / "student") for f in folders.values()}:
                check_prune(stage_config)  # a teacher that exists already: its family and the target, now
        except ConfigError as exc:
            raise ConfigError(f"stage {spec.name}: {exc}") from None
        previous = out[-1].folder if out else None
        out.append(Stage(spec.name, stage_config, folders[spec.name], previous if spec.carry_modules else None,
                         spec.action))
    return out


def _stage_config(spec: StageConfig, base: dict, earlier: list[Stage], folders: dict[str, Path]) -> DistillConfig:
    data = dict(base)
    if spec.recipe:
        data["objectives"] = recipe_dict(spec.recipe)["objectives"]
        data["recipe"] = spec.recipe
    for assignment in spec.set:
        data = apply_override(data, assignment)
    if str(data.get("teacher", "")).startswith(TEACHER_PREFIX):
        name = data["teacher"][len(TEACHER_PREFIX):]
        if name not in [s.name for s in earlier]:
            raise ConfigError(f"teacher {data['teacher']!r} names no earlier stage")
        data["teacher"] = str(folders[name] / "student")
    if spec.student_from == "previous" and earlier:
        data["student"] = {**data["student"], "pretrained": str(earlier[-1].folder / "student")}
    return build_config(data)
