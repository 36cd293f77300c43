"""Token-level tasks: entity F1 and SQuAD EM/F1 (hand-computed cases and reference packages), CoNLL /
JSONL / SQuAD readers and their one-line errors, word and answer alignment, probe and fine-tune on tiny
models, the built-in stdlib-ner task (disjoint from the corpus), and `tadistill evaluate` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tadistill.errors import ConfigError, DataError
from tadistill.evaluation.ner_metrics import check_tag, entities, entity_scores, per_type_f1
from tadistill.evaluation.qa_metrics import exact_match, normalize_answer, squad_scores, token_f1
from tadistill.evaluation.qa_tasks import QAExample, load_qa_task
from tadistill.evaluation.token_tasks import load_tagging_task, token_task_kind

pytestmark = pytest.mark.usefixtures("one_thread")

# Words of the tiny models' vocabulary (tests/conftest.py TEXTS), so that they are no [UNK].
SENTENCES = [
    (["the", "teacher", "model", "is", "distilled"], ["B-ROLE", "I-ROLE", "O", "O", "O"]),
    (["a", "student", "keeps", "the", "knowledge"], ["O", "B-ROLE", "O", "O", "O"]),
    (["python", "ships", "its", "documentation"], ["B-LANG", "O", "O", "O"]),
    (["small", "models", "run", "on", "a", "laptop"], ["O", "O", "O", "O", "O", "B-DEVICE"]),
    (["the", "student", "imitates", "the", "teacher"], ["O", "B-ROLE", "O", "O", "B-ROLE"]),
    (["layer", "mappings", "decide", "which", "teacher", "layer"], ["O", "O", "O", "O", "B-ROLE", "O"]),
] * 4


def _one_line(exc) -> str:
    message = str(exc.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def write_conll(path: Path, sentences, *, docstart: bool = True) -> Path:
    lines = ["-DOCSTART- -X- O O", ""] if docstart else []
    for words, tags in sentences:
        lines += [f"{w} NN I-NP {t}" for w, t in zip(words, tags)] + [""]
    path.write_text("\n".join(lines))
    return path


def write_squad(path: Path, paragraphs) -> Path:
    """paragraphs: [(context, [(question, answer or None), ...]), ...]; answers are found in the context."""
    data = []
    for p, (context, qas) in enumerate(paragraphs):
        items = []
        for q, (question, answer) in enumerate(qas):
            item = {"id": f"p{p}q{q}", "question": question}
            if answer is None:
                item.update(answers=[], is_impossible=True)
            else:
                item["answers"] = [{"text": answer, "answer_start": context.index(answer)}]
            items.append(item)
        data.append({"title": f"t{p}", "paragraphs": [{"context": context, "qas": items}]})
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path


# ----------------------------------------------------------------------------------------------------
# Entity F1
# ----------------------------------------------------------------------------------------------------


def test_entities_follow_the_conll_rules():
    assert entities(["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-ORG"]) == [
        ("PER", 0, 2), ("LOC", 3, 5), ("LOC", 5, 6), ("ORG", 6, 7)]
    assert entities(["I-PER", "I-PER"]) == [("PER", 0, 2)]  # IOB1: I- at the start opens an entity
    assert entities(["B-PER", "B-PER", "I-PER"]) == [("PER", 0, 1), ("PER", 1, 3)]
    assert entities(["B-PER", "I-LOC", "O"]) == [("PER", 0, 1), ("LOC", 1, 2)]
    assert entities(["O", "O"]) == [] and entities([]) == []
    assert check_tag("O") is None and check_tag("B-MISC") is None and check_tag("I-X-Y") is None
    for bad in ("E-PER", "S-LOC", "B", "B-", "PER", "o", "I- X"):
        assert check_tag(bad), bad


def test_entity_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG", "O", "O"]]
    # Gold: PER[0,2), LOC[3,4), ORG[1,3). Predicted: PER[0,2), ORG[3,4), ORG[1,2). Only PER matches:
    # a right type over a wrong extent (ORG[1,2)) and a right extent with the wrong type both miss.
    scores = entity_scores(gold, pred)
    assert scores["entity_precision"] == pytest.approx(1 / 3)
    assert scores["entity_recall"] == pytest.approx(1 / 3)
    assert scores["entity_f1"] == pytest.approx(1 / 3)
    assert scores["token_accuracy"] == pytest.approx(6 / 8)
    assert per_type_f1(gold, pred) == pytest.approx({"LOC": 0.0, "ORG": 0.0, "PER": 1.0})
    # P = 1/2 (one of two predicted), R = 1 (the one gold entity): F1 = 2/3. I- after O is an entity.
    assert entity_scores([["O", "I-PER", "O"]], [["B-LOC", "B-PER", "O"]])["entity_f1"] == pytest.approx(2 / 3)
    nothing = entity_scores([["B-PER", "O"]], [["O", "O"]])
    assert nothing["entity_f1"] == 0.0 and nothing["entity_precision"] == 0.0 and nothing["token_accuracy"] == 0.5
    assert entity_scores([["O"]], [["O"]])["entity_f1"] == 0.0  # nothing to find scores 0, as in conlleval
    with pytest.raises(ValueError):
        entity_scores([["O", "O"]], [["O"]])


def test_entity_scores_match_seqeval_on_random_sequences():
    seqeval = pytest.importorskip("seqeval.metrics")
    generator = torch.Generator().manual_seed(0)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-ORG"]  # I-ORG: only ever after another tag
    gold, pred = [], []
    for _ in range(200):
        n = int(torch.randint(1, 12, (1,), generator=generator))
        gold.append([tags[i] for i in torch.randint(len(tags), (n,), generator=generator).tolist()])
        # Predictions agree with gold 70% of the time, so that the scores are neither 0 nor 1.
        keep = torch.rand(n, generator=generator) < 0.7
        noise = torch.randint(len(tags), (n,), generator=generator).tolist()
        pred.append([g if k else tags[r] for g, k, r in zip(gold[-1], keep.tolist(), noise)])
    ours = entity_scores(gold, pred)
    assert 0.2 < ours["entity_f1"] < 0.9
    assert ours["entity_f1"] == pytest.approx(seqeval.f1_score(gold, pred), abs=1e-12)
    assert ours["entity_precision"] == pytest.approx(seqeval.precision_score(gold, pred), abs=1e-12)
    assert ours["entity_recall"] == pytest.approx(seqeval.recall_score(gold, pred), abs=1e-12)
    assert ours["token_accuracy"] == pytest.approx(seqeval.accuracy_score(gold, pred), abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# SQuAD EM / F1
# ----------------------------------------------------------------------------------------------------


def test_squad_normalization_and_scores_by_hand():
    assert normalize_answer("  The Cat's,  hat!") == "cats hat"
    assert normalize_answer("an apple and a theory") == "apple and theory"  # "theory" keeps its "the"
    assert exact_match("the Denver Broncos", "Denver Broncos.") == 1.0
    assert exact_match("Broncos", "Denver Broncos") == 0.0
    # Prediction words {denver, broncos, won}, gold {broncos}: P = 1/3, R = 1, F1 = 0.5.
    assert token_f1("Denver Broncos won", "the Broncos") == pytest.approx(0.5)
    # Repeated words count with multiplicity: overlap min(2, 1) + min(1, 2) = 2 of 3 on each side.
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    # Best over the gold answers, then the mean over questions; no-answer questions (SQuAD 2.0).
    scores = squad_scores(["Denver Broncos won", "", "", "Paris"],
                          [["Broncos", "Denver Broncos"], [], ["a"], ["Rome"]])
    # q1: EM 0, F1 max(0.5, 0.8) = 0.8; q2: no answer, predicted none: 1 / 1; q3: the gold "a"
    # normalizes to nothing, so it is a no-answer question: 1 / 1; q4: 0 / 0.
    assert scores["exact_match"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx((0.8 + 1 + 1 + 0) / 4)
    assert squad_scores(["Paris"], [[]]) == {"exact_match": 0.0, "f1": 0.0}  # answering the unanswerable


def test_squad_scores_match_the_evaluate_package_when_it_works_offline():
    evaluate = pytest.importorskip("evaluate")
    try:
        metric = evaluate.load("squad")  # its script lives on the hub: usually not available offline
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"evaluate's squad metric is not available offline ({type(exc).__name__})")
    predictions = ["Denver Broncos won", "the cat", "Paris"]
    golds = [["Broncos", "Denver Broncos"], ["The Cat!"], ["Rome"]]
    reference = metric.compute(
        predictions=[{"id": str(i), "prediction_text": p} for i, p in enumerate(predictions)],
        references=[{"id": str(i), "answers": {"text": g, "answer_start": [0] * len(g)}} for i, g in enumerate(golds)],
    )
    ours = squad_scores(predictions, golds)
    assert ours["exact_match"] * 100 == pytest.approx(reference["exact_match"])
    assert ours["f1"] * 100 == pytest.approx(reference["f1"])


# ----------------------------------------------------------------------------------------------------
# Readers and their errors
# ----------------------------------------------------------------------------------------------------


def test_conll_and_jsonl_readers(tmp_path):
    conll = write_conll(tmp_path / "train.conll", SENTENCES[:6])
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text("\n".join(json.dumps({"tokens": w, "tags": t}) for w, t in SENTENCES[:3]) + "\n\n")
    assert token_task_kind(str(conll)) == "tagging" and token_task_kind(str(jsonl)) == "tagging"
    data = load_tagging_task(f"{conll},{jsonl}")
    assert [list(w) for w, _ in data.train] == [w for w, _ in SENTENCES[:6]]  # -DOCSTART- skipped
    assert [list(t) for _, t in data.eval] == [t for _, t in SENTENCES[:3]]
    assert data.spec.tags == ("O", "B-DEVICE", "B-LANG", "B-ROLE", "I-ROLE")
    assert (data.spec.train_split, data.spec.eval_split) == ("train.conll", "eval.jsonl")
    # One file alone: a stable 80/20 split; subsampling is seeded and keeps the order.
    many = write_conll(tmp_path / "many.conll", [([*w, str(i)], [*t, "O"]) for i, (w, t) in enumerate(SENTENCES * 5)])
    one = load_tagging_task(str(many))
    assert 0.1 < len(one.eval) / (len(one.train) + len(one.eval)) < 0.3
    assert load_tagging_task(str(many)).eval == one.eval
    small = load_tagging_task(str(many), max_train=10, seed=1)
    assert len(small.train) == 10 and all(s in one.train for s in small.train)
    assert [one.train.index(s) for s in small.train] == sorted(one.train.index(s) for s in small.train)


def test_token_task_names_and_sequence_jsonl(tmp_path):
    seq = tmp_path / "seq.jsonl"
    seq.write_text('{"text": "a b", "label": 1}\n')
    assert token_task_kind(str(seq)) is None  # a sequence task of tasks.py
    assert token_task_kind("stdlib-ner") == "tagging" and token_task_kind("wikiann-de") == "tagging"
    assert token_task_kind("CoNLL2003") == "tagging"
    assert token_task_kind("squad") == "qa" and token_task_kind("squad_v2") == "qa"
    assert token_task_kind("sst2") is None and token_task_kind("stdlib-topic") is None
    from tadistill.evaluation.tasks import load_task

    with pytest.raises(ConfigError, match="token-level task"):
        load_task("stdlib-ner")
    with pytest.raises(ConfigError, match="stdlib-ner"):
        load_task("stdlib-nre")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("the B-ROLE\nteacher E-ROLE\n", r"line 2 .* 'E-ROLE': tags must be O, B-TYPE or I-TYPE"),
        ("the B-ROLE\nteacher I-\n", r"line 2 .* 'I-'.*type"),
        ("the O\nteacher PERSON\n", r"line 2 .* 'PERSON'"),
        ("the O\nteacher\n", r"line 2 .* one column"),
        ("", r"holds no sentences"),
        ("\n\n-DOCSTART- O\n\n", r"holds no sentences"),
    ],
)
def test_bad_conll_files_are_one_line_errors(tmp_path, content, match):
    path = tmp_path / "bad.conll"
    path.write_text(content)
    with pytest.raises(DataError, match=match) as exc:
        load_tagging_task(f"{path},{path}")
    _one_line(exc)


def test_bad_jsonl_and_missing_files(tmp_path):
    cases = {
        '{"tokens": ["a", "b"], "tags": ["O"]}': "2 tokens but 1 tags",
        '{"tokens": ["a"], "tags": ["X-A"]}': "'X-A'",
        '{"tokens": ["a"], "tags": [1]}': "lists of strings",
        '{"tokens": ["a"]}': "tokens and tags",
        "not json": "not valid JSON",
    }
    for i, (line, match) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text('{"tokens": ["ok"], "tags": ["O"]}\n' + line + "\n")
        with pytest.raises(DataError, match=match) as exc:
            load_tagging_task(f"{path},{path}")
        assert "line 2" in _one_line(exc)
    with pytest.raises(DataError, match="not found"):
        load_tagging_task(str(tmp_path / "missing.conll"))
    tiny = write_conll(tmp_path / "tiny.conll", SENTENCES[:1])
    with pytest.raises(DataError, match="too few sentences"):
        load_tagging_task(str(tiny))
    with pytest.raises(ConfigError, match="max_train"):
        load_tagging_task(f"{tiny},{tiny}", max_train=0)


def test_squad_reader_and_no_answer_detection(tmp_path):
    v1 = write_squad(tmp_path / "v1.json", [("The teacher model is distilled into a student.",
                                             [("What is distilled?", "The teacher model")])])
    data = load_qa_task(f"{v1},{v1}")
    assert data.train == [QAExample("p0q0", "What is distilled?", "The teacher model is distilled into a student.",
                                    ("The teacher model",), (0,))]
    assert not data.spec.allow_no_answer and data.spec.metrics == ("f1", "exact_match")
    v2 = write_squad(tmp_path / "v2.json", [("Python ships its documentation.", [("What ships?", "Python"),
                                                                                  ("Who wins?", None)])])
    both = load_qa_task(f"{v1},{v2}")
    assert both.spec.allow_no_answer and both.eval[1].answers == ()
    assert token_task_kind(str(v1)) == "qa" and token_task_kind(f"{v1},{v2}") == "qa"


def _squad_with(tmp_path, answer: dict | None, **question) -> Path:
    qa = {"id": "q7", "question": "Who?", **question}
    if answer is not None:
        qa["answers"] = [answer]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"data": [{"paragraphs": [{"context": "the student keeps", "qas": [qa]}]}]}))
    return path


@pytest.mark.parametrize(
    ("answer", "extra", "match"),
    [
        ({"text": "keeps it", "answer_start": 12}, {}, r"'q7'.*span \[12, 20\) lies outside its context of 17"),
        ({"text": "student", "answer_start": -1}, {}, r"outside its context"),
        ({"text": "student", "answer_start": 0}, {}, r"'q7'.*reads 'the stu', not the answer 'student'"),
        ({"text": " ", "answer_start": 3}, {}, r"empty answer"),
        ({"text": "student", "answer_start": "4"}, {}, r"'answer_start' \(an integer\)"),
        (None, {}, r"'q7'.*no answers.*is_impossible"),
        ({"text": "student", "answer_start": 4}, {"question": ""}, r"no question text"),
    ],
)
def test_bad_squad_answers_are_one_line_errors(tmp_path, answer, extra, match):
    path = _squad_with(tmp_path, answer, **extra)
    with pytest.raises(DataError, match=match) as exc:
        load_qa_task(f"{path},{path}")
    _one_line(exc)


def test_bad_squad_files(tmp_path):
    for content, match in (("", "not valid JSON"), ("[]", "not SQuAD-format"), ('{"data": []}', "no questions"),
                           ('{"data": [{"paragraphs": [{"qas": []}]}]}', "non-empty 'context'")):
        path = tmp_path / "f.json"
        path.write_text(content)
        with pytest.raises(DataError, match=match) as exc:
            load_qa_task(f"{path},{path}")
        _one_line(exc)


def test_hub_token_tasks_mocked(monkeypatch):
    import datasets

    calls = []
    tag_feature = datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"]))

    def fake_load_dataset(*args, split=None, **kwargs):
        calls.append((args, split))
        if args[0] == "rajpurkar/squad_v2":
            return datasets.Dataset.from_dict({
                "id": ["a", "b"], "title": ["t", "t"], "question": ["Who?", "Why?"],
                "context": ["Ada wrote it.", "Ada wrote it."],
                "answers": [{"text": ["Ada"], "answer_start": [0]}, {"text": [], "answer_start": []}]})
        features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")), "ner_tags": tag_feature})
        return datasets.Dataset.from_dict({"tokens": [["Ada", "Lovelace", "wrote"], []],
                                           "ner_tags": [[1, 2, 0], []]}, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ner = load_tagging_task("wikiann-fr")
    assert calls == [(("unimelb-nlp/wikiann", "fr"), "train"), (("unimelb-nlp/wikiann", "fr"), "test")]
    assert ner.train == [(("Ada", "Lovelace", "wrote"), ("B-PER", "I-PER", "O"))]  # the empty sentence dropped
    assert ner.spec.name == "wikiann-fr" and ner.spec.tags == ("O", "B-PER", "I-PER")
    qa = load_qa_task("squad_v2")
    assert calls[-1] == (("rajpurkar/squad_v2",), "validation")
    assert qa.spec.allow_no_answer and qa.train[0].answers == ("Ada",) and qa.train[1].answers == ()


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    for load, name in ((load_tagging_task, "conll2003"), (load_qa_task, "squad")):
        with pytest.raises(DataError, match="local files") as exc:
            load(name)
        _one_line(exc)


# ----------------------------------------------------------------------------------------------------
# Words and answers to tokens
# ----------------------------------------------------------------------------------------------------


def _metaspace_tokenizer():
    """A SentencePiece-style fast tokenizer (Metaspace: '▁word' pieces whose offsets cover the space)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["the", "teacher", "model", "student"]
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", *(f"\u2581{w}" for w in words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def test_each_word_is_read_at_its_first_token(tiny_tokenizer):
    from tadistill.evaluation.tagging import encode_words
    from tadistill.evaluation.token_encoding import token_tokenizer

    tok = token_tokenizer(tiny_tokenizer)
    # "xyz" is no word of the tiny vocabulary: WordPiece spells it x ##y ##z.
    sentences = [(("teacher", "xyz", "model"), ("O",) * 3), (("the",), ("O",))]
    inputs, firsts = encode_words(tok, sentences, 32, torch.device("cpu"))
    assert tok.convert_ids_to_tokens(inputs["input_ids"][0].tolist())[:6] == ["[CLS]", "teacher", "x", "##y", "##z",
                                                                                 "model"]
    assert firsts == [[1, 2, 5], [1]]
    _, truncated = encode_words(tok, sentences[:1], 4, torch.device("cpu"))  # [CLS] teacher x [SEP]
    assert truncated == [[1, 2, None]]  # "model" did not fit: no token, predicted O
    meta = token_tokenizer(_metaspace_tokenizer())
    inputs, firsts = encode_words(meta, [(("the", "teacher", "model"), ("O",) * 3)], 16, torch.device("cpu"))
    assert firsts == [[0, 1, 2]]  # '▁teacher' starts at the space before the word: still the word's token


