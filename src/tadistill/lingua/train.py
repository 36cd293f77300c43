"""Training the compressor: keep / drop token classification on a bidirectional encoder (LLMLingua-2, sec. 3.4).

The student of the pipeline is the encoder's body with a linear head, p_keep = softmax(W h + b)[1], trained with
cross-entropy on the annotated labels (the paper: XLM-R large or mBERT; here any encoder, the built-in MiniLM by
default). Every sub-token of a word carries the word's label (``label_subtokens="all"``, the default) because
compression scores a word by the *mean* of its tokens' probabilities: a token never trained would pull that mean
toward whatever the fresh head says. ``"first"`` (the usual NER convention) is there to compare.

Samples longer than the encoder's positions are cut at sentence ends, as compression cuts its input. The tail
of the samples (corpus order) is held out: the report scores the classifier there at its initialisation and
after training, by word accuracy at p_keep > 0.5 and by the F1 of keep labels when each chunk keeps as many
words as its annotation did (what compression at that rate would keep), next to the all-keep baseline.

The result is a standard Hugging Face checkpoint, written to a temporary folder and renamed into place:
``AutoModelForTokenClassification.from_pretrained(out)`` loads it, with ``id2label`` {0: drop, 1: keep}.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from tadistill.errors import ConfigError, ModelError
from tadistill.fileio import apply_umask, atomic_write_text
from tadistill.lingua.annotate import read_samples
from tadistill.lingua.compress import Compressor
from tadistill.lingua.labels import keep_top
from tadistill.lingua.options import TrainOptions
from tadistill.lingua.words import Word, chunk_spans

INFO_FILE = "lingua.json"
IGNORE = -100  # transformers' ignored label


def token_labels(word_ids: Sequence[int | None], word_labels: Sequence[int], mode: str = "all") -> list[int]:
    """The label of each token: its word's label ("all"), or only on a word's first token ("first"); -100 for
    special tokens, padding and (in "first") later sub-tokens."""
    out, previous = [], None
    for w in word_ids:
        if w is None or (mode == "first" and w == previous):
            out.append(IGNORE)
        else:
            out.append(int(word_labels[w]))
        previous = w
    return out


def fit_samples(samples: Sequence[dict], count_tokens: Callable[[list[Word]], list[int]],
                max_tokens: int) -> list[tuple[list[Word], list[int]]]:
    """(words, labels) pieces of every sample that fit ``max_tokens`` encoder tokens, cut at sentence ends."""
    pieces = []
    for sample in samples:
        words = [Word(t, s) for t, s in zip(sample["words"], sample["spaces"])]
        labels = list(sample["labels"])
        for s, e in chunk_spans(words, count_tokens(words), max_tokens):
            pieces.append((words[s:e], labels[s:e]))
    return pieces


def body_with_head(encoder: str, *, seed: int):
    """A *ForTokenClassification model of the encoder's architecture: its pretrained body, a fresh 2-way head."""
    from transformers import AutoModelForTokenClassification

    from tadistill.loading import load_pretrained

    base = load_pretrained(encoder, head="base", what="encoder")
    config = base.config
    config.num_labels = 2
    config.id2label, config.label2id = {0: "drop", 1: "keep"}, {"drop": 0, "keep": 1}
    with torch.random.fork_rng(devices=[]):  # the head's initialisation draws from a seeded, private stream
        torch.manual_seed(seed)
        try:
            model = AutoModelForTokenClassification.from_config(config)
        except ValueError as exc:
            raise ModelError(f"encoder {encoder!r} has no token-classification model class in transformers "
                             f"({str(exc).splitlines()[0][:120]}): use an encoder such as BERT or XLM-R") from None
    missing, _unexpected = model.base_model.load_state_dict(base.state_dict(), strict=False)  # pooler: unexpected
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ModelError(f"encoder {encoder!r}: its body does not fit the token classifier ({len(missing)} weights "
                         f"missing, e.g. {missing[0]})")
    return model


