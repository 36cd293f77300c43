"""Measurements of a model on held-out text that training and evaluation both take.

Training writes some of them into every run summary (the teacher-student cosine of sentence
embeddings, parameter counts, a causal LM's perplexity); the evaluation suite reports them beside its
own. They live here, below both, so that training never imports evaluation:

- ``inference``: running a model on text (eval mode, its device, padded batches of texts, its LM head);
- ``perplexity``: masked-LM and causal-LM loss and perplexity;
- ``embeddings``: mean-pooled sentence embeddings, their cosine, a teacher's embeddings computed once;
- ``parameters``: parameter counts.
"""

from __future__ import annotations

from tadistill.measure.embeddings import TeacherEmbeddings, embedding_cosine, mean_pool, sentence_embeddings
from tadistill.measure.parameters import count_parameters
from tadistill.measure.perplexity import causal_perplexity, masked_lm_perplexity

__all__ = [
    "TeacherEmbeddings",
    "causal_perplexity",
    "count_parameters",
    "embedding_cosine",
    "masked_lm_perplexity",
    "mean_pool",
    "sentence_embeddings",
]
