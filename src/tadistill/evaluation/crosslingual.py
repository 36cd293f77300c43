"""Cross-lingual transfer: train a linear probe (or fine-tune) on one language, test it on every language.

This is the zero-shot cross-lingual protocol of XNLI (Conneau et al. 2018, sec. 4) and of the XLM-R
evaluation (Conneau et al. 2020, table 1, "cross-lingual transfer"): the classifier sees labeled data
in one language only (English by convention) and is scored on the test split of each language. A
multilingual student that kept its teacher's shared space keeps the gap between the training language
and the others small; one that kept only the dominant language does not.

A task is one string:

- ``xnli`` (15 languages) or ``pawsx`` (7) -- from the hub through ``tasks.load_task`` (``xnli-<lang>``,
  ``pawsx-<lang>``): each language's train split and its labeled test split;
- ``l10n-topic`` -- built in, no download: the Django component of a user-interface message
  (:mod:`tadistill.data.builtin_multilingual`), parallel in about 100 languages, split by the English
  original so that no language's evaluation message has a translation in any training split;
- a ``.csv`` / ``.jsonl`` file with columns ``text``, optional ``text_pair``, ``label`` and ``language``
  (``lang`` works too): each language's rows split 80/20 by a stable hash of the text (as local tasks are);
- a pattern with ``{lang}``, one file or ``"TRAIN,EVAL"`` per language (``xnli/{lang}.train.jsonl,xnli/{lang}.test.jsonl``);
- a folder of ``<lang>.csv`` / ``<lang>.jsonl`` files.

Labels are encoded once over every language (local files), so label id i means the same in each;
tasks whose languages disagree on the label set are refused. Every number is a mean and standard
deviation over seeds, as in :mod:`tadistill.evaluation.downstream`, whose probe and fine-tuning steps
this module reuses with several evaluation sets.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from tadistill.errors import ConfigError, DataError
from tadistill.evaluation.downstream import (
    MODES,
    _check_seeds,
    _device,
    _fit_length,
    _load_classifier,
    _predict,
    _score,
    _summarize,
    _train_classifier,
    _train_head,
    _with_pad_token,
    encode_features,
)
from tadistill.evaluation.tasks import (
    LOCAL_SUFFIXES,
    PAWSX_LANGUAGES,
    XNLI_LANGUAGES,
    TaskData,
    TaskSpec,
    _encode_labels,
    _hash_split,
    _read_csv,
    _read_jsonl,
    _read_table,
    _subsample,
    load_task,
)

HUB_TASKS = {"xnli": XNLI_LANGUAGES, "pawsx": PAWSX_LANGUAGES, "paws-x": PAWSX_LANGUAGES}
BUILTIN_TASK = "l10n-topic"
BUILTIN_LANGUAGES = ("en", "de", "fr", "es", "ru", "zh_Hans")  # default: four scripts, three families
LANGUAGE_COLUMNS = ("language", "lang")


# ----------------------------------------------------------------------------------------------------
# Loading: one TaskData per language, with one label encoding
# ----------------------------------------------------------------------------------------------------


def load_crosslingual_task(task: str, *, languages: Sequence[str] | None = None, max_train: int | None = None,
                           max_eval: int | None = None, seed: int = 0) -> dict[str, TaskData]:
    """``{language: TaskData}`` of ``task`` (module docstring), in the order of ``languages`` (default: all).

    Subsampling is as in ``load_task`` (a generator seeded with ``seed``, per language). Raises
    ConfigError for an unknown task or language or bad max_* values, DataError for unreadable data,
    a language with no row, or languages whose label sets differ.
    """
    name = str(task).strip()
    if not name:
        raise ConfigError("give a cross-lingual task: xnli, pawsx, l10n-topic, a file with a language column, "
                          "a pattern with {lang}, or a folder of <lang>.csv/.jsonl files")
    wanted = _check_languages(languages)
    key = name.lower()
    if key in HUB_TASKS:
        prefix = "pawsx" if key.startswith("paws") else "xnli"
        codes = _pick(wanted, HUB_TASKS[key], name)
        tasks = {lang: load_task(f"{prefix}-{lang}", max_train=max_train, max_eval=max_eval, seed=seed)
                 for lang in codes}
    elif key == BUILTIN_TASK:
        tasks = _builtin_topic(wanted or BUILTIN_LANGUAGES)
    else:
        tasks = _local(name, wanted)
    for lang, data in tasks.items():
        if not data.train and not data.eval:
            raise DataError(f"task {name!r} has no row in language {lang!r}: give that language rows, or leave it out")
    if key not in HUB_TASKS:  # hub tasks were subsampled by load_task
        for data in tasks.values():
            generator = torch.Generator().manual_seed(seed)
            data.train = _subsample(data.train, _positive(max_train, "max_train"), generator)
            data.eval = _subsample(data.eval, _positive(max_eval, "max_eval"), generator)
    _same_labels(tasks, name)
    return tasks


def _positive(value: int | None, what: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{what} must be a positive integer or None, got {value!r}")
    return value


def _check_languages(languages: Sequence[str] | None) -> list[str] | None:
    if languages is None:
        return None
    if isinstance(languages, str):
        languages = [languages]
    codes = [str(lang).strip() for lang in languages]
    if not codes or not all(codes):
        raise ConfigError(f"languages must be a non-empty list of language codes, got {list(languages)!r}")
    if len(set(codes)) != len(codes):
        raise ConfigError(f"languages {codes} name one language twice: list each once")
    return codes


def _pick(wanted: list[str] | None, available: Sequence[str], task: str) -> list[str]:
    if wanted is None:
        return list(available)
    unknown = [lang for lang in wanted if lang not in available]
    if unknown:
        raise ConfigError(f"task {task!r} has no language {unknown[0]!r}: use some of {', '.join(available)}")
    return wanted


def _builtin_topic(languages: Sequence[str]) -> dict[str, TaskData]:
    from tadistill.data.builtin_multilingual import AREAS, OTHER_AREA, normalize_language, topic_rows

    names = tuple(sorted({*AREAS.values(), OTHER_AREA}))
    ids = {area: i for i, area in enumerate(names)}
    spec = TaskSpec(BUILTIN_TASK, "text", None, "label", len(names), ("accuracy",), "train", "eval", None)
    out = {}
    for language in languages:
        code = normalize_language(language)
        rows = topic_rows(code)
        split = {part: [(text, None, ids[area]) for text, area in items] for part, items in rows.items()}
        out[language] = TaskData(replace(spec, name=f"{BUILTIN_TASK}-{code}"), split["train"], split["eval"], names)
    return out


def _local(name: str, wanted: list[str] | None) -> dict[str, TaskData]:
    """Local files: a pattern with {lang}, a folder of <lang> files, or one file with a language column."""
    if "{lang}" in name:
        if wanted is None:
            raise ConfigError(f"task {name!r} is a pattern: give the languages to fill {{lang}} with (--languages)")
        parts = {lang: [Path(p.strip().replace("{lang}", lang)) for p in name.split(",")] for lang in wanted}
        if any(len(paths) not in (1, 2) for paths in parts.values()):
            raise ConfigError(f"task {name!r}: give one file pattern, or exactly two as 'TRAIN,EVAL'")
        tables = {lang: [_read_table(p) for p in paths] for lang, paths in parts.items()}
        return _encode(name, tables)
    path = Path(name)
    if path.is_dir():
        files = {p.stem: p for p in sorted(path.iterdir()) if p.suffix.lower() in LOCAL_SUFFIXES and p.is_file()}
        if not files:
            raise DataError(f"task folder {name!r} holds no <lang>.csv or <lang>.jsonl file")
        codes = _pick(wanted, list(files), name)
        return _encode(name, {lang: [_read_table(files[lang])] for lang in codes})
    if path.is_file():
        return _encode(name, _by_language_column(path, wanted))
    if path.suffix.lower() in LOCAL_SUFFIXES or "/" in name or "\\" in name:
        raise DataError(f"task file {name!r} not found: check the path")
    raise ConfigError(f"unknown cross-lingual task {name!r}: use xnli, pawsx, l10n-topic, a .csv/.jsonl file with a "
                      "language column, a pattern with {lang}, or a folder of <lang>.csv/.jsonl files")


def _by_language_column(path: Path, wanted: list[str] | None):
    """One file's rows grouped by their language column: ``{lang: [(has_pair, rows)]}``."""
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"task file {str(path)!r} must be .csv or .jsonl (columns text, optional text_pair, label, "
                        "language)")
    try:
        records = _read_csv(path) if suffix == ".csv" else _read_jsonl(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"task file {str(path)!r} could not be read ({type(exc).__name__}): check its encoding (UTF-8)") from None
    if not records:
        raise DataError(f"task file {str(path)!r} holds no rows: add rows with text, label and language")
    column = next((c for c in LANGUAGE_COLUMNS if c in records[0][1]), None)
    if column is None:
        raise DataError(f"task file {str(path)!r} has no 'language' column: give each row its language, or use a "
                        "pattern with {lang} / a folder of <lang> files")
    has_pair = "text_pair" in records[0][1]
    grouped: dict[str, list] = {}
    for where, record in records:
        for needed in ("text", "label", column, *(["text_pair"] if has_pair else [])):
            if needed not in record or record[needed] is None or str(record[needed]).strip() == "":
                raise DataError(f"{where} of task file {str(path)!r} has no {needed!r}: fill it in or drop the row")
        pair = str(record["text_pair"]) if has_pair else None
        grouped.setdefault(str(record[column]).strip(), []).append((str(record["text"]), pair, record["label"]))
    codes = _pick(wanted, list(grouped), str(path))
    return {lang: [(has_pair, grouped[lang])] for lang in codes}


