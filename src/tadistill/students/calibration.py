"""Calibration batches for a student initialised by importance (``student.init=importance``).

The same batches a prune stage scores (training/prune.py, ``PruneSetup.calibration``): the first
``prune.calibration_batches`` batches of the training split in the run's shuffled order, no sequence
twice, so the units are ranked on text the student will be distilled on and never on held-out text.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tadistill.config import DistillConfig
from tadistill.data.batches import BatchOrder, collate
from tadistill.data.prepare import prepare_corpus


def calibration_batches(config: DistillConfig, tokenizer, *, max_positions: int | None) -> Iterator[dict[str, torch.Tensor]]:
    """Yield up to ``config.prune.calibration_batches`` collated batches (input_ids, attention_mask (B, T))."""
    splits = prepare_corpus(config.data, tokenizer, seed=config.train.seed, max_positions=max_positions)
    yield from first_batches(splits.train, config, tokenizer)


def calibration_count(train, config: DistillConfig) -> int:
    """How many calibration batches ``first_batches`` yields for the training split ``train``."""
    order = BatchOrder(len(train), config.train.batch_size, seed=config.train.seed)
    return min(config.prune.calibration_batches, order.batches_per_epoch())


def first_batches(train, config: DistillConfig, tokenizer) -> Iterator[dict[str, torch.Tensor]]:
    """The first batches of the run's training order over ``train`` (no sequence twice), collated one at a time."""
    order = BatchOrder(len(train), config.train.batch_size, seed=config.train.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for k in range(calibration_count(train, config)):
        sequences = [train[i] for i in order.indices(k)]
        yield collate(sequences, pad_id=pad if pad is not None else 0, special_ids=tokenizer.all_special_ids)
