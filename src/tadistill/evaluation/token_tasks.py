"""Token-level tasks: token classification (NER-style BIO tags) and extractive question answering.

A token task is named by one string, like the sequence tasks of :mod:`.tasks`:

==========================  ===============================================================================
name                        what
==========================  ===============================================================================
``stdlib-ner``              built in, no download: code names in stdlib comments
                            (:mod:`tadistill.data.builtin_token_tasks`), split 80/20 by a hash of each sentence
``conll2003``               CoNLL-2003 English NER from the hub (``lhoestq/conll2003``, a parquet copy of the
                            original), train / test
``wikiann-<lang>``          WikiANN NER in one language (``unimelb-nlp/wikiann``), train / test
``squad``, ``squad_v2``     SQuAD 1.1 / 2.0 from the hub (``rajpurkar/squad`` / ``_v2``), train / validation
``FILE.conll``              CoNLL columns (also ``.bio`` / ``.iob``): one word per line, its tag in the last
                            column, a blank line between sentences, ``-DOCSTART-`` lines skipped
``FILE.jsonl``              one sentence per line, ``{"tokens": [...], "tags": [...]}`` (a ``.jsonl`` with
                            ``text`` and ``label`` is a sequence task of :mod:`.tasks` instead)
``FILE.json``               SQuAD-format JSON (:mod:`.qa_tasks`)
``TRAIN,EVAL``              two such files, used as given; one file alone is split 80/20 by a stable hash
==========================  ===============================================================================

Tags must be BIO (``O``, ``B-X``, ``I-X``: :func:`tadistill.evaluation.ner_metrics.check_tag`); a
file with another tag fails with its line. The tag set is every tag seen in either split, ``O``
first, then sorted. The hub tasks report the test split, as the NER literature does (CoNLL-2003 and
WikiANN test labels are public; SQuAD's test set is hidden, so SQuAD numbers are on validation).

Scoring: entity F1 with the CoNLL scorer's rules (:mod:`.ner_metrics`), exact match and F1 with
SQuAD's normalization (:mod:`.qa_metrics`). Probe and fine-tune modes: :mod:`.tagging` and
:mod:`.extractive_qa`; :func:`evaluate_token_task` dispatches, :func:`tadistill.evaluation.downstream.evaluate_task`
sends token tasks here.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tadistill.errors import ConfigError, DataError
from tadistill.evaluation.ner_metrics import check_tag

Sentence = tuple[tuple[str, ...], tuple[str, ...]]  # (words, tags)

TAGGING_METRICS = ("entity_f1", "entity_precision", "entity_recall", "token_accuracy")
CONLL_SUFFIXES = (".conll", ".bio", ".iob")
QA_SUFFIXES = (".json",)
EVAL_FRACTION_PERCENT = 20
# Label names of the hub NER datasets, used when the dataset does not carry them (plain integer tags).
CONLL2003_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
WIKIANN_TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
_WIKIANN = re.compile(r"^wikiann-([a-z][a-z_-]*)$")


@dataclass(frozen=True)
class TaggingSpec:
    """A token-classification task: name, tag set (``O`` first), splits, and where it comes from.

    hf_path: positional arguments of ``datasets.load_dataset`` (None for built-in and local tasks);
    hub_tags: the dataset's tag names by id, when its features do not carry them.
    """

    name: str
    tags: tuple[str, ...]
    train_split: str
    eval_split: str
    hf_path: tuple[str, ...] | None = None
    hub_tags: tuple[str, ...] = ()
    metrics: tuple[str, ...] = TAGGING_METRICS

    # The linear-probe head of :mod:`.downstream` reads these two.
    is_regression = False

    @property
    def num_labels(self) -> int:
        return len(self.tags)


@dataclass
class TaggingData:
    spec: TaggingSpec
    train: list[Sentence] = field(default_factory=list)
    eval: list[Sentence] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------

TAGGING_TASKS = ("stdlib-ner", "conll2003")  # and wikiann-<lang>
QA_TASKS = ("squad", "squad_v2")
TOKEN_TASK_NAMES = (*TAGGING_TASKS, "wikiann-<lang>", *QA_TASKS)


def token_task_kind(name: str) -> str | None:
    """``"tagging"``, ``"qa"``, or None when ``name`` is no token task (a sequence task, or unknown).

    A ``.jsonl`` file is a tagging task when its first record has a ``tokens`` field.
    """
    name = str(name).strip()
    lowered = name.lower()
    if lowered in TAGGING_TASKS or _WIKIANN.match(lowered):
        return "tagging"
    if lowered in QA_TASKS:
        return "qa"
    first = Path(name.split(",")[0].strip()) if "," in name and not Path(name).exists() else Path(name)
    suffix = first.suffix.lower()
    if suffix in CONLL_SUFFIXES:
        return "tagging"
    if suffix in QA_SUFFIXES:
        return "qa"
    if suffix == ".jsonl" and first.is_file():
        return "tagging" if "tokens" in _first_record(first) else None
    return None


def _first_record(path: Path) -> dict:
    try:
        with path.open(encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    return record if isinstance(record, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # the sequence-task reader says what is wrong with it
    return {}


def evaluate_token_task(model_path: str, task: str, *, mode: str = "probe", seeds: Sequence[int] = (0, 1, 2),
                        **kw) -> dict:
    """Evaluate ``model_path`` on a token task; the result has the shape of ``downstream.evaluate_task``'s."""
    if mode not in ("probe", "finetune"):
        raise ConfigError(f"evaluation mode {mode!r} is not one of ['probe', 'finetune']: use 'probe' or 'finetune'")
    kind = token_task_kind(task)
    if kind == "tagging":
        from tadistill.evaluation.tagging import evaluate_tagging

        return evaluate_tagging(model_path, task, mode=mode, seeds=seeds, **kw)
    if kind == "qa":
        from tadistill.evaluation.extractive_qa import evaluate_qa

        return evaluate_qa(model_path, task, mode=mode, seeds=seeds, **kw)
    raise ConfigError(f"{task!r} is no token task: use one of {', '.join(TOKEN_TASK_NAMES)}, or a .conll, "
                      ".jsonl (tokens, tags) or SQuAD .json file")


