"""AMMD moment distances and the two players' losses (objectives/moment_matching.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from tadistill.objectives.moment_matching import (
    QValueHead,
    combine_terms,
    expected_moment_gap,
    expected_q,
    off_policy_moment_gap,
    off_policy_term,
    on_policy_moment_gap,
    on_policy_term,
)

B, T, V = 2, 5, 7


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, T, V, generator=g) * 2 - 1
    log_q_s = torch.randn(B, T, V, generator=g).log_softmax(-1)
    log_q_t = (2 * torch.randn(B, T, V, generator=g)).log_softmax(-1)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    return q, log_q_s, log_q_t, y, mask


def test_q_head_is_bounded_float32_and_does_not_train_the_state():
    head = QValueHead(hidden_size=4, vocab_size=V, bound=0.5)
    hidden = (100 * torch.randn(B, T, 4)).requires_grad_()
    out = head(hidden)
    assert out.shape == (B, T, V) and out.dtype == torch.float32
    assert out.abs().max() <= 0.5 and out.abs().max() > 0.45  # saturates at the bound, never beyond
    out.sum().backward()
    assert hidden.grad is None and head.proj.weight.grad is not None
    with pytest.raises(ValueError):
        QValueHead(4, V, bound=0.0)


def test_identical_student_and_teacher_give_zero_expected_gap():
    q, log_q_s, log_q_t, _, mask = _inputs()
    assert expected_moment_gap(q, log_q_s, log_q_s.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    assert abs(expected_moment_gap(q, log_q_s, log_q_t, mask).item()) > 1e-2  # and not by accident
    # By hand: sum over positions of E_t f - E_s f.
    manual = ((log_q_t.exp() - log_q_s.exp()) * q).sum()
    assert expected_moment_gap(q, log_q_s, log_q_t, mask).item() == pytest.approx(manual.item(), rel=1e-5)


def _averaged_over_tokens(fn, q, log_probs, weights, mask):
    """sum_a weights[b, t, a] * fn(y = a at every position), one position at a time, exactly."""
    total = torch.zeros(())
    for b, t, a in itertools.product(range(B), range(T), range(V)):
        y = torch.zeros(B, T, dtype=torch.long)
        only = torch.zeros(B, T, dtype=torch.bool)
        y[b, t], only[b, t] = a, mask[b, t]
        total = total + weights[b, t, a] * fn(q, log_probs, y, only)
    return total


def test_sampled_gaps_average_to_the_closed_form_with_the_right_signs():
    q, log_q_s, log_q_t, _, mask = _inputs(1)
    closed = expected_moment_gap(q, log_q_s, log_q_t, mask)
    # Off-policy: y ~ teacher, E[f(y) - E_s f] = E_t f - E_s f.
    off = _averaged_over_tokens(off_policy_moment_gap, q, log_q_s, log_q_t.exp(), mask)
    # On-policy: y ~ student, E[E_t f - f(y)] = E_t f - E_s f.
    on = _averaged_over_tokens(on_policy_moment_gap, q, log_q_t, log_q_s.exp(), mask)
    assert off.item() == pytest.approx(closed.item(), rel=1e-4)
    assert on.item() == pytest.approx(closed.item(), rel=1e-4)


def test_q_head_ascends_both_gaps_and_the_student_descends_them():
    q0, log_q_s, log_q_t, y, mask = _inputs(2)
    hidden = torch.randn(B, T, 6, generator=torch.Generator().manual_seed(3))
    logits_s = log_q_s.clone().requires_grad_()
    for name in ("off", "on"):
        head = QValueHead(6, V)
        opt = torch.optim.SGD(head.parameters(), lr=0.5)

        def term(q, log_s, name=name):
            if name == "off":
                return off_policy_term(q, log_s, y, mask)
            return on_policy_term(q, log_s, log_q_t, y, mask)

        before = term(head(hidden), log_q_s).gap
        opt.zero_grad()
        t0 = term(head(hidden), logits_s.log_softmax(-1))
        t0.q_loss.backward()
        assert logits_s.grad is None  # the Q head's loss never reaches the student
        opt.step()
        assert term(head(hidden), log_q_s).gap > before + 1e-3
        assert t0.q_loss.item() == pytest.approx(-t0.gap.item())
        assert t0.student_loss.item() == pytest.approx(t0.gap.item(), rel=1e-5)

    # The student's off-policy gradient step lowers the off-policy gap; its loss never reaches q.
    q = q0.clone().requires_grad_()
    term = off_policy_term(q, logits_s.log_softmax(-1), y, mask)
    term.student_loss.backward()
    assert q.grad is None
    with torch.no_grad():
        stepped = (logits_s - 0.5 * logits_s.grad).log_softmax(-1)
    assert off_policy_moment_gap(q0, stepped, y, mask) < term.gap - 1e-3


def _tabular(V_: int, steps: int, seed: int):
    """Random tables indexed by the prefix: logits (V_**t, V_) for each position t."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(V_**t, V_, generator=g) for t in range(steps)]


