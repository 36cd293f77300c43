"""AutoDistil's relation loss: MiniLMv2's self-attention relations compared by squared error, not KL.

Xu et al. 2022 (AutoDistil, sec. 3.2; docs/methods.md, AutoDistil) distil every sub-network of a weight-shared
SuperLM from the teacher's last block with the Q-Q, K-K and V-V relations of MiniLMv2 (Wang et al. 2021,
eq. 1-3), split into the teacher's relation-head count, and replace the KL divergence by the mean squared
error. Here, per relation head a and valid query row t:

    R[b, a, t, :] = softmax(x_a[t] x_a^T / sqrt(d_r))    (blocked keys get probability 0)
    row loss      = sum_j (R_T[b, a, t, j] - R_S[b, a, t, j])^2

the squared L2 distance of the two rows (a value in [0, 2]); averaged over the A_r relation heads and summed
over valid rows, as every relation function of ``objectives/attention.py`` does, so that the loop divides by
the global count of valid tokens once. Summing over the keys rather than averaging keeps a row's value
independent of how much padding its batch has.

Memory: like ``relation_kl`` without chunks, two (B A_r, T, T) float32 relations (the student's kept for
backward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tadistill.objectives.attention import _key_bias, _relation_logits, suggest_relation_heads
from tadistill.objectives.divergence import check_mask


def relation_mse(
    student_x: Tensor, teacher_x: Tensor, mask: Tensor, *, relation_heads: int, causal: bool = False
) -> Tensor:
    """Squared error of MiniLMv2 relations for one of Q, K or V (module docstring).

    Args:
        student_x: (B, T, d_S) concatenated per-head queries, keys or values of the student.
        teacher_x: (B, T, d_T) the same projection of the teacher (a constant). Widths may differ.
        mask: bool (B, T), True = valid token.
        relation_heads: A_r; must divide d_S and d_T. Each model uses its own d_r = d / A_r.
        causal: also block keys after the query (decoders).

    Returns:
        float32 scalar: sum over valid query rows (b, t) of (1/A_r) sum_a ||R_T[b,a,t,:] - R_S[b,a,t,:]||^2.
        Identical inputs give 0; an all-padded batch gives 0.
    """
    if student_x.dim() != 3 or teacher_x.dim() != 3 or student_x.shape[:2] != teacher_x.shape[:2]:
        raise ValueError(f"relation_mse: expected (B, T, d) inputs with one (B, T), got {tuple(student_x.shape)} "
                         f"and {tuple(teacher_x.shape)}")
    d_s, d_t = student_x.shape[-1], teacher_x.shape[-1]
    if (isinstance(relation_heads, bool) or not isinstance(relation_heads, int) or relation_heads < 1
            or d_s % relation_heads or d_t % relation_heads):
        raise ValueError(f"relation_mse: relation_heads={relation_heads!r} must be a positive integer dividing the "
                         f"student width {d_s} and the teacher width {d_t}, such as "
                         f"{suggest_relation_heads(d_s, d_t)[0]}")
    check_mask(mask, student_x.shape[0], student_x.shape[1], "relation_mse")
    b, t, _ = student_x.shape
    with torch.autocast(student_x.device.type, enabled=False):  # float32 relations, also under bf16 autocast
        bias = _key_bias(mask, causal, relation_heads)  # (B A_r, 1 or T, T)
        with torch.no_grad():
            _, z_t = _relation_logits(teacher_x.detach(), mask, relation_heads, bias)
            r_t = torch.softmax(z_t, dim=-1)  # (B A_r, T, T)
            del z_t
        _, z_s = _relation_logits(student_x, mask, relation_heads, bias)
        r_s = torch.softmax(z_s, dim=-1)
        per_row = (r_s - r_t).pow(2).sum(-1).view(b, relation_heads, t)  # (B, A_r, T)
        return per_row.masked_fill(~mask[:, None, :], 0.0).sum() / relation_heads
