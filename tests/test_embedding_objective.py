"""The sentence-embedding objective: pure functions by properties, the term, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tadistill.capture.architectures import Architecture
from tadistill.capture.hooks import Captured
from tadistill.objectives.embedding import embedding_cosine, embedding_mse, mean_pool
from tadistill.training.embedding_term import SentenceEmbeddingTerm
from tadistill.training.terms import NORMALIZERS, ModelOutputs

LENGTHS = [5, 2, 7, 0]  # the last row is all padding
B, T = len(LENGTHS), 7


def _mask() -> torch.Tensor:
    return torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]  # (B, T)


def _hidden(d: int, seed: int) -> torch.Tensor:
    return torch.randn(B, T, d, generator=torch.Generator().manual_seed(seed))


def _with_garbage(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Padded positions set to inf / large values: they must not reach the loss."""
    junk = torch.full_like(h, float("inf"))
    junk[..., ::2] = 1e6
    return torch.where(mask[..., None], h, junk)


def test_mean_pool_is_the_mean_of_valid_tokens_and_ignores_padding():
    mask, h = _mask(), _hidden(6, 0)
    pooled = mean_pool(_with_garbage(h, mask), mask)
    for b, n in enumerate(LENGTHS):
        expected = h[b, :n].mean(0) if n else torch.zeros(6)
        torch.testing.assert_close(pooled[b], expected)
    assert pooled.dtype == torch.float32 and torch.isfinite(pooled).all()


@pytest.mark.parametrize("distance", [embedding_mse, embedding_cosine])
def test_identical_embeddings_give_zero(distance):
    mask = _mask()
    e = mean_pool(_hidden(6, 1), mask)
    assert distance(e, e.clone(), mask.any(1)).item() == pytest.approx(0.0, abs=1e-6)


def test_mse_and_cosine_equal_the_torch_references_summed_over_rows():
    mask = _mask()
    s, t = mean_pool(_hidden(6, 2), mask), mean_pool(_hidden(6, 3), mask)
    rows = mask.any(1)
    mse_ref = sum(F.mse_loss(s[b], t[b]) for b in range(B) if rows[b])
    cos_ref = sum(1 - F.cosine_similarity(s[b], t[b], dim=0) for b in range(B) if rows[b])
    torch.testing.assert_close(embedding_mse(s, t, rows), mse_ref)
    torch.testing.assert_close(embedding_cosine(s, t, rows), cos_ref)
    # A sum over rows: the batch equals the sum of its rows one by one.
    for distance in (embedding_mse, embedding_cosine):
        parts = sum(distance(s[b : b + 1], t[b : b + 1], rows[b : b + 1]) for b in range(B))
        torch.testing.assert_close(distance(s, t, rows), parts)


@pytest.mark.parametrize("distance", [embedding_mse, embedding_cosine])
def test_all_masked_gives_zero_not_nan(distance):
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    value = distance(s, t, torch.zeros(3, dtype=torch.bool))
    assert value.item() == 0.0
    # An all-padding row pools to zeros: cosine(0, 0) would be 0, a loss of 1, unless the row is dropped.
    mask = torch.zeros(2, 5, dtype=torch.bool)
    zero = mean_pool(torch.randn(2, 5, 4), mask)
    assert distance(zero, mean_pool(torch.randn(2, 5, 4), mask), mask.any(1)).item() == 0.0


def test_teacher_is_a_constant_and_padding_gets_no_gradient():
    mask = _mask()
    h_s = _with_garbage(_hidden(6, 4), mask).requires_grad_()
    h_t = _hidden(6, 5).requires_grad_()
    loss = embedding_mse(mean_pool(h_s, mask), mean_pool(h_t, mask), mask.any(1))
    loss.backward()
    assert h_t.grad is None  # detached inside
    assert torch.isfinite(h_s.grad).all()
    assert (h_s.grad[~mask] == 0).all() and (h_s.grad[mask].abs().sum(-1) > 0).all()


def test_cosine_is_scale_free_and_mse_is_not():
    mask = _mask()
    s, t = mean_pool(_hidden(6, 6), mask), mean_pool(_hidden(6, 7), mask)
    rows = mask.any(1)
    torch.testing.assert_close(embedding_cosine(3 * s, t, rows), embedding_cosine(s, t, rows))
    assert embedding_mse(3 * s, t, rows) > embedding_mse(s, t, rows)


