"""Zero-shot retrieval by embedding cosine: the built-in "stdlib-retrieval" task.

A sentence encoder is used, above all, to find the text that matches another one. This task measures
exactly that, with no head trained on top (unlike the linear probe of :mod:`.downstream`, which can
rescue features that a cosine search cannot use):

- the pairs ``(query, document)`` come from :func:`tadistill.data.builtin_tasks.stdlib_retrieval_pairs`
  (a public stdlib name and its parameters -> the first sentence of its docstring; none of them is in
  the distillation corpus);
- evaluation seed ``s`` draws, with a ``torch.Generator`` seeded by ``s``, ``CANDIDATES`` pairs from
  the pool (all of them when the pool is smaller); their documents are the candidates, and the first
  ``QUERIES`` of the draw are the queries, so half the candidates are pure distractors;
- each text is embedded as the mean of the model's last hidden states over its tokens (the pooling of
  sentence-transformers' all-MiniLM-L6-v2, the built-in teacher), and the candidates are ranked by
  cosine similarity to the query;
- accuracy@1 is the fraction of queries whose own document ranks first, MRR the mean of 1 / rank.
  Ties count against the query (rank = 1 + candidates scoring at least as high), so a collapsed model
  that embeds every text alike scores 0, not 1. Chance: accuracy@1 = 1 / 1000, MRR ~= 0.0075.

The seeds change which pairs are drawn: their spread is the sampling noise of the test set. Every
model sees the same draws for the same seed, so two models' difference is less noisy than that spread.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadistill.errors import ConfigError, DataError

RETRIEVAL_TASKS = ("stdlib-retrieval",)
METRICS = ("acc@1", "mrr")  # the first is the headline
CANDIDATES = 1000
QUERIES = 500
MIN_POOL = 100  # below this a score says little: an old or stripped Python installation


def ranks(queries: Tensor, documents: Tensor) -> Tensor:
    """Rank (1 = best) of each query's own document among all documents, by cosine similarity.

    Args:
        queries: (Q, d) embeddings; query i belongs to document i.
        documents: (N, d) embeddings, N >= Q.

    Returns:
        (Q,) int64 ranks in 1..N: 1 + the number of OTHER documents whose cosine is >= the gold one's
        (ties count against the query).
    """
    if queries.dim() != 2 or documents.dim() != 2 or queries.shape[1] != documents.shape[1]:
        raise ValueError(f"ranks: queries {tuple(queries.shape)} and documents {tuple(documents.shape)} "
                         "must be (Q, d) and (N, d)")
    q_count = queries.shape[0]
    if q_count > documents.shape[0]:
        raise ValueError(f"ranks: {q_count} queries but only {documents.shape[0]} documents")
    sim = F.normalize(queries.float(), dim=-1) @ F.normalize(documents.float(), dim=-1).T  # (Q, N)
    idx = torch.arange(q_count, device=sim.device)
    gold = sim[idx, idx]  # (Q,)
    at_least = (sim >= gold[:, None]).sum(dim=1)  # includes the gold document itself
    return at_least.long()


def ranking_metrics(rank: Tensor) -> dict[str, float]:
    """accuracy@1 and mean reciprocal rank of (Q,) ranks."""
    rank = rank.float()
    return {"acc@1": float((rank == 1).float().mean()), "mrr": float((1.0 / rank).mean())}


def draw(pool_size: int, seed: int) -> tuple[list[int], int]:
    """(indices of the candidate pairs, number of queries) for evaluation seed ``seed``.

    The first ``n_queries`` indices are the queries. Deterministic: a CPU generator seeded by ``seed``.
    """
    if pool_size < MIN_POOL:
        raise DataError(f"stdlib-retrieval found only {pool_size} pairs (at least {MIN_POOL} needed): this Python "
                        "installation's standard library is too small; leave the task out")
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(pool_size, generator=generator)[:CANDIDATES].tolist()
    return picked, min(QUERIES, len(picked) // 2)


def retrieval_scores(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], *,
                     seeds: Sequence[int] = (0, 1, 2), max_length: int = 128,
                     batch_size: int = 64) -> dict[str, tuple[float, float]]:
    """Score ``model`` on ``pairs`` ``(query, document)``: ``{metric: (mean, std over seeds)}``.

    Sample std (ddof = 1), 0.0 for one seed; see :func:`retrieval_runs`.
    """
    runs = retrieval_runs(model, tokenizer, pairs, seeds=seeds, max_length=max_length, batch_size=batch_size)
    out = {}
    for metric in METRICS:
        values = [run[metric] for run in runs]
        out[metric] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def retrieval_runs(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], *,
                   seeds: Sequence[int] = (0, 1, 2), max_length: int = 128,
                   batch_size: int = 64) -> list[dict[str, float]]:
    """``{metric: value}`` of each seed's draw, in seed order (for paired differences of two models).

    Every text the seeds draw is embedded once, on the model's device. The tokenizer must pad
    (GPT-2's: set ``pad_token`` first).
    """
    from tadistill.measure.embeddings import sentence_embeddings

    seeds = tuple(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ConfigError(f"seeds must be a non-empty list of integers, got {list(seeds)!r}")
    draws = [draw(len(pairs), s) for s in seeds]
    used = sorted({i for picked, _ in draws for i in picked})
    where = {pool_index: row for row, pool_index in enumerate(used)}
    # Eval mode inside, the caller's mode restored after; (U, d) float32 on the CPU.
    q_emb = sentence_embeddings(model, tokenizer, [pairs[i][0] for i in used], max_length=max_length,
                                batch_size=batch_size)
    d_emb = sentence_embeddings(model, tokenizer, [pairs[i][1] for i in used], max_length=max_length,
                                batch_size=batch_size)
    runs = []
    for picked, n_queries in draws:
        rows = torch.tensor([where[i] for i in picked], device=q_emb.device)
        runs.append(ranking_metrics(ranks(q_emb[rows[:n_queries]], d_emb[rows])))
    return runs


def load_retrieval_pairs(task: str) -> list[tuple[str, str]]:
    """The pool of a retrieval task by name (only the built-in one exists)."""
    if task.lower() != "stdlib-retrieval":
        raise ConfigError(f"unknown retrieval task {task!r}: use one of {', '.join(RETRIEVAL_TASKS)}")
    from tadistill.data.builtin_tasks import stdlib_retrieval_pairs

    return stdlib_retrieval_pairs()


def evaluate_retrieval(model_path: str, task: str, *, seeds: Sequence[int] = (0, 1, 2), max_length: int = 128,
                       device=None, trust_remote_code: bool = False) -> dict:
    """Load the model (base, no head) and its tokenizer from ``model_path`` and score it on ``task``.

    Returns the same shape as :func:`tadistill.evaluation.downstream.evaluate_task`: ``{"task", "mode":
    "retrieval", "metrics": {metric: {"mean", "std"}}, "headline", "seeds", "train_size": 0,
    "eval_size": queries per seed}``.
    """
    from tadistill.loading import load_pretrained, load_tokenizer

    pairs = load_retrieval_pairs(task)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # GPT-2: batches need a padding token; padded positions are masked out
        import copy

        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    model = load_pretrained(model_path, head="base", trust_remote_code=trust_remote_code, what="model")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scores = retrieval_scores(model.to(device).eval(), tokenizer, pairs, seeds=seeds, max_length=max_length)
    return {
        "task": task.lower(),
        "mode": "retrieval",
        "metrics": {m: {"mean": mean, "std": std} for m, (mean, std) in scores.items()},
        "headline": METRICS[0],
        "seeds": list(seeds),
        "train_size": 0,
        "eval_size": draw(len(pairs), 0)[1],
    }
