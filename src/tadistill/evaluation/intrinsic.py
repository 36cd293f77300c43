"""Intrinsic quality of a language model on held-out text: masked-LM and causal-LM perplexity.

The code lives in :mod:`tadistill.measure` (``measure/perplexity.py``, ``measure/inference.py``),
below both training and evaluation, because a run's summary reports a causal LM's perplexity too.
These names stay importable from here for users of ``tadistill.evaluation.intrinsic``.
"""

from __future__ import annotations

from tadistill.measure.inference import evaluating, has_lm_head, lm_logits, model_device, text_batches
from tadistill.measure.perplexity import causal_perplexity, masked_lm_perplexity

__all__ = [
    "causal_perplexity",
    "evaluating",
    "has_lm_head",
    "lm_logits",
    "masked_lm_perplexity",
    "model_device",
    "text_batches",
]
