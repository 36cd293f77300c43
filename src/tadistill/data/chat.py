"""Chat data: records with a list of messages, rendered with the tokenizer's chat template.

A chat record holds, in the field named by ``data.prompt_field`` (e.g. ``messages``), a list of
``{"role": ..., "content": ...}`` dicts, as in most instruction datasets. A model distilled on chat data
must see it in the format it will be prompted in, its chat template, and learn only what it will be asked
to produce: the assistant turns. So each assistant turn of a conversation becomes one prompt / completion
sample (GKD, Agarwal et al. 2024, section 3, distills completions given prompts):

- prompt = the conversation before the turn, rendered with ``add_generation_prompt=True`` (what the model
  is given when it must answer);
- completion = what the template adds for the turn itself (its text and end-of-turn marker).

Both are tokenized separately, so the boundary is exact and ``prompt_lengths`` masks everything before it:
user, system and tool turns and the template's markers are context, never targets. On-policy steps
(``on_policy.fraction``) then sample exactly the assistant turn after the generation prompt, and stop at
``tokenizer.eos_token_id``: an instruct tokenizer whose end-of-turn token is its eos (Llama 3 instruct,
Qwen 2.5) stops where the template ends a turn.

Sources: ``.jsonl`` (one JSON object per line) and ``.parquet`` files, folders of them, or hub datasets; a
source is chat data when the prompt field holds lists (``is_chat_source``). Mistakes are one-line errors: a
record without an assistant turn, a message without a string role / content, a tokenizer without a chat
template, a template that renders a turn differently from its generation prompt.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tadistill.data.readers import SUFFIXES, DataKind, local_path, short_reason, source_files
from tadistill.data.tokenized import (
    _TOKENIZE_BATCH,
    CorpusSplits,
    SequenceSet,
    _cache_key,
    _check_arguments,
    _load_cache,
    _save_cache,
    split_texts,
)
from tadistill.errors import ConfigError, DataError

CHAT_DATA = DataKind("chat data", (".jsonl", ".parquet"), "check data.source")
ASSISTANT = "assistant"


class ChatTurn(NamedTuple):
    """One distilled assistant turn: the messages before it, the turn, and its conversation (the split key)."""

    context: tuple[dict[str, str], ...]
    reply: dict[str, str]
    conversation: str  # the conversation as canonical JSON: all its turns fall in the same split


def is_chat_source(source: str, field: str, *, split: str = "train") -> bool:
    """Whether ``source``'s first record holds a list in ``field`` (chat messages) rather than text."""
    path = Path(source).expanduser()
    if not path.exists():
        if source.lower().endswith(SUFFIXES) or source.startswith(("/", "./", "../", "~")):
            return False  # a missing file: the pair reader says so
        return _hub_first_is_list(source, field, split)
    try:
        files = source_files(source, path, CHAT_DATA)
    except DataError:
        return False  # no .jsonl / .parquet file: not chat data
    first = files[0]
    if first.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pq.read_schema(first)
        return field in schema.names and pa.types.is_list(schema.field(field).type)
    try:
        with first.open(encoding="utf-8") as f:
            line = next((line for line in f if line.strip()), "")
        return isinstance(json.loads(line).get(field), list) if line else False
    except (OSError, ValueError, AttributeError):
        return False  # the pair reader reports what is wrong with the file


def load_chat_turns(source: str, field: str, *, split: str = "train") -> list[ChatTurn]:
    """Every assistant turn of every conversation of ``source``, in order (see the module docstring)."""
    turns: list[ChatTurn] = []
    for where, messages in _conversations(source, field, split):
        messages = _checked(messages, where, field)
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        found = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT]
        if not found:
            raise DataError(f"{where} has no assistant turn: only assistant turns are distilled; drop the record or "
                            "add the assistant's answer")
        turns += [ChatTurn(tuple(messages[:i]), messages[i], key) for i in found if messages[:i]]
    if not turns:
        raise DataError(f"chat data {source!r} holds no assistant turn that follows a message: nothing to distill")
    return turns


