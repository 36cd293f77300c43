"""A prune stage (``action: prune``): the teacher pruned into the student's shape by importance, no training.

Minitron (Muralidharan et al. 2024; Sreenivas et al. 2024) is this stage followed by a distillation stage
that starts from its student (recipe ``minitron``); any recipe can put it in front of its own objectives.
Order, as in ``RunSetup`` (everything that can refuse runs before the run directory is created):

1. the tokenizer and the teacher, with the head its checkpoint has (a causal LM's; a masked-LM head when
   the checkpoint has one), and its prunable units (``structure.resolve_layout``: one line for a family
   without support);
2. the target shape from ``student.*`` (one line for a target larger than the teacher, head counts that
   do not divide); the tokenized corpus;
3. the importance of every unit over ``prune.calibration_batches`` batches of the training split, streamed
   (``registry.PRUNING``: the method's scores), the kept units (``structure.select_units``) and the
   materialised student, saved like any student, with the scores and a summary.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from safetensors.torch import save

from tadistill.config import DistillConfig
from tadistill.data.prepare import prepare_corpus
from tadistill.errors import ConfigError
from tadistill.fileio import atomic_open, atomic_write_text
from tadistill.loading import is_causal_lm, load_model_config, load_pretrained, load_tokenizer, resolve_model_path
from tadistill.measure.flops import known_flops_per_token
from tadistill.students.calibration import calibration_count, first_batches
from tadistill.measure.parameters import count_parameters
from tadistill.measure.perplexity import causal_perplexity
from tadistill.registry import PRUNING
from tadistill.structure import Kept, Layout, TargetShape, check_target, materialize, resolve_layout, select_units
from tadistill.students.build import build_student
from tadistill.training.pipeline import save_student
from tadistill.training.rundir import RunDir

SCORES_FILE = "importance.safetensors"  # the importance of every unit, beside the pruned student
PERPLEXITY_TEXTS = 64  # held-out texts for the pruned causal student's perplexity in the summary


def target_shape(config: DistillConfig, layout: Layout) -> TargetShape:
    """The student's shape with the defaults a distilled student gets (students/spec.py): half the teacher's
    depth, its width and heads, an FFN that keeps the teacher's ratio when the width changes; key/value heads
    from ``prune.num_kv_heads`` or the teacher's query heads per key/value head."""
    sc = config.student
    if sc.pretrained:
        raise ConfigError("a prune stage prunes its teacher into the student's shape: drop student.pretrained (to "
                          "prune an earlier stage's student, set the stage's teacher to stage:NAME)")
    hidden = sc.hidden_size or layout.hidden_size
    ffn = sc.intermediate_size or (round(layout.ffn_size * hidden / layout.hidden_size)
                                   if hidden != layout.hidden_size else layout.ffn_size)
    heads = sc.num_heads or layout.num_heads
    kv_heads = config.prune.num_kv_heads
    if kv_heads is None:
        if heads % layout.group_size:
            raise ConfigError(f"student.num_heads={heads} is not a multiple of the teacher's {layout.group_size} query "
                              "heads per key/value head: choose a multiple, or set prune.num_kv_heads")
        kv_heads = heads // layout.group_size
    return TargetShape(num_layers=sc.num_layers or max(1, layout.num_layers // 2), hidden_size=hidden,
                       num_heads=heads, num_kv_heads=kv_heads, intermediate_size=ffn)


def _teacher_head(config: DistillConfig) -> str:
    """The head the teacher checkpoint has: it is pruned with it (a pruned causal LM keeps its LM head)."""
    model_config = load_model_config(config.teacher, trust_remote_code=config.trust_remote_code)
    if is_causal_lm(model_config):
        return "causal-lm"
    masked = any(a.endswith("ForMaskedLM") for a in getattr(model_config, "architectures", None) or [])
    return "mlm" if masked else "base"


def check_prune(config: DistillConfig) -> None:
    """The one-line errors of a prune stage that need only the teacher's config: an unsupported family, a target
    the teacher cannot be pruned to. The teacher is built on the meta device (no weights are read or allocated),
    so ``expand_stages`` can refuse a run before anything is created."""
    model_config = load_model_config(config.teacher, trust_remote_code=config.trust_remote_code)
    with torch.device("meta"):
        shell = build_student(model_config, head=_teacher_head(config))
    layout = resolve_layout(shell)
    check_target(layout, target_shape(config, layout))


class PruneSetup:
    """Steps 1-2 of the module docstring; ``run`` does step 3."""

    def __init__(self, config: DistillConfig):
        self.config = config
        self.began = time.perf_counter()
        self.tokenizer = load_tokenizer(config.teacher, trust_remote_code=config.trust_remote_code)
        self.teacher = load_pretrained(config.teacher, head=_teacher_head(config),
                                       trust_remote_code=config.trust_remote_code)
        self.layout = resolve_layout(self.teacher)
        self.target = target_shape(config, self.layout)
        check_target(self.layout, self.target)
        self.splits = prepare_corpus(config.data, self.tokenizer, seed=config.train.seed,
                                     max_positions=getattr(self.teacher.config, "max_position_embeddings", None))
        self.batches = calibration_count(self.splits.train, config)

    def calibration(self) -> Iterator[dict[str, torch.Tensor]]:
        """The first batches of the training order (no sequence twice), collated one at a time: the same
        batches ``student.init=importance`` ranks on (students/calibration.py)."""
        return first_batches(self.splits.train, self.config, self.tokenizer)

    def run(self, run: RunDir) -> dict[str, Any]:
        """Score, select, materialise; save the student, the scores and summary.json into ``run``."""
        config, layout = self.config, self.layout
        if torch.cuda.is_available():
            self.teacher.cuda()
        scores = PRUNING[config.prune.method].scores(self.teacher, layout, self.calibration())
        masks = select_units(scores, layout, self.target)
        student = materialize(self.teacher, layout, masks).cpu()
        teacher_dir = Path(resolve_model_path(config.teacher))
        save_student(student, self.tokenizer, run.student, teacher_dir=teacher_dir)
        with atomic_open(run.root / SCORES_FILE, "wb") as handle:
            handle.write(save({"heads": scores.heads.contiguous(), "ffn": scores.ffn.contiguous(),
                               "hidden": scores.hidden.contiguous(), "blocks": scores.blocks.contiguous()}))
        kept = Kept.of(masks, layout)
        summary = self._summary(run, student, kept)
        atomic_write_text(run.summary_path, json.dumps(summary, indent=2))
        return summary

    def _summary(self, run: RunDir, student, kept: Kept) -> dict[str, Any]:
        config, layout, t = self.config, self.layout, self.target
        causal = layout.arch.causal
        texts = self.splits.heldout_texts[:PERPLEXITY_TEXTS]
        summary = {
            "teacher": config.teacher,
            "recipe": config.recipe,
            "prune_method": config.prune.method,
            "student_dir": str(run.student),
            "student_shape": f"{t.num_layers}x{t.hidden_size} ({t.num_heads} heads, {t.num_kv_heads} key/value heads, "
                             f"FFN {t.intermediate_size})",
            "teacher_shape": f"{layout.num_layers}x{layout.hidden_size} ({layout.num_heads} heads, "
                             f"{layout.num_kv_heads} key/value heads, FFN {layout.ffn_size})",
            "teacher_parameters": count_parameters(self.teacher),
            "student_parameters": count_parameters(student),
            "teacher_flops_per_token": known_flops_per_token(self.teacher.config, seq_len=config.data.max_length),
            "student_flops_per_token": known_flops_per_token(student.config, seq_len=config.data.max_length),
            "kept_blocks": kept.blocks,  # 0-based teacher blocks, in order
            "kept_heads": kept.heads,  # per kept block: the teacher's query heads
            "calibration_sequences": self.batches * config.train.batch_size,
            "steps": 0,
            "heldout_loss_start": None,
            "heldout_loss_end": None,
            "embedding_cosine_start": None,
            "embedding_cosine_end": None,
            "seconds": round(time.perf_counter() - self.began, 1),
        }
        if causal and texts:  # what pruning cost before any distillation, beside the teacher's
            for key, model in (("teacher_heldout_perplexity", self.teacher), ("heldout_perplexity", student)):
                summary[key] = causal_perplexity(model, self.tokenizer, texts,
                                                 max_length=config.data.max_length)["perplexity"]
        return summary


def prune_run(config: DistillConfig, run: RunDir, *, resume: bool) -> dict[str, Any]:
    """Run a prune stage into ``run`` (checks first, then the directory, then the work); the summary.

    Under several processes only the main one prunes and writes (the result is a checkpoint on disk that the
    next stage loads); the others wait for it and return {}.
    """
    state = PartialState()
    run.check(config, resume=resume, overwrite=False)
    setup = PruneSetup(config)
    state.wait_for_everyone()
    summary: dict[str, Any] = {}
    if state.is_main_process:
        run.prepare(config, resume=resume, overwrite=False)
        summary = setup.run(run)
    state.wait_for_everyone()
    return summary
