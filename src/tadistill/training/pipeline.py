"""Around the loop: a lane's cosine before training, and finishing it (saved student, summary.json)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import save

from tadistill.capture.architectures import resolve_architecture
from tadistill.errors import TrainingError
from tadistill.fileio import apply_umask, atomic_open, atomic_write_text
from tadistill.loading import resolve_model_path
from tadistill.measure.embeddings import TeacherEmbeddings
from tadistill.measure.flops import known_flops_per_token
from tadistill.measure.parameters import count_parameters
from tadistill.measure.perplexity import causal_perplexity
from tadistill.training.hooks import overrides
from tadistill.training.lane import Lane

MODULES_FILE = "modules.safetensors"  # a lane's learned modules (terms' projections, methods' modules)
SUMMARY_TEXTS = 256  # held-out texts used for the embedding-similarity summary
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def start_cosine(
    lane: Lane, teacher, tokenizer, texts: list[str], *, teacher_embeddings: TeacherEmbeddings | None = None
) -> float | None:
    """Embedding cosine of the student before training (deterministic given the seed, so also on resume).

    None for causal LMs, whose mean-pooled hidden states are no sentence embedding.
    ``teacher_embeddings``: a cache of the teacher's side for these ``texts``, shared by the lanes of a
    run and by ``finish_lane`` (the teacher then runs once, not twice per lane).
    """
    if not texts or lane.student_arch.causal:
        return None
    embeddings = _embeddings_for(teacher_embeddings, tokenizer, texts)
    with lane.own_random_stream():
        return embeddings.cosine(teacher, lane.student, max_length=lane.config.data.max_length)


def _embeddings_for(cache: TeacherEmbeddings | None, tokenizer, texts: list[str]) -> TeacherEmbeddings:
    if cache is None:
        return TeacherEmbeddings(tokenizer, texts)
    if cache.tokenizer is not tokenizer or cache.texts != list(texts):
        raise ValueError("teacher_embeddings were made for other texts or another tokenizer")  # a caller bug
    return cache


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


def save_student(student, tokenizer, target: Path, *, teacher_dir: Path, state_dict: dict | None = None) -> None:
    """save_pretrained + tokenizer into a temporary folder, then rename: never a half-written student.

    ``state_dict``: the full weights when the live module holds only a shard (FSDP, DeepSpeed ZeRO-3).
    """
    tmp = target.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    _copy_sentence_transformers_files(teacher_dir, tmp, student.config.hidden_size)
    apply_umask(tmp)  # safetensors creates its files 0600: shared runs should be readable
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _final_student(lane: Lane, student, accelerator: Accelerator):
    """The model the lane's methods hand back for saving (``MethodHooks.final_student``), and its architecture.

    The methods read the live modules, so these must hold full weights: not a shard of FSDP / ZeRO-3.
    """
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        names = ", ".join(m.name for m in lane.methods if overrides(m, "final_student"))
        raise TrainingError(f"{names} rebuild the student at the end, which needs unsharded weights: train it with "
                            "DDP or on one process (the checkpoints of this run are kept; --resume after switching)")
    student.eval()
    for method in lane.methods:
        student = method.final_student(student) or student
    return student, resolve_architecture(student)


def finish_lane(
    lane: Lane, accelerator: Accelerator, *, teacher, teacher_arch, tokenizer, texts: list[str], steps: int,
    split_tokens: int, tokens_seen: int, cosine_start: float | None, began: float, teacher_parameters: int | None = None,
    teacher_embeddings: TeacherEmbeddings | None = None, teacher_config=None, data_mixture: dict | None = None,
) -> dict[str, Any]:
    """Save the student and write summary.json (main process); return the summary.

    ``teacher`` may be None (teacher-free training, the teacher was dropped): pass ``teacher_parameters`` (and
    ``teacher_config`` for its FLOPs).
    ``teacher_embeddings``: as in ``start_cosine``.
    """
    # Every process takes part in gathering the full weights (sharded under FSDP / ZeRO-3); the main one saves.
    full = accelerator.get_state_dict(lane.model)
    if not accelerator.is_main_process:
        return {}
    config, run = lane.config, lane.run
    final = accelerator.unwrap_model(lane.model).student
    weights = {k.removeprefix("student."): v for k, v in full.items() if k.startswith("student.")}
    s_arch = lane.student_arch
    if any(overrides(m, "final_student") for m in lane.methods):
        final, s_arch = _final_student(lane, final, accelerator)
        weights = None  # the methods' result holds its own (full) weights
    save_student(final, tokenizer, run.student, teacher_dir=Path(resolve_model_path(config.teacher)),
                 state_dict=weights)
    modules = {k: v.contiguous() for k, v in full.items() if not k.startswith("student.")}
    if modules:  # the learned modules (projections, masks ...): a next stage may start from them (carry_modules)
        with atomic_open(run.root / MODULES_FILE, "wb") as handle:
            handle.write(save(modules))
    evals = [r for r in run.read_metrics() if "eval/loss" in r]
    t_arch = teacher_arch
    summary = {
        "teacher": config.teacher,
        "recipe": config.recipe,
        "student_dir": str(run.student),
        "student_shape": f"{s_arch.num_layers}x{s_arch.hidden_size} ({s_arch.num_heads} heads)",
        "teacher_shape": f"{t_arch.num_layers}x{t_arch.hidden_size} ({t_arch.num_heads} heads)",
        "teacher_parameters": count_parameters(teacher) if teacher is not None else teacher_parameters,
        "student_parameters": count_parameters(final),
        # Forward FLOPs per token at the run's sequence length, bodies only (measure/flops.py)
        "teacher_flops_per_token": known_flops_per_token(teacher.config if teacher is not None else teacher_config,
                                                         seq_len=config.data.max_length),
        "student_flops_per_token": known_flops_per_token(final.config, seq_len=config.data.max_length),
        "steps": steps,
        "train_split_tokens": split_tokens,  # tokens in the corpus's training split
        "tokens_seen": tokens_seen,  # tokens trained on (valid tokens of every batch, all processes)
        "data_mixture": data_mixture,  # several sources: per source (and language) the probability and share drawn
        "heldout_loss_start": evals[0]["eval/loss"] if evals else None,
        "heldout_loss_end": evals[-1]["eval/loss"] if evals else None,
        "embedding_cosine_start": cosine_start,
        "embedding_cosine_end": _embeddings_for(teacher_embeddings, tokenizer, texts).cosine(
            teacher, final, max_length=config.data.max_length,
        ) if texts and teacher is not None and not s_arch.causal else None,
        "seconds": round(time.perf_counter() - began, 1),
    }
    if s_arch.causal and texts:
        summary["heldout_perplexity"] = causal_perplexity(final, tokenizer, texts,
                                                          max_length=config.data.max_length)["perplexity"]
    atomic_write_text(run.summary_path, json.dumps(summary, indent=2))
    return summary
