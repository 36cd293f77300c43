"""The masked-LM head fitted to a frozen encoder body (builtin-mlm), on a tiny BERT without a head."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tadistill.cli.main import main
from tadistill.config import DataConfig
from tadistill.errors import ConfigError, ModelError
from tadistill.loading import load_pretrained, resolve_model_path
from tadistill.teachers.mlm_head import _with_head, ensure_builtin_mlm_teacher, fit_mlm_head, trainable_head_parameters
from tadistill.teachers.mlm_spec import HeadSpec, default_mlm_teacher_dir

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = HeadSpec(steps=40, batch_size=4, max_length=24, lr=5e-2, warmup=2, heldout_fraction=0.2)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_encoder, tiny_corpus):
    """The tiny encoder (no MLM head) with a head fitted on the tiny corpus."""
    root = tmp_path_factory.mktemp("mlm-head")
    data = DataConfig(source=str(tiny_corpus), cache_dir=str(root / "cache"))
    return fit_mlm_head(str(tiny_encoder), root / "teacher", TINY, data=data, progress=False)


def test_the_fit_lowers_the_heldout_perplexity_and_reports_it(fitted):
    info = json.loads((fitted / "teacher.json").read_text())
    assert math.isfinite(info["heldout_mlm_perplexity"]) and info["heldout_mlm_perplexity"] > 1
    assert info["heldout_mlm_perplexity"] < 0.75 * info["initial_heldout_mlm_perplexity"]  # 131 -> about 70
    assert info["heldout_mlm_loss"] == pytest.approx(math.log(info["heldout_mlm_perplexity"]))
    assert info["spec"] == TINY.to_dict() and info["tokens_seen"] > 0 and info["masked_positions_seen"] > 0
    # transform (d x d + d) + LayerNorm (2 d) + output bias (V): the decoder matrix is the word embeddings
    model = load_pretrained(str(fitted), head="mlm")
    d, v = model.config.hidden_size, model.config.vocab_size
    assert info["head_parameters"] == d * d + 3 * d + v


def test_the_body_is_bit_identical_and_the_decoder_is_the_word_embeddings(fitted, tiny_encoder):
    body = load_pretrained(str(tiny_encoder), head="base").state_dict()
    again = load_pretrained(str(fitted), head="base").state_dict()  # AutoModel: the pooler is saved too
    assert body.keys() == again.keys()
    assert all(torch.equal(body[k], again[k]) for k in body)
    model = load_pretrained(str(fitted), head="mlm")  # no head weight missing (loading refuses that)
    assert torch.equal(model.get_output_embeddings().weight, body["embeddings.word_embeddings.weight"])
    stored = load_file(str(fitted / "model.safetensors"))
    assert any(k.endswith("pooler.dense.weight") for k in stored)
    assert not [p for p in fitted.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_only_the_transform_and_the_bias_train(tiny_encoder):
    base = load_pretrained(str(tiny_encoder), head="base")
    model, head = _with_head(base, seed=0)
    trained = {id(p) for p in trainable_head_parameters(model, head)}
    names = {n for n, p in model.named_parameters() if id(p) in trained}
    assert names and all(n.startswith("cls.") for n in names)
    assert model.get_output_embeddings().weight is model.base_model.embeddings.word_embeddings.weight
    assert id(model.get_output_embeddings().weight) not in trained
    # the head is drawn from the seed: the same seed gives the same head, another seed another one
    again, _ = _with_head(base, seed=0)
    other, _ = _with_head(base, seed=1)
    w = "cls.predictions.transform.dense.weight"
    assert torch.equal(model.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], other.state_dict()[w])


def test_od_and_distilbert_run_on_the_fitted_teacher(fitted, tiny_args, tmp_path, capsys):
    for recipe in ("od", "distilbert"):
        out = tmp_path / recipe
        code = main(["distill", recipe, *tiny_args(teacher=fitted), "--out", str(out), "--no-progress"])
        assert code == 0, capsys.readouterr().err
        assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_bad_targets_and_bodies_are_one_line(fitted, tiny_encoder, tiny_gpt2, tiny_corpus, tmp_path):
    data = DataConfig(source=str(tiny_corpus), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="already holds a teacher: pass overwrite=True"):
        fit_mlm_head(str(tiny_encoder), fitted, TINY, data=data, progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a tadistill teacher"):
        fit_mlm_head(str(tiny_encoder), busy, TINY, data=data, progress=False)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="is a causal LM"):
        fit_mlm_head(str(tiny_gpt2), tmp_path / "gpt2-head", TINY, data=data, progress=False)
    with pytest.raises(ConfigError, match="HeadSpec.warmup"):
        HeadSpec(steps=4, warmup=5)


def test_builtin_mlm_is_looked_up_in_the_cache_and_fitted_once_on_first_use(fitted, tmp_path, monkeypatch):
    import tadistill.teachers.mlm_head as mlm_head
    from tadistill.data import prepare

    monkeypatch.setattr(prepare, "DEFAULT_CACHE", tmp_path / "cache")
    with pytest.raises(ModelError, match="tadistill teacher mlm-head"):
        resolve_model_path("builtin-mlm")
    calls = []

    def fake_fit(body, out_dir, spec, **kw):  # the real fit of the 22M-parameter body takes minutes
        calls.append((body, out_dir))
        shutil.copytree(fitted, out_dir)
        return out_dir

    monkeypatch.setattr(mlm_head, "fit_mlm_head", fake_fit)
    ensure_builtin_mlm_teacher("builtin", "path/to/bert", progress=False)
    assert calls == []  # other names are left alone
    ensure_builtin_mlm_teacher("builtin-mlm", progress=False)
    ensure_builtin_mlm_teacher("builtin-mlm", progress=False)  # cached: no second fit
    assert calls == [("builtin", default_mlm_teacher_dir())]
    assert resolve_model_path("builtin-mlm") == str(default_mlm_teacher_dir())
