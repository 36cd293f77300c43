"""Keep / drop labels of the original words from a compressed text, the quality measures, and the filter.

LLMLingua-2 (Pan et al. 2024, sec. 3.2 data annotation, sec. 3.3 quality control): the LLM compresses a chunk by deleting words; each word of the
compressed text is matched back to the original, in order, within a window of the original after the last
match, and the matched original words are labelled "keep" (every other word "drop"). Searching forward from the
last match resolves repeated words (the first "the" after the previous match is taken, not any "the"); the
window stops a word the LLM changed or moved from being matched far away.

Quality measures, with S_ori / S_comp the words of the original / compressed text and l(w) the label:

- variation rate: VR = (1 / |S_comp|) sum_{w in S_comp} 1(w not in S_ori), the share of compressed
  words that are not in the original at all (the LLM reworded, despite being told not to);
- alignment gap: AG = HR - MR, hitting rate HR = (1 / |S_ori|) sum_{w in S_comp} 1(w in S_ori) minus
  matching rate MR = (1 / |S_ori|) sum_{w in S_ori} 1(l(w) = keep): words that are in the original but could
  not be matched in order (moved, or beyond the window) raise it.

Samples are filtered by both (sec. 3.3: the 5% with the highest VR and the 10% with the highest AG go). Words
compare after NFKC normalisation and lower-casing. Pure functions, no model.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from typing import NamedTuple

DEFAULT_WINDOW = 150  # original words searched after the last match; the paper gives no number in its text
VARIATION_TOP = 0.05  # sec. 3.3: the top 5% by variation rate are discarded
GAP_TOP = 0.10  # sec. 3.3: the top 10% by alignment gap are discarded


def normalize(word: str) -> str:
    return unicodedata.normalize("NFKC", word).lower()


class Alignment(NamedTuple):
    """labels[i]: original word i is kept; unmatched: compressed words matched to nothing."""

    labels: list[bool]
    unmatched: int


def match_labels(original: Sequence[str], compressed: Sequence[str], *, window: int = DEFAULT_WINDOW) -> Alignment:
    """Label the original words by matching the compressed words back to them in order (module docstring).

    Each compressed word takes the first equal original word in ``original[p : p + window]``, where p is one past
    the previous match; a word with no such match is counted in ``unmatched`` and leaves p where it is.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    keys = [normalize(w) for w in original]
    labels = [False] * len(original)
    position, unmatched = 0, 0
    for word in compressed:
        key = normalize(word)
        found = next((j for j in range(position, min(len(keys), position + window)) if keys[j] == key), None)
        if found is None:
            unmatched += 1
            continue
        labels[found] = True
        position = found + 1
    return Alignment(labels, unmatched)


def variation_rate(original: Sequence[str], compressed: Sequence[str]) -> float:
    """The variation rate: the share of compressed words absent from the original; 0 for an empty compression."""
    if not compressed:
        return 0.0
    vocabulary = {normalize(w) for w in original}
    return sum(normalize(w) not in vocabulary for w in compressed) / len(compressed)


def alignment_gap(original: Sequence[str], compressed: Sequence[str], labels: Sequence[bool]) -> float:
    """The alignment gap: hitting rate minus matching rate, both over |S_ori|; 0 for an empty original."""
    if not original:
        return 0.0
    vocabulary = {normalize(w) for w in original}
    hitting = sum(normalize(w) in vocabulary for w in compressed) / len(original)
    matching = sum(bool(label) for label in labels) / len(original)
    return hitting - matching


class Labelled(NamedTuple):
    labels: list[bool]
    variation_rate: float
    alignment_gap: float
    unmatched: int
    problem: str | None  # why the sample cannot be used at all, or None


def label_sample(original: Sequence[str], compressed: Sequence[str], *, window: int = DEFAULT_WINDOW) -> Labelled:
    """Labels and quality measures of one chunk; ``problem`` names an unusable sample (an empty chunk, an empty
    compression, or one that matched no word)."""
    alignment = match_labels(original, compressed, window=window)
    problem = None
    if not original:
        problem = "empty chunk"
    elif not compressed:
        problem = "empty compression"
    elif not any(alignment.labels):
        problem = "no word matched"
    return Labelled(alignment.labels, variation_rate(original, compressed),
                    alignment_gap(original, compressed, alignment.labels), alignment.unmatched, problem)


def top_fraction_threshold(values: Sequence[float], fraction: float) -> float:
    """The value above which the top ``fraction`` of ``values`` lie: the value at ascending rank
    ceil(n (1 - fraction)). Values strictly above it are "the top fraction"; ties with it stay, so a measure that
    is 0 for every sample (the information annotator's) filters nothing. +inf for no values or fraction 0."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if not values or fraction == 0.0:
        return math.inf
    ordered = sorted(values)
    rank = max(1, math.ceil(len(ordered) * (1.0 - fraction)))
    return ordered[rank - 1]


def quality_filter(
    variation: Sequence[float], gaps: Sequence[float], *, variation_top: float = VARIATION_TOP,
    gap_top: float = GAP_TOP,
) -> list[str | None]:
    """Per sample, None to keep it or the reason it is filtered out ("variation rate", "alignment gap")."""
    if len(variation) != len(gaps):
        raise ValueError(f"{len(variation)} variation rates for {len(gaps)} alignment gaps")
    v_max = top_fraction_threshold(variation, variation_top)
    g_max = top_fraction_threshold(gaps, gap_top)
    return ["variation rate" if v > v_max else "alignment gap" if g > g_max else None
            for v, g in zip(variation, gaps)]


def keep_top(scores: Sequence[float], count: int, forced: Sequence[bool] | None = None) -> list[bool]:
    """Keep ``count`` of the words: the forced ones first, then the highest scores (ties: the earlier word).

    This is LLMLingua-2's "keep the words above the (1 - r) percentile of the chunk" taken by rank, so that a
    chunk of n words keeps exactly ``count`` = round(r n) of them even when scores tie. Forced words beyond
    ``count`` are all kept (forcing wins over the rate); a NaN score ranks below every number.
    """
    n = len(scores)
    forced = list(forced) if forced is not None else [False] * n
    if len(forced) != n:
        raise ValueError(f"{len(forced)} forced flags for {n} scores")
    ranked = [math.inf if math.isnan(s) else -s for s in scores]  # NaN (a word without tokens) ranks last
    order = sorted(range(n), key=lambda i: (not forced[i], ranked[i], i))
    keep = [False] * n
    for rank, i in enumerate(order):
        if rank < count or forced[i]:
            keep[i] = True
    return keep
