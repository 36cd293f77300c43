"""Where the unlabeled corpus comes from: the built-in prose, local files, or a Hugging Face dataset.

A *source* is one string, resolved in this order:

1. ``"builtin"`` -- :func:`tadistill.data.builtin.builtin_texts` (no download, a few MB of English);
2. an existing local path -- a ``.txt`` file (paragraphs separated by blank lines), a ``.jsonl`` file
   (one JSON object per line), a ``.parquet`` or ``.csv`` file (a text column), or a folder holding
   such files (read recursively, in sorted path order, hidden files skipped);
3. anything else -- a Hugging Face dataset name, optionally ``"name:config"``, loaded with
   ``datasets.load_dataset(name, config, split=split)``.

Files and hub datasets are read by :mod:`tadistill.data.readers` (shared with the prompt data): the
corpus takes the text field of each record. Every text is stripped and empty texts are dropped, as
are nulls of a .parquet or hub column. Mistakes raise :class:`~tadistill.errors.DataError` with a
one-line message.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from tadistill.data.builtin import BUILTIN_CORPUS_VERSION, builtin_texts
from tadistill.data.readers import DataKind, Field, fingerprint, read_records
from tadistill.errors import DataError

BUILTIN = "builtin"
SUFFIXES = (".txt", ".jsonl", ".parquet", ".csv")
CORPUS = DataKind("corpus", SUFFIXES, "check the path, or give a Hugging Face dataset name or 'builtin'")


@dataclass(frozen=True)
class SourceEntry:
    """One source of ``data.source``: its name, sampling weight (None: by size) and language (None: unknown)."""

    path: str
    weight: float | None = None
    language: str | None = None


def source_entries(source: Any) -> list[SourceEntry]:
    """``data.source`` (a name, or a list of names and ``{path, weight, language}`` entries) as a list."""
    items = source if isinstance(source, (list, tuple)) else [source]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(SourceEntry(item))
        elif isinstance(item, dict):
            out.append(SourceEntry(item["path"], item.get("weight"), item.get("language")))
        else:  # config.SourceSpec
            out.append(SourceEntry(item.path, item.weight, item.language))
    return out


def source_paths(source: Any) -> list[str]:
    """The names of ``data.source``'s sources, in order (weights and languages left out)."""
    return [entry.path for entry in source_entries(source)]


def load_texts(source: str, *, text_field: str = "text", split: str = "train") -> list[str]:
    """Load the corpus named by ``source`` as a list of non-empty, stripped texts.

    ``text_field`` names the JSON key / column of ``.jsonl``, ``.parquet``, ``.csv`` files and hub
    datasets (``.txt`` files and the built-in corpus ignore it); ``split`` is used for hub datasets only.
    Raises DataError when the source cannot be found or read, or holds no text.
    """
    return list(iter_texts(source, text_field=text_field, split=split))


def iter_texts(
    source: str, *, text_field: str = "text", split: str = "train", streaming: bool = False
) -> Iterator[str]:
    """The texts of ``source`` one at a time, stripped, empty ones dropped (``load_texts`` lazily).

    ``streaming=True`` streams hub datasets too (``datasets``' streaming mode); local files are always
    read lazily. Raises DataError as ``load_texts`` does, once the stream ends without any text.
    """
    if source == BUILTIN:
        raw: Iterable[str | None] = builtin_texts()
    else:
        records = read_records(source, CORPUS, [_text(text_field)], split=split, streaming=streaming)
        raw = (r[text_field] for r in records)
    empty = True
    for text in raw:
        text = text.strip() if text is not None else ""
        if text:
            empty = False
            yield text
    if empty:
        where = "" if source == BUILTIN else f" (field {text_field!r})"
        raise DataError(
            f"corpus {source!r} is empty: it holds no non-empty text{where}; "
            "point the corpus at files with text, or use 'builtin'"
        )


def source_fingerprint(source: str, *, text_field: str = "text", split: str = "train") -> str:
    """A cheap string that changes when the corpus content changes (the key of tokenization caches).

    Files: their paths, sizes and modification times (ns), without reading them. Built-in: the Python
    version and the cleaning-rules version. Hub datasets: name, split and field (hub datasets are
    versioned by the ``datasets`` cache itself). Returns a hex sha256 digest.
    """
    if source == BUILTIN:
        parts = [BUILTIN, str(BUILTIN_CORPUS_VERSION), sys.version]
        return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()
    return fingerprint(source, CORPUS, [_text(text_field)], split=split)


def _text(text_field: str) -> Field:
    # load_texts serves Python callers as well as data.text_field, so messages name the setting in words.
    return Field(text_field, "the text field")
