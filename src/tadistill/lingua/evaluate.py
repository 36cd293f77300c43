"""What a compressed prompt keeps, measured with a causal LM on held-out text (the task-agnostic view of
LLMLingua-2's question: can the LLM still do with the compressed prompt what it did with the full one?).

Each example is a run of consecutive held-out paragraphs (the corpus tail that annotation never reads): a prompt
of at most ``prompt_tokens`` LM tokens cut at a sentence end, then the next ``continuation_tokens`` tokens. The
measure is the LM's mean next-token loss on the continuation given

- the full prompt (the reference), no prompt at all (what the prompt is worth), and
- the prompt compressed to the share r of its words by each selector, the same number of words for all three:
  ``lingua`` (the trained compressor), ``random`` (words dropped uniformly, a seeded generator per example and
  rate) and ``self-info`` (the LM's own surprisal of each word given the words before it, sum over its tokens,
  highest kept: the selective-context idea behind LLMLingua-1, Jiang et al. 2023).

Reported per selector and rate: the mean loss, its increase over the full prompt with the standard error of that
paired difference over examples, and the kept information (loss_none - loss_r) / (loss_none - loss_full):
1 when the compressed prompt serves as well as the full one, 0 when it serves no better than no prompt (None
when the LM does no better with the full prompt than without: then the LM cannot tell what a prompt keeps).
With an ``embedder`` (a sentence encoder; the built-in all-MiniLM-L6-v2 by default in ``run_evaluation``), also
the mean cosine between the embeddings of the compressed and the full prompt: what the compression keeps of
the prompt's meaning, whatever the LM makes of it (with the standard error over examples).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tadistill.errors import ConfigError, DataError, ModelError
from tadistill.fileio import atomic_write_text
from tadistill.lingua.annotate import (
    bos_id,
    max_positions,
    split_corpus,
    word_token_ids,
)
from tadistill.lingua.compress import Compressor
from tadistill.lingua.labels import keep_top
from tadistill.lingua.options import EvaluateOptions
from tadistill.lingua.words import NEWLINE, Word, chunk_spans, join_words, split_words

SELECTORS = ("lingua", "random", "self-info")
PLOT_FILE, EMBEDDING_PLOT_FILE = "lingua_eval.png", "lingua_eval_embedding.png"


@dataclass
class Example:
    prompt: list[Word]
    continuation: list[int]  # LM token ids


def build_examples(texts: Sequence[str], tokenizer, *, prompt_tokens: int, continuation_tokens: int,
                   count: int) -> list[Example]:
    """Examples from consecutive ``texts`` (module docstring); a prompt has >= 8 words, a continuation >= 8 tokens."""
    examples, i = [], 0
    while i < len(texts) and len(examples) < count:
        words: list[Word] = []
        ids: list[list[int]] = []
        j = i
        while j < len(texts) and sum(map(len, ids)) < prompt_tokens + continuation_tokens:
            new = split_words(texts[j])
            if words and new:
                new = [Word(NEWLINE, False), *new]
            words += new
            ids += word_token_ids(tokenizer, new)
            j += 1
        spans = chunk_spans(words, [len(x) for x in ids], prompt_tokens) if words else []
        if spans:
            s, e = spans[0]
            following = [t for x in ids[e:] for t in x][:continuation_tokens]
            if e - s >= 8 and len(following) >= 8:
                examples.append(Example(words[s:e], following))
        i = max(j, i + 1)
    return examples


@torch.inference_mode()
def continuation_losses(model, sequences: Sequence[tuple[list[int], list[int]]], *, start_id: int,
                        batch_size: int) -> list[float]:
    """Mean next-token loss of each continuation given its prompt: (prompt ids, continuation ids) pairs."""
    device = next(model.parameters()).device
    out = []
    for b in range(0, len(sequences), batch_size):
        batch = [[start_id, *p, *c] for p, c in sequences[b:b + batch_size]]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
        for row, (p, c) in enumerate(sequences[b:b + batch_size]):
            first = 1 + len(p)  # the continuation's first token; position t - 1 predicts token t
            rows = logits[row, first - 1:first - 1 + len(c)]
            out.append(float(F.cross_entropy(rows, ids[row, first:first + len(c)].to(device))))
    return out


@torch.inference_mode()
def self_information(model, ids: Sequence[Sequence[int]], *, start_id: int) -> list[float]:
    """-log p of each word's tokens given the words before it, summed per word; NaN for a word without tokens."""
    device = next(model.parameters()).device
    flat = [start_id, *[t for word in ids for t in word]]
    logp = torch.log_softmax(model(input_ids=torch.tensor([flat], device=device)).logits[0].float(), dim=-1)
    surprisal = (-logp[:-1].gather(1, torch.tensor(flat[1:], device=device)[:, None])).squeeze(1).tolist()
    scores, position = [], 0
    for word in ids:
        scores.append(sum(surprisal[position:position + len(word)]) if word else math.nan)
        position += len(word)
    return scores


