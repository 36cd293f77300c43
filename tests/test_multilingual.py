"""Multilingual distillation end to end on a tiny XLM-R: real text in three languages from an installed package
(Django's catalogs), a tokenizer trained here, per-language fidelity and a cross-lingual transfer table."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from tadistill.cli.main import main
from tadistill.data.builtin_multilingual import topic_rows, write_multilingual_corpus
from tadistill.evaluation.crosslingual import crosslingual_transfer, transfer_table
from tadistill.evaluation.downstream import evaluate_task
from tadistill.evaluation.fidelity import fidelity, heldout_by_language
from tadistill.study.compare import compare, load_study

LANGUAGES = ("en", "de", "fr")
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def xlmr(tmp_path_factory):
    """(teacher folder, {language: corpus .txt}): a 2x32 XLM-R with an MLM head and a 600-piece unigram tokenizer."""
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM, XLMRobertaTokenizerFast

    root = tmp_path_factory.mktemp("xlmr")
    corpus = write_multilingual_corpus(root / "corpus", LANGUAGES)
    texts = [t for path in corpus.values() for t in path.read_text(encoding="utf-8").split("\n\n")]
    pieces = SentencePieceUnigramTokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R's ids 0-4
    pieces.train_from_iterator(texts, vocab_size=600, special_tokens=specials, unk_token="<unk>", show_progress=False)
    pieces.post_processor = TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                               special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer = XLMRobertaTokenizerFast(tokenizer_object=pieces._tokenizer, bos_token="<s>", eos_token="</s>",
                                        cls_token="<s>", sep_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                        mask_token="<mask>")
    teacher = root / "teacher"
    tokenizer.save_pretrained(teacher)
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=MAX_LENGTH + 2, pad_token_id=1,
                              bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    XLMRobertaForMaskedLM(config).save_pretrained(teacher)
    return teacher, corpus


@pytest.fixture(scope="module")
def study(xlmr, tmp_path_factory):
    """A study distilling OD, HS and MHA into 1x32 students on en + de + fr, evaluated per language."""
    teacher, corpus = xlmr
    root = tmp_path_factory.mktemp("study")
    spec = {
        "name": "multilingual",
        "teacher": str(teacher),
        "languages": {lang: str(path) for lang, path in corpus.items()},
        "data": {"max_length": MAX_LENGTH, "heldout_fraction": 0.1, "cache_dir": str(root / "cache")},
        "train": {"steps": 3, "batch_size": 4, "eval_every": 0, "save_every": 0, "log_every": 1, "lr": 1e-3},
        "methods": [{"name": "od", "recipe": "od"}, {"name": "hs", "recipe": "hs"},
                    {"name": "mha", "recipe": "minilmv2", "set": ["objectives.minilmv2.relation_heads=4"]}],
        "students": ["1x32"],
        "evaluation": {"tasks": [], "seeds": [0, 1], "fidelity_texts": 12, "latency": False, "max_train": 200,
                       "crosslingual": {"task": "l10n-topic", "languages": list(LANGUAGES)}},
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = root / "out"
    report = compare(load_study(path), out=out, progress=False)
    return out, report


@pytest.mark.slow
def test_study_distils_three_languages_and_reports_fidelity_per_language(xlmr, study):
    teacher, corpus = xlmr
    out, report = study
    cell = yaml.safe_load((out / "cells" / "hs_1x32" / "config.yaml").read_text())
    # Trained on the three corpora, one language each (sampled by n^alpha).
    assert sorted((e["language"], e["path"]) for e in cell["data"]["source"]) == \
        sorted((lang, str(p)) for lang, p in corpus.items())
    rows = {r["model"]: r for r in csv.DictReader((report / "results.csv").open())}
    for name in ("od_1x32", "hs_1x32", "mha_1x32"):
        per_language = [float(rows[name][f"fidelity[{lang}]/final_cka"]) for lang in LANGUAGES]
        assert all(0 < v <= 1 + 1e-6 for v in per_language)
        assert float(rows[name]["fidelity/final_cka"]) == pytest.approx(sum(per_language) / 3)  # the macro mean
    assert float(rows["od_1x32"]["fidelity[de]/output_kl"]) >= 0  # OD trains the student's MLM head
    # The reported numbers are fidelity() on each language's held-out texts: recompute one cell's.
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from tadistill.config import DataConfig

    dc = DataConfig(max_length=MAX_LENGTH, heldout_fraction=0.1).model_copy(
        update={"source": [{"path": str(corpus[lang]), "language": lang} for lang in LANGUAGES]})
    texts = heldout_by_language(dc, seed=cell["train"]["seed"], limit=12)
    assert list(texts) == list(LANGUAGES) and all(len(t) == 12 for t in texts.values())
    tok = AutoTokenizer.from_pretrained(teacher)
    t_model = AutoModelForMaskedLM.from_pretrained(teacher).eval()
    s_model = AutoModelForMaskedLM.from_pretrained(out / "cells" / "od_1x32" / "student").eval()
    direct = fidelity(t_model, s_model, tok, texts["fr"], max_length=MAX_LENGTH)
    assert float(rows["od_1x32"]["fidelity[fr]/final_cka"]) == pytest.approx(direct["final_cka"], rel=1e-5)
    assert float(rows["od_1x32"]["fidelity[fr]/output_kl"]) == pytest.approx(direct["output_kl"], rel=1e-5)
    # Languages differ: the per-language numbers are not one number copied three times.
    assert len({rows["hs_1x32"][f"fidelity[{lang}]/final_cka"] for lang in LANGUAGES}) == 3
    # Cross-lingual transfer of every model, teacher and initialisation rows included, in the study table.
    for name in ("teacher", "init_1x32", "od_1x32", "mha_1x32"):
        scores = [float(rows[name][f"l10n-topic[{lang}]/accuracy"]) for lang in LANGUAGES]
        assert all(0 <= v <= 1 for v in scores) and float(rows[name]["l10n-topic[de]/accuracy_std"]) >= 0
        assert float(rows[name]["l10n-topic[others]/accuracy"]) == pytest.approx((scores[1] + scores[2]) / 2)
    table = (report / "study.md").read_text()
    assert "l10n-topic[de]/accuracy" in table and "gain l10n-topic[fr]/accuracy" in table


@pytest.mark.slow
def test_evaluate_cli_gives_a_transfer_table_and_fidelity_per_language(xlmr, study, tmp_path, capsys):
    teacher, corpus = xlmr
    out, _ = study
    student = out / "cells" / "mha_1x32" / "student"
    evaluation = tmp_path / "eval"
    code = main(["evaluate", str(student), "--teacher", str(teacher), "--tasks", "--no-latency",
                 "--texts", *[f"{lang}={path}" for lang, path in corpus.items()],
                 "--crosslingual", "l10n-topic", "--train-language", "en", "--languages", "de", "fr",
                 "--seeds", "0", "1", "--max-length", str(MAX_LENGTH), "--out", str(evaluation)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((evaluation / "results.json").read_text())
    assert all(f"fidelity[{lang}]/final_cka" in rows[1] for lang in LANGUAGES)
    transfer = json.loads((evaluation / "crosslingual.json").read_text())
    assert list(transfer) == ["teacher", "student"]
    for result in transfer.values():
        assert list(result["languages"]) == ["en", "de", "fr"] and result["seeds"] == [0, 1]
        scores = [r["metrics"]["accuracy"]["mean"] for r in result["languages"].values()]
        assert all(0 <= s <= 1 for s in scores)
        assert result["transfer_gap"]["de"] == pytest.approx(scores[0] - scores[1])
    table = (evaluation / "crosslingual.md").read_text()
    assert "| model | en* | de | fr | mean (others) | gap to en |" in table and "| student |" in table


@pytest.mark.slow
def test_transfer_reuses_the_probe_and_finetuning_of_downstream(xlmr, tmp_path):
    """The training language's column is the ordinary probe on the same rows; fine-tuning runs too."""
    teacher, _ = xlmr
    result = crosslingual_transfer(str(teacher), "l10n-topic", languages=["en", "de", "fr"], seeds=(0, 1),
                                   max_length=MAX_LENGTH)
    rows = topic_rows("en")
    for part in ("train", "eval"):
        with (tmp_path / f"{part}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows[part])
    plain = evaluate_task(str(teacher), f"{tmp_path / 'train.csv'},{tmp_path / 'eval.csv'}", seeds=(0, 1),
                          max_length=MAX_LENGTH)
    assert result["languages"]["en"]["metrics"]["accuracy"]["mean"] == pytest.approx(
        plain["metrics"]["accuracy"]["mean"], abs=1e-9)
    tuned = crosslingual_transfer(str(teacher), "l10n-topic", languages=["en", "de"], mode="finetune", seeds=(0,),
                                  max_train=48, max_eval=24, max_length=MAX_LENGTH, epochs=1)
    assert tuned["mode"] == "finetune" and tuned["languages"]["de"]["eval_size"] == 24
    assert "trained on en" in transfer_table({"teacher": tuned})
