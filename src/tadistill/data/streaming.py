"""Tokenize and pack a stream of texts in bounded memory, into token shards.

The in-memory path (``tokenized.tokenize_corpus``) holds a whole split as one token stream and cuts
it; here the same cuts are made on the fly: texts arrive one at a time, are split train / held-out by
the same stable hash, tokenized a chunk of texts at a time and packed as they come, so memory holds one
chunk of texts and less than one sequence of leftover tokens. For a corpus with at least one held-out
text the sequences are exactly those of ``tokenize_corpus`` (tested); the in-memory path's fallback
that moves a text into an empty held-out split needs the whole corpus, so here an empty held-out split
is an error instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from tadistill.data.shards import ShardWriter, SourceFolder
from tadistill.data.tokenized import (
    _TOKENIZE_BATCH,
    MIN_SEQUENCE_TOKENS,
    _separator_id,
    _unit_hash,
    special_template,
)
from tadistill.errors import ConfigError, DataError


class Packer:
    """Packs texts' token ids into sequences as they arrive (RoBERTa's FULL-SENTENCES, Liu et al. 2019, 4.2).

    packing=True: texts joined by ``separator`` and cut into chunks of ``body`` tokens; a chunk never opens
    on the separator before a text (it starts one token later), and a final chunk shorter than
    min(body, 8) tokens is dropped unless it is the only one -- the rules of ``tokenized._pack``.
    packing=False: one text per sequence, cut to ``body``. Every chunk gets ``prefix`` and ``suffix`` (the
    tokenizer's special tokens) and goes to ``emit``.
    """

    def __init__(self, emit: Callable[[np.ndarray], None], *, body: int, prefix: list[int], suffix: list[int],
                 separator: int | None, packing: bool) -> None:
        self.emit_sequence, self.body, self.packing = emit, body, packing
        self.prefix = np.asarray(prefix, dtype=np.int64)
        self.suffix = np.asarray(suffix, dtype=np.int64)
        self.separator = separator if packing else None
        self._buffer = np.zeros(0, dtype=np.int64)  # stream tokens from position self._base on
        self._is_separator = np.zeros(0, dtype=bool)
        self._base = 0  # stream position of _buffer[0]
        self._pos = 0  # stream position where the next chunk starts
        self._total = 0  # tokens in the stream so far
        self.sequences = 0

    def add(self, ids: list[int]) -> None:
        """Add one text's token ids (no special tokens); empty texts are skipped, as in the in-memory path."""
        if not ids:
            return
        if not self.packing:
            self._emit(np.asarray(ids[: self.body], dtype=np.int64))
            return
        parts, flags = [], []
        if self.separator is not None and self._total > 0:
            parts.append(np.asarray([self.separator], dtype=np.int64))
            flags.append(np.ones(1, dtype=bool))
        parts.append(np.asarray(ids, dtype=np.int64))
        flags.append(np.zeros(len(ids), dtype=bool))
        self._buffer = np.concatenate([self._buffer, *parts])
        self._is_separator = np.concatenate([self._is_separator, *flags])
        self._total += sum(p.size for p in parts)
        self._cut(final=False)

    def finish(self) -> int:
        """Cut what is left (the tail) and return the number of sequences emitted."""
        if self.packing:
            self._cut(final=True)
        return self.sequences

    def _cut(self, *, final: bool) -> None:
        while self._pos < self._total:
            at = self._pos - self._base
            if self._is_separator[at]:
                self._pos += 1
                continue
            if self._pos + self.body > self._total and not final:
                break  # wait for more text: the chunk is not full yet
            chunk = self._buffer[at : at + self.body]
            self._pos += chunk.size
            # Only the last chunk can be short: too short a tail teaches nothing, unless it is the only one.
            if chunk.size >= min(self.body, MIN_SEQUENCE_TOKENS) or self.sequences == 0:
                self._emit(chunk)
        keep = self._pos - self._base  # every future chunk starts at or after _pos
        if keep > 0:
            self._buffer, self._is_separator = self._buffer[keep:], self._is_separator[keep:]
            self._base = self._pos

    def _emit(self, content: np.ndarray) -> None:
        self.emit_sequence(np.concatenate([self.prefix, content, self.suffix]))
        self.sequences += 1


def prepare_stream(
    texts: Iterable[str], tokenizer: Any, folder: SourceFolder, *, max_length: int, heldout_fraction: float,
    seed: int, packing: bool, name: str,
) -> None:
    """Split, tokenize and pack ``texts`` into the writers of ``folder`` (train and held-out).

    Text t is held out when blake2b(seed, t) / 2**64 < heldout_fraction, as in ``tokenized.split_texts``.
    Raises DataError when the held-out split stays empty or a split yields no sequence.
    """
    prefix, suffix = special_template(tokenizer)
    body = max_length - len(prefix) - len(suffix)
    if body < 1:
        raise ConfigError(f"max_length {max_length} leaves no room beside the special tokens: raise it")
    separator = _separator_id(tokenizer) if packing else None
    packers = {split: Packer(folder.writers[split].append, body=body, prefix=prefix, suffix=suffix,
                             separator=separator, packing=packing) for split in ("train", "heldout")}
    pending: dict[str, list[str]] = {"train": [], "heldout": []}
    counts = {"train": 0, "heldout": 0}

    def tokenize(split: str) -> None:
        # verbose=False: texts longer than the model limit are expected here; they are cut by the packer.
        encoded = tokenizer(pending[split], add_special_tokens=False, return_attention_mask=False, verbose=False)
        for ids in encoded["input_ids"]:
            packers[split].add(list(ids))
        pending[split] = []

    for text in texts:
        split = "heldout" if _unit_hash(seed, text) < heldout_fraction else "train"
        counts[split] += 1
        pending[split].append(text)
        if split == "heldout":
            folder.keep_heldout_text(text)
        if len(pending[split]) >= _TOKENIZE_BATCH:
            tokenize(split)
    for split in pending:
        if pending[split]:
            tokenize(split)
    if counts["heldout"] == 0:
        raise DataError(
            f"corpus {name!r} gave no held-out text ({counts['train']} texts at heldout_fraction "
            f"{heldout_fraction}): raise data.heldout_fraction or add text"
        )
    for split, packer in packers.items():
        if packer.finish() == 0:
            raise DataError(f"corpus {name!r} too small: its {split} split gives no token sequence; add more text")


def check_writer_dtype(writer: ShardWriter, tokenizer: Any) -> None:
    """Refuse a tokenizer whose ids do not fit the writer's dtype (a programming error)."""
    if len(tokenizer) - 1 > np.iinfo(writer.dtype).max:
        raise ValueError(f"{len(tokenizer)} token ids do not fit {writer.dtype}")
