"""LLMLingua-2 end to end on tiny random models: annotate (both annotators), train, compress, evaluate, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TEXTS, make_tiny_bert
from transformers import AutoModelForTokenClassification, AutoTokenizer

import tadistill
from tadistill.cli.main import main
from tadistill.errors import ConfigError, DataError
from tadistill.lingua import annotate as annotate_module
from tadistill.lingua.annotate import annotate, build_prompt, generate_compressions, information_scores
from tadistill.lingua.compress import Compressor
from tadistill.lingua.evaluate import SELECTORS, evaluate_compression
from tadistill.lingua.options import AnnotateOptions, EvaluateOptions
from tadistill.lingua.words import chunk_spans, split_words

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("lingua-corpus") / "corpus.txt"
    path.write_text("\n\n".join(f"{t} Paragraph {i}." for i, t in enumerate(TEXTS)) + "\n")
    return path


@pytest.fixture(scope="module")
def annotations(tiny_gpt2, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("lingua") / "ann"
    code = main(["lingua", "annotate", "--teacher", str(tiny_gpt2), "--data", str(corpus), "--out", str(out),
                 "--max-chunks", "12", "--no-progress"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    # No dropout: the rate checks below compare two forward passes' rankings.
    return make_tiny_bert(tmp_path_factory.mktemp("lingua-bert"), mlm_head=False, dropout=0.0)


@pytest.fixture(scope="module")
def compressor_dir(annotations, encoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("lingua-model") / "compressor"
    code = main(["lingua", "train", "--data", str(annotations), "--encoder", str(encoder), "--out", str(out),
                 "--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--no-progress"])
    assert code == 0
    return out


def test_information_annotation_writes_labels_and_statistics(annotations):
    stats = json.loads((annotations / "stats.json").read_text())
    samples = [json.loads(line) for line in (annotations / "samples.jsonl").read_text().splitlines()]
    assert stats["annotator"] == "information" and stats["chunks"] == len(samples) == 12
    assert stats["samples"] == 12 and stats["filtered"] == {}  # labels from scores: no variation, no gap
    for s in samples:
        assert len(s["words"]) == len(s["labels"]) == len(s["spaces"]) == len(s["scores"])
        assert s["variation_rate"] == 0.0 and s["alignment_gap"] == pytest.approx(0.0)
        assert sum(s["labels"]) == max(1, round(0.5 * len(s["words"])))  # the keep fraction, chunk by chunk
        assert s["words"][-1] != "\n"
    # Chunks fit the teacher's 64 positions (one is the start token).
    assert stats["chunk_tokens"] == 63


def test_information_scores_measure_what_a_word_says_and_tells_about_what_follows(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    ids = [[5], [6, 7], [], [8], [9]]
    follow = information_scores(model, ids, start_id=0, follow_tokens=2, batch_size=3, own_information=False)
    # Word 0 by hand: loss of tokens 6, 7 without it minus with it.
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([[0, 5, 6, 7, 8, 9]])).logits[0], -1)
        cut = torch.log_softmax(model(torch.tensor([[0, 6, 7]])).logits[0], -1)
    with_word = -(full[1, 6] + full[2, 7])
    without = -(cut[0, 6] + cut[1, 7])
    assert follow[0] == pytest.approx(float(without - with_word), abs=1e-4)
    # No tokens (word 2) or nothing after it (word 4): the median of the others' follow terms.
    assert follow[2] == follow[4] == pytest.approx(sorted(follow[i] for i in (0, 1, 3))[1])
    # With its own surprisal: word 0 adds -log p(5 | start), word 1 the sum over its two tokens.
    both = information_scores(model, ids, start_id=0, follow_tokens=2, batch_size=3)
    assert both[0] - follow[0] == pytest.approx(float(-full[0, 5]), abs=1e-4)
    assert both[1] - follow[1] == pytest.approx(float(-full[1, 6] - full[2, 7]), abs=1e-4)
    assert both[2] == follow[2]  # a word without tokens says nothing itself


def test_instruction_annotator_plumbing_on_a_tiny_causal_lm(tiny_gpt2, corpus, tmp_path, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    # Greedy generation on a random model: strings, each within its own token cap.
    outputs = generate_compressions(model, tokenizer, ["the quick brown fox", "a teacher"], max_new_tokens=[3, 5])
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)
    assert len(tokenizer(outputs[0])["input_ids"]) <= 3
    # The chat template is used when the teacher has one.
    tokenizer.chat_template = "{% for m in messages %}<u>{{ m['content'] }}{% endfor %}<a>"
    assert build_prompt(tokenizer, "Shorten: {text}", "x y") == "<u>Shorten: x y<a>"

    # End to end with known "LLM outputs": matching, measures, filter and files.
    def fake(model, tokenizer, prompts, *, max_new_tokens):
        answers = []
        for prompt in prompts:
            words = prompt.removeprefix("Shorten: ").split()
            answers.append(" ".join(words[::2] + ["invented"]))  # every other word, and a word not in the original
        return answers

    monkeypatch.setattr(annotate_module, "generate_compressions", fake)
    out = tmp_path / "ann"
    options = AnnotateOptions(annotator="instruction", instruction="Shorten: {text}", max_chunks=6, chunk_tokens=20)
    stats = annotate(str(tiny_gpt2), str(corpus), out, options)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert stats["annotator"] == "instruction" and len(samples) == 6
    assert all(s["unmatched"] >= 1 and s["variation_rate"] > 0 for s in samples)  # "invented" is never matched
    assert all(0 < sum(s["labels"]) < len(s["words"]) for s in samples)
    assert stats["samples"] + sum(stats["filtered"].values()) == 6
    # A teacher whose context cannot hold the instruction is refused in one line.
    with pytest.raises(ConfigError, match="too few for the instruction"):
        annotate(str(tiny_gpt2), str(corpus), tmp_path / "x",
                 AnnotateOptions(annotator="instruction", instruction="word " * 80 + "{text}"))
    # An existing folder is kept unless --overwrite.
    with pytest.raises(ConfigError, match="--overwrite"):
        annotate(str(tiny_gpt2), str(corpus), out, options)


def test_trained_compressor_is_a_standard_token_classifier(compressor_dir):
    model = AutoModelForTokenClassification.from_pretrained(compressor_dir)
    assert model.config.num_labels == 2 and model.config.id2label == {0: "drop", 1: "keep"}
    assert type(model).__name__ == "BertForTokenClassification"
    report = json.loads((compressor_dir / "lingua.json").read_text())
    assert report["annotator"] == "information" and report["options"]["label_subtokens"] == "all"
    assert set(report["heldout_initial"]) == set(report["heldout_final"]) == {"word_accuracy", "keep_f1_at_rate",
                                                                             "all_keep_f1"}
    assert not list(compressor_dir.parent.glob(".*.tmp"))  # written atomically: no temporary folder left


def test_compress_honours_the_rate_in_every_chunk_and_keeps_forced_words(compressor_dir):
    compressor = Compressor.load(str(compressor_dir))
    text = "\n".join(f"Why {t} Paragraph {i}?" for i, t in enumerate(TEXTS[:20]))
    words = split_words(text)
    spans = chunk_spans(words, compressor.token_counts(words), compressor.chunk_tokens)
    assert len(spans) > 3  # a long input is chunked (62 tokens a chunk here)
    for rate in (0.2, 0.5, 1.0):
        result = compressor.compress(text, rate=rate)
        assert result.kept_words == sum(max(1, round(rate * (e - s))) for s, e in spans)
        assert abs(result.kept_words - rate * len(words)) <= len(spans)  # within one word per chunk
    full = compressor.compress(text, rate=1.0)
    assert full.text == text and full.ratio == pytest.approx(1.0)
    forced = compressor.compress(text, rate=0.2, force_tokens=["?", "\n"], keep_digits=True)
    assert forced.text.count("?") == 20 and forced.text.count("\n") == 19
    assert all(str(i) in [w.text for w in split_words(forced.text)] for i in range(20))
    # A token budget replaces the rate.
    budget = compressor.compress(text, target_tokens=40)
    assert 0 < budget.compressed_tokens <= 40 < budget.original_tokens
    # Batch size does not change the result.
    assert compressor.compress(text, rate=0.3, batch_size=1) == compressor.compress(text, rate=0.3, batch_size=32)


def test_python_api_and_cli_compress(compressor_dir, tmp_path, capsys):
    text = " ".join(TEXTS[:6])
    result = tadistill.compress(text, model=str(compressor_dir), rate=0.5)
    assert result.words == len(split_words(text)) and 0 < result.kept_words < result.words
    file = tmp_path / "prompt.txt"
    file.write_text(text)
    code, out, err = _run(capsys, ["compress", "--model", str(compressor_dir), "--rate", "0.5", "--json", str(file)])
    assert code == 0, err
    data = json.loads(out)
    assert data["text"] == result.text and data["ratio"] == pytest.approx(data["original_tokens"] /
                                                                          data["compressed_tokens"])
    code, out, err = _run(capsys, ["compress", "--model", str(compressor_dir), str(file)])
    assert code == 0 and out.strip() and "tokens:" in err


@pytest.mark.parametrize("rate", ["0", "1.5", "-0.2", "nan"])
def test_rate_outside_the_interval_is_one_line(compressor_dir, tmp_path, capsys, rate):
    file = tmp_path / "p.txt"
    file.write_text("some text to compress.")
    code, _, err = _run(capsys, ["compress", "--model", str(compressor_dir), "--rate", rate, str(file)])
    assert code == 2 and err.startswith("error: rate must be in (0, 1]") and err.count("\n") == 1
    with pytest.raises(ConfigError):
        tadistill.compress("text", model=str(compressor_dir), rate=float(rate))


def test_bad_inputs_are_one_line_errors(compressor_dir, encoder, tmp_path, capsys):
    empty, binary, good = tmp_path / "empty.txt", tmp_path / "blob.bin", tmp_path / "good.txt"
    empty.write_text("  \n")
    binary.write_bytes(bytes(range(256)) * 4)
    good.write_text("a prompt")
    cases = [
        (["compress", "--model", str(compressor_dir), str(empty)], "is empty"),
        (["compress", "--model", str(compressor_dir), str(binary)], "not a text file"),
        (["compress", "--model", str(compressor_dir), str(tmp_path / "missing.txt")], "not found"),
        (["compress", "--model", str(encoder), str(good)], "is not a token classifier"),
        (["lingua", "train", "--data", str(tmp_path), "--out", str(tmp_path / "m")], "not a lingua annotation"),
    ]
    for argv, message in cases:
        code, _, err = _run(capsys, argv)
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)


def test_evaluation_against_baselines(compressor_dir, tiny_gpt2, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    texts = [f"{t} Paragraph {i}." for i, t in enumerate(TEXTS)]
    options = EvaluateOptions(rates=(0.3, 0.6), examples=3, prompt_tokens=30, continuation_tokens=10,
                              heldout_fraction=0.5)
    rows = evaluate_compression(Compressor.load(str(compressor_dir)), lm, tokenizer, texts, options)
    assert all("embedding_cosine" not in r for r in rows)  # no embedder, no embedding measure
    assert [r["selector"] for r in rows] == ["full prompt", "no prompt", *SELECTORS, *SELECTORS]
    full, none = rows[0], rows[1]
    assert full["loss_increase"] == 0.0 and full["words_kept"] == 1.0 and none["words_kept"] == 0.0
    # Kept information is 1 for the full prompt and 0 without one (None when a random LM gains nothing from it).
    assert (full["kept_information"], none["kept_information"]) in ((pytest.approx(1.0), 0.0), (None, None))
    for rate in options.rates:
        same = [r for r in rows if r["rate"] == rate]
        assert len(same) == 3 and len({round(r["words_kept"], 9) for r in same}) == 1  # same words, all selectors
        assert abs(same[0]["words_kept"] - rate) < 0.1
    assert all(r["examples"] == 3 for r in rows)
    with pytest.raises(ConfigError, match="positions"):
        evaluate_compression(Compressor.load(str(compressor_dir)), lm, tokenizer, texts,
                             EvaluateOptions(prompt_tokens=60, continuation_tokens=10))
    with pytest.raises(DataError):
        evaluate_compression(Compressor.load(str(compressor_dir)), lm, tokenizer, ["too short."] * 10, options)


def test_evaluate_cli_writes_table_and_plot(compressor_dir, tiny_gpt2, corpus, encoder, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout, err = _run(capsys, ["lingua", "evaluate", "--model", str(compressor_dir), "--lm", str(tiny_gpt2),
                                      "--data", str(corpus), "--rates", "0.5", "--examples", "2", "--prompt-tokens",
                                      "20", "--continuation-tokens", "8", "--out", str(out), "--no-progress",
                                      "--embedder", str(encoder)])
    assert code == 0, err
    assert "lingua r=0.5" in stdout and "self-info r=0.5" in stdout
    for name in ("results.json", "results.csv", "results.md", "summary.json", "lingua_eval.png",
                 "lingua_eval_embedding.png"):
        assert (out / name).is_file()
    assert (out / "lingua_eval.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "summary.json").read_text())["annotator"] == "information"
    rows = json.loads((out / "results.json").read_text())
    assert rows[0]["embedding_cosine"] == 1.0 and "embedding_cosine" not in rows[1]  # full prompt; no prompt
    assert all(-1.0 <= r["embedding_cosine"] <= 1.0 for r in rows[2:])
