"""Layer mappings phi: which teacher hidden states each student hidden state is aligned with.

methods.md section 1 (the comparative study's mappings) and section 4 (TinyBERT's uniform rule).
Indices follow Hugging Face ``output_hidden_states``: 0 = embeddings output, i = output of block i
(1-based), so a model with L blocks has hidden states 0..L.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tadistill.errors import ConfigError, did_you_mean

STRATEGIES = ("last", "uniform", "uniform-cons", "uniform+last", "explicit")

LayerPairs = list[tuple[int, tuple[int, ...]]]


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _explicit_pairs(explicit: Sequence, num_student: int, num_teacher: int) -> LayerPairs:
    """User list -> pairs. Form 1: one teacher index per student block; form 2: [student, teacher] pairs."""
    if not isinstance(explicit, Sequence) or isinstance(explicit, str) or len(explicit) == 0:
        raise ConfigError(
            "layer mapping 'explicit' needs a list: one teacher index per student layer or [student, teacher] pairs"
        )
    if all(_is_index(e) for e in explicit):
        if len(explicit) != num_student:
            raise ConfigError(
                f"explicit layer mapping has {len(explicit)} entries but the student has {num_student} layers: "
                "give one teacher index per student layer, or [student, teacher] pairs"
            )
        raw = [(i, (t,)) for i, t in enumerate(explicit, start=1)]
    else:
        raw = []
        for entry in explicit:
            ok = isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2
            teachers = entry[1] if ok else None
            if ok and _is_index(teachers):
                teachers = (teachers,)
            if not (ok and _is_index(entry[0]) and isinstance(teachers, Sequence) and teachers
                    and all(_is_index(t) for t in teachers)):
                raise ConfigError(
                    f"layer mapping entry {entry!r} is not [student, teacher]: write pairs such as [3, 6] or "
                    "[3, [5, 6]], or a plain list of teacher indices"
                )
            raw.append((entry[0], tuple(teachers)))
    merged: dict[int, tuple[int, ...]] = {}
    for s, ts in raw:
        for t in ts:
            shown = [s, t] if len(ts) == 1 else [s, list(ts)]
            if not 0 <= t <= num_teacher:
                raise ConfigError(
                    f"layer mapping entry {shown} is out of range: the teacher has hidden states 0..{num_teacher}"
                )
            if not 0 <= s <= num_student:
                raise ConfigError(
                    f"layer mapping entry {shown} is out of range: the student has hidden states 0..{num_student}"
                )
        # A student index given twice gets every listed teacher (a 1-to-N mapping), duplicates dropped.
        merged[s] = tuple(dict.fromkeys(merged.get(s, ()) + ts))
    return sorted(merged.items())


def layer_map(
    strategy: str,
    num_student: int,
    num_teacher: int,
    *,
    explicit: list | None = None,
    include_embeddings: bool = False,
) -> list[tuple[int, tuple[int, ...]]]:
    """Student -> teacher hidden-state mapping for hidden-state (HS) distillation.

    Args:
        strategy: one of STRATEGIES.
            - "last": [(L_S, (L_T,))], last block to last block.
            - "uniform" (1-to-1): student i -> teacher floor(i L_T / L_S), i.e. i k when k = L_T / L_S is
              an integer. TinyBERT's rule "student layer i (0-based) <- teacher layer i k + k - 1" is the
              same mapping written in 0-based block numbering (0-based block i is hidden state i + 1).
            - "uniform-cons" (1-to-N): k = ceil(L_T / L_S); student i -> every teacher block in
              (k (i - 1), k i] clipped to L_T, so every teacher block is used once. When L_S does not
              divide L_T, trailing student blocks can be left with no teacher block (12 -> 5: k = 3 and
              student 5 would get (12, 15]); such student blocks are dropped from the result.
            - "uniform+last" (1-to-N): student i -> (floor(i L_T / L_S), L_T - L_S + i), always two
              entries, equal for the last student block (kept: with one MSE term per entry the last
              block weighs twice, and a concatenated target keeps its fixed width 2 d_T).
            - "explicit": ``explicit`` is either a list of L_S teacher indices (student i ->
              explicit[i - 1]) or a list of [student, teacher] pairs, teacher an index or a list of
              indices; a student index listed twice collects all its teachers. Index 0 = embeddings.
        num_student: L_S, number of student blocks.
        num_teacher: L_T, number of teacher blocks (L_S <= L_T).
        explicit: the user's list, only with strategy "explicit".
        include_embeddings: prepend (0, (0,)): embeddings output to embeddings output (TinyBERT's j = 0).

    Returns:
        [(student hidden-state index, (teacher hidden-state indices, ...)), ...] sorted by student index.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"unknown layer mapping {strategy!r}{did_you_mean(str(strategy), STRATEGIES)}: "
            f"choose one of {', '.join(STRATEGIES)}"
        )
    if not (_is_index(num_student) and _is_index(num_teacher) and num_student >= 1 and num_teacher >= 1):
        raise ConfigError(
            f"layer counts must be positive integers, got student {num_student!r}, teacher {num_teacher!r}"
        )
    if num_student > num_teacher:
        raise ConfigError(
            f"the student has {num_student} layers but the teacher only {num_teacher}: "
            "a layer mapping needs a student no deeper than its teacher"
        )
    if explicit and strategy != "explicit":
        raise ConfigError(
            f"an explicit layer list was given with mapping {strategy!r}: set mapping: explicit or drop the list"
        )

    l_s, l_t = num_student, num_teacher
    if strategy == "last":
        pairs: LayerPairs = [(l_s, (l_t,))]
    elif strategy == "uniform":
        pairs = [(i, (i * l_t // l_s,)) for i in range(1, l_s + 1)]
    elif strategy == "uniform-cons":
        k = math.ceil(l_t / l_s)
        pairs = []
        for i in range(1, l_s + 1):
            block = tuple(range(k * (i - 1) + 1, min(k * i, l_t) + 1))
            if block:  # empty when k (i - 1) >= L_T: nothing left to distill into this student block
                pairs.append((i, block))
    elif strategy == "uniform+last":
        pairs = [(i, (i * l_t // l_s, l_t - l_s + i)) for i in range(1, l_s + 1)]
    else:
        if explicit is None:
            raise ConfigError("layer mapping 'explicit' needs a list of layers: set layers: [...] in the config")
        pairs = _explicit_pairs(explicit, l_s, l_t)

    if include_embeddings:
        if pairs and pairs[0][0] == 0:
            raise ConfigError(
                "include_embeddings is set but the explicit mapping already maps student hidden state 0: drop one"
            )
        pairs = [(0, (0,)), *pairs]
    return pairs
