"""Hard-concrete gates (structure/hard_concrete.py; Louizos et al. 2018): the expected L0 against its closed form
and against many draws, the exact zeros and ones the stretch gives, the deterministic test-time gates."""

from __future__ import annotations

import math

import pytest
import torch

from tadistill.structure.hard_concrete import (
    BETA,
    STRETCH,
    HardConcreteGates,
    deterministic_gates,
    expected_l0,
    sample_gates,
)

LOG_ALPHA = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 4.6])


def test_expected_l0_is_the_closed_form():
    low, high = STRETCH
    closed = [1.0 / (1.0 + math.exp(-(a - BETA * math.log(-low / high)))) for a in LOG_ALPHA.tolist()]
    torch.testing.assert_close(expected_l0(LOG_ALPHA), torch.tensor(closed), rtol=1e-6, atol=1e-7)
    # A gate at log_alpha = 0 is non-zero more often than not: the stretch moves mass past 0.
    assert 0.5 < float(expected_l0(torch.zeros(()))) < 1.0


def test_sampled_gates_have_the_expected_distribution():
    """Over many draws: the share of non-zero samples is P(z != 0); the mean matches a numerical integral of
    the clipped stretched sigmoid over u; samples lie in [0, 1] with exact zeros and ones."""
    n = 200_000
    g = torch.Generator().manual_seed(0)
    log_alpha = LOG_ALPHA[:, None].expand(-1, n)
    z = sample_gates(log_alpha, torch.rand(log_alpha.shape, generator=g))
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0
    nonzero = (z > 0).float().mean(1)
    torch.testing.assert_close(nonzero, expected_l0(LOG_ALPHA), rtol=0, atol=0.005)  # 3 sigma of 200k draws
    # E[z] by the midpoint rule over u (the sample is a deterministic function of u).
    u = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000
    mean = sample_gates(LOG_ALPHA.double()[:, None], u[None, :].expand(len(LOG_ALPHA), -1)).mean(1).float()
    torch.testing.assert_close(z.mean(1), mean, rtol=0, atol=0.005)
    assert (z == 1.0).float().mean() > 0.1  # the stretch past 1 gives exact ones too


def test_samples_are_differentiable_in_log_alpha():
    log_alpha = torch.zeros(1000, requires_grad=True)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    sample_gates(log_alpha, u).sum().backward()
    assert (log_alpha.grad >= 0).all() and log_alpha.grad.sum() > 0  # larger log_alpha, larger gates
    # A clipped sample (exactly 0 or 1) passes no gradient: it does not depend on log_alpha locally.
    z = sample_gates(log_alpha.detach(), u)
    assert torch.equal(log_alpha.grad[(z == 0) | (z == 1)], torch.zeros(int(((z == 0) | (z == 1)).sum())))


def test_deterministic_gates_keep_the_expected_count_per_group():
    # Row 0: P(z != 0) sums to about 2.2 -> round keeps 2 (ties to the lower index); row 1: all confident.
    log_alpha = torch.tensor([[5.0, -1.2, -10.0, -1.2], [6.0, 6.0, 6.0, 6.0]])
    p = expected_l0(log_alpha)
    gates = deterministic_gates(log_alpha)
    assert int((gates[0] > 0).sum()) == round(float(p[0].sum()))
    assert gates[0].tolist() == [1.0, 1.0, 0.0, 0.0]  # the tie between 1 and 3 goes to the lower index
    assert torch.equal(gates[1], torch.ones(4))
    assert not gates.requires_grad
    # Undecided gates (log_alpha -2.5: P(z != 0) ~ 0.29 each) keep about 29% of the group: Louizos et al.'s
    # test-time estimator would zero all of them.
    undecided = torch.full((100,), -2.5) + torch.linspace(-0.01, 0.01, 100)
    assert int(deterministic_gates(undecided).sum()) == round(float(expected_l0(undecided).sum())) == 29
    assert float(deterministic_gates(torch.tensor(0.0))) == 1.0 and float(deterministic_gates(torch.tensor(-3.0))) == 0


def test_gates_module_starts_open_and_switches_with_the_mode():
    gates = HardConcreteGates((3, 5), init_drop=0.01)
    assert float(gates.probability().detach().min()) > 0.99
    assert torch.equal(gates.eval()(), torch.ones(3, 5))  # deterministic: every gate open, exactly 1
    torch.manual_seed(0)
    drawn = gates.train()()
    assert drawn.requires_grad and drawn.shape == (3, 5) and bool((drawn <= 1).all())
    with pytest.raises(ValueError, match="init_drop"):
        HardConcreteGates((2,), init_drop=1.0)
    with pytest.raises(ValueError, match="stretch"):
        HardConcreteGates((2,), stretch=(0.0, 1.0))
