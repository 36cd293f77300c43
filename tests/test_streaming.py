"""Streaming preparation into memory-mapped token shards: equal to the in-memory path, written once, atomically."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from tadistill.cli.main import main
from tadistill.config import DataConfig
from tadistill.data import prepare
from tadistill.data.prompts import split_prompts
from tadistill.data.readers import _PARAGRAPH_BREAK
from tadistill.data.shards import ShardSet, id_dtype
from tadistill.data.sources import load_texts
from tadistill.data.tokenized import split_texts, tokenize_corpus
from tadistill.errors import DataError

WORDS = "the quick brown fox jumps over lazy dog teacher student layer attention model small".split()


def _texts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = torch.randint(len(WORDS), (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        out.append(" ".join(WORDS[w] for w in words) + f" {i}")
    return out


def _write(path, texts):
    path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return path


def _same(a, b) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        assert torch.equal(a[i], b[i]), i
        assert a.prompt_length(i) == b.prompt_length(i), i


@pytest.mark.parametrize("packing,max_length,prompt_tokens", [(True, 16, None), (True, 40, 5), (False, 12, None)])
def test_shards_equal_the_in_memory_corpus(tiny_tokenizer, tmp_path, packing, max_length, prompt_tokens) -> None:
    # The streaming packer cuts the same sequences as tokenize_corpus, across tokenizer chunks (size 7 here).
    texts = _texts(400)
    corpus = _write(tmp_path / "c.txt", texts)
    reference = tokenize_corpus(texts, tiny_tokenizer, max_length=max_length, heldout_fraction=0.1, seed=4,
                                packing=packing)
    dc = DataConfig(source=str(corpus), prepared=str(tmp_path / "shards"), max_length=max_length, packing=packing,
                    heldout_fraction=0.1, prompt_tokens=prompt_tokens)
    with pytest.MonkeyPatch.context() as m:
        m.setattr("tadistill.data.streaming._TOKENIZE_BATCH", 7)
        splits = prepare.prepare_corpus(dc, tiny_tokenizer, seed=4)
    assert isinstance(splits.train, ShardSet) and splits.train.dtype == np.uint16
    if prompt_tokens:
        reference.train = split_prompts(reference.train, prompt_tokens)
        reference.heldout = split_prompts(reference.heldout, prompt_tokens)
    _same(splits.train, reference.train)
    _same(splits.heldout, reference.heldout)
    assert splits.heldout_texts == reference.heldout_texts
    assert splits.train.num_tokens() == reference.train.num_tokens()


def test_id_dtype_follows_the_vocabulary() -> None:
    assert id_dtype(30522) == np.uint16 and id_dtype(65536) == np.uint16
    assert id_dtype(65537) == np.uint32 and id_dtype(128256) == np.uint32


def test_damaged_shards_are_one_line_errors(tiny_tokenizer, tmp_path) -> None:
    corpus = _write(tmp_path / "c.txt", _texts(300))
    dc = DataConfig(source=str(corpus), max_length=16, heldout_fraction=0.1, prepared=str(tmp_path / "s"))
    splits = prepare.prepare_corpus(dc, tiny_tokenizer, seed=0)
    first, last = splits.train[0], splits.train[-1]
    folder = splits.train.folder
    with (folder / "train.ids").open("r+b") as f:  # a truncated ids file
        f.truncate((folder / "train.ids").stat().st_size - 2)
    with pytest.raises(DataError, match="damaged") as info:
        prepare.prepare_corpus(dc, tiny_tokenizer, seed=0)
    assert "\n" not in str(info.value)
    assert first.numel() == 16 and last.numel() >= 10


def test_txt_is_read_line_by_line_as_paragraphs(tmp_path) -> None:
    # The lazy reader gives the texts the whole-file split gave: blank lines (with spaces or tabs), \r\n.
    raw = "a b\r\nc\r\n\r\n\r\n  d \n \t \ne\n\n\n\nf  \n\t\ng"
    path = tmp_path / "x.txt"
    path.write_bytes(raw.encode("utf-8"))
    expected = [t.strip() for t in _PARAGRAPH_BREAK.split(raw.replace("\r\n", "\n")) if t.strip()]
    assert load_texts(str(path)) == expected == ["a b\nc", "d", "e", "f", "g"]


def test_parquet_is_read_in_batches(tmp_path, monkeypatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i}" for i in range(10)] + [None, " last "]
    pq.write_table(pa.table({"text": texts}), tmp_path / "t.parquet")
    monkeypatch.setattr("tadistill.data.readers._PARQUET_BATCH", 3)
    assert load_texts(str(tmp_path / "t.parquet")) == [f"row {i}" for i in range(10)] + ["last"]


def test_prepare_is_written_once_and_reused(tiny_tokenizer, tmp_path, monkeypatch) -> None:
    a, b = _write(tmp_path / "a.txt", _texts(300)), _write(tmp_path / "b.txt", _texts(200, seed=1))
    out = tmp_path / "shards"
    dc = DataConfig(source=[str(a), str(b)], max_length=16, heldout_fraction=0.1)
    first = prepare.prepare_shards(dc, tiny_tokenizer, seed=0, out=out)
    assert [r["path"] for r in first["sources"]] == [str(a), str(b)]
    assert first["sources"][0]["train"]["tokens"] > 0 and first["dtype"] == "uint16"

    def refuse(*args, **kwargs):
        raise AssertionError("an up-to-date preparation must not stream again")

    monkeypatch.setattr(prepare, "prepare_stream", refuse)
    assert prepare.prepare_shards(dc, tiny_tokenizer, seed=0, out=out) == first
    # Weights change the sampling, not the shards: nothing is prepared again.
    weighted = DataConfig(source=[{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}], max_length=16,
                          heldout_fraction=0.1, prepared=str(out))
    assert prepare.prepare_corpus(weighted, tiny_tokenizer, seed=0).mixture["sources"][0]["probability"] == 0.75
    # A changed source is prepared again, the other one reused.
    _write(b, _texts(210, seed=2))
    with pytest.raises(AssertionError, match="must not stream"):
        prepare.prepare_shards(dc, tiny_tokenizer, seed=0, out=out)
    # ... but a run pointed at the folder refuses to re-tokenize it silently.
    monkeypatch.undo()
    with pytest.raises(DataError, match="prepared for another corpus") as info:
        prepare.prepare_corpus(dc.model_copy(update={"prepared": str(out)}), tiny_tokenizer, seed=0)
    assert "\n" not in str(info.value)
    again = prepare.prepare_shards(dc, tiny_tokenizer, seed=0, out=out)
    assert again["sources"][0]["folder"] == first["sources"][0]["folder"]
    assert again["sources"][1]["folder"] != first["sources"][1]["folder"]
    assert not (out / first["sources"][1]["folder"]).exists()  # the stale folder is removed


def test_interrupted_preparation_leaves_nothing_finished(tiny_tokenizer, tmp_path, monkeypatch) -> None:
    corpus = _write(tmp_path / "c.txt", _texts(300))
    out = tmp_path / "shards"
    dc = DataConfig(source=str(corpus), max_length=16, heldout_fraction=0.1)
    real = prepare.prepare_stream

    def crash(texts, *args, **kwargs):
        real(iter(list(texts)[:100]), *args, **kwargs)  # writes shards, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "prepare_stream", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_shards(dc, tiny_tokenizer, seed=0, out=out)
    assert not (out / "manifest.json").exists()
    assert [p.name for p in out.iterdir() if p.name != ".lock"] == []  # no temporary or half-written folder
    monkeypatch.undo()
    manifest = prepare.prepare_shards(dc, tiny_tokenizer, seed=0, out=out)
    assert manifest["sources"][0]["train"]["sequences"] > 0


def test_large_sources_stream_on_first_use(tiny_tokenizer, tmp_path) -> None:
    corpus = _write(tmp_path / "c.txt", _texts(300))
    small = DataConfig(source=str(corpus), max_length=16, heldout_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    assert not isinstance(prepare.prepare_corpus(small, tiny_tokenizer, seed=0).train, ShardSet)
    large = small.model_copy(update={"stream_above_mb": 0.001})  # 1 kB: the corpus counts as large
    splits = prepare.prepare_corpus(large, tiny_tokenizer, seed=0)
    assert isinstance(splits.train, ShardSet)
    assert (tmp_path / "cache" / "shards").is_dir()


def test_empty_heldout_and_empty_source_are_one_line_errors(tiny_tokenizer, tmp_path) -> None:
    few = _write(tmp_path / "few.txt", _texts(3))
    dc = DataConfig(source=str(few), max_length=16, heldout_fraction=0.01, prepared=str(tmp_path / "s1"))
    with pytest.raises(DataError, match="gave no held-out text .*raise data.heldout_fraction") as info:
        prepare.prepare_corpus(dc, tiny_tokenizer, seed=0)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "s1" / "manifest.json").exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n", encoding="utf-8")
    dc = DataConfig(source=str(empty), max_length=16, prepared=str(tmp_path / "s2"))
    with pytest.raises(DataError, match="is empty"):
        prepare.prepare_corpus(dc, tiny_tokenizer, seed=0)


def test_hub_sources_are_streamed(tiny_tokenizer, tmp_path, monkeypatch) -> None:
    import datasets

    texts = _texts(300)
    calls = []

    def load_dataset(name, config=None, *, split, streaming=False):
        calls.append((name, streaming))
        if name == "user/no-stream":
            raise NotImplementedError("this loader does not support streaming")
        return iter([{"text": t, "id": i} for i, t in enumerate(texts)])  # an IterableDataset, record by record

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    dc = DataConfig(source="user/set", max_length=16, heldout_fraction=0.1, prepared=str(tmp_path / "s"))
    splits = prepare.prepare_corpus(dc, tiny_tokenizer, seed=0)
    assert calls == [("user/set", True)]
    reference = tokenize_corpus(texts, tiny_tokenizer, max_length=16, heldout_fraction=0.1, seed=0)
    _same(splits.train, reference.train)
    dc = dc.model_copy(update={"source": "user/no-stream", "prepared": str(tmp_path / "s2")})
    with pytest.raises(DataError, match="cannot be streamed.*save it as .jsonl") as info:
        prepare.prepare_corpus(dc, tiny_tokenizer, seed=0)
    assert "\n" not in str(info.value)


def test_heldout_texts_stream_the_same_split(tmp_path) -> None:
    texts = _texts(300)
    corpus = _write(tmp_path / "c.txt", texts)
    dc = DataConfig(source=str(corpus), heldout_fraction=0.1)
    expected = split_texts(texts, 0.1, seed=2)[1]
    assert prepare.heldout_texts(str(corpus), dc, seed=2, limit=5) == expected[:5]
    assert prepare.heldout_texts(str(corpus), dc, seed=2, limit=1000) == expected


def test_cli_prepare_then_distill_from_shards(tiny_args, tiny_corpus, tmp_path, capsys) -> None:
    other = _write(tmp_path / "other.txt", [f"the student model {i} keeps the teacher layer attention" for i in range(60)])
    out = tmp_path / "shards"
    sources = f"data.source=[{{path: {tiny_corpus}, weight: 3}}, {{path: {other}, weight: 1}}]"
    args = [*tiny_args(sources), "--set", "data.max_length=16"]
    assert main(["prepare", "hs", *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train from them: --set data.prepared=" in printed and '"probability": 0.75' in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["sources"]) == 2
    assert main(["prepare", "hs", *args, "--out", str(out)]) == 0  # up to date: a no-op
    assert json.loads((out / "manifest.json").read_text()) == manifest
    run = tmp_path / "run"
    assert main(["distill", "hs", *args, "--set", f"data.prepared={out}", "--no-progress", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_split_tokens"] == sum(s["train"]["tokens"] for s in manifest["sources"])
    assert re.search(r"error: .*positive", _cli_error(["prepare", "hs", *tiny_args(
        f"data.source=[{{path: {tiny_corpus}, weight: 0}}]"), "--out", str(tmp_path / "x")], capsys))


def _cli_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err
