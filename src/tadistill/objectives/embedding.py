"""Sentence-embedding distillation: match the student's pooled embedding to the teacher's.

The usual way sentence encoders are distilled (Reimers & Gurevych 2020, "Making Monolingual Sentence
Embeddings Multilingual using Knowledge Distillation", eq. 1: the MSE between the teacher's sentence
embedding and the student's), here with the teacher and the student reading the same text. A
sentence embedding is the mean of the last hidden states over the valid tokens, the pooling of the
built-in teacher (sentence-transformers' all-MiniLM-L6-v2) and of ``tadistill evaluate``.

The student's embedding is projected to the teacher's width by the caller (a learned W in the
training term, identity at equal widths). Since mean pooling averages with weights that sum to one,
``W mean(h) + b = mean(W h + b)``: projecting the pooled (B, d_S) embedding equals pooling the
projected tokens, for a T-times smaller matmul.

One value per sequence, summed over the sequences of the batch: the loop divides once by the global
number of sequences (normalizer "sequences").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tadistill.objectives.divergence import check_mask


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of the valid tokens' hidden states, in float32.

    Args:
        hidden: (B, T, d); padded positions may hold anything, even inf or NaN.
        mask: bool (B, T), True = valid token.

    Returns:
        (B, d) float32; a row with no valid token gives a zero vector. Padded positions get exactly
        zero gradient (torch.where, not a multiplication by the mask: 0 * inf is NaN).
    """
    if hidden.dim() != 3:
        raise ValueError(f"mean_pool: hidden {tuple(hidden.shape)} must be (B, T, d)")
    check_mask(mask, hidden.shape[0], hidden.shape[1], "mean_pool")
    summed = torch.where(mask[:, :, None], hidden.float(), 0.0).sum(dim=1)  # (B, d)
    return summed / mask.sum(dim=1, keepdim=True).clamp_min(1)


def _check_pair(student: Tensor, teacher: Tensor, rows: Tensor, who: str) -> None:
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"{who}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must both be "
                         "(B, d); project the student to the teacher width first")
    if rows.dtype != torch.bool or rows.shape != student.shape[:1]:
        raise ValueError(f"{who}: rows must be a bool tensor of shape ({student.shape[0]},), got "
                         f"{rows.dtype} {tuple(rows.shape)}")


def embedding_mse(student: Tensor, teacher: Tensor, rows: Tensor) -> Tensor:
    """Squared error of sentence embeddings, summed over sequences (Reimers & Gurevych 2020, eq. 1).

    Args:
        student: (B, d) pooled student embeddings, already projected to the teacher width d.
        teacher: (B, d) pooled teacher embeddings, a constant (detached here).
        rows: bool (B,), True for sequences with at least one valid token.

    Returns:
        float32 scalar: sum over valid rows of mean_d (e_S - e_T)^2; divided by the number of rows it
        is nn.MSELoss over the embeddings. No valid row -> 0.
    """
    _check_pair(student, teacher, rows, "embedding_mse")
    s = torch.where(rows[:, None], student.float(), 0.0)
    t = torch.where(rows[:, None], teacher.detach().float(), 0.0)
    return (s - t).square().mean(dim=-1).sum()


def embedding_cosine(student: Tensor, teacher: Tensor, rows: Tensor) -> Tensor:
    """Cosine distance of sentence embeddings, summed over sequences.

    Args:
        student: (B, d) pooled student embeddings, already projected to the teacher width d.
        teacher: (B, d) pooled teacher embeddings, a constant (detached here).
        rows: bool (B,), True for sequences with at least one valid token.

    Returns:
        float32 scalar: sum over valid rows of 1 - cos(e_S, e_T). Scale-free, unlike the MSE: it
        matches only directions, which is all a cosine search uses. Norms clamped at 1e-8
        (F.cosine_similarity). No valid row -> 0.
    """
    _check_pair(student, teacher, rows, "embedding_cosine")
    cos = F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)  # (B,)
    return torch.where(rows, 1.0 - cos, 0.0).sum()
