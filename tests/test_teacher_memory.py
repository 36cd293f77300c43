"""Teacher memory (issue 15 item 2): the teacher in bf16 / fp16, 8-bit / 4-bit (bitsandbytes), over a device map.

On CPU: a bf16 teacher loads in bf16, its outputs stay within bf16's rounding of the float32 teacher, and runs
train with it (the objectives upcast the teacher's tensors to float32). Quantization needs bitsandbytes and a CUDA
GPU: asking for it without them is a one-line error before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tadistill.cli.main import main
from tadistill.config import DistillConfig
from tadistill.errors import ConfigError
from tadistill.loading import load_pretrained, placed_by_loading, teacher_load_options

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**fields) -> DistillConfig:
    return DistillConfig(objectives=[{"kind": "hidden"}], **fields)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["tiny_teacher", "tiny_gpt2"])
def test_a_bf16_teacher_is_close_to_the_float32_one(family, request):
    folder = request.getfixturevalue(family)
    head = "mlm" if family == "tiny_teacher" else "causal-lm"
    full = load_pretrained(str(folder), head=head).eval()
    half = load_pretrained(str(folder), head=head, **teacher_load_options(_config(teacher_dtype="bfloat16"))).eval()
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert not placed_by_loading(half)  # one device, not quantized: the loop may move it
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.inference_mode():
        a = full(input_ids=ids, output_hidden_states=True)
        b = half(input_ids=ids, output_hidden_states=True)
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert y.dtype == torch.bfloat16
        # bf16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4%); four blocks of rounding stay within 3%
        # of the activations' scale, and a broken cast (wrong weights, float32 read as bf16 bits) is far off.
        scale = x.abs().max()
        assert (x - y.float()).abs().max() <= 0.03 * scale
    assert (a.logits - b.logits.float()).abs().max() <= 0.03 * a.logits.abs().max()


def test_auto_keeps_the_checkpoint_dtype_and_float32_upcasts(tiny_gpt2, tmp_path):
    from transformers import AutoModelForCausalLM

    saved = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_gpt2).to(torch.bfloat16).save_pretrained(saved)
    for name in ("config.json",):
        assert (saved / name).is_file()
    auto = load_pretrained(str(saved), head="causal-lm", **teacher_load_options(_config()))
    up = load_pretrained(str(saved), head="causal-lm", **teacher_load_options(_config(teacher_dtype="float32")))
    assert next(auto.parameters()).dtype == torch.bfloat16
    assert next(up.parameters()).dtype == torch.float32


@pytest.mark.parametrize("recipe", ["kd", "minilmv2", "hs"])
def test_a_run_trains_with_a_bf16_teacher(recipe, tiny_gpt2, tiny_corpus, tmp_path):
    sets = [f"teacher={tiny_gpt2}", f"data.source={tiny_corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_length=24", "data.heldout_fraction=0.2", "train.steps=3", "train.batch_size=4",
            "train.eval_batches=1", "train.log_every=1", "student.num_layers=2", "teacher_dtype=bfloat16",
            "objectives.minilmv2.relation_heads=4" if recipe == "minilmv2" else "train.lr=1e-3"]
    out = tmp_path / recipe
    args = [a for s in sets for a in ("--set", s)]
    assert main(["distill", recipe, *args, "--out", str(out), "--no-progress"]) == 0
    rows = [r for r in _rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["loss"] > 0 for r in rows)
    evals = [r["eval/loss"] for r in _rows(out) if "eval/loss" in r]
    assert evals[-1] < evals[0]  # it learned from the bf16 teacher
    from safetensors.torch import load_file

    # Master weights stay float32 whatever the teacher's dtype.
    assert {v.dtype for v in load_file(str(out / "student" / "model.safetensors")).values()} == {torch.float32}


def test_quantization_without_bitsandbytes_or_gpu_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs bitsandbytes: pip install 'tadistill\[quantization\]'") as info:
        teacher_load_options(_config(teacher_quantization="8bit"))
    assert "\n" not in str(info.value)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="CUDA GPUs only"):
        teacher_load_options(_config(teacher_quantization="4bit"))


def test_quantization_refused_through_the_cli_before_the_run_exists(tiny_gpt2, tiny_corpus, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "q"
    sets = [f"teacher={tiny_gpt2}", f"data.source={tiny_corpus}", "teacher_quantization=8bit", "student.init=random"]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["distill", "kd", *args, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: teacher_quantization=8bit") and "\n" not in err
    assert not out.exists()


def test_a_quantized_teacher_cannot_initialise_the_student():
    with pytest.raises(ValueError, match="no float weights to copy"):
        _config(teacher_quantization="4bit", student={"init": "teacher"})
    assert _config(teacher_quantization="4bit").student.init == "random"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantized_teacher_on_gpu(tiny_gpt2):
    pytest.importorskip("bitsandbytes")
    model = load_pretrained(str(tiny_gpt2), head="causal-lm",
                            **teacher_load_options(_config(teacher_quantization="8bit")))
    assert placed_by_loading(model)


def test_a_device_map_is_passed_to_transformers(tiny_gpt2):
    options = teacher_load_options(_config(teacher_device_map="cpu", teacher_dtype="bfloat16"))
    assert options == {"dtype": torch.bfloat16, "device_map": "cpu"}
    model = load_pretrained(str(tiny_gpt2), head="causal-lm", **options)
    assert {p.device.type for p in model.parameters()} == {"cpu"} and next(model.parameters()).dtype == torch.bfloat16
    assert not placed_by_loading(model)  # one device: the loop may still move it
    model.hf_device_map = {"transformer.h.0": 0, "transformer.h.1": 1}  # as a map over two GPUs reads
    assert placed_by_loading(model)
