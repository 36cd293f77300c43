"""Layer mappings phi: which teacher hidden states each student hidden state is aligned with.

docs/methods.md, Layer mappings (the comparative study's mappings, TinyBERT's uniform rule, the table
of pairs). Indices follow Hugging Face ``output_hidden_states``: 0 = embeddings output, i = output of
block i (1-based), so a model with L blocks has hidden states 0..L.

Errors are ValueErrors (this module knows no config); their messages name the config keys, so that the
set-up, which calls ``layer_map`` with the user's values and both models' depths, passes them on as
one-line ConfigErrors (``training/terms.py``, ``user_layer_map``).
"""

from __future__ import annotations

from collections.abc import Sequence

from tadistill.errors import did_you_mean

STRATEGIES = ("last", "uniform", "uniform-cons", "uniform+last", "explicit")

LayerPairs = list[tuple[int, tuple[int, ...]]]


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _explicit_pairs(explicit: Sequence, num_student: int, num_teacher: int) -> LayerPairs:
    """User list -> pairs. Form 1: one teacher index per student block; form 2: [student, teacher] pairs."""
    if not isinstance(explicit, Sequence) or isinstance(explicit, str) or len(explicit) == 0:
        raise ValueError(
            "layer mapping 'explicit' needs a list: one teacher index per student layer or [student, teacher] pairs"
        )
    if all(_is_index(e) for e in explicit):
        if len(explicit) != num_student:
            raise ValueError(
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
                raise ValueError(
                    f"layer mapping entry {entry!r} is not [student, teacher]: write pairs such as [3, 6] or "
                    "[3, [5, 6]], or a plain list of teacher indices"
                )
            raw.append((entry[0], tuple(teachers)))
    merged: dict[int, tuple[int, ...]] = {}
    for s, ts in raw:
        for t in ts:
            shown = [s, t] if len(ts) == 1 else [s, list(ts)]
            if not 0 <= t <= num_teacher:
                raise ValueError(
                    f"layer mapping entry {shown} is out of range: the teacher has hidden states 0..{num_teacher}"
                )
            if not 0 <= s <= num_student:
                raise ValueError(
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
            - "uniform-cons" (1-to-N, consecutive): student i -> every teacher block in
              (floor((i - 1) L_T / L_S), floor(i L_T / L_S)]. The L_T teacher blocks are cut into L_S
              consecutive groups, every teacher block is used exactly once, every student block gets at
              least one (L_S <= L_T), and group i ends at the "uniform" target of student i. When L_S
              divides L_T this is the paper's (k (i - 1), k i], k = L_T / L_S. The paper's k =
              ceil(L_T / L_S) for other depths is not used: it leaves trailing student blocks with no
              teacher block at all (12 -> 5: k = 3, student 5 would get (12, 15]; 12 -> 8: students 7
              and 8), although the point of the mapping is that every block takes part.
            - "uniform+last" (1-to-N): student i -> (floor(i L_T / L_S), L_T - L_S + i), the union of
              "uniform" and Patient KD's "last" rule (Sun et al. 2019, PKD-Last: the student's blocks
              learn from the teacher's top L_S blocks in order), as the comparative study defines it.
              This "last" is not the single pair of the "last" strategy above: that would give every
              student block the same target L_T. Always two entries, equal for the last student block
              (kept: with one MSE term per entry the last block weighs twice, as the formula reads, and
              a concatenated target keeps its fixed width 2 d_T).
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
        raise ValueError(
            f"unknown layer mapping {strategy!r}{did_you_mean(str(strategy), STRATEGIES)}: "
            f"choose one of {', '.join(STRATEGIES)}"
        )
    if not (_is_index(num_student) and _is_index(num_teacher) and num_student >= 1 and num_teacher >= 1):
        raise ValueError(
            f"layer counts must be positive integers, got student {num_student!r}, teacher {num_teacher!r}"
        )
    if num_student > num_teacher:
        raise ValueError(
            f"the student has {num_student} layers but the teacher only {num_teacher}: "
            "a layer mapping needs a student no deeper than its teacher"
        )
    if explicit and strategy != "explicit":
        raise ValueError(
            f"an explicit layer list was given with mapping {strategy!r}: set mapping: explicit or drop the list"
        )

    l_s, l_t = num_student, num_teacher
    if strategy == "last":
        pairs: LayerPairs = [(l_s, (l_t,))]
    elif strategy == "uniform":
        pairs = [(i, (i * l_t // l_s,)) for i in range(1, l_s + 1)]
    elif strategy == "uniform-cons":
        # Group i = (floor((i-1) L_T / L_S), floor(i L_T / L_S)]: never empty, since L_T / L_S >= 1.
        pairs = [(i, tuple(range((i - 1) * l_t // l_s + 1, i * l_t // l_s + 1))) for i in range(1, l_s + 1)]
    elif strategy == "uniform+last":
        pairs = [(i, (i * l_t // l_s, l_t - l_s + i)) for i in range(1, l_s + 1)]
    else:
        if explicit is None:
            raise ValueError("layer mapping 'explicit' needs a list of layers: set layers: [...] in the config")
        pairs = _explicit_pairs(explicit, l_s, l_t)

    if include_embeddings:
        if pairs and pairs[0][0] == 0:
            raise ValueError(
                "include_embeddings is set but the explicit mapping already maps student hidden state 0: drop one"
            )
        pairs = [(0, (0,)), *pairs]
    return pairs


TABLE_SHAPES = ((12, 6), (12, 5), (12, 4), (24, 6))  # (L_T, L_S) pairs written out in docs/methods.md


def pairs_table(shapes: Sequence[tuple[int, int]] = TABLE_SHAPES) -> str:
    """The Markdown table of docs/methods.md: one row per student block, one column per strategy.

    A cell lists the teacher hidden states of that student block (a repeated one is listed twice), "-"
    for none. tests/test_layer_maps.py checks that the document holds exactly this text.
    """
    strategies = [s for s in STRATEGIES if s != "explicit"]
    lines = [
        "| L_T -> L_S | student | " + " | ".join(f"`{s}`" for s in strategies) + " |",
        "|---|---|" + "---|" * len(strategies),
    ]
    for l_t, l_s in shapes:
        maps = {s: dict(layer_map(s, l_s, l_t)) for s in strategies}
        for i in range(1, l_s + 1):
            cells = [", ".join(map(str, maps[s].get(i, ()))) or "-" for s in strategies]
            lines.append(f"| {l_t} -> {l_s} | {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
