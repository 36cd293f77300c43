"""Offline teacher signals: a run from stored teacher outputs equals the run with the live teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tadistill.cli.main import main
from tadistill.training.teacher_cache import topk_pseudo_logits

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _run_both(recipe: str, args: list[str], tmp_path: Path) -> tuple[list[dict], list[dict]]:
    signals = tmp_path / "signals"
    assert main(["cache-teacher", recipe, *args, "--out", str(signals), "--no-progress"]) == 0
    live, cached = tmp_path / "live", tmp_path / "cached"
    assert main(["distill", recipe, *args, "--out", str(live), "--no-progress"]) == 0
    assert main(["distill", recipe, *args, "--set", f"teacher_signals={signals}", "--out", str(cached),
                 "--no-progress"]) == 0
    return _rows(live), _rows(cached)


def _assert_close(live: list[dict], cached: list[dict], rtol: float) -> None:
    keys = [k for k in live[-1] if k.startswith(("loss", "eval/"))]
    assert len(live) == len(cached) and keys
    for a, b in zip(live, cached):
        for k in a:
            if k.startswith(("loss", "eval/")):
                assert b[k] == pytest.approx(a[k], rel=rtol, abs=1e-7), k


def test_hidden_and_relations_from_stored_signals_equal_the_live_teacher(tiny_args, tiny_teacher_no_dropout,
                                                                          tmp_path):
    args = tiny_args("train.steps=3", "objectives.minilmv2.relation_heads=4", teacher=tiny_teacher_no_dropout)
    args += ["--set", "objectives=[{kind: minilmv2, relation_heads: 4}, {kind: hidden, mapping: uniform}]"]
    live, cached = _run_both("minilmv2", args, tmp_path)
    _assert_close(live, cached, rtol=2e-3)  # float16 storage


def test_topk_logits_from_stored_signals_equal_the_live_teacher(tiny_gpt2, tiny_corpus, tmp_path, capsys):
    sets = [f"teacher={tiny_gpt2}", f"data.source={tiny_corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_length=24", "data.heldout_fraction=0.2", "train.steps=3", "train.batch_size=4",
            "train.eval_batches=1", "train.log_every=1", "student.num_layers=2",
            "objectives.logits.teacher_topk=5", "objectives.logits.divergence=jsd"]
    args = [a for s in sets for a in ("--set", s)]
    live, cached = _run_both("kd", args, tmp_path)
    assert "bytes/token" in capsys.readouterr().out
    _assert_close(live, cached, rtol=5e-3)


def test_mismatched_or_unsupported_signals_are_refused(tiny_gpt2, tiny_corpus, tmp_path, capsys):
    sets = [f"teacher={tiny_gpt2}", f"data.source={tiny_corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_length=24", "train.steps=2", "train.batch_size=4", "student.num_layers=2",
            "objectives.logits.teacher_topk=5"]
    args = [a for s in sets for a in ("--set", s)]
    signals = tmp_path / "signals"
    assert main(["cache-teacher", "kd", *args, "--out", str(signals), "--no-progress"]) == 0
    other = ["--set", "data.max_length=20", "--set", f"teacher_signals={signals}"]
    assert main(["distill", "kd", *args, *other, "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "another data" in capsys.readouterr().err
    no_topk = ["--set", "objectives.logits.teacher_topk=null", "--set", f"teacher_signals={signals}"]
    assert main(["distill", "kd", *args, *no_topk, "--out", str(tmp_path / "b"), "--no-progress"]) == 2
    assert "teacher_topk" in capsys.readouterr().err


def test_pseudo_logits_rebuild_the_stored_buckets():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    log_p = logits.log_softmax(-1)
    top = log_p.topk(4, dim=-1)
    rest = torch.logsumexp(log_p.scatter(-1, top.indices, float("-inf")), -1, keepdim=True)
    packed = torch.cat([top.values, rest, top.indices.float()], dim=-1)
    pseudo = topk_pseudo_logits(packed, 4, 50).log_softmax(-1)
    assert torch.equal(pseudo.topk(4, dim=-1).indices, top.indices)
    torch.testing.assert_close(pseudo.gather(-1, top.indices), top.values)
    outside = torch.logsumexp(pseudo.scatter(-1, top.indices, float("-inf")), -1, keepdim=True)
    torch.testing.assert_close(outside, rest)


def test_caching_runs_the_teacher_only_up_to_the_block_read(tiny_args, tiny_teacher_no_dropout, tmp_path, monkeypatch):
    from transformers.models.bert.modeling_bert import BertLayer

    ran: set[int] = set()
    original = BertLayer.forward

    def counted(self, *args, **kwargs):
        ran.add(id(self))
        return original(self, *args, **kwargs)

    args = tiny_args("train.steps=2", "objectives.minilmv2.relation_heads=4", "objectives.minilmv2.teacher_layer=2",
                     teacher=tiny_teacher_no_dropout)
    monkeypatch.setattr(BertLayer, "forward", counted)
    assert main(["cache-teacher", "minilmv2", *args, "--out", str(tmp_path / "signals"), "--no-progress"]) == 0
    assert len(ran) == 2  # blocks 1 and 2 of 4: the relations come from block 2
    monkeypatch.setattr(BertLayer, "forward", original)
    live, cached = _run_both("minilmv2", args, tmp_path / "both")
    _assert_close(live, cached, rtol=2e-3)
