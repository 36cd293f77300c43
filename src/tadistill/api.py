"""The Python API: ``distill(config, out=...) -> DistillResult``. The CLI is a thin layer over it.

Example::

    from tadistill import distill, resolve_config
    config = resolve_config("minilmv2", overrides=["student.num_layers=3", "train.steps=200"])
    result = distill(config, out="runs/minilmv2")
    print(result.student_dir, result.summary["embedding_cosine_end"])
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tadistill.config import DistillConfig
from tadistill.data.prepare import prepare_corpus
from tadistill.evaluation.cost import count_parameters
from tadistill.evaluation.fidelity import TeacherEmbeddings
from tadistill.loading import load_model_config
from tadistill.training.lane import build_lane
from tadistill.training.loop import TokenizerInfo, Trainer
from tadistill.training.pipeline import SUMMARY_TEXTS, finish_lane, load_teacher, new_accelerator, start_cosine
from tadistill.training.rundir import RunDir, config_to_yaml
from tadistill.training.teacher_cache import TeacherSignals, lane_signal_spec, signal_meta


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

    With ``config.assistant.enabled`` (MiniLM's teacher assistant) the run first distills the teacher
    into an assistant with the teacher's depth and the student's width (in out/assistant), then the
    assistant into the student.
    """
    if not config.assistant.enabled:
        return _run(config, RunDir(out), resume=resume, overwrite=overwrite, progress=progress)
    run = RunDir(out)
    run.prepare(config, resume=resume, overwrite=overwrite)
    teacher_cfg = load_model_config(config.teacher, trust_remote_code=config.trust_remote_code)
    stage1 = config.model_copy(deep=True)
    stage1.assistant.enabled = False
    stage1.student.num_layers = teacher_cfg.num_hidden_layers
    if config.assistant.steps:
        stage1.train.steps = config.assistant.steps
    assistant_dir = run.root / "assistant"
    done = (assistant_dir / "student" / "config.json").is_file()
    if not done:
        _run(stage1, RunDir(assistant_dir), resume=(assistant_dir / "config.yaml").is_file(), overwrite=False,
             progress=progress)
    stage2 = config.model_copy(deep=True)
    stage2.assistant.enabled = False
    stage2.teacher = str(assistant_dir / "student")
    return _run(stage2, run, resume=True, overwrite=False, progress=progress, prepared=True)


def _run(
    config: DistillConfig, run: RunDir, *, resume: bool, overwrite: bool, progress: bool, prepared: bool = False
) -> DistillResult:
    accelerator = new_accelerator(config.train.precision)
    if not prepared:
        run.check(config, resume=resume, overwrite=overwrite)  # refuse early, before the slow setup
    accelerator.wait_for_everyone()  # every process has checked before the main one creates anything
    began = time.perf_counter()
    # Everything that can refuse the config (models, terms, corpus) runs before the run directory is
    # created, so a mistake leaves nothing behind that a corrected re-run would trip over.
    tokenizer, teacher, t_arch = load_teacher([config])
    lane = build_lane("student", config, run, teacher=teacher, teacher_arch=t_arch, tokenizer=tokenizer)
    splits = prepare_corpus(config.data, tokenizer, seed=config.train.seed,
                            max_positions=getattr(teacher.config, "max_position_embeddings", None))
    texts = splits.heldout_texts[:SUMMARY_TEXTS]
    embeddings = TeacherEmbeddings(tokenizer, texts)  # the teacher's side of both cosines, computed once
    signals = None
    if config.teacher_signals:  # stored teacher outputs (tadistill cache-teacher) instead of teacher forwards
        signals = TeacherSignals(config.teacher_signals, meta=signal_meta(config, teacher.config),
                                 spec=lane_signal_spec(lane))
    cosine_start = (start_cosine(lane, teacher, tokenizer, texts, teacher_embeddings=embeddings)
                    if signals is None else None)
    teacher_parameters = count_parameters(teacher)
    if not lane.needs_teacher or signals is not None:
        # Teacher-free (methods.md section 6) or offline signals: the teacher's weights were only read to build
        # the student; it is dropped before training and no teacher forward ever runs.
        teacher = None
    if not prepared and accelerator.is_main_process:
        run.prepare(config, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    trainer = Trainer(
        [lane], accelerator, teacher=teacher, teacher_arch=t_arch, train=splits.train, heldout=splits.heldout,
        tokenizer=TokenizerInfo.of(tokenizer), checkpoints=run.checkpoints, state_yaml=config_to_yaml(config),
        progress=progress, signals=signals,
    )
    result = trainer.run()
    accelerator.wait_for_everyone()
    if result.stopped_early:
        return DistillResult(run.root, None, {"stopped_at": result.final_step})
    summary = finish_lane(
        lane, accelerator, teacher=teacher, teacher_arch=t_arch, tokenizer=tokenizer, texts=texts,
        steps=result.final_step, train_tokens=splits.train.num_tokens(), cosine_start=cosine_start, began=began,
        teacher_parameters=teacher_parameters, teacher_embeddings=embeddings,
    )
    return DistillResult(run.root, run.student, summary)


def cache_teacher(config: DistillConfig, *, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run the teacher once over ``config``'s corpus and store what its objectives read (see teacher_cache.py).

    A later ``distill`` of the same config with ``teacher_signals: OUT`` then trains without teacher forwards.
    Returns meta.json plus the bytes stored per token.
    """
    import json

    import torch
    from tqdm.auto import tqdm

    from tadistill.data.batches import collate
    from tadistill.training.teacher_cache import write_teacher_signals

    tokenizer, teacher, t_arch = load_teacher([config])
    lane = build_lane("student", config, RunDir(out), teacher=teacher, teacher_arch=t_arch, tokenizer=tokenizer)
    splits = prepare_corpus(config.data, tokenizer, seed=config.train.seed,
                            max_positions=getattr(teacher.config, "max_position_embeddings", None))
    tok = TokenizerInfo.of(tokenizer)
    total = len(splits.train) + len(splits.heldout)
    with tqdm(total=total, desc="teacher signals", unit="seq", disable=not progress, dynamic_ncols=True) as bar:
        path = write_teacher_signals(
            Path(out), teacher=teacher, arch=t_arch, sequences={"train": splits.train, "heldout": splits.heldout},
            collate=lambda items: collate(items, pad_id=tok.pad_id, special_ids=tok.special_ids),
            spec=lane_signal_spec(lane), meta=signal_meta(config, teacher.config),
            batch_size=config.train.batch_size, device="cuda" if torch.cuda.is_available() else "cpu",
            progress=bar.update,
        )
    info = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    tokens = splits.train.num_tokens() + splits.heldout.num_tokens()
    stored = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    info["bytes_per_token"] = round(stored / max(tokens, 1), 1)
    return info
