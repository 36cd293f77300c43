"""Entity-level precision, recall and F1 of BIO tag sequences: the CoNLL scorer's logic.

The CoNLL-2000/2003 shared tasks scored named-entity recognition with the ``conlleval`` script (Tjong
Kim Sang and De Meulder 2003, section 4): an entity counts as found only when its type, its first and
its last word all match a gold entity; precision = found / predicted entities, recall = found / gold
entities, F1 their harmonic mean, pooled over all entity types (micro average). The ``seqeval``
package's default mode reproduces it, and so does this module (checked against seqeval in
tests/test_token_tasks.py when it is installed).

What is an entity (conlleval's ``startOfChunk`` / ``endOfChunk``, for the tags O, B-X and I-X):

- ``B-X`` always starts an entity of type X;
- ``I-X`` continues the entity of the previous word when that one is of type X (started by ``B-X`` or
  ``I-X``); after ``O``, at the start of a sentence or after another type, ``I-X`` starts a new
  entity, as in the IOB1 scheme of the original CoNLL-2003 files;
- an entity ends where the next word is ``O``, ``B-*``, of another type, or the sentence ends.

So ``O I-PER I-PER`` holds one PER entity, ``B-PER I-LOC`` a PER and a LOC entity. Tags other than
``O``, ``B-X`` and ``I-X`` (IOBES's ``E-`` / ``S-``, a bare ``B``) are refused by :func:`check_tag`:
the readers of :mod:`tadistill.evaluation.token_tasks` call it on every tag of a file.
"""

from __future__ import annotations

from collections.abc import Sequence

Entity = tuple[str, int, int]  # (type, first word, one past the last word)


def check_tag(tag: str) -> str | None:
    """Why ``tag`` is not a BIO tag (a short reason), or None when it is one (``O``, ``B-X``, ``I-X``)."""
    if tag == "O":
        return None
    prefix, dash, kind = tag.partition("-")
    if not dash or prefix not in ("B", "I"):
        return "tags must be O, B-TYPE or I-TYPE (BIO)"
    if not kind.strip() or kind != kind.strip():
        return "the entity type after B- / I- is empty or padded with spaces"
    return None


def entities(tags: Sequence[str]) -> list[Entity]:
    """The entities of one sentence's BIO tags, in order (conlleval's rules, see the module docstring).

    Tags are assumed valid (:func:`check_tag`); an unknown tag is read as ``O``.
    """
    out: list[Entity] = []
    kind: str | None = None  # type of the open entity
    start = 0
    for i, tag in enumerate(tags):
        prefix, _, tag_kind = tag.partition("-")
        continues = prefix == "I" and tag_kind == kind
        if kind is not None and not continues:
            out.append((kind, start, i))
            kind = None
        if prefix in ("B", "I") and tag_kind and not continues:
            kind, start = tag_kind, i
    if kind is not None:
        out.append((kind, start, len(tags)))
    return out


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro-averaged entity precision, recall and F1, and token accuracy, over sentences.

    Args:
        gold: per sentence, its gold tags.
        predicted: per sentence, the predicted tags (the same lengths as ``gold``).

    Returns:
        ``{"entity_f1", "entity_precision", "entity_recall", "token_accuracy"}`` as fractions. With no
        predicted entity precision is 0, with no gold entity recall is 0, and F1 is 0 when both
        precision and recall are (conlleval's convention: nothing to find scores 0, not 1).
    """
    if len(gold) != len(predicted):
        raise ValueError(f"entity_scores: {len(gold)} gold sentences but {len(predicted)} predicted")
    found = n_gold = n_pred = correct_tokens = n_tokens = 0
    for g, p in zip(gold, predicted):
        if len(g) != len(p):
            raise ValueError(f"entity_scores: a sentence has {len(g)} gold tags but {len(p)} predicted")
        gold_entities, pred_entities = set(entities(g)), set(entities(p))
        found += len(gold_entities & pred_entities)
        n_gold += len(gold_entities)
        n_pred += len(pred_entities)
        correct_tokens += sum(a == b for a, b in zip(g, p))
        n_tokens += len(g)
    precision = found / n_pred if n_pred else 0.0
    recall = found / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "entity_f1": f1,
        "entity_precision": precision,
        "entity_recall": recall,
        "token_accuracy": correct_tokens / n_tokens if n_tokens else 0.0,
    }


def per_type_f1(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity F1 of each gold or predicted type on its own (conlleval's per-type lines)."""
    counts: dict[str, list[int]] = {}  # type -> [found, gold, predicted]
    for g, p in zip(gold, predicted, strict=True):
        gold_entities, pred_entities = set(entities(g)), set(entities(p))
        for entity in gold_entities | pred_entities:
            row = counts.setdefault(entity[0], [0, 0, 0])
            row[0] += entity in gold_entities and entity in pred_entities
            row[1] += entity in gold_entities
            row[2] += entity in pred_entities
    out = {}
    for kind, (found, n_gold, n_pred) in sorted(counts.items()):
        precision = found / n_pred if n_pred else 0.0
        recall = found / n_gold if n_gold else 0.0
        out[kind] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return out