def test_shape_mismatch_is_a_caller_error():
    with pytest.raises(ValueError, match="project the student"):
        embedding_mse(torch.randn(2, 3), torch.randn(2, 4), torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        embedding_cosine(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2))


# ----------------------------------------------------------------------------------------------------
# The term


def _arch(layers: int, hidden: int) -> Architecture:
    return Architecture(family="bert", layers="encoder.layer", query="q", key="k", value="v", fused_qkv=None,
                        attention_output=None, final_norm=None, num_layers=layers, hidden_size=hidden,
                        num_heads=2, num_kv_heads=2, head_dim=hidden // 2, causal=False, vocab_size=10)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_term_projects_the_pooled_student_to_the_teacher_width(loss):
    from tadistill.config import SentenceEmbedding

    student, teacher = _arch(2, 4), _arch(3, 6)
    term = SentenceEmbeddingTerm(SentenceEmbedding(loss=loss), student, teacher)
    assert term.normalizer in NORMALIZERS and term.normalizer == "sequences"
    assert term.student_request.hidden == (2,) and term.teacher_request.hidden == (3,)
    assert isinstance(term.projection, torch.nn.Linear) and term.projection.weight.shape == (6, 4)
    mask = _mask()
    h_s = _hidden(4, 8).requires_grad_()
    h_t = _hidden(6, 9)
    value = term(ModelOutputs(Captured(hidden={2: h_s})), ModelOutputs(Captured(hidden={3: h_t})),
                 {"attention_mask": mask.long()})
    # The projection after pooling equals pooling the projected tokens (mean weights sum to one).
    with torch.no_grad():
        reference = (embedding_mse if loss == "mse" else embedding_cosine)(
            mean_pool(term.projection(h_s), mask), mean_pool(h_t, mask), mask.any(1))
    torch.testing.assert_close(value.detach(), reference, rtol=1e-5, atol=1e-6)
    value.backward()
    assert term.projection.weight.grad.abs().sum() > 0 and h_s.grad.abs().sum() > 0
    # Equal widths: no projection, no parameters.
    same = SentenceEmbeddingTerm(SentenceEmbedding(), _arch(2, 6), teacher)
    assert isinstance(same.projection, torch.nn.Identity) and not list(same.parameters())


# ----------------------------------------------------------------------------------------------------
# End to end: the objective by kind, through the CLI, with a narrower student


def _log(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_embedding_objective_trains_a_narrow_student_end_to_end(tiny_args, tmp_path, one_thread):
    from tadistill.cli.main import main

    out = tmp_path / "run"
    args = tiny_args("objectives=[{kind: minilmv2, relation_heads: 2}, {kind: embedding, loss: cosine, weight: 2}]",
                     "student.num_layers=2", "student.hidden_size=16", "student.num_heads=2", "train.steps=3")
    assert main(["distill", "minilmv2", *args, "--no-progress", "--out", str(out)]) == 0
    rows = [r for r in _log(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0.0 <= r["loss/embedding"] <= 2.0 for r in rows)  # a mean cosine distance per sequence
    assert (out / "student" / "config.json").is_file()


def test_embedding_accumulation_equals_one_large_batch(tiny_args, tiny_teacher_no_dropout, tmp_path, one_thread):
    # Unpacked texts of different lengths: summed per sequence and divided once by the step's count of
    # sequences, two micro-batches of 4 give the loss of one batch of 8.
    from tadistill.cli.main import main

    base = ["distill", "hs", *tiny_args("objectives=[{kind: embedding}]", "data.packing=false", "train.lr=1e-3",
                                        "student.hidden_size=16", "student.num_heads=2",
                                        teacher=tiny_teacher_no_dropout), "--no-progress"]
    big, small = tmp_path / "big", tmp_path / "accum"
    assert main([*base, "--set", "train.batch_size=8", "--out", str(big)]) == 0
    assert main([*base, "--set", "train.batch_size=4", "--set", "train.grad_accum=2", "--out", str(small)]) == 0
    la = {r["step"]: r["loss/embedding"] for r in _log(big) if "loss" in r}
    lb = {r["step"]: r["loss/embedding"] for r in _log(small) if "loss" in r}
    assert sorted(la) == [1, 2]
    for step in la:
        assert la[step] == pytest.approx(lb[step], rel=1e-5), step