def tokenize_chat(
    turns: list[ChatTurn],
    tokenizer: Any,
    *,
    max_length: int,
    heldout_fraction: float,
    seed: int,
    cache_dir: str | Path | None = None,
    fingerprint: str = "",
) -> CorpusSplits:
    """Render, split and tokenize assistant turns: one sequence per turn, ``prompt_lengths`` at the turn's start.

    Split by conversation (``split_texts`` on its canonical JSON), so no conversation is in both splits. Longer
    than ``max_length``: the rules of ``prompts.tokenize_pairs`` (the turn keeps at least a quarter, the
    context is cut from the left), the template's BOS kept in front. ``heldout_texts``: each held-out
    conversation rendered once. Cached like the pairs, the template's text in the key.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError("the teacher's tokenizer has no chat template, and chat records (a messages list) are "
                          "rendered with it: give the tokenizer one (chat_template in tokenizer_config.json) or "
                          "render the records to prompt / completion text")
    _check_arguments(tokenizer, max_length, heldout_fraction, 1)
    if max_length - 1 - max_length // 4 < 1:
        raise ConfigError(f"max_length {max_length} leaves no room for a prompt beside the turn: raise it")
    cache_file = None
    if cache_dir is not None:
        content = hashlib.sha256(json.dumps(template, sort_keys=True).encode())  # a str, or a dict of named ones
        for turn in turns:
            content.update(json.dumps([turn.context, turn.reply], ensure_ascii=False).encode())
        key = _cache_key(tokenizer, f"chat\0{fingerprint}\0{content.hexdigest()}", max_length, False,
                         heldout_fraction, seed, 1)
        cache_file = Path(cache_dir) / f"{key}.pt"
        cached = _load_cache(cache_file, key)
        if cached is not None:
            return cached
    conversations = list(dict.fromkeys(t.conversation for t in turns))
    _, held_keys = split_texts(conversations, heldout_fraction, seed=seed, min_heldout=1)
    held = set(held_keys)
    parts = [[t for t in turns if t.conversation not in held], [t for t in turns if t.conversation in held]]
    sets = [_tokenize(part, tokenizer, max_length) for part in parts]
    for name, part in zip(("training", "held-out"), sets):
        if len(part) == 0:
            raise DataError(f"chat data too small: no {name} conversation has an assistant turn; add conversations")
    texts = [tokenizer.apply_chat_template(json.loads(c), tokenize=False) for c in held_keys]
    result = CorpusSplits(train=sets[0], heldout=sets[1], heldout_texts=texts)
    if cache_file is not None:
        _save_cache(cache_file, key, result)
    return result


def render_turn(turn: ChatTurn, tokenizer: Any) -> tuple[str, str]:
    """(prompt text, completion text) of one assistant turn under the tokenizer's chat template."""
    prompt = tokenizer.apply_chat_template(list(turn.context), tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template([*turn.context, turn.reply], tokenize=False)
    if not full.startswith(prompt) or len(full) == len(prompt):
        raise DataError("the chat template renders an assistant turn differently from its generation prompt "
                        f"({prompt[-40:]!r} is not how {full[len(prompt) - 40:len(prompt)]!r} continues): "
                        "chat distillation needs a template whose conversations extend their generation prompt")
    return prompt, full[len(prompt):]


# ---------------------------------------------------------------------------------------- internals


def _tokenize(turns: list[ChatTurn], tokenizer: Any, max_length: int) -> SequenceSet:
    from tadistill.data.prompts import _truncate  # the pair rules, shared

    bos = getattr(tokenizer, "bos_token_id", None)
    pieces: list[Tensor] = []
    lengths: list[int] = []
    prompt_lengths: list[int] = []
    for first in range(0, len(turns), _TOKENIZE_BATCH):
        rendered = [render_turn(t, tokenizer) for t in turns[first : first + _TOKENIZE_BATCH]]
        # The template writes its special tokens (BOS, turn markers) as text: add none of our own.
        options = {"add_special_tokens": False, "return_attention_mask": False, "verbose": False}
        prompts = tokenizer([p for p, _ in rendered], **options)["input_ids"]
        replies = tokenizer([c for _, c in rendered], **options)["input_ids"]
        flat: list[int] = []
        for prompt, reply in zip(prompts, replies):
            if not prompt or not reply:
                continue
            prefix = [prompt[0]] if bos is not None and prompt[0] == bos else []
            body, reply = _truncate(list(prompt[len(prefix):]), list(reply), max_length - len(prefix), max_length)
            flat += prefix + body + reply
            lengths.append(len(prefix) + len(body) + len(reply))
            prompt_lengths.append(len(prefix) + len(body))
        pieces.append(torch.tensor(flat, dtype=torch.int32))
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)
    return SequenceSet(ids=ids, offsets=offsets, prompt_lengths=torch.tensor(prompt_lengths, dtype=torch.int64))


def _checked(messages: Any, where: str, field: str) -> list[dict[str, str]]:
    """The messages as plain {"role", "content"} dicts; DataError (one line) for anything else."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where} has no list of messages in {field!r}: give each record a non-empty list of "
                        "{role, content} messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where} has a message that is not {{role: str, content: str}} ({repr(m)[:60]}): "
                            "fix the record")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _conversations(source: str, field: str, split: str):
    """(where, messages) per record of a local source or a hub dataset."""
    path = local_path(source, CHAT_DATA)
    if path is None:
        yield from _hub_conversations(source, field, split)
        return
    for file in source_files(source, path, CHAT_DATA):
        if file.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            if field not in pq.read_schema(file).names:
                raise DataError(f"chat data file '{file}' has no column {field!r}: set data.prompt_field to it")
            for number, messages in enumerate(pq.read_table(file, columns=[field]).column(field).to_pylist(), 1):
                yield f"chat data file '{file}' row {number}", messages
            continue
        with file.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"chat data file '{file}' line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where} is not valid JSON ({exc.msg}): write one JSON object per line") from None
                yield where, record.get(field) if isinstance(record, dict) else None


def _hub_dataset(source: str, split: str):
    name, _, config = source.partition(":")
    try:
        import datasets

        return datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, bad config: not found
        raise DataError(f"chat data {source!r} not found: it is not a local file or folder and the Hugging Face hub "
                        f"could not load it ({short_reason(exc)})") from None


def _hub_first_is_list(source: str, field: str, split: str) -> bool:
    try:
        dataset = _hub_dataset(source, split)
    except DataError:
        return False  # the pair reader gives its own error
    return field in dataset.column_names and len(dataset) > 0 and isinstance(dataset[0][field], list)


def _hub_conversations(source: str, field: str, split: str):
    dataset = _hub_dataset(source, split)
    if field not in dataset.column_names:
        raise DataError(f"dataset {source!r} has no column {field!r} (columns: {', '.join(dataset.column_names)}): "
                        "set data.prompt_field to its messages column")
    for number, messages in enumerate(dataset[field], start=1):
        yield f"dataset {source!r} row {number}", messages
