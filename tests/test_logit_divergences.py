"""Property and reference tests of tadistill.objectives.logits (style.md item 8).

References: torch.nn.functional.kl_div for the two KLs, an explicit float64 computation in probability
space for every kind, and trl's GKDTrainer.generalized_jsd_loss for the generalized JSD (trl is a test-only
dependency). Properties: zero on identical inputs, non-negative, the exact endpoints of JSD and skew KL, the
skew bounds, temperature, masking, -inf logits, vocabulary padding and the teacher top-k buckets.
"""

from __future__ import annotations

import inspect
import math
import os

import pytest
import torch
import torch.nn.functional as F

from tadistill.objectives.logits import KINDS, logit_divergence, logit_divergence_rows, token_divergence

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only add contention

B, T, V = 3, 7, 11


def randn(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def padding_mask() -> torch.Tensor:
    """(B, T): a full row, right padding, left padding."""
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, :2] = False
    return mask


def ref_divergence(s: torch.Tensor, t: torch.Tensor, kind: str, *, temperature: float = 1.0, beta: float = 0.5,
                   alpha: float = 0.1) -> torch.Tensor:
    """Float64 definitions in probability space for finite logits: (..., V) -> (...)."""
    p = torch.softmax(t.double() / temperature, -1)
    q = torch.softmax(s.double() / temperature, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "forward-kl":
        return kl(p, q)
    if kind == "reverse-kl":
        return kl(q, p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skew-kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if kind == "skew-reverse-kl":
        return kl(q, (1 - alpha) * p + alpha * q)
    assert kind == "tvd"
    return 0.5 * (p - q).abs().sum(-1)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_on_identical_and_positive_on_random_inputs(kind):
    x = randn(B, T, V)
    same = token_divergence(x.clone(), x, kind=kind)
    assert same.shape == (B, T) and same.dtype == torch.float32
    assert same.abs().max() < 1e-6
    value = token_divergence(randn(B, T, V, seed=1), x, kind=kind)
    assert (value > 0).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_every_kind_equals_the_float64_definition(kind, temperature):
    s, t, mask = randn(B, T, V, seed=1), randn(B, T, V, seed=2), padding_mask()
    options = dict(temperature=temperature, beta=0.3, alpha=0.2)
    got = logit_divergence(s, t, mask, kind=kind, **options)
    want = ref_divergence(s, t, kind, **options)[mask].sum()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl"])
def test_kls_equal_torch_kl_div(kind):
    s, t, mask = randn(B, T, V, seed=3), randn(B, T, V, seed=4), padding_mask()
    log_q, log_p = F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1)
    # kl_div(input, target) = KL(target || exp(input)).
    inp, target = (log_q, log_p) if kind == "forward-kl" else (log_p, log_q)
    want = F.kl_div(inp[mask], target[mask], reduction="sum", log_target=True)
    torch.testing.assert_close(logit_divergence(s, t, mask, kind=kind, temperature=2.0), want, rtol=1e-5, atol=1e-6)


def test_jsd_endpoints_are_the_kls_exactly_and_jsd_half_is_symmetric():
    s, t, mask = randn(B, T, V, seed=5), randn(B, T, V, seed=6), padding_mask()
    fkl = logit_divergence(s, t, mask, kind="forward-kl")
    rkl = logit_divergence(s, t, mask, kind="reverse-kl")
    assert abs(fkl.item() - rkl.item()) > 1e-2  # the two endpoints really differ on these inputs
    assert abs(logit_divergence(s, t, mask, kind="jsd", beta=0.0).item() - fkl.item()) <= 1e-6
    assert abs(logit_divergence(s, t, mask, kind="jsd", beta=1.0).item() - rkl.item()) <= 1e-6
    torch.testing.assert_close(
        logit_divergence(s, t, mask, kind="jsd", beta=0.5), logit_divergence(t, s, mask, kind="jsd", beta=0.5)
    )
    # beta != 0.5 is not symmetric, but swapping the roles is the same as beta -> 1 - beta.
    torch.testing.assert_close(
        logit_divergence(s, t, mask, kind="jsd", beta=0.2), logit_divergence(t, s, mask, kind="jsd", beta=0.8)
    )


def test_skew_kls_endpoints_and_bounds():
    s, t, mask = randn(B, T, V, seed=7), randn(B, T, V, seed=8), padding_mask()
    fkl = logit_divergence(s, t, mask, kind="forward-kl")
    rkl = logit_divergence(s, t, mask, kind="reverse-kl")
    assert logit_divergence(s, t, mask, kind="skew-kl", alpha=0.0).item() == fkl.item()
    assert logit_divergence(s, t, mask, kind="skew-reverse-kl", alpha=0.0).item() == rkl.item()
    # alpha -> 0 approaches the plain KLs (the gap shrinks about linearly in alpha on these inputs).
    gaps = [
        (fkl - logit_divergence(s, t, mask, kind="skew-kl", alpha=a),
         rkl - logit_divergence(s, t, mask, kind="skew-reverse-kl", alpha=a))
        for a in (1e-4, 1e-5, 1e-6)
    ]
    assert gaps[0][0] > gaps[1][0] > gaps[2][0] > 0 and gaps[0][1] > gaps[1][1] > gaps[2][1] > 0
    assert gaps[2][0] < 1e-4 * fkl and gaps[2][1] < 1e-3 * rkl
    assert logit_divergence(s, t, mask, kind="skew-kl", alpha=1.0).item() == 0.0
    # KL is convex in its second argument: SKL_a <= (1 - a) KL(P||Q), SRKL_a <= (1 - a) KL(Q||P),
    # and the skewed values shrink as alpha grows.
    previous = [fkl.item(), rkl.item()]
    for a in (0.05, 0.1, 0.5, 0.9):
        skl = logit_divergence(s, t, mask, kind="skew-kl", alpha=a).item()
        srkl = logit_divergence(s, t, mask, kind="skew-reverse-kl", alpha=a).item()
        assert 0 < skl <= (1 - a) * fkl.item() and 0 < srkl <= (1 - a) * rkl.item()
        assert skl < previous[0] and srkl < previous[1]
        previous = [skl, srkl]


def test_tvd_is_half_l1_and_bounded():
    s, t, mask = randn(B, T, V, seed=9, scale=4.0), randn(B, T, V, seed=10, scale=4.0), padding_mask()
    per_token = token_divergence(s, t, kind="tvd")
    assert ((per_token >= 0) & (per_token <= 1)).all()
    l1 = (torch.softmax(t, -1) - torch.softmax(s, -1)).abs().sum(-1)
    torch.testing.assert_close(per_token, 0.5 * l1)
    torch.testing.assert_close(logit_divergence(s, t, mask, kind="tvd"), 0.5 * l1[mask].sum())
    # Disjoint supports: the maximum, 1.
    inf = float("-inf")
    disjoint = token_divergence(torch.tensor([[0.0, 0.0, inf, inf]]), torch.tensor([[inf, inf, 1.0, 2.0]]), kind="tvd")
    torch.testing.assert_close(disjoint, torch.tensor([1.0]))


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_divides_the_logits_and_changes_the_value(kind):
    s, t = randn(B, T, V, seed=11), randn(B, T, V, seed=12)
    at_1 = token_divergence(s, t, kind=kind)
    at_3 = token_divergence(s, t, kind=kind, temperature=3.0)
    torch.testing.assert_close(at_3, token_divergence(s / 3, t / 3, kind=kind))
    assert (at_3 - at_1).abs().max() > 1e-2
    # Very hot: both distributions approach uniform, so every divergence approaches 0 (TVD as 1/T, KLs as 1/T^2).
    assert token_divergence(s, t, kind=kind, temperature=1e4).max() < 1e-3 < at_1.min()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("teacher_topk", [None, 3])
def test_all_masked_gives_exact_zero_and_zero_finite_gradients(kind, teacher_topk):
    # Padded positions hold entirely -inf rows: they must not leak NaN into the value or the gradient.
    s = torch.full((B, T, V), float("-inf"), requires_grad=True)
    t = torch.full((B, T, V), float("-inf"))
    loss = logit_divergence(s, t, torch.zeros(B, T, dtype=torch.bool), kind=kind, teacher_topk=teacher_topk)
    loss.backward()
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert s.grad is not None and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("kind", KINDS)
def test_padded_rows_are_ignored_and_gradients_reach_only_the_student(kind):
    mask = padding_mask()
    s0, t0 = randn(B, T, V, seed=13), randn(B, T, V, seed=14)
    s = s0.masked_fill(~mask[..., None], float("-inf")).requires_grad_(True)  # padding = all -inf rows
    t = t0.masked_fill(~mask[..., None], float("-inf")).requires_grad_(True)
    loss = logit_divergence(s, t, mask, kind=kind)
    loss.backward()
    torch.testing.assert_close(loss, logit_divergence(s0, t0, mask, kind=kind))
    assert t.grad is None  # the teacher is a constant
    assert torch.isfinite(s.grad).all()
    assert (s.grad[~mask] == 0).all() and s.grad[mask].abs().sum() > 0


@pytest.mark.parametrize("kind", ["forward-kl", "jsd"])
@pytest.mark.parametrize("teacher_topk", [None, 4])
@pytest.mark.parametrize("full", [True, False])
def test_full_and_partial_masks_equal_a_position_by_position_reference(kind, teacher_topk, full):
    # A full mask takes views of the logits, a partial one gathers the valid rows: value and gradient are those
    # of the positions summed one by one, and bit-identical to gathering with the boolean mask. The student is
    # a non-contiguous slice with a padded vocabulary (V + 2), as a causal LM's shifted logits can be.
    mask = torch.ones(B, T, dtype=torch.bool) if full else padding_mask()
    base = randn(B, T + 1, V + 2, seed=30).requires_grad_(True)
    teacher = randn(B, T, V, seed=31)
    options = {"kind": kind, "beta": 0.3, "teacher_topk": teacher_topk}
    loss = logit_divergence(base[:, :-1], teacher, mask, **options)
    (grad,) = torch.autograd.grad(loss, base)

    gathered = logit_divergence_rows(base[:, :-1][mask], teacher[mask], **options).sum()
    assert torch.equal(loss, gathered)
    assert torch.equal(grad, torch.autograd.grad(gathered, base)[0])
    want = sum(logit_divergence_rows(base[b, t, None], teacher[b, t, None], **options).sum()
               for b, t in mask.nonzero().tolist())
    (want_grad,) = torch.autograd.grad(want, base)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-7)
    assert (grad[:, -1] == 0).all() and (grad[:, :-1][~mask] == 0).all()
    assert (grad[:, :-1][mask].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("teacher_topk", [None, 2])
def test_gradients_match_finite_differences(kind, teacher_topk):
    mask = torch.tensor([[True, True, False], [False, True, True]])
    s = randn(2, 3, 5, seed=15).double().requires_grad_(True)
    t = randn(2, 3, 5, seed=16).double()
    assert torch.autograd.gradcheck(
        lambda x: logit_divergence(x, t, mask, kind=kind, temperature=1.5, beta=0.3, teacher_topk=teacher_topk), (s,)
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["both", "teacher", "student"])
def test_minus_inf_logits_give_no_nan(kind, side):
    """Masked vocabulary entries: -inf in columns 3 and 7 of one side or both."""
    s0, t0, mask = randn(B, T, V, seed=17), randn(B, T, V, seed=18), padding_mask()
    blocked = torch.zeros(V, dtype=torch.bool)
    blocked[[3, 7]] = True
    s = (s0.masked_fill(blocked, float("-inf")) if side != "teacher" else s0).requires_grad_(True)
    t = t0.masked_fill(blocked, float("-inf")) if side != "student" else t0
    loss = logit_divergence(s, t, mask, kind=kind)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    if (side, kind) in {("teacher", "reverse-kl"), ("student", "forward-kl")}:
        # The student (teacher) puts mass where the other side has none: the true value is +inf, not NaN,
        # and the gradient stays finite.
        assert loss.item() == math.inf
        return
    assert torch.isfinite(loss)
    if side == "both":
        # Blocked columns are simply absent from both distributions.
        keep = ~blocked
        torch.testing.assert_close(loss, logit_divergence(s0[..., keep], t0[..., keep], mask, kind=kind))
        assert (s.grad[..., blocked] == 0).all()


REVERSE_ENDPOINTS = [("reverse-kl", {}), ("jsd", {"beta": 1.0}), ("skew-reverse-kl", {"alpha": 0.0})]


@pytest.mark.parametrize("kind, options", REVERSE_ENDPOINTS)
@pytest.mark.parametrize("teacher_topk", [None, 1])
def test_a_row_the_teacher_excludes_is_inf_with_a_finite_gradient_that_spares_other_rows(kind, options, teacher_topk):
    """Issue 10: one position where the teacher gives -inf to tokens the student likes (a masked vocabulary).

    Its value is +inf; its gradient is finite and pushes the student off the excluded tokens; every other
    row's gradient is exactly what it is without that row. teacher_topk = 1 with a one-token teacher
    support makes the "rest" bucket -inf, the same case after collapsing.
    """
    s0, t, mask = randn(B, T, V, seed=40), randn(B, T, V, seed=41), padding_mask()
    excluded = [0, 3, 7] if teacher_topk is None else [v for v in range(V) if v != 5]
    t[1, 2, excluded] = float("-inf")  # one valid position
    s = s0.clone().requires_grad_(True)
    loss = logit_divergence(s, t, mask, kind=kind, teacher_topk=teacher_topk, **options)
    loss.backward()
    assert loss.item() == math.inf
    assert torch.isfinite(s.grad).all()
    bad = s.grad[1, 2]
    assert (bad[excluded] > 0).all()  # raising an excluded token's logit raises the loss
    assert bad.abs().sum() > 0
    others = mask.clone()
    others[1, 2] = False
    s_ref = s0.clone().requires_grad_(True)
    ref = logit_divergence(s_ref, t, others, kind=kind, teacher_topk=teacher_topk, **options)
    ref.backward()
    assert math.isfinite(ref.item())
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, 2] = False
    assert torch.equal(s.grad[keep], s_ref.grad[keep])


