"""Latency, throughput and size on disk (evaluation/latency.py)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import BertConfig, BertModel

from tadistill.errors import ConfigError, ModelError
from tadistill.evaluation.latency import (
    compare_latency,
    flatten_latency,
    in_reference_time,
    measure_latency,
    reference_from_row,
    size_on_disk,
)

V = 100


def bert(layers: int, hidden: int = 64) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=V, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=4 * hidden, max_position_embeddings=128)
    return BertModel(config)


def test_measure_latency_keys_and_positive_values() -> None:
    model = bert(2, hidden=32)
    model.train()
    result = measure_latency(model, vocab_size=V, batch_sizes=(1, 32), seq_len=64, repeats=5, warmup=1)
    assert set(result) == {"batch_1", "batch_32"}
    for batch, stats in ((1, result["batch_1"]), (32, result["batch_32"])):
        assert set(stats) == {"median_ms", "p90_ms", "sequences_per_s", "tokens_per_s"}
        assert stats["median_ms"] > 0
        assert stats["p90_ms"] >= stats["median_ms"]
        assert stats["sequences_per_s"] == pytest.approx(batch * 1e3 / stats["median_ms"])
        assert stats["tokens_per_s"] == pytest.approx(64 * stats["sequences_per_s"])
    # No comparison of the two timings: wall-clock claims belong in benchmarks, not tests (a loaded machine
    # can time one sequence slower than 32).
    assert model.training, "the training flag must be restored"


def test_flatten_latency_keys() -> None:
    result = {"batch_1": {"median_ms": 2.0, "p90_ms": 3.0, "sequences_per_s": 500.0, "tokens_per_s": 64000.0}}
    assert flatten_latency(result) == {"latency_b1_ms": 2.0, "latency_b1_p90_ms": 3.0, "tokens_per_s_b1": 64000.0}


def test_compare_latency_small_student_is_faster() -> None:
    teacher, student = bert(4), bert(1)
    result = compare_latency(teacher, student, vocab_size=V, batch_sizes=(8,), seq_len=64, repeats=15, warmup=2)
    assert set(result) == {"teacher", "student", "speedup"}
    speedup = result["speedup"]["batch_8"]
    teacher_ms, student_ms = result["teacher"]["batch_8"]["median_ms"], result["student"]["batch_8"]["median_ms"]
    assert speedup == pytest.approx(teacher_ms / student_ms)
    # Four blocks against one of the same width: well above 1 even on a noisy machine.
    assert speedup > 1.5


def test_latency_argument_errors() -> None:
    model = bert(1, hidden=32)
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        measure_latency(model, vocab_size=V, batch_sizes=(1,), seq_len=512, repeats=1)
    with pytest.raises(ConfigError, match="repeats"):
        measure_latency(model, vocab_size=V, repeats=0)
    with pytest.raises(ConfigError, match="batch"):
        measure_latency(model, vocab_size=V, batch_sizes=())


def test_size_on_disk_equals_weight_file(tmp_path) -> None:
    model = bert(1, hidden=32)
    model.save_pretrained(tmp_path, safe_serialization=True)
    weights = tmp_path / "model.safetensors"
    assert size_on_disk(tmp_path) == weights.stat().st_size > 0
    assert size_on_disk(weights) == weights.stat().st_size
    # A stale .bin next to the safetensors file is not what gets loaded: it does not count.
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 1000)
    assert size_on_disk(tmp_path) == weights.stat().st_size
    weights.unlink()
    assert size_on_disk(tmp_path) == 1000


def test_size_on_disk_errors(tmp_path) -> None:
    with pytest.raises(ModelError, match="no model folder"):
        size_on_disk(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        size_on_disk(tmp_path)


def test_in_reference_time_makes_reference_over_student_equal_the_speedup() -> None:
    """Issue 10: the teacher row and the speedup must come from one measurement, whatever run they were timed in."""
    compared = {
        "teacher": {"batch_1": {"median_ms": 10.0, "p90_ms": 11.0, "sequences_per_s": 100.0, "tokens_per_s": 6400.0},
                    "batch_8": {"median_ms": 40.0, "p90_ms": 44.0, "sequences_per_s": 200.0, "tokens_per_s": 12800.0}},
        "student": {"batch_1": {"median_ms": 4.0, "p90_ms": 5.0, "sequences_per_s": 250.0, "tokens_per_s": 16000.0},
                    "batch_8": {"median_ms": 10.0, "p90_ms": 12.0, "sequences_per_s": 800.0, "tokens_per_s": 51200.0}},
        "speedup": {"batch_1": 2.5, "batch_8": 4.0},
    }
    # The teacher row was timed while the machine was 20% slower (12 ms instead of 10); batch 8 has no reference.
    got = in_reference_time(compared, {"batch_1": 12.0})
    assert got["batch_1"] == pytest.approx({"median_ms": 4.8, "p90_ms": 6.0, "sequences_per_s": 250.0 / 1.2,
                                            "tokens_per_s": 16000.0 / 1.2})
    assert 12.0 / got["batch_1"]["median_ms"] == pytest.approx(compared["speedup"]["batch_1"], rel=1e-12)
    assert got["batch_8"] == compared["student"]["batch_8"]  # no reference: the raw interleaved timings
    row = {"model": "teacher", "latency_b1_ms": 12.0, "latency_b1_p90_ms": 13.0, "tokens_per_s_b1": 5.0,
           "latency_b32_ms": 50.0, "latency_b1_interleaved_ms": 9.0}
    assert reference_from_row(row) == {"batch_1": 12.0, "batch_32": 50.0}
    assert reference_from_row(None) == {}


@pytest.mark.usefixtures("one_thread")  # tiny models: intra-op threads only add contention
def test_suite_teacher_row_and_student_speedup_agree(tiny_teacher, tiny_encoder) -> None:
    """Teacher latency / student latency in the rows equals the student's interleaved speedup, at every batch size."""
    from conftest import TEXTS

    from tadistill.evaluation.suite import EvaluationSuite
    from tadistill.study.config import EvaluationSpec

    spec = EvaluationSpec(tasks=[], seeds=[0], fidelity_texts=12, latency=True)
    suite = EvaluationSuite(teacher=str(tiny_teacher), texts={"": TEXTS[:12]}, spec=spec, max_length=16)
    teacher_row = suite.evaluate_teacher()
    rows = [suite.evaluate_student(tiny_encoder, name="cached reference"),  # the CLI: the suite's own teacher row
            suite.evaluate_student(tiny_encoder, name="given", teacher_row=teacher_row)]  # a study: teacher.json
    for row in rows:
        for batch in (1, 32):
            assert teacher_row[f"latency_b{batch}_ms"] / row[f"latency_b{batch}_ms"] == pytest.approx(
                row[f"speedup_b{batch}"], rel=1e-9)
            assert row[f"speedup_b{batch}"] == pytest.approx(
                row[f"latency_b{batch}_teacher_interleaved_ms"] / row[f"latency_b{batch}_interleaved_ms"], rel=1e-9)
    # A teacher row without latency (evaluated with latency off) leaves the raw interleaved timings.
    raw = suite.evaluate_student(tiny_encoder, name="raw", teacher_row={"model": "teacher"})
    assert raw["latency_b1_ms"] == raw["latency_b1_interleaved_ms"]
