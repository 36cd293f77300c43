"""The self-trained GPT-2 teacher: tokenizer round trips, training as an ordinary distill run, determinism,
atomic folder, cache, and 'builtin-gpt2' trained on first use by the entry points only."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from tadistill import loading
from tadistill.data import prepare
from tadistill.data.builtin import builtin_texts
from tadistill.data.tokenized import split_texts, tokenize_corpus
from tadistill.errors import ConfigError, DataError, ModelError, TrainingError
from tadistill.registry import traits
from tadistill.resolve import resolve_config
from tadistill.teachers import causal
from tadistill.teachers.causal import (
    TeacherSpec,
    cached_causal_teacher,
    default_teacher_dir,
    teacher_config,
    train_causal_teacher,
)
from tadistill.teachers.tokenizer import END_OF_TEXT, train_bpe_tokenizer
from tadistill.training.lane import _optimizer_and_schedule

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


def test_the_loops_packing_joins_gpt2_texts_with_endoftext(texts):
    """The teacher trains on data/tokenized.py's packing: full-length sequences, <|endoftext|> between texts."""
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    eos, sample = tok.eos_token_id, texts[:40]
    splits = tokenize_corpus(sample, tok, max_length=16, heldout_fraction=0.1, seed=0)
    sequences = [splits.train[i].tolist() for i in range(len(splits.train))]
    assert all(len(s) == 16 for s in sequences[:-1])  # GPT-2 adds no special token: every slot is text or separator
    assert all(s[0] != eos for s in sequences)  # a sequence never opens on a separator
    # The texts joined by one <|endoftext|> each, in order; the packer may only drop separators (at a sequence's
    # start) and the short tail.
    pieces = [tok(t, add_special_tokens=False)["input_ids"] for t in split_texts(sample, 0.1, seed=0)[0]]
    stream = [i for n, ids in enumerate(pieces) for i in ([eos] if n else []) + ids]
    got, at = [t for s in sequences for t in s], 0
    for token in got:
        while stream[at] != token:
            assert stream[at] == eos, "the packer dropped a text token"
            at += 1
        at += 1
    assert len(stream) - at < 8  # only a tail shorter than 8 tokens is left out
    assert got.count(eos) >= max(1, stream[:at].count(eos) - len(sequences))  # separators are kept


def test_spec_is_checked():
    with pytest.raises(ConfigError, match="multiple of heads"):
        TeacherSpec(hidden=30, heads=4)
    with pytest.raises(ConfigError, match="warmup"):
        TeacherSpec(steps=10, warmup=20)
    with pytest.raises(ConfigError, match="at least 8"):
        TeacherSpec(context=4)
    with pytest.raises(ConfigError, match="unknown TeacherSpec"):
        TeacherSpec.from_dict({**TINY.to_dict(), "layer": 3})
    assert TeacherSpec.from_dict(TINY.to_dict()) == TINY


def test_teacher_config_is_the_pretrain_recipe_with_the_specs_numbers(tmp_path):
    config = teacher_config(TINY, tmp_path / "source", "builtin", tmp_path)
    assert config.recipe == "pretrain" and [o.kind for o in config.objectives] == ["lm"]
    assert not traits("lm").needs_teacher  # teacher-free: the "teacher" folder only lends shape and tokenizer
    assert config.teacher == config.student.pretrained == str(tmp_path / "source")
    tc = config.train
    assert (tc.steps, tc.batch_size, tc.lr, tc.warmup_steps, tc.weight_decay) == (30, 8, 3e-3, 3, 0.1)
    assert (tc.schedule, tc.min_lr_ratio, tc.adam_betas, tc.max_grad_norm, tc.seed) == ("cosine", 0.1, (0.9, 0.95), 1.0, 0)
    assert (config.data.max_length, config.data.packing, config.data.heldout_fraction) == (32, True, 0.02)
    no_clip = TeacherSpec.from_dict({**TINY.to_dict(), "grad_clip": 0.0})
    assert teacher_config(no_clip, tmp_path, "builtin", tmp_path).train.max_grad_norm is None


def test_cosine_decays_to_the_floor_and_zero_keeps_the_plain_cosine():
    def rates(*overrides):
        config = resolve_config("pretrain", overrides=["train.steps=20", "train.warmup_steps=4",
                                                       "train.warmup_ratio=0", "train.lr=1.0", *overrides])
        optimizer, scheduler = _optimizer_and_schedule(config, torch.nn.Linear(2, 2), [])
        out = []
        for _ in range(20):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out + [scheduler.get_last_lr()[0]]

    floor = rates("train.min_lr_ratio=0.1")
    plain = rates("train.min_lr_ratio=0")
    assert floor[4] == pytest.approx(1.0) and plain[4] == pytest.approx(1.0)  # the peak after warm-up
    assert floor[-1] == pytest.approx(0.1) and plain[-1] == pytest.approx(0.0)
    assert floor[:4] == plain[:4]  # the same warm-up
    # Between, the floored cosine is the plain one squeezed into [0.1, 1].
    assert all(f == pytest.approx(0.1 + 0.9 * p) for f, p in zip(floor[4:], plain[4:]))
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        resolve_config("pretrain", overrides=["train.schedule=linear"])


