"""Hidden-state alignment losses: MSE (docs/methods.md, HS; TinyBERT), cosine (DistilBERT), L1 + cosine (DPHuBERT).

The student's hidden states are projected to the teacher's width by the caller (a learned W lives in
the training term, the only state); these functions only compare tensors of equal shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tadistill.objectives.divergence import check_mask


def _valid_rows(student: Tensor, teacher: Tensor, mask: Tensor, who: str) -> tuple[Tensor, Tensor]:
    """(B, T, d) each -> float32 (B, T, d) each with padded tokens set to 0; the teacher side detached.

    torch.where rather than boolean indexing: indexing needs the count of valid tokens on the host (a
    GPU synchronisation every call) and copies both tensors. Padded tokens (possibly garbage, even inf)
    are replaced before any arithmetic, and where's backward gives them exactly zero gradient.
    """
    if student.shape != teacher.shape or student.dim() != 3:
        raise ValueError(
            f"{who}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must both be (B, T, d); "
            "project the student to the teacher width first"
        )
    check_mask(mask, student.shape[0], student.shape[1], who)
    keep = mask[:, :, None]
    return torch.where(keep, student.float(), 0.0), torch.where(keep, teacher.detach().float(), 0.0)


def hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Squared error of hidden states, summed over valid tokens (HS, TinyBERT's L_hidn).

    Args:
        student: (B, T, d), already projected to the teacher width d = d_T.
        teacher: (B, T, d), a constant (detached).
        mask: bool (B, T), True = valid token.

    Returns:
        float32 scalar: sum over valid tokens of mean_d (h_S - h_T)^2. Dividing by the number of valid
        tokens gives nn.MSELoss over the valid entries. No valid token -> 0.
    """
    s, t = _valid_rows(student, teacher, mask, "hidden_mse")
    return (s - t).square().mean(dim=-1).sum()  # padded tokens contribute (0 - 0)^2


def hidden_cosine(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Cosine distance of hidden states, summed over valid tokens (DistilBERT's cosine embedding loss).

    Args:
        student: (B, T, d), already projected if the widths differ.
        teacher: (B, T, d), a constant (detached).
        mask: bool (B, T), True = valid token.

    Returns:
        float32 scalar: sum over valid tokens of 1 - cos(h_S, h_T), i.e. nn.CosineEmbeddingLoss with
        target +1 summed instead of averaged. Norms are clamped at 1e-8 (F.cosine_similarity), so zero
        vectors give a finite loss of 1. No valid token -> 0.
    """
    s, t = _valid_rows(student, teacher, mask, "hidden_cosine")
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).masked_fill(~mask, 0.0).sum()


def hidden_l1_cosine(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """L1 plus cosine distance of hidden states, summed over valid tokens (DPHuBERT, Peng et al. 2023, sec. 2.2).

    Args:
        student: (B, T, d), already projected (DPHuBERT projects even at equal widths).
        teacher: (B, T, d), a constant (detached).
        mask: bool (B, T), True = valid token.

    Returns:
        float32 scalar: sum over valid tokens of mean_d |h_S - h_T| + 1 - cos(h_S, h_T). Divided by the number
        of valid tokens this is DPHuBERT's nn.L1Loss plus its "raw" cosine loss -cos, shifted by 1 so that
        identical states give 0. No valid token -> 0.
    """
    s, t = _valid_rows(student, teacher, mask, "hidden_l1_cosine")
    l1 = (s - t).abs().mean(dim=-1)  # (B, T); padded tokens give |0 - 0|
    cosine = (1.0 - F.cosine_similarity(s, t, dim=-1)).masked_fill(~mask, 0.0)  # (B, T)
    return (l1 + cosine).sum()
