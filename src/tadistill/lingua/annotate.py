"""Annotation: a causal teacher decides which words of each corpus chunk can go; the labels become a dataset.

Two annotators write the same dataset:

- ``instruction`` (LLMLingua-2, Pan et al. 2024, sec. 3.1-3.2): an instruction-tuned LLM compresses each chunk
  by deleting words only, greedy decoding, with an instruction that states the paper's constraints (only remove
  unimportant words, never reorder, change, abbreviate or add; compress as far as possible while keeping the
  information); its output is matched back to the original words (``labels.match_labels``). Any local causal LM
  works; a base model gives the plumbing, an instruction-tuned one the paper's setting.
- ``information``: for a causal teacher that cannot follow instructions (``builtin-gpt2``). A word's score is
  how much deleting it raises the teacher's loss on the text from the word on, in nats:
  score_i = sum_{t in w_i} -log p(x_t | C_i, w_i<t)                                    (own_information)
          + sum_{t in F_i} [ -log p(x_t | C_i, F_i<t) + log p(x_t | C_i, w_i, F_i<t) ],
  with w_i the word's tokens, C_i every token before it in its chunk and F_i up to ``follow_tokens`` tokens
  after it: what the word says itself (its surprisal, lost with it) plus what it tells about what follows.
  The with-word terms come from one forward pass over the whole chunk; the without-word term from the chunk
  with w_i cut out (one sequence per word, batched). The top ``keep_fraction`` of each chunk's words are kept.
  Without its first term (``own_information=False``) the score ranks words by their effect on the next tokens
  only; with a teacher as small as builtin-gpt2 that favours short function words, and a compressor trained on
  it kept less of the prompt than random dropping (README, Prompt compression). A word with no tokens or
  nothing after it in its chunk gets the chunk's median score for the second term.

Both label the words of chunks of at most ``chunk_tokens`` teacher tokens cut at sentence ends (sec. 3.2),
attach the variation rate and alignment gap, and filter the worst (``labels.quality_filter``). The corpus
is split before anything is read: annotation uses the head, ``lingua evaluate`` the held-out tail.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from tadistill.errors import ConfigError, DataError, ModelError
from tadistill.fileio import apply_umask, atomic_write_text
from tadistill.lingua.labels import (
    alignment_gap,
    keep_top,
    label_sample,
    quality_filter,
    variation_rate,
)
from tadistill.lingua.options import HELDOUT_FRACTION, AnnotateOptions
from tadistill.lingua.words import (
    Word,
    corpus_chunks,
    join_words,
    split_words,
    word_texts,
)

FORMAT = "tadistill-lingua-annotations/1"
SAMPLES_FILE, STATS_FILE = "samples.jsonl", "stats.json"


def split_corpus(texts: Sequence[str], heldout_fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """(head, tail): the last ``heldout_fraction`` of the texts, in corpus order, is held out.

    A contiguous tail rather than a random sample: the built-in corpus is ordered by source file, so the tail
    is other modules' documentation, and consecutive held-out paragraphs still belong together (evaluation
    prompts are runs of them).
    """
    cut = len(texts) - math.ceil(len(texts) * heldout_fraction)
    return list(texts[:cut]), list(texts[cut:])


def word_token_ids(tokenizer, words: Sequence[Word]) -> list[list[int]]:
    """The teacher's token ids of each word, encoded with its leading space (BPE tokens carry it), no specials."""
    if not words:
        return []
    pieces = [(" " if w.space else "") + w.text for w in words]
    return [list(ids) for ids in tokenizer(pieces, add_special_tokens=False)["input_ids"]]


def max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def bos_id(tokenizer) -> int:
    for value in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if value is not None:
            return int(value)
    return 0


# ------------------------------------------------------------------------------------------- the information annotator