def _batch(tokenizer, pieces, mode: str, max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer([[w.text for w in words] for words, _ in pieces], is_split_into_words=True, truncation=True,
                    max_length=max_length, padding=True, return_tensors="pt")
    labels = [token_labels(enc.word_ids(i), labels, mode) for i, (_, labels) in enumerate(pieces)]
    inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    return {**inputs, "labels": torch.tensor(labels)}


def heldout_scores(compressor: Compressor, pieces, *, batch_size: int | None = None) -> dict[str, float]:
    """Word accuracy at p_keep > 0.5, F1 of "keep" at the annotation's own rate, and the all-keep F1 baseline."""
    probs = compressor.probabilities([words for words, _ in pieces], batch_size=batch_size)
    right = total = tp = fp = fn = positives = 0
    for p, (_, labels) in zip(probs, pieces):
        ranked = keep_top(p, sum(labels))
        for prob, keep, label in zip(p, ranked, labels):
            right += int((prob > 0.5) == bool(label)) if not math.isnan(prob) else 0
            total += 1
            tp += keep and label
            fp += keep and not label
            fn += (not keep) and label
            positives += label
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    baseline = 2 * positives / (positives + total) if total else 0.0  # keep everything: precision = keep share
    return {"word_accuracy": right / total if total else math.nan, "keep_f1_at_rate": f1, "all_keep_f1": baseline}


def train_compressor(
    data: str | Path, out: str | Path, *, encoder: str = "builtin", options: TrainOptions | None = None,
    overwrite: bool = False, progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Train a keep / drop classifier on annotation folder ``data``; write it to ``out``; return its report."""
    options = options or TrainOptions()
    from tadistill.evaluation.token_encoding import adamw_with_warmup
    from tadistill.loading import load_tokenizer

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty: choose another --out or pass --overwrite")
        if not (out / INFO_FILE).is_file():
            raise ConfigError(f"{out} is not a compressor folder (no {INFO_FILE}): it is never deleted; choose "
                              "another --out")
    samples, stats = read_samples(data)
    tokenizer = load_tokenizer(encoder, what="encoder")
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"encoder {encoder!r} has no fast tokenizer: words are mapped to tokens through one")
    model = body_with_head(encoder, seed=options.seed)
    compressor = Compressor(model, tokenizer)
    max_length = compressor.chunk_tokens + tokenizer.num_special_tokens_to_add()
    cut = len(samples) - math.ceil(len(samples) * options.heldout_fraction)
    train_pieces = fit_samples(samples[:cut], compressor.token_counts, compressor.chunk_tokens)
    heldout = fit_samples(samples[cut:], compressor.token_counts, compressor.chunk_tokens)
    if not train_pieces:
        raise ConfigError(f"{data} leaves no sample to train on after the held-out {options.heldout_fraction}: "
                          "annotate more chunks")

    began = time.perf_counter()
    model.eval()
    initial = heldout_scores(compressor, heldout) if heldout else {}
    optimizer, scheduler = adamw_with_warmup(model, lr=options.lr, weight_decay=options.weight_decay,
                                             total_steps=options.steps, warmup_ratio=options.warmup_ratio)
    generator = torch.Generator().manual_seed(options.seed)
    order: list[int] = []
    losses = []
    model.train()
    for step in range(options.steps):
        if len(order) < options.batch_size:  # a new pass over the pieces in a fresh seeded order
            order += torch.randperm(len(train_pieces), generator=generator).tolist()
        picked, order = order[:options.batch_size], order[options.batch_size:]
        batch = _batch(tokenizer, [train_pieces[i] for i in picked], options.label_subtokens, max_length)
        loss = model(**batch).loss  # mean cross-entropy over the labelled tokens of the batch
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if progress:
            progress(step + 1, options.steps, losses[-1])
    model.eval()
    final = heldout_scores(compressor, heldout) if heldout else {}
    report = {
        "format": "tadistill-lingua-compressor/1", "encoder": encoder, "data": str(data),
        "annotator": stats.get("annotator"), "teacher": stats.get("teacher"), "options": asdict(options),
        "train_pieces": len(train_pieces), "heldout_pieces": len(heldout),
        "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "heldout_initial": initial, "heldout_final": final, "train_seconds": round(time.perf_counter() - began, 1),
    }
    _save(model, tokenizer, out, report)
    return report


def _save(model, tokenizer, out: Path, report: dict) -> None:
    """save_pretrained + tokenizer + lingua.json into a temporary folder, then one rename: never half a model."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    atomic_write_text(tmp / INFO_FILE, json.dumps(report, indent=2) + "\n")
    apply_umask(tmp)  # safetensors creates its files 0600
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
