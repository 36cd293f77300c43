"""One set of readers: records (dicts of named fields) from files, folders or Hugging Face datasets.

The corpus (``data/sources.py``) reads one text field per record and the prompt / completion data
(``data/prompts.py``) reads two; both read through :func:`read_records`, so a source means the same
files, and a mistake gets the same one-line :class:`~tadistill.errors.DataError`, whichever reads it.

A source is one string:

- an existing local path: a file with one of the caller's suffixes, or a folder read recursively in
  sorted path order (hidden files and folders skipped, other file types ignored). Per file type:
  ``.txt`` paragraphs separated by blank lines, each one record of the single field asked for;
  ``.jsonl`` one JSON object per line (blank lines skipped); ``.parquet`` and ``.csv`` columns;
- anything else that does not look like a path: a hub dataset name, optionally ``"name:config"``,
  loaded with ``datasets.load_dataset(name, config, split=split)``.

Values are passed on as read: whitespace is kept (the corpus strips, prompt data must not: a leading
space changes a BPE token) and nothing is dropped here. A ``.jsonl`` line must give every field as a
string; a ``.csv`` cell is a string ("" when the row is short); a ``.parquet`` or hub column may hold
None (a null) but nothing else that is not text, such as a list of chat messages.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from tadistill.errors import DataError

SUFFIXES = (".txt", ".jsonl", ".parquet", ".csv")  # every file type there is a reader for
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")  # what separates paragraphs of a .txt file (see _txt_records)
_PARQUET_BATCH = 4096  # rows per read of a .parquet file
# Prefixes that make a string a path, never a hub name: asking the hub about "./data.txt" only
# delays the error and makes it less clear.
_PATH_PREFIXES = ("/", "./", "../", "~", "\\")


@dataclass(frozen=True)
class DataKind:
    """What a caller reads: its name in messages, the file types it accepts, how to fix a missing source.

    what: opens every message ("corpus", "prompt data").
    suffixes: the file types a file or folder source may hold, some of ``SUFFIXES``, e.g. (".jsonl", ".csv").
    not_found_hint: ends the message for a local path that does not exist ("check data.source").
    """

    what: str
    suffixes: tuple[str, ...]
    not_found_hint: str

    def __post_init__(self) -> None:
        unknown = [s for s in self.suffixes if s not in SUFFIXES]
        if unknown:  # a programming error, not a user's
            raise ValueError(f"no reader for {unknown}: suffixes must be some of {SUFFIXES}")


class Field(NamedTuple):
    """A field to read: its JSON key / column name, and the setting that chooses it (named in errors)."""

    name: str
    setting: str


def read_records(
    source: str, kind: DataKind, fields: Sequence[Field], *, split: str = "train", streaming: bool = False
) -> Iterator[dict[str, Any]]:
    """Yield one dict {field name: value} per record of ``source`` (see the module docstring).

    ``split`` is used for hub datasets only. A ``.txt`` file gives records of ``fields[0]`` only, so it
    belongs in ``kind.suffixes`` only for single-field reads. Raises DataError (one line) when the
    source is missing, unreadable, of another type, or lacks a field. Local files are always read
    lazily (a line, a paragraph or a row group at a time); ``streaming=True`` reads a hub dataset with
    ``datasets``' streaming mode too (record by record, nothing downloaded whole), and a dataset that
    cannot be streamed is a DataError.
    """
    path = local_path(source, kind)
    if path is None:
        yield from (_hub_stream(source, kind, fields, split) if streaming else _hub_records(source, kind, fields, split))
        return
    for file in source_files(source, path, kind):
        yield from _file_records(file, kind, fields)


def local_path(source: str, kind: DataKind) -> Path | None:
    """The existing file or folder ``source`` names; None for a hub name; DataError for a missing path."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if source.startswith(_PATH_PREFIXES) or source.lower().endswith(kind.suffixes):
        raise DataError(f"{kind.what} {source!r} not found: no such file or folder; {kind.not_found_hint}")
    return None


def source_files(source: str, path: Path, kind: DataKind) -> list[Path]:
    """``path`` itself, or the files of ``kind.suffixes`` under the folder (hidden ones skipped), sorted.

    Raises DataError for a file of another type, or a folder without any such file.
    """
    suffixes = kind.suffixes
    if path.is_file():
        if path.suffix.lower() not in suffixes:
            raise DataError(
                f"{kind.what} file {source!r} has an unsupported type {path.suffix!r}: use one of "
                f"{', '.join(suffixes)}"
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
            f"{kind.what} {source!r} is empty: the folder holds no {', '.join(suffixes)} files; add some or "
            "point data.source elsewhere"
        )
    return files


