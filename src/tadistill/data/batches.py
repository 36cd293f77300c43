"""Batches: padding a list of sequences, and a shuffled batch order that resumes exactly.

``BatchOrder.indices(k)`` is a pure function of the batch number k: epoch e = k // batches_per_epoch
draws its permutation from a generator seeded with a hash of (seed, e), so a run resumed at step k
sees the same batches as an uninterrupted one without replaying the data loader.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import Tensor

from tadistill.errors import ConfigError, DataError


def collate(sequences: list[Tensor], *, pad_id: int, special_ids: Iterable[int]) -> dict[str, Tensor]:
    """Right-pad 1-D token-id tensors into a batch.

    Returns input_ids (B, T) long padded with ``pad_id`` to the longest sequence T, attention_mask
    (B, T) long (1 = real token), special_tokens_mask (B, T) bool (True at any of ``special_ids`` and
    at padding; these positions are never masked for MLM nor counted as content).
    """
    if not sequences:
        raise ValueError("collate needs at least one sequence")
    lengths = torch.tensor([s.numel() for s in sequences])
    batch, width = len(sequences), int(lengths.max())
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : seq.numel()] = seq.to(torch.long)
    # (B, T): position t of row b is real when t < length_b
    attention = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    special_mask = torch.isin(input_ids, special) | ~attention
    return {
        "input_ids": input_ids,
        "attention_mask": attention.long(),
        "special_tokens_mask": special_mask,
    }


class BatchOrder:
    """Deterministic shuffled batches over ``num_examples`` examples, addressable by batch number.

    Each epoch is a fresh permutation; with drop_last the last partial batch of each epoch is skipped
    (its examples differ from epoch to epoch, so none is left out for good).
    """

    def __init__(self, num_examples: int, batch_size: int, *, seed: int, drop_last: bool = True) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}: change it")
        if num_examples < 1 or (drop_last and num_examples < batch_size):
            raise DataError(
                f"the corpus has too few sequences ({num_examples}) for the batch size {batch_size}: "
                "add text or lower the batch size"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self._cached_epoch: int | None = None
        self._cached_perm: Tensor | None = None

    def batches_per_epoch(self) -> int:
        """Full batches per epoch (drop_last) or batches including the last partial one."""
        if self.drop_last:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    def indices(self, batch_number: int) -> list[int]:
        """Example indices of batch ``batch_number`` (0-based, counted over all epochs)."""
        if batch_number < 0:
            raise ValueError(f"batch_number must be >= 0, got {batch_number}")
        epoch, k = divmod(batch_number, self.batches_per_epoch())
        start = k * self.batch_size
        return self._permutation(epoch)[start : start + self.batch_size].tolist()

    def _permutation(self, epoch: int) -> Tensor:
        # Memoizing the current epoch's permutation changes no result: it is a function of epoch only.
        if self._cached_epoch != epoch:
            digest = hashlib.blake2b(f"{self.seed}:{epoch}".encode(), digest_size=8).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(digest, "big") >> 1)  # < 2**63
            self._cached_perm = torch.randperm(self.num_examples, generator=generator)
            self._cached_epoch = epoch
        assert self._cached_perm is not None
        return self._cached_perm
