"""Weighted source mixtures and language smoothing: probabilities, counts within sampling error, exact resume."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from tadistill.cli.main import main
from tadistill.config import DataConfig
from tadistill.data import batches
from tadistill.data.batches import BatchOrder
from tadistill.data.mixture import ConcatSet, MixtureSet, mixture_probabilities
from tadistill.data.prepare import prepare_corpus
from tadistill.data.tokenized import SequenceSet
from tadistill.errors import ConfigError, DataError
from tadistill.resolve import resolve_config


def _part(n: int, tag: int, length: int = 3) -> SequenceSet:
    """n sequences whose first token says the part (tag) and the second the index in it."""
    return SequenceSet.from_lists([[tag, i] + [0] * (length - 2) for i in range(n)])


def _who(sequence) -> tuple[int, int]:
    return int(sequence[0]), int(sequence[1])


def test_probabilities_from_weights_sizes_and_alpha() -> None:
    assert mixture_probabilities([10, 30], weights=[1, 3]) == pytest.approx([0.25, 0.75])
    assert mixture_probabilities([10, 30]) == pytest.approx([0.25, 0.75])  # no weights: by size
    # Conneau & Lample 2019: q_i = n_i^alpha / sum_j n_j^alpha; small languages are drawn more often than by size.
    tokens, alpha = [1_000, 9_000, 90_000], 0.3
    expected = [n**alpha / sum(m**alpha for m in tokens) for n in tokens]
    got = mixture_probabilities(tokens, languages=["sw", "de", "en"], alpha=alpha)
    assert got == pytest.approx(expected)
    assert got[0] > tokens[0] / sum(tokens) and got[2] < tokens[2] / sum(tokens)
    assert mixture_probabilities(tokens, languages=["sw", "de", "en"], alpha=1.0) == pytest.approx(
        [n / sum(tokens) for n in tokens])
    # Two sources of one language share its probability by size.
    two = mixture_probabilities([100, 300, 400], languages=["de", "de", "en"], alpha=0.5)
    q_de = 400**0.5 / (400**0.5 + 400**0.5)
    assert two == pytest.approx([q_de / 4, q_de * 3 / 4, 1 - q_de])
    with pytest.raises(DataError, match="no training tokens"):
        mixture_probabilities([10, 0], weights=[1, 1])


@pytest.mark.parametrize("seed", [0, 7])
def test_weights_are_honoured_within_sampling_error(seed) -> None:
    # Each global index draws its source independently: count_i ~ Binomial(N, p_i). A 5-sigma bound fails by
    # chance with probability below 1e-6 per source, and catches any systematic bias above 5 / sqrt(N) ~ 1%.
    probabilities = [0.6, 0.3, 0.1]
    parts = [_part(50, 0), _part(500, 1), _part(7, 2)]
    mixture = MixtureSet(parts, probabilities, seed=seed, length=200_000)
    counts = mixture._counts[-1].tolist()
    n = len(mixture)
    for count, p in zip(counts, probabilities):
        assert abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p)), (count, n * p)
    assert mixture.fractions() == pytest.approx([c / n for c in counts])
    # The counts table agrees with reading the indices one by one.
    sample = Counter(_who(mixture[g])[0] for g in range(0, 5_000))
    direct = Counter(int(mixture.locate(g)[0]) for g in range(0, 5_000))
    assert sample == direct
    assert sum(sample.values()) == 5_000


def test_one_pass_spreads_each_source_evenly() -> None:
    # Within a pass an upsampled source repeats evenly and a downsampled one shows no sequence twice.
    big, small = _part(3_000, 0), _part(40, 1)
    mixture = MixtureSet([big, small], [0.5, 0.5], seed=3)  # length: 3,040 indices, about 1,520 each
    seen = Counter(_who(mixture[g]) for g in range(len(mixture)))
    big_seen = [k for k in seen if k[0] == 0]
    assert all(seen[k] == 1 for k in big_seen)  # downsampled: no repeats
    small_counts = [seen[(1, i)] for i in range(40)]
    assert max(small_counts) - min(small_counts) <= 1 and min(small_counts) >= 30  # upsampled ~38x, evenly
    # The big source's subset is spread over it, not its first rows.
    assert max(i for _, i in big_seen) > 2_800 and min(i for _, i in big_seen) < 200


def test_resume_reads_exactly_the_uninterrupted_samples() -> None:
    # The loop reads train[i] for i in BatchOrder.indices(k); both are pure functions of (seed, k), so fresh
    # objects (a restarted process) continue with exactly the samples the uninterrupted run reads.
    def build():
        parts = [_part(300, 0), _part(80, 1), _part(25, 2)]
        mixture = MixtureSet(parts, [0.5, 0.3, 0.2], seed=11)
        return mixture, BatchOrder(len(mixture), 8, seed=11)

    mixture, order = build()
    straight = [[_who(mixture[i]) for i in order.indices(k)] for k in range(120)]  # crosses epochs (50 per epoch)
    mixture, order = build()
    resumed = [[_who(mixture[i]) for i in order.indices(k)] for k in range(70, 120)]
    assert resumed == straight[70:]
    other = MixtureSet([_part(300, 0), _part(80, 1), _part(25, 2)], [0.5, 0.3, 0.2], seed=12)
    assert [_who(other[i]) for i in range(50)] != [_who(mixture[i]) for i in range(50)]


def test_processes_read_disjoint_batches() -> None:
    # The loop gives process r of w the batch numbers k * w + r: within an epoch no sequence is read twice.
    mixture = MixtureSet([_part(64, 0), _part(64, 1)], [0.5, 0.5], seed=0)
    order = BatchOrder(len(mixture), 4, seed=0)
    world = 2
    per_process = [[i for step in range(16) for i in order.indices(step * world + r)] for r in range(world)]
    assert not set(per_process[0]) & set(per_process[1])
    assert sorted(per_process[0] + per_process[1]) == list(range(128))


def test_concat_and_errors() -> None:
    concat = ConcatSet([_part(3, 0), _part(2, 1)])
    assert [_who(concat[g]) for g in range(5)] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert _who(concat[-1]) == (1, 1) and concat.num_tokens() == 15
    with pytest.raises(IndexError):
        concat[5]
    with pytest.raises(DataError, match="'empty' of the mixture has no sequences"):
        MixtureSet([_part(3, 0), SequenceSet.from_lists([])], [0.5, 0.5], seed=0, names=["a", "empty"])


@pytest.mark.parametrize("n", [13, 1000, 4097])
def test_feistel_order_covers_every_example_once_per_epoch(monkeypatch, n) -> None:
    # Above RANDPERM_LIMIT the order is computed per batch without a permutation in memory.
    monkeypatch.setattr(batches, "RANDPERM_LIMIT", 8)
    order = BatchOrder(n, max(5, n // 40), seed=1, drop_last=False)
    per_epoch = order.batches_per_epoch()
    epochs = [[i for k in range(e * per_epoch, (e + 1) * per_epoch) for i in order.indices(k)] for e in range(2)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1] and epochs[0] != list(range(n))
    assert BatchOrder(n, max(5, n // 40), seed=1, drop_last=False).indices(3) == order.indices(3)


def test_in_memory_mixture_by_language(tiny_tokenizer, tmp_path) -> None:
    words = ["the fox", "a teacher", "student layer"]
    paths = []
    for k, n in enumerate([400, 100, 20]):
        path = tmp_path / f"{k}.txt"
        path.write_text("\n\n".join(f"{words[k]} {i} model attention" for i in range(n)), encoding="utf-8")
        paths.append(str(path))
    dc = DataConfig(source=[{"path": p, "language": lang} for p, lang in zip(paths, ["en", "de", "sw"])], alpha=0.3,
                    max_length=16, heldout_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    splits = prepare_corpus(dc, tiny_tokenizer, seed=0)
    assert isinstance(splits.train, MixtureSet)
    languages = splits.mixture["languages"]
    tokens = [languages[lang]["tokens"] for lang in ("en", "de", "sw")]
    expected = [t**0.3 / sum(u**0.3 for u in tokens) for t in tokens]
    assert [languages[lang]["probability"] for lang in ("en", "de", "sw")] == pytest.approx(expected, abs=1e-5)
    assert languages["sw"]["fraction"] > tokens[2] / sum(tokens)  # the small language is upsampled
    assert len(splits.heldout) > 0 and len(splits.heldout_texts) > 0
    first = {t.split()[0] for t in splits.heldout_texts[:3]}
    assert len(first) == 3  # held-out texts interleave the languages


@pytest.mark.parametrize("value,message", [
    ("[{path: a, weight: 0}]", "entry 0 weight must be a positive number"),
    ("[{path: a, weight: -1}]", "entry 0 weight must be a positive number"),
    ("[{path: a, lang: de}]", "unknown key 'lang' (did you mean 'language'?)"),
    ("[{path: a, language: 'd e'}]", "is not a language code"),
    ("[{path: a, weight: 1}, b]", "give every data.source entry a weight, or none"),
    ("[]", "an empty list"),
])
def test_bad_sources_are_one_line_config_errors(value, message) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config("hs", overrides=[f"data.source={value}"])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_alpha_needs_languages_and_no_weights() -> None:
    with pytest.raises(ConfigError, match="give every data.source entry a language"):
        resolve_config("hs", overrides=["data.source=[{path: a}, {path: b, language: de}]", "data.alpha=0.3"])
    with pytest.raises(ConfigError, match="drop the sources' weights, or alpha"):
        resolve_config("hs", overrides=["data.source=[{path: a, weight: 1, language: en}]", "data.alpha=0.3"])
    with pytest.raises(ConfigError, match="drop data.prepared"):
        resolve_config("hs", overrides=["data.prompt_field=prompt", "data.prepared=shards"])
    config = resolve_config("hs", overrides=["data.source=[{path: a, language: en}, {path: b, language: de}]",
                                             "data.alpha=0.7"])
    assert config.model_dump(mode="json")["data"]["source"][1] == {"path": "b", "weight": None, "language": "de"}


def test_weighted_run_resumes_exactly(tiny_args, tiny_corpus, tmp_path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"the student model {i} keeps the teacher layer" for i in range(60)))
    sources = f"data.source=[{{path: {tiny_corpus}, weight: 0.7}}, {{path: {other}, weight: 0.3, language: de}}]"
    common = ["distill", "hs", *tiny_args(sources, "train.steps=4", "train.save_every=2", "train.eval_every=2"),
              "--no-progress"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--out", str(straight)]) == 0
    assert main([*common, "--set", "train.stop_at=2", "--out", str(split)]) == 0
    assert main([*common, "--out", str(split), "--resume"]) == 0
    rows = [[json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (straight, split)]
    losses = [{r["step"]: r["loss"] for r in run if "loss" in r} for run in rows]
    assert sorted(losses[0]) == [1, 2, 3, 4] and losses[0] == losses[1]
