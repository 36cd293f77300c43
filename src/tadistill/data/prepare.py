"""From a DataConfig and a tokenizer to tokenized, split, cached sequences."""

from __future__ import annotations

import os
from pathlib import Path

from tadistill.config import DataConfig
from tadistill.data.sources import load_texts, source_fingerprint
from tadistill.data.tokenized import CorpusSplits, split_texts, tokenize_corpus
from tadistill.errors import ConfigError

DEFAULT_CACHE = Path(os.environ.get("TADISTILL_CACHE", Path.home() / ".cache" / "tadistill"))


def heldout_texts(source: str, dc: DataConfig, *, seed: int, limit: int) -> list[str]:
    """The held-out texts of one source under the same deterministic split as training (for evaluation)."""
    texts = load_texts(source, text_field=dc.text_field, split=dc.split)
    if dc.max_texts:
        texts = texts[: dc.max_texts]
    return split_texts(texts, dc.heldout_fraction, seed=seed)[1][:limit]


def prepare_corpus(dc: DataConfig, tokenizer, *, seed: int, max_positions: int | None = None) -> CorpusSplits:
    """Load, tokenize (cached), split and pack the corpus of ``dc``."""
    if max_positions and dc.max_length > max_positions:
        raise ConfigError(f"data.max_length={dc.max_length} exceeds the teacher's {max_positions} positions: lower it")
    sources = [dc.source] if isinstance(dc.source, str) else list(dc.source)
    texts = []
    for source in sources:  # several corpora (e.g. one per language) train together
        part = load_texts(source, text_field=dc.text_field, split=dc.split)
        texts += part[: dc.max_texts] if dc.max_texts else part
    fingerprint = "|".join(source_fingerprint(s, text_field=dc.text_field, split=dc.split) for s in sources)
    return tokenize_corpus(
        texts,
        tokenizer,
        max_length=dc.max_length,
        heldout_fraction=dc.heldout_fraction,
        seed=seed,
        packing=dc.packing,
        cache_dir=Path(dc.cache_dir) if dc.cache_dir else DEFAULT_CACHE,
        fingerprint=f"{fingerprint}|{dc.max_texts}",
    )
