"""The packaged multilingual corpus (Django's catalogs), cross-lingual task loading and its one-line errors."""

from __future__ import annotations

import csv
import json
import struct

import pytest

from tadistill.data import builtin_multilingual as bm
from tadistill.data.sources import load_texts
from tadistill.errors import ConfigError, DataError
from tadistill.evaluation.crosslingual import load_crosslingual_task, transfer_table
from tadistill.evaluation.fidelity import fidelity_row, heldout_by_language, parse_language_sources

LANGS = ("en", "de", "fr", "ru", "zh_Hans")


def test_corpus_has_real_parallel_text_in_several_languages():
    sizes = {lang: len(bm.multilingual_texts(lang)) for lang in LANGS}
    assert all(n >= 500 for n in sizes.values()), sizes
    assert len(bm.available_languages()) >= 50
    en_keys = {(m.area, m.key) for m in bm.multilingual_messages("en")}
    de = bm.multilingual_messages("de")
    assert {(m.area, m.key) for m in de} <= en_keys  # every translation has its English original
    # Real translations, not copies of the English: most German texts differ from their originals.
    assert sum(m.text != m.key for m in de) > 0.8 * len(de)
    # Each language in its own words and script (the figures hold for any recent Django).
    assert sum(" Sie " in t for t in bm.multilingual_texts("de")) > 10
    assert sum(" vous " in t for t in bm.multilingual_texts("fr")) > 10
    ru, zh = bm.multilingual_texts("ru"), bm.multilingual_texts("zh_Hans")
    assert sum(any("\u0400" <= c <= "\u04ff" for c in t) for t in ru) > 0.9 * len(ru)
    assert sum(any("\u4e00" <= c <= "\u9fff" for c in t) for t in zh) > 0.9 * len(zh)
    for lang in LANGS:  # placeholders and tags are gone
        assert not any("%(" in t or "{" in t or "<" in t for t in bm.multilingual_texts(lang))


def test_cleaning_and_codes():
    assert bm.clean_message("Cannot delete %(name)s") == "Cannot delete"
    assert bm.clean_message("%(count)s item\x00%(count)s items") == "item"  # first plural form
    assert bm.clean_message("month name\x04<b>May</b>") == "May"  # context dropped, tags gone
    assert bm.clean_message("e.g. %(a)s, %(b)s, and so on.") == "e.g., and so on."
    assert bm.clean_message("Changed “%(object)s” — %(changes)s") == "Changed"
    assert bm.normalize_language("zh-hans") == "zh_Hans" and bm.normalize_language("DE") == "de"
    with pytest.raises(ConfigError, match="did you mean 'de'"):
        bm.normalize_language("dee")


def test_written_corpus_reads_back_as_the_txt_format(tmp_path):
    paths = bm.write_multilingual_corpus(tmp_path / "corpus", ["en", "de-DE"[:2], "fr"])
    assert list(paths) == ["en", "de", "fr"]
    for lang, path in paths.items():
        assert load_texts(str(path)) == bm.multilingual_texts(lang)
    with pytest.raises(ConfigError, match="twice"):
        bm.write_multilingual_corpus(tmp_path / "x", ["de", "DE"])
    with pytest.raises(ConfigError, match="at least one language"):
        bm.write_multilingual_corpus(tmp_path / "x", [])


def test_a_broken_catalog_is_one_line(tmp_path):
    bad = tmp_path / "bad.mo"
    bad.write_bytes(b"not a catalog at all, just bytes")
    with pytest.raises(DataError, match="could not be read"):
        bm.read_mo(bad)
    short = tmp_path / "short.mo"  # right magic, tables pointing past the end
    short.write_bytes(struct.pack("<5I", bm.MO_MAGIC, 0, 3, 28, 52))
    with pytest.raises(DataError, match="could not be read"):
        bm.read_mo(short)


def test_topic_split_follows_the_english_original():
    """No language's evaluation message has a translation in any language's training split."""
    en, de = bm.topic_rows("en"), bm.topic_rows("de")
    kept = [m for m in bm.multilingual_messages("de") if len(m.key.split()) >= 2]
    de_eval = [m for m in kept if bm.topic_split(m.key) == "eval"]
    assert [(m.text, m.area) for m in de_eval] == de["eval"]
    en_train = {text for text, _ in en["train"]}  # English texts are their own originals
    assert de_eval and not {m.key for m in de_eval} & en_train
    assert {area for _, area in en["train"]} == {"admin", "admindocs", "auth", "core", "other"}
    assert len(en["eval"]) > 60 and len(de["eval"]) > 60


def test_builtin_task_loads_one_label_set_per_language():
    tasks = load_crosslingual_task("l10n-topic", languages=["en", "de", "fr"], max_train=100, max_eval=30)
    assert list(tasks) == ["en", "de", "fr"]
    names = {data.label_names for data in tasks.values()}
    assert len(names) == 1 and len(tasks["de"].train) == 100 and len(tasks["fr"].eval) == 30


