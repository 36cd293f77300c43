"""benchmarks/issue18_gain.py: the table pairs each trained student with its own initialisation, per seed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gain():
    spec = importlib.util.spec_from_file_location("issue18_gain", ROOT / "benchmarks" / "issue18_gain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scores(acc: list[float], topic: float) -> dict:
    runs = [{"acc@1": a, "mrr": a + 0.1} for a in acc]
    mean = sum(acc) / len(acc)
    return {"stdlib-retrieval/acc@1": mean, "stdlib-retrieval/acc@1_std": 0.01, "stdlib-retrieval/mrr": mean + 0.1,
            "stdlib-retrieval/mrr_std": 0.01, "stdlib-retrieval/runs": runs, "stdlib-topic/accuracy": topic,
            "stdlib-topic/accuracy_std": 0.002}


def test_paired_difference_is_per_evaluation_seed(gain):
    init, final = scores([0.30, 0.40, 0.50], 0.6), scores([0.32, 0.43, 0.51], 0.7)
    # Differences 0.02, 0.03, 0.01: mean 0.02, sample std 0.01 (the spread of the draws cancels out).
    assert gain.paired(init, final, "acc@1") == "+0.0200 ± 0.0100"
    assert gain.paired(init, {"stdlib-retrieval/acc@1": 0.4}, "acc@1") == ""  # no per-seed scores: no pairing


def test_table_lists_teacher_trained_cells_and_inits(gain, tmp_path):
    (tmp_path / "teacher.json").write_text(json.dumps(scores([0.4, 0.4, 0.4], 0.74)))
    row = {"name": "cell-a", "steps": 100, "train_seconds": 170.0, "s_per_step": 1.7, "load": [5.0, 4.5],
           "init": scores([0.30, 0.40, 0.50], 0.6), "final": scores([0.32, 0.43, 0.51], 0.7)}
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "inits.jsonl").write_text(json.dumps({"name": "init-b", "init": scores([0.1, 0.1, 0.1], 0.5)}) + "\n")
    lines = gain.table(tmp_path).splitlines()
    assert lines[2].startswith("| teacher |") and "0.7400 ± 0.0020" in lines[2]
    assert lines[3].startswith("| cell-a | 100 | 170 (1.7, 5.0-4.5) |")
    assert "0.4000 ± 0.0100 -> 0.4200 ± 0.0100" in lines[3] and "+0.0200 ± 0.0100" in lines[3]
    assert "0.6000 ± 0.0020 -> 0.7000 ± 0.0020" in lines[3]
    assert lines[4].startswith("| init-b (init only) | 0 |")
