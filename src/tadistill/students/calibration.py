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
    order = BatchOrder(len(splits.train), config.train.batch_size, seed=config.train.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for k in range(min(config.prune.calibration_batches, order.batches_per_epoch())):
        sequences = [splits.train[i] for i in order.indices(k)]
        yield collate(sequences, pad_id=pad if pad is not None else 0, special_ids=tokenizer.all_special_ids)
