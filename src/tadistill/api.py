"""The Python API: ``distill(config, out=...) -> DistillResult``. The CLI is a thin layer over it.

Example::

    from tadistill import distill, resolve_config
    config = resolve_config("minilmv2", overrides=["student.num_layers=3", "train.steps=200"])
    result = distill(config, out="runs/minilmv2")
    print(result.student_dir, result.summary["embedding_cosine_end"])
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tadistill.config import DistillConfig
from tadistill.fileio import atomic_write_text
from tadistill.training.prune import prune_run
from tadistill.training.rundir import RunDir
from tadistill.training.setup import (
    Cell,
    RunSetup,
    new_accelerator,
    signal_spec,
    teacher_cut,
)
from tadistill.training.stages import MODULES_FILE, Stage, expand_stages


@dataclass
class DistillResult:
    run_dir: Path
    student_dir: Path | None  # None when the run stopped early (train.stop_at)
    summary: dict[str, Any]


def distill(
    config: DistillConfig,
    *,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> DistillResult:
    """Distill ``config.teacher`` into a student; write the run to ``out`` and the student to out/student.

    A config with ``stages`` (or ``assistant.enabled``, MiniLM's teacher assistant) runs its stages in order,
    each in out/stages/<name>/, and the last stage's student becomes out/student. ``resume`` continues inside
    the stage that was running.
    """
    # builtin-gpt2 is trained on first use, by a run of its own (imported here: teachers.causal calls distill).
    from tadistill.teachers.causal import ensure_builtin_teacher, models_named
    from tadistill.teachers.mlm_head import ensure_builtin_mlm_teacher

    ensure_builtin_teacher(*models_named(config), progress=progress)
    ensure_builtin_mlm_teacher(*models_named(config), progress=progress)  # builtin-mlm: its head, fitted once
    run = RunDir(out)
    stages = expand_stages(config, run.root)  # every stage's config is checked before anything is created
    with run.lock():  # one process per run directory, for the whole run (a second one is refused in one line)
        if not stages:
            return _run(config, run, resume=resume, overwrite=overwrite, progress=progress)
        return _run_stages(config, run, stages, resume=resume, overwrite=overwrite, progress=progress)


def _run_stages(config: DistillConfig, run: RunDir, stages: list[Stage], *, resume: bool, overwrite: bool,
                progress: bool) -> DistillResult:
    accelerator = new_accelerator(config.train.precision)
    run.check(config, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run.prepare(config, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    result = None
    for stage in stages:
        stage_run = RunDir(stage.folder)
        if stage_run.summary_path.is_file() and (stage_run.student / "config.json").is_file():
            continue  # finished before an interruption
        if stage.action == "prune":  # structured pruning into the student's shape, no training
            summary = prune_run(stage.config, stage_run, resume=stage_run.config_path.is_file())
            result = DistillResult(stage_run.root, stage_run.student, summary)
        else:
            result = _run(stage.config, stage_run, resume=stage_run.config_path.is_file(), overwrite=False,
                          progress=progress, stage=stage)
        if result.student_dir is None:
            return DistillResult(run.root, None, {**result.summary, "stage": stage.name})
    last = RunDir(stages[-1].folder)
    summary = json.loads(last.summary_path.read_text(encoding="utf-8"))
    summary["stages"] = {s.name: json.loads(RunDir(s.folder).summary_path.read_text(encoding="utf-8"))
                         for s in stages}
    if accelerator.is_main_process:
        _publish_student(last.student, run.student)
        atomic_write_text(run.summary_path, json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return DistillResult(run.root, run.student, summary)


def _publish_student(source: Path, target: Path) -> None:
    """The last stage's student as the run's student (a copy, then one rename: never half a folder)."""
    tmp = target.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def _run(config: DistillConfig, run: RunDir, *, resume: bool, overwrite: bool, progress: bool,
         stage: Stage | None = None) -> DistillResult:
    accelerator = new_accelerator(config.train.precision)
    run.check(config, resume=resume, overwrite=overwrite)  # refuse early, before the slow setup
    accelerator.wait_for_everyone()  # every process has checked before the main one creates anything
    setup = RunSetup([Cell("student", config, run)], accelerator=accelerator)
    if stage is not None and stage.carry_from is not None:
        _carry_modules(setup, stage.carry_from / MODULES_FILE)
    if accelerator.is_main_process:
        run.prepare(config, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    result = setup.train(run.checkpoints, progress=progress)
    accelerator.wait_for_everyone()
    if result.stopped_early:
        return DistillResult(run.root, None, {"stopped_at": result.final_step})
    summary = setup.finish(setup.lanes[0], result)
    return DistillResult(run.root, run.student, summary)


def _carry_modules(setup: RunSetup, path: Path) -> None:
    """Start the lane's learned modules from a previous stage's, where names and shapes match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from tadistill.errors import RunDirError

    if not path.is_file():
        return  # the previous stage learned no modules
    try:
        saved = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise RunDirError(f"{path} cannot be read ({str(exc).splitlines()[0][:120]}): rerun the previous stage "
                          "(delete its folder and --resume) or set carry_modules: false") from None
    own = setup.lanes[0].distiller.state_dict()
    matching = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    setup.lanes[0].distiller.load_state_dict(matching, strict=False)


def cache_teacher(config: DistillConfig, *, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the teacher once over ``config``'s corpus and store what its objectives read (see teacher_cache.py).

    A later ``distill`` of the same config with ``teacher_signals: OUT`` then trains without teacher forwards.
    Returns meta.json plus the bytes stored per token.
    """
    import torch
    from tqdm.auto import tqdm

    from tadistill.data.batches import collate
    from tadistill.data.prepare import prepare_corpus
    from tadistill.teachers.causal import ensure_builtin_teacher, models_named
    from tadistill.teachers.mlm_head import ensure_builtin_mlm_teacher
    from tadistill.training.loop import TokenizerInfo
    from tadistill.training.teacher_cache import signal_meta, write_teacher_signals

    ensure_builtin_teacher(*models_named(config), progress=progress)
    ensure_builtin_mlm_teacher(*models_named(config), progress=progress)
    tokenizer, teacher, t_arch, spec = signal_spec(config)
    splits = prepare_corpus(config.data, tokenizer, seed=config.train.seed,
                            max_positions=getattr(teacher.config, "max_position_embeddings", None))
    tok = TokenizerInfo.of(tokenizer)
    total = len(splits.train) + len(splits.heldout)
    # Like training, the teacher runs only up to the deepest block the stored signals come from (none above it is
    # read), unless logits are stored.
    deepest = None if spec.topk is not None else max((*spec.hidden, *spec.qkv), default=0)
    with tqdm(total=total, desc="teacher signals", unit="seq", disable=not progress, dynamic_ncols=True) as bar, \
            teacher_cut(teacher, t_arch, deepest) as cut:
        path = write_teacher_signals(
            Path(out), teacher=teacher, arch=cut, sequences={"train": splits.train, "heldout": splits.heldout},
            collate=lambda items: collate(items, pad_id=tok.pad_id, special_ids=tok.special_ids),
            spec=spec, meta=signal_meta(config, teacher.config),
            batch_size=config.train.batch_size, device="cuda" if torch.cuda.is_available() else "cpu",
            progress=bar.update,
        )
    info = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    tokens = splits.train.num_tokens() + splits.heldout.num_tokens()
    stored = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    info["bytes_per_token"] = round(stored / max(tokens, 1), 1)
    return info
