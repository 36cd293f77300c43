"""Masked-language-model corruption (BERT, Devlin et al. 2019, section 3.1, "Task #1: Masked LM").

15% of the non-special positions are selected; of those, 80% become [MASK], 10% a random token and
10% stay unchanged, so the model cannot rely on [MASK] being present at fine-tuning time. Objectives
that need MLM logits (the OD / DistilBERT losses, WID's MLM loss) corrupt a batch with this function;
teacher and student then see the same corrupted ids.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tadistill.errors import ConfigError

IGNORE_INDEX = -100  # the label value torch.nn.functional.cross_entropy ignores by default


def mask_tokens(
    input_ids: Tensor,
    special_tokens_mask: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Corrupt a batch for masked-language modelling.

    input_ids: (B, T) long; special_tokens_mask: (B, T) bool, True at special tokens and padding, which
    are never selected. Returns (masked_ids (B, T) long, labels (B, T) long): labels hold the original
    id at selected positions and -100 elsewhere. Each position is selected independently with
    ``probability``; a selected position becomes ``mask_token_id`` with probability 0.8, a uniform
    random id in [0, vocab_size) with 0.1, and keeps its id with 0.1. All randomness comes from
    ``generator`` (which must live on input_ids' device); None uses torch's global generator.
    The input tensors are not modified.
    """
    if input_ids.shape != special_tokens_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and special_tokens_mask {tuple(special_tokens_mask.shape)} differ"
        )
    if not 0.0 < probability <= 1.0:
        raise ConfigError(f"the masking probability must be in (0, 1], got {probability}: change it")
    if vocab_size < 1:
        raise ConfigError(f"vocab_size must be positive, got {vocab_size}: check the tokenizer")
    shape, device = input_ids.shape, input_ids.device
    # One uniform draw decides selection, a second the 80/10/10 replacement (independent of the first).
    selected = torch.rand(shape, generator=generator, device=device) < probability
    selected &= ~special_tokens_mask.to(device=device, dtype=torch.bool)
    action = torch.rand(shape, generator=generator, device=device)
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=device, dtype=torch.long)

    labels = torch.where(selected, input_ids.long(), torch.full_like(input_ids, IGNORE_INDEX, dtype=torch.long))
    masked = input_ids.long().clone()
    masked[selected & (action < 0.8)] = mask_token_id
    replace = selected & (action >= 0.8) & (action < 0.9)
    masked[replace] = random_ids[replace]
    return masked, labels
