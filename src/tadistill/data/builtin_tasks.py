"""A labeled task made from the built-in corpus: "stdlib-topic", so downstream evaluation needs no download.

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
"""

from __future__ import annotations

import functools
import os
import sysconfig
from pathlib import Path

import torch

from tadistill.data.builtin import _docstrings, _stdlib_files, clean_paragraphs
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
