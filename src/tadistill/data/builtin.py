"""The built-in corpus: English prose that ships with every Python installation.

Task-agnostic distillation only needs unlabeled text, and the demo must run with no download. Every
CPython carries a few MB of carefully written English in two places:

* ``pydoc_data.topics.topics`` -- the language reference sections that ``help("for")`` prints;
* the docstrings of the standard library's modules, classes and functions.

The docstrings are read with :mod:`ast` from the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``
without importing them: importing ``antigravity`` opens a browser, ``this`` prints a poem, and many
modules start threads or touch the platform. Test suites, IDLE, demos, lib2to3, ensurepip, the venv
activation scripts and third-party packages are skipped.

The text is split into paragraphs and cleaned: doctest sessions, indented code blocks, code-looking
lines and tables are dropped, reST markup is reduced to its text, whitespace is collapsed, and only
paragraphs of at least 8 words made mostly of letters are kept. Exact duplicates (after this
normalization) are removed. The order is deterministic: pydoc topics by name, then files by sorted
path and docstrings by position in the file, so two processes produce the same list.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path

# Bumped whenever the cleaning rules change, so that caches keyed on it are invalidated.
BUILTIN_CORPUS_VERSION = 1

MIN_WORDS = 8
MIN_LETTER_FRACTION = 0.75  # letters / non-space characters; docstring prose mostly scores 0.8-0.9

# Folder names skipped anywhere under the stdlib: tests, GUI demos, installers, third-party code.
_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "__pycache__",
        "lib-dynload",
        "__phello__",
        "pydoc_data",  # read above through its `topics` dict; its 0.5 MB source has no docstrings
    }
)

_DOCTEST = re.compile(r"^\s*(>>>|\.\.\.)(\s|$)")
_BORDER = re.compile(r"^\s*[-=+*~^#_:.|`'\"]{3,}\s*$")  # rule lines, section underlines
_TABLE = re.compile(r"^\s*(\+[-=+]{2,}|\|)")  # grid-table rows and borders
_DIRECTIVE = re.compile(r"^\s*\.\.\s")  # ".. note::", ".. versionadded:: 3.2", comments
_CODE_START = re.compile(
    r"^\s*(def|class|import|from|return|raise|elif|else|try|except|finally|with|while|for|if|yield|"
    r"lambda|assert|del|pass|async|await|print)\b.*[:)\]]\s*$"
)
_CALL = re.compile(r"^[\w.]+\(.*\)[:,]?$")  # a lone call or signature line: "dis(pickle, out=None)"
_ASSIGN = re.compile(r"^\s*[A-Za-z_][\w.\[\]'\"]*\s*(=|\+=|-=|\*=|/=)\s*\S")
_CODE_CHARS = frozenset("()[]{}=<>;@#\\|/%&^~$")  # not "_" or "*": snake_case and *emphasis* are prose
_COLUMNS = re.compile(r"\S\s{3,}\S.*\S\s{3,}\S")  # two gaps of 3+ spaces: aligned table columns

# reST roles and inline markup, reduced to their text (Docutils reStructuredText spec, "Inline markup").
_ROLE = re.compile(r":(?:[\w-]+:)+`~?!?([^`<]*?)(?:\s*<[^`>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)(?:\s*<[^`>]*>)?`__?")
_LITERAL = re.compile(r"``(.+?)``")
_TEX_QUOTES = re.compile(r"``([^`']{1,80})''")  # old docstrings quote TeX-style: ``like this''
_DEFAULT_ROLE = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_FIELD = re.compile(r"^:[\w ]+[\w.]*:\s*")  # ":param x:", ":returns:" field markers
_ESCAPE = re.compile(r"\\(.)")


def builtin_texts() -> list[str]:
    """Return the built-in corpus as a list of cleaned English paragraphs (a few MB in all).

    Deterministic for a given Python installation and cached in-process; the returned list is a fresh
    copy, so callers may modify it. Prints nothing.
    """
    return list(_builtin_paragraphs())


@functools.lru_cache(maxsize=1)
def _builtin_paragraphs() -> tuple[str, ...]:
    seen: set[str] = set()
    out: list[str] = []
    for raw in _raw_documents():
        for paragraph in clean_paragraphs(raw):
            if paragraph not in seen:
                seen.add(paragraph)
                out.append(paragraph)
    return tuple(out)


def _raw_documents() -> Iterator[str]:
    """Yield the raw help texts and docstrings in a deterministic order."""
    try:
        from pydoc_data.topics import topics  # plain data module, no side effects
    except ImportError:  # some distributions split pydoc_data into another package
        topics = {}
    for name in sorted(topics):
        yield topics[name]
    stdlib = sysconfig.get_paths().get("stdlib")
    if stdlib and os.path.isdir(stdlib):
        for path in _stdlib_files(Path(stdlib)):
            yield from _docstrings(path)


def _stdlib_files(root: Path) -> list[Path]:
    """All stdlib ``.py`` files worth reading, sorted by their path relative to ``root``."""
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        rel = Path(folder).relative_to(root)
        # Prune in place so os.walk never descends into skipped folders (test/ alone is ~40% of it).
        dirs[:] = [
            d
            for d in dirs
            if d not in _SKIP_DIRS
            and not d.startswith((".", "config-"))
            and not (rel.parts[-1:] == ("venv",) and d == "scripts")
        ]
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(path: Path) -> Iterator[str]:
    """Docstrings of the module, classes and functions of one file, in source order, without import."""
    try:
        with tokenize.open(path) as f:  # honours the PEP 263 encoding declaration
            tree = ast.parse(f.read(), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in [tree, *_definitions(tree.body)]:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc


def _definitions(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """Classes and functions in source order, also those nested in if / try / with blocks.

    Only statement lists are visited, never expressions: docstrings cannot live there, and skipping
    them makes this several times faster than ast.walk over the whole tree.
    """
    for stmt in body:
        if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield stmt
        for field in ("body", "orelse", "finalbody"):
            inner = getattr(stmt, field, None)
            if isinstance(inner, list):
                yield from _definitions(inner)
        for handler in getattr(stmt, "handlers", []):
            yield from _definitions(handler.body)
        for case in getattr(stmt, "cases", []):
            yield from _definitions(case.body)


def clean_paragraphs(text: str) -> list[str]:
    """Split a help text or docstring into cleaned prose paragraphs (see the module docstring)."""
    out: list[str] = []
    previous_last = ""  # last non-blank line of the previous block
    previous_indent = 0
    for block in re.split(r"\n[ \t]*\n", text.expandtabs(8)):
        lines = [line.rstrip() for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        indent = min(len(line) - len(line.lstrip()) for line in lines)
        # An indented block introduced by "::" (reST literal block) or by ":" (pydoc renders "::" as
        # ":") is an example listing when any of its lines looks like code.
        introduced = previous_last.endswith(":") and indent > previous_indent
        literal = introduced and (previous_last.endswith("::") or any(map(_looks_like_code, lines)))
        previous_last, previous_indent = lines[-1], indent
        if literal:
            continue
        paragraph = _clean_block(lines)
        if paragraph is not None:
            out.append(paragraph)
    return out


def _clean_block(lines: list[str]) -> str | None:
    """Join the prose lines of one block into one normalized paragraph, or None to drop it."""
    kept: list[str] = []
    code = 0
    for line in lines:
        if _DOCTEST.match(line):
            break  # a doctest session runs to the end of its block, outputs included
        if _BORDER.match(line) or _TABLE.match(line) or _DIRECTIVE.match(line) or "::=" in line:
            code += 1
            continue
        if _looks_like_code(line):
            code += 1
            continue
        kept.append(_FIELD.sub("", line.strip()))
    # A block that is one-third code is a listing with comments, not prose with one odd line.
    if not kept or code * 3 >= len(lines):
        return None
    text = _strip_markup(" ".join(kept))
    text = " ".join(text.split())
    if text.endswith("::"):
        text = text[:-1]
    words = text.split()
    if len(words) < MIN_WORDS:
        return None
    visible = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    if letters < MIN_LETTER_FRACTION * len(visible):
        return None
    return text


def _looks_like_code(line: str) -> bool:
    """Heuristic: a source line, an assignment, a signature or an aligned table row."""
    s = line.strip()
    if _DOCTEST.match(s) or _CODE_START.match(s) or _ASSIGN.match(s) or _COLUMNS.search(s):
        return True
    if _CALL.match(s) or s.startswith(("#", "@")) or s.endswith(("{", "}")) or " # " in s or "->" in s:
        return True
    visible = [c for c in s if not c.isspace()]
    symbols = sum(c in _CODE_CHARS for c in visible)
    return symbols >= 3 and symbols > 0.12 * len(visible)


def _strip_markup(text: str) -> str:
    """Reduce reST inline markup to its text: ":func:`x`" -> "x", "``x``" -> "x", "**x**" -> "x"."""
    text = _ROLE.sub(r"\1", text)
    text = _TEX_QUOTES.sub(r'"\1"', text)
    text = _LITERAL.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _DEFAULT_ROLE.sub(r"\1", text)
    text = _STRONG.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    return _ESCAPE.sub(r"\1", text)
