"""Metrics as pure functions: representation similarity and task scores, each returning a python float.

Representation similarity (teacher vs student features of the same inputs):

* ``linear_cka``: linear centered kernel alignment (Kornblith et al. 2019, "Similarity of Neural
  Network Representations Revisited", eq. 2 with linear kernels, i.e. section 3's feature-space form);
* ``mean_cosine``: mean row-wise cosine similarity (needs equal widths);
* ``nn_overlap_at_k``: how many of each row's k nearest neighbours the two representations share.

Task scores (predictions vs gold labels, as lists, tuples, numpy arrays or tensors):
``accuracy``, ``f1_binary``, ``matthews_corrcoef`` (binary and Gorodkin's multiclass R_K),
``pearson`` and ``spearman`` (average ranks for ties), the GLUE metrics.

Everything is computed in float64 on the CPU: these are evaluation numbers, not losses, and float32
sums over thousands of rows lose digits that CKA near 1 or correlations near 0 need.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

# nn_overlap_at_k builds similarity rows in blocks of this many queries: memory is block x N floats.
_NN_BLOCK = 1024


# ----------------------------------------------------------------------------------------------------
# Representation similarity
# ----------------------------------------------------------------------------------------------------


def _paired_features(x: Tensor, y: Tensor, who: str, *, same_width: bool = False) -> tuple[Tensor, Tensor]:
    """Check two (N, d) feature matrices with the same N; return float64 CPU copies."""
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"{who}: expected (N, d) matrices, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{who}: row counts differ ({x.shape[0]} vs {y.shape[0]}); rows must be the same inputs")
    if same_width and x.shape[1] != y.shape[1]:
        raise ValueError(f"{who}: widths differ ({x.shape[1]} vs {y.shape[1]}); cosine needs one space")
    if x.shape[0] == 0:
        raise ValueError(f"{who}: no rows")
    return x.detach().to("cpu", torch.float64), y.detach().to("cpu", torch.float64)


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two representations of the same N inputs (Kornblith et al. 2019).

    Args:
        x: (N, d1) features, one row per input (token or sentence).
        y: (N, d2) features of the same inputs; widths may differ.

    Returns:
        ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F), X_c and Y_c with column means removed:
        HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) for the linear kernels K = X X^T, L = Y Y^T (the
        1/(N-1)^2 factors cancel). In [0, 1]; 1 for identical features; invariant to orthogonal
        transforms and isotropic scaling of either side (not to arbitrary invertible maps). 0 when
        one side is constant (no variance: nothing to align).
    """
    x, y = _paired_features(x, y, "linear_cka")
    x = x - x.mean(dim=0, keepdim=True)  # (N, d1) centering = H K H with H = I - 11^T/N
    y = y - y.mean(dim=0, keepdim=True)  # (N, d2)
    # Feature-space form: (d1 x d2), (d1 x d1), (d2 x d2) products instead of N x N Gram matrices.
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm_x = torch.linalg.matrix_norm(x.T @ x)
    norm_y = torch.linalg.matrix_norm(y.T @ y)
    denominator = norm_x * norm_y
    if denominator == 0:
        return 0.0
    return float(cross / denominator)


def mean_cosine(x: Tensor, y: Tensor) -> float:
    """Mean over the N rows of cos(x_i, y_i); x, y: (N, d) with one d. A zero row has cosine 0."""
    x, y = _paired_features(x, y, "mean_cosine", same_width=True)
    return float(F.cosine_similarity(x, y, dim=-1).mean())


def _knn(x: Tensor, k: int) -> Tensor:
    """(N, d) -> (N, k) long: indices of each row's k most cosine-similar other rows."""
    unit = F.normalize(x, dim=-1)  # (N, d); a zero row stays zero (similarity 0 to everything)
    n = unit.shape[0]
    out = []
    for start in range(0, n, _NN_BLOCK):
        sims = unit[start : start + _NN_BLOCK] @ unit.T  # (b, N)
        rows = torch.arange(start, min(start + _NN_BLOCK, n))
        sims[torch.arange(rows.numel()), rows] = float("-inf")  # a row is never its own neighbour
        out.append(sims.topk(k, dim=-1).indices)  # (b, k)
    return torch.cat(out)


