"""Tokenize a corpus once into flat token-id tensors, split into train and held-out, with a disk cache.

Packing follows RoBERTa's FULL-SENTENCES format (Liu et al. 2019, section 4.2): the texts of a split
are concatenated, separated by a separator token, and cut into chunks that fill ``max_length``
exactly, so no compute is spent on padding. Each chunk then gets the tokenizer's own special tokens
(``[CLS] ... [SEP]`` for BERT, nothing for GPT-2), so the student sees what the teacher was trained on.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tadistill.errors import ConfigError, DataError
from tadistill.fileio import atomic_open

CACHE_FORMAT_VERSION = 2  # 2: prompt lengths stored with the sequences
MIN_SEQUENCE_TOKENS = 8
_TOKENIZE_BATCH = 1000
# transformers sets model_max_length to int(1e30) when a tokenizer does not know its model's limit.
_UNKNOWN_LIMIT = 10**9


@dataclass
class SequenceSet:
    """Token-id sequences of varying length stored flat: sequence i is ``ids[offsets[i]:offsets[i+1]]``.

    ids: (total,) int32, all sequences concatenated; offsets: (N + 1,) int64, offsets[0] == 0 and
    offsets[-1] == total. Flat storage keeps millions of short sequences cheap to save and load.
    prompt_lengths: None for plain text, else (N,) int64: the first prompt_lengths[i] tokens of
    sequence i (special prefix included) are its prompt, the rest its completion (GKD, Agarwal et al.
    2024: only completion tokens are distilled, and on-policy training re-samples them).
    """

    ids: Tensor
    offsets: Tensor
    prompt_lengths: Tensor | None = None

    def __post_init__(self) -> None:
        if self.prompt_lengths is not None and self.prompt_lengths.shape != (len(self),):
            raise ValueError(
                f"prompt_lengths has shape {tuple(self.prompt_lengths.shape)}, expected ({len(self)},)"
            )

    @classmethod
    def from_lists(
        cls, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int] | None = None
    ) -> SequenceSet:
        """Build from a list of token-id lists, and optionally one prompt length per sequence."""
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
        offsets = torch.zeros(len(sequences) + 1, dtype=torch.int64)
        offsets[1:] = lengths.cumsum(0)
        ids = torch.tensor(list(itertools.chain.from_iterable(sequences)), dtype=torch.int32)
        prompts = None if prompt_lengths is None else torch.tensor(list(prompt_lengths), dtype=torch.int64)
        return cls(ids=ids, offsets=offsets, prompt_lengths=prompts)

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, i: int) -> Tensor:
        """Sequence i as a (n_i,) int64 tensor; negative indices count from the end."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {i} out of range for {n} sequences")
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[start:end].to(torch.int64)

    def prompt_length(self, i: int) -> int:
        """Number of prompt tokens at the start of sequence i (0 for plain text); negative i counts from the end."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence index {i} out of range for {n} sequences")
        return 0 if self.prompt_lengths is None else int(self.prompt_lengths[i])

    def num_tokens(self) -> int:
        """Total number of tokens over all sequences, special tokens included."""
        return self.ids.numel()


@dataclass
class CorpusSplits:
    """The tokenized corpus: training sequences, held-out sequences and the raw held-out texts.

    ``train`` and ``heldout`` are ``SequenceSet``s in memory, or anything with the same index-based
    contract (``len``, ``[i]``, ``prompt_length(i)``, ``num_tokens()``): memory-mapped shards
    (``shards.ShardSet``) and mixtures of sources (``mixture.MixtureSet``). ``mixture``: for several
    sources, what each is drawn with (target probability, realised fraction; per language too), else None.
    """

    train: SequenceSet
    heldout: SequenceSet
    heldout_texts: list[str]  # raw held-out texts (for sentence-embedding fidelity checks)
    mixture: dict[str, Any] | None = None


def tokenize_corpus(
    texts: list[str] | Callable[[], list[str]],
    tokenizer: Any,
    *,
    max_length: int,
    heldout_fraction: float = 0.05,
    seed: int = 0,
    packing: bool = True,
    cache_dir: str | Path | None = None,
    fingerprint: str | None = None,
    min_heldout: int = 1,
) -> CorpusSplits:
    """Split ``texts`` into train / held-out and tokenize both into sequences of at most ``max_length``.

    Split: text t is held out when blake2b(seed, t) / 2**64 < heldout_fraction (stable across runs and
    machines; equal texts land in the same split); if fewer than ``min_heldout`` are held out, the
    train texts of smallest hash move over. packing=True: every sequence has exactly ``max_length``
    tokens special tokens included, except a final shorter one kept when it has at least 8 content
    tokens (or is the split's only sequence). packing=False: one text per sequence, truncated.
    With ``cache_dir`` and ``fingerprint`` (see ``source_fingerprint``), the result is cached on disk
    under a key that also covers the tokenizer's vocabulary and every argument here (but not the texts:
    the fingerprint stands for them). ``texts`` may be a function returning them: it is called only on
    a cache miss, so a hit neither tokenizes nor reads the corpus.
    """
    _check_arguments(tokenizer, max_length, heldout_fraction, min_heldout)
    cache_file = None
    if cache_dir is not None and fingerprint is not None:
        # The key is computed without running the tokenizer, so a cache hit tokenizes nothing.
        key = _cache_key(tokenizer, fingerprint, max_length, packing, heldout_fraction, seed, min_heldout)
        cache_file = Path(cache_dir) / f"{key}.pt"
        cached = _load_cache(cache_file, key)
        if cached is not None:
            return cached

    if callable(texts):
        texts = texts()
    prefix, suffix = special_template(tokenizer)
    body = max_length - len(prefix) - len(suffix)
    if body < 1:
        raise ConfigError(f"max_length {max_length} leaves no room beside the special tokens: raise it")
    train_texts, heldout_texts = split_texts(texts, heldout_fraction, seed=seed, min_heldout=min_heldout)
    separator = _separator_id(tokenizer) if packing else None
    splits = []
    for name, part in (("training", train_texts), ("held-out", heldout_texts)):
        stream, text_starts, text_lengths = _token_stream(tokenizer, part, separator)
        if packing:
            starts, lengths = _pack(stream.numel(), text_starts, body)
        else:
            starts, lengths = text_starts, [min(n, body) for n in text_lengths]
        if not starts and part:
            raise DataError(
                f"corpus too small: the {name} split gives no token sequence; add more text to the corpus"
            )
        splits.append(_assemble(stream, starts, lengths, prefix, suffix))
    result = CorpusSplits(train=splits[0], heldout=splits[1], heldout_texts=heldout_texts)
    if cache_file is not None:
        _save_cache(cache_file, key, result)
    return result


def split_texts(
    texts: list[str], heldout_fraction: float, *, seed: int, min_heldout: int = 1
) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split by a stable hash; both keep the corpus order."""
    scores = [_unit_hash(seed, t) for t in texts]
    heldout = {i for i, u in enumerate(scores) if u < heldout_fraction}
    if len(heldout) < min_heldout:
        # Move the train texts of smallest hash: the same ones a slightly larger fraction would pick.
        rest = sorted((i for i in range(len(texts)) if i not in heldout), key=lambda i: scores[i])
        heldout.update(rest[: min_heldout - len(heldout)])
    if len(heldout) < min_heldout or len(heldout) == len(texts):
        raise DataError(
            f"corpus too small: {len(texts)} texts cannot give {max(min_heldout, 1)} held-out and at least "
            "one training text; add more text or lower the held-out fraction"
        )
    train = [t for i, t in enumerate(texts) if i not in heldout]
    return train, [t for i, t in enumerate(texts) if i in heldout]