def test_windows_hold_the_answer_tokens_and_decode_finds_the_best_span(tiny_tokenizer):
    from tadistill.evaluation.extractive_qa import decode, make_windows
    from tadistill.evaluation.token_encoding import token_tokenizer

    tok = token_tokenizer(tiny_tokenizer)
    context = "The quick brown fox jumps over the lazy dog near the river bank. " * 3
    context += "Python ships its documentation."
    long = QAExample("q", "What ships?", context, ("Python",), (context.index("Python"),))
    short = QAExample("r", "Who jumps?", "The quick brown fox jumps.", ("brown fox",), (10,))
    windows = make_windows(tok, [long, short], 32)
    of_long = (windows.example == 0).nonzero().flatten().tolist()
    assert len(of_long) >= 3 and (windows.example == 1).sum() == 1
    with_answer = [w for w in of_long if windows.start[w] > 0]
    assert with_answer and all(windows.start[w] == 0 and windows.end[w] == 0 for w in of_long if w not in with_answer)
    for w in [*with_answer, len(windows) - 1]:
        ex = [long, short][int(windows.example[w])]
        first, last = windows.offsets[w, windows.start[w], 0], windows.offsets[w, windows.end[w], 1]
        assert ex.context[first:last] == ex.answers[0]
    # Logits that point at the gold tokens decode to the gold answers; a strong no-answer score wins
    # only where no-answer is allowed.
    n, length = windows.example.numel(), windows.context.shape[1]
    start, end = torch.zeros(n, length), torch.zeros(n, length)
    for w in [*with_answer, n - 1]:
        start[w, windows.start[w]] = end[w, windows.end[w]] = 5.0
    assert decode([long, short], windows, start, end, allow_no_answer=False) == ["Python", "brown fox"]
    start[:, 0] = end[:, 0] = 10.0
    assert decode([long, short], windows, start, end, allow_no_answer=True) == ["", ""]
    assert decode([long, short], windows, start, end, allow_no_answer=False) == ["Python", "brown fox"]


