"""Intrinsic quality of a language model on held-out text: masked-LM and causal-LM perplexity.

Both perplexities follow the house rule for losses: the cross-entropy is SUMMED over every predicted
token of every batch and divided once by the total number of predicted tokens, so the result does not
depend on how texts fall into batches (a mean of per-batch means would weigh short batches up).
Texts are encoded one per sequence (no packing), truncated to ``max_length`` and right-padded per
batch (``inference.text_batches``); models run in eval mode under ``torch.inference_mode`` on their
own device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tadistill.data.masking import mask_tokens
from tadistill.errors import DataError, ModelError
from tadistill.measure.inference import evaluating, has_lm_head, lm_logits, model_device, text_batches


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
