"""A comparative study: methods x student shapes, one budget, one evaluation suite.

Example (``tadistill compare study.yaml --out runs/study``)::

    name: my-study
    teacher: builtin
    data: {source: builtin, max_length: 64}
    train: {steps: 400, batch_size: 8}          # shared by every cell (or budget.tokens)
    methods:
      - {name: hs-uniform, recipe: hs, set: [objectives.hidden.mapping=uniform]}
      - {name: minilmv2, recipe: minilmv2}
    students: [3x384, 6x192]                    # LAYERSxHIDDEN[xHEADS]
    evaluation: {tasks: [stdlib-topic], mode: probe, seeds: [0, 1, 2]}

Every cell is the method's recipe with the method's ``set`` overrides, the study's teacher / data /
train settings, and the student shape. All cells train in one pass over the data that runs the
teacher once per batch.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_SHAPE = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?$")
# Method and study names become folder names (cells/<method>_<shape>, runs/<study>-<time>): one path
# component that cannot climb out of --out ("../x") or hide itself (".x").
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@,-]{0,79}$")


def _safe_name(value: str) -> str:
    if not _SAFE_NAME.match(value):
        raise ValueError(f"name {value!r} must be a plain file name: letters, digits and . _ + = @ , - (not "
                         "first), at most 80 characters")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodSpec(_Strict):
    name: str = Field(description="Row label of the method in the study table.")
    recipe: str = Field(description="Recipe the method starts from (tadistill recipes).")
    set: list[str] = Field(default_factory=list, description="key=value overrides of the recipe.")

    _name = field_validator("name")(_safe_name)


class StudentShape(_Strict):
    layers: int = Field(ge=1)
    hidden: int | None = Field(None, ge=1, description="null keeps the teacher's width.")
    heads: int | None = Field(None, ge=1, description="null keeps the teacher's head count.")

    @property
    def name(self) -> str:
        return f"{self.layers}x{self.hidden or 'T'}" + (f"x{self.heads}" if self.heads else "")

    def overrides(self) -> list[str]:
        out = [f"student.num_layers={self.layers}"]
        if self.hidden:
            out.append(f"student.hidden_size={self.hidden}")
        if self.heads:
            out.append(f"student.num_heads={self.heads}")
        return out


class Budget(_Strict):
    steps: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1, description="Tokens per cell; steps = tokens / (batch x length x accum).")

    @model_validator(mode="after")
    def _one(self) -> Budget:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of budget.steps and budget.tokens")
        return self


class CrosslingualSpec(_Strict):
    """Cross-lingual transfer of every model (evaluation/crosslingual.py): train on one language, test on each."""

    task: str = Field(description="xnli, pawsx (hub), l10n-topic (built in), a .csv/.jsonl file with a language "
                      "column, a pattern with {lang}, or a folder of <lang>.csv/.jsonl files.")
    train_language: str = Field("en", description="The language the probe (or fine-tuning) is trained on.")
    languages: list[str] | None = Field(None, min_length=1, description="Languages to test on; null: all of the task.")


class EvaluationSpec(_Strict):
    tasks: list[str] = Field(
        default_factory=lambda: ["stdlib-topic", "stdlib-retrieval"],
        description="Known task names or local files; stdlib-retrieval is scored zero-shot whatever the mode.",
    )
    mode: Literal["probe", "finetune"] = "probe"
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    max_train: int | None = Field(2000, ge=1, description="Training examples per task (subsampled, seeded).")
    max_eval: int | None = Field(1000, ge=1)
    fidelity_texts: int = Field(256, ge=12, description="Held-out texts for fidelity metrics.")
    latency: bool = True
    zero_shot_tasks: list[str] = Field(
        default_factory=list, description="lm-evaluation-harness tasks for causal-LM students (optional extra)."
    )
    crosslingual: CrosslingualSpec | None = Field(
        None, description="Cross-lingual transfer (mode, seeds, max_train / max_eval as above): scores "
        "<task>[<lang>]/<metric> per language and <task>[others]/<metric>, the mean over the other languages.",
    )


class NoiseSpec(_Strict):
    """Training noise: some cells trained again with other training seeds (house style rule 15).

    A replicate is the cell's config with ``train.seed`` set to each seed here; it is trained in a pass of
    its own (the seed also draws the data order and the held-out split, which the cells of one pass
    share) and named ``<cell>@seed<N>``. The report states the spread of each metric over the seeds and
    marks which differences exceed it.
    """

    cells: list[str] = Field(min_length=1, description="Cells to replicate, as <method>_<shape> (e.g. mha-last_3x384).")
    seeds: list[int] = Field(min_length=1, description="Extra training seeds; each differs from the study's train.seed.")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or any(not 0 <= s < 2**32 for s in value):
            raise ValueError(f"noise.seeds must be distinct seeds in [0, 2**32), got {value}")
        return value


class StudyConfig(_Strict):
    name: str = "study"
    teacher: str = "builtin"
    trust_remote_code: bool = False
    data: dict[str, Any] = Field(default_factory=dict, description="DataConfig fields shared by all cells.")
    languages: dict[str, str] | None = Field(
        None, description="Multilingual: language -> corpus source; training uses all, the report splits by language."
    )
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields shared by all cells.")
    budget: Budget | None = None
    methods: list[MethodSpec] = Field(min_length=1)
    students: list[StudentShape] = Field(min_length=1)
    evaluation: EvaluationSpec = EvaluationSpec()
    noise: NoiseSpec | None = Field(None, description="Cells trained again with other seeds: the training noise.")
    quick: dict[str, Any] | None = Field(
        None, description="A partial study merged over this one by `compare --quick` (a smaller first look)."
    )

    _name = field_validator("name")(_safe_name)

    @field_validator("students", mode="before")
    @classmethod
    def _parse_shapes(cls, value):
        out = []
        for item in value or []:
            if isinstance(item, str):
                m = _SHAPE.match(item.strip())
                if not m:
                    raise ValueError(f"student shape {item!r} must look like LAYERSxHIDDEN[xHEADS], e.g. 6x384")
                out.append({"layers": int(m[1]), "hidden": int(m[2]), "heads": int(m[3]) if m[3] else None})
            else:
                out.append(item)
        return out

    @model_validator(mode="after")
    def _unique_names(self) -> StudyConfig:
        names = [m.name for m in self.methods]
        if len(names) != len(set(names)):
            raise ValueError(f"method names must be unique, got {names}")
        if self.noise is not None:
            cells = [f"{m.name}_{s.name}" for m in self.methods for s in self.students]
            unknown = [c for c in self.noise.cells if c not in cells]
            if unknown:
                raise ValueError(f"noise.cells names {unknown[0]!r}, which is no cell of the study: use one of "
                                 f"{', '.join(cells)}")
            seed = self.train.get("seed", 0)
            if seed in self.noise.seeds:
                raise ValueError(f"noise.seeds holds {seed}, the study's own train.seed: give other seeds")
        return self

    def quick_version(self) -> StudyConfig:
        """The study with its ``quick:`` section merged over it (one level deep: ``quick.train.steps`` replaces
        only that key), named ``<name>-quick``; ``--quick`` on a study without one is refused."""
        if not self.quick:
            raise ValueError(f"study {self.name!r} has no quick: section to run with --quick")
        data = self.model_dump(mode="json")
        for key, value in self.quick.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        data["quick"] = None
        data.setdefault("name", self.name)
        if "name" not in self.quick:
            data["name"] = f"{self.name}-quick"
        return StudyConfig.model_validate(data)