def _encode(name: str, tables: dict[str, list[tuple[bool, list]]]) -> dict[str, TaskData]:
    """Raw per-language tables (one file: split 80/20 by hash; two: train, eval) -> TaskData, one label encoding."""
    pairs = {has_pair for parts in tables.values() for has_pair, _ in parts}
    if len(pairs) != 1:
        raise DataError(f"task {name!r}: some languages' files have a text_pair column and others not; give it to all")
    flat = [y for parts in tables.values() for _, rows in parts for _, _, y in rows]
    labels, num_labels, names = _encode_labels(flat, name)
    metrics: tuple[str, ...] = (("pearson", "spearman") if num_labels == 1
                                else ("accuracy", "f1") if num_labels == 2 else ("accuracy",))
    spec = TaskSpec(name, "text", "text_pair" if pairs.pop() else None, "label", num_labels, metrics,
                    "train", "eval", None)
    out, start = {}, 0
    for lang, parts in tables.items():
        encoded = []
        for _, rows in parts:
            encoded.append([(t, p, y) for (t, p, _), y in zip(rows, labels[start : start + len(rows)])])
            start += len(rows)
        train, eval_ = _hash_split(encoded[0]) if len(encoded) == 1 else encoded
        out[lang] = TaskData(replace(spec, name=f"{name}[{lang}]"), train, eval_, names)
    return out


