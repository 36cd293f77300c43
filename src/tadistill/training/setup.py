"""One set-up for every entry point: ``distill``, ``compare``, ``cache-teacher`` and the stages of a run.

``RunSetup`` prepares everything a training pass needs, in one order that never changes (so that a
lane computes the same numbers alone, in a study, or resumed):

1. the accelerator (one process, or one of several under torchrun / accelerate launch);
2. the tokenizer and the teacher, with the head the objectives read (``registry.Traits``);
3. the lanes (student, terms, methods, optimizer; ``training/lane.py``), one per cell;
4. the tokenized corpus splits, the held-out summary texts and the teacher's side of the embedding cosine;
5. the stored teacher signals when the config names them, or the teacher itself (dropped when no lane
   runs it; while training, cut to the deepest block an objective reads: ``blocks_read_only``);
6. the trainer, then the finished students.

Everything that can refuse a config (models, terms, corpus) runs in steps 1-4, before the entry point
creates its run directory, so a mistake leaves nothing behind that a corrected re-run would trip over.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn

from tadistill.capture.architectures import get_module, resolve_architecture
from tadistill.config import DistillConfig
from tadistill.data.batches import BatchOrder
from tadistill.data.prepare import prepare_corpus
from tadistill.data.tokenized import CorpusSplits
from tadistill.errors import ConfigError, TadistillError
from tadistill.loading import (
    is_causal_lm,
    load_model_config,
    load_pretrained,
    load_tokenizer,
    teacher_load_options,
)
from tadistill.measure.embeddings import TeacherEmbeddings
from tadistill.measure.parameters import count_parameters
from tadistill.registry import traits
from tadistill.training.lane import Lane, build_lane
from tadistill.training.loop import LoopResult, TokenizerInfo, Trainer
from tadistill.training.pipeline import SUMMARY_TEXTS, finish_lane, start_cosine
from tadistill.training.rundir import RunDir
from tadistill.training.teacher_cache import (
    SignalSpec,
    TeacherSignals,
    lane_signal_spec,
    signal_meta,
)


def new_accelerator(precision: str) -> Accelerator:
    # Accelerate keeps its state in a process-wide singleton that refuses a second Accelerator with
    # another precision; reset it (keeping any process group) so that one Python process can run several
    # distillations, e.g. a notebook, a study, or the stages of a run.
    AcceleratorState._reset_state()
    # Students carry weights no objective reaches (BERT's pooler; blocks above the last mapped layer), and
    # DDP refuses a step where a parameter got no gradient unless told to look for them.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(mixed_precision=precision, kwargs_handlers=[ddp])


def _fill_deepspeed_batch(accelerator: Accelerator, config: DistillConfig) -> None:
    """DeepSpeed needs its micro-batch size; Accelerate reads it from a prepared dataloader, and tadistill
    prepares none (it builds its own batches), so the "auto" values are filled from the config."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    for key, value in (("train_micro_batch_size_per_gpu", config.train.batch_size),
                       ("gradient_accumulation_steps", config.train.grad_accum)):
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = config.train.batch_size * config.train.grad_accum * accelerator.num_processes


def load_teacher(configs: list[DistillConfig]):
    """Tokenizer, teacher and its architecture.

    Encoders get their MLM head when an objective that runs the teacher reads its logits (a trait); causal
    LMs always get their LM head (the logit terms need it, and a truncated student copies an untied one).
    """
    first = configs[0]
    needs_logits = any(traits(o.kind).head == "mlm" and traits(o.kind).needs_teacher and o.weight > 0
                       for c in configs for o in c.objectives)
    causal = is_causal_lm(load_model_config(first.teacher, trust_remote_code=first.trust_remote_code))
    tokenizer = load_tokenizer(first.teacher, trust_remote_code=first.trust_remote_code)
    head = "causal-lm" if causal else "mlm" if needs_logits else "base"
    teacher = load_pretrained(first.teacher, head=head, trust_remote_code=first.trust_remote_code,
                              **teacher_load_options(first))  # teacher_dtype / _quantization / _device_map
    return tokenizer, teacher, resolve_architecture(teacher)


