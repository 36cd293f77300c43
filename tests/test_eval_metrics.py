"""Metrics (evaluation/metrics.py) and intrinsic perplexities (evaluation/intrinsic.py)."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig, BertForMaskedLM, BertModel, GPT2Config, GPT2LMHeadModel

from tadistill.data.masking import mask_tokens
from tadistill.errors import ConfigError, DataError, ModelError
from tadistill.evaluation.intrinsic import causal_perplexity, has_lm_head, masked_lm_perplexity, text_batches
from tadistill.evaluation.metrics import (
    accuracy,
    f1_binary,
    linear_cka,
    matthews_corrcoef,
    mean_cosine,
    nn_overlap_at_k,
    pearson,
    spearman,
)

from conftest import TEXTS

UNIQUE = list(dict.fromkeys(TEXTS))  # 8 distinct sentences of different lengths

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Representation similarity
# ----------------------------------------------------------------------------------------------------


def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA written as in Kornblith et al. (2019) eq. 2-3: Gram matrices, centering matrix H."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2

    return float(hsic(k, l) / (hsic(k, k) * hsic(l, l)).sqrt())


def test_cka_of_identical_features_is_one_and_equals_hsic_form() -> None:
    x = torch.randn(60, 8, generator=gen(1))
    y = x @ torch.randn(8, 5, generator=gen(2)) + 0.5 * torch.randn(60, 5, generator=gen(3))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), rel=1e-10)
    assert 0.3 < linear_cka(x, y) < 0.99  # related but not identical
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), rel=1e-12)  # symmetric


def test_cka_of_independent_features_is_near_zero() -> None:
    x, y = torch.randn(2000, 32, generator=gen(4)), torch.randn(2000, 32, generator=gen(5))
    assert linear_cka(x, y) < 0.05


def test_cka_invariant_to_rotation_scaling_and_shift_but_not_any_linear_map() -> None:
    x = torch.randn(100, 16, generator=gen(6))
    y = torch.tanh(x[:, :12] @ torch.randn(12, 12, generator=gen(7)))
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen(8), dtype=torch.float64))
    base = linear_cka(x, y)
    assert linear_cka(x, (y.double() @ q) * 3.7 + 5.0) == pytest.approx(base, rel=1e-9)
    assert linear_cka(x * 0.01, y) == pytest.approx(base, rel=1e-9)
    stretch = torch.diag(torch.logspace(-2, 2, 12, dtype=torch.float64))  # anisotropic: CKA changes
    assert abs(linear_cka(x, y.double() @ stretch) - base) > 1e-3


def test_cka_edge_cases() -> None:
    x = torch.randn(10, 4, generator=gen(9))
    assert linear_cka(x, torch.ones(10, 3)) == 0.0  # constant side: no variance
    with pytest.raises(ValueError, match="row counts"):
        linear_cka(x, x[:9])


def test_mean_cosine_by_hand() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    y = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    assert mean_cosine(x, y) == pytest.approx((1.0 + 1 / math.sqrt(2) - 1.0) / 3)
    with pytest.raises(ValueError, match="widths"):
        mean_cosine(x, y[:, :1])


def test_nn_overlap_identical_permuted_and_random() -> None:
    x = torch.randn(300, 16, generator=gen(10))
    assert nn_overlap_at_k(x, x, k=10) == 1.0
    # The same permutation of the features of every row (and any rotation or scale) keeps all cosines.
    perm = torch.randperm(16, generator=gen(11))
    assert nn_overlap_at_k(x, x[:, perm], k=10) == 1.0
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen(12)))
    assert nn_overlap_at_k(x, 2.0 * x @ q, k=5) == 1.0
    # Unrelated representations share about k / (N - 1) of each neighbourhood.
    n, k = 400, 10
    value = nn_overlap_at_k(torch.randn(n, 8, generator=gen(13)), torch.randn(n, 24, generator=gen(14)), k=k)
    assert abs(value - k / (n - 1)) < 0.012


def test_nn_overlap_by_hand() -> None:
    # Four directions on the circle: x's nearest neighbour of row 0 is row 1, y's is row 3.
    angle = torch.tensor([0.0, 0.3, 2.0, 4.0])
    x = torch.stack([angle.cos(), angle.sin()], dim=1)
    y = x.clone()
    y[3] = torch.tensor([math.cos(-0.1), math.sin(-0.1)])
    # k = 1 neighbours -- x: 0->1, 1->0, 2->1, 3->2 ; y: 0->3, 1->0, 2->1, 3->0
    assert nn_overlap_at_k(x, y, k=1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k must be"):
        nn_overlap_at_k(x, y, k=4)


# ----------------------------------------------------------------------------------------------------
# Task scores
# ----------------------------------------------------------------------------------------------------


def test_accuracy_and_f1_by_hand() -> None:
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(torch.tensor([2, 2, 0]), torch.tensor([2, 2, 0])) == 1.0
    pred, gold = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert f1_binary(pred, gold) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # TP 2, FP 1, FN 1
    assert f1_binary(pred, gold, positive=0) == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))  # TP 1, FP 1, FN 1
    assert f1_binary([0, 0], [1, 0]) == 0.0
    with pytest.raises(ValueError, match="predictions"):
        accuracy([1, 0], [1])


def test_mcc_binary_by_hand() -> None:
    pred, gold = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # TP 2, TN 1, FP 1, FN 1
    expected = (2 * 1 - 1 * 1) / math.sqrt((2 + 1) * (2 + 1) * (1 + 1) * (1 + 1))
    assert matthews_corrcoef(pred, gold) == pytest.approx(expected)
    assert matthews_corrcoef(gold, gold) == pytest.approx(1.0)
    assert matthews_corrcoef([1 - g for g in gold], gold) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # undefined -> 0


def test_mcc_three_classes_against_gorodkin_formula_and_covariance_form() -> None:
    gold = ["a", "a", "a", "b", "b", "c", "c", "c", "c", "b"]
    pred = ["a", "b", "a", "b", "c", "c", "c", "a", "c", "b"]
    # Confusion matrix (rows gold a, b, c; columns predicted) counted by hand:
    confusion = [[2, 1, 0], [0, 2, 1], [1, 0, 3]]
    s, c = 10, 2 + 2 + 3
    t = [sum(row) for row in confusion]  # gold counts 3, 3, 4
    p = [sum(col) for col in zip(*confusion)]  # predicted counts 3, 3, 4
    expected = (c * s - sum(a * b for a, b in zip(p, t))) / math.sqrt(
        (s**2 - sum(a * a for a in p)) * (s**2 - sum(b * b for b in t))
    )
    assert matthews_corrcoef(pred, gold) == pytest.approx(expected)
    # Gorodkin's R_K is also cov(X, Y) / sqrt(cov(X, X) cov(Y, Y)) of the one-hot matrices.
    onehot = lambda labels: F.one_hot(torch.tensor(["abc".index(v) for v in labels]), 3).double()
    x, y = onehot(pred), onehot(gold)
    x, y = x - x.mean(0), y - y.mean(0)
    cov_form = (x * y).sum() / ((x * x).sum() * (y * y).sum()).sqrt()
    assert matthews_corrcoef(pred, gold) == pytest.approx(float(cov_form))


def test_pearson_and_spearman_by_hand_with_ties() -> None:
    # Deviations (-1.5, -.5, .5, 1.5) and (-3, -1, 0, 4): sum of products 11, squares 5 and 26.
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(5 * 26))
    # Average ranks (1, 2.5, 2.5, 4) and (1, 2, 3.5, 3.5): deviations give 3.75 / sqrt(4.5 * 4.5).
    assert spearman([1, 2, 2, 3], [10, 20, 30, 30]) == pytest.approx(3.75 / 4.5)
    assert spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), [1, 8, 27, 1000]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 8, 27, 1000]) < 0.9  # not linear, so pearson < spearman
    assert spearman([3, 1, 2], [1, 3, 2]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


# ----------------------------------------------------------------------------------------------------
# Intrinsic perplexities
# ----------------------------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    assert tiny_tokenizer.unk_token_id not in tiny_tokenizer(UNIQUE[0])["input_ids"]  # real words, not [UNK]
    return tiny_tokenizer


def tiny_mlm(tokenizer, seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    return BertForMaskedLM(config)


def tiny_gpt2(tokenizer, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    return GPT2LMHeadModel(config)


def test_has_lm_head(tokenizer) -> None:
    assert has_lm_head(tiny_mlm(tokenizer)) == "mlm"
    assert has_lm_head(tiny_gpt2(tokenizer)) == "causal-lm"
    assert has_lm_head(BertModel(tiny_mlm(tokenizer).config)) is None
    assert has_lm_head(nn.Linear(3, 3)) is None


def test_uniform_mlm_has_perplexity_equal_to_vocab_size(tokenizer) -> None:
    model = tiny_mlm(tokenizer)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
        model.get_output_embeddings().bias.zero_()
    out = masked_lm_perplexity(model, tokenizer, UNIQUE, batch_size=3)
    assert out["mlm_loss"] == pytest.approx(math.log(len(tokenizer)), rel=1e-6)
    assert out["mlm_perplexity"] == pytest.approx(len(tokenizer), rel=1e-5)


def test_mlm_loss_is_global_sum_over_count_and_seeded(tokenizer) -> None:
    model = tiny_mlm(tokenizer, seed=3)
    model.train()
    out = masked_lm_perplexity(model, tokenizer, UNIQUE, batch_size=3, probability=0.3, seed=7)
    assert model.training  # mode restored
    # Reference: the same corruption drawn by hand, one division at the end.
    model.eval()
    generator, total, count, per_batch = torch.Generator().manual_seed(7), 0.0, 0, []
    with torch.no_grad():
        for batch in text_batches(tokenizer, UNIQUE, max_length=128, batch_size=3):
            ids, labels = mask_tokens(batch["input_ids"], batch["special_tokens_mask"],
                                      mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                                      probability=0.3, generator=generator)
            logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
            n = int((labels != -100).sum())
            total, count = total + float(loss), count + n
            per_batch.append(float(loss) / n)
    assert out["mlm_loss"] == pytest.approx(total / count, rel=1e-6)
    assert out["mlm_loss"] != pytest.approx(sum(per_batch) / len(per_batch), rel=1e-4)  # not a mean of means
    assert out["mlm_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-6)
    again = masked_lm_perplexity(model, tokenizer, UNIQUE, batch_size=3, probability=0.3, seed=7)
    other = masked_lm_perplexity(model, tokenizer, UNIQUE, batch_size=3, probability=0.3, seed=8)
    assert again == out and other["mlm_loss"] != out["mlm_loss"]


def test_uniform_causal_lm_has_perplexity_equal_to_vocab_size(tokenizer) -> None:
    model = tiny_gpt2(tokenizer)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # tied to wte: hidden states come from positions only
    out = causal_perplexity(model, tokenizer, UNIQUE, batch_size=3)
    assert out["lm_loss"] == pytest.approx(math.log(len(tokenizer)), rel=1e-6)
    assert out["perplexity"] == pytest.approx(len(tokenizer), rel=1e-5)


def test_causal_loss_excludes_padding_and_normalizes_once(tokenizer) -> None:
    model = tiny_gpt2(tokenizer, seed=5).eval()
    out = causal_perplexity(model, tokenizer, UNIQUE, batch_size=3)  # padded batches of unequal lengths
    total, count = 0.0, 0
    with torch.no_grad():
        for text in UNIQUE:  # one unpadded text at a time
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            logits = model(input_ids=ids).logits
            total += float(F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert out["lm_loss"] == pytest.approx(total / count, rel=1e-5)


def test_perplexity_errors(tokenizer) -> None:
    with pytest.raises(ModelError, match="masked-LM head"):
        masked_lm_perplexity(tiny_gpt2(tokenizer), tokenizer, UNIQUE)
    with pytest.raises(ModelError, match="causal-LM head"):
        causal_perplexity(tiny_mlm(tokenizer), tokenizer, UNIQUE)
    with pytest.raises(DataError, match="no texts"):
        masked_lm_perplexity(tiny_mlm(tokenizer), tokenizer, [])
    with pytest.raises(ConfigError, match="batch_size"):
        causal_perplexity(tiny_gpt2(tokenizer), tokenizer, UNIQUE, batch_size=0)