def _same_labels(tasks: dict[str, TaskData], name: str) -> None:
    first_lang, first = next(iter(tasks.items()))
    for lang, data in tasks.items():
        if data.spec.num_labels != first.spec.num_labels or (data.label_names and first.label_names
                                                              and data.label_names != first.label_names):
            raise DataError(f"task {name!r}: language {lang!r} has labels {list(data.label_names) or data.spec.num_labels} "
                            f"but {first_lang!r} has {list(first.label_names) or first.spec.num_labels}: "
                            "every language needs the same label set")


# ----------------------------------------------------------------------------------------------------
# Transfer: train on one language, score on each
# ----------------------------------------------------------------------------------------------------


def crosslingual_transfer(model_path: str, task: str, *, train_language: str = "en",
                          languages: Sequence[str] | None = None, mode: str = "probe",
                          seeds: Sequence[int] = (0, 1, 2), max_train: int | None = None, max_eval: int | None = None,
                          max_length: int = 128, batch_size: int = 32, device=None, trust_remote_code: bool = False,
                          epochs: int | None = None, lr: float = 5e-5) -> dict:
    """Train on ``train_language``'s train split, score every language's eval split; one result per language.

    ``mode`` "probe": one linear head per seed on frozen mean-pooled features of the training language
    (standardized with its statistics, which the other languages' features reuse: the head sees them as
    it would at deployment); ``epochs`` defaults to 20. "finetune": the model fine-tuned once per seed
    on the training language (``epochs`` default 3, ``lr``), then run on each language.

    Returns ``{"task", "mode", "train_language", "headline", "seeds", "train_size", "languages": {lang:
    {"metrics": {metric: {"mean", "std"}}, "eval_size"}}, "transfer_gap": {lang: headline of the training
    language - headline of lang}, "mean_other": mean headline over the other languages (None: none)}``.
    """
    from tadistill.loading import load_pretrained, load_tokenizer

    if mode not in MODES:
        raise ConfigError(f"evaluation mode {mode!r} is not one of {list(MODES)}: use 'probe' or 'finetune'")
    seeds = _check_seeds(seeds)
    wanted = _check_languages(languages)
    if wanted is not None and train_language not in wanted:
        wanted = [train_language, *wanted]
    tasks = load_crosslingual_task(task, languages=wanted, max_train=max_train, max_eval=max_eval)
    if train_language not in tasks:
        raise ConfigError(f"task {task!r} has no training language {train_language!r}: use one of {', '.join(tasks)}")
    train = tasks[train_language]
    if not train.train:
        raise DataError(f"task {task!r} has no training rows in {train_language!r}: pick another --train-language")
    empty = [lang for lang, data in tasks.items() if not data.eval]
    if empty:
        raise DataError(f"task {task!r} has no evaluation rows in {empty[0]!r}: give it rows, or leave it out")
    tokenizer = _with_pad_token(load_tokenizer(model_path, trust_remote_code=trust_remote_code))
    if mode == "probe":
        model = load_pretrained(model_path, head="base", trust_remote_code=trust_remote_code, what="model")
        runs = _probe_runs(model.to(_device(device)), tokenizer, train, tasks, seeds=seeds, max_length=max_length,
                           batch_size=batch_size, epochs=epochs or 20)
    else:
        runs = _finetune_runs(model_path, tokenizer, train, tasks, seeds=seeds, max_length=max_length,
                              batch_size=batch_size, epochs=epochs or 3, lr=lr, device=device,
                              trust_remote_code=trust_remote_code)
    headline = train.spec.metrics[0]
    per_language = {}
    for lang, data in tasks.items():
        summary = _summarize(runs[lang], data.spec)
        per_language[lang] = {"metrics": {m: {"mean": mean, "std": std} for m, (mean, std) in summary.items()},
                              "eval_size": len(data.eval)}
    own = per_language[train_language]["metrics"][headline]["mean"]
    gaps = {lang: own - r["metrics"][headline]["mean"] for lang, r in per_language.items() if lang != train_language}
    others = [r["metrics"][headline]["mean"] for lang, r in per_language.items() if lang != train_language]
    return {
        "task": task, "mode": mode, "train_language": train_language, "headline": headline, "seeds": list(seeds),
        "train_size": len(train.train), "languages": per_language, "transfer_gap": gaps,
        "mean_other": statistics.fmean(others) if others else None,
    }


