"""From a DataConfig and a tokenizer to tokenized, split, cached sequences."""

from __future__ import annotations

import os
from pathlib import Path

from tadistill.config import DataConfig
from tadistill.data.sources import load_texts, source_fingerprint
from tadistill.data.tokenized import CorpusSplits, tokenize_corpus
from tadistill.errors import ConfigError

DEFAULT_CACHE = Path(os.environ.get("TADISTILL_CACHE", Path.home() / ".cache" / "tadistill"))


def prepare_corpus(dc: DataConfig, tokenizer, *, seed: int, max_positions: int | None = None) -> CorpusSplits:
    """Load, tokenize (cached), split and pack the corpus of ``dc``."""
    if max_positions and dc.max_length > max_positions:
        raise ConfigError(f"data.max_length={dc.max_length} exceeds the teacher's {max_positions} positions: lower it")
    texts = load_texts(dc.source, text_field=dc.text_field, split=dc.split)
    if dc.max_texts:
        texts = texts[: dc.max_texts]
    return tokenize_corpus(
        texts,
        tokenizer,
        max_length=dc.max_length,
        heldout_fraction=dc.heldout_fraction,
        seed=seed,
        packing=dc.packing,
        cache_dir=Path(dc.cache_dir) if dc.cache_dir else DEFAULT_CACHE,
        fingerprint=source_fingerprint(dc.source, text_field=dc.text_field, split=dc.split) + f"|{dc.max_texts}",
    )