# ----------------------------------------------------------------------------------------------------
# Probe and fine-tune on tiny models
# ----------------------------------------------------------------------------------------------------


def _tagging_data(tmp_path):
    path = write_conll(tmp_path / "t.conll", SENTENCES)
    return load_tagging_task(f"{path},{path}")


def test_tagging_probe_learns_word_tags_and_is_reproducible(tiny_encoder, tiny_tokenizer, tmp_path):
    from tadistill.evaluation.tagging import tagging_probe
    from tadistill.loading import load_pretrained

    model = load_pretrained(str(tiny_encoder), head="base", what="model")
    data = _tagging_data(tmp_path)
    scores = tagging_probe(model, tiny_tokenizer, data, seeds=(0,), max_length=32, epochs=5)
    assert set(scores) == {"entity_f1", "entity_precision", "entity_recall", "token_accuracy"}
    # Every tag here is a function of the word and its neighbours: a linear probe on the tiny random
    # model's features recovers them (an all-O probe would score F1 0).
    assert scores["entity_f1"][0] > 0.9
    assert tagging_probe(model, tiny_tokenizer, data, seeds=(0,), max_length=32, epochs=5) == scores
    all_o = load_tagging_task(str(write_conll(tmp_path / "o.conll", [(w, ["O"] * len(w)) for w, _ in SENTENCES])) +
                              "," + str(tmp_path / "t.conll"))
    with pytest.raises(DataError, match="no B- or I- tag"):
        tagging_probe(model, tiny_tokenizer, all_o, seeds=(0,))