def _probe_runs(model, tokenizer, train: TaskData, tasks: dict[str, TaskData], *, seeds, max_length: int,
                batch_size: int, epochs: int) -> dict[str, list[dict[str, float]]]:
    max_length = _fit_length(max_length, tokenizer, model.config)
    x_train = encode_features(model, tokenizer, train.train, max_length=max_length, batch_size=batch_size)
    # The training language's statistics standardize every language: (N, d) -> zero mean, unit variance.
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-6)
    x_train = (x_train - mean) / std
    y_train = torch.tensor([row[2] for row in train.train], device=x_train.device)
    evals = {lang: (encode_features(model, tokenizer, data.eval, max_length=max_length, batch_size=batch_size)
                    - mean) / std for lang, data in tasks.items()}
    runs: dict[str, list[dict[str, float]]] = {lang: [] for lang in tasks}
    for seed in seeds:
        head = _train_head(x_train, y_train, train.spec, seed=seed, epochs=epochs, l2=1e-3)
        for lang, data in tasks.items():
            runs[lang].append(_score(data.spec, head(evals[lang]), [row[2] for row in data.eval]))
    return runs


def _finetune_runs(model_path: str, tokenizer, train: TaskData, tasks: dict[str, TaskData], *, seeds,
                   max_length: int, batch_size: int, epochs: int, lr: float, device,
                   trust_remote_code: bool) -> dict[str, list[dict[str, float]]]:
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise ConfigError(f"finetune needs epochs >= 1, lr > 0 and batch_size >= 1, got {epochs}, {lr}, {batch_size}")
    device = _device(device)
    runs: dict[str, list[dict[str, float]]] = {lang: [] for lang in tasks}
    for seed in seeds:
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # the head and dropout draw from the global RNG
            torch.manual_seed(seed)
            model = _load_classifier(model_path, train.spec, tokenizer, trust_remote_code).to(device)
            length = _fit_length(max_length, tokenizer, model.config)
            _train_classifier(model, tokenizer, train, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size,
                              max_length=length, weight_decay=0.01, warmup_ratio=0.1)
            for lang, data in tasks.items():
                runs[lang].append(_score(data.spec, _predict(model, tokenizer, data, batch_size, length),
                                         [row[2] for row in data.eval]))
        del model
    return runs


