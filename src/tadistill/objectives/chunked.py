"""Logit divergences computed chunk by chunk from the student's last hidden states.

With a 150k-token vocabulary, the (B, T, V) float32 logits of one 8 x 2048 batch take 10 GB, and
log_softmax, the mixture of JSD and their gradients several times that. Here the student's logits only
ever exist for ``chunk_size`` rows at a time, in the forward pass and in the backward pass:

1. the valid positions are flattened: (B, T, d) -> (N, d) rows in row-major (b, t) order;
2. per chunk of rows, logits = output_layer(h_chunk) (c, V) and the chunk's divergence SUM are computed
   inside ``torch.utils.checkpoint``, so autograd keeps only the (c, d) input and the scalar; the
   backward pass recomputes that chunk's logits, takes its gradient and frees them again. The last
   chunk is the exception: backward starts with it, so it keeps its activations and is not recomputed
   (one chunk, the common case for short batches, runs exactly like the plain loss);
3. the chunk sums are added; the training loop divides once by the global count of valid tokens.

This is the contract of Liger-Kernel's chunked (fused-linear) losses, where each chunk returns a sum and
the normalisation happens once outside, and the pattern of litgpt's chunked_cross_entropy, which sums
per-chunk losses and divides by the number of non-ignored targets. Liger computes each chunk's gradient
already in the forward pass, which needs the output layer's parameters explicitly; recomputation under
checkpoint works for any callable (a tied embedding, a LoRA-wrapped head) at the price of a second
(c, d) x (d, V) matmul per chunk in backward. Peak memory: O(chunk_size x V), not O(N x V).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tadistill.objectives.divergence import check_mask
from tadistill.objectives.logits import check_divergence_options, logit_divergence_rows

CHUNK_ELEMENTS = 2**24  # logits per chunk by default: 64 MiB in float32, whatever the vocabulary


def default_chunk_size(vocab_size: int | None) -> int:
    """Rows per chunk such that one chunk of logits holds about CHUNK_ELEMENTS values.

    A fixed row count would not do: 1,024 rows are 200 MiB of float32 logits at GPT-2's 50k vocabulary but
    0.5 GiB at Llama 3's 128k, with as much again for each softmax and gradient alive at once. 2^24 values
    gives 130 rows at 128k (peak memory 0.07 of the plain divergence at 2,048 positions,
    benchmarks/chunked_memory.py), 333 at 50k and 4,096 at 4k. Fewer rows cost time: each chunk reads the
    whole (d, V) output layer for a (rows, d) x (d, V) product, so with memory to spare on a GPU a larger
    ``chunk_size`` (500 to 2,000 rows) keeps it busier. Unknown vocabulary: 1,024 rows.
    """
    if not vocab_size:
        return 1024
    return max(1, CHUNK_ELEMENTS // vocab_size)


def chunked_logit_divergence(
    student_hidden: Tensor,
    output_layer: nn.Module | Callable[[Tensor], Tensor],
    teacher_logits: Tensor | Callable[[slice], Tensor],
    mask: Tensor,
    *,
    chunk_size: int = 1024,
    kind: str,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    teacher_topk: int | None = None,
) -> Tensor:
    """``logit_divergence(output_layer(student_hidden), teacher_logits, mask, ...)`` without the full student logits.

    Args:
        student_hidden: (B, T, d) the student's last hidden states (after its final norm); gradients flow to it.
        output_layer: maps (c, d) -> (c, V_S) logits, e.g. the student's ``lm_head``; its parameters (or
            tensors its closure holds) get their gradients too. It is called again on each chunk in
            backward, so it must be deterministic (or draw from the RNG, whose state checkpoint restores).
        teacher_logits: either a (B, T, V_T) tensor, or a callable ``rows -> (c, V_T)`` that returns the
            teacher logits of the flat valid rows ``rows`` (a slice over the N valid positions in row-major
            (b, t) order, i.e. the rows of ``x[mask]``), so the teacher can be chunked too: for example
            ``lambda rows: teacher_head(teacher_hidden[mask][rows])``. It is called under no_grad, once per
            chunk in forward and once more in backward (except the last chunk); with no valid position it is called once with an
            empty slice. V_T may differ from V_S (see ``logit_divergence``).
        mask: bool (B, T), True = position to distill.
        chunk_size: rows per chunk, >= 1; peak memory grows as chunk_size x V.
        kind, temperature, beta, alpha, teacher_topk: as in ``tadistill.objectives.logits.logit_divergence``.

    Returns:
        float32 scalar: the same SUM over valid positions as ``logit_divergence`` on the full logits, up to
        float summation order. No valid position gives exactly 0, with zero gradients for the hidden states
        and the output layer.
    """
    check_divergence_options(kind, temperature, beta, alpha, teacher_topk)
    _check_chunk_size(chunk_size)
    if student_hidden.dim() != 3:
        raise ValueError(f"chunked_logit_divergence: hidden must be (B, T, d), got {tuple(student_hidden.shape)}")
    b, t, d = student_hidden.shape
    check_mask(mask, b, t, "chunked_logit_divergence")

    flat_rows = mask.reshape(-1).nonzero().squeeze(1)  # (N,) indices into the B*T positions
    hidden_rows = student_hidden.reshape(b * t, d).index_select(0, flat_rows)  # (N, d): small, kept for backward

    if isinstance(teacher_logits, Tensor):
        if teacher_logits.dim() != 3 or teacher_logits.shape[:2] != (b, t):
            raise ValueError(
                f"chunked_logit_divergence: teacher logits {tuple(teacher_logits.shape)} do not match the hidden "
                f"states' (B, T) = {(b, t)}"
            )
        teacher_flat = teacher_logits.detach().reshape(b * t, -1)  # a view: (B*T, V_T)

        def fetch_teacher(rows: slice) -> Tensor:
            # Indexed inside the chunk (and again on recomputation): no (N, V_T) copy is ever made.
            return teacher_flat.index_select(0, flat_rows[rows])
    else:
        fetch_teacher = teacher_logits

    def chunk_sum(h: Tensor, rows: slice) -> Tensor:
        """(c, d) hidden rows -> float32 scalar: the divergence summed over this chunk."""
        student = output_layer(h)  # (c, V_S): the only V-wide student tensor, one chunk at a time
        with torch.no_grad():
            teacher = fetch_teacher(rows)  # (c, V_T)
        if teacher.dim() != 2 or teacher.shape[0] != h.shape[0]:
            raise ValueError(
                f"teacher logits for rows {rows} have shape {tuple(teacher.shape)}, expected ({h.shape[0]}, V)"
            )
        return logit_divergence_rows(
            student, teacher, kind=kind, temperature=temperature, beta=beta, alpha=alpha, teacher_topk=teacher_topk
        ).sum()

    return _sum_over_chunks(chunk_sum, hidden_rows, chunk_size)


def _check_chunk_size(chunk_size: int) -> None:
    if not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1):
        # The config checks it for the user (ge=1); here it would make range() loop forever or not at all.
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def _sum_over_chunks(chunk_sum: Callable[[Tensor, slice], Tensor], hidden_rows: Tensor, chunk_size: int) -> Tensor:
    """Add ``chunk_sum(rows of hidden_rows, rows)`` over chunks, all but the last recomputed in backward (module doc)."""
    n = hidden_rows.shape[0]
    recompute = torch.is_grad_enabled()  # under no_grad (evaluation) nothing is kept anyway
    total: Tensor | None = None
    # With N = 0 one empty chunk still runs: the output layer then receives zero gradients (not None),
    # exactly as when the plain loss is computed on output_layer(hidden).
    for start in range(0, max(n, 1), chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        h = hidden_rows[rows]  # (c, d) view
        # The last chunk keeps its activations: backward starts with it, right after this forward, so they
        # never coexist with another chunk's. Only the earlier chunks are recomputed, and a single chunk
        # (short batches) costs no recomputation at all.
        last = rows.stop >= n
        # Non-reentrant checkpoint: gradients also reach parameters the callable closes over, and the
        # slice passes through as a plain argument.
        if recompute and not last:
            part = checkpoint(chunk_sum, h, rows, use_reentrant=False)
        else:
            part = chunk_sum(h, rows)
        total = part if total is None else total + part
    assert total is not None
    return total


def chunked_cross_entropy(
    hidden: Tensor,
    output_layer: nn.Module | Callable[[Tensor], Tensor],
    targets: Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = -100,
) -> Tensor:
    """Summed next-token cross-entropy ``sum CE(output_layer(hidden), targets)`` without the full logits.

    Args:
        hidden: (B, T, d) last hidden states; gradients flow to it and to the output layer.
        output_layer: (c, d) -> (c, V) logits, called once per chunk in forward and again in backward
            (all chunks but the last).
        targets: (B, T) long, the token each position predicts (already shifted), ``ignore_index`` = none.
        chunk_size: rows per chunk.

    Returns:
        float32 scalar: the SUM over positions with a target (litgpt's chunked_cross_entropy normalises
        inside; here the loop divides once by the global count). No target gives exactly 0.
    """
    _check_chunk_size(chunk_size)
    b, t, d = hidden.shape
    if targets.shape != (b, t):
        raise ValueError(f"chunked_cross_entropy: targets {tuple(targets.shape)} do not match hidden {(b, t)}")
    flat_rows = (targets != ignore_index).reshape(-1).nonzero().squeeze(1)  # (N,)
    hidden_rows = hidden.reshape(b * t, d).index_select(0, flat_rows)  # (N, d)
    wanted = targets.reshape(-1).index_select(0, flat_rows)  # (N,)

    def chunk_sum(h: Tensor, rows: slice) -> Tensor:
        logits = output_layer(h).float()  # (c, V)
        return F.cross_entropy(logits, wanted[rows], reduction="sum")

    return _sum_over_chunks(chunk_sum, hidden_rows, chunk_size)