@torch.inference_mode()
def information_scores(
    model, ids: Sequence[Sequence[int]], *, start_id: int, follow_tokens: int, batch_size: int,
    own_information: bool = True,
) -> list[float]:
    """score_i of every word of one chunk (module docstring). The follow term is NaN for a word with no tokens or
    nothing after it; it is replaced by the median of the others' (0 when there are none) before the word's own
    surprisal is added.

    ``ids[i]``: the token ids of word i. The chunk is opened with ``start_id``; the sequences without a word are
    right-padded and run ``batch_size`` at a time.
    """
    device = next(model.parameters()).device
    flat = [start_id, *[t for word in ids for t in word]]
    starts, position = [], 1
    for word in ids:
        starts.append(position)
        position += len(word)
    logits = model(input_ids=torch.tensor([flat], device=device)).logits[0].float()  # (T, V)
    # nll_with[t]: -log p(token t | tokens < t) in the whole chunk (t >= 1).
    nll_with = F.cross_entropy(logits[:-1], torch.tensor(flat[1:], device=device), reduction="none").tolist()
    nll_with = [0.0, *nll_with]
    jobs = []  # (word, sequence without it, index of its first F token, F length)
    for i, word in enumerate(ids):
        s, e = starts[i], starts[i] + len(word)
        follow = flat[e:e + follow_tokens]
        if word and follow:
            jobs.append((i, [*flat[:s], *follow], s, len(follow)))
    nll_without = _follow_losses(model, jobs, batch_size)
    follow = [math.nan] * len(ids)
    for (word, _, _, n), without in zip(jobs, nll_without):
        e = starts[word] + len(ids[word])
        follow[word] = without - sum(nll_with[e:e + n])  # loss of F without the word minus with it
    finite = [f for f in follow if math.isfinite(f)]
    fill = statistics.median(finite) if finite else 0.0
    scores = []
    for i, word in enumerate(ids):
        own = sum(nll_with[starts[i]:starts[i] + len(word)]) if own_information else 0.0
        scores.append(own + (follow[i] if math.isfinite(follow[i]) else fill))
    return scores


