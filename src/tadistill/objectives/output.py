"""Losses on the output (masked-LM) distribution: OD soft targets and the hard MLM loss.

docs/methods.md, OD and docs/methods.md, DistilBERT (5.0 tau^2 KL + 2.0 MLM + 1.0 cosine, tau = 2).
Both functions return sums over the selected positions; the loop divides by their global count.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tadistill.objectives.divergence import check_mask, check_temperature, kl_per_row

IGNORE_INDEX = -100  # Hugging Face convention for positions without a masked-LM label


def soft_target_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    scale_by_t2: bool = True,
) -> Tensor:
    """Soft-target distillation of the output distribution (Hinton et al. 2015; DistilBERT).

    Args:
        student_logits: (B, T, V), gradients flow to it.
        teacher_logits: (B, T, V), a constant (detached).
        mask: bool (B, T) selecting the positions to distill: masked-LM positions (DistilBERT) or all
            valid tokens.
        temperature: tau > 0, applied to both distributions.
        scale_by_t2: multiply by tau^2 so that gradient magnitudes do not shrink as 1/tau^2
            (Hinton et al. 2015, section 2).

    Returns:
        float32 scalar: sum over selected positions of [tau^2] KL(softmax(z_T/tau) || softmax(z_S/tau)).
        No position selected -> exactly 0.
    """
    check_temperature(temperature)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        # Set-up refuses such models with a one-line error (OutputKLTerm); here it would pair unrelated tokens.
        raise ValueError(
            f"soft_target_kl: the student has {student_logits.shape[-1]} logits per position and the teacher "
            f"{teacher_logits.shape[-1]}; the vocabularies must be one"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}")
    check_mask(mask, student_logits.shape[0], student_logits.shape[1], "soft_target_kl")
    # Gather the selected rows first: (N, V) instead of (B, T, V), which matters with 30k-250k vocabularies
    # when only the 15% masked positions are distilled; N = 0 gives an empty, exactly-zero sum.
    loss = kl_per_row(teacher_logits.detach()[mask], student_logits[mask], temperature).sum()
    return loss * (temperature**2) if scale_by_t2 else loss


def mlm_cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Hard masked-LM loss (DistilBERT's L_mlm, WID's training loss).

    Args:
        student_logits: (B, T, V).
        labels: (B, T) int64 token ids, -100 where there is no target.

    Returns:
        float32 scalar: sum over labelled positions of -log softmax(z_S)[label]
        (= F.cross_entropy(..., ignore_index=-100, reduction="sum")). No labelled position -> 0.
    """
    if student_logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(student_logits.shape)} do not match labels {tuple(labels.shape)}")
    selected = labels != IGNORE_INDEX  # (B, T)
    # Upcast only the labelled rows (N, V): float32 log_softmax without a (B, T, V) float32 copy.
    logits = student_logits[selected].float()
    if logits.shape[0] == 0:
        # Keep the graph (zero gradient) rather than returning a constant without grad_fn.
        return logits.sum()
    return F.cross_entropy(logits, labels[selected], reduction="sum")
