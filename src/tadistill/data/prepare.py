"""From a DataConfig and a tokenizer to tokenized, split, cached sequences."""

from __future__ import annotations

import os
from pathlib import Path

from tadistill.config import DataConfig
from tadistill.data.prompts import load_pairs, pairs_fingerprint, split_prompts, tokenize_pairs
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
    cache_dir = Path(dc.cache_dir) if dc.cache_dir else DEFAULT_CACHE
    if dc.prompt_field:  # prompt / completion records: one sequence per record, only completions distilled
        pairs = []
        for source in sources:
            part = load_pairs(source, prompt_field=dc.prompt_field, completion_field=dc.completion_field,
                              split=dc.split)
            pairs += part[: dc.max_texts] if dc.max_texts else part
        fingerprint = "|".join(
            pairs_fingerprint(s, prompt_field=dc.prompt_field, completion_field=dc.completion_field, split=dc.split)
            for s in sources
        )
        return tokenize_pairs(pairs, tokenizer, max_length=dc.max_length, heldout_fraction=dc.heldout_fraction,
                              seed=seed, cache_dir=cache_dir, fingerprint=f"pairs|{fingerprint}|{dc.max_texts}")

    def load() -> list[str]:
        texts = []
        for source in sources:  # several corpora (e.g. one per language) train together
            part = load_texts(source, text_field=dc.text_field, split=dc.split)
            texts += part[: dc.max_texts] if dc.max_texts else part
        return texts

    # The cache key comes from the sources' fingerprints, not their texts: a cache hit reads no corpus
    # (the built-in one takes seconds to rebuild), and the cache holds the held-out texts too.
    fingerprint = "|".join(source_fingerprint(s, text_field=dc.text_field, split=dc.split) for s in sources)
    splits = tokenize_corpus(
        load,
        tokenizer,
        max_length=dc.max_length,
        heldout_fraction=dc.heldout_fraction,
        seed=seed,
        packing=dc.packing,
        cache_dir=cache_dir,
        fingerprint=f"{fingerprint}|{dc.max_texts}",
    )
    if dc.prompt_tokens:  # plain text as prompt / continuation (on-policy training samples the continuation)
        splits = CorpusSplits(split_prompts(splits.train, dc.prompt_tokens),
                              split_prompts(splits.heldout, dc.prompt_tokens), splits.heldout_texts)
    return splits