# ----------------------------------------------------------------------------------------------------
# The table: one row per model, one column per language
# ----------------------------------------------------------------------------------------------------


def transfer_table(results: dict[str, dict]) -> str:
    """Markdown: a row per model (``{name: crosslingual_transfer result}``), the headline mean ± std per
    language (the training language first, marked *), the mean over the other languages and its gap to
    the training language. Every result must come from one task and one training language."""
    if not results:
        raise ConfigError("no cross-lingual results to tabulate")
    first = next(iter(results.values()))
    train, headline = first["train_language"], first["headline"]
    languages = [train, *[lang for lang in first["languages"] if lang != train]]
    for name, result in results.items():
        if result["train_language"] != train or list(result["languages"]) != list(first["languages"]):
            raise ConfigError(f"cross-lingual result {name!r} has other languages than the first: tabulate one set")
    header = ["model", *[f"{lang}*" if lang == train else lang for lang in languages], "mean (others)",
              f"gap to {train}"]
    title = (f"Cross-lingual transfer, {first['task']} ({first['mode']}, trained on {train}; {headline}, "
             f"mean ± std over seeds {first['seeds']}):")
    lines = [title, "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, result in results.items():
        cells = []
        for lang in languages:
            metric = result["languages"][lang]["metrics"][headline]
            cells.append(f"{metric['mean']:.3f} ± {metric['std']:.3f}")
        own = result["languages"][train]["metrics"][headline]["mean"]
        other = result["mean_other"]
        tail = [f"{other:.3f}", f"{own - other:+.3f}"] if other is not None else ["", ""]
        lines.append("| " + " | ".join([name, *cells, *tail]) + " |")
    return "\n".join(lines) + "\n"


def write_transfer(folder: str | Path, results: dict[str, dict]) -> dict[str, Path]:
    """Write ``crosslingual.json`` (every number) and ``crosslingual.md`` (:func:`transfer_table`) into ``folder``."""
    import json

    from tadistill.fileio import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "crosslingual.json", "md": folder / "crosslingual.md"}
    atomic_write_text(paths["json"], json.dumps(results, indent=2))
    atomic_write_text(paths["md"], transfer_table(results))
    return paths
