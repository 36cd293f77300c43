"""Downstream evaluation: linear probe and fine-tuning on the tiny BERT, evaluate_task end to end."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from tadistill.errors import ConfigError
from tadistill.evaluation.downstream import encode_features, evaluate_task, finetune, linear_probe
from tadistill.evaluation.tasks import TaskData, TaskSpec
from tadistill.loading import load_pretrained, load_tokenizer

FILLERS = [
    "the quick brown fox jumps over the lazy dog",
    "a teacher model is distilled into a smaller student",
    "hidden states of the student are mapped to the teacher",
    "small models are cheaper to run on a laptop",
    "attention relations between queries and keys",
    "python ships its documentation with every installation",
]

pytestmark = pytest.mark.usefixtures("one_thread")


def _sentiment_rows(n: int, offset: int = 0) -> list[tuple[str, None, int]]:
    """Separable synthetic task: label 1 iff the text opens with "good" (both words tokenize to
    distinct character pieces in the tiny vocabulary)."""
    rows = []
    for i in range(offset, offset + n):
        label = i % 2
        rows.append((f"{'good' if label else 'bad'} {FILLERS[(i // 2) % len(FILLERS)]}", None, label))
    return rows


def _binary_task(n_train: int = 64, n_eval: int = 32) -> TaskData:
    spec = TaskSpec("synthetic", "text", None, "label", 2, ("accuracy", "f1"), "train", "eval", None)
    return TaskData(spec, _sentiment_rows(n_train), _sentiment_rows(n_eval, offset=n_train))


def _regression_pair_task(n_train: int = 80, n_eval: int = 40) -> TaskData:
    """Pair regression: the label is how many of the 4 words of the first text are "good"."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n_train + n_eval):
        k = int(torch.randint(0, 5, (1,), generator=gen))
        text = " ".join(["good"] * k + ["bad"] * (4 - k))
        rows.append((text, FILLERS[i % len(FILLERS)], float(k)))
    spec = TaskSpec("pair-regression", "text", "text_pair", "label", 1, ("pearson", "spearman"), "train", "eval", None)
    return TaskData(spec, rows[:n_train], rows[n_train:])




@pytest.fixture(scope="module")
def encoder(tiny_encoder):
    model = load_pretrained(str(tiny_encoder), head="base").eval()
    tokenizer = load_tokenizer(str(tiny_encoder))
    # The synthetic tasks rely on "good" and "bad" being different tokens.
    assert tokenizer("good")["input_ids"] != tokenizer("bad")["input_ids"], "tiny tokenizer maps good/bad alike"
    return model, tokenizer


def test_linear_probe_separates_a_separable_task(encoder):
    model, tokenizer = encoder
    result = linear_probe(model, tokenizer, _binary_task(), seeds=(0, 1, 2), max_length=32)
    assert list(result) == ["accuracy", "f1"]
    (acc, acc_std), (f1, _) = result["accuracy"], result["f1"]
    assert acc >= 0.9 and f1 >= 0.9  # chance is 0.5
    assert math.isfinite(acc_std) and acc_std >= 0
    # Same seeds, same numbers, also when the caller holds inference mode.
    with torch.inference_mode():
        assert linear_probe(model, tokenizer, _binary_task(), seeds=(0, 1, 2), max_length=32) == result


def test_linear_probe_regression_on_pairs(encoder):
    model, tokenizer = encoder
    data = _regression_pair_task()
    result = linear_probe(model, tokenizer, data, seeds=(0, 1), max_length=32)
    assert list(result) == ["pearson", "spearman"]
    assert result["pearson"][0] > 0.8 and result["spearman"][0] > 0.8
    assert all(math.isfinite(std) for _, std in result.values())


def test_features_encode_the_pair_together(encoder):
    model, tokenizer = encoder
    single = encode_features(model, tokenizer, [("good good bad bad", None, 0)], max_length=32)
    paired = encode_features(model, tokenizer, [("good good bad bad", "a small student", 0)], max_length=32)
    assert single.shape == paired.shape == (1, model.config.hidden_size)
    assert not torch.allclose(single, paired)
    assert not single.is_inference()  # usable by autograd code
    assert model.training is False


def test_finetune_one_epoch_and_rng_left_alone(tiny_encoder):
    tokenizer = load_tokenizer(str(tiny_encoder))
    state = torch.random.get_rng_state()
    result = finetune(str(tiny_encoder), tokenizer, _binary_task(32, 16), seeds=(0, 1), epochs=1,
                      batch_size=8, max_length=32, lr=1e-3, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert list(result) == ["accuracy", "f1"]
    for mean, std in result.values():
        assert 0.0 <= mean <= 1.0 and math.isfinite(std)


def test_finetune_regression_returns_correlations(tiny_encoder):
    tokenizer = load_tokenizer(str(tiny_encoder))
    result = finetune(str(tiny_encoder), tokenizer, _regression_pair_task(24, 12), seeds=(0,), epochs=1,
                      batch_size=8, max_length=32, device="cpu")
    assert list(result) == ["pearson", "spearman"]
    assert result["pearson"][1] == 0.0  # one seed: std 0


def test_evaluate_task_from_a_local_file(tiny_encoder, tmp_path):
    path = tmp_path / "task.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for text, _, label in _sentiment_rows(60):
            writer.writerow([text, ["negative", "positive"][label]])
    out = evaluate_task(str(tiny_encoder), str(path), mode="probe", seeds=(0, 1), max_length=32, device="cpu")
    assert out["task"] == str(path) and out["mode"] == "probe" and out["headline"] == "accuracy"
    assert set(out["metrics"]) == {"accuracy", "f1"}
    assert set(out["metrics"]["accuracy"]) == {"mean", "std"} and out["metrics"]["accuracy"]["mean"] >= 0.9
    assert out["train_size"] + out["eval_size"] == 60
    with pytest.raises(ConfigError, match="probe"):
        evaluate_task(str(tiny_encoder), str(path), mode="zero-shot")
    with pytest.raises(ConfigError, match="seeds"):
        evaluate_task(str(tiny_encoder), str(path), seeds=())
