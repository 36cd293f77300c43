"""Extractive question answering data: SQuAD-format JSON files, or ``squad`` / ``squad_v2`` from the hub.

The SQuAD format (Rajpurkar et al. 2016; 2.0 adds ``is_impossible``)::

    {"data": [{"title": "...", "paragraphs": [{"context": "...", "qas": [
        {"id": "q1", "question": "...", "answers": [{"text": "...", "answer_start": 42}]},
        {"id": "q2", "question": "...", "answers": [], "is_impossible": true}]}]}]}

Every answer must lie inside its context and read there exactly as given (``context[answer_start :
answer_start + len(text)] == text``); a question without answers must say ``"is_impossible": true``.
Anything else is a one-line DataError naming the question. A task where some question has no answer
is scored the SQuAD 2.0 way (a model may answer "no answer"); otherwise every prediction is a span.

One file alone is split 80/20 by a stable hash of each context, so that the questions about one
paragraph all land in the same split; ``TRAIN,EVAL`` files are used as given. Subsampling
(``max_train`` / ``max_eval``) draws questions with a seeded ``torch.Generator``, order kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tadistill.errors import DataError
from tadistill.evaluation.token_tasks import check_limits, hash_split, load_hub_split, split_paths, subsample

QA_METRICS = ("f1", "exact_match")  # the first is the headline
HUB_QA = {"squad": ("rajpurkar/squad",), "squad_v2": ("rajpurkar/squad_v2",)}


@dataclass(frozen=True)
class QAExample:
    """One question: its context, and its gold answers with their character starts (none: no answer)."""

    id: str
    question: str
    context: str
    answers: tuple[str, ...] = ()
    starts: tuple[int, ...] = ()


@dataclass(frozen=True)
class QASpec:
    name: str
    train_split: str
    eval_split: str
    allow_no_answer: bool  # SQuAD 2.0: a model may predict "no answer"
    hf_path: tuple[str, ...] | None = None
    metrics: tuple[str, ...] = QA_METRICS


@dataclass
class QAData:
    spec: QASpec
    train: list[QAExample] = field(default_factory=list)
    eval: list[QAExample] = field(default_factory=list)


def load_qa_task(name_or_path: str, *, max_train: int | None = None, max_eval: int | None = None,
                 seed: int = 0) -> QAData:
    """Load an extractive QA task by name or from SQuAD-format files and subsample it."""
    check_limits(max_train, max_eval)
    name = str(name_or_path).strip()
    hf_path = HUB_QA.get(name.lower())
    if hf_path is not None:
        splits = ("train", "validation")
        train, eval_ = (_load_hub_qa(name.lower(), hf_path, split) for split in splits)
        name = name.lower()
    else:
        paths = split_paths(name, what="question-answering")
        examples = [read_squad(p) for p in paths]
        if len(paths) == 1:
            train, eval_ = hash_split(examples[0], key=lambda e: e.context)
            if not train or not eval_:
                raise DataError(f"task file {name!r} has too few contexts for an 80/20 split: add paragraphs or pass "
                                "'TRAIN,EVAL' files")
            splits = ("train", "eval")
        else:
            train, eval_ = examples
            splits = (paths[0].name, paths[1].name)
    allow_no_answer = name == "squad_v2" or any(not e.answers for e in [*train, *eval_])
    spec = QASpec(name, splits[0], splits[1], allow_no_answer, hf_path)
    generator = torch.Generator().manual_seed(seed)
    return QAData(spec, subsample(train, max_train, generator), subsample(eval_, max_eval, generator))


def read_squad(path: Path) -> list[QAExample]:
    """The questions of one SQuAD-format JSON file, checked (see the module docstring)."""
    where = repr(str(path))
    if not path.is_file():
        raise DataError(f"task file {where} not found: check the path")
    try:
        document = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"task file {where} could not be read ({type(exc).__name__}): check its encoding "
                        "(UTF-8)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"task file {where} is not valid JSON (line {exc.lineno}): give SQuAD-format JSON") from None
    articles = document.get("data") if isinstance(document, dict) else None
    if not isinstance(articles, list):
        raise DataError(f"task file {where} is not SQuAD-format: expected an object with a 'data' list of articles, "
                        "each with 'paragraphs' holding 'context' and 'qas'")
    examples = []
    for a, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(f"article {a} of {where} has no 'paragraphs' list: give each article its paragraphs")
        for p, paragraph in enumerate(paragraphs):
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not context.strip() or not isinstance(qas, list):
                raise DataError(f"paragraph {p} of article {a} in {where} needs a non-empty 'context' string and a "
                                "'qas' list")
            for k, qa in enumerate(qas):
                examples.append(_question(qa, context, default_id=f"{a}-{p}-{k}", where=where))
    if not examples:
        raise DataError(f"task file {where} holds no questions: add paragraphs with 'qas'")
    return examples


def _question(qa: object, context: str, *, default_id: str, where: str) -> QAExample:
    if not isinstance(qa, dict):
        raise DataError(f"question {default_id} of {where} is not a JSON object: give id, question and answers")
    qid = str(qa.get("id", default_id))
    question = qa.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"question {qid!r} of {where} has no question text: fill in 'question'")
    impossible = bool(qa.get("is_impossible", False))
    raw = [] if impossible else qa.get("answers", [])
    if not isinstance(raw, list):
        raise DataError(f"question {qid!r} of {where}: 'answers' must be a list of {{text, answer_start}}")
    if not raw and not impossible:
        raise DataError(f"question {qid!r} of {where} has no answers: give answers, or \"is_impossible\": true "
                        "(SQuAD 2.0)")
    answers, starts = [], []
    for answer in raw:
        text = answer.get("text") if isinstance(answer, dict) else None
        start = answer.get("answer_start") if isinstance(answer, dict) else None
        if not isinstance(text, str) or isinstance(start, bool) or not isinstance(start, int):
            raise DataError(f"question {qid!r} of {where}: each answer needs 'text' (a string) and 'answer_start' "
                            "(an integer)")
        check_span(text, start, context, qid=qid, where=where)
        answers.append(text)
        starts.append(start)
    return QAExample(qid, question, context, tuple(answers), tuple(starts))


def check_span(text: str, start: int, context: str, *, qid: str, where: str) -> None:
    """DataError unless ``text`` is a non-empty span of ``context`` starting at character ``start``."""
    if not text.strip():
        raise DataError(f"question {qid!r} of {where} has an empty answer: drop it, or mark the question "
                        "\"is_impossible\": true")
    end = start + len(text)
    if start < 0 or end > len(context):
        raise DataError(f"question {qid!r} of {where}: the answer span [{start}, {end}) lies outside its context of "
                        f"{len(context)} characters: fix answer_start")
    if context[start:end] != text:
        raise DataError(f"question {qid!r} of {where}: the context at answer_start {start} reads "
                        f"{context[start:end][:40]!r}, not the answer {text[:40]!r}: fix answer_start")


def _load_hub_qa(name: str, hf_path: tuple[str, ...], split: str) -> list[QAExample]:
    ds = load_hub_split(name, hf_path, split)
    missing = [c for c in ("id", "question", "context", "answers") if c not in ds.column_names]
    if missing:
        raise DataError(f"task {name!r} split {split!r} lacks columns {missing} (it has {ds.column_names}): "
                        "the hub dataset changed; pass SQuAD-format JSON files instead")
    out = []
    for qid, question, context, answers in zip(ds["id"], ds["question"], ds["context"], ds["answers"]):
        texts, starts = list(answers["text"]), list(answers["answer_start"])
        for text, start in zip(texts, starts):
            check_span(text, start, context, qid=str(qid), where=f"{name} ({split})")
        out.append(QAExample(str(qid), question, context, tuple(texts), tuple(int(s) for s in starts)))
    if not out:
        raise DataError(f"task {name!r} split {split!r} holds no questions: pass SQuAD-format JSON files instead")
    return out
