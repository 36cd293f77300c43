"""Downstream task loading: local files, the two-file form, the hub (mocked), stdlib-topic, errors."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from tadistill.data import builtin_tasks
from tadistill.data.builtin_tasks import stdlib_topic_examples
from tadistill.errors import ConfigError, DataError
from tadistill.evaluation.tasks import KNOWN_TASKS, XNLI_LANGUAGES, load_task

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _sentence(i: int) -> str:
    return f"{WORDS[i % 12]} {WORDS[(i * 7) % 12]} sentence number {i}"


def test_local_csv_single_string_labels(tmp_path):
    rows = [{"text": _sentence(i), "label": ["pos", "neg"][i % 2]} for i in range(60)]
    data = load_task(str(_write_csv(tmp_path / "t.csv", rows)))
    assert data.spec.text_pair is None and data.spec.num_labels == 2
    assert data.spec.metrics == ("accuracy", "f1") and data.label_names == ("neg", "pos")
    assert 0 < len(data.eval) < len(data.train) and len(data.train) + len(data.eval) == 60
    expected = {r["text"]: ["pos", "neg"][i % 2] for i, r in enumerate(rows)}
    for text, pair, label in data.train + data.eval:
        assert pair is None and data.label_names[label] == expected[text]  # sorted order: neg=0, pos=1
    # The hash split is stable: loading again gives the same rows in the same order.
    again = load_task(str(tmp_path / "t.csv"))
    assert again.train == data.train and again.eval == data.eval


def test_local_jsonl_pair_multiclass(tmp_path):
    labels = ["entailment", "neutral", "contradiction"]
    rows = [{"text": _sentence(i), "text_pair": _sentence(i + 1), "label": labels[i % 3]} for i in range(50)]
    data = load_task(str(_write_jsonl(tmp_path / "p.jsonl", rows)))
    assert data.spec.text_pair == "text_pair" and data.spec.num_labels == 3
    assert data.spec.metrics == ("accuracy",)
    assert data.label_names == ("contradiction", "entailment", "neutral")
    by_text = {r["text"]: r for r in rows}
    for text, pair, label in data.train + data.eval:
        assert pair == by_text[text]["text_pair"] and data.label_names[label] == by_text[text]["label"]


def test_integer_labels_keep_numeric_order_and_floats_mean_regression(tmp_path):
    ints = [{"text": _sentence(i), "label": str([-1, 2, 10][i % 3])} for i in range(30)]
    data = load_task(str(_write_csv(tmp_path / "i.csv", ints)))
    assert data.label_names == ("-1", "2", "10")  # numeric, not string order ("-1", "10", "2")
    gold = {r["text"]: {"-1": 0, "2": 1, "10": 2}[r["label"]] for r in ints}
    assert all(label == gold[text] for text, _, label in data.train + data.eval)

    scores = [{"text": _sentence(i), "label": i / 10} for i in range(40)]
    reg = load_task(str(_write_jsonl(tmp_path / "r.jsonl", scores)))
    assert reg.spec.num_labels == 1 and reg.spec.is_regression
    assert reg.spec.metrics == ("pearson", "spearman")
    assert sorted(y for *_, y in reg.train + reg.eval) == [i / 10 for i in range(40)]
    assert all(isinstance(y, float) for *_, y in reg.train)


def test_two_file_form(tmp_path):
    train_rows = [{"text": _sentence(i), "label": "a" if i % 2 else "b"} for i in range(12)]
    train = _write_csv(tmp_path / "train.csv", train_rows)
    # "c" only occurs in the dev file: the label ids come from both files.
    dev = _write_csv(tmp_path / "dev.csv", [{"text": _sentence(100 + i), "label": "abc"[i % 3]} for i in range(6)])
    data = load_task(f"{train},{dev}")
    assert len(data.train) == 12 and len(data.eval) == 6
    assert data.label_names == ("a", "b", "c") and data.spec.num_labels == 3
    assert [r[0] for r in data.eval] == [_sentence(100 + i) for i in range(6)]  # file order, no re-split
    assert [r[2] for r in data.eval] == [0, 1, 2, 0, 1, 2]
    assert (data.spec.train_split, data.spec.eval_split) == ("train.csv", "dev.csv")


def test_subsampling_is_seeded_and_keeps_order(tmp_path):
    rows = [{"text": _sentence(i), "label": i % 2} for i in range(200)]
    path = str(_write_jsonl(tmp_path / "s.jsonl", rows))
    full = load_task(path)
    a = load_task(path, max_train=20, max_eval=5, seed=0)
    b = load_task(path, max_train=20, max_eval=5, seed=0)
    c = load_task(path, max_train=20, max_eval=5, seed=1)
    assert len(a.train) == 20 and len(a.eval) == 5
    assert a.train == b.train and a.train != c.train
    positions = [full.train.index(r) for r in a.train]
    assert positions == sorted(positions)
    with pytest.raises(ConfigError):
        load_task(path, max_train=0)


def _assert_one_line(exc: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(exc.value) and str(exc.value)


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="sst2") as exc:  # the did-you-mean hint
        load_task("sst-2")
    _assert_one_line(exc)
    with pytest.raises(DataError, match="not found") as exc:
        load_task(str(tmp_path / "missing.csv"))
    _assert_one_line(exc)
    no_label = _write_csv(tmp_path / "nolabel.csv", [{"text": "x y z", "target": "a"}] * 5)
    with pytest.raises(DataError, match="'label'") as exc:
        load_task(str(no_label))
    _assert_one_line(exc)
    with pytest.raises(DataError, match="not valid JSON"):
        (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{oops\n')
        load_task(str(tmp_path / "bad.jsonl"))
    one_class = _write_csv(tmp_path / "one.csv", [{"text": _sentence(i), "label": "a"} for i in range(20)])
    with pytest.raises(DataError, match="single label"):
        load_task(str(one_class))
    same_text = [{"text": "only row here", "label": "a"}, {"text": "only row here", "label": "b"}]
    tiny = _write_csv(tmp_path / "tiny.csv", same_text)  # one text: both rows land in the same split
    with pytest.raises(DataError, match="too few rows"):
        load_task(str(tiny))
    with pytest.raises(ConfigError, match="exactly two"):
        load_task(f"{one_class},{one_class},{one_class}")
    pair = _write_jsonl(tmp_path / "pair.jsonl", [{"text": "a b", "text_pair": "c", "label": i % 2} for i in range(4)])
    with pytest.raises(DataError, match="text_pair"):
        load_task(f"{one_class},{pair}")


def test_known_task_table():
    assert {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "stdlib-topic"} <= set(KNOWN_TASKS)
    assert len(XNLI_LANGUAGES) == 15 and all(f"xnli-{lang}" in KNOWN_TASKS for lang in XNLI_LANGUAGES)
    assert KNOWN_TASKS["cola"].metrics[0] == "matthews"
    assert KNOWN_TASKS["mrpc"].metrics == ("f1", "accuracy")
    assert KNOWN_TASKS["stsb"].num_labels == 1 and KNOWN_TASKS["stsb"].metrics == ("pearson", "spearman")
    assert KNOWN_TASKS["mnli"].eval_split == "validation_matched" and KNOWN_TASKS["mnli"].num_labels == 3
    assert KNOWN_TASKS["xnli-de"].hf_path == ("xnli", "de")


def test_hub_task_mocked(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*args, split=None, **kwargs):
        calls.append((args, split))
        if split == "train":
            return datasets.Dataset.from_dict({"sentence": ["nice film", "dull film", "great"], "label": [1, 0, 1],
                                               "idx": [0, 1, 2]})
        # Unlabeled rows (label -1, as in GLUE test splits) must be dropped.
        return datasets.Dataset.from_dict({"sentence": ["fine", "hidden"], "label": [1, -1], "idx": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_task("sst2")
    assert calls == [(("glue", "sst2"), "train"), (("glue", "sst2"), "validation")]
    assert data.train == [("nice film", None, 1), ("dull film", None, 0), ("great", None, 1)]
    assert data.eval == [("fine", None, 1)]
    assert data.spec.metrics == ("accuracy",)


def test_hub_failure_says_to_pass_local_files(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match="local files") as exc:
        load_task("cola")
    _assert_one_line(exc)


def test_stdlib_topic_is_balanced_and_deterministic():
    texts, labels = stdlib_topic_examples(per_class=150, seed=0)
    counts = Counter(labels)
    assert len(counts) >= 6 and min(counts.values()) >= 100
    assert max(counts.values()) <= 150
    assert len(set(texts)) == len(texts)  # no paragraph carries two labels
    builtin_tasks._topic_pools.cache_clear()  # rebuild from the sources: the same list again
    assert stdlib_topic_examples(per_class=150, seed=0) == (texts, labels)
    other, _ = stdlib_topic_examples(per_class=150, seed=1)
    assert other != texts
    small_texts, small_labels = stdlib_topic_examples(per_class=20)
    assert set(Counter(small_labels).values()) == {20}
    # Spot check the mapping: a paragraph about asyncio is in the concurrency class.
    asyncio_labels = {y for t, y in zip(texts, labels) if "event loop" in t.lower()}
    assert asyncio_labels <= {"concurrency"} and asyncio_labels
    with pytest.raises(ConfigError):
        stdlib_topic_examples(per_class=0)


def test_stdlib_topic_task():
    data = load_task("stdlib-topic", max_eval=100)
    assert data.spec.num_labels == len(data.label_names) >= 6
    assert list(data.label_names) == sorted(data.label_names)
    assert len(data.eval) == 100 and len(data.train) > 600
    assert {r[2] for r in data.train} == set(range(data.spec.num_labels))
    assert not {r[0] for r in data.train} & {r[0] for r in data.eval}
