"""LLMLingua-2's pure parts on hand-made cases: words, chunks, matching, quality measures, filter, selection."""

from __future__ import annotations

import math

import pytest
import torch

from tadistill.lingua.compress import keep_within_budget, parse_force_tokens, word_probabilities
from tadistill.lingua.labels import (
    alignment_gap,
    keep_top,
    label_sample,
    match_labels,
    quality_filter,
    top_fraction_threshold,
    variation_rate,
)
from tadistill.lingua.train import token_labels
from tadistill.lingua.words import Word, chunk_spans, corpus_chunks, join_words, sentence_spans, split_words


def texts(words):
    return [w.text for w in words]


def test_split_words_separates_punctuation_keeps_inner_marks_and_newlines():
    words = split_words("Hello, world?  It's 3.14 -- os.path\n\nNext  line.")
    assert texts(words) == ["Hello", ",", "world", "?", "It's", "3.14", "-", "-", "os.path", "\n", "\n", "Next",
                            "line", "."]
    assert [w.space for w in words] == [False, False, True, False, True, True, True, False, True, False, False, False,
                                        True, False]
    # Runs of spaces fold into one; newlines stay.
    assert join_words(words) == "Hello, world? It's 3.14 -- os.path\n\nNext line."
    assert split_words("") == [] and split_words(" \t ") == []


def test_join_of_a_subset_reads_naturally():
    words = split_words("The cat, which was black, sat.")
    kept = [w for w in words if w.text in ("The", "cat", "sat", ".")]
    assert join_words(kept) == "The cat sat."


def test_sentence_spans_and_chunks_cut_at_sentence_ends():
    words = split_words("a b c. d e! f g h i j k? l")
    assert sentence_spans(words) == [(0, 4), (4, 7), (7, 14), (14, 15)]
    ones = [1] * len(words)
    # Sentences of 4, 3, 7 and 1 tokens in chunks of 8: [a b c . d e !] [f ... ?  l] cut at ends only.
    assert chunk_spans(words, ones, 8) == [(0, 7), (7, 15)]
    # A sentence longer than the chunk is cut between words; every word lands in exactly one span.
    spans = chunk_spans(words, ones, 3)
    assert spans[0] == (0, 3) and [i for s, e in spans for i in range(s, e)] == list(range(len(words)))
    assert all(e - s <= 3 for s, e in spans)
    # Words without tokens (a newline to WordPiece) cost nothing; a word longer than a chunk stands alone.
    assert chunk_spans(words, [0] * len(words), 1) == [(0, len(words))]
    assert chunk_spans(split_words("x y z"), [1, 9, 1], 4) == [(0, 1), (1, 2), (2, 3)]
    assert chunk_spans([], [], 5) == []
    with pytest.raises(ValueError):
        chunk_spans(words, ones[:-1], 4)


def test_corpus_chunks_join_paragraphs_and_never_end_on_a_newline():
    paragraphs = ["One two three four.", "Five six seven eight.", "Nine ten eleven twelve.", "x"]
    chunks = list(corpus_chunks(paragraphs, lambda ws: [1] * len(ws), 11, min_words=2))
    assert [texts(c) for c in chunks] == [
        ["One", "two", "three", "four", ".", "\n", "Five", "six", "seven", "eight", "."],
        ["Nine", "ten", "eleven", "twelve", ".", "\n", "x"],
    ]
    assert all(c[0].space is False and c[-1].text != "\n" for c in chunks)
    assert list(corpus_chunks(["", "  "], lambda ws: [1] * len(ws), 8)) == []


def test_matching_in_order_resolves_repeated_words():
    original = "the cat saw the dog and the bird".split()
    labels, unmatched = match_labels(original, "cat the bird".split())
    # "the" after "cat" is the second "the" (index 3), not the first; "bird" then follows it.
    assert labels == [False, True, False, True, False, False, False, True] and unmatched == 0
    # A repeated compressed word takes successive occurrences.
    labels, _ = match_labels(original, "the the the".split())
    assert [i for i, k in enumerate(labels) if k] == [0, 3, 6]


def test_matching_counts_words_absent_from_the_original_and_respects_the_window():
    original = "alpha beta gamma delta epsilon".split()
    labels, unmatched = match_labels(original, ["alpha", "zeta", "Gamma"])
    assert labels == [True, False, True, False, False] and unmatched == 1  # case-insensitive, 'zeta' unmatched
    # A word beyond the window after the last match is not matched.
    labels, unmatched = match_labels(original, ["alpha", "epsilon"], window=2)
    assert labels == [True, False, False, False, False] and unmatched == 1
    # A reordered word cannot match backwards.
    labels, unmatched = match_labels(original, ["delta", "beta"])
    assert labels == [False, False, False, True, False] and unmatched == 1
    with pytest.raises(ValueError):
        match_labels(original, [], window=0)