# ----------------------------------------------------------------------------------------------------
# Loading token-classification tasks
# ----------------------------------------------------------------------------------------------------


def load_tagging_task(name_or_path: str, *, max_train: int | None = None, max_eval: int | None = None,
                      seed: int = 0) -> TaggingData:
    """Load a token-classification task by name or from files and subsample it (seeded, order kept).

    Raises ConfigError for bad ``max_*`` values, DataError for missing, empty or malformed files, a
    tag that is not BIO, or a hub dataset that cannot be loaded.
    """
    check_limits(max_train, max_eval)
    name = str(name_or_path).strip()
    lowered = name.lower()
    if lowered == "stdlib-ner":
        from tadistill.data.builtin_token_tasks import stdlib_ner_examples

        train, eval_ = hash_split(stdlib_ner_examples(), key=lambda s: " ".join(s[0]))
        splits = ("train", "eval")
        spec_args: dict = {}
    elif lowered == "conll2003" or _WIKIANN.match(lowered):
        lang = _WIKIANN.match(lowered)
        hf_path = ("unimelb-nlp/wikiann", lang.group(1)) if lang else ("lhoestq/conll2003",)
        hub_tags = WIKIANN_TAGS if lang else CONLL2003_TAGS
        splits = ("train", "test")
        train, eval_ = (_load_hub_tagging(lowered, hf_path, split, hub_tags) for split in splits)
        spec_args = {"hf_path": hf_path, "hub_tags": hub_tags}
    else:
        paths = split_paths(name, what="token-classification")
        sentences = [_read_sentences(p) for p in paths]
        if len(paths) == 1:
            train, eval_ = hash_split(sentences[0], key=lambda s: " ".join(s[0]))
            if not train or not eval_:
                raise DataError(f"task file {name!r} has too few sentences for an 80/20 split: add sentences "
                                "or pass 'TRAIN,EVAL' files")
            splits = ("train", "eval")
        else:
            train, eval_ = sentences
            splits = (paths[0].name, paths[1].name)
        spec_args = {}
    tags = sorted({t for _, ts in [*train, *eval_] for t in ts} - {"O"})
    known = lowered in TAGGING_TASKS or _WIKIANN.match(lowered)
    spec = TaggingSpec(lowered if known else name, ("O", *tags), splits[0], splits[1], **spec_args)
    generator = torch.Generator().manual_seed(seed)
    return TaggingData(spec, subsample(train, max_train, generator), subsample(eval_, max_eval, generator))


def _read_sentences(path: Path) -> list[Sentence]:
    if not path.is_file():
        raise DataError(f"task file {str(path)!r} not found: check the path")
    suffix = path.suffix.lower()
    if suffix not in (*CONLL_SUFFIXES, ".jsonl"):
        raise DataError(f"token-classification file {str(path)!r} must be .conll / .bio / .iob (CoNLL columns) or "
                        ".jsonl ({{\"tokens\": [...], \"tags\": [...]}})")
    try:
        sentences = _read_conll(path) if suffix in CONLL_SUFFIXES else _read_tag_jsonl(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"task file {str(path)!r} could not be read ({type(exc).__name__}): check its encoding "
                        "(UTF-8)") from None
    if not sentences:
        raise DataError(f"task file {str(path)!r} holds no sentences: add words with their tags")
    return sentences


