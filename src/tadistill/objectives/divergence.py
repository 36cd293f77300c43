"""Row-wise KL divergence, the building block of every distribution-matching objective.

Contract shared by all of ``tadistill.objectives``: a loss is a pure function that returns the SUM over
valid rows of a per-row term as a float32 scalar; the training loop divides once by the global count of
valid rows (docs/methods.md, Conventions shared by every loss). Teacher tensors are constants (detached
here), an all-masked input gives exactly 0 with zero gradients, and ``-inf`` logits never produce NaN.

Errors: a pure function raises ValueError on inputs it cannot compute with (wrong shapes, an unknown
kind, an option out of range). The user meets these options in the config, which checks them with a
one-line error before any tensor exists (``tadistill/config.py``); the guards here protect the math.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def check_mask(mask: Tensor, batch: int, length: int, who: str) -> None:
    """Check that ``mask`` is a bool (B, T) tensor; wrong shapes or dtypes are caller bugs."""
    if mask.dtype != torch.bool:
        # A 0/1 integer attention_mask would be silently wrong under ``~mask`` (bitwise not of ints).
        raise ValueError(f"{who}: mask must be bool (True = valid token), got {mask.dtype}; pass attention_mask.bool()")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{who}: mask has shape {tuple(mask.shape)}, expected (B, T) = {(batch, length)}")


def check_temperature(temperature: float) -> None:
    """A temperature must be a finite positive number (it divides the logits); ValueError otherwise."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")


def kl_per_row(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) of every row, without masking.

    Args:
        teacher_logits: (..., V), any float dtype; treated as a constant (no gradient).
        student_logits: (..., V), same shape.
        temperature: T > 0; both sides are divided by it before the softmax.

    Returns:
        (...) float32, one KL per row: sum_v p_T,v (log p_T,v - log p_S,v). Entries where the teacher
        probability is 0 (logit -inf, or underflow) contribute exactly 0, even when the student's logit
        there is also -inf. Every row must hold at least one finite logit on each side (callers mask
        rows that are entirely -inf before calling, as ``kl_rows`` does).
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} != student {tuple(student_logits.shape)}")
    with torch.no_grad():
        t = teacher_logits.detach().float()  # upcast before log_softmax (bf16 would lose the tail)
        if temperature != 1.0:
            t = t / temperature
        log_p_t = F.log_softmax(t, dim=-1)  # (..., V)
        del t
        p_t = log_p_t.exp()
        off_support = p_t == 0  # where 0 * (log 0 - log q) must read as 0, not NaN
    s = student_logits.float()
    if temperature != 1.0:
        s = s / temperature
    log_p_s = F.log_softmax(s, dim=-1)  # (..., V); the only (..., V) tensor autograd keeps besides p_t
    del s
    # Difference first, then weight: more accurate than sum p log p - sum p log q when KL << entropy.
    # Off the teacher's support both logs may be -inf (NaN after subtraction); the in-place fill removes
    # that NaN from the value and, through masked_fill's backward, from the gradient.
    diff = (log_p_t - log_p_s).masked_fill_(off_support, 0.0)
    return (p_t * diff).sum(dim=-1)


def kl_rows(
    teacher_logits: Tensor,
    student_logits: Tensor,
    valid: Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Sum over valid rows of KL(softmax(t/T) || softmax(s/T)) (Hinton et al. 2015, without T^2).

    Args:
        teacher_logits: (..., V); a constant: detached here, it never receives a gradient.
        student_logits: (..., V), same shape; gradients flow to it.
        valid: bool tensor broadcastable to the row shape (...), True = row counts; None = all rows.
            Invalid rows may hold anything (even all -inf): they never make the value or the
            gradient NaN.
        temperature: T > 0.

    Returns:
        float32 scalar: sum over valid rows of sum_v p_T,v (log p_T,v - log p_S,v), p = softmax(z / T).
        Entries that are -inf in the teacher (probability 0) contribute 0. No row is averaged: divide
        by the global count of valid rows in the training loop. All rows invalid -> exactly 0.
    """
    check_temperature(temperature)
    if valid is None:
        return kl_per_row(teacher_logits, student_logits, temperature).sum()
    if valid.dtype != torch.bool:
        raise ValueError(f"kl_rows: valid must be a bool tensor, got {valid.dtype}")
    invalid = ~valid
    # An invalid row may be entirely -inf, and log_softmax of it is NaN in value and gradient. Student:
    # zero such rows first (masked_fill's backward also stops any gradient there). Teacher: a constant,
    # so a NaN row there only needs to be dropped from the value, which the final masked_fill does.
    student_logits = student_logits.masked_fill(invalid[..., None], 0.0)
    per_row = kl_per_row(teacher_logits, student_logits, temperature)  # (...)
    return per_row.masked_fill(invalid, 0.0).sum()
