"""What the student kept: teacher-student similarity of sentence embeddings on held-out text."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tadistill.capture.architectures import resolve_architecture
from tadistill.capture.hooks import CaptureRequest, capture


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T, d), (B, T) -> (B, d): average of the valid tokens (sentence-transformers' mean pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


@torch.inference_mode()
def sentence_embeddings(
    model: nn.Module, tokenizer, texts: list[str], *, max_length: int = 128, batch_size: int = 32
) -> Tensor:
    """(N, d) float32 mean-pooled last hidden states (works for base and head models alike)."""
    arch = resolve_architecture(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with capture(model, arch, CaptureRequest(hidden=(arch.num_layers,))) as cap:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            model(**enc)
            out.append(mean_pool(cap.hidden[arch.num_layers].float(), enc["attention_mask"]).cpu())
    model.train(was_training)
    return torch.cat(out)


def embedding_cosine(teacher: nn.Module, student: nn.Module, tokenizer, texts: list[str], **kwargs) -> float | None:
    """Mean cosine similarity of teacher and student sentence embeddings of the same texts.

    Defined only when both have the same width (otherwise there is no common space; None).
    """
    a = sentence_embeddings(teacher, tokenizer, texts, **kwargs)
    b = sentence_embeddings(student, tokenizer, texts, **kwargs)
    if a.shape[-1] != b.shape[-1]:
        return None
    return float(F.cosine_similarity(a, b, dim=-1).mean())
