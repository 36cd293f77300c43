"""Intrinsic quality of a language model on held-out text: masked-LM and causal-LM perplexity.

Both perplexities follow the house rule for losses: the cross-entropy is SUMMED over every predicted
token of every batch and divided once by the total number of predicted tokens, so the result does not
depend on how texts fall into batches (a mean of per-batch means would weigh short batches up).
Texts are encoded one per sequence (no packing), truncated to ``max_length`` and right-padded per
batch; models run in eval mode under ``torch.inference_mode`` on their own device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tadistill.data.batches import collate
from tadistill.data.masking import mask_tokens
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


def _check_head(model: nn.Module, wanted: str, function: str) -> None:
    kind = has_lm_head(model)
    if kind != wanted:
        what = {
            "mlm": "a masked-LM head (e.g. BertForMaskedLM)",
            "causal-lm": "a causal-LM head (e.g. GPT2LMHeadModel)",
        }
        raise ModelError(
            f"{function} needs a model with {what[wanted]}, got {type(model).__name__} "
            f"({kind or 'no LM head'}): load it with that head"
        )


def _result(total: float, count: int, loss_key: str, ppl_key: str, hint: str) -> dict[str, float]:
    if count == 0:
        raise DataError(f"no token was predicted, so there is no loss to report: {hint}")
    loss = total / count
    return {loss_key: loss, ppl_key: math.exp(loss)}


@torch.inference_mode()
def masked_lm_perplexity(
    model: nn.Module,
    tokenizer: Any,
    texts: list[str],
    *,
    max_length: int = 128,
    batch_size: int = 16,
    probability: float = 0.15,
    seed: int = 0,
) -> dict[str, float]:
    """Masked-LM loss and its exponential on held-out texts, BERT-corrupted with a seeded generator.

    Each batch is corrupted with ``data.masking.mask_tokens`` (Devlin et al. 2019, section 3.1: each
    non-special token selected with ``probability``, then 80% [MASK] / 10% random / 10% kept), drawn
    on the CPU from ``torch.Generator().manual_seed(seed)``, so the same texts, batch size and seed
    give the same corruption on any device. Random replacement ids are drawn below
    min(len(tokenizer), V).

    Returns:
        {"mlm_loss": sum over selected positions of -log p(original token) / number of selected
        positions (float64), "mlm_perplexity": exp(mlm_loss)}. A model with uniform logits gives a
        perplexity of exactly V.

    Raises:
        ModelError: no masked-LM head, or a tokenizer without a mask token. DataError: no texts, or
            no position selected (too little text for the probability).
    """
    _check_head(model, "mlm", "masked_lm_perplexity")
    if tokenizer.mask_token_id is None:
        raise ModelError("the tokenizer has no mask token: masked_lm_perplexity needs the masked-LM tokenizer")
    device = model_device(model)
    vocab = model.get_output_embeddings().weight.shape[0]  # V, rows of the decoder (out, in)
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    with evaluating(model):
        for batch in text_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size):
            masked, labels = mask_tokens(
                batch["input_ids"], batch["special_tokens_mask"], mask_token_id=tokenizer.mask_token_id,
                vocab_size=min(len(tokenizer), vocab), probability=probability, generator=generator,
            )
            logits = lm_logits(model(input_ids=masked.to(device), attention_mask=batch["attention_mask"].to(device)))
            selected = (labels != -100).to(device)  # (B, T) positions with a target
            # Upcast only the selected rows, (N, V) float32, not the whole (B, T, V).
            total += float(F.cross_entropy(logits[selected].float(), labels.to(device)[selected], reduction="sum"))
            count += int(selected.sum())
    return _result(total, count, "mlm_loss", "mlm_perplexity", "pass more or longer texts, or raise probability")


@torch.inference_mode()
def causal_perplexity(
    model: nn.Module, tokenizer: Any, texts: list[str], *, max_length: int = 256, batch_size: int = 8
) -> dict[str, float]:
    """Next-token loss and perplexity of a causal LM on held-out texts.

    Position t's logits predict token t + 1 of the same text; every real token except each text's
    first is a target (a text of one token contributes nothing), padding never is.

    Returns:
        {"lm_loss": sum over targets of -log p(token) / number of targets (float64),
        "perplexity": exp(lm_loss)}. A model with uniform logits gives a perplexity of exactly V.

    Raises:
        ModelError: no causal-LM head. DataError: no texts, or no text with two tokens.
    """
    _check_head(model, "causal-lm", "causal_perplexity")
    device = model_device(model)
    total, count = 0.0, 0
    with evaluating(model):
        for batch in text_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size):
            ids = batch["input_ids"].to(device)  # (B, T)
            real = batch["attention_mask"].to(device).bool()  # (B, T)
            logits = lm_logits(model(input_ids=ids, attention_mask=real.long()))  # (B, T, V)
            # Shift: logits at t score token t + 1; both must be real (right padding: the target is enough).
            target = real[:, 1:] & real[:, :-1]  # (B, T - 1)
            rows = logits[:, :-1][target].float()  # (N, V)
            total += float(F.cross_entropy(rows, ids[:, 1:][target], reduction="sum"))
            count += int(target.sum())
    return _result(total, count, "lm_loss", "perplexity", "pass texts of at least two tokens each")
