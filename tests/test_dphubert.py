"""DPHuBERT (methods/dphubert.py, recipe dphubert): parameter counts per family, the materialised student against
the gated one, the sparsity target reached, resume, the CLI end to end and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from transformers import AutoModel

from tadistill.cli.main import main
from tadistill.config import DPHuBERTConfig
from tadistill.methods.dphubert import JointPruning, block_cost
from tadistill.objectives.hidden import hidden_l1_cosine
from tadistill.structure import resolve_layout

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama():  # 4 query heads over 2 key/value heads
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
                                              max_position_embeddings=32)).eval()


def _bert():
    torch.manual_seed(0)
    return tf.BertModel(tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=24, max_position_embeddings=32)).eval()


def _gpt2():
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=4, n_positions=32)).eval()


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("make", [_bert, _gpt2, _llama])
def test_block_cost_counts_every_block_parameter(make):
    model = make()
    layout = resolve_layout(model)
    cost = block_cost(model, layout)
    block = sum(p.numel() for p in layout.blocks(model)[0].parameters())
    assert cost.count(layout.num_heads, layout.num_kv_heads, layout.ffn_size) == block
    assert cost.per_ffn > 0 and cost.per_head > 0 and cost.per_kv_head > 0 and cost.fixed > 0


def _decided(method: JointPruning, seed: int = 0) -> None:
    """Random log_alpha, far from 0 (decided gates: P(z != 0) is ~0 or ~1), the first block of each kind kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for kind, gates in method.gates.units.items():
            sign = torch.where(torch.rand(gates.log_alpha.shape, generator=g) < 0.6, 1.0, -1.0)
            gates.log_alpha.copy_(sign * 12.0)
            if kind == "blocks":
                gates.log_alpha[0] = 12.0
            if kind == "heads":  # the second query head of each key/value group goes everywhere
                gates.log_alpha[:, 1::2] = -12.0


@pytest.mark.parametrize("make,heads,blocks", [(_llama, True, True), (_llama, True, False), (_bert, False, True),
                                               (_gpt2, False, True)])
def test_pruned_student_computes_what_the_gated_student_computes(make, heads, blocks):
    model = make()
    method = JointPruning(DPHuBERTConfig(heads=heads, blocks=blocks, target_sparsity=0.3), model, steps=10)
    _decided(method)
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gated = model(input_ids=ids)
        pruned = method.final_student(model)
        dense = pruned(input_ids=ids)
    key = "logits" if hasattr(gated, "logits") else "last_hidden_state"
    torch.testing.assert_close(dense[key], gated[key], rtol=1e-5, atol=1e-5)
    # Smaller, and its block parameters are what the common counts give.
    layout, small = resolve_layout(model), resolve_layout(pruned)
    assert _count(pruned) < _count(model)
    assert small.ffn_size < layout.ffn_size and (small.num_heads < layout.num_heads) == heads
    per_block = block_cost(model, layout).count(small.num_heads, small.num_kv_heads, small.ffn_size)
    assert _count(pruned) == _count(model) - sum(p.numel() for p in layout.blocks(model).parameters()) \
        + small.num_layers * per_block
    # Decided gates: the expected sparsity is the sparsity the deterministic gates keep; the saved model's
    # (common counts) is what its parameters say.
    assert float(method.expected_sparsity().detach()) == pytest.approx(method.kept_sparsity(), abs=1e-3)
    assert method.saved_sparsity() == pytest.approx(1 - small.num_layers * per_block / method.total)
    assert method.saved_sparsity() <= method.kept_sparsity() + 1e-9


def test_training_gates_are_sampled_and_evaluation_gates_fixed():
    model = _llama()
    method = JointPruning(DPHuBERTConfig(heads=True, blocks=True, target_sparsity=0.3, init_drop=0.5), model, steps=10)
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.train()
        torch.manual_seed(0)
        first = model(input_ids=ids).logits
        second = model(input_ids=ids).logits
        torch.manual_seed(0)
        again = model(input_ids=ids).logits
        model.eval()
        fixed = [model(input_ids=ids).logits for _ in range(2)]
    assert not torch.equal(first, second) and torch.equal(first, again)  # drawn from the (lane's) global stream
    assert torch.equal(fixed[0], fixed[1]) and method.masks.heads.dim() == 2
    assert set(method.masks.ffn.unique().tolist()) <= {0.0, 1.0}


def test_l1_cosine_distance():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    assert float(hidden_l1_cosine(t, t, mask)) == pytest.approx(0.0, abs=1e-5)
    assert float(hidden_l1_cosine(s, t, torch.zeros_like(mask))) == 0.0
    valid = mask[..., None].float()
    expected = ((s - t).abs().mean(-1) + 1 - torch.nn.functional.cosine_similarity(s, t, dim=-1))[mask].sum()
    assert float(hidden_l1_cosine(s + 1e3 * (1 - valid), t, mask)) == pytest.approx(float(expected), rel=1e-5)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# Fast convergence on the tiny BERT (FFN units are 49% of its blocks): gates that start undecided (init_drop 0.5),