def fingerprint(source: str, kind: DataKind, fields: Sequence[Field], *, split: str = "train") -> str:
    """A cheap hex sha256 that changes when what ``read_records`` would give changes (a cache key part).

    Files: the fields, and each file's path, size and modification time (ns), without reading it. Hub
    datasets: name, split and fields (the ``datasets`` cache versions their content itself).
    """
    names = "+".join(f.name for f in fields)
    path = local_path(source, kind)
    if path is None:
        parts = ["hub", source, split, names]
    else:
        parts = ["files", names]
        for file in source_files(source, path, kind):
            stat = file.stat()
            parts += [str(file.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception message, shortened, so that DataError messages stay one line."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------- internals


def _file_records(path: Path, kind: DataKind, fields: Sequence[Field]) -> Iterator[dict[str, Any]]:
    suffix = path.suffix.lower()
    where = f"{kind.what} file '{path}'"
    read = {".txt": _txt_records, ".jsonl": _jsonl_records, ".parquet": _parquet_records, ".csv": _csv_records}
    try:
        yield from read[suffix](path, where, fields)  # source_files passes only these suffixes
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:  # pyarrow's errors are ValueErrors
        raise DataError(
            f"cannot read {where} ({short_reason(exc)}): check that it is a valid, UTF-8 {suffix} file"
        ) from exc


def _txt_records(path: Path, where: str, fields: Sequence[Field]) -> Iterator[dict[str, Any]]:
    """Paragraphs, read line by line (a file of any size costs one paragraph of memory).

    A line of only spaces and tabs ends a paragraph; the paragraph is its lines joined by newlines (the
    text between two matches of ``_PARAGRAPH_BREAK`` in the whole file, up to surrounding whitespace;
    runs of blank lines give empty paragraphs, which the corpus drops).
    """
    if len(fields) != 1:
        raise DataError(f"{where} is plain text, without fields: use .jsonl, .parquet or .csv files")
    name = fields[0].name
    lines: list[str] = []
    with path.open(encoding="utf-8") as f:  # universal newlines: \r\n and \r read as \n
        for line in f:
            line = line.removesuffix("\n")
            if line.strip(" \t"):
                lines.append(line)
            else:
                yield {name: "\n".join(lines)}
                lines = []
    yield {name: "\n".join(lines)}


def _jsonl_records(path: Path, where: str, fields: Sequence[Field]) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where} line {number} is not valid JSON ({exc.msg}): write one JSON object per line"
                ) from exc
            for field in fields:
                if not isinstance(record, dict) or not isinstance(record.get(field.name), str):
                    raise DataError(
                        f"{where} line {number} has no string field {field.name!r}: give every line that "
                        f"field or set {field.setting} to the right key"
                    )
            yield {field.name: record[field.name] for field in fields}


def _parquet_records(path: Path, where: str, fields: Sequence[Field]) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq  # installed with `datasets`; imported lazily, it is slow to import

    _check_columns(where, fields, pq.read_schema(path).names)
    columns = list(dict.fromkeys(f.name for f in fields))
    # A batch of rows at a time: a file of any size costs one batch of memory.
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
        yield from _column_records(where, fields, {f.name: batch.column(f.name).to_pylist() for f in fields})


def _csv_records(path: Path, where: str, fields: Sequence[Field]) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        _check_columns(where, fields, list(reader.fieldnames or []))
        for row in reader:
            yield {field.name: row[field.name] or "" for field in fields}  # None: a short row


def _hub_records(source: str, kind: DataKind, fields: Sequence[Field], split: str) -> Iterator[dict[str, Any]]:
    name, _, config = source.partition(":")
    try:
        import datasets

        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # any failure (offline, unknown name, bad config) means "not found"
        raise DataError(
            f"{kind.what} {source!r} not found: it is not a local file or folder and the Hugging Face hub "
            f"could not load it ({short_reason(exc)})"
        ) from exc
    where = f"dataset {source!r}"
    _check_columns(where, fields, list(dataset.column_names))
    yield from _column_records(where, fields, {f.name: dataset[f.name] for f in fields})


def _hub_stream(source: str, kind: DataKind, fields: Sequence[Field], split: str) -> Iterator[dict[str, Any]]:
    """Records of a hub dataset in ``datasets``' streaming mode, checked one by one."""
    name, _, config = source.partition(":")
    try:
        import datasets

        dataset = datasets.load_dataset(name, config or None, split=split, streaming=True)
        records = iter(dataset)
        first = next(records, None)
    except Exception as exc:  # offline, unknown name, or a loader without streaming support
        raise DataError(
            f"{kind.what} {source!r} cannot be streamed: it is not a local file or folder and the Hugging Face "
            f"hub could not stream it ({short_reason(exc)}); save it as .jsonl or .parquet files and point at them"
        ) from exc
    where = f"dataset {source!r}"
    if first is None:
        return
    _check_columns(where, fields, list(first))
    for number, record in enumerate(itertools.chain([first], records), start=1):
        for field in fields:
            value = record.get(field.name)
            if value is not None and not isinstance(value, str):
                raise DataError(
                    f"{where} record {number} field {field.name!r} holds {type(value).__name__}, not text: set "
                    f"{field.setting} to a text field"
                )
        yield {field.name: record.get(field.name) for field in fields}


def _check_columns(where: str, fields: Sequence[Field], names: list[str]) -> None:
    for field in fields:
        if field.name not in names:
            raise DataError(
                f"{where} has no column {field.name!r} (columns: {', '.join(names)}): set {field.setting} "
                "to one of them"
            )


def _column_records(where: str, fields: Sequence[Field], columns: dict[str, list]) -> Iterator[dict[str, Any]]:
    """Rows of whole columns; nulls pass (the caller drops them), other non-text values are errors."""
    for field in fields:
        bad = next((v for v in columns[field.name] if v is not None and not isinstance(v, str)), None)
        if bad is not None:
            raise DataError(
                f"{where} column {field.name!r} holds {type(bad).__name__} values, not text: set "
                f"{field.setting} to a text column (conversational data must be rendered to text first)"
            )
    names = [field.name for field in fields]
    for values in zip(*(columns[n] for n in names)):
        yield dict(zip(names, values))
