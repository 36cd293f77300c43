"""`compare --example paper`: the resolved cells differ only in objective and shape; initialisation rows, training
replicates and the noise marks of the report, end to end on tiny models; the noise arithmetic by hand."""

from __future__ import annotations

import csv
import json
import math
from importlib import resources

import pytest
import torch
import yaml

from tadistill.cli.main import main
from tadistill.loading import load_pretrained
from tadistill.reports.gains import beyond_noise, gains_over_init, training_noise, versus_best
from tadistill.study.compare import compare, expand_cells, load_study

pytestmark = pytest.mark.usefixtures("one_thread")

PAPER = resources.files("tadistill") / "study" / "paper.yaml"
TEACHER_SHAPE = (6, 384)  # all-MiniLM-L6-v2, the body of builtin-mlm


def _paper():
    return load_study(str(PAPER))


def _shape_free(config) -> dict:
    """A resolved config without what a cell of the study may change: its objectives, recipe and student shape."""
    data = config.model_dump(mode="json")
    data.pop("objectives")
    data.pop("recipe")
    for key in ("num_layers", "hidden_size", "num_heads"):
        data["student"].pop(key)
    return data


def test_paper_cells_differ_only_in_objective_and_shape():
    study = _paper()
    cells = expand_cells(study)
    main_cells = [c for c in cells if not c.replicate_of]
    assert all(c.error is None for c in cells)
    assert len(main_cells) == len(study.methods) * len(study.students) >= 21
    reference = _shape_free(main_cells[0].config)
    for cell in main_cells:  # one teacher, one data order and budget, one optimiser, one initialisation rule
        assert _shape_free(cell.config) == reference, cell.name
    assert reference["teacher"] == "builtin-mlm"
    tokens = {c.config.train.steps * c.config.train.batch_size * c.config.data.max_length for c in main_cells}
    assert tokens == {study.budget.tokens}


def test_paper_methods_and_shapes_are_those_of_the_paper():
    cells = [c for c in expand_cells(_paper()) if not c.replicate_of]
    kinds = {c.method: [o for o in c.config.objectives if o.weight > 0] for c in cells}
    assert [o.kind for o in kinds["od"]] == ["output-kl"]
    mappings = {o.mapping for m, objs in kinds.items() for o in objs if o.kind == "hidden"}
    assert mappings == {"last", "uniform", "uniform-cons", "uniform+last"}
    blocks = {o.teacher_layer for objs in kinds.values() for o in objs if o.kind == "minilmv2"}
    assert blocks == {"last", 5}  # the last block and an upper-middle one of the 6-block teacher
    shapes = {(c.config.student.num_layers, c.config.student.hidden_size or TEACHER_SHAPE[1]) for c in cells}
    layers, width = TEACHER_SHAPE
    assert any(s[0] < layers and s[1] == width for s in shapes)  # fewer layers
    assert any(s[0] == layers and s[1] < width for s in shapes)  # narrower
    assert any(s[0] < layers and s[1] < width for s in shapes)  # both


def test_paper_replicates_differ_only_in_the_seed_and_the_evaluation_has_three_seeds():
    study = _paper()
    cells = expand_cells(study)
    by_name = {c.name: c for c in cells}
    replicates = [c for c in cells if c.replicate_of]
    assert replicates and study.noise.seeds
    for replicate in replicates:
        base = by_name[replicate.replicate_of].config.model_dump(mode="json")
        again = replicate.config.model_dump(mode="json")
        assert again["train"].pop("seed") != base["train"].pop("seed")
        assert again == base
    assert len(study.evaluation.seeds) >= 3


def test_quick_is_the_same_study_on_a_smaller_budget():
    study = _paper()
    quick = study.quick_version()
    assert quick.name == "paper-quick" and quick.quick is None
    assert quick.methods == study.methods and quick.students == study.students and quick.noise == study.noise
    assert quick.budget.tokens < study.budget.tokens / 5
    assert quick.train["lr"] == study.train["lr"]  # a merged section keeps the keys it does not name
    with pytest.raises(ValueError, match="has no quick: section"):
        quick.quick_version()


