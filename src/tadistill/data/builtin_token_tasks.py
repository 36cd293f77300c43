"""A token-level task made from the Python standard library: "stdlib-ner", code names in prose.

**The task.** Input: one English sentence from a comment in the Python standard library, as words.
Output: one BIO tag per word, marking the code in it (one entity type, ``CODE``)::

    Check  if  we  now  have  enough  data  in  the  buffer  for  separator  to  fit  .
    O      O   O   O    O     O       O     O   O    O       O    B-CODE     O   O    O

This is named-entity recognition with one entity type, on the kind of text a code model is asked
about: whether ``separator`` is an English word or the name of a variable can only be told from the
sentence around it. It is scored like CoNLL NER, by entity F1 (:mod:`tadistill.evaluation.ner_metrics`).

**Where the labels come from.** The authors mark code in comments with reST literals
(````x````), backticks (```x```), and quotes around a Python name (``'name'``, ``"os.path"``,
``'run()'``). The marks are removed from the text and become the tags. A quoted name counts only when
it occurs as a word in the code of the same file (outside its comments): that keeps ``'data'`` in a
file that uses a variable ``data`` and drops scare quotes such as ``a "real" web server`` in a file
with no ``real``. Emphasis (``*not*``) is no code mark and is left as text.

Most comments mark nothing, and a name the author did not mark would be a wrong ``O``. So words that
can only be code are ``CODE`` too, marked or not: ``snake_case`` and ``_private`` names, dotted names
(``os.path``, ``self.buffer``; not ``e.g``), ``mixedCase`` and inner-capital ``CapWords``
(``setUp``, ``StringIO``), and calls ``name()`` (the parentheses are part of the span). A probe
reads a word at its first sub-word token (``copy`` of ``copy_function``), so even these need the
context; entities that start with a plain lowercase word (``separator``, ``want``, or the name of a
call: 794 of 4,361 on CPython 3.11) need it most.

**Why comments.** The built-in distillation corpus (:mod:`tadistill.data.builtin`) reads the
standard library's docstrings and help topics, never its comments. A probe trained and scored on
text the student was distilled on would measure memory as much as representation; comments are
prose by the same authors, about the same code, that no training split of any seed contains. As a
guard, a sentence whose words occur in the corpus (after the same normalization: quotes and
backticks dropped, words re-joined by single spaces) is dropped too; tests/test_token_tasks.py
checks both the whole corpus and its training splits.

**What is kept.** Full-line comments of the files the corpus reads (same folders skipped: tests,
IDLE, demos, lib2to3 ...), consecutive lines joined into one block; lines that look like code are
dropped and a block that is one-third code is dropped whole (the corpus's rules). Comment lines are
found by a line scan, not by the tokenizer (which takes 40 times longer): a ``#`` line inside a
multi-line string is read as a comment too (about 0.6% of the lines on CPython 3.11). Blocks are
split into sentences; a sentence is kept with 5 to 60 words, at least one ``CODE`` span, and at least
half of its words made of letters (a list of option names is no sentence). A sentence found twice
with different tags is dropped (its labels would contradict each other), found twice with the same
tags is kept once. Words: a dotted name, a contraction or a number is one word (``os.path.join``,
``don't``, ``3.11``), every other non-space character is a word of its own.

The result is deterministic for a given Python installation (files by sorted path, lines in order).
On CPython 3.11: 2,947 sentences, 56,772 words, 4,361 code spans; Python versions without
``distutils`` (3.12+) have fewer.
"""

from __future__ import annotations

import functools
import os
import re
import sysconfig
import tokenize
from pathlib import Path

from tadistill.data.builtin import (
    _BORDER,
    _DIRECTIVE,
    _TABLE,
    _looks_like_code,
    _stdlib_files,
    builtin_texts,
)
from tadistill.errors import DataError

ENTITY_TYPE = "CODE"
MIN_WORDS, MAX_WORDS = 5, 60
MIN_ALPHA_WORDS = 0.5  # fraction of a sentence's words that contain a letter