def _read_conll(path: Path) -> list[Sentence]:
    """CoNLL columns: word first, tag last; blank lines end sentences; ``-DOCSTART-`` lines are skipped."""
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            columns = line.split()
            if not columns or columns[0] == "-DOCSTART-":
                if words:
                    sentences.append((tuple(words), tuple(tags)))
                    words, tags = [], []
                continue
            if len(columns) < 2:
                raise DataError(f"line {number} of {str(path)!r} has one column {columns[0]!r}: give the word and, in "
                                "the last column, its tag (O, B-TYPE or I-TYPE)")
            reason = check_tag(columns[-1])
            if reason:
                raise DataError(f"line {number} of {str(path)!r} has the tag {columns[-1]!r}: {reason}")
            words.append(columns[0])
            tags.append(columns[-1])
    if words:
        sentences.append((tuple(words), tuple(tags)))
    return sentences


def _read_tag_jsonl(path: Path) -> list[Sentence]:
    sentences: list[Sentence] = []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"line {number} of {str(path)!r}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{where} is not valid JSON: one object per line") from None
            if not isinstance(record, dict) or "tokens" not in record or "tags" not in record:
                raise DataError(f"{where} needs the fields tokens and tags: {{\"tokens\": [...], \"tags\": [...]}}")
            words, tags = record["tokens"], record["tags"]
            if (not isinstance(words, list) or not isinstance(tags, list)
                    or not all(isinstance(x, str) for x in [*words, *tags])):
                raise DataError(f"{where}: tokens and tags must be lists of strings")
            if len(words) != len(tags):
                raise DataError(f"{where} has {len(words)} tokens but {len(tags)} tags: give one tag per token")
            if not words:
                continue
            if any(not w.strip() for w in words):
                raise DataError(f"{where} has an empty token: drop it or fill it in")
            for tag in tags:
                reason = check_tag(tag)
                if reason:
                    raise DataError(f"{where} has the tag {tag!r}: {reason}")
            sentences.append((tuple(words), tuple(tags)))
    return sentences


def _load_hub_tagging(name: str, hf_path: tuple[str, ...], split: str, hub_tags: tuple[str, ...]) -> list[Sentence]:
    import datasets  # the module, not the function: tests monkeypatch datasets.load_dataset

    ds = load_hub_split(name, hf_path, split)
    missing = [c for c in ("tokens", "ner_tags") if c not in ds.column_names]
    if missing:
        raise DataError(f"task {name!r} split {split!r} lacks columns {missing} (it has {ds.column_names}): "
                        "the hub dataset changed; pass CoNLL or JSONL files instead")
    feature = getattr(ds.features["ner_tags"], "feature", None)
    names = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else hub_tags
    sentences = []
    for words, ids in zip(ds["tokens"], ds["ner_tags"]):
        if words:
            sentences.append((tuple(words), tuple(names[i] if isinstance(i, int) else str(i) for i in ids)))
    if not sentences:
        raise DataError(f"task {name!r} split {split!r} holds no sentences: pass CoNLL or JSONL files instead")
    return sentences


# ----------------------------------------------------------------------------------------------------
# Helpers shared with qa_tasks
# ----------------------------------------------------------------------------------------------------


def load_hub_split(name: str, hf_path: tuple[str, ...], split: str):
    import datasets

    try:
        return datasets.load_dataset(*hf_path, split=split)
    except Exception as exc:  # noqa: BLE001 -- connection, not-cached, not-found: all one user message
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise DataError(
            f"task {name!r} could not be loaded with datasets.load_dataset{hf_path!r}, split {split!r} ({reason}): "
            "the Hugging Face hub is unreachable or the dataset is not cached; pass local files instead"
        ) from None


def split_paths(name: str, *, what: str) -> list[Path]:
    """One path, or the two of ``"TRAIN,EVAL"``; DataError when a file does not exist."""
    if Path(name).is_file():
        return [Path(name)]
    paths = [Path(p.strip()) for p in name.split(",")] if "," in name else [Path(name)]
    if len(paths) > 2 or not all(str(p) for p in paths):
        raise ConfigError(f"{what} task {name!r}: give one file, or exactly two as 'TRAIN_PATH,EVAL_PATH'")
    for p in paths:
        if not p.is_file():
            raise DataError(f"task file {str(p)!r} not found: check the path")
    return paths


def check_limits(max_train: int | None, max_eval: int | None) -> None:
    for key, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key} must be a positive integer or None, got {value!r}")


def hash_split(rows: Sequence, *, key) -> tuple[list, list]:
    """80/20 train/eval split by a stable hash of ``key(row)``: rows with equal keys share a split."""
    train, eval_ = [], []
    for row in rows:
        digest = hashlib.sha256(key(row).encode("utf-8")).digest()
        bucket = int.from_bytes(digest[:8], "big") % 100
        (eval_ if bucket < EVAL_FRACTION_PERCENT else train).append(row)
    return train, eval_


def subsample(rows: list, limit: int | None, generator: torch.Generator) -> list:
    """At most ``limit`` rows drawn without replacement by ``generator``, in their original order."""
    if limit is None or len(rows) <= limit:
        return rows
    keep = sorted(torch.randperm(len(rows), generator=generator)[:limit].tolist())
    return [rows[i] for i in keep]
