"""A causal LM split into its base model and its output layer, for losses computed chunk by chunk.

``GPT2LMHeadModel(...)`` computes the (B, T, V) logits of every position. The chunked losses
(``objectives/chunked.py``) instead need the last hidden states (after the final norm) and the
output layer as a callable, applied to a few rows at a time. The forward hooks of ``capture`` stay
active: the base model is the same module tree, called directly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tadistill.errors import ModelError


@dataclass
class CausalParts:
    base: nn.Module  # returns last_hidden_state (B, T, d), after the final norm
    output_layer: Callable[[Tensor], Tensor]  # (..., d) -> (..., V) logits


def causal_lm_parts(model: nn.Module) -> CausalParts:
    """Base model and output layer of a ``*ForCausalLM`` model.

    Families that post-process logits in their forward are reproduced: a ``logit_scale`` multiplier
    (Cohere) and ``final_logit_softcapping`` (Gemma 2: cap * tanh(z / cap)).
    """
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        raise ModelError(f"{type(model).__name__} is not a causal language model with an output layer: load it with "
                         "AutoModelForCausalLM")
    config = model.config
    scale = getattr(config, "logit_scale", None)
    cap = getattr(config, "final_logit_softcapping", None)
    weight = getattr(head, "weight", None)

    def output_layer(hidden: Tensor) -> Tensor:
        if weight is not None and hidden.dtype != weight.dtype and not torch.is_autocast_enabled(hidden.device.type):
            hidden = hidden.to(weight.dtype)  # e.g. a bf16 teacher hidden state into a float32 head
        logits = head(hidden)
        if scale is not None:
            logits = logits * scale
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return CausalParts(base, output_layer)
