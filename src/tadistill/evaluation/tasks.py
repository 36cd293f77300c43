"""Labeled downstream tasks: GLUE and XNLI from the hub, the built-in "stdlib-topic", or local files.

A task is named by one string, resolved in this order:

1. a known name (``KNOWN_TASKS``): GLUE tasks, ``xnli-<lang>`` and ``pawsx-<lang>`` load with
   ``datasets.load_dataset(*hf_path, split=...)``; "stdlib-topic" is built from the Python standard
   library (:mod:`tadistill.data.builtin_tasks`), no download;
2. an existing local ``.csv`` / ``.jsonl`` file with columns ``text``, optional ``text_pair`` and
   ``label``, split 80/20 into train/eval by a stable hash of each row's text;
3. ``"TRAIN_PATH,EVAL_PATH"``: two such files, used as given.

Labels of local files and of stdlib-topic: when every label is an integer, the task is classification
and labels map to ids in increasing numeric order (0/1 stay 0/1); when every label is a number and one
is not an integer (``2.5``, or ``1.0`` to force it), the task is regression (``num_labels == 1``);
otherwise labels are strings mapped to ids in sorted order. Metrics: accuracy (plus F1 of id 1 for two
classes), or pearson and spearman for regression.

"stdlib-retrieval" (``RETRIEVAL_TASKS``) is no labeled task: it scores zero-shot retrieval by embedding
cosine (:mod:`tadistill.evaluation.retrieval`), and ``evaluate_task`` sends it there; ``load_task`` refuses it.
Token-level tasks (NER-style tagging, extractive QA: "stdlib-ner", "conll2003", "squad", CoNLL and SQuAD
files) have their own loaders in :mod:`tadistill.evaluation.token_tasks`; ``load_task`` refuses them too.

Rows are tuples ``(text, text_pair or None, label)``. Subsampling (``max_train`` / ``max_eval``) uses a
``torch.Generator`` seeded with ``seed`` and keeps the original row order.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tadistill.errors import ConfigError, DataError, did_you_mean
from tadistill.evaluation.retrieval import RETRIEVAL_TASKS

Row = tuple[str, "str | None", "float | int"]

METRIC_NAMES = ("accuracy", "f1", "matthews", "pearson", "spearman")
EVAL_FRACTION_PERCENT = 20  # local files without a separate eval file: 80/20 split by hash
LOCAL_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class TaskSpec:
    """What a task is and where it comes from.

    name: the task name (or the path string of a local task). text / text_pair / label: column names
    (text_pair is None for single-text tasks). num_labels: number of classes, 1 for regression.
    metrics: metric names from METRIC_NAMES; the first is the headline. train_split / eval_split: split
    names (hub splits, or "train"/"eval" for local data). hf_path: positional arguments of
    ``datasets.load_dataset`` (e.g. ``("glue", "cola")``), None for built-in and local tasks.
    """

    name: str
    text: str
    text_pair: str | None
    label: str
    num_labels: int
    metrics: tuple[str, ...]
    train_split: str
    eval_split: str
    hf_path: tuple[str, ...] | None

    def __post_init__(self) -> None:
        # Internal tables only: a wrong spec is a programming error, not a user mistake.
        unknown = [m for m in self.metrics if m not in METRIC_NAMES]
        assert self.metrics and not unknown, f"bad metrics {self.metrics!r}"
        assert self.num_labels >= 1, "num_labels must be >= 1"
        regression_metrics = {"pearson", "spearman"} >= set(self.metrics)
        assert (self.num_labels == 1) == regression_metrics, "regression iff pearson/spearman"

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


@dataclass
class TaskData:
    """A loaded task: rows ``(text, text_pair or None, label)``; labels are int ids (or floats for
    regression). label_names[i] is the original label of id i where known (empty for hub tasks)."""

    spec: TaskSpec
    train: list[tuple[str, str | None, float | int]]
    eval: list[tuple[str, str | None, float | int]]
    label_names: tuple[str, ...] = ()


def _glue(name: str, text: str, pair: str | None, num_labels: int, metrics: tuple[str, ...],
          eval_split: str = "validation") -> TaskSpec:
    # GLUE test labels are hidden (-1): every GLUE number is reported on the validation ("dev") split.
    return TaskSpec(name, text, pair, "label", num_labels, metrics, "train", eval_split, ("glue", name))


XNLI_LANGUAGES = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")
PAWSX_LANGUAGES = ("de", "en", "es", "fr", "ja", "ko", "zh")

KNOWN_TASKS: dict[str, TaskSpec] = {
    "cola": _glue("cola", "sentence", None, 2, ("matthews",)),
    "sst2": _glue("sst2", "sentence", None, 2, ("accuracy",)),
    "mrpc": _glue("mrpc", "sentence1", "sentence2", 2, ("f1", "accuracy")),
    "qqp": _glue("qqp", "question1", "question2", 2, ("f1", "accuracy")),
    "stsb": _glue("stsb", "sentence1", "sentence2", 1, ("pearson", "spearman")),
    "mnli": _glue("mnli", "premise", "hypothesis", 3, ("accuracy",), eval_split="validation_matched"),
    "qnli": _glue("qnli", "question", "sentence", 2, ("accuracy",)),
    "rte": _glue("rte", "sentence1", "sentence2", 2, ("accuracy",)),
    "wnli": _glue("wnli", "sentence1", "sentence2", 2, ("accuracy",)),
    # XNLI: the (machine-translated MNLI) train split of each language; its labeled test split, as
    # reported in the XNLI literature (Conneau et al. 2018).
    **{
        f"xnli-{lang}": TaskSpec(f"xnli-{lang}", "premise", "hypothesis", "label", 3, ("accuracy",),
                                 "train", "test", ("xnli", lang))
        for lang in XNLI_LANGUAGES
    },
    # PAWS-X (Yang et al. 2019): paraphrase identification, the (machine-translated) train split of each
    # language and its human-translated test split; cross-lingual transfer: tadistill.evaluation.crosslingual.
    **{
        f"pawsx-{lang}": TaskSpec(f"pawsx-{lang}", "sentence1", "sentence2", "label", 2, ("accuracy",),
                                  "train", "test", ("google-research-datasets/paws-x", lang))
        for lang in PAWSX_LANGUAGES
    },
    # Built in, no download: see tadistill.data.builtin_tasks. 8 topics, accuracy.
    "stdlib-topic": TaskSpec("stdlib-topic", "text", None, "label", 8, ("accuracy",), "train", "eval", None),
}


def load_task(name_or_path: str, *, max_train: int | None = None, max_eval: int | None = None,
              seed: int = 0) -> TaskData:
    """Load a task by name or from local files (see the module docstring) and subsample it.

    Raises ConfigError for an unknown name or bad max_* values, DataError for missing or malformed
    files, a hub dataset that cannot be loaded, or an empty split.
    """
    for key, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key} must be a positive integer or None, got {value!r}")
    name = str(name_or_path).strip()
    if name.lower() in RETRIEVAL_TASKS:
        raise ConfigError(f"{name!r} is a retrieval task with no labels: evaluate it with evaluate_task, "
                          "or tadistill evaluate --tasks stdlib-retrieval")
    from tadistill.evaluation.token_tasks import token_task_kind

    if token_task_kind(name) is not None:
        raise ConfigError(f"{name!r} is a token-level task (tags or answer spans): evaluate it with evaluate_task, "
                          f"or tadistill evaluate --tasks {name}")
    known = KNOWN_TASKS.get(name.lower())
    if known is not None and known.name == "stdlib-topic":
        data = _load_stdlib_topic(known)
    elif known is not None:
        data = _load_hub(known)
    else:
        data = _load_local(name)
    generator = torch.Generator().manual_seed(seed)
    data.train = _subsample(data.train, max_train, generator)
    data.eval = _subsample(data.eval, max_eval, generator)
    return data


def _subsample(rows: list, limit: int | None, generator: torch.Generator) -> list:
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(torch.randperm(len(rows), generator=generator)[:limit].tolist())
    return [rows[i] for i in keep]


# ----------------------------------------------------------------------------------------------------
# Built-in and hub tasks
# ----------------------------------------------------------------------------------------------------


def _load_stdlib_topic(spec: TaskSpec) -> TaskData:
    from tadistill.data.builtin_tasks import stdlib_topic_examples

    texts, labels = stdlib_topic_examples()
    names = tuple(sorted(set(labels)))
    ids = {n: i for i, n in enumerate(names)}
    train, eval_ = _hash_split([(t, None, ids[y]) for t, y in zip(texts, labels)])
    spec = replace(spec, num_labels=len(names))
    return TaskData(spec, train, eval_, names)


def _load_hub(spec: TaskSpec) -> TaskData:
    import datasets  # the module, not the function: tests monkeypatch datasets.load_dataset

    assert spec.hf_path is not None
    splits = []
    for split in (spec.train_split, spec.eval_split):
        try:
            ds = datasets.load_dataset(*spec.hf_path, split=split)
        except Exception as exc:  # noqa: BLE001 -- connection, not-cached, not-found: all one user message
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
            raise DataError(
                f"task {spec.name!r} could not be loaded with datasets.load_dataset{spec.hf_path!r}, split "
                f"{split!r} ({reason}): the Hugging Face hub is unreachable or the dataset is not cached; "
                "pass local files instead, e.g. 'train.csv,dev.csv' with columns text, text_pair, label"
            ) from None
        columns = [c for c in (spec.text, spec.text_pair, spec.label) if c is not None]
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise DataError(f"task {spec.name!r} split {split!r} lacks columns {missing} (it has {ds.column_names}): "
                            "the hub dataset changed; pass local files instead")
        texts = ds[spec.text]
        pairs = ds[spec.text_pair] if spec.text_pair else [None] * len(texts)
        cast = float if spec.is_regression else int
        # Unlabeled rows carry label -1 (GLUE test splits): drop them.
        rows = [(t, p, cast(y)) for t, p, y in zip(texts, pairs, ds[spec.label]) if spec.is_regression or y >= 0]
        if not rows:
            raise DataError(
                f"task {spec.name!r} split {split!r} has no labeled rows: pick another split or local files"
            )
        splits.append(rows)
    return TaskData(spec, splits[0], splits[1])


# ----------------------------------------------------------------------------------------------------
# Local files
# ----------------------------------------------------------------------------------------------------


def _load_local(name: str) -> TaskData:
    if Path(name).is_file():
        paths = [Path(name)]
    elif "," in name:
        paths = [Path(p.strip()) for p in name.split(",")]
        if len(paths) != 2 or not all(str(p) for p in paths):
            raise ConfigError(f"task {name!r}: give one file, or exactly two as 'TRAIN_PATH,EVAL_PATH'")
    elif Path(name).suffix.lower() in LOCAL_SUFFIXES or "/" in name or "\\" in name:
        raise DataError(f"task file {name!r} not found: check the path")
    else:
        from tadistill.evaluation.token_tasks import TOKEN_TASK_NAMES

        raise ConfigError(
            f"unknown task {name!r}{did_you_mean(name.lower(), [*KNOWN_TASKS, *RETRIEVAL_TASKS, *TOKEN_TASK_NAMES])}: "
            "use one of cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli, xnli-<lang>, stdlib-topic, "
            "stdlib-retrieval, stdlib-ner, conll2003, wikiann-<lang>, squad, squad_v2, or a .csv/.jsonl/.conll/.json file"
        )
    tables = [_read_table(p) for p in paths]
    has_pair = [pair for pair, _ in tables]
    if len(set(has_pair)) != 1:
        raise DataError(f"task {name!r}: only one of the two files has a text_pair column; give it to both or neither")
    raw = [rows for _, rows in tables]
    labels, num_labels, names = _encode_labels([y for rows in raw for _, _, y in rows], name)
    encoded, start = [], 0
    for rows in raw:
        encoded.append([(t, p, y) for (t, p, _), y in zip(rows, labels[start : start + len(rows)])])
        start += len(rows)
    if len(encoded) == 1:
        train, eval_ = _hash_split(encoded[0])
        if not train or not eval_:
            raise DataError(
                f"task file {name!r} has too few rows for an 80/20 split: add rows or pass 'TRAIN,EVAL' files"
            )
        splits = ("train", "eval")
    else:
        train, eval_ = encoded
        splits = (paths[0].name, paths[1].name)
    if num_labels == 1:
        metrics: tuple[str, ...] = ("pearson", "spearman")
    else:
        metrics = ("accuracy", "f1") if num_labels == 2 else ("accuracy",)
    spec = TaskSpec(name, "text", "text_pair" if has_pair[0] else None, "label", num_labels, metrics,
                    splits[0], splits[1], None)
    return TaskData(spec, train, eval_, names)


def _read_table(path: Path) -> tuple[bool, list[tuple[str, str | None, object]]]:
    """(has text_pair, rows with raw labels) of one .csv or .jsonl file."""
    if not path.is_file():
        raise DataError(f"task file {str(path)!r} not found: check the path")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"task file {str(path)!r} must be .csv or .jsonl (columns text, optional text_pair, label)")
    try:
        records = _read_csv(path) if suffix == ".csv" else _read_jsonl(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(
            f"task file {str(path)!r} could not be read ({type(exc).__name__}): check its encoding (UTF-8)"
        ) from None
    if not records:
        raise DataError(f"task file {str(path)!r} holds no rows: add rows with text and label")
    keys = set(records[0][1])
    has_pair = "text_pair" in keys
    rows = []
    for where, record in records:
        for column in ("text", "label", *(["text_pair"] if has_pair else [])):
            if column not in record:
                raise DataError(f"{where} of task file {str(path)!r} has no {column!r} column: "
                                "give columns text, optional text_pair, label")
        label = record["label"]
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{where} of task file {str(path)!r} has an empty label: fill it in or drop the row")
        if isinstance(label, (list, dict)):
            raise DataError(
                f"{where} of task file {str(path)!r}: label must be a string or number, not {type(label).__name__}"
            )
        pair = str(record["text_pair"]) if has_pair else None
        rows.append((str(record["text"] if record["text"] is not None else ""), pair, label))
    return has_pair, rows


def _read_csv(path: Path) -> list[tuple[str, dict]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        # Row numbers count the header as row 1, as a spreadsheet shows them.
        return [(f"row {i}", {k: v for k, v in rec.items() if k is not None}) for i, rec in enumerate(reader, 2)]


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    records = []
    with path.open(encoding="utf-8-sig") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"line {i} of task file {str(path)!r} is not valid JSON: one object per line") from None
            if not isinstance(record, dict):
                raise DataError(f"line {i} of task file {str(path)!r} is not a JSON object: one object per line")
            records.append((f"line {i}", record))
    return records


_INT = re.compile(r"^[+-]?\d+$")


def _encode_labels(raw: list[object], name: str) -> tuple[list[float | int], int, tuple[str, ...]]:
    """Raw labels -> (encoded labels, num_labels, label names); rules in the module docstring."""
    parsed: list[object] = []
    for y in raw:
        if isinstance(y, bool):
            parsed.append(str(y).lower())  # JSON true/false: categories, not numbers
        elif isinstance(y, (int, float)):
            parsed.append(y)
        else:
            s = str(y).strip()
            if _INT.match(s):
                parsed.append(int(s))
            else:
                try:
                    parsed.append(float(s))
                except ValueError:
                    parsed.append(s)
    if all(isinstance(y, int) for y in parsed):
        values = sorted(set(parsed))  # type: ignore[type-var]
    elif all(isinstance(y, (int, float)) for y in parsed):
        floats = [float(y) for y in parsed]  # type: ignore[arg-type]
        if not all(math.isfinite(y) for y in floats):
            raise DataError(f"task {name!r} has a NaN or infinite regression label: fix or drop those rows")
        return floats, 1, ()
    else:
        parsed = [str(y).strip() for y in raw]
        values = sorted(set(parsed))
    if len(values) < 2:
        raise DataError(f"task {name!r} has a single label value {values[0]!r}: a classification task needs at least 2")
    ids = {v: i for i, v in enumerate(values)}
    return [ids[y] for y in parsed], len(values), tuple(str(v) for v in values)


def _hash_split(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """80/20 train/eval split by a stable hash of (text, text_pair): identical texts share a split."""
    train, eval_ = [], []
    for row in rows:
        key = f"{row[0]}\0{row[1] or ''}".encode("utf-8")
        bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % 100
        (eval_ if bucket < EVAL_FRACTION_PERCENT else train).append(row)
    return train, eval_
