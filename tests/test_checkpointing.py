"""Activation checkpointing (``student.gradient_checkpointing``, issue 15 item 2) equals the plain run.

Through the real path: ``build_lane`` (student, terms), the capture hooks of ``capture/hooks.py`` and the
lane's Distiller forward, on a tiny BERT and a tiny GPT-2 without dropout, with objectives that read hidden
states, Q/K/V relations (MiniLMv2, captured inside the recomputed blocks) and the chunked logits; then a whole
run through the CLI.
"""

from __future__ import annotations

import json

import pytest
import torch

from tadistill.capture.architectures import get_module
from tadistill.capture.heads import causal_lm_parts
from tadistill.capture.hooks import capture
from tadistill.cli.main import main
from tadistill.config import DistillConfig
from tadistill.loading import load_pretrained, load_tokenizer
from tadistill.training.lane import build_lane
from tadistill.training.loop import TokenizerInfo, make_batch
from tadistill.training.rundir import RunDir
from tadistill.training.terms import ModelOutputs

pytestmark = pytest.mark.usefixtures("one_thread")

OBJECTIVES = {
    "encoder": [{"kind": "minilmv2", "relation_heads": 4}, {"kind": "hidden", "mapping": "uniform"}],
    "causal": [{"kind": "minilmv2", "relation_heads": 4}, {"kind": "logits"}, {"kind": "hidden"}],
}


def _lane_step(folder, kind: str, checkpointing: bool):
    """One forward + backward of a fresh lane; returns (per-term sums, {name: grad}, block forward calls)."""
    head = "mlm" if kind == "encoder" else "causal-lm"
    teacher = load_pretrained(str(folder), head=head).eval().requires_grad_(False)
    tokenizer = load_tokenizer(str(folder))
    config = DistillConfig(teacher=str(folder), objectives=OBJECTIVES[kind],
                           student={"num_layers": 2, "gradient_checkpointing": checkpointing})
    from tadistill.capture.architectures import resolve_architecture

    t_arch = resolve_architecture(teacher)
    lane = build_lane("s", config, RunDir("."), teacher=teacher, teacher_arch=t_arch, tokenizer=tokenizer)
    # transformers checkpoints a block's forward, not its __call__: hooks on the block run once, hooks inside it (the
    # Q/K/V projections, captured for MiniLMv2) run again in the recomputation.
    calls = []
    arch = lane.student_arch
    for block in get_module(lane.student, arch.layers):
        get_module(block, arch.fused_qkv or arch.query).register_forward_hook(lambda *a: calls.append(1))
    # Odd shapes: 3 sequences of different lengths (padding inside the batch).
    sequences = [torch.arange(2, 2 + n) % 40 + 2 for n in (11, 7, 9)]
    batch = make_batch(sequences, TokenizerInfo.of(tokenizer), mask=False, probability=0.15, seed=0,
                       causal=kind == "causal")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with capture(teacher, t_arch, lane.teacher_request) as t_cap, torch.inference_mode():
        if kind == "causal":
            parts = causal_lm_parts(teacher)
            hidden = parts.base(**inputs).last_hidden_state
        else:
            teacher(**inputs)
    t_out = (ModelOutputs(t_cap.clone(), None, hidden.clone(), parts.output_layer) if kind == "causal"
             else ModelOutputs(t_cap.clone()))
    lane.model.train()
    with capture(lane.student, lane.student_arch, lane.request) as s_cap:
        sums = lane.model(inputs, batch, t_out, s_cap)
        stored = {i: id(t) for i, t in s_cap.query.items()}
        sums.sum().backward()
        # The recomputation in backward does not store again (it would keep a block's graph alive).
        assert {i: id(t) for i, t in s_cap.query.items()} == stored
    grads = {n: p.grad.clone() for n, p in lane.distiller.named_parameters() if p.grad is not None}
    return sums.detach(), grads, len(calls)


@pytest.mark.parametrize("kind", ["encoder", "causal"])
def test_checkpointed_lane_equals_the_plain_one(kind, tiny_teacher_no_dropout, tiny_gpt2):
    folder = tiny_teacher_no_dropout if kind == "encoder" else tiny_gpt2
    plain_sums, plain_grads, plain_calls = _lane_step(folder, kind, False)
    ckpt_sums, ckpt_grads, ckpt_calls = _lane_step(folder, kind, True)
    # Checkpointing is really on: the inside of every student block ran again in backward.
    assert plain_calls == 2 and ckpt_calls == 4
    assert (plain_sums > 0).all()
    torch.testing.assert_close(ckpt_sums, plain_sums, rtol=1e-6, atol=1e-7)
    assert plain_grads.keys() == ckpt_grads.keys()
    assert any("query" in n or "c_attn" in n for n in plain_grads)  # the relation term reached the Q/K/V weights
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _losses(out) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_a_checkpointed_run_equals_the_plain_run(tiny_teacher_no_dropout, tiny_args, tmp_path):
    args = tiny_args("train.steps=3", "student.num_layers=2", "objectives.minilmv2.relation_heads=4",
                     teacher=tiny_teacher_no_dropout)
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    assert main(["distill", "minilmv2", *args, "--out", str(plain), "--no-progress"]) == 0
    assert main(["distill", "minilmv2", *args, "--set", "student.gradient_checkpointing=true", "--out", str(ckpt),
                 "--no-progress"]) == 0
    a, b = _losses(plain), _losses(ckpt)
    assert len(a) == 3
    assert b == pytest.approx(a, rel=1e-5)
    from safetensors.torch import load_file

    wa = load_file(str(plain / "student" / "model.safetensors"))
    wb = load_file(str(ckpt / "student" / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6, msg=name)
    # The saved student is a plain checkpoint: loading it does not turn checkpointing on.
    assert not json.loads((ckpt / "student" / "config.json").read_text()).get("gradient_checkpointing", False)