@pytest.mark.parametrize("kind, options", REVERSE_ENDPOINTS)
def test_excluded_tokens_the_student_also_excludes_keep_the_value_finite(kind, options):
    """Where both sides give -inf the entry is absent: finite value, zero gradient on it, no NaN."""
    s, t, mask = randn(B, T, V, seed=43), randn(B, T, V, seed=44), padding_mask()
    t[0, 1, [2, 4]] = float("-inf")
    s[0, 1, [2, 4]] = float("-inf")
    s.requires_grad_(True)
    loss = logit_divergence(s, t, mask, kind=kind, **options)
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(s.grad).all() and (s.grad[0, 1, [2, 4]] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_padded_vocabulary_compares_the_first_entries(kind):
    """Student embedding table padded to 13 rows, teacher with the real 10 (and the other way round)."""
    mask = padding_mask()
    small, padded = randn(B, T, 10, seed=19), randn(B, T, 13, seed=20)
    want = logit_divergence(padded[..., :10], small, mask, kind=kind)
    torch.testing.assert_close(logit_divergence(padded, small, mask, kind=kind), want)
    torch.testing.assert_close(
        logit_divergence(small, padded, mask, kind=kind), logit_divergence(small, padded[..., :10], mask, kind=kind)
    )
    # The padded rows really are ignored: changing them changes nothing.
    padded2 = padded.clone()
    padded2[..., 10:] = 50.0
    assert logit_divergence(padded2, small, mask, kind=kind).item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_topk_with_k_equal_to_v_is_exact(kind):
    s, t, mask = randn(B, T, V, seed=21), randn(B, T, V, seed=22), padding_mask()
    exact = logit_divergence(s, t, mask, kind=kind, temperature=1.7)
    for k in (V, V + 5):
        torch.testing.assert_close(logit_divergence(s, t, mask, kind=kind, temperature=1.7, teacher_topk=k), exact)
    # k < V: still a divergence (0 on identical inputs, positive otherwise) and not the exact value.
    approx = logit_divergence(s, t, mask, kind=kind, temperature=1.7, teacher_topk=3)
    assert 0 < approx.item() and abs(approx.item() - exact.item()) > 1e-4
    assert abs(logit_divergence(t.clone(), t, mask, kind=kind, teacher_topk=3).item()) < 1e-5


def test_teacher_topk_rest_bucket_on_a_hand_example():
    p = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])  # top-2: tokens 1 (0.5) and 3 (0.2); rest 0.3
    q = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15])  # same buckets: 0.3, 0.25, rest 0.45
    t, s = p.log()[None, None], q.log()[None, None]
    mask = torch.ones(1, 1, dtype=torch.bool)
    pb, qb = [0.5, 0.2, 0.3], [0.3, 0.25, 0.45]
    expected = {
        "forward-kl": sum(a * math.log(a / b) for a, b in zip(pb, qb)),
        "reverse-kl": sum(b * math.log(b / a) for a, b in zip(pb, qb)),
        "tvd": 0.5 * sum(abs(a - b) for a, b in zip(pb, qb)),
    }
    for kind, value in expected.items():
        assert logit_divergence(s, t, mask, kind=kind, teacher_topk=2).item() == pytest.approx(value, rel=1e-5)
    # Only the student's total outside the top-k counts: moving mass among tokens 0, 2, 4 changes nothing...
    q_moved = torch.tensor([0.3, 0.3, 0.05, 0.25, 0.1])
    moved = logit_divergence(q_moved.log()[None, None], t, mask, kind="reverse-kl", teacher_topk=2)
    assert moved.item() == pytest.approx(expected["reverse-kl"], rel=1e-5)
    # ...while the exact reverse KL does see it.
    assert logit_divergence(q_moved.log()[None, None], t, mask, kind="reverse-kl").item() != pytest.approx(
        logit_divergence(s, t, mask, kind="reverse-kl").item(), rel=1e-3
    )


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_inputs_are_upcast_before_log_softmax(kind):
    s, t, mask = randn(B, T, V, seed=23).bfloat16(), randn(B, T, V, seed=24).bfloat16(), padding_mask()
    got = logit_divergence(s, t, mask, kind=kind, teacher_topk=4)
    assert got.dtype == torch.float32
    assert got.item() == logit_divergence(s.float(), t.float(), mask, kind=kind, teacher_topk=4).item()


