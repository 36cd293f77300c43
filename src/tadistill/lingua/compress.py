"""Compression with a trained token classifier (LLMLingua-2, Pan et al. 2024, sec. 3.4 and 4).

The encoder gives every token p_keep = softmax(W h + b)[1]; a word's probability is the mean of its tokens'.
Each chunk (at most the encoder's positions, cut at sentence ends) keeps round(r n) of its n words, those with
the highest probabilities (the words above the (1 - r) percentile of the chunk, by rank, so ties cannot add
words: ``labels.keep_top``). Force tokens (words equal to one of them, e.g. a newline or "?") and, on request,
words with a digit are always kept, and count toward the rate. A token budget (``target_tokens``) replaces the
rate: each chunk gets its share of the budget in proportion to its tokens and keeps words in the same order
while they fit. Token counts are the compressor's tokenizer's (no special tokens).

Long inputs are cut into chunks and run ``batch_size`` chunks at a time, so memory stays that of one batch
whatever the length. The default batch is 32 chunks on a GPU and 1 on a CPU: on 2 CPU cores with one torch
thread one chunk at a time was faster in each of 5 alternating repeats (1,657 words/s against 1,417 at batch 32,
``benchmarks/lingua_speed.py``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tadistill.errors import ConfigError, DataError, ModelError
from tadistill.lingua.labels import keep_top
from tadistill.lingua.options import DEFAULT_RATE, check_rate, check_target_tokens
from tadistill.lingua.words import Word, chunk_spans, join_words, split_words

MAX_CHUNK_TOKENS = 512  # the paper's chunk size; a smaller model context lowers it


@dataclass(frozen=True)
class Compression:
    """A compressed text and what it cost: token counts of the compressor's tokenizer, ratio original / compressed."""

    text: str
    original_tokens: int
    compressed_tokens: int
    ratio: float
    words: int
    kept_words: int

    def to_dict(self) -> dict:
        return asdict(self)


def parse_force_tokens(spec: str) -> list[str]:
    """'\\n,?' -> [newline, '?']: comma-separated, '\\n' and '\\t' written as escapes, ',,' stands for a comma."""
    tokens = [t.replace("\\n", "\n").replace("\\t", "\t") for t in spec.split(",") if t]
    if ",," in spec:
        tokens.append(",")
    return list(dict.fromkeys(tokens))


def word_probabilities(token_probs: torch.Tensor, word_ids: Sequence[int | None], n_words: int) -> list[float]:
    """Mean p_keep of each word's tokens; NaN for a word without tokens (e.g. a newline to a WordPiece tokenizer).

    ``token_probs``: (T,) of one sequence; ``word_ids[t]``: the word of token t, None for specials and padding.
    """
    sums = [0.0] * n_words
    counts = [0] * n_words
    values = token_probs.tolist()
    for t, w in enumerate(word_ids):
        if w is not None and w < n_words:
            sums[w] += values[t]
            counts[w] += 1
    return [s / c if c else math.nan for s, c in zip(sums, counts)]


def keep_within_budget(scores: Sequence[float], token_counts: Sequence[int], budget: int,
                       forced: Sequence[bool]) -> list[bool]:
    """Forced words, then words by descending score while their tokens still fit in ``budget`` (a word that does
    not fit is skipped and smaller ones are still tried)."""
    # keep_top's order: forced first, then descending score (NaN last), ties to the earlier word.
    ranked = sorted(range(len(scores)), key=lambda i: (not forced[i], math.inf if math.isnan(scores[i])
                                                       else -scores[i], i))
    keep, used = [False] * len(scores), 0
    for i in ranked:
        if forced[i] or used + token_counts[i] <= budget:
            keep[i] = True
            used += token_counts[i]
    return keep