# high learning rates for gates and multipliers, little momentum, a constant schedule.
FAST = ["dphubert.target_sparsity=0.3", "dphubert.init_drop=0.5", "dphubert.gate_lr=0.2", "dphubert.multiplier_lr=0.5",
        "dphubert.target_warmup_ratio=0.3", "train.schedule=constant", "train.warmup_ratio=0",
        "train.adam_betas=[0.5,0.99]", "train.eval_every=0"]


def test_the_expected_sparsity_reaches_the_target(tiny_args, tiny_teacher_no_dropout, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(*FAST, "train.steps=80", "stages=[]", teacher=tiny_teacher_no_dropout)
    assert main(["distill", "dphubert", *args, "--out", str(out), "--no-progress"]) == 0
    rows = [r for r in _rows(out) if "loss" in r]
    assert rows[-1]["prune/target"] == 0.3
    assert abs(rows[-1]["prune/expected_sparsity"] - 0.3) < 0.01
    assert abs(rows[-1]["prune/kept_sparsity"] - 0.3) < 0.02  # per-block rounding of the kept counts
    assert rows[-1]["prune/lambda_2"] > 0  # ascent: (s - t)^2 >= 0 only ever raises it
    student = AutoModel.from_pretrained(out / "student")
    teacher = json.loads((tiny_teacher_no_dropout / "config.json").read_text())
    assert student.config.intermediate_size < teacher["intermediate_size"]
    assert student.config.num_hidden_layers == teacher["num_hidden_layers"]


def test_a_causal_lm_with_grouped_query_attention_keeps_its_head(tiny_args, tiny_llama, tmp_path):
    """Heads are gated where the config can hold fewer (Llama: explicit head_dim); the result is a *ForCausalLM."""
    out = tmp_path / "llama"
    args = tiny_args(*FAST, "train.steps=40", "stages=[]", teacher=tiny_llama)
    assert main(["distill", "dphubert", *args, "--out", str(out), "--no-progress"]) == 0
    rows = [r for r in _rows(out) if "loss" in r]
    assert rows[-1]["prune/expected_sparsity"] > 0.2
    student = tf.AutoModelForCausalLM.from_pretrained(out / "student")
    teacher = tf.AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert _count(student) < _count(teacher)
    assert student.config.num_key_value_heads <= teacher.config.num_key_value_heads
    assert student.config.num_attention_heads % student.config.num_key_value_heads == 0


def test_two_stages_end_to_end_and_resume(tiny_args, tiny_teacher_no_dropout, tmp_path):
    common = ["distill", "dphubert", *tiny_args(*FAST, "dphubert.blocks=true", "train.steps=6", "train.save_every=3",
                                                teacher=tiny_teacher_no_dropout), "--no-progress"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--out", str(straight)]) == 0
    rows = [r for r in _rows(straight / "stages" / "prune") if "loss" in r]
    assert {"loss/hidden", "loss/sparsity", "prune/expected_sparsity", "prune/kept_blocks"} <= set(rows[0])
    final = [r for r in _rows(straight / "stages" / "distil") if "loss" in r]
    assert final and not any("loss/sparsity" in r for r in final)  # stage 2: no gates, no regulariser
    saved = AutoModel.from_pretrained(straight / "student")
    pruned = AutoModel.from_pretrained(straight / "stages" / "prune" / "student")
    assert saved.config.to_dict()["intermediate_size"] == pruned.config.intermediate_size
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["stages"]["prune"]["student_parameters"] == _count(pruned)

    # Resume in the middle of stage 1: the gates, multipliers and their optimizer state come back exactly.
    assert main([*common, "--set", "train.stop_at=3", "--out", str(split)]) == 0
    assert main([*common, "--out", str(split), "--resume"]) == 0
    again = [r for r in _rows(split / "stages" / "prune") if "loss" in r]
    keys = ("loss", "prune/expected_sparsity", "prune/lambda_1", "prune/lambda_2")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in rows]


@pytest.mark.parametrize("sets,message", [
    (["dphubert.heads=true"], "dphubert.heads: a bert config ties head_dim"),
    (["dphubert.target_sparsity=0.6"], "cannot be reached: gating ffn of this bert removes at most 0.479"),
    (["student.init=random"], "dphubert prunes a copy of the teacher"),
    (["student.num_layers=2"], "student.init_layers=all takes all 4 teacher blocks"),
])
def test_one_line_errors(sets, message, tiny_args, tmp_path, capsys):
    args = tiny_args("stages=[]", *sets)
    assert main(["distill", "dphubert", *args, "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