# One word: a dotted name / contraction / number, or any single other non-space character.
WORD = re.compile(r"\w+(?:[.'’]\w+)*|[^\w\s]")
# The code marks of comments. Order matters: ``x`` before `x`; quoted names only (not quoted prose).
_NAME = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?:\(\))?"
_MARK = re.compile(
    r"``(?P<literal>[^`]+?)``"
    r"|`(?P<tick>[^`\s][^`]*?)`(?!\w)"
    r"|(?<![\w'])'(?P<single>" + _NAME + r")'(?![\w'])"
    r'|(?<![\w"])"(?P<double>' + _NAME + r')"(?![\w"])'
)
# Words that can only be code, marked or not: snake_case, a dotted name, mixedCase, a call "name()".
_CODE_FORM = re.compile(
    r"(?<![\w.'’])(?:"
    r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*\(\)"  # name() / a.b()
    r"|[A-Za-z_]*[A-Za-z]_\w*|_+[A-Za-z]\w*"  # snake_case, _private, __dunder__
    r"|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+"  # os.path, self.x
    r"|[A-Za-z]*[a-z][A-Z]\w*"  # mixedCase, CapWords with an inner capital
    r")(?![\w'’])"
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")
_QUOTES = str.maketrans("", "", "`'\"’")


def stdlib_ner_examples() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """The ``(words, tags)`` sentences of stdlib-ner (see the module docstring), in source order.

    Tags are ``O``, ``B-CODE`` and ``I-CODE``. Cached in-process; the returned list is a fresh copy.
    Raises DataError when the standard library sources cannot be found or hold no sentence.
    """
    return list(_examples())


def normalized_words(text: str) -> str:
    """``text`` as its words joined by single spaces, quotes and backticks dropped.

    The space in which stdlib-ner sentences are compared with the corpus: "in `want`." and "in want ."
    both become "in want ."
    """
    return " ".join(WORD.findall(text.translate(_QUOTES)))


@functools.lru_cache(maxsize=1)
def _examples() -> tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]:
    stdlib = sysconfig.get_paths().get("stdlib")
    if not stdlib or not os.path.isdir(stdlib):
        raise DataError("the Python standard library sources were not found: stdlib-ner needs them; "
                        "pass a CoNLL or JSONL file instead")
    found: dict[tuple[str, ...], tuple[str, ...] | None] = {}  # words -> tags (None: contradictory)
    for path in _stdlib_files(Path(stdlib)):
        try:
            with tokenize.open(path) as f:  # honours the PEP 263 encoding declaration
                source = f.read()
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        blocks, code = _comment_blocks(source)
        code_words = _Words(code)
        for block in blocks:
            for words, tags in _block_sentences(block, code_words):
                previous = found.get(words, tags)
                found[words] = tags if previous == tags else None
    # One joined string: "x in corpus" is then one substring search per sentence.
    corpus = "\n".join(normalized_words(p) for p in builtin_texts())
    out = tuple((words, tags) for words, tags in found.items()
                if tags is not None and " ".join(words) not in corpus)
    if not out:
        raise DataError("the standard library sources hold no stdlib-ner sentences: pass a CoNLL or JSONL file instead")
    return out


def _comment_blocks(source: str) -> tuple[list[list[str]], str]:
    """(blocks of consecutive full-line comments, the file's other lines joined)."""
    blocks: list[list[str]] = []
    code: list[str] = []
    current: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            current.append(stripped.lstrip("#").strip())
            continue
        if current:
            blocks.append(current)
            current = []
        code.append(line)
    if current:
        blocks.append(current)
    return blocks, "\n".join(code)


class _Words:
    """The words of a file's code, split on first use (most files have no quoted name to check)."""

    def __init__(self, code: str):
        self._code, self._words = code, None

    def __contains__(self, word: str) -> bool:
        if self._words is None:
            self._words = set(re.findall(r"\w+", self._code))
        return word in self._words


def _block_sentences(lines: list[str], code_words: _Words):
    """Yield the kept ``(words, tags)`` sentences of one comment block."""
    prose, skipped = [], 0
    for line in lines:
        if not line:
            continue
        if _looks_like_code(line) or _BORDER.match(line) or _TABLE.match(line) or _DIRECTIVE.match(line):
            skipped += 1
            continue
        prose.append(line)
    # A block that is one-third code is a listing with comments, not prose (the corpus's rule).
    if not prose or skipped * 3 >= len(prose) + skipped:
        return
    text, spans = _unmark(" ".join(" ".join(prose).split()), code_words)
    start = 0
    for match in [*_SENTENCE_END.finditer(text), None]:
        end = match.start() if match else len(text)
        if match and any(s < end < e for s, e in spans):
            continue  # a sentence end inside a code span ("`x. Y`") is none
        if any(start <= s < end for s, _ in spans):
            sentence = _tag(text, spans, start, end)
            if sentence is not None:
                yield sentence
        if match:
            start = match.end()


def _unmark(text: str, code_words: _Words) -> tuple[str, list[tuple[int, int]]]:
    """Remove the code marks of ``text``; return the plain text and the code spans' [start, end)."""
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    length, last = 0, 0
    for m in _MARK.finditer(text):
        kind = m.lastgroup
        inner = m.group(kind).strip()
        if kind in ("single", "double") and inner.removesuffix("()").split(".")[-1] not in code_words:
            continue  # a quoted word that is no name of this file: scare quotes, left as they are
        out.append(text[last : m.start()])
        length += m.start() - last
        out.append(inner)
        spans.append((length, length + len(inner)))
        length += len(inner)
        last = m.end()
    out.append(text[last:])
    plain = "".join(out)
    for m in _CODE_FORM.finditer(plain):
        dotted = m.group().removesuffix("()").split(".")
        if len(dotted) > 1 and max(map(len, dotted)) == 1:
            continue  # "e.g", "i.e": abbreviations, not names
        if not any(s < m.end() and m.start() < e for s, e in spans):
            spans.append((m.start(), m.end()))
    return plain, sorted(spans)


def _tag(text: str, spans: list[tuple[int, int]], start: int, end: int):
    """(words, tags) of text[start:end], or None when the sentence is not kept."""
    words, tags = [], []
    previous = None  # the span of the previous word
    for m in WORD.finditer(text, start, end):
        # A word is in the span holding its first character; B- for the span's first word.
        span = next((i for i, (s, e) in enumerate(spans) if s <= m.start() < e), None)
        if span is None:
            tags.append("O")
        else:
            tags.append(f"{'I' if span == previous else 'B'}-{ENTITY_TYPE}")
        words.append(m.group())
        previous = span
    alpha = sum(any(c.isalpha() for c in w) for w in words)
    if not MIN_WORDS <= len(words) <= MAX_WORDS or alpha < MIN_ALPHA_WORDS * len(words):
        return None
    if all(t == "O" for t in tags):
        return None
    return tuple(words), tuple(tags)
