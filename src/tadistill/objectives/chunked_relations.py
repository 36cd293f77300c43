"""Self-attention relation KL computed over chunks of query rows, recomputed in backward.

MiniLM's attention and value relations and MiniLMv2's Q-Q / K-K / V-V relations (docs/methods.md, MiniLM
and MiniLMv2) compare, for every relation head a and query row i, the distributions
softmax_j(q_a,i . k_a,j) of two models. Computed whole, each model's relation is an (N, T, T) float32
tensor, N = batch x heads: at T = 2,048 with 12 heads one sequence holds 192 MiB per tensor, and the plain
``relation_kl`` keeps several alive (teacher probabilities, student logits, the log-sum-exp's and the
backward's temporaries). Here no (T, T) tensor ever exists, only (N, c, T) blocks of c query rows:

1. per chunk of rows, both models' scores are built, masked, and the chunk's KL SUM is added; only the
   per-row log-sum-exps of both models, (N, T), are kept for backward (with the (N, T, d) inputs);
2. backward recomputes each chunk's scores and, from the kept log-sum-exps, both softmaxes at once: the
   gradient of KL(p || softmax(z)) with respect to the student's scores z is softmax(z) - p per valid row,
   and with z = q k^T, dq = G k and dk = G^T q. No autograd graph over the chunk is built.

This is the contract of ``objectives/chunked.py`` (Liger-Kernel's chunked losses): sums in float32, one
normalisation outside, equal loss and gradients to the plain function (tests/test_chunked_relations.py).
The arithmetic is the plain one's: two score matmuls in forward, two recomputed and two gradient matmuls
in backward, against three and three for ``relation_kl`` (whose cross term costs a (T, T) x (T, d) matmul
each way). Decoders compute only the keys up to a chunk's last query (the rest are masked anyway), about
half the work of the plain causal relation. Peak memory: O(N x chunk_size x T), not O(N x T x T).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from tadistill.objectives.divergence import check_mask

# Values of one (N, c, T) chunk of relation scores by default: 16 MiB of float32 per tensor.
RELATION_CHUNK_ELEMENTS = 2**22
# Relations up to this many values (128 MiB of float32 per tensor) are computed whole by default: the plain
# computation, as before, for the sequence lengths models are usually distilled at (32 x 48 heads x 128^2 is
# 25 M values). Beyond it the (T, T) tensors outgrow the rest of a step's activations.
RELATION_WHOLE_LIMIT = 2**25
_BLOCKED = torch.finfo(torch.float32).min  # finite: see attention._key_bias


def default_relation_chunk_size(batch: int, heads: int, length: int) -> int | None:
    """None (the whole relation at once) while the (batch x heads, length, length) relation holds at most
    RELATION_WHOLE_LIMIT values; else query rows per chunk such that a chunk holds RELATION_CHUNK_ELEMENTS.

    A limit in values rather than a fixed length: the recipe's 32 sequences x 48 relation heads at T = 128
    (25 M values) and 8 x 12 heads at T = 512 stay whole; 1 x 12 heads at T = 2,048 (50 M values) is cut
    into chunks of 170 rows (benchmarks/relation_memory.py measures the peak).
    """
    per_row = batch * heads * length
    if per_row * length <= RELATION_WHOLE_LIMIT:
        return None
    return max(1, RELATION_CHUNK_ELEMENTS // per_row)


def check_chunk_size(chunk_size: int | None) -> None:
    """None (no chunking) or a positive integer; a caller bug otherwise (the config checks ge=1 for the user)."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive integer, got {chunk_size!r}")


def _key_bias(mask: Tensor, heads: int) -> Tensor:
    """bool (B, T) -> float32 (B * H, 1, T): 0 at valid keys, float32 min at padded ones (finite: see
    attention._key_bias). Small (one row per head); baddbmm adds it inside the score matmul."""
    b, t = mask.shape
    bias = torch.zeros(b, 1, 1, t, dtype=torch.float32, device=mask.device).masked_fill_(~mask[:, None, None], _BLOCKED)
    return bias.expand(b, heads, 1, t).reshape(b * heads, 1, t)