def _heldout_loss(model, tokenizer, texts, context):
    """Mean next-token cross-entropy, each text its own sequence: written out here, apart from measure/."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"][:context]])
            if ids.size(1) < 2:
                continue
            logits = model(input_ids=ids).logits[0, :-1]  # (T-1, V)
            total += float(F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum"))
            count += ids.size(1) - 1
    return total / count, count


def test_trained_teacher_loads_generates_and_beats_its_random_init(trained, texts):
    assert {"model.safetensors", "config.json", "tokenizer.json", "teacher.json"} <= {p.name for p in trained.iterdir()}
    assert not [p for p in trained.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    info = json.loads((trained / "teacher.json").read_text())
    assert info["spec"] == TINY.to_dict() and info["recipe"] == "pretrain" and info["format"] == 2
    assert 0.9 * 30 * 8 * 32 <= info["tokens_seen"] <= 30 * 8 * 32  # packed: full sequences but for the short tail
    curve = info["train_loss_curve"]
    assert curve[-1][0] == 30 and curve[-1][1] < curve[0][1] - 0.5  # the loop's logged loss fell

    model = AutoModelForCausalLM.from_pretrained(trained).eval()
    tok = AutoTokenizer.from_pretrained(trained)
    assert isinstance(model, GPT2LMHeadModel)
    assert model.config.n_layer == 2 and model.config.n_embd == 32 and model.config.vocab_size == len(tok)
    assert model.config.n_positions == TINY.context and model.config.tie_word_embeddings
    assert model.config.eos_token_id == tok.eos_token_id == tok.pad_token_id

    prompt = tok("The module", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].size(1) + 8)
    assert tok.decode(out[0]).startswith("The module")

    # Held-out loss recomputed here, independently of the trainer's report (causal_perplexity).
    heldout = split_texts([t.strip() for t in texts], TINY.heldout_fraction, seed=TINY.seed)[1]
    trained_loss, count = _heldout_loss(model, tok, heldout, TINY.context)
    assert info["heldout_tokens"] == count
    assert info["heldout_loss"] == pytest.approx(trained_loss, abs=1e-4)
    assert info["heldout_perplexity"] == pytest.approx(math.exp(trained_loss), rel=1e-4)
    # Before training: the random GPT-2 the run started from, near uniform over the vocabulary.
    assert abs(info["initial_heldout_loss"] - math.log(len(tok))) < 0.5
    assert info["heldout_loss"] < info["initial_heldout_loss"] - 0.5
    assert info["packed_heldout_loss_end"] < info["packed_heldout_loss_start"] - 0.5


def _weights(folder):
    return load_file(folder / "model.safetensors")


def test_training_is_deterministic_and_leaves_the_global_rng_alone(trained, texts, tmp_path):
    state, py_state = torch.get_rng_state(), random.getstate()
    again = train_causal_teacher(tmp_path / "again", TINY, texts=texts, progress=False)
    assert torch.equal(torch.get_rng_state(), state) and random.getstate() == py_state
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


def test_divergence_is_told_in_the_specs_terms_and_leaves_nothing(texts, tmp_path):
    wild = TeacherSpec.from_dict({**TINY.to_dict(), "steps": 6, "warmup": 0, "lr": 1e6, "grad_clip": 0.0})
    with pytest.raises(TrainingError, match=r"loss is nan at step \d+ \(lm: nan\): lower TeacherSpec.lr"):
        train_causal_teacher(tmp_path / "t", wild, texts=texts, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither a teacher nor a temporary folder


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


@pytest.fixture
def fake_training(trained, tmp_path, monkeypatch):
    """An empty cache, and a 'training' of builtin-gpt2 that copies the tiny trained teacher; returns its calls."""
    monkeypatch.setattr(prepare, "DEFAULT_CACHE", tmp_path / "cache")
    calls = []

    def copy(out, spec=TeacherSpec(), **kwargs):
        calls.append(out)
        shutil.copytree(trained, out)
        return out

    monkeypatch.setattr(causal, "train_causal_teacher", copy)
    return calls


def test_cli_teacher_train_and_the_alias_lookup(fake_training, capsys):
    from tadistill.cli.main import main

    # Loading only looks 'builtin-gpt2' up: it never trains (that is a run, above the loading layer).
    with pytest.raises(ModelError, match="tadistill teacher train"):
        loading.resolve_model_path("builtin-gpt2")
    assert main(["teacher", "train", "--no-progress"]) == 0
    assert "heldout_perplexity" in capsys.readouterr().out
    assert fake_training == [default_teacher_dir()]
    assert loading.resolve_model_path("builtin-gpt2") == str(default_teacher_dir())
    assert main(["teacher", "train"]) == 0  # cached: no second training
    assert "already trained" in capsys.readouterr().out
    assert len(fake_training) == 1


def test_entry_points_train_builtin_gpt2_on_first_use(fake_training, tiny_corpus, tmp_path, capsys):
    from tadistill.cli.main import main

    assert main(["inspect", "builtin-gpt2@1x32"]) == 0
    assert "gpt2" in capsys.readouterr().out
    assert len(fake_training) == 1  # trained by the first command that named it
    sets = [f"data.source={tiny_corpus}", f"data.cache_dir={tmp_path / 'tok'}", "data.max_length=24",
            "data.heldout_fraction=0.2", "train.steps=2", "train.batch_size=4", "train.eval_batches=1",
            "student.num_layers=1"]
    out = tmp_path / "run"
    assert main(["distill", "kd", *[a for s in sets for a in ("--set", s)], "--out", str(out), "--no-progress"]) == 0
    assert len(fake_training) == 1  # found in the cache
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"] == "builtin-gpt2" and summary["teacher_shape"].startswith("2x32")
