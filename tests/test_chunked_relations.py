"""The chunked relation KL equals the plain one and never builds a (T, T) relation whole.

style.md item 9: loss and gradients of relation_kl / value_relation_kl / qk_attention_kl with ``chunk_size``
against the plain computation (chunk_size None), on odd shapes (T = 11, widths 24 and 16, chunk sizes that
do not divide T), right and left padding and an all-padded sequence, encoders and causal masks, grouped-query
heads, bf16 inputs under autocast; an all-padded batch; a memory test that counts the largest tensor
allocated; the default chunk size; and two tiny runs through the CLI (MiniLMv2 on a BERT, MiniLM on a
Llama with GQA) whose losses do not depend on the chunk size.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tadistill.capture.attention import attention_logits
from tadistill.cli.main import main
from tadistill.objectives.attention import (
    attention_kl,
    qk_attention_kl,
    relation_kl,
    value_relation_kl,
)
from tadistill.objectives.chunked_relations import (
    RELATION_CHUNK_ELEMENTS,
    RELATION_WHOLE_LIMIT,
    chunked_row_kl,
    default_relation_chunk_size,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: intra-op threads only add contention

B, T = 3, 11
CHUNKS = [1, 4, 5, 10]  # all below T: each really chunks (T and above fall back to the plain path)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def padding_mask() -> torch.Tensor:
    """(B, T): full, right-padded, left-padded."""
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, :3] = False
    return mask


def inputs(d_s: int, d_t: int, seed: int, dtype=torch.float32):
    student = torch.randn(B, T, d_s, generator=gen(seed)).to(dtype).requires_grad_(True)
    teacher = (torch.randn(B, T, d_t, generator=gen(seed + 1)) * 1.5).to(dtype)
    return student, teacher


def value_and_grad(fn, x):
    loss = fn()
    (grad,) = torch.autograd.grad(loss, [x])
    return loss, grad


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_relation_kl_chunked_equals_plain(causal, chunk_size):
    x_s, x_t = inputs(24, 16, seed=0)  # different widths: d_r = 6 and 4
    mask = padding_mask()
    plain = value_and_grad(lambda: relation_kl(x_s, x_t, mask, relation_heads=4, causal=causal), x_s)
    chunked = value_and_grad(
        lambda: relation_kl(x_s, x_t, mask, relation_heads=4, causal=causal, chunk_size=chunk_size), x_s)
    assert chunked[0].dtype == torch.float32 and chunked[0].item() > 1.0
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[1], plain[1], rtol=1e-5, atol=1e-6)
    assert chunked[1].abs().max() > 1e-3  # a gradient that could be wrong
    assert (chunked[1][~mask] == 0).all()  # padded positions get no gradient


@pytest.mark.parametrize("causal", [False, True])
def test_an_all_padded_sequence_and_an_all_padded_batch(causal):
    x_s, x_t = inputs(16, 16, seed=2)
    mask = padding_mask()
    mask[0] = False  # one sequence with no valid token: its rows see only blocked keys
    with torch.no_grad():  # even inf there must not leak into valid rows
        x_s[0] = float("inf")
    plain = value_and_grad(lambda: relation_kl(x_s, x_t, mask, relation_heads=2, causal=causal), x_s)
    chunked = value_and_grad(lambda: relation_kl(x_s, x_t, mask, relation_heads=2, causal=causal, chunk_size=3), x_s)
    assert torch.isfinite(chunked[0]) and torch.isfinite(chunked[1]).all()
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[1], plain[1], rtol=1e-5, atol=1e-6)

    none = torch.zeros(B, T, dtype=torch.bool)
    loss, grad = value_and_grad(lambda: relation_kl(x_s, x_t, none, relation_heads=2, causal=causal, chunk_size=3), x_s)
    assert loss.item() == 0.0 and (grad == 0).all()


def test_equal_models_give_zero():
    x_s, _ = inputs(16, 16, seed=3)
    mask = padding_mask()
    loss = relation_kl(x_s, x_s.detach(), mask, relation_heads=4, chunk_size=4)
    assert abs(loss.item()) < 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_relation_kl_chunked_bf16_under_autocast(causal):
    x_s, x_t = inputs(24, 16, seed=4, dtype=torch.bfloat16)
    mask = padding_mask()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = value_and_grad(lambda: relation_kl(x_s, x_t, mask, relation_heads=4, causal=causal), x_s)
        chunked = value_and_grad(
            lambda: relation_kl(x_s, x_t, mask, relation_heads=4, causal=causal, chunk_size=4), x_s)
    # Both upcast before any matmul (autocast is off inside): float32 value, bf16 gradient of the bf16 input.
    assert chunked[0].dtype == torch.float32 and chunked[1].dtype == torch.bfloat16
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-5)
    # The float32 gradients agree to 1e-6; rounding them to bf16 (8 mantissa bits) may then differ by an ulp.
    ulp = plain[1].float().abs().max().item() * 2**-7
    torch.testing.assert_close(chunked[1].float(), plain[1].float(), rtol=1e-2, atol=ulp)


@pytest.mark.parametrize("kv_heads", [(4, 4), (2, 4), (1, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_value_relation_kl_chunked_equals_plain(kv_heads, causal):
    kv_s, kv_t = kv_heads
    v_s, v_t = inputs(kv_s * 6, kv_t * 4, seed=5)  # head sizes 6 (student) and 4 (teacher)
    mask = padding_mask()
    options = {"num_heads": 4, "student_kv_heads": kv_s, "teacher_kv_heads": kv_t, "causal": causal}
    plain = value_and_grad(lambda: value_relation_kl(v_s, v_t, mask, **options), v_s)
    chunked = value_and_grad(lambda: value_relation_kl(v_s, v_t, mask, chunk_size=5, **options), v_s)
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[1], plain[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [(4, 4), (2, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk_size", [3, 10])
def test_qk_attention_kl_chunked_equals_attention_kl(kv_heads, causal, chunk_size):
    """MiniLM's L_AT from Q and K: equal to attention_kl on the attention_logits of both models (GQA too)."""
    kv_s, kv_t = kv_heads
    q_s = torch.randn(B, T, 4 * 5, generator=gen(6)).requires_grad_(True)  # 4 heads of 5
    k_s = torch.randn(B, T, kv_s * 5, generator=gen(7)).requires_grad_(True)
    q_t, k_t = torch.randn(B, T, 4 * 3, generator=gen(8)) * 2, torch.randn(B, T, kv_t * 3, generator=gen(9))
    mask = padding_mask()

    def reference():
        return attention_kl(attention_logits(q_s, k_s, num_heads=4, num_kv_heads=kv_s),
                            attention_logits(q_t, k_t, num_heads=4, num_kv_heads=kv_t), mask, causal=causal)

    def chunked():
        return qk_attention_kl(q_s, k_s, q_t, k_t, mask, num_heads=4, student_kv_heads=kv_s, teacher_kv_heads=kv_t,
                               causal=causal, chunk_size=chunk_size)

    want = reference()
    want_grads = torch.autograd.grad(want, [q_s, k_s])
    got = chunked()
    got_grads = torch.autograd.grad(got, [q_s, k_s])
    assert got.item() > 1.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        assert g.abs().max() > 1e-3


