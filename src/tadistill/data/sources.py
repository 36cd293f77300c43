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

from tadistill.data.builtin import BUILTIN_CORPUS_VERSION, builtin_texts
from tadistill.data.readers import DataKind, Field, fingerprint, read_records
from tadistill.errors import DataError

BUILTIN = "builtin"
SUFFIXES = (".txt", ".jsonl", ".parquet", ".csv")
CORPUS = DataKind("corpus", SUFFIXES, "check the path, or give a Hugging Face dataset name or 'builtin'")


def load_texts(source: str, *, text_field: str = "text", split: str = "train") -> list[str]:
    """Load the corpus named by ``source`` as a list of non-empty, stripped texts.

    ``text_field`` names the JSON key / column of ``.jsonl``, ``.parquet``, ``.csv`` files and hub
    datasets (``.txt`` files and the built-in corpus ignore it); ``split`` is used for hub datasets only.
    Raises DataError when the source cannot be found or read, or holds no text.
    """
    if source == BUILTIN:
        texts = builtin_texts()
    else:
        records = read_records(source, CORPUS, [_text(text_field)], split=split)
        texts = [r[text_field] for r in records if r[text_field] is not None]
    texts = [t.strip() for t in texts]
    texts = [t for t in texts if t]
    if not texts:
        where = "" if source == BUILTIN else f" (field {text_field!r})"
        raise DataError(
            f"corpus {source!r} is empty: it holds no non-empty text{where}; "
            "point the corpus at files with text, or use 'builtin'"
        )
    return texts


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