def _scores(query: Tensor, key: Tensor, bias: Tensor, rows: slice, causal: bool) -> Tensor:
    """float32 (N, c, K) scores query @ key^T of the chunk ``rows``, blocked keys at float32 min.

    query (N, c, d), key (N, K, d), bias (N, 1, T). Decoders see keys 0..rows.stop - 1 only (K = rows.stop):
    the keys before the chunk are all visible, so the future keys to hide lie in its (c, c) diagonal block.
    """
    keys = key.shape[1]
    z = torch.baddbmm(bias[:, :, :keys], query, key.transpose(1, 2))
    if causal:
        c = rows.stop - rows.start
        future = torch.ones(c, c, dtype=torch.bool, device=z.device).triu_(1)  # key j > query i
        z[:, :, rows.start:].masked_fill_(future, _BLOCKED)
    return z


def _chunks(length: int, chunk_size: int, causal: bool):
    """(query rows, number of keys they can see) per chunk: every key, or for decoders those up to the last row."""
    for start in range(0, length, chunk_size):
        rows = slice(start, min(start + chunk_size, length))
        yield rows, rows.stop if causal else length


class _ChunkedRowKL(torch.autograd.Function):
    """sum over valid rows (b, i) of (1/H) sum_h KL(softmax(z_T[b,h,i,:]) || softmax(z_S[b,h,i,:])), z = q k^T."""

    @staticmethod
    def forward(ctx, q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, mask: Tensor, causal: bool,
                chunk_size: int) -> Tensor:
        batch, length = mask.shape
        heads = q_s.shape[0] // batch
        lse_s = q_s.new_empty(q_s.shape[:2])  # (N, T): log-sum-exp of each student row, kept for backward
        lse_t = q_s.new_empty(q_s.shape[:2])
        total = q_s.new_zeros(())
        bias = _key_bias(mask, heads)
        with torch.autocast(q_s.device.type, enabled=False):  # float32 scores (see relation_kl)
            for rows, keys in _chunks(length, chunk_size, causal):
                log_p = _scores(q_t[:, rows], k_t[:, :keys], bias, rows, causal)  # (N, c, K) teacher scores
                lse_t[:, rows] = torch.logsumexp(log_p, dim=-1)
                log_p.sub_(lse_t[:, rows, None])  # log p_T
                p = log_p.exp()
                z_s = _scores(q_s[:, rows], k_s[:, :keys], bias, rows, causal)  # (N, c, K) student scores
                lse_s[:, rows] = torch.logsumexp(z_s, dim=-1)
                # KL(p || softmax(z_S)) = sum_j p_j (log p_j - z_S,j) + lse(z_S): the difference first, as kl_per_row
                # does. Blocked keys: p_j = 0 and log p_j = z_S,j = float32 min, so they add exactly 0.
                per_row = torch.linalg.vecdot(p, log_p.sub_(z_s)) + lse_s[:, rows]  # (N, c)
                del log_p, p, z_s
                # Padded query rows are dropped by a fill, not a product: an all-padded row may be inf.
                keep = mask[:, None, rows]  # (B, 1, c)
                total += per_row.view(batch, heads, -1).masked_fill(~keep, 0.0).sum()
        ctx.save_for_backward(q_s, k_s, q_t, k_t, mask, bias, lse_s, lse_t)
        ctx.causal, ctx.chunk_size = causal, chunk_size
        return total / heads

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        q_s, k_s, q_t, k_t, mask, bias, lse_s, lse_t = ctx.saved_tensors
        batch, length = mask.shape
        heads = q_s.shape[0] // batch
        grad_q = torch.zeros_like(q_s) if ctx.needs_input_grad[0] else None
        grad_k = torch.zeros_like(k_s) if ctx.needs_input_grad[1] else None
        if grad_q is None and grad_k is None:
            return None, None, None, None, None, None, None
        scale = grad.to(torch.float32) / heads
        with torch.autocast(q_s.device.type, enabled=False):
            for rows, keys in _chunks(length, ctx.chunk_size, ctx.causal):
                p = _scores(q_t[:, rows], k_t[:, :keys], bias, rows, ctx.causal).sub_(lse_t[:, rows, None]).exp_()
                # d KL / d z_S = softmax(z_S) - p on valid rows (blocked keys: 0 - 0), times the upstream gradient.
                g = _scores(q_s[:, rows], k_s[:, :keys], bias, rows, ctx.causal).sub_(lse_s[:, rows, None]).exp_()
                g.sub_(p)
                del p
                # Padded query rows get 0 (their g is finite: both softmaxes lie in [0, 1]), valid ones the
                # upstream gradient: one (B, 1, c, 1) factor, one pass over the chunk.
                weight = mask[:, None, rows, None].to(torch.float32) * scale  # (B, 1, c, 1)
                g.view(batch, heads, *g.shape[1:]).mul_(weight)  # (N, c, K)
                if grad_q is not None:
                    grad_q[:, rows] = torch.bmm(g, k_s[:, :keys])  # z = q k^T: dq = G k
                if grad_k is not None:
                    grad_k[:, :keys].baddbmm_(g.transpose(1, 2), q_s[:, rows])  # dk += G^T q
        return grad_q, grad_k, None, None, None, None, None