def nn_overlap_at_k(x: Tensor, y: Tensor, k: int = 10) -> float:
    """Nearest-neighbour overlap of two representations of the same N inputs.

    Args:
        x: (N, d1) features; y: (N, d2) features of the same inputs (widths may differ).
        k: neighbours per row, 1 <= k < N.

    Returns:
        mean over rows i of |kNN_x(i) ∩ kNN_y(i)| / k, neighbours by cosine similarity among the other
        N - 1 rows (row i itself excluded). 1 when both induce the same neighbourhoods; about
        k / (N - 1) for unrelated representations. Ties are broken by ``topk``'s order.
    """
    x, y = _paired_features(x, y, "nn_overlap_at_k")
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"nn_overlap_at_k: k must be an integer in [1, N) = [1, {n}), got {k!r}")
    nn_x, nn_y = _knn(x, k), _knn(y, k)  # (N, k) each
    # |A ∩ B| per row: compare every pair of listed neighbours, (N, k, k); lists hold distinct indices.
    shared = (nn_x[:, :, None] == nn_y[:, None, :]).sum(dim=(1, 2))  # (N,)
    return float(shared.double().mean() / k)


# ----------------------------------------------------------------------------------------------------
# Task scores
# ----------------------------------------------------------------------------------------------------


def _as_list(values: Any, who: str) -> list:
    """Tensors, numpy arrays and sequences -> a flat python list."""
    if hasattr(values, "tolist"):
        values = values.tolist()
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise ValueError(f"{who}: expected a sequence, tensor or array, got {type(values).__name__}")
    return list(values)


def _pair(pred: Any, gold: Any, who: str) -> tuple[list, list]:
    p, g = _as_list(pred, who), _as_list(gold, who)
    if len(p) != len(g):
        raise ValueError(f"{who}: {len(p)} predictions but {len(g)} gold labels")
    if not p:
        raise ValueError(f"{who}: no examples")
    return p, g


def accuracy(pred: Any, gold: Any) -> float:
    """Fraction of the N examples with pred_i == gold_i; pred, gold: N labels each."""
    p, g = _pair(pred, gold, "accuracy")
    return sum(a == b for a, b in zip(p, g)) / len(p)


def f1_binary(pred: Any, gold: Any, positive: int = 1) -> float:
    """F1 of the ``positive`` class: 2 TP / (2 TP + FP + FN); 0 when there is no TP (GLUE MRPC, QQP)."""
    p, g = _pair(pred, gold, "f1_binary")
    tp = sum(a == positive and b == positive for a, b in zip(p, g))
    fp = sum(a == positive and b != positive for a, b in zip(p, g))
    fn = sum(a != positive and b == positive for a, b in zip(p, g))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(pred: Any, gold: Any) -> float:
    """Matthews correlation (GLUE CoLA); for K > 2 classes Gorodkin's R_K (Gorodkin 2004, eq. 8).

    With the K x K confusion matrix C (rows gold, columns predicted), c = trace(C) correct, s = N
    examples, t_k = times class k truly occurs, p_k = times it is predicted:

        R_K = (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2)),

    which for K = 2 is the usual (TP TN - FP FN) / sqrt(...). 0 when undefined (a constant pred or gold).
    """
    p, g = _pair(pred, gold, "matthews_corrcoef")
    classes = {label: i for i, label in enumerate(dict.fromkeys(g + p))}
    confusion = torch.zeros(len(classes), len(classes), dtype=torch.float64)
    for a, b in zip(p, g):
        confusion[classes[b], classes[a]] += 1
    s = confusion.sum()
    c = confusion.trace()
    t_k, p_k = confusion.sum(dim=1), confusion.sum(dim=0)  # (K,) gold counts, predicted counts
    denominator = ((s**2 - (p_k**2).sum()) * (s**2 - (t_k**2).sum())).sqrt()
    if denominator == 0:
        return 0.0
    return float((c * s - (p_k * t_k).sum()) / denominator)


def _numbers(a: Any, b: Any, who: str) -> tuple[Tensor, Tensor]:
    x, y = _pair(a, b, who)
    if len(x) < 2:
        raise ValueError(f"{who}: a correlation needs at least 2 pairs, got {len(x)}")
    return torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)


def _pearson(x: Tensor, y: Tensor) -> float:
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    if denominator == 0:
        return math.nan  # a constant side: the correlation is undefined, and 0 would pass as a score
    return float((x * y).sum() / denominator)


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation of two length-N sequences of numbers (GLUE STS-B); NaN if one is constant."""
    return _pearson(*_numbers(a, b, "pearson"))


def _average_ranks(x: Tensor) -> Tensor:
    """(N,) -> (N,) 1-based ranks, tied values sharing the mean of the ranks they span."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # rank of the last member of each tie group
    return (last - (counts.double() - 1) / 2)[inverse]  # mean of ranks last-count+1 .. last


def spearman(a: Any, b: Any) -> float:
    """Spearman correlation: Pearson of average ranks (ties get the mean rank); NaN if one is constant."""
    x, y = _numbers(a, b, "spearman")
    return _pearson(_average_ranks(x), _average_ranks(y))
