"""Weighted mixtures of sources, addressable by a global sequence index.

Probabilities (``mixture_probabilities``): source i is drawn with probability w_i / sum_j w_j when
weights are given; with language smoothing (``alpha``), language L is drawn with probability
q_L = n_L^alpha / sum_M n_M^alpha, n_L the training tokens of its sources (Conneau & Lample 2019,
"Cross-lingual Language Model Pretraining", section 3.1: alpha = 0.5 there, 0.3 in XLM-R, Conneau et al.
2020, and 0.7 in mBERT-style exponential smoothing), and shares it among its sources by size; without
either, sources are drawn in proportion to their size (the plain concatenation's proportions).

``MixtureSet`` keeps the loop's index-based contract (``len``, ``set[g]``, ``prompt_length(g)``,
``num_tokens()``): global index g maps to (source, index in source) as a pure function of (seed, g).
The source of g is drawn from a generator seeded by (seed, g // BLOCK), one block of draws at a time;
the occurrence count c of that source before g (a table of per-block counts plus a count inside the
block) picks index (a_i * c + b_i) mod n_i, a permutation of the source for every n_i consecutive
occurrences (a_i coprime to n_i). So within one pass over the mixture an upsampled source repeats
evenly and a downsampled one shows an evenly spread subset, no sequence twice. ``BatchOrder`` then
shuffles the global indices as before, and a resumed run reads exactly the samples the uninterrupted
one reads, with memory that does not grow with the sources (the count table has one row per 4,096
sequences).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from tadistill.errors import DataError

BLOCK = 4096  # global indices per block of source draws


class Sequences(Protocol):
    """What the loop reads from a training or held-out set (``SequenceSet``, ``ShardSet``, ``MixtureSet``)."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Tensor: ...
    def prompt_length(self, i: int) -> int: ...
    def num_tokens(self) -> int: ...


def mixture_probabilities(
    tokens: Sequence[int], *, weights: Sequence[float | None] | None = None,
    languages: Sequence[str | None] | None = None, alpha: float | None = None,
) -> list[float]:
    """The probability of drawing each source (see the module docstring); ``tokens``: training tokens per source.

    Raises DataError for a source without tokens and ValueError for inconsistent arguments (the config
    checks those first).
    """
    if not tokens:
        raise ValueError("a mixture needs at least one source")
    if any(n <= 0 for n in tokens):
        raise DataError("a source of the mixture has no training tokens: add text to it or drop it")
    given = [w for w in (weights or []) if w is not None]
    if alpha is not None:
        if languages is None or any(lang is None for lang in languages) or len(languages) != len(tokens):
            raise ValueError("alpha needs a language for every source")
        per_language: dict[str, int] = {}
        for lang, n in zip(languages, tokens):
            per_language[lang] = per_language.get(lang, 0) + n  # type: ignore[index]
        smoothed = {lang: n**alpha for lang, n in per_language.items()}
        total = sum(smoothed.values())
        return [smoothed[lang] / total * n / per_language[lang] for lang, n in zip(languages, tokens)]  # type: ignore[index]
    if given:
        if len(given) != len(tokens) or any(w <= 0 for w in given):
            raise ValueError("weights must be positive, one per source")
        return [w / sum(given) for w in given]
    return [n / sum(tokens) for n in tokens]


def _seed_of(*parts: Any) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # < 2**63, what torch.Generator.manual_seed takes


def _stride(n: int, seed: int, source: int) -> tuple[int, int]:
    """(a, b) with gcd(a, n) = 1: c -> (a c + b) mod n permutes 0..n-1. a starts near n / golden ratio, which
    spreads the first occurrences evenly over the source (Knuth's Fibonacci hashing), then moves to a coprime."""
    generator = torch.Generator().manual_seed(_seed_of(seed, "stride", source))
    shift = int(torch.randint(n, (1,), generator=generator))
    a = max(1, round(n / 1.6180339887))
    while math.gcd(a, n) != 1:
        a += 1
    return a % n if n > 1 else 0, shift