@dataclass
class Cell:
    """One student to train in a pass: its name, config and run directory."""

    name: str
    config: DistillConfig
    run: RunDir


class RunSetup:
    """Teacher, lanes, data and trainer of one training pass (one lane for ``distill``, many for ``compare``).

    ``on_error(cell, message)``: a cell whose lane cannot be built is reported there and left out (studies);
    without it the error propagates (single runs).
    """

    def __init__(self, cells: list[Cell], *, accelerator: Accelerator | None = None,
                 on_error: Callable[[Cell, str], None] | None = None):
        if not cells:
            raise ValueError("RunSetup needs at least one cell")
        configs = [c.config for c in cells]
        self.accelerator = accelerator or new_accelerator(configs[0].train.precision)
        _fill_deepspeed_batch(self.accelerator, configs[0])
        self.began = time.perf_counter()
        self.tokenizer, self.teacher, self.teacher_arch = load_teacher(configs)
        self.teacher_parameters = count_parameters(self.teacher)
        self.teacher_config = self.teacher.config  # kept when the teacher is dropped (summary FLOPs)
        self.lanes: list[Lane] = []
        for cell in cells:
            try:
                self.lanes.append(build_lane(cell.name, cell.config, cell.run, teacher=self.teacher,
                                             teacher_arch=self.teacher_arch, tokenizer=self.tokenizer))
            except TadistillError as exc:
                if on_error is None:
                    raise
                on_error(cell, str(exc))
        if not self.lanes:
            return
        first = self.lanes[0].config
        self.splits: CorpusSplits = prepare_corpus(
            first.data, self.tokenizer, seed=first.train.seed,
            max_positions=getattr(self.teacher.config, "max_position_embeddings", None))
        BatchOrder(len(self.splits.train), first.train.batch_size, seed=first.train.seed)  # too few sequences: refuse now
        self.texts = self.splits.heldout_texts[:SUMMARY_TEXTS]
        # The teacher's side of every lane's cosine (before and after training), computed once.
        self.embeddings = TeacherEmbeddings(self.tokenizer, self.texts)
        self.signals = self._signals(first)
        self.cosine_start = {lane.name: start_cosine(lane, self.teacher, self.tokenizer, self.texts,
                                                     teacher_embeddings=self.embeddings)
                             if self.signals is None else None for lane in self.lanes}
        if self.signals is not None or not any(lane.needs_teacher for lane in self.lanes):
            # Teacher-free lanes (methods.md, teacher-free) or offline signals: the teacher's weights were only
            # read to build the students; they are dropped before training and no teacher forward ever runs.
            self.teacher = None

    def _signals(self, config: DistillConfig) -> TeacherSignals | None:
        if not config.teacher_signals:
            return None
        if len(self.lanes) > 1:
            raise ConfigError("teacher_signals serve one student at a time: distill the cells one by one")
        return TeacherSignals(config.teacher_signals, meta=signal_meta(config, self.teacher.config),
                              spec=lane_signal_spec(self.lanes[0]))

    def train(self, checkpoints: Path, *, progress: bool = True, drop_failed_lanes: bool = False) -> LoopResult:
        """Run the loop over every lane; the checkpoints hold all lanes (one Accelerate state)."""
        with blocks_read_only(self.teacher, self.teacher_arch, self.lanes) as arch:
            return self._train(arch, checkpoints, progress=progress, drop_failed_lanes=drop_failed_lanes)

    def _train(self, teacher_arch, checkpoints: Path, *, progress: bool, drop_failed_lanes: bool) -> LoopResult:
        lanes = self.lanes
        state = (lanes[0].config.model_dump(mode="json") if len(lanes) == 1
                 else {lane.name: lane.config.model_dump(mode="json") for lane in lanes})
        trainer = Trainer(
            lanes, self.accelerator, teacher=self.teacher, teacher_arch=teacher_arch, train=self.splits.train,
            heldout=self.splits.heldout, tokenizer=TokenizerInfo.of(self.tokenizer), checkpoints=checkpoints,
            state_yaml=yaml.safe_dump(state, sort_keys=False), progress=progress,
            drop_failed_lanes=drop_failed_lanes, signals=self.signals,
        )
        return trainer.run()

    def finish(self, lane: Lane, result: LoopResult) -> dict[str, Any]:
        """Save ``lane``'s student and write its summary.json (main process; every process must call it)."""
        return finish_lane(
            lane, self.accelerator, teacher=self.teacher, teacher_arch=self.teacher_arch, tokenizer=self.tokenizer,
            texts=self.texts, steps=result.final_step, split_tokens=self.splits.train.num_tokens(),
            tokens_seen=result.tokens_seen, cosine_start=self.cosine_start[lane.name], began=self.began,
            teacher_parameters=self.teacher_parameters, teacher_embeddings=self.embeddings,
            teacher_config=self.teacher_config, data_mixture=self.splits.mixture,
        )