def _summary(name: str, rate: float | None, losses: list[float], full: list[float], none: list[float],
             kept: list[float], ratios: list[float]) -> dict:
    diffs = [a - b for a, b in zip(losses, full)]
    loss, loss_full, loss_none = statistics.fmean(losses), statistics.fmean(full), statistics.fmean(none)
    span = loss_none - loss_full
    return {
        "model": name if rate is None else f"{name} r={rate:g}", "selector": name, "rate": rate,
        "loss": loss, "loss_increase": statistics.fmean(diffs),
        "loss_increase_se": statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None,
        "kept_information": (loss_none - loss) / span if span > 0 else None,
        "words_kept": statistics.fmean(kept), "lm_tokens_ratio": statistics.fmean(ratios),
    }


def evaluate_compression(
    compressor: Compressor, lm, lm_tokenizer, texts: Sequence[str], options: EvaluateOptions | None = None,
    *, progress: Callable[[int, int], None] | None = None, embedder: tuple | None = None,
) -> list[dict]:
    """Result rows: the full prompt, no prompt, then every selector at every rate (module docstring)."""
    options = options or EvaluateOptions()
    positions = max_positions(lm.config)
    if positions is not None and options.prompt_tokens + options.continuation_tokens + 1 > positions:
        raise ConfigError(f"the LM has {positions} positions, fewer than prompt_tokens + continuation_tokens + 1 "
                          f"({options.prompt_tokens} + {options.continuation_tokens} + 1): lower them")
    _, heldout = split_corpus(texts, options.heldout_fraction)
    examples = build_examples(heldout, lm_tokenizer, prompt_tokens=options.prompt_tokens,
                              continuation_tokens=options.continuation_tokens, count=options.examples)
    if not examples:
        raise DataError("the held-out texts give no evaluation example (a prompt of 8+ words and 8+ tokens after "
                        "it): give a larger corpus")
    start = bos_id(lm_tokenizer)
    probabilities = compressor.probabilities([e.prompt for e in examples])
    generator = torch.Generator().manual_seed(options.seed)
    jobs: list[tuple[list[int], list[int]]] = []
    keys: list[tuple[str, float | None, int]] = []  # (selector, rate, example) of each job
    kept: dict[tuple[str, float], list[float]] = {}
    ratios: dict[tuple[str, float], list[float]] = {}
    compressed: dict[tuple[str, float], list[str]] = {}
    for n, (example, lingua) in enumerate(zip(examples, probabilities)):
        ids = word_token_ids(lm_tokenizer, example.prompt)
        full_ids = [t for word in ids for t in word]
        jobs += [(full_ids, example.continuation), ([], example.continuation)]
        keys += [("full prompt", None, n), ("no prompt", None, n)]
        scores = {"lingua": lingua, "self-info": self_information(lm, ids, start_id=start)}
        for rate in options.rates:
            scores["random"] = torch.rand(len(example.prompt), generator=generator).tolist()
            count = max(1, round(rate * len(example.prompt)))
            for name in SELECTORS:
                keep = keep_top(scores[name], count)
                text = join_words(w for w, k in zip(example.prompt, keep) if k)
                prompt_ids = lm_tokenizer(text, add_special_tokens=False)["input_ids"]
                jobs.append((prompt_ids, example.continuation))
                keys.append((name, rate, n))
                kept.setdefault((name, rate), []).append(sum(keep) / len(keep))
                ratios.setdefault((name, rate), []).append(len(full_ids) / max(1, len(prompt_ids)))
                compressed.setdefault((name, rate), []).append(text)
        if progress:
            progress(n + 1, len(examples))
    losses = continuation_losses(lm, jobs, start_id=start, batch_size=options.batch_size)
    by: dict[tuple[str, float | None], list[float]] = {}
    for key, loss in zip(keys, losses):
        by.setdefault(key[:2], []).append(loss)
    full, none = by[("full prompt", None)], by[("no prompt", None)]
    rows = [_summary("full prompt", None, full, full, none, [1.0] * len(full), [1.0] * len(full)),
            _summary("no prompt", None, none, full, none, [0.0] * len(none), [math.inf] * len(none))]
    rows[0]["rate"], rows[1]["rate"] = 1.0, 0.0
    rows[1]["lm_tokens_ratio"] = None
    for rate in options.rates:
        for name in SELECTORS:
            rows.append(_summary(name, rate, by[(name, rate)], full, none, kept[(name, rate)], ratios[(name, rate)]))
    if embedder is not None:
        cosines = _embedding_cosines(embedder, [join_words(e.prompt) for e in examples], compressed)
        rows[0]["embedding_cosine"] = 1.0
        for row in rows[2:]:
            values = cosines[(row["selector"], row["rate"])]
            row["embedding_cosine"] = statistics.fmean(values)
            row["embedding_cosine_se"] = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    for row in rows:
        row["examples"] = len(examples)
    return rows