@dataclass
class MixtureSet:
    """Sequences drawn from ``parts`` with ``probabilities``: global index g -> (source, index); see the module.

    length: how many global indices one pass has (default: the parts' total, so a pass is as long as their
    concatenation). ``names``: a label per part (its source, or language) for ``describe``.
    """

    parts: list[Any]
    probabilities: list[float]
    seed: int
    length: int | None = None
    names: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.parts) != len(self.probabilities) or not self.parts:
            raise ValueError("one probability per part, at least one part")
        sizes = [len(p) for p in self.parts]
        empty = [i for i, n in enumerate(sizes) if n == 0]
        if empty:
            label = self.names[empty[0]] if self.names else str(empty[0])
            raise DataError(f"source {label!r} of the mixture has no sequences: add text to it or drop it")
        total = sum(self.probabilities)
        self._cumulative = torch.tensor(self.probabilities, dtype=torch.float64).cumsum(0) / total  # (S,)
        self.length = self.length or sum(sizes)
        self._sizes = sizes
        self._strides = [_stride(n, self.seed, i) for i, n in enumerate(sizes)]
        blocks = -(-self.length // BLOCK)
        # counts[k, i]: occurrences of source i before block k; (blocks + 1, S) int64, built one block at a time.
        counts = torch.zeros(blocks + 1, len(self.parts), dtype=torch.int64)
        for k in range(blocks):
            counts[k + 1] = counts[k] + torch.bincount(self._draw(k), minlength=len(self.parts))
        self._counts = counts
        self._block: tuple[int, Tensor] | None = None

    def _draw(self, block: int) -> Tensor:
        """The sources of block ``block``'s global indices: (n,) int64, n = BLOCK or what the last block holds."""
        generator = torch.Generator().manual_seed(_seed_of(self.seed, "mixture", block))
        u = torch.rand(BLOCK, generator=generator, dtype=torch.float64)
        sources = torch.searchsorted(self._cumulative, u, right=True).clamp_max(len(self.parts) - 1)
        return sources[: min(BLOCK, self.length - block * BLOCK)]

    def locate(self, g: int) -> tuple[int, int]:
        """(source, index in that source) of global index g."""
        if not -self.length <= g < self.length:
            raise IndexError(f"sequence index {g} out of range for {self.length} sequences")
        g = g + self.length if g < 0 else g
        block, within = divmod(g, BLOCK)
        if self._block is None or self._block[0] != block:
            self._block = (block, self._draw(block))
        drawn = self._block[1]
        source = int(drawn[within])
        c = int(self._counts[block, source]) + int((drawn[:within] == source).sum())
        a, b = self._strides[source]
        return source, (a * c + b) % self._sizes[source]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, g: int) -> Tensor:
        source, i = self.locate(g)
        return self.parts[source][i]

    def prompt_length(self, g: int) -> int:
        source, i = self.locate(g)
        return self.parts[source].prompt_length(i)

    def num_tokens(self) -> int:
        """Tokens of the parts (each sequence once), as the training split's size is reported."""
        return sum(p.num_tokens() for p in self.parts)

    def fractions(self) -> list[float]:
        """The fraction of one pass's global indices that each source fills (realised, not the target)."""
        return (self._counts[-1].double() / self.length).tolist()

    def describe(self) -> list[dict[str, Any]]:
        """Per source: name, target probability, realised fraction of one pass, its sequences and tokens."""
        total = sum(self.probabilities)
        return [
            {"source": self.names[i] if self.names else str(i), "probability": round(p / total, 6),
             "fraction": round(f, 6), "sequences": self._sizes[i], "tokens": part.num_tokens(),
             "epochs_per_pass": round(int(self._counts[-1, i]) / self._sizes[i], 4)}
            for i, (p, f, part) in enumerate(zip(self.probabilities, self.fractions(), self.parts))
        ]


class ConcatSet:
    """Parts one after another: index g is in the first part whose cumulative size exceeds it (no sampling)."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self._ends = torch.tensor([len(p) for p in parts], dtype=torch.int64).cumsum(0)

    def _locate(self, g: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= g < n:
            raise IndexError(f"sequence index {g} out of range for {n} sequences")
        g = g + n if g < 0 else g
        part = int(torch.searchsorted(self._ends, g, right=True))
        return part, g - (int(self._ends[part - 1]) if part else 0)

    def __len__(self) -> int:
        return int(self._ends[-1]) if self.parts else 0

    def __getitem__(self, g: int) -> Tensor:
        part, i = self._locate(g)
        return self.parts[part][i]

    def prompt_length(self, g: int) -> int:
        part, i = self._locate(g)
        return self.parts[part].prompt_length(i)

    def num_tokens(self) -> int:
        return sum(p.num_tokens() for p in self.parts)
