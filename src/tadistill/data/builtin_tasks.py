"""Two tasks made from the Python standard library, so downstream evaluation needs no download.

"stdlib-topic" (labeled paragraphs, for a probe) and "stdlib-retrieval" (name -> description pairs, for
zero-shot retrieval by embedding cosine; see the end of this docstring).

**The task.** Input: one paragraph of an English docstring from the Python standard library. Output:
which of 8 areas of the standard library the paragraph documents. The area is given by the top-level
module or package the docstring lives in (``email/mime/text.py`` -> ``email``):

=============  =====================================================================================
label          top-level modules / packages
=============  =====================================================================================
concurrency    asyncio, threading, multiprocessing, concurrent, queue, selectors, sched, subprocess,
               _threading_local
email          email, mailbox, smtplib, imaplib, poplib, mimetypes, mailcap, smtpd, quopri
filesystem     os, pathlib, shutil, glob, fnmatch, tempfile, genericpath, posixpath, ntpath, stat,
               filecmp, fileinput
markup         xml, html, xmlrpc
networking     http, urllib, socket, ssl, ftplib, socketserver, ipaddress, wsgiref, telnetlib,
               nntplib, webbrowser
numbers        _pydecimal (the pure-Python decimal), decimal, fractions, statistics, random, numbers
testing        unittest, doctest, pdb, bdb, trace, timeit, cProfile, profile, pstats
text           re, string, textwrap, difflib, codecs, stringprep, shlex, gettext, locale
=============  =====================================================================================

Paragraphs are read and cleaned exactly as the built-in corpus does (:mod:`tadistill.data.builtin`:
docstrings parsed with :mod:`ast`, never imported; doctests, code and tables dropped; at least 8 words
of mostly letters). A paragraph is kept once per area; a paragraph that occurs in two areas is dropped,
since its label would be ambiguous. Every other stdlib module is not part of the task.

**Balance.** Each area contributes at most ``per_class`` paragraphs (default 150), drawn without
replacement by a ``torch.Generator`` seeded with ``seed``; an area with fewer paragraphs contributes
all of them (on CPython 3.11 the smallest area, text, has about 290). The result is deterministic for
a given Python installation and seed; modules removed in later Python versions (telnetlib, nntplib,
smtpd, mailcap) only make their areas smaller.

**Caveat.** The same paragraphs are part of the unlabeled built-in distillation corpus. No label is
ever used during distillation, so this is like probing a model pretrained on Wikipedia with a
Wikipedia-derived task: it measures what the representation encodes, not memorized labels.

**stdlib-retrieval.** Pairs ``(query, document)``: the query names a public function, method or class
of a public stdlib module with its parameters (``shutil.copyfile(src, dst, *, follow_symlinks)``,
``class tarfile.ReadError``; ``self`` and ``cls`` dropped), the document is the first sentence of its
docstring's first prose paragraph (markup reduced to text as in the corpus: "Copy data from src to dst
in the most efficient way possible."). Pairs are kept when the sentence has 4 to 40 words, starts with a
capital and is mostly letters. Unlike stdlib-topic, the pairs are *disjoint from the distillation
corpus*: a pair whose document or query occurs anywhere in the built-in corpus (as a substring of any
paragraph, so in no training split of any seed) is dropped -- one-line docstrings shorter than the
corpus's 8 words and first sentences of paragraphs the cleaner drops are what remains. A document or
query that occurs twice (``close()`` "Close the file." in many classes) is dropped too: its match would
be ambiguous. On CPython 3.11 about 1,400 pairs remain; how they are sampled and scored is in
:mod:`tadistill.evaluation.retrieval`.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sysconfig
import tokenize
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from tadistill.data.builtin import (
    MIN_LETTER_FRACTION,
    _docstrings,
    _looks_like_code,
    _stdlib_files,
    _strip_markup,
    builtin_texts,
    clean_paragraphs,
)
from tadistill.errors import ConfigError, DataError

# label -> the top-level stdlib modules / packages whose docstrings carry it (see the module docstring).
TOPIC_MODULES: dict[str, tuple[str, ...]] = {
    "concurrency": ("asyncio", "threading", "multiprocessing", "concurrent", "queue", "selectors", "sched",
                    "subprocess", "_threading_local"),
    "email": ("email", "mailbox", "smtplib", "imaplib", "poplib", "mimetypes", "mailcap", "smtpd", "quopri"),
    "filesystem": ("os", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "genericpath", "posixpath",
                   "ntpath", "stat", "filecmp", "fileinput"),
    "markup": ("xml", "html", "xmlrpc"),
    "networking": ("http", "urllib", "socket", "ssl", "ftplib", "socketserver", "ipaddress", "wsgiref",
                   "telnetlib", "nntplib", "webbrowser"),
    "numbers": ("_pydecimal", "decimal", "fractions", "statistics", "random", "numbers"),
    "testing": ("unittest", "doctest", "pdb", "bdb", "trace", "timeit", "cProfile", "profile", "pstats"),
    "text": ("re", "string", "textwrap", "difflib", "codecs", "stringprep", "shlex", "gettext", "locale"),
}
_MODULE_TOPIC = {module: topic for topic, modules in TOPIC_MODULES.items() for module in modules}


def stdlib_topic_examples(per_class: int = 150, seed: int = 0) -> tuple[list[str], list[str]]:
    """Return ``(texts, labels)`` of the stdlib-topic task (see the module docstring).

    At most ``per_class`` paragraphs per label, drawn with a generator seeded by ``seed``. The output is
    grouped by label (labels in sorted order), each group in source order. Raises DataError when the
    standard library sources cannot be found (a Python built without its ``.py`` files).
    """
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ConfigError(f"per_class must be a positive integer, got {per_class!r}: pass e.g. 150")
    pools = _topic_pools()
    generator = torch.Generator().manual_seed(seed)
    texts: list[str] = []
    labels: list[str] = []
    for topic in sorted(pools):
        pool = pools[topic]
        # One draw per topic from a single generator in a fixed order: reproducible, and a different
        # seed changes every topic's sample.
        order = torch.randperm(len(pool), generator=generator)[:per_class]
        for i in sorted(order.tolist()):  # keep source order inside a topic
            texts.append(pool[i])
            labels.append(topic)
    return texts, labels


@functools.lru_cache(maxsize=1)
def _topic_pools() -> dict[str, tuple[str, ...]]:
    """label -> its unique cleaned paragraphs in source order; paragraphs found in two labels dropped."""
    stdlib = sysconfig.get_paths().get("stdlib")
    if not stdlib or not os.path.isdir(stdlib):
        raise DataError("the Python standard library sources were not found: stdlib-topic needs them; "
                        "pass a local task file (.csv or .jsonl) instead")
    root = Path(stdlib)
    found: dict[str, dict[str, None]] = {topic: {} for topic in TOPIC_MODULES}  # ordered sets
    for path in _stdlib_files(root):
        topic = _MODULE_TOPIC.get(path.relative_to(root).parts[0].removesuffix(".py"))
        if topic is None:
            continue
        for doc in _docstrings(path):
            for paragraph in clean_paragraphs(doc):
                found[topic][paragraph] = None
    counts: dict[str, int] = {}
    for paragraphs in found.values():
        for p in paragraphs:
            counts[p] = counts.get(p, 0) + 1
    pools = {topic: tuple(p for p in paragraphs if counts[p] == 1) for topic, paragraphs in found.items()}
    if any(len(pool) == 0 for pool in pools.values()):
        empty = [t for t, pool in pools.items() if not pool]
        raise DataError(f"the standard library sources hold no paragraphs for topics {empty}: "
                        "pass a local task file (.csv or .jsonl) instead")
    return pools


# ----------------------------------------------------------------------------------------------------
# stdlib-retrieval
# ----------------------------------------------------------------------------------------------------

RETRIEVAL_MIN_WORDS, RETRIEVAL_MAX_WORDS = 4, 40
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")  # ". Next" -- not "e.g. foo" or "os.path"


def stdlib_retrieval_pairs() -> list[tuple[str, str]]:
    """The ``(query, document)`` pairs of stdlib-retrieval (see the module docstring), in source order.

    Deterministic for a given Python installation (files by sorted path, definitions in source order);
    cached in-process, the returned list is a fresh copy. Raises DataError when the standard library
    sources cannot be found.
    """
    return list(_retrieval_pairs())


@functools.lru_cache(maxsize=1)
def _retrieval_pairs() -> tuple[tuple[str, str], ...]:
    stdlib = sysconfig.get_paths().get("stdlib")
    if not stdlib or not os.path.isdir(stdlib):
        raise DataError("the Python standard library sources were not found: stdlib-retrieval needs them; "
                        "leave it out of --tasks (or evaluation.tasks)")
    root = Path(stdlib)
    found: list[tuple[str, str]] = []
    for path in _stdlib_files(root):
        parts = path.relative_to(root).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if not parts or any(p.startswith("_") for p in parts):
            continue  # private modules (_pydecimal, __main__) document no public API
        found += _file_pairs(path, ".".join(parts))
    # One joined string: "x in corpus" is then one fast substring search per text, not 10,000.
    corpus = "\n".join(builtin_texts())
    queries = Counter(q for q, _ in found)
    documents = Counter(d for _, d in found)
    pairs = tuple((q, d) for q, d in found
                  if queries[q] == 1 and documents[d] == 1 and d not in corpus and q not in corpus)
    if not pairs:
        raise DataError("the standard library sources hold no retrieval pairs: leave stdlib-retrieval out of the tasks")
    return pairs


def _file_pairs(path: Path, module: str) -> list[tuple[str, str]]:
    """(query, document) of every public documented definition of one file, in source order."""
    try:
        with tokenize.open(path) as f:
            tree = ast.parse(f.read(), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node, qualname in _public_definitions(tree.body, module):
        document = _first_sentence(ast.get_docstring(node, clean=True) or "")
        if document is None:
            continue
        if isinstance(node, ast.ClassDef):
            out.append((f"class {qualname}", document))
        else:
            out.append((f"{qualname}({', '.join(_parameters(node.args))})", document))
    return out


def _public_definitions(body: list[ast.stmt], prefix: str) -> Iterator[tuple[ast.AST, str]]:
    """Public classes and functions with their dotted names: module level (also inside if / try
    blocks) and class bodies, never function bodies (local helpers are not API)."""
    for stmt in body:
        if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if stmt.name.startswith("_"):
                continue
            yield stmt, f"{prefix}.{stmt.name}"
            if isinstance(stmt, ast.ClassDef):
                yield from _public_definitions(stmt.body, f"{prefix}.{stmt.name}")
            continue
        for field in ("body", "orelse", "finalbody"):
            inner = getattr(stmt, field, None)
            if isinstance(inner, list):
                yield from _public_definitions(inner, prefix)
        for handler in getattr(stmt, "handlers", []):
            yield from _public_definitions(handler.body, prefix)


def _parameters(args: ast.arguments) -> list[str]:
    """Parameter names as a reader sees them: ``a, b, *rest, key, **kw`` (no defaults, no self / cls)."""
    names = [a.arg for a in [*args.posonlyargs, *args.args] if a.arg not in ("self", "cls")]
    if args.vararg:
        names.append(f"*{args.vararg.arg}")
    elif args.kwonlyargs:
        names.append("*")
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg:
        names.append(f"**{args.kwarg.arg}")
    return names


def _first_sentence(doc: str) -> str | None:
    """First sentence of the first prose paragraph of a docstring, or None when it does not qualify."""
    for block in re.split(r"\n[ \t]*\n", doc):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if any(_looks_like_code(line) for line in lines):
            continue  # a signature line ("copy(x) -> y") or an example: the prose comes later
        paragraph = " ".join(_strip_markup(" ".join(lines)).split())
        sentence = _SENTENCE_END.split(paragraph, maxsplit=1)[0]
        visible = [c for c in sentence if not c.isspace()]
        letters = sum(c.isalpha() for c in visible)
        words = len(sentence.split())
        if (RETRIEVAL_MIN_WORDS <= words <= RETRIEVAL_MAX_WORDS and sentence[0].isupper()
                and letters >= MIN_LETTER_FRACTION * len(visible)):
            return sentence
        return None  # the first prose paragraph decides: a later one would not describe the name
    return None
