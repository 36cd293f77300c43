"""Minitron (structure/activations.py, training/prune.py, recipe minitron): importance from activations, a prune
stage into the student's shape, then distillation; end to end through the CLI on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import _write_tokenizer, make_tiny_causal
from safetensors.torch import load_file

from tadistill.cli.main import main
from tadistill.measure.parameters import count_parameters
from tadistill.structure.activations import activation_scores
from tadistill.structure import Kept, TargetShape, resolve_layout, select_units

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama():  # 4 query heads over 2 key/value heads
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
                                              max_position_embeddings=32)).eval()


def _batches(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (sum(sizes), 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # padding is not a token
    start = 0
    for size in sizes:
        yield {"input_ids": ids[start:start + size], "attention_mask": mask[start:start + size]}
        start += size


def test_dead_units_score_zero_and_are_pruned_first():
    model = _llama()
    layers = model.model.layers
    with torch.no_grad():
        layers[0].self_attn.v_proj.weight[4:8] = 0  # key/value head 1 (head_dim 4): query heads 2 and 3 output nothing
        layers[1].mlp.up_proj.weight[5] = 0  # FFN unit 5 of block 1: silu(gate) * 0
        layers[2].self_attn.o_proj.weight.zero_()  # block 2 writes nothing: its output is its input
        layers[2].mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 3] = 0  # hidden channel 3 is zero everywhere ...
        for norm in [model.model.norm, *(n for layer in layers for n in (layer.input_layernorm,
                                                                          layer.post_attention_layernorm))]:
            norm.weight[3] = 0  # ... including every norm's output
    layout = resolve_layout(model)
    scores = activation_scores(model, layout, _batches([3, 3]))
    assert torch.equal(scores.heads[0, 2:], torch.zeros(2)) and (scores.heads[0, :2] > 0).all()
    assert scores.ffn[1, 5] == 0 and (scores.ffn[1].count_nonzero() == 23)
    assert scores.blocks[2] == pytest.approx(0.0, abs=1e-6) and (scores.blocks[:2] > 1e-3).all()
    assert scores.hidden[3] == 0 and scores.hidden.count_nonzero() == 15
    kept = Kept.of(select_units(scores, layout, TargetShape(2, 15, 2, 1, 23)), layout)
    assert kept.blocks == [0, 1] and kept.heads[0] == [0, 1] and 5 not in kept.ffn[1] and 3 not in kept.hidden


def test_streaming_batches_equals_one_batch():
    """Only per-unit sums are kept between batches: splitting the calibration set changes nothing."""
    model = _llama()
    layout = resolve_layout(model)
    whole = activation_scores(model, layout, _batches([6]))
    streamed = activation_scores(model, layout, _batches([2, 1, 3]))
    for name in ("heads", "ffn", "hidden", "blocks"):
        torch.testing.assert_close(getattr(streamed, name), getattr(whole, name), rtol=1e-5, atol=1e-7)
    model.train()  # scoring runs in eval mode (no dropout) and gives the model back in its own mode
    activation_scores(model, layout, _batches([2]))
    assert model.training


@pytest.fixture
def causal_args(tiny_corpus, tmp_path):
    def build(teacher: Path, *extra: str) -> list[str]:
        sets = [f"teacher={teacher}", f"data.source={tiny_corpus}", f"data.cache_dir={tmp_path / 'cache'}",
                "data.max_length=24", "data.heldout_fraction=0.2", "train.steps=2", "train.batch_size=4",
                "train.eval_batches=2", "train.log_every=1", "train.save_every=1", *extra]
        return [a for s in sets for a in ("--set", s)]
    return build


def _evals(metrics: Path) -> list[float]:
    return [json.loads(x)["eval/loss"] for x in metrics.read_text().splitlines() if "eval/loss" in x]


GPT2_SHAPE = ("student.num_layers=2", "student.hidden_size=24", "student.num_heads=3")


def test_minitron_through_the_cli_prunes_then_distils(tiny_gpt2, causal_args, tmp_path):
    out = tmp_path / "minitron"
    assert main(["distill", "minitron", *causal_args(tiny_gpt2, *GPT2_SHAPE), "--out", str(out), "--no-progress"]) == 0
    prune, distil = out / "stages" / "prune", out / "stages" / "distil"
    # The result is a plain checkpoint of the smaller config; AutoModel and the causal-LM class load it.
    student = tf.AutoModelForCausalLM.from_pretrained(out / "student")
    assert (student.config.n_layer, student.config.n_embd, student.config.n_head, student.config.n_inner) == \
        (2, 24, 3, 96)  # the FFN keeps the teacher's ratio (4 x 24)
    assert tf.AutoModel.from_pretrained(out / "student").config.n_embd == 24
    summary = json.loads((out / "summary.json").read_text())
    pruned = summary["stages"]["prune"]
    assert pruned["student_parameters"] == count_parameters(tf.AutoModelForCausalLM.from_pretrained(prune / "student"))
    assert pruned["student_parameters"] < pruned["teacher_parameters"] == summary["teacher_parameters"]
    assert 0 < pruned["student_flops_per_token"] < pruned["teacher_flops_per_token"]
    assert len(pruned["kept_blocks"]) == 2 and all(len(h) == 3 for h in pruned["kept_heads"])
    assert set(load_file(str(prune / "importance.safetensors"))) == {"heads", "ffn", "hidden", "blocks"}
    # The distillation stage started from the pruned student (not from block selection) and trained it.
    assert f"pretrained: {prune / 'student'}" in (distil / "config.yaml").read_text()
    assert summary["steps"] == 2 and summary["student_parameters"] == pruned["student_parameters"]

    # Block selection at the same shape (every-other and uniform blocks, leading channels, leftmost heads)
    # starts further from the teacher: a higher held-out distillation loss at step 0.
    start = _evals(distil / "metrics.jsonl")[0]
    for layers in ("every-other", "uniform"):
        run = tmp_path / f"kd-{layers}"
        args = causal_args(tiny_gpt2, *GPT2_SHAPE, f"student.init_layers={layers}")
        assert main(["distill", "kd", *args, "--out", str(run), "--no-progress"]) == 0
        assert json.loads((run / "summary.json").read_text())["student_parameters"] == pruned["student_parameters"]
        assert start < _evals(run / "metrics.jsonl")[0], layers


def test_resume_inside_the_distillation_stage_is_exact(tiny_gpt2, causal_args, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = causal_args(tiny_gpt2, *GPT2_SHAPE, "train.steps=3")
    assert main(["distill", "minitron", *args, "--out", str(straight), "--no-progress"]) == 0
    assert main(["distill", "minitron", *args, "--set", "train.stop_at=1", "--out", str(split), "--no-progress"]) == 0
    assert (split / "stages" / "prune" / "summary.json").is_file() and not (split / "student").exists()
    assert main(["distill", "minitron", *args, "--out", str(split), "--resume", "--no-progress"]) == 0
    a, b = (load_file(str(run / "student" / "model.safetensors")) for run in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_llama_with_grouped_query_attention(tiny_llama, causal_args, tmp_path):
    """Query heads are pruned by whole key/value groups; the head width stays 8 while the hidden size is 20,
    a shape block selection cannot build (it would need heads of width 10)."""
    out = tmp_path / "llama"
    shape = ("student.num_layers=2", "student.hidden_size=20", "student.num_heads=2", "train.steps=1")
    assert main(["distill", "minitron", *causal_args(tiny_llama, *shape), "--out", str(out), "--no-progress"]) == 0
    config = tf.AutoModelForCausalLM.from_pretrained(out / "student").config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.intermediate_size) == (2, 20, 2, 1, 8, 40)
    kept = json.loads((out / "stages" / "prune" / "summary.json").read_text())["kept_heads"]
    assert all(h in ([0, 1], [2, 3]) for h in kept)  # one whole group per block


def test_a_prune_stage_in_front_of_an_encoder_recipe(tiny_args, tmp_path):
    out = tmp_path / "encoder"
    args = tiny_args("student.num_layers=2", "student.hidden_size=24", "student.num_heads=3", "stages.1.recipe=hs")
    assert main(["distill", "minitron", *args, "--out", str(out), "--no-progress"]) == 0
    pruned = tf.AutoModelForMaskedLM.from_pretrained(out / "stages" / "prune" / "student")  # keeps the MLM head
    assert (pruned.config.num_hidden_layers, pruned.config.hidden_size, pruned.config.intermediate_size) == (2, 24, 48)
    assert tf.AutoModel.from_pretrained(out / "student").config.hidden_size == 24
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"] == "hs" and summary["heldout_loss_end"] is not None


def _electra(folder: Path) -> Path:
    tok = _write_tokenizer(folder)
    tf.ElectraForMaskedLM(tf.ElectraConfig(vocab_size=len(tok), embedding_size=16, hidden_size=32,
                                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                           max_position_embeddings=64)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("teacher, sets, message", [
    ("gpt2", ["student.num_layers=9"], "num_layers=9 is larger than the teacher's 4"),
    ("gpt2", ["student.intermediate_size=4096"], "intermediate_size=4096 is larger than the teacher's 128"),
    ("gpt2", ["student.hidden_size=24"], "set student.num_heads=3 and student.hidden_size=24"),
    ("llama", ["student.num_heads=3"], "not a multiple of the teacher's 2 query heads per key/value head"),
    ("llama", ["student.num_heads=4", "prune.num_kv_heads=1"], "4 query heads per key/value head is more"),
    ("electra", [], "does not support model family 'electra'"),
    ("gpt2", ["stages.0.carry_modules=true"], "prunes its teacher into the student's shape"),
])
def test_bad_input_is_one_line_before_anything_is_written(teacher, sets, message, causal_args, tmp_path, capsys):
    folder = tmp_path / teacher
    path = _electra(folder) if teacher == "electra" else make_tiny_causal(folder, family=teacher)
    out = tmp_path / "bad"
    assert main(["distill", "minitron", *causal_args(path, *sets), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
