"""Teachers of every encoder family named in the issue run through the CLI; mismatched tokenizers are refused."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from transformers import AutoModel

from tadistill.cli.main import main

from conftest import _write_tokenizer, make_tiny_bert


def _save_family(folder, family: str):
    tok = _write_tokenizer(folder)
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    configs = {
        "roberta": T.RobertaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=70, **common),
        "xlm-roberta": T.XLMRobertaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=70, **common),
        "distilbert": T.DistilBertConfig(dim=32, n_layers=4, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                                         **common),
        "electra": T.ElectraConfig(embedding_size=32, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64, **common),
    }
    torch.manual_seed(0)
    T.AutoModelForMaskedLM.from_config(configs[family]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta", "distilbert", "electra"])
def test_encoder_families_distill_and_load(family, tiny_args, tmp_path):
    teacher = _save_family(tmp_path / family, family)
    out = tmp_path / "run"
    # minilmv2 from a teacher-initialised, narrower student: exercises hooks, slicing and relations.
    argv = ["distill", "minilmv2", *tiny_args("objectives.minilmv2.relation_heads=4", "student.init=teacher",
                                              "student.hidden_size=16", "student.num_heads=2", teacher=teacher),
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    student = AutoModel.from_pretrained(out / "student")
    assert student.config.model_type == family
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 for r in rows if "loss" in r)


def test_builtin_sentence_encoder_teacher(tiny_corpus, tmp_path):
    out = tmp_path / "run"
    argv = ["distill", "hs", "--set", "teacher=builtin", "--set", f"data.source={tiny_corpus}",
            "--set", f"data.cache_dir={tmp_path / 'c'}", "--set", "data.max_length=32", "--set", "train.steps=1",
            "--set", "train.batch_size=2", "--set", "train.eval_batches=1", "--set", "student.num_layers=1",
            "--set", "objectives.hidden.mapping=last", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_parameters"] == 22_713_216
    assert summary["student_shape"].startswith("1x384")
    # The teacher is a sentence-transformers model: so is the student, with the same pooling.
    from sentence_transformers import SentenceTransformer

    embeddings = SentenceTransformer(str(out / "student"), device="cpu").encode(["a student", "a teacher"])
    assert embeddings.shape == (2, 384)
    assert abs(float((embeddings[0] ** 2).sum()) - 1.0) < 1e-4  # the teacher's Normalize module is kept


def test_student_with_a_different_tokenizer_is_refused(tiny_args, tmp_path, capsys):
    # A student checkpoint whose vocabulary has one extra token.
    other = make_tiny_bert(tmp_path / "other")
    (other / "vocab.txt").write_text((other / "vocab.txt").read_text() + "extratoken\n")
    (other / "tokenizer.json").unlink(missing_ok=True)  # rebuilt from vocab.txt on load
    code = main(["distill", "hs", *tiny_args(f"student.pretrained={other}"), "--out", str(tmp_path / "r")])
    assert code == 2
    assert "differs from the teacher's" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["minilmv2", "hs", "distilbert"])
def test_bf16_autocast_path_runs(recipe, tiny_args, tmp_path):
    """train.precision=bf16: autocast for the student, a bf16 teacher; every term mixes the two dtypes."""
    out = tmp_path / "run"
    extra = ["objectives.minilmv2.relation_heads=4"] if recipe == "minilmv2" else []
    assert main(["distill", recipe, *tiny_args(*extra, "train.precision=bf16"), "--out", str(out),
                 "--no-progress"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["loss"] < 100 for r in rows if "loss" in r)


def test_bf16_causal_terms_run(tiny_gpt2, tiny_corpus, tmp_path):
    sets = [f"teacher={tiny_gpt2}", f"data.source={tiny_corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_length=24", "train.steps=2", "train.batch_size=4", "student.num_layers=2",
            "train.precision=bf16", "data.prompt_tokens=6", "on_policy.fraction=0.5"]
    out = tmp_path / "run"
    assert main(["distill", "gkd", *[a for s in sets for a in ("--set", s)], "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["loss"] < 100 for r in rows if "loss" in r)