def test_a_chunk_as_long_as_the_sequence_is_the_plain_computation():
    """chunk_size >= T takes the plain path: bit for bit the same value."""
    x_s, x_t = inputs(16, 16, seed=10)
    mask = padding_mask()
    plain = relation_kl(x_s, x_t, mask, relation_heads=4)
    for chunk_size in (T, T + 5):
        assert torch.equal(relation_kl(x_s, x_t, mask, relation_heads=4, chunk_size=chunk_size), plain)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_a_bad_chunk_size_is_a_value_error(bad):
    x_s, x_t = inputs(16, 16, seed=11)
    with pytest.raises(ValueError, match="chunk_size"):
        relation_kl(x_s, x_t, padding_mask(), relation_heads=4, chunk_size=bad)


def test_chunked_row_kl_checks_its_inputs():
    mask = padding_mask()
    x = torch.randn(B * 2, T, 4)
    with pytest.raises(ValueError, match="float32"):
        chunked_row_kl(x.double(), x, x, x, mask, causal=False, chunk_size=2)
    with pytest.raises(ValueError, match="expected"):
        chunked_row_kl(x[:, :5], x, x, x, mask, causal=False, chunk_size=2)


# ----------------------------------------------------------------------------------------------- memory


class LargestAllocation(TorchDispatchMode):
    """Record the element count of every float tensor an op allocates (views and in-place results excluded)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("causal", [False, True])
def test_no_tensor_larger_than_a_chunk_of_rows(causal):
    """At T = 64, 4 heads: the plain relation allocates (B * 4, 64, 64) tensors; chunks of 8 rows never
    allocate more than (B * 4, 8, 64) values (forward and backward)."""
    t, heads, chunk = 64, 4, 8
    x_s = torch.randn(2, t, 32, generator=gen(12)).requires_grad_(True)
    x_t = torch.randn(2, t, 32, generator=gen(13))
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[1, 50:] = False

    def largest(chunk_size):
        with LargestAllocation() as meter:
            relation_kl(x_s, x_t, mask, relation_heads=heads, causal=causal, chunk_size=chunk_size).backward()
        return meter.largest

    assert largest(None) >= 2 * heads * t * t
    assert largest(chunk) <= 2 * heads * chunk * t


def test_default_chunk_size_keeps_short_sequences_whole():
    # The recipe's batch (32 x 48 relation heads at T = 128, 25 M values) and 8 x 12 heads at T = 512 stay whole.
    assert default_relation_chunk_size(32, 48, 128) is None
    assert default_relation_chunk_size(8, 12, 512) is None
    # T = 2,048: chunks of RELATION_CHUNK_ELEMENTS values, a small fraction of the sequence.
    rows = default_relation_chunk_size(1, 12, 2048)
    assert rows is not None and rows * 12 * 2048 <= RELATION_CHUNK_ELEMENTS and rows <= 2048 // 8
    assert 12 * 2048 * 2048 > RELATION_WHOLE_LIMIT
    assert default_relation_chunk_size(64, 48, 4096) == 1  # never 0


# ------------------------------------------------------------------------------------------- end to end


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[k] for r in rows for k in sorted(r) if k.startswith(("loss", "eval/"))]


def test_minilmv2_run_does_not_depend_on_the_chunk_size(tiny_args, tmp_path):
    """Padded batches (no packing) through the real loop: chunks of 5 rows give the losses of whole relations."""
    runs = {}
    for chunk in (5, 1000):
        out = tmp_path / str(chunk)
        argv = ["distill", "minilmv2", *tiny_args("objectives.minilmv2.relation_heads=4", "data.packing=false",
                                                  f"objectives.minilmv2.chunk_size={chunk}"),
                "--out", str(out), "--no-progress"]
        assert main(argv) == 0
        runs[chunk] = _losses(out)
    assert len(runs[5]) > 4
    assert runs[5] == pytest.approx(runs[1000], rel=1e-4)


def test_minilm_on_a_gqa_decoder_does_not_depend_on_the_chunk_size(tiny_llama, tiny_corpus, tmp_path):
    """Causal masks, grouped-query heads (4 query, 2 key/value): attention and value relations chunked."""
    runs = {}
    for chunk in (3, 1000):
        out = tmp_path / str(chunk)
        sets = [f"teacher={tiny_llama}", f"data.source={tiny_corpus}", f"data.cache_dir={tmp_path / 'cache'}",
                "data.max_length=24", "data.heldout_fraction=0.2", "data.packing=false", "train.steps=2",
                "train.batch_size=4", "train.eval_batches=1", "student.num_layers=2",
                f"objectives.minilm.chunk_size={chunk}"]
        assert main(["distill", "minilm", *[a for s in sets for a in ("--set", s)], "--out", str(out),
                     "--no-progress"]) == 0
        runs[chunk] = _losses(out)
    assert len(runs[3]) > 4
    # The tiny Llama's maps are near-uniform (KL ~ 2e-4): float32 rounding of O(log T) row terms is ~1e-8.
    assert runs[3] == pytest.approx(runs[1000], rel=1e-4, abs=1e-7)