def _rows(tables, seqs, V_):
    """(N, steps, V_) rows: position t uses the row of the prefix seqs[:, :t]."""
    out = []
    for t, table in enumerate(tables):
        idx = torch.zeros(seqs.shape[0], dtype=torch.long)
        for k in range(t):
            idx = idx * V_ + seqs[:, k]
        out.append(table[idx])
    return torch.stack(out, 1)


@pytest.mark.parametrize("baseline", ["expected", "none"])
def test_reinforce_surrogate_gives_the_exact_gradient_of_the_on_policy_gap(baseline):
    """Enumerate every sequence of a tiny autoregressive student: E[grad surrogate] == grad E[D_on]."""
    V_, steps = 3, 3
    seqs = torch.tensor(list(itertools.product(range(V_), repeat=steps)))  # (27, 3): all of them
    theta = [t.requires_grad_() for t in _tabular(V_, steps, 0)]
    q = torch.tanh(_rows(_tabular(V_, steps, 1), seqs, V_))  # (27, 3, V_) Q values, fixed
    log_q_t = _rows(_tabular(V_, steps, 2), seqs, V_).log_softmax(-1)
    mask = torch.ones(1, steps, dtype=torch.bool)

    log_q_s = _rows(theta, seqs, V_).log_softmax(-1)  # (27, 3, V_)
    log_p_seq = log_q_s.gather(-1, seqs.unsqueeze(-1)).squeeze(-1).sum(-1)  # (27,)
    assert log_p_seq.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    # The exact objective: sum over sequences of P(y) * sum_t [E_t f - f(y_t)].
    per_seq = torch.stack(
        [on_policy_moment_gap(q[i : i + 1], log_q_t[i : i + 1], seqs[i : i + 1], mask) for i in range(27)]
    )
    exact = (log_p_seq.exp() * per_seq).sum()
    exact_grad = torch.autograd.grad(exact, theta)

    def expected_surrogate(**kw):
        log_q_s = _rows(theta, seqs, V_).log_softmax(-1)
        weights = log_q_s.gather(-1, seqs.unsqueeze(-1)).squeeze(-1).sum(-1).exp().detach()
        losses = [
            on_policy_term(
                q[i : i + 1], log_q_s[i : i + 1], log_q_t[i : i + 1], seqs[i : i + 1], mask, **kw
            ).student_loss
            for i in range(27)
        ]
        value = (weights * torch.stack(losses)).sum()
        return value, torch.autograd.grad(value, theta)

    value, grad = expected_surrogate(baseline=baseline)
    assert value.item() == pytest.approx(exact.item(), rel=1e-5)  # the value is the gap itself
    for a, b in zip(grad, exact_grad):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Without the cost-to-go the estimate ignores how y_t steers later states: not the exact gradient.
    _, myopic = expected_surrogate(baseline=baseline, reward_to_go=False)
    assert max((a - b).abs().max().item() for a, b in zip(myopic, exact_grad)) > 1e-3


