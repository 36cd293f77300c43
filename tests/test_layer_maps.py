"""Layer mappings: exact pairs written out by hand (not recomputed with the formulas under test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tadistill.objectives.layer_maps import STRATEGIES, TABLE_SHAPES, layer_map, pairs_table

METHODS_MD = Path(__file__).resolve().parents[1] / "docs" / "methods.md"

# (num_teacher, num_student) -> expected pairs, per strategy; hidden-state indices, 0 = embeddings.
EXPECTED = {
    "last": {
        (12, 6): [(6, (12,))],
        (12, 4): [(4, (12,))],
        (6, 3): [(3, (6,))],
        (24, 6): [(6, (24,))],
    },
    "uniform": {
        (12, 6): [(1, (2,)), (2, (4,)), (3, (6,)), (4, (8,)), (5, (10,)), (6, (12,))],
        (12, 4): [(1, (3,)), (2, (6,)), (3, (9,)), (4, (12,))],
        (6, 3): [(1, (2,)), (2, (4,)), (3, (6,))],
        (24, 6): [(1, (4,)), (2, (8,)), (3, (12,)), (4, (16,)), (5, (20,)), (6, (24,))],
    },
    "uniform-cons": {
        (12, 6): [(1, (1, 2)), (2, (3, 4)), (3, (5, 6)), (4, (7, 8)), (5, (9, 10)), (6, (11, 12))],
        (12, 4): [(1, (1, 2, 3)), (2, (4, 5, 6)), (3, (7, 8, 9)), (4, (10, 11, 12))],
        (6, 3): [(1, (1, 2)), (2, (3, 4)), (3, (5, 6))],
        (24, 6): [
            (1, (1, 2, 3, 4)),
            (2, (5, 6, 7, 8)),
            (3, (9, 10, 11, 12)),
            (4, (13, 14, 15, 16)),
            (5, (17, 18, 19, 20)),
            (6, (21, 22, 23, 24)),
        ],
    },
    "uniform+last": {
        (12, 6): [(1, (2, 7)), (2, (4, 8)), (3, (6, 9)), (4, (8, 10)), (5, (10, 11)), (6, (12, 12))],
        (12, 4): [(1, (3, 9)), (2, (6, 10)), (3, (9, 11)), (4, (12, 12))],
        (6, 3): [(1, (2, 4)), (2, (4, 5)), (3, (6, 6))],
        (24, 6): [(1, (4, 19)), (2, (8, 20)), (3, (12, 21)), (4, (16, 22)), (5, (20, 23)), (6, (24, 24))],
    },
}
CASES = [(strategy, shape) for strategy, table in EXPECTED.items() for shape in table]


@pytest.mark.parametrize(("strategy", "shape"), CASES, ids=[f"{s}-{t}to{n}" for s, (t, n) in CASES])
def test_exact_pairs(strategy, shape):
    num_teacher, num_student = shape
    assert layer_map(strategy, num_student, num_teacher) == EXPECTED[strategy][shape]


@pytest.mark.parametrize(("strategy", "shape"), CASES, ids=[f"{s}-{t}to{n}" for s, (t, n) in CASES])
def test_include_embeddings_prepends_embeddings_pair(strategy, shape):
    num_teacher, num_student = shape
    pairs = layer_map(strategy, num_student, num_teacher, include_embeddings=True)
    assert pairs == [(0, (0,)), *EXPECTED[strategy][shape]]


def test_tinybert_rule_is_uniform_with_embeddings():
    # TinyBERT 4-layer from BERT-base: hidden j <- teacher 3j for j = 0..4 (embeddings included).
    expected = [(0, (0,)), (1, (3,)), (2, (6,)), (3, (9,)), (4, (12,))]
    assert layer_map("uniform", 4, 12, include_embeddings=True) == expected


def test_non_divisible_depths():
    # 12 -> 5: floor(12 i / 5) = 2, 4, 7, 9, 12.
    assert layer_map("uniform", 5, 12) == [(1, (2,)), (2, (4,)), (3, (7,)), (4, (9,)), (5, (12,))]
    # Issue 10: the paper's k = ceil(12 / 5) = 3 left student 5 without a teacher block. Groups end at the
    # uniform targets instead, so every student block gets one and every teacher block is used once.
    assert layer_map("uniform-cons", 5, 12) == [
        (1, (1, 2)), (2, (3, 4)), (3, (5, 6, 7)), (4, (8, 9)), (5, (10, 11, 12))
    ]
    # 12 -> 8 (ceil gave students 7 and 8 nothing): floor(12 i / 8) = 1, 3, 4, 6, 7, 9, 10, 12.
    assert layer_map("uniform-cons", 8, 12) == [
        (1, (1,)), (2, (2, 3)), (3, (4,)), (4, (5, 6)), (5, (7,)), (6, (8, 9)), (7, (10,)), (8, (11, 12))
    ]
    # uniform+last: uniform's target and Patient KD's "last L_S blocks" target 12 - 5 + i = 8..12.
    assert layer_map("uniform+last", 5, 12) == [
        (1, (2, 8)), (2, (4, 9)), (3, (7, 10)), (4, (9, 11)), (5, (12, 12))
    ]
    # Equal depths: the identity.
    assert layer_map("uniform", 3, 3) == [(1, (1,)), (2, (2,)), (3, (3,))]
    assert layer_map("uniform-cons", 3, 3) == [(1, (1,)), (2, (2,)), (3, (3,))]


def test_explicit_list_of_teacher_indices():
    # DistilBERT-like every-other-layer choice for a 6-layer student of a 12-layer teacher.
    assert layer_map("explicit", 6, 12, explicit=[1, 3, 5, 8, 10, 12]) == [
        (1, (1,)),
        (2, (3,)),
        (3, (5,)),
        (4, (8,)),
        (5, (10,)),
        (6, (12,)),
    ]
    assert layer_map("explicit", 3, 6, explicit=[0, 2, 6], include_embeddings=True) == [
        (0, (0,)),
        (1, (0,)),
        (2, (2,)),
        (3, (6,)),
    ]


def test_explicit_pairs():
    assert layer_map("explicit", 6, 12, explicit=[[6, 12], [3, 6]]) == [(3, (6,)), (6, (12,))]
    assert layer_map("explicit", 6, 12, explicit=[(0, 0), [6, 12]]) == [(0, (0,)), (6, (12,))]
    # 1-to-N: a list of teachers, or the same student given twice.
    assert layer_map("explicit", 6, 12, explicit=[[3, [5, 6]], [3, 7], [6, 12]]) == [(3, (5, 6, 7)), (6, (12,))]
    assert layer_map("explicit", 2, 4, explicit=[[2, 4]], include_embeddings=True) == [(0, (0,)), (2, (4,))]


def test_explicit_out_of_range_messages():
    with pytest.raises(ValueError) as info:
        layer_map("explicit", 6, 12, explicit=[[4, 13]])
    assert str(info.value) == "layer mapping entry [4, 13] is out of range: the teacher has hidden states 0..12"
    with pytest.raises(ValueError, match=r"entry \[4, 13\] is out of range: the teacher has hidden states 0\.\.12"):
        layer_map("explicit", 6, 12, explicit=[1, 2, 3, 13, 5, 6])
    with pytest.raises(ValueError, match=r"entry \[2, -1\] is out of range"):
        layer_map("explicit", 3, 12, explicit=[4, -1, 12])
    with pytest.raises(ValueError, match=r"entry \[7, 12\] is out of range: the student has hidden states 0\.\.6"):
        layer_map("explicit", 6, 12, explicit=[[7, 12]])


def test_explicit_malformed():
    with pytest.raises(ValueError, match="5 entries but the student has 6 layers"):
        layer_map("explicit", 6, 12, explicit=[2, 4, 6, 8, 10])
    with pytest.raises(ValueError, match="needs a list"):
        layer_map("explicit", 6, 12)
    with pytest.raises(ValueError, match="needs a list"):
        layer_map("explicit", 6, 12, explicit=[])
    with pytest.raises(ValueError, match=r"is not \[student, teacher\]"):
        layer_map("explicit", 6, 12, explicit=[[1, 2, 3]])
    with pytest.raises(ValueError, match=r"is not \[student, teacher\]"):
        layer_map("explicit", 2, 12, explicit=[True, 3])  # a bool is not an index
    with pytest.raises(ValueError, match="already maps student hidden state 0"):
        layer_map("explicit", 6, 12, explicit=[[0, 0], [6, 12]], include_embeddings=True)
    with pytest.raises(ValueError, match="set mapping: explicit"):
        layer_map("uniform", 6, 12, explicit=[1, 2, 3, 4, 5, 6])


def test_unknown_strategy_suggests_closest_name():
    with pytest.raises(ValueError) as info:
        layer_map("uniform-con", 6, 12)
    message = str(info.value)
    assert "unknown layer mapping 'uniform-con'" in message and "did you mean 'uniform-cons'?" in message
    assert "\n" not in message
    with pytest.raises(ValueError, match="did you mean 'last'"):
        layer_map("lats", 6, 12)


def test_student_deeper_than_teacher_and_bad_counts():
    with pytest.raises(ValueError, match="student has 13 layers but the teacher only 12"):
        layer_map("uniform", 13, 12)
    with pytest.raises(ValueError, match="positive integers"):
        layer_map("last", 0, 12)


def test_every_strategy_is_covered():
    assert set(STRATEGIES) == set(EXPECTED) | {"explicit"}


@pytest.mark.parametrize("num_teacher", range(1, 26))
def test_every_student_block_gets_a_target_and_uniform_cons_uses_each_teacher_block_once(num_teacher):
    for num_student in range(1, num_teacher + 1):
        cons = layer_map("uniform-cons", num_student, num_teacher)
        uniform = layer_map("uniform", num_student, num_teacher)
        assert [s for s, _ in cons] == list(range(1, num_student + 1))
        flat = [t for _, ts in cons for t in ts]
        assert flat == list(range(1, num_teacher + 1))  # consecutive groups, in order, each block once
        assert [ts[-1] for _, ts in cons] == [ts[0] for _, ts in uniform]  # a group ends at uniform's target
        sizes = {len(ts) for _, ts in cons}
        assert max(sizes) - min(sizes) <= 1  # as even as the depths allow
        plus_last = layer_map("uniform+last", num_student, num_teacher)
        assert [s for s, _ in plus_last] == list(range(1, num_student + 1))
        assert [ts[1] for _, ts in plus_last] == list(range(num_teacher - num_student + 1, num_teacher + 1))


def test_methods_md_table_is_the_code_output():
    """docs/methods.md writes the pairs out for 12->6, 12->5, 12->4, 24->6; they must be what the code gives."""
    assert TABLE_SHAPES == ((12, 6), (12, 5), (12, 4), (24, 6))
    doc = METHODS_MD.read_text(encoding="utf-8")
    start, end = "<!-- layer-map-table: start -->\n", "\n<!-- layer-map-table: end -->"
    assert start in doc and end in doc
    assert doc.split(start, 1)[1].split(end, 1)[0] == pairs_table()
    # The table holds the hand-checked pairs of this file (not only whatever the code prints).
    assert "| 12 -> 5 | 5 | 12 | 12 | 10, 11, 12 | 12, 12 |" in doc
    assert "| 24 -> 6 | 1 | - | 4 | 1, 2, 3, 4 | 4, 19 |" in doc
