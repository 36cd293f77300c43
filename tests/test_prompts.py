"""Tests of prompt / completion data: reading pairs, tokenizing with truncation rules, caching, split_prompts."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import TEXTS  # noqa: E402

from tadistill.data.prompts import load_pairs, split_prompts, tokenize_pairs  # noqa: E402
from tadistill.data.tokenized import SequenceSet, tokenize_corpus  # noqa: E402
from tadistill.errors import ConfigError, DataError  # noqa: E402

WORDS = sorted({w for t in TEXTS for w in re.findall(r"\w+", t.lower())})  # one token each, every tokenizer


def _words(start: int, n: int) -> str:
    """n distinct-in-order words (cycling through WORDS), each a single token."""
    return " ".join(WORDS[(start + k) % len(WORDS)] for k in range(n))


def _word_level(bos: bool):
    """A GPT-2-style tokenizer (no prefix, <|endoftext|> as eos) or, with bos, a Llama-style one (<s> prefix)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|endoftext|>", "<s>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {}
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
        extra["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>", **extra)


@pytest.fixture(scope="module")
def gpt_tokenizer():
    return _word_level(bos=False)


@pytest.fixture(scope="module")
def llama_tokenizer():
    return _word_level(bos=True)


def _pairs(n: int) -> list[tuple[str, str]]:
    """n distinct pairs with prompts of 2..9 words and completions of 1..12 words."""
    return [(_words(i, 2 + i % 8), f"{_words(3 * i, 1 + i % 12)} {WORDS[i % len(WORDS)]}") for i in range(n)]


# ---------------------------------------------------------------- reading


