"""Parameter counts of a model (the sizes a run summary and the cost report state)."""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module, *, exclude_embeddings: bool = False) -> int:
    """Number of parameter elements of ``model``; a tensor shared by several modules counts once.

    ``exclude_embeddings`` leaves out the weights of every ``nn.Embedding`` (word, position and
    token-type tables) and an untied output-embedding matrix (``get_output_embeddings()``, e.g. a
    Llama ``lm_head``): the "non-embedding" count N of Kaplan et al. (2020).
    """
    skip: set[int] = set()
    if exclude_embeddings:
        skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        get_output = getattr(model, "get_output_embeddings", None)
        output = get_output() if callable(get_output) else None
        if isinstance(output, nn.Module):
            skip.update(id(p) for p in output.parameters(recurse=False) if p.dim() == 2)
    # Module.parameters() already yields a tied tensor once.
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
