"""The steps around the loop shared by a single run and a study: teacher, accelerator, finishing a lane."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs

from tadistill.capture.architectures import resolve_architecture
from tadistill.config import DistillConfig
from tadistill.evaluation.cost import count_parameters
from tadistill.evaluation.fidelity import TeacherEmbeddings
from tadistill.fileio import atomic_write_text
from tadistill.evaluation.intrinsic import causal_perplexity
from tadistill.loading import is_causal_lm, load_model_config, load_pretrained, load_tokenizer, resolve_model_path
from tadistill.training.lane import Lane

SUMMARY_TEXTS = 256  # held-out texts used for the embedding-similarity summary
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def load_teacher(configs: list[DistillConfig]):
    """Tokenizer, teacher and its architecture.

    Encoders get their MLM head when any config needs its logits; causal LMs always get their LM head
    (the logit terms need it, and a truncated student copies an untied one).
    """
    first = configs[0]
    needs_logits = any(o.kind == "output-kl" and o.weight > 0 for c in configs for o in c.objectives)
    causal = is_causal_lm(load_model_config(first.teacher, trust_remote_code=first.trust_remote_code))
    tokenizer = load_tokenizer(first.teacher, trust_remote_code=first.trust_remote_code)
    head = "causal-lm" if causal else "mlm" if needs_logits else "base"
    teacher = load_pretrained(first.teacher, head=head, trust_remote_code=first.trust_remote_code)
    return tokenizer, teacher, resolve_architecture(teacher)


def new_accelerator(precision: str) -> Accelerator:
    # Accelerate keeps its state in a process-wide singleton that refuses a second Accelerator with
    # another precision; reset it (keeping any process group) so that one Python process can run several
    # distillations, e.g. a notebook, a study, or the teacher-assistant chain.
    AcceleratorState._reset_state()
    # Students carry weights no objective reaches (BERT's pooler; blocks above the last mapped layer), and
    # DDP refuses a step where a parameter got no gradient unless told to look for them.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(mixed_precision=precision, kwargs_handlers=[ddp])


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
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def finish_lane(
    lane: Lane, accelerator: Accelerator, *, teacher, teacher_arch, tokenizer, texts: list[str], steps: int,
    train_tokens: int, cosine_start: float | None, began: float, teacher_parameters: int | None = None,
    teacher_embeddings: TeacherEmbeddings | None = None,
) -> dict[str, Any]:
    """Save the student and write summary.json (main process); return the summary.

    ``teacher`` may be None (teacher-free training, the teacher was dropped): pass ``teacher_parameters``.
    ``teacher_embeddings``: as in ``start_cosine``.
    """
    # Every process takes part in gathering the full weights (sharded under FSDP / ZeRO-3); the main one saves.
    full = accelerator.get_state_dict(lane.model)
    if not accelerator.is_main_process:
        return {}
    config, run = lane.config, lane.run
    final = accelerator.unwrap_model(lane.model).student
    weights = {k.removeprefix("student."): v for k, v in full.items() if k.startswith("student.")}
    save_student(final, tokenizer, run.student, teacher_dir=Path(resolve_model_path(config.teacher)),
                 state_dict=weights)
    evals = [r for r in run.read_metrics() if "eval/loss" in r]
    s_arch, t_arch = lane.student_arch, teacher_arch
    summary = {
        "teacher": config.teacher,
        "recipe": config.recipe,
        "student_dir": str(run.student),
        "student_shape": f"{s_arch.num_layers}x{s_arch.hidden_size} ({s_arch.num_heads} heads)",
        "teacher_shape": f"{t_arch.num_layers}x{t_arch.hidden_size} ({t_arch.num_heads} heads)",
        "teacher_parameters": count_parameters(teacher) if teacher is not None else teacher_parameters,
        "student_parameters": count_parameters(final),
        "steps": steps,
        "train_tokens": train_tokens,
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
