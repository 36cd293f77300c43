"""The loop runs only the part of a model its objectives read (training/lane.py ``forward_module``).

In a study of OD beside HS, the teacher has a masked-LM head for the OD lane, which reads its logits on
masked text; the HS lane's clean-text forward must not pay for the (B, T, V) logits, and nothing else
changes: the losses equal those of a run that computes them.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import BertForMaskedLM

import tadistill.training.loop as loop_module
from tadistill.study.compare import expand_cells, load_study, train_cells
from tadistill.training.lane import forward_module

pytestmark = pytest.mark.usefixtures("one_thread")


def test_forward_module_is_the_base_model_unless_logits_are_read(tiny_teacher):
    model = BertForMaskedLM.from_pretrained(tiny_teacher).eval()
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    assert forward_module(model, logits=True) is model
    base = forward_module(model, logits=False)
    assert base is model.bert
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).last_hidden_state,
                           model(input_ids=ids, output_hidden_states=True).hidden_states[-1])
    assert forward_module(model.bert, logits=False) is model.bert  # no head: the model is its own base


def _losses(cell_dir):
    return [r["loss"] for r in map(json.loads, (cell_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _train(tmp_path, name, teacher, corpus):
    study = {
        "name": name, "teacher": str(teacher),
        "data": {"source": str(corpus), "max_length": 24, "heldout_fraction": 0.3, "cache_dir": str(tmp_path / "c")},
        "train": {"steps": 3, "batch_size": 4, "eval_every": 0, "save_every": 0, "eval_batches": 1, "log_every": 1},
        "methods": [{"name": "od", "recipe": "od"}, {"name": "hs", "recipe": "hs"}],
        "students": ["2x32"],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    cells = expand_cells(load_study(path))
    out = tmp_path / name
    out.mkdir()
    train_cells(cells, out, progress=False)
    return {cell.name: _losses(out / "cells" / cell.name) for cell in cells}


def test_the_clean_text_forward_skips_the_head_only_masked_lanes_read(tmp_path, tiny_teacher_no_dropout, tiny_corpus,
                                                                    monkeypatch):
    heads = []
    original = BertForMaskedLM.forward

    def counted(self, *args, **kwargs):
        heads.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BertForMaskedLM, "forward", counted)
    skipped = _train(tmp_path, "skipped", tiny_teacher_no_dropout, tiny_corpus)
    calls = len(heads)
    monkeypatch.setattr(loop_module, "forward_module", lambda model, logits: model)  # every forward whole
    whole = _train(tmp_path, "whole", tiny_teacher_no_dropout, tiny_corpus)
    # Two input variants per micro-batch (masked for OD, clean for HS): the head ran for one of them only.
    assert len(heads) - calls > calls > 0
    assert skipped.keys() == whole.keys()
    for name in skipped:
        assert skipped[name] == pytest.approx(whole[name], rel=1e-6, abs=1e-7), name
