"""The data layer: corpus sources, tokenization with packing and caching, MLM masking, batching."""

from __future__ import annotations

from tadistill.data.batches import BatchOrder, collate
from tadistill.data.builtin import builtin_texts
from tadistill.data.masking import mask_tokens
from tadistill.data.sources import load_texts, source_fingerprint
from tadistill.data.tokenized import CorpusSplits, SequenceSet, tokenize_corpus

__all__ = [
    "BatchOrder",
    "CorpusSplits",
    "SequenceSet",
    "builtin_texts",
    "collate",
    "load_texts",
    "mask_tokens",
    "source_fingerprint",
    "tokenize_corpus",
]
