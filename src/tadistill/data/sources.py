"""Where the unlabeled corpus comes from: the built-in prose, local files, or a Hugging Face dataset.

A *source* is one string, resolved in this order:

1. ``"builtin"`` -- :func:`tadistill.data.builtin.builtin_texts` (no download, a few MB of English);
2. an existing local path -- a ``.txt`` file (paragraphs separated by blank lines), a ``.jsonl`` file
   (one JSON object per line), a ``.parquet`` or ``.csv`` file (a text column), or a folder holding
   such files (read recursively, in sorted path order, hidden files skipped);
3. anything else -- a Hugging Face dataset name, optionally ``"name:config"``, loaded with
   ``datasets.load_dataset(name, config, split=split)``.

Every text is stripped and empty texts are dropped. Mistakes raise :class:`~tadistill.errors.DataError`
with a one-line message.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tadistill.data.builtin import BUILTIN_CORPUS_VERSION, builtin_texts
from tadistill.errors import DataError

BUILTIN = "builtin"
SUFFIXES = (".txt", ".jsonl", ".parquet", ".csv")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def load_texts(source: str, *, text_field: str = "text", split: str = "train") -> list[str]:
    """Load the corpus named by ``source`` as a list of non-empty, stripped texts.

    ``text_field`` names the JSON key / column of ``.jsonl``, ``.parquet``, ``.csv`` files and hub
    datasets (``.txt`` files and the built-in corpus ignore it); ``split`` is used for hub datasets only.
    Raises DataError when the source cannot be found or read, or holds no text.
    """
    if source == BUILTIN:
        texts = builtin_texts()
    else:
        path = _local_path(source)
        if path is not None:
            texts = []
            for file in _corpus_files(source, path):
                texts.extend(_read_file(file, text_field))
        else:
            texts = _load_hub(source, text_field=text_field, split=split)
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
    else:
        path = _local_path(source)
        if path is not None:
            parts = ["files", text_field]
            for file in _corpus_files(source, path):
                stat = file.stat()
                parts += [str(file.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
        else:
            parts = ["hub", source, split, text_field]
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def _local_path(source: str) -> Path | None:
    """The local file or folder ``source`` names, or None when it names none (then: a hub dataset)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    # Obviously a path, not a hub name: fail here instead of asking the hub about "./data.txt".
    if source.startswith(("/", "./", "../", "~", "\\")) or source.lower().endswith(SUFFIXES):
        raise DataError(
            f"corpus {source!r} not found: no such file or folder; check the path, "
            "or give a Hugging Face dataset name or 'builtin'"
        )
    return None


def _corpus_files(source: str, path: Path) -> list[Path]:
    """The readable corpus files of a file or folder source, sorted by path."""
    return data_files(source, path, SUFFIXES, what="corpus")


def data_files(source: str, path: Path, suffixes: tuple[str, ...], *, what: str) -> list[Path]:
    """``path`` itself, or the files with one of ``suffixes`` under the folder (hidden ones skipped), sorted.

    Raises DataError for a file of another type, or a folder without any such file.
    """
    if path.is_file():
        if path.suffix.lower() not in suffixes:
            raise DataError(
                f"{what} file {source!r} has an unsupported type {path.suffix!r}: use one of {', '.join(suffixes)}"
            )
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(
            f"{what} {source!r} is empty: the folder holds no {', '.join(suffixes)} files; add some or point "
            "data.source elsewhere"
        )
    return files


def _read_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            return _PARAGRAPH_BREAK.split(path.read_text(encoding="utf-8").replace("\r\n", "\n"))
        if suffix == ".jsonl":
            return _read_jsonl(path, text_field)
        if suffix == ".parquet":
            return _read_parquet(path, text_field)
        return _read_csv(path, text_field)
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise DataError(
            f"cannot read corpus file '{path}' ({_short(exc)}): check that it is a valid, "
            f"UTF-8 {suffix} file"
        ) from exc


def jsonl_records(path: Path, *, what: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON value) of every non-blank line; DataError naming the line on invalid JSON."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{what} file '{path}' line {number} is not valid JSON ({exc.msg}): write one JSON object per line"
                ) from exc


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    texts: list[str] = []
    for number, record in jsonl_records(path, what="corpus"):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(
                f"corpus file '{path}' line {number} has no string field {text_field!r}: "
                "give every line that field or set the text field to the right key"
            )
        texts.append(record[text_field])
    return texts


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq  # installed with `datasets`; imported lazily, it is slow to import

    schema = pq.read_schema(path)
    if text_field not in schema.names:
        raise DataError(
            f"corpus file '{path}' has no column {text_field!r} (columns: {', '.join(schema.names)}): "
            "set the text field to one of them"
        )
    column = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    return [t for t in column if isinstance(t, str)]


def _read_csv(path: Path, text_field: str) -> list[str]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        names = reader.fieldnames or []
        if text_field not in names:
            raise DataError(
                f"corpus file '{path}' has no column {text_field!r} (columns: {', '.join(names)}): "
                "set the text field to one of them"
            )
        return [row[text_field] or "" for row in reader]


def _load_hub(source: str, *, text_field: str, split: str) -> list[str]:
    name, _, config = source.partition(":")
    try:
        import datasets

        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # any failure (offline, unknown name, bad config) means "not found"
        raise DataError(
            f"corpus {source!r} not found: it is not a local file or folder and the Hugging Face hub "
            f"could not load it ({_short(exc)})"
        ) from exc
    if text_field not in dataset.column_names:
        raise DataError(
            f"dataset {source!r} has no column {text_field!r} (columns: {', '.join(dataset.column_names)}): "
            "set the text field to one of them"
        )
    return [t for t in dataset[text_field] if isinstance(t, str)]


def _short(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception message, shortened, so DataError messages stay one line."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