def deepest_block_read(lanes: list[Lane]) -> int | None:
    """The deepest teacher block any lane's objectives read during training; None when they read its outputs
    (logits, the final norm, samples from the teacher), so that the whole teacher must run."""
    if any(lane.needs_teacher and (lane.distiller.needs_logits or lane.distiller.needs_causal_head)
           or any(m.uses_teacher for m in lane.methods) for lane in lanes):
        return None
    deepest = 0
    for lane in lanes:
        if lane.needs_teacher:
            request = lane.teacher_request
            deepest = max(deepest, *request.hidden, *request.qkv)
    return deepest


@contextmanager
def blocks_read_only(teacher, arch, lanes: list[Lane]):
    """While training, the teacher runs only up to the deepest block an objective reads; yields its architecture.

    MiniLMv2 from an upper-middle block (BERT-large block 21 of 24), or a layer mapping that skips the top
    blocks, never needs the blocks above: they are cut from the teacher's block list (and its pooler, which
    no objective reads, is not run) for the duration of training and put back afterwards, so the summary's
    cosine sees the whole teacher. Exact: blocks below never see the ones above (tested equal).
    """
    with teacher_cut(teacher, arch, deepest_block_read(lanes) if teacher is not None else None) as cut:
        yield cut


@contextmanager
def teacher_cut(teacher, arch, deepest: int | None):
    """The teacher with its blocks above ``deepest`` (and its pooler) removed for the block; yields its
    architecture. None or a depth >= the teacher's: the whole teacher. Used by training and cache-teacher."""
    if teacher is None or deepest is None or deepest >= arch.num_layers:
        yield arch
        return
    deepest = max(deepest, 1)
    parent_path, _, name = arch.layers.rpartition(".")
    parent = get_module(teacher, parent_path)
    blocks, count = getattr(parent, name), teacher.config.num_hidden_layers
    base = teacher.base_model
    pooler = getattr(base, "pooler", None)
    setattr(parent, name, nn.ModuleList(list(blocks)[:deepest]))
    teacher.config.num_hidden_layers = deepest  # models that loop over config.num_hidden_layers blocks
    if isinstance(pooler, nn.Module):
        base.pooler = None
    try:
        # The capture hooks see the cut teacher: hidden state ``deepest`` is that block's output, as in the
        # whole teacher (only the top index L means "after the final norm").
        yield dataclasses.replace(arch, num_layers=deepest, final_norm=None)
    finally:
        setattr(parent, name, blocks)
        teacher.config.num_hidden_layers = count
        if isinstance(pooler, nn.Module):
            base.pooler = pooler


def signal_spec(config: DistillConfig) -> tuple[Any, Any, Any, SignalSpec]:
    """What ``cache-teacher`` stores for ``config``: (tokenizer, teacher, its architecture, the spec).

    The spec comes from the objectives' terms, built against a student made on the meta device (its shape is
    all they read): no student weights are allocated or copied.
    """
    import torch

    tokenizer, teacher, t_arch = load_teacher([config])
    shape_only = config.model_copy(deep=True)
    if shape_only.student.pretrained is None:
        shape_only.student.init = "random"
    with torch.device("meta"):
        lane = build_lane("student", shape_only, RunDir("."), teacher=teacher, teacher_arch=t_arch,
                          tokenizer=tokenizer)
    return tokenizer, teacher, t_arch, lane_signal_spec(lane)
