"""Training-loop behaviour: exact resume, token normalization under accumulation, NaN stop, assistant."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from tadistill.cli.main import main


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run):
    return {r["step"]: r["loss"] for r in _metrics(run) if "loss" in r}


def _weights(run):
    return load_file(str(run / "student" / "model.safetensors"))


def test_resume_continues_exactly(tiny_args, tmp_path):
    # Dropout is on (the tiny teacher's 0.1) so the RNG state must be restored too.
    common = ["distill", "hs", *tiny_args("train.steps=6", "train.save_every=3", "train.eval_every=3"), "--no-progress"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--out", str(straight)]) == 0

    assert main([*common, "--set", "train.stop_at=3", "--out", str(split)]) == 0
    assert not (split / "student").exists() and (split / "checkpoints" / "step-00000003").is_dir()
    assert sorted(_losses(split)) == [1, 2, 3]
    # A run killed after step 4 was logged but before its checkpoint: the log is rolled back on resume.
    with (split / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    assert main([*common, "--out", str(split), "--resume"]) == 0

    a, b = _losses(straight), _losses(split)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert a[step] == b[step], (step, a[step], b[step])
    evals_a = [r for r in _metrics(straight) if "eval/loss" in r]
    evals_b = [r for r in _metrics(split) if "eval/loss" in r]
    assert evals_a == evals_b
    wa, wb = _weights(straight), _weights(split)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_accumulation_equals_one_large_batch(tiny_args, tiny_teacher_no_dropout, tmp_path):
    # Unpacked sequences of different lengths: a per-micro-batch mean would weigh tokens unequally;
    # summing and dividing once by the step's token count gives exactly the large-batch loss.
    base = ["distill", "hs", *tiny_args("data.packing=false", "train.steps=2", "train.lr=1e-3",
                                        teacher=tiny_teacher_no_dropout), "--no-progress"]
    big, small = tmp_path / "big", tmp_path / "accum"
    assert main([*base, "--set", "train.batch_size=8", "--out", str(big)]) == 0
    assert main([*base, "--set", "train.batch_size=4", "--set", "train.grad_accum=2", "--out", str(small)]) == 0
    la, lb = _losses(big), _losses(small)
    for step in (1, 2):
        assert abs(la[step] - lb[step]) < 1e-5 * max(1.0, abs(la[step])), (step, la[step], lb[step])
    wa, wb = _weights(big), _weights(small)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_args, tmp_path, monkeypatch, capsys):
    import tadistill.training.terms as terms

    calls = {"n": 0}  # one call per forward: the evaluation at step 0, then one per step
    real = terms.hidden_mse

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] > 3 else value  # eval at 0, steps 1-2, then NaN

    monkeypatch.setattr(terms, "hidden_mse", poisoned)
    out = tmp_path / "run"
    argv = ["distill", "hs", *tiny_args("objectives.hidden.mapping=last", "train.steps=5", "train.save_every=2",
                                        "train.eval_every=0"), "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss is nan at step" in err[0] and "step-00000002" in err[0]
    assert (out / "checkpoints" / "step-00000002").is_dir()
    assert not (out / "student").exists()

    # The usual remedy: resume from the last good checkpoint with a lower learning rate. The step count
    # continues; the new peak rate applies from there.
    monkeypatch.setattr(terms, "hidden_mse", real)
    assert main([*argv[:-3], "--set", "train.lr=1e-5", "--out", str(out), "--no-progress", "--resume"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"lr"' in x]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2]["lr"] < 1e-5 < rows[0]["lr"]  # linear decay from the new peak, at the step reached


def test_minilm_teacher_assistant_chain(tiny_args, tmp_path):
    out = tmp_path / "ta"
    argv = ["distill", "minilm", *tiny_args("student.hidden_size=16", "assistant.enabled=true"),
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    # A two-stage run: stages/assistant (teacher -> assistant), stages/student (assistant -> fresh student).
    assistant = json.loads((out / "stages" / "assistant" / "student" / "config.json").read_text())
    student = json.loads((out / "student" / "config.json").read_text())
    assert (assistant["num_hidden_layers"], assistant["hidden_size"]) == (4, 16)  # teacher depth, student width
    assert (student["num_hidden_layers"], student["hidden_size"]) == (2, 16)
    assert student == json.loads((out / "stages" / "student" / "student" / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"].endswith("stages/assistant/student")
    assert list(summary["stages"]) == ["assistant", "student"]


def test_compile_gives_the_eager_run(tiny_args, tiny_teacher_no_dropout, tmp_path):
    """train.compile=true: the same losses and weights as eager (to float tolerance), plain checkpoint names."""
    from transformers import AutoModel

    base = ["distill", "minilmv2", *tiny_args("train.steps=2", "train.eval_every=0", "objectives.minilmv2.relation_heads=4",
                                              teacher=tiny_teacher_no_dropout), "--no-progress"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert main([*base, "--out", str(eager)]) == 0
    assert main([*base, "--set", "train.compile=true", "--out", str(compiled)]) == 0
    la, lb = _losses(eager), _losses(compiled)
    assert sorted(la) == sorted(lb) == [1, 2]
    for step in la:
        assert abs(la[step] - lb[step]) < 1e-4 * max(1.0, abs(la[step])), (step, la[step], lb[step])
    wa, wb = _weights(eager), _weights(compiled)
    assert wa.keys() == wb.keys()  # nn.Module.compile keeps the parameter names: no "_orig_mod." prefix
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    AutoModel.from_pretrained(compiled / "student")


def test_compile_refuses_on_policy_sampling():
    import pytest

    from tadistill.config import DistillConfig

    with pytest.raises(ValueError, match="train.compile does not cover on-policy sampling"):
        DistillConfig.model_validate({"objectives": [{"kind": "logits"}], "train": {"compile": True},
                                      "on_policy": {"fraction": 0.5}, "data": {"prompt_tokens": 8}})