def special_template(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special-token ids the tokenizer puts before and after a single sequence.

    BERT: ([CLS], [SEP]); RoBERTa: (<s>, </s>); GPT-2: ([], []). Uses
    ``build_inputs_with_special_tokens`` where the tokenizer has it (Python tokenizers); the
    tokenizers-backed classes of transformers 5 dropped it, so there the template is read off
    encoding a probe text with and without special tokens.
    """
    for text in ("hello", "the", "a", "x", "."):  # any text the vocabulary can encode
        probe = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if probe:
            break
    else:
        raise ValueError(f"{type(tokenizer)} encodes no probe text to tokens")
    if hasattr(tokenizer, "build_inputs_with_special_tokens"):
        full = list(tokenizer.build_inputs_with_special_tokens(probe))
    else:
        full = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(probe) + 1):
        if full[start : start + len(probe)] == probe:
            return full[:start], full[start + len(probe) :]
    raise ValueError(f"cannot locate the text inside the special-token template {full} of {type(tokenizer)}")


def _check_arguments(tokenizer: Any, max_length: int, heldout_fraction: float, min_heldout: int) -> None:
    if max_length < MIN_SEQUENCE_TOKENS:
        raise ConfigError(f"max_length must be at least {MIN_SEQUENCE_TOKENS}, got {max_length}: raise it")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < _UNKNOWN_LIMIT and max_length > limit:
        raise ConfigError(
            f"max_length {max_length} exceeds the tokenizer's limit of {limit} tokens: set it to at most {limit}"
        )
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}: change it")
    if min_heldout < 0:
        raise ConfigError(f"min_heldout must be >= 0, got {min_heldout}: change it")


def _unit_hash(seed: int, text: str) -> float:
    digest = hashlib.blake2b(f"{seed}\0{text}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _separator_id(tokenizer: Any) -> int | None:
    """The token between packed texts: SEP (BERT, RoBERTa), else EOS (GPT-2's <|endoftext|>), else none."""
    for name in ("sep_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


def _token_stream(
    tokenizer: Any, texts: list[str], separator: int | None
) -> tuple[Tensor, list[int], list[int]]:
    """Tokenize texts (no special tokens) into one flat stream, ``separator`` between texts if given.

    Returns the (total,) int32 stream and, per non-empty text, its start in the stream and its length.
    Batched, since fast tokenizers encode a batch in parallel; the stream is built per batch as a
    tensor, so a corpus of 10^8 tokens costs 400 MB, not the 3 GB of a Python list of ints.
    """
    pieces: list[Tensor] = []
    starts: list[int] = []
    lengths: list[int] = []
    total = 0
    for first in range(0, len(texts), _TOKENIZE_BATCH):
        # verbose=False: texts longer than the model limit are expected here; they are cut later.
        encoded = tokenizer(
            texts[first : first + _TOKENIZE_BATCH],
            add_special_tokens=False,
            return_attention_mask=False,
            verbose=False,
        )
        flat: list[int] = []
        for ids in encoded["input_ids"]:
            if not ids:
                continue
            if separator is not None and total + len(flat) > 0:
                flat.append(separator)
            starts.append(total + len(flat))
            lengths.append(len(ids))
            flat.extend(ids)
        pieces.append(torch.tensor(flat, dtype=torch.int32))
        total += len(flat)
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)
    return stream, starts, lengths


def _pack(total: int, text_starts: list[int], body: int) -> tuple[list[int], list[int]]:
    """Cut a packed stream of ``total`` tokens into chunks of ``body`` tokens: (starts, lengths).

    A chunk never opens on the separator before a text ("[CLS] [SEP] text ..." wastes a slot and
    shows the student a pattern the teacher never saw); it starts one token later instead.
    """
    separators = {start - 1 for start in text_starts[1:]}
    starts: list[int] = []
    pos = 0
    while pos < total:
        if pos in separators:
            pos += 1
            continue
        starts.append(pos)
        pos += body
    lengths = [min(body, total - start) for start in starts]
    if len(starts) > 1 and lengths[-1] < min(body, MIN_SEQUENCE_TOKENS):
        starts.pop()  # too short a tail to teach anything; kept when it is the split's only sequence
        lengths.pop()
    return starts, lengths


def _assemble(
    stream: Tensor, starts: list[int], lengths: list[int], prefix: list[int], suffix: list[int]
) -> SequenceSet:
    """Gather ``stream[start : start + length]`` for each chunk and wrap it in the special tokens."""
    n, p, q = len(starts), len(prefix), len(suffix)
    length = torch.tensor(lengths, dtype=torch.int64)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = (length + p + q).cumsum(0)
    ids = torch.empty(int(offsets[-1]), dtype=torch.int32)
    # Content token j of chunk i goes from stream[starts[i] + j] to ids[offsets[i] + p + j].
    chunk = torch.repeat_interleave(torch.arange(n), length)  # (content,) chunk of each content token
    within = torch.arange(chunk.numel()) - torch.repeat_interleave(length.cumsum(0) - length, length)
    ids[offsets[:-1][chunk] + p + within] = stream[torch.tensor(starts, dtype=torch.int64)[chunk] + within]
    for k, token in enumerate(prefix):
        ids[offsets[:-1] + k] = token
    for k, token in enumerate(suffix):
        ids[offsets[1:] - q + k] = token
    return SequenceSet(ids=ids, offsets=offsets)


def _cache_key(
    tokenizer: Any,
    fingerprint: str,
    max_length: int,
    packing: bool,
    heldout_fraction: float,
    seed: int,
    min_heldout: int,
) -> str:
    vocab = tokenizer.get_vocab()
    vocab_hash = hashlib.sha256(json.dumps(sorted(vocab.items())).encode("utf-8")).hexdigest()
    fields = [
        CACHE_FORMAT_VERSION,
        fingerprint,
        str(getattr(tokenizer, "name_or_path", "")),
        len(tokenizer),
        vocab_hash,
        type(tokenizer).__name__,
        sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", [])),
        sorted(getattr(tokenizer, "all_special_ids", [])),
        # Flags that change the special-token template without changing the vocabulary (Llama, GPT-2).
        getattr(tokenizer, "add_bos_token", None),
        getattr(tokenizer, "add_eos_token", None),
        _separator_id(tokenizer),
        max_length,
        packing,
        repr(float(heldout_fraction)),
        seed,
        min_heldout,
    ]
    return hashlib.sha256(json.dumps(fields).encode("utf-8")).hexdigest()


def _save_cache(path: Path, key: str, splits: CorpusSplits) -> None:
    """Write atomically: a temporary file in the same folder, then os.replace (no torn cache files)."""
    payload = {
        "key": key,
        "format": CACHE_FORMAT_VERSION,
        "train_ids": splits.train.ids,
        "train_offsets": splits.train.offsets,
        "heldout_ids": splits.heldout.ids,
        "heldout_offsets": splits.heldout.offsets,
        "heldout_texts": list(splits.heldout_texts),
        "train_prompt_lengths": splits.train.prompt_lengths,  # None for plain text
        "heldout_prompt_lengths": splits.heldout.prompt_lengths,
    }
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)


def _load_cache(path: Path, key: str) -> CorpusSplits | None:
    """The cached splits, or None when the file is missing, unreadable or for another key."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file is rebuilt, not fatal
        return None
    if not isinstance(payload, dict) or payload.get("key") != key:
        return None
    return CorpusSplits(
        train=SequenceSet(payload["train_ids"], payload["train_offsets"], payload.get("train_prompt_lengths")),
        heldout=SequenceSet(
            payload["heldout_ids"], payload["heldout_offsets"], payload.get("heldout_prompt_lengths")
        ),
        heldout_texts=list(payload["heldout_texts"]),
    )
