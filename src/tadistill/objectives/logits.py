"""Token-level divergences between the teacher's and the student's next-token distributions (causal LMs).

docs/methods.md, GKD (Agarwal et al. 2024: generalized JSD(beta), eq. 1) and docs/methods.md, DistiLLM
(Ko et al. 2024: skew KL and skew reverse KL; total variation distance). With P the teacher's
and Q the student's distribution at one position, both softmax(z / temperature):

- "forward-kl":      KL(P || Q)                                   (mean seeking)
- "reverse-kl":      KL(Q || P)                                   (mode seeking; MiniLLM's target)
- "jsd":             beta KL(P || M) + (1 - beta) KL(Q || M),  M = beta P + (1 - beta) Q
- "skew-kl":         KL(P || alpha P + (1 - alpha) Q)
- "skew-reverse-kl": KL(Q || (1 - alpha) P + alpha Q)
- "tvd":             0.5 sum_v |P_v - Q_v|

Contract of ``tadistill.objectives``: ``logit_divergence`` returns the SUM over valid positions as a
float32 scalar (the loop divides once by the global count of valid tokens); logits are upcast to float32
before log_softmax; the teacher is a constant; an all-masked batch gives exactly 0 with zero gradients;
-inf logits (masked vocabulary entries) never make a NaN. No temperature^2 factor is applied here:
multiply by it in the training term if wanted (Hinton et al. 2015, section 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from tadistill.errors import did_you_mean
from tadistill.objectives.divergence import check_mask, check_temperature

KINDS = ("forward-kl", "reverse-kl", "jsd", "skew-kl", "skew-reverse-kl", "tvd")


def check_divergence_options(kind: str, temperature: float, beta: float, alpha: float,
                             teacher_topk: int | None = None) -> None:
    """Raise ValueError on an unknown kind or an out-of-range option (checked even when every token is masked).

    The config checks the same options for the user (``config.LogitDivergence``: one-line errors); this
    guard protects the formulas (a beta outside [0, 1] is no mixture, k = 0 keeps no token).
    """
    if kind not in KINDS:
        raise ValueError(
            f"unknown logit divergence {kind!r}{did_you_mean(str(kind), KINDS)}: choose one of {', '.join(KINDS)}"
        )
    check_temperature(temperature)
    for name, value in (("beta", beta), ("alpha", alpha)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if teacher_topk is not None and not (
        isinstance(teacher_topk, int) and not isinstance(teacher_topk, bool) and teacher_topk >= 1
    ):
        raise ValueError(f"teacher_topk must be a positive integer or None, got {teacher_topk!r}")


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """(..., V) log-probabilities -> (...) KL(A || B) = sum_v a_v (log a_v - log b_v).

    Entries with a_v = 0 (logit -inf, or underflow) contribute exactly 0 even when log b_v is also -inf:
    the in-place fill removes the NaN of -inf - (-inf) from the value and, through masked_fill's
    backward, from the gradient. The difference is taken before weighting (as in divergence.kl_per_row):
    more accurate than sum a log a - sum a log b when the KL is small next to the entropy.
    """
    a = log_a.exp()  # (..., V)
    diff = (log_a - log_b).masked_fill_(a.detach() == 0, 0.0)
    return (a * diff).sum(dim=-1)


def _log_mix(log_a: Tensor, w_a: float, log_b: Tensor, w_b: float, both_zero: Tensor) -> Tensor:
    """log(w_a A + w_b B) over (..., V), with w_a + w_b = 1, as a logsumexp of log-probabilities (GKD eq. 1).

    The endpoints return one side exactly (GKD's beta = 0 / 1 limits, DistiLLM's alpha = 0). Where log A
    and log B are both -inf (``both_zero``) the mixture is 0 and logsumexp's backward would be
    exp(-inf - (-inf)) = NaN; those entries are never used (every KL here masks them, since its first
    argument is 0 there too), so their inputs are replaced by 0 first, and masked_fill's backward sends no
    gradient through them.
    """
    if w_a == 0.0:
        return log_b
    if w_b == 0.0:
        return log_a
    terms = torch.stack([log_a + math.log(w_a), log_b + math.log(w_b)])  # (2, ..., V)
    return torch.logsumexp(terms.masked_fill(both_zero, 0.0), dim=0)  # (..., V)


def _reverse_kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """(..., V) log-probabilities, student Q and teacher P (a constant) -> (...) KL(Q || P), +inf-safe in backward.

    Where Q puts mass on a token that P excludes (log p = -inf, a masked vocabulary entry), the true value
    is +inf and is returned as such. Its true gradient is not finite either: log_softmax's backward would
    form inf - inf = NaN across the whole row, and the NaN would reach the shared weights and every other
    row of the step. So the gradient of such a row is the gradient of the same KL with the excluded
    entries' log p raised to log(tiny), the log of the smallest normal probability of the dtype (-87.3 in
    float32): finite, and it pushes the student's mass off the excluded tokens. Rows without such an
    entry are computed exactly as before, bit for bit. ``log_p`` is overwritten (callers pass a fresh
    tensor): one (..., V) copy less at a 150k vocabulary.
    """
    with torch.no_grad():
        excluded = torch.isneginf(log_p)  # (..., V)
        infinite = (excluded & (log_q.detach().exp() > 0)).any(dim=-1)  # (...): rows whose KL is +inf (as _kl sees q)
        log_p.masked_fill_(excluded, math.log(torch.finfo(log_p.dtype).tiny))
        # Adding a constant leaves the gradient alone: +inf where the true value is +inf, 0 elsewhere.
        offset = torch.zeros_like(infinite, dtype=log_p.dtype).masked_fill_(infinite, float("inf"))
    return _kl(log_q, log_p) + offset


def _divergence_from_log_probs(log_q: Tensor, log_p: Tensor, kind: str, beta: float, alpha: float) -> Tensor:
    """(..., K) normalised float32 log-probabilities, student Q and teacher P (a constant) -> (...) divergence.

    ``log_p`` is a fresh tensor that may be overwritten (the reverse-KL endpoints do so).
    """
    # The generalized divergences are evaluated at their endpoints exactly, not through the mixture:
    # JSD(0) = KL(P||Q) and JSD(1) = KL(Q||P) (GKD, Agarwal et al. 2024, eq. 1 at its endpoints); SKL_0 = KL(P||Q),
    # SRKL_0 = KL(Q||P) (DistiLLM, Ko et al. 2024; docs/methods.md, DistiLLM).
    if kind == "forward-kl" or (kind == "jsd" and beta == 0.0) or (kind == "skew-kl" and alpha == 0.0):
        return _kl(log_p, log_q)
    if kind == "reverse-kl" or (kind == "jsd" and beta == 1.0) or (kind == "skew-reverse-kl" and alpha == 0.0):
        return _reverse_kl(log_q, log_p)
    if kind == "tvd":
        # abs has gradient 0 at 0 (sign), so identical distributions give a zero gradient, not a NaN.
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    both_zero = torch.isneginf(log_p) & torch.isneginf(log_q.detach())  # (..., V): the mixture is 0 there
    if kind == "jsd":
        # GKD eq. 1: JSD(beta) = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q.
        log_m = _log_mix(log_p, beta, log_q, 1.0 - beta, both_zero)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if kind == "skew-kl":
        # DistiLLM's skew KL: SKL_alpha(P, Q) = KL(P || alpha P + (1 - alpha) Q); finite even where Q = 0 < P.
        return _kl(log_p, _log_mix(log_p, alpha, log_q, 1.0 - alpha, both_zero))
    if kind == "skew-reverse-kl":
        # DistiLLM's skew reverse KL: SRKL_alpha(P, Q) = KL(Q || (1 - alpha) P + alpha Q); finite even where P = 0 < Q.
        return _kl(log_q, _log_mix(log_p, 1.0 - alpha, log_q, alpha, both_zero))
    raise ValueError(f"unhandled divergence kind {kind!r}")  # KINDS and this function disagree: a bug


def _log_softmax32(logits: Tensor, temperature: float) -> Tensor:
    """(..., V) -> log_softmax(logits / T) in float32 (float64 stays float64); upcast first (bf16 loses the tail)."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    if temperature != 1.0:
        x = x / temperature
    return F.log_softmax(x, dim=-1)


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Per-token divergence between P = softmax(teacher / T) and Q = softmax(student / T), no masking.

    Args:
        student_logits: (..., V), any float dtype; gradients flow to it.
        teacher_logits: (..., V), same shape; a constant (detached, computed under no_grad).
        kind: one of KINDS (see the module docstring for the formulas).
        temperature: T > 0, divides both sides' logits.
        beta: JSD interpolation weight in [0, 1]; 0 gives forward KL and 1 reverse KL exactly.
        alpha: skew weight in [0, 1] of "skew-kl" and "skew-reverse-kl"; 0 gives the plain KL exactly.

    Returns:
        (...) float32 (float64 for float64 inputs, e.g. gradcheck), one divergence per position (nats).
        Every row needs at least one finite logit on each side; rows that are entirely -inf (padding)
        must be dropped by the caller, as ``logit_divergence`` does. "reverse-kl" (and its endpoints
        jsd(beta = 1), skew-reverse-kl(alpha = 0)) is +inf where the student puts mass on a token the
        teacher gives -inf (that is its true value), with a finite gradient (see ``_reverse_kl``);
        "jsd", "skew-*" and "tvd" stay finite there.
    """
    check_divergence_options(kind, temperature, beta, alpha)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} != teacher {tuple(teacher_logits.shape)}")
    with torch.no_grad():
        log_p = _log_softmax32(teacher_logits.detach(), temperature)  # (..., V)
    log_q = _log_softmax32(student_logits, temperature)  # (..., V)
    return _divergence_from_log_probs(log_q, log_p, kind, beta, alpha)


def _log_mass_outside(log_probs: Tensor, inside: Tensor) -> Tensor:
    """(N, V) log-probabilities, bool (N, V) -> (N, 1) log of the mass outside ``inside``.

    A logsumexp over the outside entries rather than log(1 - sum(inside)): no cancellation when the
    inside holds almost all the mass. A row with nothing outside (k = V, or only -inf left) gets -inf,
    computed on a finite dummy row so that logsumexp's backward sees no -inf - (-inf).
    """
    outside = log_probs.masked_fill(inside, float("-inf"))
    with torch.no_grad():
        empty = torch.isneginf(outside).all(dim=-1, keepdim=True)  # (N, 1)
    rest = torch.logsumexp(outside.masked_fill(empty, 0.0), dim=-1, keepdim=True)
    return rest.masked_fill(empty, float("-inf"))


def logit_divergence_rows(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    teacher_topk: int | None = None,
) -> Tensor:
    """Divergence of every row, with vocabulary alignment and the teacher top-k option (see logit_divergence).

    Args:
        student_logits: (N, V_S) rows, already restricted to valid positions; gradients flow to it.
        teacher_logits: (N, V_T) rows, a constant. V_S and V_T may differ (padded embedding tables).
        kind, temperature, beta, alpha, teacher_topk: as in ``logit_divergence``.

    Returns:
        (N,) float32 (float64 for float64 inputs) per-row divergence. N = 0 gives an empty tensor, whose
        sum is an exact 0.
    """
    check_divergence_options(kind, temperature, beta, alpha, teacher_topk)
    if student_logits.dim() != 2 or teacher_logits.dim() != 2 or student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            f"expected (N, V) rows with one N, got student {tuple(student_logits.shape)} and teacher "
            f"{tuple(teacher_logits.shape)}"
        )
    # Vocabulary mismatch: one tokenizer, embedding tables padded to a multiple (e.g. of 64 or 128). The rows
    # past the tokenizer's size are not real tokens, so only the first min(V_S, V_T) entries are compared and
    # both sides are renormalised over them. Nothing here can tell two different tokenizers apart: the caller
    # must check that student and teacher share one.
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    student_logits, teacher_logits = student_logits[:, :v], teacher_logits.detach()[:, :v]
    if teacher_topk is None or teacher_topk >= v:
        return token_divergence(student_logits, teacher_logits, kind=kind, temperature=temperature, beta=beta,
                                alpha=alpha)
    # Top-k teacher: the teacher keeps its k largest probabilities plus one "rest" bucket holding the mass
    # 1 - sum(top-k); the student is collapsed onto the same k + 1 buckets (its probabilities of those k tokens,
    # and the sum of all others). Both are proper distributions over k + 1 outcomes, so every kind stays a
    # divergence (>= 0, 0 when equal), which truncating and renormalising the teacher alone would not give
    # for reverse KL (the student's mass off the top-k would be ignored). With k = V it is the exact value.
    with torch.no_grad():
        log_p_all = _log_softmax32(teacher_logits, temperature)  # (N, V)
        top = log_p_all.topk(teacher_topk, dim=-1).indices  # (N, k); softmax keeps the logits' order
        in_top = torch.zeros_like(log_p_all, dtype=torch.bool).scatter_(-1, top, True)  # (N, V)
        log_p = torch.cat([log_p_all.gather(-1, top), _log_mass_outside(log_p_all, in_top)], dim=-1)  # (N, k+1)
        del log_p_all
    log_q_all = _log_softmax32(student_logits, temperature)  # (N, V)
    log_q = torch.cat([log_q_all.gather(-1, top), _log_mass_outside(log_q_all, in_top)], dim=-1)  # (N, k+1)
    return _divergence_from_log_probs(log_q, log_p, kind, beta, alpha)


def logit_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    teacher_topk: int | None = None,
) -> Tensor:
    """Sum over valid positions of a next-token divergence between teacher and student (GKD, DistiLLM).

    Args:
        student_logits: (B, T, V_S), any float dtype; gradients flow to it.
        teacher_logits: (B, T, V_T), a constant (detached).
        mask: bool (B, T), True = position to distill (for GKD: generated tokens, not the prompt or past EOS).
        kind: one of KINDS.
        temperature: T > 0 on both sides; no T^2 factor is applied.
        beta: JSD weight in [0, 1] (GKD's best: 0.1 translation, 0.9 summarization; docs/methods.md, GKD).
        alpha: skew weight in [0, 1] (DistiLLM uses 0.1).
        teacher_topk: None = full vocabulary. k = keep the teacher's k largest probabilities plus one
            "rest" bucket of mass 1 - sum(top-k); the student's distribution is collapsed onto the same
            k + 1 buckets (its probabilities of those k tokens and the sum of all the others). Exact when
            k >= V. This is what a teacher stored as top-k log-probabilities can support.

    Vocabulary mismatch: when V_S != V_T (same tokenizer, embedding tables padded to a multiple), only the
    first min(V_S, V_T) entries are compared, both sides renormalised over them: the padded rows are not
    real tokens. The caller must make sure the tokenizers are the same.

    Returns:
        float32 scalar (float64 for float64 inputs): sum over valid (b, t) of
        token_divergence(student[b, t], teacher[b, t]). Padded positions (even entirely -inf ones) never
        enter the arithmetic; no valid position gives exactly 0 with zero gradients.
    """
    check_divergence_options(kind, temperature, beta, alpha, teacher_topk)
    if student_logits.dim() != 3 or teacher_logits.dim() != 3 or student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(
            f"logit_divergence: expected (B, T, V) logits with one (B, T), got student "
            f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
        )
    check_mask(mask, student_logits.shape[0], student_logits.shape[1], "logit_divergence")
    # Gather the valid rows first: (N, V) instead of (B, T, V), and padding rows (possibly all -inf) are gone.
    # Every position valid: (B T, V) views instead, no copy of either logit tensor (nor, in backward, a
    # scatter into a zero (B, T, V) gradient). The same rows in the same (b, t) order either way; the
    # valid positions are found once (one host sync) for both tensors.
    b, t = mask.shape
    valid = mask.nonzero(as_tuple=True)  # (N,) batch and position indices, row-major
    if valid[0].numel() == b * t:
        student_rows = student_logits.reshape(b * t, student_logits.shape[-1])
        teacher_rows = teacher_logits.detach().reshape(b * t, teacher_logits.shape[-1])
    else:
        student_rows, teacher_rows = student_logits[valid], teacher_logits.detach()[valid]
    rows = logit_divergence_rows(
        student_rows, teacher_rows, kind=kind, temperature=temperature, beta=beta, alpha=alpha,
        teacher_topk=teacher_topk,
    )  # (N,)
    return rows.sum()
