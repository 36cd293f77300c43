"""The Python API: ``distill(config, out=...) -> DistillResult``. The CLI is a thin layer over it.

Example::

    from tadistill import distill, resolve_config
    config = resolve_config("minilmv2", overrides=["student.num_layers=3", "train.steps=200"])
    result = distill(config, out="runs/minilmv2")
    print(result.student_dir, result.summary["embedding_cosine_end"])
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from tadistill.capture.architectures import resolve_architecture
from tadistill.config import DistillConfig
from tadistill.data.sources import load_texts, source_fingerprint
from tadistill.data.tokenized import tokenize_corpus
from tadistill.errors import ConfigError
from tadistill.evaluation.cost import count_parameters
from tadistill.evaluation.fidelity import embedding_cosine
from tadistill.loading import (
    check_same_vocabulary,
    load_model_config,
    load_pretrained,
    load_tokenizer,
    resolve_model_path,
)
from tadistill.registry import OBJECTIVES
from tadistill.students.build import build_student, student_config
from tadistill.students.init import init_from_teacher, select_layers
from tadistill.training.loop import TokenizerInfo, Trainer
from tadistill.fileio import atomic_write_text
from tadistill.training.rundir import RunDir

DEFAULT_CACHE = Path(os.environ.get("TADISTILL_CACHE", Path.home() / ".cache" / "tadistill"))
SUMMARY_TEXTS = 256  # held-out texts used for the embedding-similarity summary


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


def _student_for(config: DistillConfig, teacher, tokenizer, *, head: str):
    """Build (or load) the student described by ``config.student``."""
    sc = config.student
    if sc.pretrained:
        student = load_pretrained(sc.pretrained, head=head, trust_remote_code=config.trust_remote_code, what="student")
        check_same_vocabulary(tokenizer, load_tokenizer(sc.pretrained, trust_remote_code=config.trust_remote_code),
                              sc.pretrained)
        return student
    tcfg = teacher.config
    layers = sc.num_layers or max(1, tcfg.num_hidden_layers // 2)
    hidden = sc.hidden_size or tcfg.hidden_size
    intermediate = sc.intermediate_size
    if intermediate is None and hidden != tcfg.hidden_size:
        teacher_ffn = getattr(tcfg, "intermediate_size", None) or getattr(tcfg, "hidden_dim", None)
        teacher_ffn = teacher_ffn or getattr(tcfg, "n_inner", None) or 4 * tcfg.hidden_size
        intermediate = int(round(teacher_ffn * hidden / tcfg.hidden_size))  # keep the teacher's FFN ratio
    cfg = student_config(
        tcfg, num_layers=layers, hidden_size=hidden, num_heads=sc.num_heads, intermediate_size=intermediate
    )
    student = build_student(cfg, head=head)
    if sc.init == "teacher":
        strategy = "explicit" if isinstance(sc.init_layers, list) else sc.init_layers
        explicit = sc.init_layers if isinstance(sc.init_layers, list) else None
        init_from_teacher(student, teacher, select_layers(strategy, layers, tcfg.num_hidden_layers, explicit))
    return student


SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def _copy_sentence_transformers_files(teacher_dir: Path, target: Path, hidden_size: int) -> None:
    """A sentence-transformers teacher gives a student that SentenceTransformer(path) loads the same way.

    The module list and pooling config are copied (pooling width set to the student's), so the student
    keeps the teacher's pooling and normalisation.
    """
    if not (teacher_dir / "modules.json").is_file():
        return
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (teacher_dir / name).is_file():
            shutil.copy2(teacher_dir / name, target / name)
    for module in json.loads((teacher_dir / "modules.json").read_text(encoding="utf-8")):
        if not module.get("path"):
            continue
        (target / module["path"]).mkdir(parents=True, exist_ok=True)
        pooling = teacher_dir / module["path"] / "config.json"
        if pooling.is_file():
            settings = json.loads(pooling.read_text(encoding="utf-8"))
            if "word_embedding_dimension" in settings:
                settings["word_embedding_dimension"] = hidden_size
            (target / module["path"] / "config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")


def _save_student(student, tokenizer, target: Path, *, teacher_dir: Path) -> None:
    """save_pretrained + tokenizer into a temporary folder, then rename: never a half-written student."""
    tmp = target.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _copy_sentence_transformers_files(teacher_dir, tmp, student.config.hidden_size)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _run(
    config: DistillConfig, run: RunDir, *, resume: bool, overwrite: bool, progress: bool, prepared: bool = False
) -> DistillResult:
    if not prepared:
        run.check(config, resume=resume, overwrite=overwrite)  # refuse early, before the slow setup
    began = time.perf_counter()
    set_seed(config.train.seed)
    # Everything that can refuse the config (models, terms, corpus) runs before the run directory is
    # created, so a mistake leaves nothing behind that a corrected re-run would trip over.
    active = [o for o in config.objectives if o.weight > 0]
    if not active:
        raise ConfigError("every objective has weight 0: give at least one a positive weight")
    teacher_logits = any(o.kind == "output-kl" for o in active)
    student_logits = any(o.kind in ("output-kl", "mlm") for o in active)

    tokenizer = load_tokenizer(config.teacher, trust_remote_code=config.trust_remote_code)
    teacher = load_pretrained(
        config.teacher, head="mlm" if teacher_logits else "base", trust_remote_code=config.trust_remote_code
    )
    student = _student_for(config, teacher, tokenizer, head="mlm" if student_logits else "base")
    t_arch, s_arch = resolve_architecture(teacher), resolve_architecture(student)
    terms = [OBJECTIVES[o.kind].term(o, s_arch, t_arch) for o in active]
    if student_logits and tokenizer.mask_token_id is None:
        raise ConfigError(f"teacher {config.teacher!r} has no [MASK] token: masked-LM objectives need one")

    dc = config.data
    limit = getattr(teacher.config, "max_position_embeddings", None)
    if limit and dc.max_length > limit:
        raise ConfigError(f"data.max_length={dc.max_length} exceeds the teacher's {limit} positions: lower it")
    texts = load_texts(dc.source, text_field=dc.text_field, split=dc.split)
    if dc.max_texts:
        texts = texts[: dc.max_texts]
    splits = tokenize_corpus(
        texts,
        tokenizer,
        max_length=dc.max_length,
        heldout_fraction=dc.heldout_fraction,
        seed=config.train.seed,
        packing=dc.packing,
        cache_dir=Path(dc.cache_dir) if dc.cache_dir else DEFAULT_CACHE,
        fingerprint=source_fingerprint(dc.source, text_field=dc.text_field, split=dc.split) + f"|{dc.max_texts}",
    )
    info = TokenizerInfo(
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        mask_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        special_ids=list(tokenizer.all_special_ids),
    )
    summary_texts = splits.heldout_texts[:SUMMARY_TEXTS]
    # The student before training (deterministic given the seed, so the same on --resume).
    cosine_start = (
        embedding_cosine(teacher, student, tokenizer, summary_texts, max_length=dc.max_length)
        if summary_texts else None
    )
    if not prepared:
        run.prepare(config, resume=resume, overwrite=overwrite)
    # Accelerate keeps its state in a process-wide singleton that refuses a second Accelerator with
    # another precision; reset it (keeping any process group) so that one Python process can run several
    # distillations, e.g. a notebook or the teacher-assistant chain.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=config.train.precision, log_with="tensorboard", project_dir=str(run.root)
    )
    accelerator.init_trackers("tensorboard")
    trainer = Trainer(
        config, run, accelerator,
        teacher=teacher, teacher_arch=t_arch, student=student, student_arch=s_arch, terms=terms,
        train=splits.train, heldout=splits.heldout, tokenizer=info, progress=progress,
    )
    result = trainer.run()
    accelerator.wait_for_everyone()
    if result.stopped_early:
        accelerator.end_training()
        return DistillResult(run.root, None, {"stopped_at": result.final_step})

    final = accelerator.unwrap_model(trainer.model).student
    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        _save_student(final, tokenizer, run.student, teacher_dir=Path(resolve_model_path(config.teacher)))
        evals = [r for r in run.read_metrics() if "eval/loss" in r]
        summary = {
            "teacher": config.teacher,
            "recipe": config.recipe,
            "student_dir": str(run.student),
            "student_shape": f"{s_arch.num_layers}x{s_arch.hidden_size} ({s_arch.num_heads} heads)",
            "teacher_shape": f"{t_arch.num_layers}x{t_arch.hidden_size} ({t_arch.num_heads} heads)",
            "teacher_parameters": count_parameters(teacher),
            "student_parameters": count_parameters(final),
            "steps": result.final_step,
            "train_tokens": splits.train.num_tokens(),
            "heldout_loss_start": evals[0]["eval/loss"] if evals else None,
            "heldout_loss_end": evals[-1]["eval/loss"] if evals else None,
            "embedding_cosine_start": cosine_start,
            "embedding_cosine_end": embedding_cosine(teacher, final, tokenizer, summary_texts, max_length=dc.max_length)
            if summary_texts else None,
            "seconds": round(time.perf_counter() - began, 1),
        }
        atomic_write_text(run.summary_path, json.dumps(summary, indent=2))
    accelerator.end_training()
    return DistillResult(run.root, run.student, summary)
