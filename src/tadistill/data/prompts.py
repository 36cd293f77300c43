"""Prompt / completion data for causal-LM distillation (GKD and other on-policy methods).

GKD (Agarwal et al. 2024, section 3) distills only the completion: the student sees the prompt, and
on-policy steps replace the dataset completion by one the student samples. Two ways to get prompts:

- :func:`load_pairs` + :func:`tokenize_pairs`: a dataset with a prompt and a completion per row;
- :func:`split_prompts`: plain text, whose first N tokens are used as the prompt;
- chat records, whose prompt field holds a list of messages: :func:`load_pairs` gives one
  :class:`~tadistill.data.chat.ChatTurn` per assistant turn and :func:`tokenize_pairs` renders them with the
  tokenizer's chat template (:mod:`tadistill.data.chat`).

Both give a :class:`~tadistill.data.tokenized.SequenceSet` with ``prompt_lengths`` set. A pair source
is a ``.jsonl`` (one JSON object per line), ``.parquet`` or ``.csv`` file, a folder of them (read
recursively, in sorted path order, hidden files skipped), or a Hugging Face dataset name, optionally
``"name:config"``, all read by :mod:`tadistill.data.readers` (shared with the corpus). Mistakes raise
:class:`~tadistill.errors.DataError` with a one-line message.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tadistill.data.chat import ChatTurn, is_chat_source, load_chat_turns, tokenize_chat
from tadistill.data.readers import DataKind, Field, fingerprint, read_records
from tadistill.data.sources import BUILTIN
from tadistill.data.tokenized import (
    _TOKENIZE_BATCH,
    CorpusSplits,
    SequenceSet,
    _cache_key,
    _check_arguments,
    _load_cache,
    _save_cache,
    special_template,
    split_texts,
)
from tadistill.errors import ConfigError, DataError

PAIR_SUFFIXES = (".jsonl", ".parquet", ".csv")
PROMPT_DATA = DataKind("prompt data", PAIR_SUFFIXES, "check data.source")
# Held-out pairs are split by a hash of prompt + this + completion; NUL never occurs in real text,
# so ("a b", "c") and ("a", "b c") hash differently.
_KEY_JOIN = "\0"


def load_pairs(
    source: str, *, prompt_field: str = "prompt", completion_field: str = "completion", split: str = "train"
) -> list[tuple[str, str]]:
    """Load (prompt, completion) string pairs from files, a folder of them, or a hub dataset; or, when the
    prompt field holds lists of messages (chat records), one ``ChatTurn`` per assistant turn.

    Whitespace is kept as given (a leading space changes a BPE token); pairs whose prompt or
    completion is blank, or null in a .parquet / hub column, are dropped. ``split`` is used for hub
    datasets only. Raises DataError when the source cannot be read, lacks a field, or holds no pair.
    """
    if source == BUILTIN:
        raise DataError(
            "there is no built-in prompt / completion data: point data.source at .jsonl/.parquet/.csv files "
            "or a hub dataset, or use data.prompt_tokens with plain text"
        )
    if is_chat_source(source, prompt_field, split=split):  # a messages list: one sample per assistant turn
        return load_chat_turns(source, prompt_field, split=split)
    records = read_records(source, PROMPT_DATA, _fields(prompt_field, completion_field), split=split)
    pairs = [(r[prompt_field], r[completion_field]) for r in records]
    pairs = [(p, c) for p, c in pairs if isinstance(p, str) and isinstance(c, str) and p.strip() and c.strip()]
    if not pairs:
        raise DataError(
            f"prompt data {source!r} holds no pair with a non-empty {prompt_field!r} and {completion_field!r}: "
            "point data.source at other data or set data.prompt_field / data.completion_field"
        )
    return pairs


def pairs_fingerprint(
    source: str, *, prompt_field: str = "prompt", completion_field: str = "completion", split: str = "train"
) -> str:
    """A cheap hex sha256 that changes when the pairs ``load_pairs`` would give change (see readers.fingerprint)."""
    return fingerprint(source, PROMPT_DATA, _fields(prompt_field, completion_field), split=split)


def tokenize_pairs(
    pairs: list[tuple[str, str]],
    tokenizer: Any,
    *,
    max_length: int,
    heldout_fraction: float,
    seed: int,
    cache_dir: str | Path | None = None,
    fingerprint: str = "",
) -> CorpusSplits:
    """Split pairs into train / held-out and tokenize each pair into one sequence (no packing).

    Sequence = special prefix (BOS for Llama, [CLS] for BERT, nothing for GPT-2) + prompt ids +
    completion ids + EOS when the tokenizer has one (it teaches the student to stop; the template's
    suffix, e.g. BERT's [SEP], is not added). ``prompt_lengths[i]`` = prefix + prompt tokens. Prompt
    and completion are tokenized separately, so the boundary is exact.

    Longer than ``max_length``, the EOS counts as the completion's last token and:
    1. the completion is cut at the end, when the whole prompt leaves it at least ``max_length // 4``
       tokens (a cut completion loses its EOS: it did not end there);
    2. otherwise the completion keeps ``min(its length, max_length // 4)`` tokens and the prompt is
       cut from the LEFT to fill the rest: its end, nearest the completion, matters most for what follows.
    Pairs whose prompt or completion tokenizes to nothing are dropped.

    Split like the text corpus (``split_texts``): pair held out when blake2b(seed, prompt NUL completion)
    / 2**64 < heldout_fraction, at least one held out. ``heldout_texts`` are the held-out pairs joined
    into one text each (a space between them unless one side already has whitespace there).
    With ``cache_dir``, the result is cached under a key covering a hash of the pairs, ``fingerprint``,
    the tokenizer and every argument here; a cache hit runs no tokenizer.
    """
    if pairs and isinstance(pairs[0], ChatTurn):  # chat records (load_pairs): rendered with the chat template
        return tokenize_chat(pairs, tokenizer, max_length=max_length, heldout_fraction=heldout_fraction, seed=seed,
                             cache_dir=cache_dir, fingerprint=fingerprint)
    _check_arguments(tokenizer, max_length, heldout_fraction, 1)
    cache_file = None
    if cache_dir is not None:
        content = hashlib.sha256()
        for prompt, completion in pairs:
            content.update(f"{len(prompt)}:{prompt}{len(completion)}:{completion}".encode())
        key = _cache_key(
            tokenizer, f"prompt-completion\0{fingerprint}\0{content.hexdigest()}", max_length, False,
            heldout_fraction, seed, 1,
        )
        cache_file = Path(cache_dir) / f"{key}.pt"
        cached = _load_cache(cache_file, key)
        if cached is not None:
            return cached

    prefix, _ = special_template(tokenizer)  # runs the tokenizer: only after a cache miss
    eos = getattr(tokenizer, "eos_token_id", None)
    end = [eos] if isinstance(eos, int) else []
    if max_length - len(prefix) - max_length // 4 < 1:
        raise ConfigError(f"max_length {max_length} leaves no room for a prompt beside the special tokens: raise it")
    train, heldout = _split_pairs(pairs, heldout_fraction, seed)
    sets = [_tokenize(part, tokenizer, prefix, end, max_length) for part in (train, heldout)]
    for name, part in zip(("training", "held-out"), sets):
        if len(part) == 0:
            raise DataError(
                f"prompt data too small: no {name} pair tokenizes to a prompt and a completion; add more pairs"
            )
    result = CorpusSplits(train=sets[0], heldout=sets[1], heldout_texts=[_join(p, c) for p, c in heldout])
    if cache_file is not None:
        _save_cache(cache_file, key, result)
    return result


def split_prompts(sequences: SequenceSet, prompt_tokens: int) -> SequenceSet:
    """Use plain text as prompt / continuation: the first ``prompt_tokens`` tokens of each sequence are the prompt.

    Returns the same ids and offsets (shared, not copied) with prompt_lengths (N,) int64 =
    min(prompt_tokens, n_i - 1), so at least one continuation token remains (0 for an empty sequence).
    Any earlier prompt_lengths are replaced.
    """
    if prompt_tokens < 1:
        raise ConfigError(f"prompt_tokens must be at least 1, got {prompt_tokens}: raise it")
    lengths = sequences.offsets[1:] - sequences.offsets[:-1]  # (N,) int64
    prompts = torch.minimum(lengths - 1, torch.tensor(prompt_tokens, dtype=torch.int64)).clamp_min(0)
    return SequenceSet(ids=sequences.ids, offsets=sequences.offsets, prompt_lengths=prompts)


# ---------------------------------------------------------------------------------------- internals


def _split_pairs(
    pairs: list[tuple[str, str]], heldout_fraction: float, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Deterministic train / held-out split of pairs with the corpus's hashing; both keep the order."""
    keys = [f"{p}{_KEY_JOIN}{c}" for p, c in pairs]
    _, heldout_keys = split_texts(keys, heldout_fraction, seed=seed, min_heldout=1)
    held = set(heldout_keys)  # equal pairs share a key, hence a split
    return [p for p, k in zip(pairs, keys) if k not in held], [p for p, k in zip(pairs, keys) if k in held]


def _tokenize(
    pairs: list[tuple[str, str]], tokenizer: Any, prefix: list[int], end: list[int], max_length: int
) -> SequenceSet:
    """One truncated sequence per pair, assembled per batch into flat int32 tensors."""
    pieces: list[Tensor] = []
    lengths: list[int] = []
    prompt_lengths: list[int] = []
    for first in range(0, len(pairs), _TOKENIZE_BATCH):
        batch = pairs[first : first + _TOKENIZE_BATCH]
        # verbose=False: long texts are expected here; they are cut below.
        options = {"add_special_tokens": False, "return_attention_mask": False, "verbose": False}
        prompts = tokenizer([p for p, _ in batch], **options)["input_ids"]
        completions = tokenizer([c for _, c in batch], **options)["input_ids"]
        flat: list[int] = []
        for prompt, completion in zip(prompts, completions):
            if not prompt or not completion:
                continue
            prompt, completion = _truncate(list(prompt), list(completion) + end, max_length - len(prefix), max_length)
            flat += prefix + prompt + completion
            lengths.append(len(prefix) + len(prompt) + len(completion))
            prompt_lengths.append(len(prefix) + len(prompt))
        pieces.append(torch.tensor(flat, dtype=torch.int32))
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)
    return SequenceSet(ids=ids, offsets=offsets, prompt_lengths=torch.tensor(prompt_lengths, dtype=torch.int64))


def _truncate(prompt: list[int], completion: list[int], room: int, max_length: int) -> tuple[list[int], list[int]]:
    """Fit prompt + completion into ``room`` tokens by the rules of :func:`tokenize_pairs`."""
    if len(prompt) + len(completion) <= room:
        return prompt, completion
    quarter = max_length // 4
    if room - len(prompt) >= quarter:  # rule 1: the whole prompt still leaves a quarter
        return prompt, completion[: room - len(prompt)]
    keep = min(len(completion), quarter)  # rule 2: keep the prompt's end, next to the completion
    return prompt[len(prompt) - (room - keep) :], completion[:keep]


def _join(prompt: str, completion: str) -> str:
    """One readable text for a pair: a space between the parts unless one already has whitespace there."""
    if prompt[-1:].isspace() or completion[:1].isspace():
        return prompt + completion
    return f"{prompt} {completion}"


def _fields(prompt_field: str, completion_field: str) -> list[Field]:
    return [Field(prompt_field, "data.prompt_field"), Field(completion_field, "data.completion_field")]
