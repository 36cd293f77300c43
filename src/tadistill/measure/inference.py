"""Running a model on held-out text: eval mode, its device, padded batches of texts, its LM head.

Shared by every measurement here and in ``evaluation/``: texts are encoded one per sequence (no
packing), truncated to ``max_length`` and right-padded per batch; models run in eval mode on their own
device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from tadistill.data.batches import collate
from tadistill.errors import ConfigError, DataError, ModelError


def has_lm_head(model: nn.Module) -> str | None:
    """Which language-model head ``model`` carries: "mlm", "causal-lm" or None.

    A head is an output embedding (``get_output_embeddings()`` returns a module: BERT's decoder,
    GPT-2's lm_head, ...); a model that can generate (transformers' ``can_generate()``) reads it as a
    next-token head, any other as a masked-LM head. Base models, classifiers, encoder-decoders and
    plain modules without the method give None.
    """
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if not isinstance(head, nn.Module):
        return None
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return None  # seq2seq LM heads predict the decoder side: neither perplexity here applies
    can_generate = getattr(model, "can_generate", None)
    return "causal-lm" if callable(can_generate) and can_generate() else "mlm"


def lm_logits(output: Any) -> Tensor:
    """(B, T, V) logits of a Hugging Face LM output (``logits``, or ``prediction_logits`` of *ForPreTraining)."""
    for name in ("logits", "prediction_logits"):
        logits = getattr(output, name, None)
        if isinstance(logits, Tensor):
            return logits
    raise ModelError(f"the model returned {type(output).__name__} without logits: pass a model with an LM head")


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (no dropout) for the block, then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def text_batches(
    tokenizer: Any, texts: list[str], *, max_length: int, batch_size: int
) -> Iterator[dict[str, Tensor]]:
    """Encode each text as its own sequence (special tokens added, truncated) and yield padded batches.

    Yields ``collate`` dicts on the CPU, in the order of ``texts``: input_ids (B, T) long,
    attention_mask (B, T) long, special_tokens_mask (B, T) bool (True at special tokens and padding).
    Padding uses the tokenizer's pad id, else its EOS id, else 0 (GPT-2 has no pad token; padded
    positions are masked out anyway).

    Raises:
        ConfigError: max_length or batch_size below 1. DataError: no texts, or a text that encodes
            to no token at all.
    """
    for name, value in (("max_length", max_length), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}: change it")
    if not texts:
        raise DataError("no texts to evaluate on: pass a non-empty list of held-out texts")
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    for i, seq in enumerate(ids):
        if not seq:
            raise DataError(f"text {i} ({texts[i][:30]!r}) encodes to no tokens: remove empty texts")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    special_ids = list(tokenizer.all_special_ids)
    for start in range(0, len(ids), batch_size):
        sequences = [torch.tensor(seq, dtype=torch.long) for seq in ids[start : start + batch_size]]
        yield collate(sequences, pad_id=pad_id, special_ids=special_ids)