def test_masked_positions_are_ignored_and_all_masked_gives_zero():
    q, log_q_s, log_q_t, y, _ = _inputs(4)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 1:4] = True
    mask[1, :2] = True
    # Garbage where masked: label -100 and -inf log-probabilities must neither crash nor leak NaN.
    y_bad = y.masked_fill(~mask, -100)
    log_q_s_bad = log_q_s.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    s = log_q_s_bad.clone().requires_grad_()
    qq = q.clone().requires_grad_()
    off = off_policy_term(qq, s, y_bad, mask)
    on = on_policy_term(qq, s, log_q_t, y_bad, mask)
    ref_off = off_policy_moment_gap(q, log_q_s, y, mask)
    ref_on = on_policy_moment_gap(q, log_q_t, y, mask)
    assert off.gap.item() == pytest.approx(ref_off.item(), rel=1e-5)
    assert on.gap.item() == pytest.approx(ref_on.item(), rel=1e-5)
    # Changing anything at a masked position changes nothing.
    q2 = q.clone()
    q2[~mask] = 5.0
    assert off_policy_moment_gap(q2, log_q_s, y, mask).item() == pytest.approx(ref_off.item(), rel=1e-5)
    (off.student_loss + on.student_loss + off.q_loss + on.q_loss).backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(qq.grad).all()
    assert (s.grad[~mask] == 0).all() and (qq.grad[~mask] == 0).all()
    assert s.grad[mask].abs().sum() > 0

    none = torch.zeros(B, T, dtype=torch.bool)
    s2 = log_q_s_bad.clone().requires_grad_()
    q3 = q.clone().requires_grad_()
    terms = [off_policy_term(q3, s2, y_bad, none), on_policy_term(q3, s2, log_q_t, y_bad, none)]
    total = sum(x for term in terms for x in (term.q_loss, term.student_loss))
    assert total.item() == 0.0 and all(term.gap.item() == 0.0 for term in terms)
    assert expected_moment_gap(q, log_q_s, log_q_t, none).item() == 0.0
    total.backward()
    assert (s2.grad == 0).all() and (q3.grad == 0).all()


def test_beta_endpoints_select_one_term_and_mix_linearly():
    q, log_q_s, log_q_t, y, mask = _inputs(5)
    off = off_policy_term(q, log_q_s, y, mask)
    on = on_policy_term(q, log_q_s, log_q_t, y.flip(0), mask)
    assert combine_terms(on, None, beta=1.0) is on
    assert combine_terms(None, off, beta=0.0) is off
    assert combine_terms(on, off, beta=1.0).gap.item() == on.gap.item()
    mixed = combine_terms(on, off, beta=0.25)
    assert mixed.gap.item() == pytest.approx(0.25 * on.gap.item() + 0.75 * off.gap.item(), rel=1e-6)
    assert mixed.q_loss.item() == pytest.approx(-mixed.gap.item(), rel=1e-6)
    assert mixed.student_loss.item() == pytest.approx(mixed.gap.item(), rel=1e-5)
    with pytest.raises(ValueError):
        combine_terms(on, off, beta=1.5)
    with pytest.raises(ValueError):
        combine_terms(None, off, beta=0.5)
    with pytest.raises(ValueError):
        on_policy_term(q, log_q_s, log_q_t, y, mask, baseline="mean")


def test_expected_q_is_a_probability_weighted_sum():
    q, log_q_s, *_ = _inputs(6)
    torch.testing.assert_close(expected_q(q, log_q_s), (log_q_s.exp() * q).sum(-1))
    onehot = torch.full((1, 1, V), float("-inf"))
    onehot[..., 3] = 0.0
    assert expected_q(q[:1, :1], onehot).item() == pytest.approx(q[0, 0, 3].item())