def _write_rows(path, rows, header=("text", "label", "language")):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def test_local_files_three_ways_give_the_same_task(tmp_path):
    rows = [(f"{word} {i}", label, lang) for i in range(20) for lang, word, label in
            (("en", "good", "pos"), ("en", "bad", "neg"), ("de", "gut", "pos"), ("de", "schlecht", "neg"))]
    _write_rows(tmp_path / "all.csv", rows)
    (tmp_path / "per").mkdir()
    for lang in ("en", "de"):
        lines = [json.dumps({"text": t, "label": y}) for t, y, lg in rows if lg == lang]
        (tmp_path / "per" / f"{lang}.jsonl").write_text("\n".join(lines) + "\n")
    by_column = load_crosslingual_task(str(tmp_path / "all.csv"))
    by_folder = load_crosslingual_task(str(tmp_path / "per"))
    by_pattern = load_crosslingual_task(str(tmp_path / "per" / "{lang}.jsonl"), languages=["en", "de"])
    for tasks in (by_folder, by_pattern):
        assert {lang: (d.train, d.eval, d.label_names) for lang, d in tasks.items()} == \
               {lang: (d.train, d.eval, d.label_names) for lang, d in by_column.items()}
    assert by_column["de"].label_names == ("neg", "pos") and by_column["de"].spec.metrics == ("accuracy", "f1")


def test_local_task_errors_are_one_line(tmp_path):
    _write_rows(tmp_path / "nolang.csv", [("a", "x"), ("b", "y")], header=("text", "label"))
    with pytest.raises(DataError, match="no 'language' column"):
        load_crosslingual_task(str(tmp_path / "nolang.csv"))
    (tmp_path / "per").mkdir()
    (tmp_path / "per" / "en.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    (tmp_path / "per" / "de.jsonl").write_text('{"text": "a", "text_pair": "c", "label": "x"}\n')
    with pytest.raises(DataError, match="text_pair"):
        load_crosslingual_task(str(tmp_path / "per"))
    with pytest.raises(ConfigError, match="no language 'xx'"):
        load_crosslingual_task("xnli", languages=["xx"])
    with pytest.raises(ConfigError, match="give the languages"):
        load_crosslingual_task("data/{lang}.csv")
    with pytest.raises(ConfigError, match="unknown cross-lingual task"):
        load_crosslingual_task("xnlii")
    with pytest.raises(DataError, match="not found"):
        load_crosslingual_task("missing/file.csv")


def test_hub_tasks_go_through_load_task(monkeypatch):
    import datasets

    calls = []

    def fake(*args, split):
        calls.append((args, split))
        rows = {"sentence1": ["a", "b"], "sentence2": ["c", "d"], "label": [0, 1]}
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    tasks = load_crosslingual_task("pawsx", languages=["en", "de"])
    assert list(tasks) == ["en", "de"] and tasks["de"].spec.text_pair == "sentence2"
    assert (("google-research-datasets/paws-x", "de"), "test") in calls


def test_fidelity_rows_and_language_sources(tmp_path):
    row = fidelity_row({"en": {"final_cka": 0.9, "output_kl": 0.1}, "de": {"final_cka": 0.5}})
    assert row["fidelity[en]/final_cka"] == 0.9 and row["fidelity[de]/final_cka"] == 0.5
    assert row["fidelity/final_cka"] == pytest.approx(0.7) and row["fidelity/output_kl"] == pytest.approx(0.1)
    assert fidelity_row({"": {"final_cka": 0.4}}) == {"fidelity/final_cka": 0.4}
    assert parse_language_sources(["de=a.txt", "pt-BR=b.txt"]) == {"de": "a.txt", "pt-BR": "b.txt"}
    assert parse_language_sources("builtin") == {"": "builtin"}
    with pytest.raises(ConfigError, match="names no language"):
        parse_language_sources(["de=a.txt", "b.txt"])


def test_heldout_by_language_pools_sources_of_one_language(tmp_path):
    from tadistill.config import DataConfig

    paths = bm.write_multilingual_corpus(tmp_path, ["en", "de", "fr"])
    entries = [{"path": str(paths["en"]), "language": "en"}, {"path": str(paths["de"]), "language": "de"},
               {"path": str(paths["fr"]), "language": "de"}, {"path": str(paths["fr"])}]
    dc = DataConfig(heldout_fraction=0.05).model_copy(update={"source": entries})
    texts = heldout_by_language(dc, seed=0, limit=1000)
    assert list(texts) == ["en", "de"]  # the entry without a language is no language's
    assert set(texts["en"]) <= set(bm.multilingual_texts("en"))
    assert any(t in bm.multilingual_texts("fr") for t in texts["de"])  # both "de" sources pooled
    assert heldout_by_language(DataConfig(source=str(paths["en"])), seed=0, limit=10) == {}


def test_transfer_table_layout():
    def result(scores):
        langs = {lang: {"metrics": {"accuracy": {"mean": v, "std": 0.01}}, "eval_size": 10} for lang, v in scores.items()}
        return {"task": "t", "mode": "probe", "train_language": "en", "headline": "accuracy", "seeds": [0, 1],
                "languages": langs, "mean_other": sum(list(scores.values())[1:]) / 2}

    table = transfer_table({"teacher": result({"en": 0.8, "de": 0.6, "fr": 0.7}),
                            "student": result({"en": 0.7, "de": 0.4, "fr": 0.5})})
    assert "| model | en* | de | fr | mean (others) | gap to en |" in table
    assert "| student | 0.700 ± 0.010 | 0.400 ± 0.010 | 0.500 ± 0.010 | 0.450 | +0.250 |" in table


def test_a_language_with_no_text_is_one_line_before_any_model_runs():
    from tadistill.evaluation.fidelity import fidelity_by_language

    with pytest.raises(DataError, match="language 'de' has no held-out text"):
        fidelity_by_language(None, None, None, {"en": ["some text"], "de": []})
