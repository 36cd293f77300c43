"""Words of a text, and chunks of words cut at sentence ends: the units LLMLingua-2 labels and keeps.

LLMLingua-2 (Pan et al. 2024, sec. 3.2) labels *words* of the original (its annotation splits punctuation off
as words of its own) and its compressor keeps or drops whole words. Here a word is one of:

- a newline (so that ``--force-tokens "\\n"`` can keep the layout of a prompt);
- a run of letters and digits, with inner apostrophes, dots and hyphens ("don't", "3.14", "os.path", "x-ray");
- one other non-space character (".", ",", "?", "(" ...).

Each word remembers whether whitespace came before it, so that :func:`join_words` of all words gives the text
back with runs of spaces and tabs folded into one space; of some words, a readable compressed text.

Chunks (sec. 3.2 and 4: at most 512 tokens, cut at sentence ends): the LLM annotator sees chunks of its own
tokens, the compressor chunks of its encoder's. Everything here is pure: token counts come from the caller.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

_WORD = re.compile(r"\n|\w+(?:['’.\-]\w+)*|[^\w\s]")
SENTENCE_END = frozenset({".", "!", "?", "\n", "。", "！", "？"})
NEWLINE = "\n"


class Word(NamedTuple):
    """A word and whether whitespace (other than a newline word of its own) came right before it."""

    text: str
    space: bool


def split_words(text: str) -> list[Word]:
    """The words of ``text`` in order (see the module docstring); [] for an empty or blank text."""
    words: list[Word] = []
    end = 0
    for match in _WORD.finditer(text):
        gap = text[end:match.start()]
        word = match.group()
        # No space is recorded next to a newline: "a \n b" joins back as "a\nb".
        space = bool(gap) and word != NEWLINE and not (words and words[-1].text == NEWLINE)
        words.append(Word(word, space))
        end = match.end()
    return words


def join_words(words: Iterable[Word]) -> str:
    """The text of ``words``: each one after the first gets a space before it when it had one in the original."""
    parts: list[str] = []
    for word in words:
        if parts and word.space:
            parts.append(" ")
        parts.append(word.text)
    return "".join(parts)


def word_texts(words: Iterable[Word]) -> list[str]:
    return [w.text for w in words]


def sentence_spans(words: Sequence[Word]) -> list[tuple[int, int]]:
    """[start, end) spans of the sentences of ``words``: a sentence ends after '.', '!', '?' or a newline."""
    spans, start = [], 0
    for i, word in enumerate(words):
        if word.text in SENTENCE_END:
            spans.append((start, i + 1))
            start = i + 1
    if start < len(words):
        spans.append((start, len(words)))
    return spans


def chunk_spans(words: Sequence[Word], token_counts: Sequence[int], max_tokens: int) -> list[tuple[int, int]]:
    """[start, end) word spans of at most ``max_tokens`` tokens each, cut at sentence ends where possible.

    Whole sentences are packed greedily in order; a sentence longer than ``max_tokens`` is cut between
    words. A single word longer than ``max_tokens`` gets a chunk of its own (the model truncates it).
    ``token_counts[i]`` is the number of tokens of word i (0 for a word the tokenizer drops, e.g. a newline).
    Every word is in exactly one span; spans are in order and never empty.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    if len(token_counts) != len(words):
        raise ValueError(f"{len(token_counts)} token counts for {len(words)} words")
    spans: list[tuple[int, int]] = []
    start, used = 0, 0  # the open chunk: words [start, i), ``used`` tokens
    for s, e in sentence_spans(words):
        size = sum(token_counts[s:e])
        if used + size <= max_tokens:
            used += size
            continue
        if s > start:  # close the open chunk before this sentence
            spans.append((start, s))
            start, used = s, 0
        if size <= max_tokens:
            used = size
            continue
        for i in range(s, e):  # a sentence too long for one chunk: cut between its words
            if used + token_counts[i] > max_tokens and i > start:
                spans.append((start, i))
                start, used = i, 0
            used += token_counts[i]
    if start < len(words):
        spans.append((start, len(words)))
    return spans


def corpus_chunks(
    texts: Iterable[str], count_tokens: Callable[[list[Word]], list[int]], max_tokens: int, *, min_words: int = 1
) -> Iterator[list[Word]]:
    """Chunks of a corpus read in order: its texts (paragraphs) joined by newlines, cut at sentence ends.

    ``count_tokens(words)`` gives the token count of each word. Consecutive short paragraphs share a chunk, so
    chunks come near ``max_tokens`` as the annotator's chunks do in the paper; a chunk never ends on a newline
    and never has fewer than ``min_words`` words that are not newlines (shorter chunks are skipped).
    """
    pending: list[Word] = []
    counts: list[int] = []
    for text in texts:
        words = split_words(text)
        if not words:
            continue
        if pending:
            words = [Word(NEWLINE, False), *words]
        pending += words
        counts += count_tokens(words)
        if sum(counts) <= max_tokens:
            continue
        spans = chunk_spans(pending, counts, max_tokens)
        for s, e in spans[:-1]:  # the last span may still grow with the next paragraph
            yield from _clean(pending[s:e], min_words)
        s = spans[-1][0]
        pending, counts = pending[s:], counts[s:]
    if pending:
        yield from _clean(pending, min_words)


def _clean(words: list[Word], min_words: int) -> Iterator[list[Word]]:
    while words and words[0].text == NEWLINE:
        words = words[1:]
    while words and words[-1].text == NEWLINE:
        words = words[:-1]
    if words:
        words = [words[0]._replace(space=False), *words[1:]]
    if sum(w.text != NEWLINE for w in words) >= min_words:
        yield words