def _follow_losses(model, jobs, batch_size: int) -> list[float]:
    """Summed next-token NLL of each job's F tokens (float32)."""
    device = next(model.parameters()).device
    out: list[float] = []
    for b in range(0, len(jobs), batch_size):
        batch = jobs[b:b + batch_size]
        width = max(len(j[1]) for j in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (_, seq, _, _) in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
        for row, (_, _, first, n) in enumerate(batch):
            # Position t - 1 predicts token t: the F tokens are seq[first : first + n].
            rows = logits[row, first - 1:first - 1 + n]  # (n, V)
            out.append(float(F.cross_entropy(rows, ids[row, first:first + n].to(device), reduction="sum")))
    return out


def information_labels(scores: Sequence[float], keep_fraction: float) -> list[bool]:
    """The top ``keep_fraction`` of the words by score (NaN: the chunk's median), at least one word."""
    finite = [s for s in scores if math.isfinite(s)]
    fill = statistics.median(finite) if finite else 0.0
    filled = [s if math.isfinite(s) else fill for s in scores]
    return keep_top(filled, max(1, round(keep_fraction * len(scores))) if scores else 0)


# ------------------------------------------------------------------------------------------- the instruction annotator


def build_prompt(tokenizer, instruction: str, text: str) -> str:
    """The instruction around ``text``, in the teacher's chat template when it has one."""
    content = instruction.replace("{text}", text)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return content


@torch.inference_mode()
def generate_compressions(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: Sequence[int]) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batch), decoded without special tokens, stripped.

    ``max_new_tokens[i]``: the cap for prompt i; a batch generates up to the largest cap and each output is cut
    to its own (a compression never needs more tokens than its chunk).
    """
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos_id(tokenizer)
    output = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                            do_sample=False, max_new_tokens=max(max_new_tokens), pad_token_id=pad)
    width = enc["input_ids"].shape[1]
    texts = []
    for row, cap in enumerate(max_new_tokens):
        new = output[row, width:width + cap]
        texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return texts


# ------------------------------------------------------------------------------------------- the dataset


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty: choose another --out or pass --overwrite")
        if not (out / STATS_FILE).is_file():
            raise ConfigError(f"{out} is not a lingua annotation folder (no {STATS_FILE}): it is never deleted; "
                              "choose another --out")


def _resolve_annotator(choice: str, tokenizer) -> str:
    if choice != "auto":
        return choice
    return "instruction" if getattr(tokenizer, "chat_template", None) else "information"


def annotate(
    teacher: str, data: str, out: str | Path, options: AnnotateOptions | None = None, *,
    overwrite: bool = False, progress: Callable[[int, int], None] | None = None, text_field: str = "text",
) -> dict:
    """Annotate up to ``options.max_chunks`` chunks of corpus ``data`` with causal LM ``teacher``; write
    ``out/samples.jsonl`` (every chunk, its words, labels, measures and filter verdict) and ``out/stats.json``.

    Returns the statistics. Raises ConfigError / ModelError / DataError (one line).
    """
    from tadistill.data.sources import load_texts
    from tadistill.loading import (
        is_causal_lm,
        load_model_config,
        load_pretrained,
        load_tokenizer,
    )

    options = options or AnnotateOptions()
    out = Path(out)
    _prepare_out(out, overwrite)
    what = "annotator teacher"
    config = load_model_config(teacher, what=what)
    if not is_causal_lm(config):
        raise ModelError(f"{what} {teacher!r} is not a causal LM ({getattr(config, 'model_type', '?')}): annotate "
                         "with a GPT-style model, e.g. builtin-gpt2 or a local instruction-tuned LLM")
    tokenizer = load_tokenizer(teacher, what=what)
    kind = _resolve_annotator(options.annotator, tokenizer)
    model = load_pretrained(teacher, head="causal-lm", what=what).eval()
    texts, _ = split_corpus(load_texts(data, text_field=text_field), options.heldout_fraction)
    if not texts:
        raise DataError(f"corpus {data!r} leaves no text to annotate after the held-out tail: give more text")

    limit = max_positions(config) or options.chunk_tokens + 1
    if kind == "information":
        chunk_tokens = min(options.chunk_tokens, limit - 1)  # one position for the start token
    else:
        overhead = len(tokenizer(build_prompt(tokenizer, options.instruction, ""), add_special_tokens=False)
                       ["input_ids"])
        chunk_tokens = min(options.chunk_tokens, (limit - overhead) // 2)  # the chunk and its compression
        if chunk_tokens < 8:
            raise ConfigError(f"{what} {teacher!r} has {limit} positions, too few for the instruction "
                              f"({overhead} tokens) and a chunk: use --annotator information or a longer-context LLM")

    def count(words: list[Word]) -> list[int]:
        return [len(ids) for ids in word_token_ids(tokenizer, words)]

    began = time.perf_counter()
    chunks = []
    for chunk in corpus_chunks(texts, count, chunk_tokens, min_words=4):
        chunks.append(chunk)
        if len(chunks) >= options.max_chunks:
            break
    if not chunks:
        raise DataError(f"corpus {data!r} gave no chunk of at least 4 words to annotate: give more text")

    records = []
    if kind == "information":
        for n, chunk in enumerate(chunks):
            ids = word_token_ids(tokenizer, chunk)
            scores = information_scores(model, ids, start_id=bos_id(tokenizer), follow_tokens=options.follow_tokens,
                                        batch_size=options.batch_size, own_information=options.own_information)
            labels = information_labels(scores, options.keep_fraction)
            records.append(_record(chunk, labels, scores=scores))
            if progress:
                progress(n + 1, len(chunks))
    else:
        for b in range(0, len(chunks), options.batch_size):
            batch = chunks[b:b + options.batch_size]
            prompts = [build_prompt(tokenizer, options.instruction, join_words(c)) for c in batch]
            caps = [sum(count(c)) + 8 for c in batch]
            for chunk, compressed in zip(batch, generate_compressions(model, tokenizer, prompts, max_new_tokens=caps)):
                labelled = label_sample(word_texts(chunk), word_texts(split_words(compressed)), window=options.window)
                records.append(_record(chunk, labelled.labels, compressed=compressed, labelled=labelled))
            if progress:
                progress(min(b + options.batch_size, len(chunks)), len(chunks))

    usable = [r for r in records if not r["filtered"]]
    verdicts = quality_filter([r["variation_rate"] for r in usable], [r["alignment_gap"] for r in usable],
                              variation_top=options.variation_top, gap_top=options.gap_top)
    for record, verdict in zip(usable, verdicts):
        record["filtered"] = verdict
    stats = _statistics(records, teacher=teacher, data=data, kind=kind, options=options, chunk_tokens=chunk_tokens,
                        seconds=time.perf_counter() - began)
    if stats["samples"] == 0:
        raise DataError(f"every one of the {len(records)} annotated chunks was filtered out "
                        f"({stats['filtered']}): check the teacher's outputs or use --annotator information")
    _write(out, records, stats)
    return stats


def _record(chunk: list[Word], labels: list[bool], *, scores: list[float] | None = None, compressed: str | None = None,
            labelled=None) -> dict:
    words = word_texts(chunk)
    if compressed is None:  # labels straight from scores: the kept words are known, no re-splitting of the text
        compressed = join_words(w for w, keep in zip(chunk, labels) if keep)
        kept = [w for w, keep in zip(words, labels) if keep]
    else:
        kept = word_texts(split_words(compressed))
    record = {
        "words": words,
        "spaces": [w.space for w in chunk],
        "labels": [int(x) for x in labels],
        "compressed": compressed,
        "variation_rate": labelled.variation_rate if labelled else variation_rate(words, kept),
        "alignment_gap": labelled.alignment_gap if labelled else alignment_gap(words, kept, labels),
        "unmatched": labelled.unmatched if labelled else 0,
        "filtered": labelled.problem if labelled else None,
    }
    if scores is not None:
        record["scores"] = [round(s, 5) if math.isfinite(s) else None for s in scores]
    return record


def _statistics(records: list[dict], *, teacher: str, data: str, kind: str, options: AnnotateOptions,
                chunk_tokens: int, seconds: float) -> dict:
    kept = [r for r in records if not r["filtered"]]
    reasons: dict[str, int] = {}
    for r in records:
        if r["filtered"]:
            reasons[r["filtered"]] = reasons.get(r["filtered"], 0) + 1
    words = sum(len(r["words"]) for r in kept)

    def mean(key: str) -> float | None:
        return statistics.fmean(r[key] for r in records) if records else None

    return {
        "format": FORMAT, "annotator": kind, "teacher": teacher, "data": data, "chunks": len(records),
        "samples": len(kept), "filtered": reasons, "words": words,
        "keep_rate": sum(sum(r["labels"]) for r in kept) / words if words else None,
        "variation_rate_mean": mean("variation_rate"), "alignment_gap_mean": mean("alignment_gap"),
        "chunk_tokens": chunk_tokens, "seconds": round(seconds, 1), "options": asdict(options),
    }


def _write(out: Path, records: list[dict], stats: dict) -> None:
    """Write into a sibling temporary folder, then rename it into place: never half a dataset."""
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_write_text(tmp / SAMPLES_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_text(tmp / STATS_FILE, json.dumps(stats, indent=2) + "\n")
    apply_umask(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def read_samples(folder: str | Path) -> tuple[list[dict], dict]:
    """The kept (unfiltered) samples and the statistics of an annotation folder; DataError when it is not one."""
    folder = Path(folder)
    stats_path, samples_path = folder / STATS_FILE, folder / SAMPLES_FILE
    if not stats_path.is_file() or not samples_path.is_file():
        raise DataError(f"{folder} is not a lingua annotation folder (no {STATS_FILE} / {SAMPLES_FILE}): "
                        "write one with 'tadistill lingua annotate'")
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
        records = [json.loads(line) for line in samples_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder} holds a damaged annotation ({type(exc).__name__}): annotate again") from None
    if not isinstance(stats, dict) or stats.get("format") != FORMAT:
        raise DataError(f"{folder} holds annotations of another format: annotate again")
    samples = [r for r in records if not r.get("filtered")]
    if not samples:
        raise DataError(f"{folder} holds no usable sample (all filtered): annotate more chunks")
    return samples, stats
