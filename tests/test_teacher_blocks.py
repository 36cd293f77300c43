"""The teacher runs only up to the deepest block an objective reads (training/setup.py blocks_read_only)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from safetensors.torch import load_file

import tadistill.training.setup as setup
from tadistill.capture.architectures import get_module
from tadistill.cli.main import main

ORIGINAL_LOAD, ORIGINAL_CUT = setup.load_teacher, setup.blocks_read_only


def _run(argv, out, monkeypatch, *, cut: bool) -> list[int]:
    """Run the CLI; return how many teacher blocks ran per teacher forward during training."""
    calls: list[int] = []

    def spy(configs):
        tokenizer, teacher, arch = ORIGINAL_LOAD(configs)
        for i, block in enumerate(get_module(teacher, arch.layers)):
            block.register_forward_hook(lambda *a, i=i: calls.append(i))
        return tokenizer, teacher, arch

    monkeypatch.setattr(setup, "load_teacher", spy)
    monkeypatch.setattr(setup, "blocks_read_only",
                        ORIGINAL_CUT if cut else (lambda teacher, arch, lanes: contextlib.nullcontext(arch)))
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    return calls


def _same_run(a, b):
    rows_a = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows_a]
    assert strip == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows_b]
    wa, wb = load_file(str(a / "student" / "model.safetensors")), load_file(str(b / "student" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_encoder_minilmv2_from_a_middle_block_equals_the_full_teacher(tiny_args, tmp_path, monkeypatch):
    argv = ["distill", "minilmv2", *tiny_args("objectives.minilmv2.teacher_layer=2", "objectives.minilmv2.relation_heads=4",
                                              "data.packing=false", "train.steps=3")]
    full = _run(argv, tmp_path / "full", monkeypatch, cut=False)
    cut = _run(argv, tmp_path / "cut", monkeypatch, cut=True)
    _same_run(tmp_path / "full", tmp_path / "cut")
    # The same teacher forwards; blocks 3-4 (0-based 2, 3) ran only outside training (the cosines before and
    # after, where the whole teacher is back), blocks 1-2 every time.
    assert cut.count(0) == full.count(0) and cut.count(1) == full.count(1)
    assert 0 < cut.count(2) == cut.count(3) < full.count(3)


def test_decoder_hidden_mapping_below_the_top_equals_the_full_teacher(tiny_llama, tiny_corpus, tmp_path, monkeypatch):
    sets = [f"teacher={tiny_llama}", f"data.source={tiny_corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_length=24", "data.heldout_fraction=0.2", "data.packing=false", "train.steps=3",
            "train.batch_size=4", "train.eval_batches=1", "student.num_layers=2", "objectives.hidden.mapping=explicit",
            "objectives.hidden.layers=[1, 2]"]
    argv = ["distill", "hs", *[a for s in sets for a in ("--set", s)]]
    full = _run(argv, tmp_path / "full", monkeypatch, cut=False)
    cut = _run(argv, tmp_path / "cut", monkeypatch, cut=True)
    _same_run(tmp_path / "full", tmp_path / "cut")
    # Causal students report no cosine: the teacher's top two blocks never run at all.
    assert max(full) == 3 and max(cut) == 1 and cut.count(0) == full.count(0)


@pytest.mark.parametrize("recipe, sets", [("minilmv2", []), ("od", [])])
def test_teacher_outputs_or_the_last_block_keep_the_whole_teacher(recipe, sets, tiny_args, tmp_path, monkeypatch):
    argv = ["distill", recipe, *tiny_args("objectives.minilmv2.relation_heads=4" if recipe == "minilmv2"
                                          else "train.steps=1", *sets)]
    calls = _run(argv, tmp_path / recipe, monkeypatch, cut=True)
    assert max(calls) == 3 and calls.count(3) == calls.count(0)