def test_bad_options_are_value_errors():
    """The config refuses these for the user (config.LogitDivergence); the functions guard their math."""
    s, t, mask = randn(B, T, V), randn(B, T, V, seed=1), padding_mask()
    with pytest.raises(ValueError, match="did you mean 'reverse-kl'"):
        logit_divergence(s, t, mask, kind="reverse_kl")
    with pytest.raises(ValueError, match="beta"):
        logit_divergence(s, t, mask, kind="jsd", beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        token_divergence(s, t, kind="skew-kl", alpha=-0.1)
    with pytest.raises(ValueError, match="teacher_topk"):
        logit_divergence(s, t, mask, kind="jsd", teacher_topk=0)
    with pytest.raises(ValueError, match="temperature"):
        logit_divergence(s, t, mask, kind="tvd", temperature=0.0)
    # Options are checked even when nothing is to be distilled.
    with pytest.raises(ValueError):
        logit_divergence(s, t, torch.zeros(B, T, dtype=torch.bool), kind="kl")


# ------------------------------------------------------------------------------- trl cross-check


@pytest.fixture(scope="module")
def trl_generalized_jsd():
    """trl's generalized_jsd_loss (a test-only dependency); it moved to trl.experimental in trl 0.2x."""
    pytest.importorskip("trl", reason="trl is the numerical reference of the generalized JSD: pip install trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    except ImportError:
        from trl import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_equals_trl_generalized_jsd_loss(trl_generalized_jsd, beta):
    s, t, mask = randn(B, T, V, seed=25), randn(B, T, V, seed=26), padding_mask()
    labels = torch.where(mask, 1, -100)  # trl drops positions labelled -100; the label value is not used
    # trl's reduction="sum" sums over the valid tokens, as ours does; at T = 1 trl and we agree on scaling.
    want = trl_generalized_jsd(s, t, labels=labels, beta=beta, reduction="sum")
    got = logit_divergence(s, t, mask, kind="jsd", beta=beta)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Recent trl versions also divide both logits by a temperature inside the loss, as we do.
    if "temperature" in inspect.signature(trl_generalized_jsd).parameters:
        want_t = trl_generalized_jsd(s, t, labels=labels, beta=beta, temperature=2.0, reduction="sum")
        torch.testing.assert_close(logit_divergence(s, t, mask, kind="jsd", beta=beta, temperature=2.0), want_t,
                                   rtol=1e-5, atol=1e-5)