def _embedding_cosines(embedder: tuple, originals: list[str], compressed: dict[tuple[str, float], list[str]]
                       ) -> dict[tuple[str, float], list[float]]:
    """Per example, the cosine of mean-pooled sentence embeddings, compressed vs original prompt, per (selector,
    rate)."""
    from tadistill.measure.embeddings import sentence_embeddings

    model, tokenizer = embedder
    reference = sentence_embeddings(model, tokenizer, originals)  # (N, d)
    out = {}
    for key, texts in compressed.items():
        emb = sentence_embeddings(model, tokenizer, texts)
        out[key] = F.cosine_similarity(emb, reference, dim=-1).tolist()
    return out


def plot_rates(rows: list[dict], path: str | Path, *, key: str = "loss_increase") -> Path:
    """``key`` against the share of words kept, one line per selector, error bars of its standard error (``key``
    + "_se"): the loss increase over the full prompt (with no prompt as a dashed line) or the embedding cosine."""
    from tadistill.reports.plots import new_figure, save_figure  # the project's Agg figure and atomic PNG writer

    figure, axes = new_figure()
    for name in SELECTORS:
        points = sorted((r["rate"], r[key], r.get(key + "_se") or 0.0) for r in rows
                        if r["selector"] == name and r.get(key) is not None)
        if points:
            xs, ys, es = zip(*points)
            axes.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=name)
    none = next((r for r in rows if r["selector"] == "no prompt"), None)
    if key == "loss_increase":
        if none is not None:
            axes.axhline(none["loss_increase"], linestyle="--", color="grey", label="no prompt")
        axes.axhline(0.0, linestyle=":", color="black", linewidth=0.8)
        axes.set_ylabel("continuation loss - loss with the full prompt (nats)")
        axes.set_title("What the compressed prompt keeps for the LM")
    else:
        axes.set_ylabel("embedding cosine to the full prompt")
        axes.set_title("What the compressed prompt keeps of its meaning")
    axes.set_xlabel("share of prompt words kept")
    axes.legend()
    return save_figure(figure, path)


def run_evaluation(model: str, lm: str, data: str, out: str | Path, options: EvaluateOptions | None = None,
                   *, progress: Callable[[int, int], None] | None = None, text_field: str = "text",
                   embedder: str | None = "builtin") -> dict:
    """Load the compressor, the LM, the sentence encoder (``embedder``; None: no embedding measure) and the
    corpus; write results.json / .csv / .md, summary.json and the plot to ``out``."""
    options = options or EvaluateOptions()
    from tadistill.data.sources import load_texts
    from tadistill.loading import (
        is_causal_lm,
        load_model_config,
        load_pretrained,
        load_tokenizer,
    )
    from tadistill.reports.tables import write_results

    compressor = Compressor.load(model)
    config = load_model_config(lm, what="evaluation LM")
    if not is_causal_lm(config):
        raise ModelError(f"evaluation LM {lm!r} is not a causal LM: pass a GPT-style model, e.g. builtin-gpt2")
    lm_model = load_pretrained(lm, head="causal-lm", what="evaluation LM").eval()
    tokenizer = load_tokenizer(lm, what="evaluation LM")
    encoder = None
    if embedder:
        encoder = (load_pretrained(embedder, what="sentence encoder"), load_tokenizer(embedder, what="sentence encoder"))
    began = time.perf_counter()
    rows = evaluate_compression(compressor, lm_model, tokenizer, load_texts(data, text_field=text_field), options,
                                progress=progress, embedder=encoder)
    out = Path(out)
    headline = ["rate", "words_kept", "lm_tokens_ratio", "loss", "loss_increase", "loss_increase_se",
                "kept_information", *(["embedding_cosine", "embedding_cosine_se"] if embedder else [])]
    paths = write_results(out, rows, teacher_name="full prompt", headline=headline)
    plot = plot_rates(rows, out / PLOT_FILE)
    if embedder:
        plot_rates(rows, out / EMBEDDING_PLOT_FILE, key="embedding_cosine")
    info_path = Path(compressor.model.name_or_path) / "lingua.json"
    trained = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    summary = {"compressor": model, "annotator": trained.get("annotator"), "annotator_teacher": trained.get("teacher"),
               "lm": lm, "embedder": embedder, "data": data, "options": asdict(options), "examples": rows[0]["examples"],
               "seconds": round(time.perf_counter() - began, 1), "files": {**{k: str(v) for k, v in paths.items()},
                                                                           "plot": str(plot)}}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return {"rows": rows, **summary}
