"""Adversarial moment-matching distillation, AMMD (Jia 2024, NeurIPS), as pure functions.

Generation is an MDP: the state s_t is the prompt plus the prefix, the action a the next token. A
Q-value head f(s_t, a) scores every vocabulary item at every position, and two moment distances are
matched (docs/methods.md, AMMD):

    off-policy (y ~ teacher):  D_off = E_{y~teacher} sum_t [ f(s_t, y_t) - E_{a~student} f(s_t, a) ]
    on-policy  (y ~ student):  D_on  = E_{y~student} sum_t [ E_{a~teacher} f(s_t, a) - f(s_t, y_t) ]

The Q head maximises beta D_on + (1 - beta) D_off, the student minimises it, alternating.

Conventions. q, log_q_s, log_q_t are (B, T, V); position t holds the values / log-probabilities for the
token y[:, t] (the caller shifts the logits by one, as for every causal-LM loss here); y is (B, T)
int64 and may hold anything (e.g. -100) where the bool mask (B, T) is False; student and teacher
must share V (slice padded vocabularies first). Every function returns a float32 SUM over masked
positions; the loop divides once by the count of valid tokens (house rule), and an all-masked batch
gives 0 with zero gradients.

What is reconstructed: no official code was released, and the paper's details (beyond the abstract
and the two moments above, which follow the moment-matching framework of Swamy et al. 2021, "Of
Moments and Matching", via the performance difference lemma) could not be checked. Our choices:
- f is bounded, |f| <= bound, by ``bound * tanh`` of a linear layer over (detached) hidden states: the
  sup over an unbounded class is infinite (scale f), so the moment distance needs a bounded class.
- The off-policy term reaches the student only through E_{a~student}: a plain gradient.
- The on-policy term reaches the student only through sampling: a REINFORCE surrogate (Williams
  1992) with the per-token cost c_t = E_{a~teacher} f(s_t, a) - f(s_t, y_t), detached. By default the
  cost-to-go C_t = sum_{t' >= t} c_t' weighs log pi(y_t | s_t), which makes the surrogate's expected
  gradient EXACTLY the gradient of D_on with f fixed (later states depend on y_t); ``reward_to_go=False``
  keeps only c_t (treats f as already a long-horizon action value). The optional baseline
  b_t = E_{a~student} c(s_t, a) = E_teacher f - E_student f depends on s_t only, so it keeps the
  estimate unbiased while removing the immediate term's variance.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from tadistill.objectives.divergence import check_mask

BASELINES = ("expected", "none")


class QValueHead(nn.Module):
    """f(s_t, a) for every token a: ``bound * tanh(W h_t + b)``, so every value lies in [-bound, bound].

    The input hidden states are detached: the Q head's (ascent) loss must never train the network that
    computes the state. Which hidden states describe s_t (teacher's or student's last layer) is the
    caller's choice; the teacher's are a fixed representation, the student's change as it trains.
    """

    def __init__(self, hidden_size: int, vocab_size: int, bound: float = 1.0) -> None:
        super().__init__()
        if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
            # The config checks objectives.moment-matching.bound (gt=0); 0 would make f identically 0.
            raise ValueError(f"QValueHead: bound must be a finite positive number, got {bound!r}")
        self.bound = float(bound)
        self.proj = nn.Linear(hidden_size, vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        """(B, T, H) hidden states -> (B, T, V) float32 Q values in [-bound, bound]."""
        z = self.proj(hidden.detach().to(self.proj.weight.dtype))
        return self.bound * torch.tanh(z.float())


class MomentTerm(NamedTuple):
    """One moment distance and what each player minimises, all float32 scalar SUMS over masked tokens.

    gap: the sampled moment distance (detached, for logging).
    q_loss: -gap; its gradient reaches q only (the Q head ascends the gap).
    student_loss: its value equals gap; its gradient reaches the student's log-probabilities only.
    """

    gap: Tensor
    q_loss: Tensor
    student_loss: Tensor


def _check(q: Tensor, log_probs: Tensor, y: Tensor | None, mask: Tensor, who: str) -> None:
    if q.dim() != 3 or q.shape != log_probs.shape:
        raise ValueError(
            f"{who}: q {tuple(q.shape)} and log-probabilities {tuple(log_probs.shape)} must be equal (B, T, V)"
        )
    check_mask(mask, q.shape[0], q.shape[1], who)
    if y is not None and (y.shape != mask.shape or y.is_floating_point()):
        raise ValueError(f"{who}: y must be integer token ids of shape (B, T) = {tuple(mask.shape)}")


def _at(x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """x[b, t, y[b, t]] as (B, T) float32, 0 where the mask is False (whatever y holds there)."""
    idx = y.masked_fill(~mask, 0).long().unsqueeze(-1)  # masked ids may be -100: gather index 0 instead
    return x.gather(-1, idx).squeeze(-1).float().masked_fill(~mask, 0.0)  # gather first: no (B, T, V) copy


def expected_q(q: Tensor, log_probs: Tensor) -> Tensor:
    """E_{a~p} f(s_t, a) = sum_a p(a) q(a) per position: (B, T, V), (B, T, V) -> (B, T) float32.

    -inf log-probabilities (tokens outside a top-p nucleus) contribute exactly 0.
    """
    return (log_probs.float().exp() * q.float()).sum(-1)


def expected_moment_gap(q: Tensor, log_q_s: Tensor, log_q_t: Tensor, mask: Tensor) -> Tensor:
    """sum over masked t of [E_teacher f(s_t, .) - E_student f(s_t, .)], a float32 scalar.

    The closed form of either moment at given states, with the sampled token replaced by its
    expectation: it is 0 whenever the student equals the teacher, for any f.
    """
    _check(q, log_q_s, None, mask, "expected_moment_gap")
    _check(q, log_q_t, None, mask, "expected_moment_gap")
    diff = expected_q(q, log_q_t) - expected_q(q, log_q_s)  # (B, T)
    return diff.masked_fill(~mask, 0.0).sum()


def off_policy_moment_gap(q: Tensor, log_q_s: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """sum over masked t of [f(s_t, y_t) - E_{a~student} f(s_t, a)], y sampled from the TEACHER.

    A float32 scalar, differentiable in q and in log_q_s (use ``off_policy_term`` to train).
    """
    _check(q, log_q_s, y, mask, "off_policy_moment_gap")
    per_token = _at(q, y, mask) - expected_q(q, log_q_s)  # (B, T)
    return per_token.masked_fill(~mask, 0.0).sum()


def on_policy_moment_gap(q: Tensor, log_q_t: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """sum over masked t of [E_{a~teacher} f(s_t, a) - f(s_t, y_t)], y sampled from the STUDENT.

    A float32 scalar, differentiable in q (use ``on_policy_term`` to train the student).
    """
    _check(q, log_q_t, y, mask, "on_policy_moment_gap")
    per_token = expected_q(q, log_q_t) - _at(q, y, mask)  # (B, T)
    return per_token.masked_fill(~mask, 0.0).sum()


def off_policy_term(q: Tensor, log_q_s: Tensor, y: Tensor, mask: Tensor) -> MomentTerm:
    """Both players' losses for a batch whose tokens y were sampled from the teacher.

    q_loss = -D_off with log_q_s detached. student_loss = D_off with q detached: the student's gradient
    is -sum_t sum_a grad p_s(a | s_t) f(s_t, a) (the states come from the teacher, so no sampling term).
    """
    q_loss = -off_policy_moment_gap(q, log_q_s.detach(), y, mask)
    student_loss = off_policy_moment_gap(q.detach(), log_q_s, y, mask)
    return MomentTerm(gap=student_loss.detach(), q_loss=q_loss, student_loss=student_loss)


def on_policy_term(
    q: Tensor,
    log_q_s: Tensor,
    log_q_t: Tensor,
    y: Tensor,
    mask: Tensor,
    *,
    reward_to_go: bool = True,
    baseline: str = "expected",
) -> MomentTerm:
    """Both players' losses for a batch whose tokens y were sampled from the student (no gradient).

    Args:
        q: (B, T, V) Q values; log_q_s: (B, T, V) student log-probabilities (with gradient);
        log_q_t: (B, T, V) teacher log-probabilities (a constant); y: (B, T) sampled ids; mask: (B, T).
        reward_to_go: weigh log p_s(y_t) by the cost-to-go sum_{t' >= t} c_t' (exact policy gradient of
            D_on) rather than by c_t alone.
        baseline: "expected" subtracts b_t = E_{a~student} c(s_t, a) (unbiased); "none" does not.

    y must come from the distribution log_q_s describes (same temperature and top-p), or the
    estimate is biased.

    Returns:
        q_loss = -D_on with the log-probabilities detached. student_loss has the value D_on (sampled)
        and the gradient sum_t grad log p_s(y_t | s_t) (C_t - b_t), the REINFORCE estimate of grad D_on.
    """
    if baseline not in BASELINES:
        raise ValueError(f"on_policy_term: unknown baseline {baseline!r}: use one of {', '.join(BASELINES)}")
    _check(q, log_q_s, y, mask, "on_policy_term")
    _check(q, log_q_t, y, mask, "on_policy_term")
    q_loss = -on_policy_moment_gap(q, log_q_t.detach(), y, mask)
    with torch.no_grad():
        e_t = expected_q(q, log_q_t)  # (B, T)
        cost = (e_t - _at(q, y, mask)).masked_fill(~mask, 0.0)  # c_t, (B, T)
        gap = cost.sum()
        weight = cost.flip(-1).cumsum(-1).flip(-1) if reward_to_go else cost  # C_t: sum over t' >= t
        if baseline == "expected":
            weight = weight - (e_t - expected_q(q, log_q_s))  # b_t = E_t f - E_s f, depends on s_t only
        weight = weight.masked_fill(~mask, 0.0)
    # log p_s(y_t) is -inf nowhere the student sampled, but may be at masked positions: zero them first.
    log_p_y = _at(log_q_s, y, mask)  # (B, T), with gradient
    surrogate = (log_p_y * weight).sum()
    student_loss = gap + (surrogate - surrogate.detach())  # value D_on, gradient REINFORCE
    return MomentTerm(gap=gap, q_loss=q_loss, student_loss=student_loss)


def combine_terms(on: MomentTerm | None, off: MomentTerm | None, *, beta: float) -> MomentTerm:
    """beta * on + (1 - beta) * off, field by field; beta = 1 or 0 uses one term only (the other may be None).

    The weighting is linear, so the inputs may be sums (divide the result by one token count) or
    terms already divided by their own token counts (when the teacher- and student-sampled batches
    differ in length, the exact beta-mixture of per-token means).
    """
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and 0.0 <= beta <= 1.0):
        raise ValueError(f"combine_terms: beta must be a number in [0, 1], got {beta!r}")
    if beta == 1.0:
        if on is None:
            raise ValueError("combine_terms: beta = 1 needs the on-policy term")
        return on
    if beta == 0.0:
        if off is None:
            raise ValueError("combine_terms: beta = 0 needs the off-policy term")
        return off
    if on is None or off is None:
        raise ValueError("combine_terms: 0 < beta < 1 needs both the on- and the off-policy term")
    return MomentTerm(*(beta * a + (1.0 - beta) * b for a, b in zip(on, off)))
