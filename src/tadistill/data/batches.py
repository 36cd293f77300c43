"""Batches: padding a list of sequences, and a shuffled batch order that resumes exactly.

``BatchOrder.indices(k)`` is a pure function of the batch number k: epoch e = k // batches_per_epoch
draws its permutation from a generator seeded with a hash of (seed, e), so a run resumed at step k
sees the same batches as an uninterrupted one without replaying the data loader.

Up to ``RANDPERM_LIMIT`` examples the permutation is ``torch.randperm`` (8 bytes per example); above it,
a keyed Feistel network evaluated only at the batch's positions (Black & Rogaway 2002, "Ciphers with
arbitrary finite domains": a 4-round Feistel permutation of [0, 4^h), cycle-walked into [0, N)), so
the order of a corpus of any size costs no memory.
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


RANDPERM_LIMIT = 1 << 22  # examples (32 MB of int64 indices); beyond it the Feistel permutation
_ROUNDS = 4
_MASK32 = (1 << 32) - 1


def _round_keys(seed: int, epoch: int) -> list[int]:
    digest = hashlib.blake2b(f"feistel:{seed}:{epoch}".encode(), digest_size=4 * _ROUNDS).digest()
    return [int.from_bytes(digest[4 * r : 4 * r + 4], "big") for r in range(_ROUNDS)]


def feistel_permutation(positions: Tensor, n: int, keys: list[int]) -> Tensor:
    """A keyed bijection of [0, n) evaluated at ``positions`` ((B,) int64), without building the permutation.

    A balanced Feistel network on 2h bits (4^h >= n) permutes [0, 4^h) for any round function; values that
    land at or above n are encrypted again (cycle walking) until they fall inside, which permutes [0, n).
    """
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    low = (1 << half) - 1

    def encrypt(x: Tensor) -> Tensor:
        left, right = x >> half, x & low
        for key in keys:
            # Round function: a 32-bit multiply-xorshift hash of (right, key); every product stays below 2**63.
            f = ((right ^ key) * 0x5BD1E995) & _MASK32
            f = ((f ^ (f >> 15)) * 0x2C1B3C6D) & _MASK32
            f = f ^ (f >> 13)
            left, right = right, (left ^ f) & low
        return (left << half) | right

    out = encrypt(positions.to(torch.int64))
    outside = out >= n
    while bool(outside.any()):
        out[outside] = encrypt(out[outside])
        outside = out >= n
    return out


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
        if self.num_examples > RANDPERM_LIMIT:
            stop = min(start + self.batch_size, self.num_examples)
            positions = torch.arange(start, stop, dtype=torch.int64)
            return feistel_permutation(positions, self.num_examples, _round_keys(self.seed, epoch)).tolist()
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