def read_text_file(path: str | Path) -> str:
    """A file's text; DataError (one line) when it is missing, a folder, binary, not UTF-8, or empty."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} not found: pass a text file to compress")
    if path.is_dir():
        raise DataError(f"{path} is a folder: pass a text file to compress")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or type(exc).__name__}): check the file") from None
    if b"\x00" in raw[:65536]:
        raise DataError(f"{path} is not a text file (it holds binary data): pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text: convert it (e.g. iconv -t utf-8) and try again") from None
    if not text.strip():
        raise DataError(f"{path} is empty: there is nothing to compress")
    return text


def load_token_classifier(name: str, *, device: str | torch.device | None = None):
    """(model, tokenizer) of a keep / drop token classifier written by ``lingua train`` (or any 2-label
    *ForTokenClassification checkpoint); ModelError in one line for anything else."""
    from transformers import AutoModelForTokenClassification

    from tadistill.loading import load_model_config, load_tokenizer, resolve_model_path

    what = "compressor"
    config = load_model_config(name, what=what)
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForTokenClassification") for a in architectures):
        raise ModelError(f"{what} {name!r} is not a token classifier ({', '.join(architectures) or 'no architecture'}"
                         "): train one with 'tadistill lingua train'")
    if getattr(config, "num_labels", 2) != 2:
        raise ModelError(f"{what} {name!r} has {config.num_labels} labels, not keep / drop: train one with "
                         "'tadistill lingua train'")
    tokenizer = load_tokenizer(name, what=what)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"{what} {name!r} has no fast tokenizer (tokenizer.json): words are mapped to tokens "
                         "through it; save the model with one")
    try:
        model = AutoModelForTokenClassification.from_pretrained(resolve_model_path(name), use_safetensors=True)
    except Exception as exc:  # noqa: BLE001 - any failure to load the weights is the user's folder
        raise ModelError(f"{what} {name!r} could not be loaded ({str(exc).splitlines()[0][:160] if str(exc) else ''}"
                         "): save it again with 'tadistill lingua train'") from None
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def default_batch_size(device: torch.device) -> int:
    """Chunks per forward when the caller does not say: 32 on a GPU, 1 on a CPU (module docstring)."""
    return 32 if device.type == "cuda" else 1


class Compressor:
    """A loaded token classifier that compresses texts; see the module docstring."""

    def __init__(self, model, tokenizer, *, max_chunk_tokens: int = MAX_CHUNK_TOKENS):
        self.model, self.tokenizer = model, tokenizer
        positions = getattr(model.config, "max_position_embeddings", None) or max_chunk_tokens
        # RoBERTa / XLM-R offset their positions by the padding index + 1.
        offset = 2 if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else 0
        self.chunk_tokens = max(1, min(max_chunk_tokens, positions - offset) - tokenizer.num_special_tokens_to_add())

    @classmethod
    def load(cls, name: str, *, device: str | torch.device | None = None) -> Compressor:
        model, tokenizer = load_token_classifier(name, device=device)
        return cls(model, tokenizer)

    def token_counts(self, words: Sequence[Word]) -> list[int]:
        if not words:
            return []
        ids = self.tokenizer([w.text for w in words], add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    @torch.inference_mode()
    def probabilities(self, chunks: Sequence[Sequence[Word]], *, batch_size: int | None = None) -> list[list[float]]:
        """p_keep of every word of every chunk (mean of its tokens), ``batch_size`` chunks per forward (None: the
        device's default, module docstring)."""
        device = next(self.model.parameters()).device
        batch_size = batch_size or default_batch_size(device)
        out: list[list[float]] = [[] for _ in chunks]
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i]))  # similar lengths share a batch: less padding
        for b in range(0, len(order), batch_size):
            rows = [i for i in order[b:b + batch_size] if chunks[i]]
            if not rows:
                continue
            enc = self.tokenizer([[w.text for w in chunks[i]] for i in rows], is_split_into_words=True, truncation=True,
                                 max_length=self.chunk_tokens + self.tokenizer.num_special_tokens_to_add(),
                                 padding=True, return_tensors="pt")
            inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            probs = torch.softmax(self.model(**inputs).logits.float(), dim=-1)[..., 1].cpu()  # (B, T)
            for row, i in enumerate(rows):
                out[i] = word_probabilities(probs[row], enc.word_ids(row), len(chunks[i]))
        return out

    def compress(
        self, text: str, *, rate: float = DEFAULT_RATE, target_tokens: int | None = None,
        force_tokens: Sequence[str] = (), keep_digits: bool = False, batch_size: int | None = None,
    ) -> Compression:
        return self.compress_many([text], rate=rate, target_tokens=target_tokens, force_tokens=force_tokens,
                                  keep_digits=keep_digits, batch_size=batch_size)[0]

    def compress_many(
        self, texts: Sequence[str], *, rate: float = DEFAULT_RATE, target_tokens: int | None = None,
        force_tokens: Sequence[str] = (), keep_digits: bool = False, batch_size: int | None = None,
    ) -> list[Compression]:
        """Compress each text; the chunks of all texts share batches."""
        rate = check_rate(rate)
        if target_tokens is not None:
            target_tokens = check_target_tokens(target_tokens)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}")
        force = set(force_tokens)
        documents = [split_words(t) for t in texts]
        counts = [self.token_counts(words) for words in documents]
        spans = [chunk_spans(words, c, self.chunk_tokens) for words, c in zip(documents, counts)]
        chunks = [words[s:e] for words, doc_spans in zip(documents, spans) for s, e in doc_spans]
        probs = iter(self.probabilities(chunks, batch_size=batch_size))
        results = []
        for words, c, doc_spans in zip(documents, counts, spans):
            total = sum(c)
            keep: list[bool] = []
            for s, e in doc_spans:
                scores = next(probs)
                forced = [w.text in force or (keep_digits and any(ch.isdigit() for ch in w.text)) for w in words[s:e]]
                if target_tokens is None:
                    keep += keep_top(scores, max(1, round(rate * (e - s))), forced)
                else:
                    budget = int(target_tokens * sum(c[s:e]) / total) if total else 0
                    keep += keep_within_budget(scores, c[s:e], budget, forced)
            kept = [w for w, k in zip(words, keep) if k]
            kept_tokens = sum(n for n, k in zip(c, keep) if k)
            results.append(Compression(
                text=join_words(kept), original_tokens=total, compressed_tokens=kept_tokens,
                ratio=total / kept_tokens if kept_tokens else math.inf, words=len(words), kept_words=len(kept)))
        return results


@functools.lru_cache(maxsize=4)
def _cached(model: str, device: str | None) -> Compressor:
    return Compressor.load(model, device=device)


def compress(
    text: str, *, model: str, rate: float = DEFAULT_RATE, target_tokens: int | None = None,
    force_tokens: Sequence[str] = (), keep_digits: bool = False, batch_size: int | None = None, device: str | None = None,
) -> Compression:
    """Compress ``text`` with the token classifier in folder ``model`` (written by ``tadistill lingua train``).

    Keeps the share ``rate`` of the words of every chunk (or fits ``target_tokens``), the words with the highest
    keep probability, plus ``force_tokens`` and, with ``keep_digits``, words with a digit. The loaded model is
    cached (four models at most), so repeated calls pay for loading once.
    """
    check_rate(rate)
    if not isinstance(text, str):
        raise ConfigError(f"compress takes a string, got {type(text).__name__}")
    return _cached(str(model), device).compress(text, rate=rate, target_tokens=target_tokens,
                                                force_tokens=tuple(force_tokens), keep_digits=keep_digits,
                                                batch_size=batch_size)
