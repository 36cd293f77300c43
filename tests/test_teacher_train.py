"""The self-trained GPT-2 teacher: tokenizer round trips, training, determinism, atomic folder, cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from tadistill.data import prepare
from tadistill.data.builtin import builtin_texts
from tadistill.data.tokenized import split_texts
from tadistill.errors import ConfigError, DataError
from tadistill.teachers import causal
from tadistill.teachers.causal import (
    TeacherSpec,
    cached_causal_teacher,
    default_teacher_dir,
    evaluate_loss,
    pack_texts,
    train_causal_teacher,
)
from tadistill.teachers.tokenizer import END_OF_TEXT, train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = TeacherSpec(layers=2, hidden=32, heads=2, context=32, vocab_size=300, steps=30, batch_size=8, warmup=3, lr=3e-3)
ODD = ["Hello  world , it's   a test.", "tabs\tand\nnewlines\n\n", "été ü 🙂 — ünïcödé", " leading space", ""]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return builtin_texts()[:300]


@pytest.fixture(scope="module")
def trained(texts, tmp_path_factory):
    return train_causal_teacher(tmp_path_factory.mktemp("teacher") / "gpt2", TINY, texts=texts, progress=False)


def test_tokenizer_round_trips_and_is_deterministic(texts, tmp_path):
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    assert len(tok) == 300
    eos = tok.convert_tokens_to_ids(END_OF_TEXT)
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == eos
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.eos_token_id, loaded.bos_token_id, loaded.pad_token_id) == (eos, eos, eos)
    for text in ODD + texts[:20]:
        ids = loaded(text, add_special_tokens=True)["input_ids"]
        assert ids == tok(text)["input_ids"]  # same encoding after reload, no special token added
        assert eos not in ids
        assert loaded.decode(ids) == text  # byte-level: exact round trip, unicode and spacing included
    again = train_bpe_tokenizer(texts, vocab_size=300)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    other = train_bpe_tokenizer(texts[::-1][:50], vocab_size=300)
    assert other.get_vocab() != tok.get_vocab()  # the vocabulary really comes from the texts


def test_tokenizer_rejects_bad_input():
    with pytest.raises(ConfigError, match="at least 258"):
        train_bpe_tokenizer(["some text here"], vocab_size=100)
    with pytest.raises(DataError):
        train_bpe_tokenizer(["", ""])


def test_pack_texts_separates_with_eos_and_masks_the_tail(texts):
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    sample = texts[:5]
    n_tokens = sum(len(tok(t)["input_ids"]) for t in sample) + len(sample)  # + one eos per text
    ids, labels = pack_texts(sample, tok, 16)
    assert ids.shape == (n_tokens // 16, 16) and torch.equal(ids, labels)
    ids, labels = pack_texts(sample, tok, 16, keep_tail=True)
    assert ids.shape == (math.ceil(n_tokens / 16), 16)
    assert int((labels != -100).sum()) == n_tokens
    assert int((ids == tok.eos_token_id).sum()) >= len(sample)


def test_spec_is_checked():
    with pytest.raises(ConfigError, match="multiple of heads"):
        TeacherSpec(hidden=30, heads=4)
    with pytest.raises(ConfigError, match="warmup"):
        TeacherSpec(steps=10, warmup=20)
    with pytest.raises(ConfigError, match="unknown TeacherSpec"):
        TeacherSpec.from_dict({**TINY.to_dict(), "layer": 3})
    assert TeacherSpec.from_dict(TINY.to_dict()) == TINY


def test_trained_teacher_loads_generates_and_beats_random_init(trained, texts):
    assert {"model.safetensors", "config.json", "tokenizer.json", "teacher.json"} <= {p.name for p in trained.iterdir()}
    assert not [p for p in trained.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    info = json.loads((trained / "teacher.json").read_text())
    assert info["spec"] == TINY.to_dict()
    assert info["tokens_seen"] == 30 * 8 * 32

    model = AutoModelForCausalLM.from_pretrained(trained)
    tok = AutoTokenizer.from_pretrained(trained)
    assert isinstance(model, GPT2LMHeadModel)
    assert model.config.n_layer == 2 and model.config.n_embd == 32 and model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id == tok.pad_token_id

    prompt = tok("The module", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].size(1) + 8)
    assert tok.decode(out[0]).startswith("The module")

    # Held-out loss recomputed here, independently of the trainer's own report.
    heldout = split_texts(texts, TINY.heldout_fraction, seed=TINY.seed)[1]
    ids, labels = pack_texts(heldout, tok, TINY.context, keep_tail=True)
    trained_loss = evaluate_loss(model, ids, labels)
    torch.manual_seed(0)
    untrained_loss = evaluate_loss(GPT2LMHeadModel(model.config), ids, labels)
    assert untrained_loss > math.log(len(tok)) - 0.5  # a random init is near uniform
    assert trained_loss < untrained_loss - 0.5
    assert info["heldout_loss"] == pytest.approx(trained_loss, abs=1e-4)
    assert info["heldout_perplexity"] == pytest.approx(math.exp(trained_loss), rel=1e-4)
    assert info["initial_heldout_loss"] > info["heldout_loss"]


def _weights(folder):
    return load_file(folder / "model.safetensors")


def test_training_is_deterministic_and_leaves_the_global_rng_alone(trained, texts, tmp_path):
    state = torch.get_rng_state()
    again = train_causal_teacher(tmp_path / "again", TINY, texts=texts, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    a, b = _weights(trained), _weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (trained / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()

    other = train_causal_teacher(tmp_path / "seed1", TeacherSpec.from_dict({**TINY.to_dict(), "seed": 1}),
                                 texts=texts, progress=False)
    c = _weights(other)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].shape == c[k].shape)


def test_existing_folders_are_never_overwritten_silently(texts, tmp_path):
    short = TeacherSpec.from_dict({**TINY.to_dict(), "steps": 2, "warmup": 1})
    folder = train_causal_teacher(tmp_path / "t", short, texts=texts, progress=False)
    before = (folder / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="overwrite=True"):
        train_causal_teacher(folder, short, texts=texts, progress=False)
    assert (folder / "model.safetensors").read_bytes() == before

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a tadistill teacher"):
        train_causal_teacher(tmp_path / "busy", short, texts=texts, progress=False, overwrite=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"

    (tmp_path / "empty").mkdir()  # an empty folder is fine to fill
    assert (train_causal_teacher(tmp_path / "empty", short, texts=texts, progress=False) / "teacher.json").is_file()

    reseeded = TeacherSpec.from_dict({**short.to_dict(), "seed": 7})
    train_causal_teacher(folder, reseeded, texts=texts, progress=False, overwrite=True)
    assert json.loads((folder / "teacher.json").read_text())["spec"]["seed"] == 7
    assert (folder / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty", "t"]  # no temporary sibling left behind


def test_cached_teacher_is_trained_once(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "DEFAULT_CACHE", tmp_path)
    calls = []
    real = causal.train_causal_teacher

    def counting(*args, **kwargs):
        calls.append(kwargs.get("texts"))
        return real(*args, **kwargs)

    monkeypatch.setattr(causal, "train_causal_teacher", counting)
    spec = TeacherSpec.from_dict({**TINY.to_dict(), "steps": 3, "warmup": 1})
    folder = cached_causal_teacher(spec, progress=False)
    assert folder == default_teacher_dir(spec) == tmp_path / "teachers" / f"gpt2-builtin-{spec.fingerprint()}"
    assert calls == [None]  # trained once, on the built-in corpus
    assert json.loads((folder / "teacher.json").read_text())["corpus"].startswith("builtin")
    assert cached_causal_teacher(spec, progress=False) == folder
    assert len(calls) == 1  # the second call found the cache
    assert default_teacher_dir(TINY) != folder  # another spec, another folder


def test_cli_teacher_train_and_the_builtin_gpt2_alias(texts, tmp_path, monkeypatch, capsys, tiny_gpt2):
    from tadistill import loading
    from tadistill.cli.main import main

    real = causal.train_causal_teacher
    monkeypatch.setattr(causal, "train_causal_teacher",
                        lambda out, **kw: real(out, TINY, texts=texts, progress=False, overwrite=kw["overwrite"]))
    out = tmp_path / "cli-teacher"
    assert main(["teacher", "train", "--out", str(out), "--no-progress"]) == 0
    assert "heldout_perplexity" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out).config.n_layer == TINY.layers
    assert main(["teacher", "train", "--out", str(out)]) == 0  # cached: no second training
    assert "already trained" in capsys.readouterr().out
    # 'builtin-gpt2' resolves through the cache (here pointed at a tiny GPT-2).
    monkeypatch.setattr(causal, "cached_causal_teacher", lambda **kw: tiny_gpt2)
    assert loading.resolve_model_path("builtin-gpt2") == str(tiny_gpt2)