def test_compare_example_paper_quick_reaches_compare_with_the_quick_study(monkeypatch, tmp_path, capsys):
    import tadistill.study.compare as compare_module
    import tadistill.teachers.mlm_head as mlm_head

    seen = {}
    monkeypatch.setattr(mlm_head, "ensure_builtin_mlm_teacher", lambda *names, progress=True: seen.setdefault(
        "ensured", names))

    def fake_compare(study, *, out, **kw):
        seen["study"] = study
        (tmp_path / "report").mkdir()
        return tmp_path / "report"

    monkeypatch.setattr(compare_module, "compare", fake_compare)
    assert main(["compare", "--example", "paper", "--quick", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    assert seen["study"].name == "paper-quick" and seen["ensured"] == ("builtin-mlm",)
    assert main(["compare", "--example", "encoder", "--quick", "--out", str(tmp_path / "e")]) == 2
    assert "no quick: section" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- end to end, tiny


@pytest.fixture
def task_csv(tmp_path):
    path = tmp_path / "task.csv"
    rows = [("the teacher model is distilled into a student", "model"), ("the quick brown fox jumps", "animal")]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(30):
            text, label = rows[i % 2]
            writer.writerow([f"{text} {i}", label])
    return path


def _tiny_paper(tmp_path, tiny_teacher, tiny_corpus, task_csv):
    """The paper study's structure on the tiny MLM teacher: OD, HS, MHA; two shapes; hs_2x32 trained twice."""
    study = {
        "name": "tiny-paper",
        "teacher": str(tiny_teacher),
        "data": {"source": str(tiny_corpus), "max_length": 24, "heldout_fraction": 0.3,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"batch_size": 4, "eval_every": 0, "save_every": 0, "eval_batches": 1, "log_every": 1},
        "budget": {"tokens": 4 * 4 * 24},
        "methods": [
            {"name": "od", "recipe": "od"},
            {"name": "hs", "recipe": "hs"},
            {"name": "mha", "recipe": "minilmv2", "set": ["objectives.minilmv2.relation_heads=4"]},
        ],
        "students": ["2x32", "1x16x4"],
        "noise": {"cells": ["hs_2x32"], "seeds": [1]},
        "evaluation": {"tasks": [str(task_csv)], "seeds": [0, 1], "fidelity_texts": 12, "max_train": 40,
                       "max_eval": 40, "latency": False},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return load_study(path)


def test_a_study_reports_init_rows_replicates_and_gains(tmp_path, tiny_teacher, tiny_corpus, task_csv):
    study = _tiny_paper(tmp_path, tiny_teacher, tiny_corpus, task_csv)
    out = tmp_path / "out"
    report = compare(study, out=out, progress=False)
    rows = {r["model"]: r for r in csv.DictReader((report / "results.csv").open())}
    assert {"init_2x32", "init-od_2x32", "init_1x16x4", "init-od_1x16x4", "hs_2x32@seed1"} <= set(rows)
    assert all(not rows[m].get("error") for m in rows), {m: rows[m].get("error") for m in rows}
    # The init rows are the very students the cells start from (next test), saved before any step.
    init_summary = json.loads((out / "cells" / "init_2x32" / "summary.json").read_text())
    assert init_summary["steps"] == 0 and sorted(init_summary["serves"]) == ["hs_2x32", "mha_2x32"]
    od_init = json.loads((out / "cells" / "init-od_2x32" / "summary.json").read_text())
    assert od_init["serves"] == ["od_2x32"]
    assert float(rows["init-od_2x32"]["intrinsic/mlm_perplexity"]) > 1  # OD's MLM metrics have a baseline
    assert rows["init-od_2x32"]["params"] == rows["od_2x32"]["params"]

    # Gains: every cell against its shape's init row; the replicate gives the noise (1 degree of freedom).
    gains = json.loads((report / "gains.json").read_text())
    metric = f"{task_csv}/accuracy"
    assert gains["noise"][metric]["dof"] == 1
    hs = next(g for g in gains["gains"] if g["model"] == "hs_2x32")
    assert hs["init_row"] == "init_2x32"
    assert hs[metric]["gain"] == pytest.approx(float(rows["hs_2x32"][metric]) - float(rows["init_2x32"][metric]))
    a, b = float(rows["hs_2x32"][metric]), float(rows["hs_2x32@seed1"][metric])
    assert gains["noise"][metric]["sigma"] == pytest.approx(abs(a - b) / math.sqrt(2))
    text = (report / "study.md").read_text()
    assert "## What training added" in text and "Training noise" in text
    assert "### Difference to the best cell of each shape" in text and "hs (seed 1)" in text

    # The replicate's resolved config differs from its cell's only in train.seed.
    cell = yaml.safe_load((report / "configs" / "hs_2x32.yaml").read_text())
    again = yaml.safe_load((report / "configs" / "hs_2x32@seed1.yaml").read_text())
    assert again["train"].pop("seed") == 1 and cell["train"].pop("seed") == 0 and cell == again

    # --resume of a finished study trains and saves nothing again, the init rows included.
    stamp = (out / "cells" / "init_2x32" / "student" / "model.safetensors").stat().st_mtime_ns
    compare(study, out=out, resume=True, progress=False)
    assert (out / "cells" / "init_2x32" / "student" / "model.safetensors").stat().st_mtime_ns == stamp


def test_each_init_row_holds_the_weights_its_cells_start_from(tmp_path, tiny_teacher, tiny_corpus, task_csv):
    """Built as a lane builds its student; a row per head, since the head changes a random body's draws."""
    from tadistill.study.init_rows import save_init_students
    from tadistill.training.lane import build_lane
    from tadistill.training.rundir import RunDir
    from tadistill.training.setup import load_teacher

    study = _tiny_paper(tmp_path, tiny_teacher, tiny_corpus, task_csv)
    cells = expand_cells(study)  # random initialisation (the recipes' default): the strictest case
    out = tmp_path / "out"
    inits = save_init_students(cells, out)
    assert [c.name for c in inits] == ["init_2x32", "init-od_2x32", "init_1x16x4", "init-od_1x16x4"]
    tokenizer, teacher, arch = load_teacher([c.config for c in cells])  # as the training pass loads it
    for name, row in (("od_2x32", "init-od_2x32"), ("hs_2x32", "init_2x32"), ("mha_2x32", "init_2x32")):
        config = next(c.config for c in cells if c.name == name)
        lane = build_lane(name, config, RunDir(tmp_path / name), teacher=teacher, teacher_arch=arch,
                          tokenizer=tokenizer)
        head = "mlm" if name.startswith("od") else "base"
        saved = load_pretrained(str(out / "cells" / row / "student"), head=head).state_dict()
        start = lane.student.state_dict()
        assert start.keys() <= saved.keys() and all(torch.equal(start[k], saved[k]) for k in start), name
    # Without the head the same seed draws another body: one row could not serve both.
    od = load_pretrained(str(out / "cells" / "init-od_2x32" / "student"), head="base").state_dict()
    hs = load_pretrained(str(out / "cells" / "init_2x32" / "student"), head="base").state_dict()
    assert not torch.equal(od["encoder.layer.0.attention.self.query.weight"],
                           hs["encoder.layer.0.attention.self.query.weight"])


# -------------------------------------------------------------------------------------- the arithmetic


def test_training_noise_is_the_pooled_sample_deviation():
    m = "task/accuracy"
    groups = [[{m: 0.50}, {m: 0.54}], [{m: 0.70}, {m: 0.72}, {m: 0.74}], [{m: 0.9}], [{m: None}, {m: 0.1}]]
    # group 1: squares 2 * 0.02^2 = 8e-4 (1 df); group 2: 0.02^2 + 0 + 0.02^2 = 8e-4 (2 df); others: no spread
    sigma, dof = training_noise(groups, [m, "other/metric"])[m]
    assert dof == 3 and sigma == pytest.approx(math.sqrt(16e-4 / 3))
    assert "other/metric" not in training_noise(groups, [m, "other/metric"])


def test_differences_are_marked_beyond_two_sigma_and_two_root_two_sigma_between_trained_cells():
    assert beyond_noise(0.021, 0.01, both_trained=False) and not beyond_noise(0.019, 0.01, both_trained=False)
    assert not beyond_noise(0.028, 0.01, both_trained=True) and beyond_noise(-0.029, 0.01, both_trained=True)
    assert beyond_noise(1.0, None, both_trained=True) is None  # no replicate: nothing is called a finding


def test_gains_and_ranking_per_shape():
    m = "task/accuracy"
    noise = {m: (0.01, 1)}
    inits = {"init_a": {"model": "init_a", m: 0.60}}
    cells = [{"model": "x_a", "method": "x", "student": "a", "init_row": "init_a", m: 0.65},
             {"model": "y_a", "method": "y", "student": "a", "init_row": "init_a", m: 0.61},
             {"model": "z_b", "method": "z", "student": "b", "init_row": None, m: 0.70}]
    gains = {g["model"]: g for g in gains_over_init(cells, inits, [m], noise)}
    assert gains["x_a"][m]["gain"] == pytest.approx(0.05) and gains["x_a"][m]["beyond_noise"] is True
    assert gains["y_a"][m]["beyond_noise"] is False and m not in gains["z_b"]  # no init row, no gain
    ranking = versus_best(cells, m, noise)
    assert ranking["x_a"]["difference"] == 0 and ranking["y_a"]["best"] == "x_a"
    assert ranking["y_a"]["difference"] == pytest.approx(-0.04) and ranking["y_a"]["beyond_noise"] is True
    assert ranking["z_b"]["best"] == "z_b"  # each shape ranked on its own