def chunked_row_kl(
    student_query: Tensor,
    student_key: Tensor,
    teacher_query: Tensor,
    teacher_key: Tensor,
    mask: Tensor,
    *,
    causal: bool,
    chunk_size: int,
) -> Tensor:
    """Row-wise KL of two bilinear relations, chunk by chunk over query rows (module docstring).

    Args:
        student_query, student_key: float32 (B * H, T, d_S), head-major (row n = b H + h); the scores are
            student_query @ student_key^T, so any scale (1/sqrt(d)) is already in the query. They may be
            two views of one tensor (a self-relation); gradients flow to both.
        teacher_query, teacher_key: float32 (B * H, T, d_T), constants.
        mask: bool (B, T), True = valid token; padded keys are hidden and padded query rows dropped.
        causal: also hide keys after the query (decoders).
        chunk_size: query rows per chunk, >= 1.

    Returns:
        float32 scalar: sum over valid query rows (b, i) of (1/H) sum_h KL(softmax(z_T[b,h,i]) ||
        softmax(z_S[b,h,i])), the SUM the plain relation_kl / attention_kl return. All-padded batch -> 0.
    """
    check_chunk_size(chunk_size)
    if chunk_size is None:
        raise ValueError("chunked_row_kl: chunk_size must be a positive integer")
    b, t = mask.shape
    check_mask(mask, b, t, "chunked_row_kl")
    for name, x in (("student_query", student_query), ("student_key", student_key),
                    ("teacher_query", teacher_query), ("teacher_key", teacher_key)):
        if x.dim() != 3 or x.shape[1] != t or x.shape[0] % b or x.shape[0] != student_query.shape[0]:
            raise ValueError(f"chunked_row_kl: {name} has shape {tuple(x.shape)}, expected (B * H, {t}, d) "
                             f"with B = {b} and one H")
        if x.dtype != torch.float32:
            raise ValueError(f"chunked_row_kl: {name} must be float32, got {x.dtype}")
    if student_query.shape[-1] != student_key.shape[-1] or teacher_query.shape[-1] != teacher_key.shape[-1]:
        raise ValueError("chunked_row_kl: a model's queries and keys must have one width")
    return _ChunkedRowKL.apply(student_query, student_key, teacher_query.detach(), teacher_key.detach(), mask,
                               causal, chunk_size)
