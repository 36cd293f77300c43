"""chunked_logit_divergence equals the plain logit_divergence, and never holds the (N, V) student logits.

style.md item 9: loss and gradients (hidden states, output-layer weight and bias) against the plain
reference on odd shapes and several chunk sizes, with a tolerance per dtype; a callable teacher; an
all-masked batch; and a memory test that counts the largest tensor allocated (not timed).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tadistill.objectives.chunked import chunked_logit_divergence
from tadistill.objectives.logits import KINDS, logit_divergence

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only add contention

B, T, D, V = 3, 7, 6, 37


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def padding_mask() -> torch.Tensor:
    """(B, T) with N = 16 valid rows: full, right-padded, left-padded."""
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, :2] = False
    return mask


def setup(dtype: torch.dtype = torch.float32, v_teacher: int = V, seed: int = 0):
    """Student hidden states (B, T, D) and head Linear(D, V), teacher logits (B, T, v_teacher)."""
    torch.manual_seed(seed)
    head = nn.Linear(D, V).to(dtype)
    hidden = torch.randn(B, T, D, generator=gen(seed + 1)).to(dtype).requires_grad_(True)
    teacher = (torch.randn(B, T, v_teacher, generator=gen(seed + 2)) * 2).to(dtype)
    return hidden, head, teacher


def loss_and_grads(fn, hidden, head):
    loss = fn()
    return (loss, *torch.autograd.grad(loss, [hidden, head.weight, head.bias]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [1, 5, 21, 1000])
def test_chunked_equals_plain_float32(kind, chunk_size):
    hidden, head, teacher = setup()
    mask = padding_mask()
    options = dict(kind=kind, temperature=1.5, beta=0.3, alpha=0.2)
    plain = loss_and_grads(lambda: logit_divergence(head(hidden), teacher, mask, **options), hidden, head)
    chunked = loss_and_grads(
        lambda: chunked_logit_divergence(hidden, head, teacher, mask, chunk_size=chunk_size, **options), hidden, head
    )
    assert chunked[0].dtype == torch.float32 and chunked[0].item() > 0
    for got, want in zip(chunked, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (chunked[1][~mask] == 0).all()  # padded positions get no gradient


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_plain_bf16(kind):
    hidden, head, teacher = setup(torch.bfloat16, seed=3)
    mask = padding_mask()
    plain = loss_and_grads(lambda: logit_divergence(head(hidden), teacher, mask, kind=kind), hidden, head)
    chunked = loss_and_grads(
        lambda: chunked_logit_divergence(hidden, head, teacher, mask, chunk_size=5, kind=kind), hidden, head
    )
    assert chunked[0].dtype == torch.float32 and chunked[1].dtype == torch.bfloat16
    # Per-chunk bf16 matmuls may round differently from the full one: bf16 has 8 mantissa bits.
    for got, want in zip(chunked, plain):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["jsd", "reverse-kl"])
def test_chunked_padded_vocabulary_and_teacher_topk(kind):
    """Student head padded to V = 37 rows, teacher with 32 real tokens, teacher top-5 buckets."""
    hidden, head, teacher = setup(v_teacher=32, seed=4)
    mask = padding_mask()
    options = dict(kind=kind, teacher_topk=5)
    plain = loss_and_grads(lambda: logit_divergence(head(hidden), teacher, mask, **options), hidden, head)
    chunked = loss_and_grads(
        lambda: chunked_logit_divergence(hidden, head, teacher, mask, chunk_size=3, **options), hidden, head
    )
    for got, want in zip(chunked, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (chunked[2][32:] == 0).all()  # the padded vocabulary rows of the head learn nothing


def test_callable_teacher_and_callable_output_layer():
    """Teacher logits made chunk by chunk from teacher hidden states; the student head is a closure."""
    hidden, head, _ = setup(seed=5)
    mask = padding_mask()
    teacher_hidden = torch.randn(B, T, 10, generator=gen(6))
    teacher_head = nn.Linear(10, V)
    weight = head.weight  # (V, D) leaf held only by the closure below

    def student_head(h):
        return h @ weight.T

    teacher_rows = teacher_hidden[mask]  # (N, 10), row-major (b, t) order as documented
    requested = []

    def teacher_fn(rows: slice):
        requested.append((rows.start, rows.stop))
        return teacher_head(teacher_rows[rows])

    full_teacher = teacher_head(teacher_hidden).detach()
    loss = chunked_logit_divergence(hidden, student_head, teacher_fn, mask, chunk_size=6, kind="jsd")
    forward_calls = list(requested)
    assert forward_calls == [(0, 6), (6, 12), (12, 16)]  # N = 16 rows, covered once, in order
    g_hidden, g_weight = torch.autograd.grad(loss, [hidden, weight])
    assert sorted(requested[3:]) == forward_calls[:-1]  # recomputed once per chunk in backward, but the last

    ref = logit_divergence(hidden @ weight.T, full_teacher, mask, kind="jsd")
    r_hidden, r_weight = torch.autograd.grad(ref, [hidden, weight])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_hidden, r_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_weight, r_weight, rtol=1e-5, atol=1e-5)
    assert teacher_head.weight.grad is None  # the teacher is called under no_grad


@pytest.mark.parametrize("kind, options", [("reverse-kl", {}), ("jsd", {"beta": 1.0})])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_a_row_the_teacher_excludes_is_inf_with_finite_gradients_chunked(kind, options, chunk_size):
    """Issue 10: teacher -inf (masked vocabulary) at one position. The value is +inf, every gradient is finite
    and equals the plain loss's, and the other positions' hidden-state gradients are those without that row."""
    hidden, head, teacher = setup(seed=11)
    mask = padding_mask()
    teacher[0, 3, [1, 8, 20]] = float("-inf")
    options = dict(kind=kind, **options)
    chunked = loss_and_grads(
        lambda: chunked_logit_divergence(hidden, head, teacher, mask, chunk_size=chunk_size, **options), hidden, head
    )
    plain = loss_and_grads(lambda: logit_divergence(head(hidden), teacher, mask, **options), hidden, head)
    assert chunked[0].item() == plain[0].item() == float("inf")
    for got, want in zip(chunked[1:], plain[1:]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert chunked[1][0, 3].abs().sum() > 0  # the excluded row still teaches something
    others = mask.clone()
    others[0, 3] = False
    without = loss_and_grads(
        lambda: chunked_logit_divergence(hidden, head, teacher, others, chunk_size=chunk_size, **options), hidden, head
    )
    assert torch.isfinite(without[0])
    torch.testing.assert_close(chunked[1][others], without[1][others], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_gives_zero_and_zero_gradients(kind):
    hidden, head, teacher = setup(seed=7)
    loss = chunked_logit_divergence(hidden, head, teacher, torch.zeros(B, T, dtype=torch.bool), chunk_size=4, kind=kind)
    loss.backward()
    assert loss.item() == 0.0
    for grad in (hidden.grad, head.weight.grad, head.bias.grad):
        assert grad is not None and torch.equal(grad, torch.zeros_like(grad))


def test_no_grad_evaluation_matches():
    hidden, head, teacher = setup(seed=8)
    mask = padding_mask()
    with torch.no_grad():
        got = chunked_logit_divergence(hidden, head, teacher, mask, chunk_size=4, kind="tvd")
        want = logit_divergence(head(hidden), teacher, mask, kind="tvd")
    assert got.grad_fn is None
    torch.testing.assert_close(got, want)


class LargestAllocation(TorchDispatchMode):
    """Record the element count of every tensor an op allocates (views and in-place results excluded)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(tuple(x.shape))
        return out

    def largest(self) -> int:
        return max((torch.Size(s).numel() for s in self.shapes), default=0)


