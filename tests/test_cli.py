"""End to end through the real CLI (main(argv)) on tiny models: run directory, student, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

from tadistill.cli.main import main
from tadistill.registry import RECIPES


def _run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_distill_end_to_end_writes_a_loadable_student(tiny_args, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _run(
        capsys,
        ["distill", "minilmv2", *tiny_args("objectives.minilmv2.relation_heads=4", "train.steps=4",
                                           "train.save_every=2", "train.eval_every=2"),
         "--out", str(out), "--no-progress"],
    )
    assert code == 0, err
    assert "student" in stdout and str(out / "student") in stdout

    # Resolved config, metrics log, TensorBoard events, checkpoints, student, summary.
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["recipe"] == "minilmv2" and cfg["train"]["steps"] == 4
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and "loss/minilmv2" in r and r["tokens_per_s"] > 0 for r in train_rows)
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 2, 4]
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]
    assert (out / "checkpoints" / "step-00000004" / "trainer_state.json").is_file()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["student_parameters"] < summary["teacher_parameters"]
    assert summary["heldout_loss_end"] < summary["heldout_loss_start"]
    # A random student (minilmv2 starts from scratch) is far from the teacher's sentence embeddings (about
    # -0.29 on the tiny teacher), and four steps move it: the cosine is measured on the trained student.
    start, end = summary["embedding_cosine_start"], summary["embedding_cosine_end"]
    assert math.isfinite(start) and math.isfinite(end)
    assert start < 0.5 and end != start

    student = AutoModel.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2  # half the teacher's 4 by default
    tok = AutoTokenizer.from_pretrained(out / "student")
    with torch.no_grad():
        hidden = student(**tok(["a teacher and a student"], return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == 32 and torch.isfinite(hidden).all()


def test_mlm_recipe_student_loads_with_masked_lm_head(tiny_args, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _run(capsys, ["distill", "distilbert", *tiny_args(), "--out", str(out), "--no-progress"])
    assert code == 0, err
    model = AutoModelForMaskedLM.from_pretrained(out / "student")
    assert model.config.num_hidden_layers == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/output-kl", "loss/mlm", "loss/hidden"} <= set(rows[1])
    # distilbert starts from every other teacher block: its sentence embeddings start next to the teacher's
    # (0.9998 on the tiny teacher, against -0.29 for a random student), and two steps keep them there.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["embedding_cosine_start"] > 0.9 and summary["embedding_cosine_end"] > 0.9


def test_config_file_and_overrides(tiny_args, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"recipe": "hs", "objectives": [{"kind": "hidden", "mapping": "uniform+last"}]}))
    out = tmp_path / "run"
    code, _, err = _run(capsys, ["distill", "--config", str(cfg), *tiny_args(), "--out", str(out), "--no-progress"])
    assert code == 0, err
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["objectives"][0]["mapping"] == "uniform+last"


def test_recipes_lists_every_recipe(capsys):
    code, out, _ = _run(capsys, ["recipes"])
    assert code == 0
    assert [line.split()[0] for line in out.strip().splitlines()] == list(RECIPES)


def test_inspect_prints_shape_and_cost(tiny_teacher, capsys):
    code, out, _ = _run(capsys, ["inspect", f"{tiny_teacher}@2x16x2"])
    assert code == 0
    assert "layers" in out and "FLOPs per token" in out
    assert "│ 2 " in out.replace("  ", " ") or " 2 " in out


@pytest.mark.parametrize(
    ("argv_extra", "message"),
    [
        (["distill", "minilmv3"], "unknown recipe 'minilmv3' (did you mean 'minilmv2'?)"),
        (["distill", "hs", "--set", "train.stepz=3"], "unknown config key 'train.stepz' (did you mean 'steps'?)"),
        (["distill", "hs", "--set", "train.steps=0"], "train.steps"),
        (["distill", "hs", "--set", "teacher=/no/such/teacher"], "not found"),
        (["distill", "hs", "--set", "objectives.hidden.mapping=explicit", "--set", "objectives.hidden.layers=[1,9]"],
         "out of range"),
        (["distill", "hs", "--set", "student.hidden_size=30", "--set", "student.num_heads=4"], "not divisible"),
        (["distill", "minilmv2", "--set", "student.hidden_size=24", "--set", "student.num_heads=4"],
         ("relation_heads=48 must divide the student width 24: choose a common divisor of both models' widths "
          "[24, 32], such as 2 or 1: --set objectives.minilmv2.relation_heads=2")),
        (["distill", "hs", "--set", "data.source=/no/such/corpus.txt"], "corpus"),
        (["distill", "minilm", "--set", "student.num_heads=2"], "equal head counts"),
    ],
)
def test_bad_input_is_one_clear_line(argv_extra, message, tiny_encoder, tiny_corpus, tmp_path, capsys):
    argv = [*argv_extra]
    if "teacher=" not in " ".join(argv):
        argv += ["--set", f"teacher={tiny_encoder}"]
    if "data.source" not in " ".join(argv):
        argv += ["--set", f"data.source={tiny_corpus}"]
    argv += ["--set", f"data.cache_dir={tmp_path / 'c'}", "--set", "data.max_length=24", "--out", str(tmp_path / "r"),
             "--no-progress"]
    code, _, err = _run(capsys, argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0]


def test_teacher_without_mlm_head_is_refused_for_od(tiny_args, tiny_encoder, tmp_path, capsys):
    code, _, err = _run(capsys, ["distill", "od", *tiny_args(teacher=tiny_encoder), "--out", str(tmp_path / "r")])
    assert code == 2 and "has no masked-LM head" in err


def test_empty_corpus_is_refused(tiny_args, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = _run(
        capsys, ["distill", "hs", *tiny_args(f"data.source={empty}"), "--out", str(tmp_path / "r")]
    )
    assert code == 2 and "empty" in err


def test_existing_run_is_never_overwritten_silently(tiny_args, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["distill", "hs", *tiny_args(), "--out", str(out), "--no-progress"]
    assert _run(capsys, argv)[0] == 0
    before = (out / "student" / "model.safetensors").read_bytes()

    code, _, err = _run(capsys, argv)  # same run again, no flag
    assert code == 2 and "--resume" in err and "--overwrite" in err
    code, _, err = _run(capsys, [*argv[:-3], "--set", "train.weight_decay=0.5", "--out", str(out), "--resume"])
    assert code == 2 and "config differs" in err and "train.weight_decay" in err
    assert (out / "student" / "model.safetensors").read_bytes() == before

    code, _, err = _run(capsys, [*argv, "--overwrite"])
    assert code == 0, err

    stranger = tmp_path / "not-a-run"
    stranger.mkdir()
    (stranger / "precious.txt").write_text("keep me")
    code, _, err = _run(capsys, [*argv[:-3], "--out", str(stranger), "--overwrite"])
    assert code == 2 and "not a tadistill run" in err
    assert (stranger / "precious.txt").read_text() == "keep me"
