"""Hard-concrete gates: learned, sampled masks whose expected L0 norm is differentiable (Louizos et al. 2018).

A gate z in [0, 1] per unit (a head, an FFN unit, a block; later a speech model's conv channel) with a learned
location ``log_alpha``. Louizos et al. 2018, sec. 3 (eq. 9-12), with temperature beta and the stretch
interval (l, r) = (-0.1, 1.1):

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  s_bar = s (r - l) + l,
    z = min(1, max(0, s_bar))

Stretching past [0, 1] and clipping puts probability mass on exactly 0 and exactly 1, so a gate really
removes its unit while the sample stays differentiable in ``log_alpha``. The probability that a gate is
non-zero, its expected L0 norm, has the closed form (eq. 12)

    P(z != 0) = sigmoid(log_alpha - beta log(-l / r)),

which is what a sparsity target constrains (DPHuBERT, Peng et al. 2023, sec. 2.3: the expected number of
remaining parameters is a sum of these probabilities times the parameters each unit carries).

At test time a gate must be deterministic, and here it is binary. The *count* follows Wang et al. 2020 (FLOP)
and DPHuBERT's code: of a group of n gates, the round(sum P(z != 0)) with the largest ``log_alpha`` are 1, the
rest 0, so the pruned model has the size the regulariser drove it to. Louizos et al.'s own estimator
min(1, max(0, sigmoid(log_alpha) (r - l) + l)) (eq. 13) is 0 for every gate below log_alpha ~ -2.4 even where
P(z != 0) is 0.3: when gates are still undecided it would prune far more than the expected L0 says. A kept
unit is kept whole (value 1), as a pruned model keeps it; the next distillation stage adapts the rest.

The functions are pure (explicit tensors in, tensors out); ``HardConcreteGates`` holds the one learned tensor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

BETA = 2.0 / 3.0  # temperature (Louizos et al. 2018, sec. 4; DPHuBERT keeps it)
STRETCH = (-0.1, 1.1)  # (l, r), the stretch interval of the same papers
EPS = 1e-6  # u stays in [EPS, 1 - EPS]: log u and log(1 - u) stay finite


def expected_l0(log_alpha: Tensor, *, beta: float = BETA, stretch: tuple[float, float] = STRETCH) -> Tensor:
    """P(z != 0) per gate (Louizos et al. 2018, eq. 12): sigmoid(log_alpha - beta log(-l / r)); same shape."""
    low, high = stretch
    return torch.sigmoid(log_alpha - beta * math.log(-low / high))


def sample_gates(log_alpha: Tensor, uniform: Tensor, *, beta: float = BETA,
                 stretch: tuple[float, float] = STRETCH) -> Tensor:
    """Hard-concrete samples for given uniform draws ``uniform`` (same shape as ``log_alpha``, in (0, 1)).

    Differentiable in ``log_alpha``; the draws are the caller's (a seeded generator, or the lane's stream).
    """
    low, high = stretch
    u = uniform.clamp(EPS, 1.0 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (high - low) + low).clamp(0.0, 1.0)


def deterministic_gates(log_alpha: Tensor, *, beta: float = BETA, stretch: tuple[float, float] = STRETCH) -> Tensor:
    """Binary test-time gates, grouped along the last dimension (module docstring); no gradient.

    ``log_alpha`` (..., n): in each group of n gates the round(sum P(z != 0)) with the largest ``log_alpha``
    are 1, the others 0. Ties go to the lower index. A scalar gate is a group of one: 1 when P(z != 0) >= 0.5.
    """
    with torch.no_grad():
        la = log_alpha.detach().float()
        scalar = la.dim() == 0
        la = la.reshape(1, 1) if scalar else la
        keep = expected_l0(la, beta=beta, stretch=stretch).sum(-1).round().long()  # (...,) kept per group
        # The rank of each gate in its group, largest log_alpha first; stable so ties keep the lower index.
        order = torch.argsort(la, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(la.shape[-1], device=la.device).expand_as(order).contiguous())
        out = (rank < keep[..., None]).float()
        return out.reshape(()) if scalar else out


class HardConcreteGates(nn.Module):
    """Gates of one kind of unit, ``shape`` e.g. (L, H) heads per block: the learned ``log_alpha`` and the maps above.

    ``init_drop`` is each gate's initial drop probability, as FLOP and DPHuBERT initialise it: log_alpha =
    log(1 - p) - log(p), so a small p starts every gate open (P(z != 0) ~ 1) and the model as it was.
    """

    def __init__(self, shape: tuple[int, ...], *, init_drop: float = 0.01, beta: float = BETA,
                 stretch: tuple[float, float] = STRETCH):
        super().__init__()
        if not 0.0 < init_drop < 1.0:
            raise ValueError(f"init_drop={init_drop} must be in (0, 1)")
        low, high = stretch
        if not (low < 0.0 and high > 1.0):
            raise ValueError(f"stretch {stretch} must reach past [0, 1] (l < 0 < 1 < r) to give exact zeros and ones")
        self.beta, self.stretch = beta, (low, high)
        self.log_alpha = nn.Parameter(torch.full(shape, math.log(1.0 - init_drop) - math.log(init_drop)))

    def probability(self) -> Tensor:
        """P(z != 0) per gate, differentiable (the expected L0 norm, eq. 12)."""
        return expected_l0(self.log_alpha, beta=self.beta, stretch=self.stretch)

    def sample(self) -> Tensor:
        """One draw of every gate from the global (the lane's) random stream, on the gates' device."""
        uniform = torch.rand(self.log_alpha.shape, device=self.log_alpha.device)
        return sample_gates(self.log_alpha, uniform, beta=self.beta, stretch=self.stretch)

    def deterministic(self) -> Tensor:
        return deterministic_gates(self.log_alpha, beta=self.beta, stretch=self.stretch)

    def forward(self) -> Tensor:
        """A sample in training mode, the deterministic gates in eval mode."""
        return self.sample() if self.training else self.deterministic()