def test_load_jsonl_csv_parquet_and_folder(tmp_path) -> None:
    rows = [{"prompt": "Q: a?", "completion": " yes", "id": 1}, {"prompt": "  ", "completion": "x"},
            {"prompt": "Q: b?", "completion": "\nno\n"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    # Whitespace is kept (it changes BPE tokens); the blank prompt is dropped.
    assert load_pairs(str(tmp_path / "a.jsonl")) == [("Q: a?", " yes"), ("Q: b?", "\nno\n")]

    (tmp_path / "b.csv").write_text('question,answer\n"x, y",z\nw,\n', encoding="utf-8")
    assert load_pairs(str(tmp_path / "b.csv"), prompt_field="question", completion_field="answer") == [("x, y", "z")]

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": ["p1", None, "p3"], "completion": ["c1", "c2", "c3"]})
    (tmp_path / "sub").mkdir()
    pq.write_table(table, tmp_path / "sub" / "c.parquet")
    assert load_pairs(str(tmp_path / "sub" / "c.parquet")) == [("p1", "c1"), ("p3", "c3")]

    # A folder: recursive, sorted by path, other file types and hidden folders skipped.
    (tmp_path / "notes.txt").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.jsonl").write_text(json.dumps({"prompt": "h", "completion": "h"}), encoding="utf-8")
    (tmp_path / "b.csv").unlink()
    assert load_pairs(str(tmp_path)) == [("Q: a?", " yes"), ("Q: b?", "\nno\n"), ("p1", "c1"), ("p3", "c3")]


def test_bad_input_raises_one_line_data_errors(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl' line 2 has no string field 'completion'.*data\.completion_field"):
        load_pairs(str(path))
    path.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2 is not valid JSON"):
        load_pairs(str(path))
    (tmp_path / "d.csv").write_text("question,completion\nq,c\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no column 'prompt' \(columns: question, completion\): set data\.prompt_field"):
        load_pairs(str(tmp_path / "d.csv"))

    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = pa.table({"prompt": [[{"role": "user", "content": "hi"}]], "completion": ["c"]})
    pq.write_table(chat, tmp_path / "chat.parquet")
    # A list of messages makes the records chat records (data/chat.py): this one has no assistant turn to distill.
    with pytest.raises(DataError, match="row 1 has no assistant turn") as info:
        load_pairs(str(tmp_path / "chat.parquet"))
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="no such file or folder"):
        load_pairs("./missing/pairs.jsonl")
    with pytest.raises(DataError, match="no built-in prompt"):
        load_pairs("builtin")
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported type '.txt'"):
        load_pairs(str(tmp_path / "notes.txt"))
    (tmp_path / "blank.jsonl").write_text(json.dumps({"prompt": " ", "completion": "c"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no pair"):
        load_pairs(str(tmp_path / "blank.jsonl"))


def test_hub_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []
    table = datasets.Dataset.from_dict({"instruction": ["a", "b"], "output": ["x", "y"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or table)
    assert load_pairs("user/set:cfg", prompt_field="instruction", completion_field="output", split="test") == [
        ("a", "x"), ("b", "y")]
    assert calls[-1] == (("user/set", "cfg"), {"split": "test"})
    with pytest.raises(DataError, match="no column 'completion'.*set data.completion_field"):
        load_pairs("user/set", prompt_field="instruction")


# ---------------------------------------------------------------- tokenization


@pytest.mark.parametrize("kind", ["gpt", "llama", "bert"])
def test_sequences_are_prefix_prompt_completion_eos(kind, gpt_tokenizer, llama_tokenizer, tiny_tokenizer) -> None:
    tok = {"gpt": gpt_tokenizer, "llama": llama_tokenizer, "bert": tiny_tokenizer}[kind]
    prefix = {"gpt": [], "llama": [2], "bert": [tiny_tokenizer.cls_token_id]}[kind]
    end = [] if kind == "bert" else [tok.eos_token_id]  # BERT has no eos (and gets no [SEP] either)
    pairs = _pairs(40)
    splits = tokenize_pairs(pairs, tok, max_length=64, heldout_fraction=0.2, seed=0)
    assert len(splits.train) + len(splits.heldout) == 40 and len(splits.heldout) >= 1
    held = set(splits.heldout_texts)  # held-out texts are "prompt completion"
    heldout_pairs = [(p, c) for p, c in pairs if f"{p} {c}" in held]
    train_pairs = [(p, c) for p, c in pairs if f"{p} {c}" not in held]
    assert len(heldout_pairs) == len(splits.heldout) and splits.heldout_texts == [f"{p} {c}" for p, c in heldout_pairs]
    for part, part_pairs in ((splits.train, train_pairs), (splits.heldout, heldout_pairs)):
        assert part.prompt_lengths is not None and part.prompt_lengths.dtype == torch.int64
        for i, (prompt, completion) in enumerate(part_pairs):
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            c_ids = tok(completion, add_special_tokens=False)["input_ids"]
            assert part[i].tolist() == prefix + p_ids + c_ids + end
            assert part.prompt_length(i) == len(prefix) + len(p_ids)
    # Deterministic: the same split and ids again; another seed holds out other pairs.
    again = tokenize_pairs(pairs, tok, max_length=64, heldout_fraction=0.2, seed=0)
    assert torch.equal(again.train.ids, splits.train.ids) and again.heldout_texts == splits.heldout_texts
    other = tokenize_pairs(pairs, tok, max_length=64, heldout_fraction=0.2, seed=1)
    assert other.heldout_texts != splits.heldout_texts


def _one(tok, prompt_words: int, completion_words: int, max_length: int = 16):
    """Tokenize a pair of distinct words and return (ids, prompt length, prompt ids, completion ids).

    A second, short pair goes along because the split needs one pair on each side.
    """
    prompt, completion = _words(0, prompt_words), _words(prompt_words, completion_words)
    splits = tokenize_pairs(
        [(prompt, completion), (WORDS[0], WORDS[1])], tok, max_length=max_length, heldout_fraction=0.0, seed=0
    )
    part = splits.heldout if f"{prompt} {completion}" in splits.heldout_texts else splits.train
    assert len(part) == 1
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(completion, add_special_tokens=False)["input_ids"]
    assert len(p_ids) == prompt_words and len(c_ids) == completion_words  # one token per word
    return part[0].tolist(), part.prompt_length(0), p_ids, c_ids


def test_truncation_cuts_the_completion_first(gpt_tokenizer) -> None:
    eos = gpt_tokenizer.eos_token_id
    # 6 + 9 + eos = 16 fits exactly: nothing cut, eos kept.
    ids, n_prompt, p, c = _one(gpt_tokenizer, 6, 9)
    assert ids == p + c + [eos] and n_prompt == 6
    # 6 + 10 + eos = 17: the completion is cut to 10 and loses its eos (it did not end there).
    ids, n_prompt, p, c = _one(gpt_tokenizer, 6, 10)
    assert ids == p + c and n_prompt == 6 and len(ids) == 16
    # 12 + 20: the prompt leaves exactly a quarter (4) for the completion, so the prompt stays whole.
    ids, n_prompt, p, c = _one(gpt_tokenizer, 12, 20)
    assert ids == p + c[:4] and n_prompt == 12 and eos not in ids


def test_truncation_cuts_a_long_prompt_from_the_left(gpt_tokenizer, llama_tokenizer) -> None:
    eos = gpt_tokenizer.eos_token_id
    # 14 + 20 with max_length 16: the prompt alone leaves 2 < 4, so the completion keeps 4 and the
    # prompt keeps its last 12 tokens.
    ids, n_prompt, p, c = _one(gpt_tokenizer, 14, 20)
    assert ids == p[-12:] + c[:4] and n_prompt == 12 and len(ids) == 16
    # A short completion (2 + eos = 3 < 4) is kept whole with its eos; the prompt keeps its last 13.
    ids, n_prompt, p, c = _one(gpt_tokenizer, 20, 2)
    assert ids == p[-13:] + c + [eos] and n_prompt == 13
    # With a BOS prefix: 15 tokens of room, completion 4, prompt's last 11, BOS counted in the prompt.
    ids, n_prompt, p, c = _one(llama_tokenizer, 20, 20)
    assert ids == [2] + p[-11:] + c[:4] and n_prompt == 12 and len(ids) == 16


def test_too_small_max_length_is_a_config_error(gpt_tokenizer) -> None:
    with pytest.raises(ConfigError, match="at least 8"):
        tokenize_pairs(_pairs(10), gpt_tokenizer, max_length=4, heldout_fraction=0.1, seed=0)


# ---------------------------------------------------------------- cache


def test_cache_round_trip_keeps_prompt_lengths(gpt_tokenizer, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = _pairs(30)
    first = tokenize_pairs(pairs, gpt_tokenizer, max_length=12, heldout_fraction=0.2, seed=0, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    assert first.train.prompt_lengths is not None

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer must not run on a cache hit")

    with monkeypatch.context() as m:
        m.setattr(type(gpt_tokenizer), "__call__", refuse)
        again = tokenize_pairs(pairs, gpt_tokenizer, max_length=12, heldout_fraction=0.2, seed=0, cache_dir=tmp_path)
    for a, b in ((again.train, first.train), (again.heldout, first.heldout)):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.offsets, b.offsets)
        assert torch.equal(a.prompt_lengths, b.prompt_lengths)
    assert again.heldout_texts == first.heldout_texts
    # Changed content or a fingerprint means another cache entry, never a stale hit.
    changed = pairs[:-1] + [(pairs[-1][0], pairs[-1][1] + " dog")]
    tokenize_pairs(changed, gpt_tokenizer, max_length=12, heldout_fraction=0.2, seed=0, cache_dir=tmp_path)
    tokenize_pairs(pairs, gpt_tokenizer, max_length=12, heldout_fraction=0.2, seed=0, cache_dir=tmp_path,
                   fingerprint="x")
    assert len(list(tmp_path.iterdir())) == 3
    # Plain-text caches still load with no prompt lengths.
    texts = [f"{p} {c}" for p, c in pairs]
    tokenize_corpus(texts, gpt_tokenizer, max_length=12, cache_dir=tmp_path / "text", fingerprint="t")
    cached = tokenize_corpus(texts, gpt_tokenizer, max_length=12, cache_dir=tmp_path / "text", fingerprint="t")
    assert cached.train.prompt_lengths is None and cached.train.prompt_length(0) == 0


# ---------------------------------------------------------------- plain text as prompts


def test_split_prompts_and_sequence_set_prompt_lengths() -> None:
    plain = SequenceSet.from_lists([list(range(10)), [1, 2], [5], []])
    assert plain.prompt_lengths is None and plain.prompt_length(0) == 0
    split = split_prompts(plain, 4)
    assert split.prompt_lengths.tolist() == [4, 1, 0, 0] and split.prompt_lengths.dtype == torch.int64
    assert split.ids is plain.ids and split.offsets is plain.offsets and plain.prompt_lengths is None
    assert split.prompt_length(-4) == 4 and split[0].tolist() == list(range(10))
    assert split_prompts(plain, 20).prompt_lengths.tolist() == [9, 1, 0, 0]  # one continuation token remains
    with pytest.raises(ConfigError, match="prompt_tokens must be at least 1"):
        split_prompts(plain, 0)
    with pytest.raises(IndexError):
        split.prompt_length(4)
    built = SequenceSet.from_lists([[1, 2, 3], [4]], prompt_lengths=[2, 1])
    assert built.prompt_lengths.tolist() == [2, 1] and built.prompt_length(1) == 1
    with pytest.raises(ValueError, match="prompt_lengths has shape"):
        SequenceSet(ids=built.ids, offsets=built.offsets, prompt_lengths=torch.tensor([1]))