class SavedForBackward:
    """Record the shapes autograd saves for backward outside any checkpointed region."""

    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return x

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def total(self) -> int:
        return sum(torch.Size(s).numel() for s in self.shapes)


@pytest.mark.parametrize("kind", KINDS)
def test_no_n_by_v_student_tensor_is_materialised(kind):
    """Not a timing. Between forward and backward autograd keeps O(N d + chunk V), not the (N, V) logits; no op
    ever allocates more than O(chunk x V); backward recomputes every chunk's logits once, but the last."""
    b, t, d, v, chunk = 8, 16, 6, 50, 4  # N = 128 valid rows: N x V = 6400, chunk x V = 200
    n = b * t
    head = nn.Linear(d, v)
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(tuple(out.shape)))
    hidden = torch.randn(b, t, d, generator=gen(9), requires_grad=True)
    teacher = torch.randn(b, t, v, generator=gen(10))
    mask = torch.ones(b, t, dtype=torch.bool)

    # Positive control: the plain path allocates and keeps (N, V) tensors, and both counters see them.
    with LargestAllocation() as plain, SavedForBackward() as plain_saved:
        plain_loss = logit_divergence(head(hidden), teacher, mask, kind=kind)
    plain_loss.backward()
    assert plain.largest() >= n * v and plain_saved.total() >= n * v

    calls.clear()
    with LargestAllocation() as forward, SavedForBackward() as saved:
        loss = chunked_logit_divergence(hidden, head, teacher, mask, chunk_size=chunk, kind=kind)
    assert calls == [(chunk, v)] * (n // chunk)
    with LargestAllocation() as backward:
        loss.backward()
    assert calls == [(chunk, v)] * (2 * n // chunk - 1)  # recomputed once in backward, all but the last chunk
    # Kept for backward: the (N,) row index, the (chunk, d) hidden inputs of every chunk and the activations
    # of the last chunk (up to 13 (chunk, V) tensors, skew-reverse-kl; counted per saved reference).
    assert saved.total() <= n + n * d + 16 * chunk * v < n * v
    # JSD's logsumexp stacks two (chunk, V) tensors; nothing else is wider than that, the (V, d) weight grad or
    # the (N, d) hidden rows and their gradient.
    bound = max(2 * chunk * v, v * d, n * d)
    assert 0 < forward.largest() <= bound < n * v
    assert 0 < backward.largest() <= bound


def test_errors():
    hidden, head, teacher = setup()
    mask = padding_mask()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_logit_divergence(hidden, head, teacher, mask, chunk_size=0, kind="jsd")
    with pytest.raises(ValueError, match="did you mean"):
        chunked_logit_divergence(hidden, head, teacher, mask, kind="forward_kl")
    with pytest.raises(ValueError, match="teacher logits for rows"):
        chunked_logit_divergence(hidden, head, lambda rows: teacher[0], mask, chunk_size=4, kind="jsd")


def test_default_chunk_size_scales_with_the_vocabulary():
    from tadistill import config as C
    from tadistill.objectives.chunked import CHUNK_ELEMENTS, default_chunk_size
    from tadistill.training.terms import CausalLMTerm, LogitDivergenceTerm

    assert default_chunk_size(128_256) == 130 and default_chunk_size(50_257) == 333
    assert default_chunk_size(4_096) == 4_096 and default_chunk_size(None) == 1024
    assert default_chunk_size(CHUNK_ELEMENTS * 2) == 1  # never 0 rows
    small, large = _arch(vocab=32_000), _arch(vocab=128_256)
    # The larger of the two vocabularies sets the chunk (both output layers run on the same rows).
    assert LogitDivergenceTerm(C.LogitDivergence(), small, large).chunk_size == 130
    assert LogitDivergenceTerm(C.LogitDivergence(chunk_size=7), small, large).chunk_size == 7
    assert CausalLMTerm(C.CausalLM(), small, large).chunk_size == CHUNK_ELEMENTS // 32_000


def _arch(vocab: int):
    from tadistill.capture.architectures import Architecture

    return Architecture(family="gpt2", layers="h", query=None, key=None, value=None, fused_qkv="attn.c_attn",
                        attention_output=None, final_norm=None, num_layers=2, hidden_size=8, num_heads=2,
                        num_kv_heads=2, head_dim=4, causal=True, vocab_size=vocab)


@pytest.mark.parametrize("rows, chunk, calls", [(12, 100, 1), (12, 5, 5), (12, 4, 5), (12, 12, 1)])
def test_only_earlier_chunks_are_recomputed(rows, chunk, calls):
    """The last chunk keeps its activations (backward starts with it): k chunks cost 2k - 1 head calls."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    seen = []
    head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    hidden = torch.randn(1, rows, 8, requires_grad=True)
    teacher = torch.randn(1, rows, 11)
    mask = torch.ones(1, rows, dtype=torch.bool)
    loss = chunked_logit_divergence(hidden, head, teacher, mask, chunk_size=chunk, kind="forward-kl")
    loss.backward()
    assert len(seen) == calls and sum(seen[: -(-rows // chunk)]) == rows
    plain = torch.nn.functional.kl_div(torch.log_softmax(head(hidden.detach()), -1),
                                       torch.log_softmax(teacher, -1), log_target=True, reduction="sum")
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
