"""Exact match and token F1 of extractive answers, as the official SQuAD evaluation scripts compute them.

SQuAD v1.1 (Rajpurkar et al. 2016, section 5) and v2.0 (Rajpurkar et al. 2018, section 5) score a
predicted answer string against every gold answer of its question and keep the best:

- both strings are normalized: lowercased, punctuation (``string.punctuation``) removed, the articles
  "a", "an" and "the" removed as words, whitespace collapsed (the scripts' ``normalize_answer``);
- exact match is 1 when the normalized strings are equal;
- F1 is the harmonic mean of precision and recall of the bag of normalized words (their overlap
  counted with multiplicity).

No-answer questions (SQuAD 2.0): a question without gold answers has the single gold answer ``""``,
and a gold answer that normalizes to nothing is dropped (v2.0's ``get_raw_scores``). When the
prediction or the gold answer is empty, F1 is 1 if both are and 0 otherwise. Totals are the mean over
questions, as fractions (0.81, where the scripts print 81.0).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a / an / the, collapse whitespace (in this order)."""
    text = text.lower()
    text = "".join(c for c in text if c not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)  # no-answer: right only when both are empty
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def gold_answers(answers: Sequence[str]) -> list[str]:
    """The answers a prediction is compared with: those that normalize to something, else ``[""]``."""
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """``{"exact_match", "f1"}``: the mean over questions of the best score against any gold answer.

    Args:
        predictions: one answer string per question (``""`` predicts "no answer").
        answers: per question, its gold answer strings (empty for a no-answer question).
    """
    if len(predictions) != len(answers):
        raise ValueError(f"squad_scores: {len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    em = f1 = 0.0
    for prediction, golds in zip(predictions, answers):
        golds = gold_answers(golds)
        em += max(exact_match(prediction, g) for g in golds)
        f1 += max(token_f1(prediction, g) for g in golds)
    return {"exact_match": em / len(predictions), "f1": f1 / len(predictions)}