@pytest.mark.slow
def test_tagging_finetune_runs_per_seed(tiny_encoder, tiny_tokenizer, tmp_path):
    from tadistill.evaluation.tagging import tagging_finetune

    data = _tagging_data(tmp_path)
    scores = tagging_finetune(str(tiny_encoder), tiny_tokenizer, data, seeds=(0, 1), epochs=1, batch_size=8,
                              max_length=32, device="cpu")
    assert all(0.0 <= mean <= 1.0 and std >= 0.0 for mean, std in scores.values())
    assert tagging_finetune(str(tiny_encoder), tiny_tokenizer, data, seeds=(0, 1), epochs=1, batch_size=8,
                            max_length=32, device="cpu") == scores


def _qa_file(tmp_path) -> Path:
    """Every question asks for the one word 'python' in contexts made of the tiny models' sentences."""
    from conftest import TEXTS

    paragraphs = []
    for i in range(24):
        a, b = TEXTS[i % 8], TEXTS[(i // 8 + 3) % 8]  # 24 different contexts: an 80/20 split has both parts
        context = f"{a} python ships its documentation. {b}" if i % 2 else f"python ships its documentation. {a} {b}"
        paragraphs.append((context, [("what ships its documentation?", "python")]))
    return write_squad(tmp_path / "qa.json", paragraphs)


def test_qa_probe_learns_an_answer_position(tiny_encoder, tiny_tokenizer, tmp_path):
    from tadistill.evaluation.extractive_qa import qa_probe
    from tadistill.loading import load_pretrained

    path = _qa_file(tmp_path)
    data = load_qa_task(f"{path},{path}")
    model = load_pretrained(str(tiny_encoder), head="base", what="model")
    scores = qa_probe(model, tiny_tokenizer, data, seeds=(0,), max_length=48, epochs=5)
    assert set(scores) == {"f1", "exact_match"}
    assert scores["exact_match"][0] > 0.8  # the answer is always the word "python": a linear head finds it


@pytest.mark.slow
def test_qa_probe_on_a_decoder_and_finetune_on_an_encoder(tiny_gpt2, tiny_encoder, tiny_tokenizer, tmp_path):
    from tadistill.evaluation.extractive_qa import qa_finetune, qa_probe
    from tadistill.loading import load_pretrained, load_tokenizer

    path = _qa_file(tmp_path)
    data = load_qa_task(f"{path},{path}")
    gpt2 = load_pretrained(str(tiny_gpt2), head="base", what="model")
    scores = qa_probe(gpt2, load_tokenizer(str(tiny_gpt2)), data, seeds=(0,), max_length=48, epochs=2)
    assert 0.0 <= scores["f1"][0] <= 1.0
    tuned = qa_finetune(str(tiny_encoder), tiny_tokenizer, data, seeds=(0,), epochs=1, batch_size=8, max_length=48,
                        device="cpu")
    assert 0.0 <= tuned["exact_match"][0] <= tuned["f1"][0] <= 1.0


def test_evaluate_task_dispatches_token_tasks(tiny_encoder, tmp_path):
    from tadistill.evaluation.downstream import evaluate_task

    path = write_conll(tmp_path / "t.conll", SENTENCES)
    result = evaluate_task(str(tiny_encoder), f"{path},{path}", seeds=(0,), max_length=32, epochs=2, max_train=12)
    assert result["headline"] == "entity_f1" and result["train_size"] == 12 and result["eval_size"] == len(SENTENCES)
    assert set(result["metrics"]["entity_f1"]) == {"mean", "std"}
    with pytest.raises(ConfigError, match="mode"):
        evaluate_task(str(tiny_encoder), str(path), mode="zero")


# ----------------------------------------------------------------------------------------------------
# The built-in task: stdlib-ner
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_ner():
    from tadistill.data.builtin_token_tasks import stdlib_ner_examples

    return stdlib_ner_examples()


def test_stdlib_ner_is_deterministic_bio_with_code_spans_in_context(stdlib_ner):
    from tadistill.data import builtin_token_tasks

    assert len(stdlib_ner) >= 1000
    assert len({words for words, _ in stdlib_ner}) == len(stdlib_ner)  # one tag sequence per sentence
    for words, tags in stdlib_ner:
        assert len(words) == len(tags) and all(w.strip() for w in words)
        assert all(check_tag(t) is None for t in tags) and set(tags) <= {"O", "B-CODE", "I-CODE"}
        assert entities(tags)  # every sentence has a code span
        assert all(not t.startswith("I-") or prev != "O" for prev, t in zip(("O", *tags), tags))
    builtin_token_tasks._examples.cache_clear()  # rebuilt from the sources: the same list
    assert builtin_token_tasks.stdlib_ner_examples() == stdlib_ner
    # Not a surface-form task only: many code words look like English words ("separator", "want"),
    # code only because the sentence around them says so.
    plain = [words[i] for words, tags in stdlib_ner for kind, i, _ in entities(tags) if words[i].isalpha()
             and words[i].islower()]
    assert len(plain) >= 200
    data = load_tagging_task("stdlib-ner")
    assert data.spec.name == "stdlib-ner" and data.spec.tags == ("O", "B-CODE", "I-CODE")
    assert 0.1 < len(data.eval) / len(stdlib_ner) < 0.3 and len(data.train) + len(data.eval) == len(stdlib_ner)


@pytest.mark.parametrize("seed", [0, 1])
def test_stdlib_ner_is_disjoint_from_the_corpus(stdlib_ner, seed):
    from tadistill.data.builtin import builtin_texts
    from tadistill.data.builtin_token_tasks import normalized_words
    from tadistill.data.tokenized import split_texts

    # The training split at the default held-out fraction for two training seeds, and the whole corpus:
    # no sentence occurs in any text (not even inside a longer paragraph), compared word by word with
    # quotes and backticks dropped (the corpus keeps 'quoted' names, the task removes the marks).
    corpus = builtin_texts()
    train, _ = split_texts(corpus, 0.02, seed=seed)
    for texts in (train, corpus):
        joined = "\n".join(normalized_words(t) for t in texts)
        leaked = [words for words, _ in stdlib_ner if " ".join(words) in joined]
        assert not leaked, leaked[:3]
    # The check can fail: a corpus paragraph, tagged the same way, would be caught.
    probe = normalized_words(corpus[100])
    assert probe in joined


@pytest.mark.slow
def test_builtin_teacher_tags_code_far_above_the_baselines(stdlib_ner):
    from collections import Counter, defaultdict

    from tadistill.evaluation.tagging import tagging_probe
    from tadistill.loading import load_pretrained, load_tokenizer

    data = load_tagging_task("stdlib-ner", max_train=400, max_eval=200)
    teacher = load_pretrained("builtin", head="base", what="teacher")
    scores = tagging_probe(teacher, load_tokenizer("builtin"), data, seeds=(0,), max_length=64)
    # Majority baseline (every word O): F1 0. Word-identity baseline: each word's most frequent training
    # tag (the baseline of the CoNLL-2003 shared task tagged the entities seen in training).
    seen: dict[str, Counter] = defaultdict(Counter)
    for words, tags in data.train:
        for w, t in zip(words, tags):
            seen[w][t] += 1
    baseline = entity_scores([t for _, t in data.eval],
                             [[seen[w].most_common(1)[0][0] if seen[w] else "O" for w in words]
                              for words, _ in data.eval])["entity_f1"]
    # Measured on CPython 3.11 with these 400 / 200 sentences: teacher 0.51, word identity 0.23.
    assert scores["entity_f1"][0] > 0.4
    assert scores["entity_f1"][0] > baseline + 0.15


@pytest.mark.slow
def test_evaluate_cli_with_builtin_conll_and_squad_tasks(tiny_encoder, tiny_corpus, tmp_path):
    from tadistill.cli.main import main

    conll = write_conll(tmp_path / "ner.conll", SENTENCES)
    squad = _qa_file(tmp_path)
    out = tmp_path / "eval"
    code = main(["evaluate", str(tiny_encoder), "--teacher", str(tiny_encoder), "--tasks", "stdlib-ner", str(conll),
                 str(squad), "--seeds", "0", "--no-latency", "--max-length", "32", "--texts", str(tiny_corpus),
                 "--out", str(out)])
    assert code == 0
    rows = {r["model"]: r for r in json.loads((out / "results.json").read_text())}
    for task, metric in (("stdlib-ner", "entity_f1"), (str(conll), "entity_f1"), (str(squad), "f1"),
                         (str(squad), "exact_match")):
        key = f"{task}/{metric}"
        # The same checkpoint as teacher and student: the same scores, seed for seed.
        assert 0.0 <= rows["student"][key] <= 1.0 and rows["student"][key] == rows["teacher"][key], key
        assert f"{key}_std" in rows["student"]
    assert "stdlib-ner/entity_f1 (% of teacher)" in (out / "results.md").read_text()


def test_evaluate_cli_bad_token_file_is_one_line(tiny_encoder, tiny_corpus, tmp_path, capsys):
    from tadistill.cli.main import main

    bad = tmp_path / "bad.conll"
    bad.write_text("the B-ROLE\nteacher S-ROLE\n")
    code = main(["evaluate", str(tiny_encoder), "--teacher", str(tiny_encoder), "--tasks", f"{bad},{bad}",
                 "--seeds", "0", "--no-latency", "--max-length", "32", "--texts", str(tiny_corpus),
                 "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "'S-ROLE'" in err and "\n" not in err