def test_punctuation_matches_as_words():
    original = texts(split_words("Yes, it works. Does it? Yes."))
    labels, unmatched = match_labels(original, texts(split_words("Yes works? .")))
    assert [w for w, k in zip(original, labels) if k] == ["Yes", "works", "?", "."] and unmatched == 0


def test_variation_rate_and_alignment_gap_by_hand():
    original = "a b c d e f g h i j".split()  # 10 words
    compressed = ["a", "c", "x", "b"]  # x is new; b comes after c: it is in the original but cannot match in order
    labels, unmatched = match_labels(original, compressed)
    assert variation_rate(original, compressed) == pytest.approx(1 / 4)
    # hitting rate 3/10 (a, c, b are in the original), matching rate 2/10 (a, c matched).
    assert alignment_gap(original, compressed, labels) == pytest.approx(0.1)
    assert unmatched == 2
    # A faithful deletion has no variation and no gap.
    faithful = ["a", "d", "j"]
    assert variation_rate(original, faithful) == 0.0
    assert alignment_gap(original, faithful, match_labels(original, faithful).labels) == pytest.approx(0.0)


def test_empty_chunk_and_empty_compression_are_unusable_not_errors():
    empty = label_sample([], ["word"])
    assert empty.labels == [] and empty.problem == "empty chunk" and empty.alignment_gap == 0.0
    nothing = label_sample(["a", "b"], [])
    assert nothing.labels == [False, False] and nothing.variation_rate == 0.0 and nothing.problem == "empty compression"
    stranger = label_sample(["a", "b"], ["zz"])
    assert stranger.problem == "no word matched" and stranger.variation_rate == 1.0
    assert label_sample(["a", "b"], ["b"]).problem is None


def test_filter_drops_the_top_shares_and_nothing_when_all_tie():
    variation = [0.0] * 18 + [0.5, 0.9]  # 20 samples: the top 5% is the single 0.9
    gaps = [0.01 * i for i in range(20)]  # the top 10% are the last two
    verdicts = quality_filter(variation, gaps)
    # Sample 19 is in both tops and is named for its variation rate; sample 18 goes for its gap.
    assert verdicts[19] == "variation rate" and verdicts[18] == "alignment gap" and verdicts[:18] == [None] * 18
    assert quality_filter([0.0] * 30, [0.0] * 30) == [None] * 30  # the information annotator: nothing to filter
    assert top_fraction_threshold([], 0.1) == math.inf
    with pytest.raises(ValueError):
        quality_filter([0.1], [])


def test_keep_top_is_the_percentile_by_rank_with_forced_words_first():
    scores = [0.1, 0.9, 0.5, 0.5, float("nan"), 0.7]
    assert keep_top(scores, 2) == [False, True, False, False, False, True]
    # Ties go to the earlier word, so exactly `count` words are kept.
    assert keep_top(scores, 3) == [False, True, True, False, False, True]
    # Forced words count toward the rate; NaN ranks below every number.
    assert keep_top(scores, 2, [True, False, False, False, False, False]) == [True, True, False, False, False, False]
    assert keep_top(scores, 6)[4] is True and keep_top(scores, 5)[4] is False
    # Forcing wins over the rate.
    assert sum(keep_top(scores, 1, [True] * 6)) == 6
    assert keep_top([], 0) == []


def test_budget_keeps_forced_then_best_words_that_fit():
    scores, tokens = [0.9, 0.8, 0.7, 0.1], [3, 5, 1, 1]
    assert keep_within_budget(scores, tokens, 5, [False] * 4) == [True, False, True, True]
    assert keep_within_budget(scores, tokens, 0, [False, False, False, True]) == [False, False, False, True]


def test_word_probability_is_the_mean_of_its_tokens():
    probs = torch.tensor([0.0, 0.2, 0.4, 0.9, 0.5, 0.0])
    word_ids = [None, 0, 0, 2, 2, None]  # word 1 has no token
    values = word_probabilities(probs, word_ids, 3)
    assert values[0] == pytest.approx(0.3) and math.isnan(values[1]) and values[2] == pytest.approx(0.7)


def test_token_labels_all_or_first_subtoken():
    word_ids = [None, 0, 0, 1, 2, 2, 2, None]
    assert token_labels(word_ids, [1, 0, 1], "all") == [-100, 1, 1, 0, 1, 1, 1, -100]
    assert token_labels(word_ids, [1, 0, 1], "first") == [-100, 1, -100, 0, 1, -100, -100, -100]


def test_force_tokens_parse_escapes_and_commas():
    assert parse_force_tokens("\\n,?") == ["\n", "?"]
    assert parse_force_tokens("") == []
    assert parse_force_tokens("?,,") == ["?", ","]


def test_word_round_trip_of_chunks_is_lossless():
    text = "First sentence here. Second one!\nThird (with brackets) and 2 numbers: 10, 20."
    words = split_words(text)
    assert split_words(join_words(words)) == words
    spans = chunk_spans(words, [1] * len(words), 6)
    assert [w for s, e in spans for w in words[s:e]] == words
    assert all(isinstance(w, Word) for w in words)
