"""WID (methods/wid.py, structure/compactors.py, recipe wid): compactors fold exactly, the masks grow on schedule,
masked entries decay, and the CLI leaves a narrower plain checkpoint; resume is exact.

Tolerance of the folding tests: 1e-5 absolute on float32 logits (the folded and the hooked network differ only
in the order of float32 sums: (x C^T) W^T against x (W C)^T, and norms over d channels with zeros against
norms over the kept ones).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import make_tiny_causal
from safetensors.torch import load_file
from torch import nn

from tadistill.cli.main import main
from tadistill.config import WIDConfig
from tadistill.errors import ConfigError, ModelError
from tadistill.methods.wid import WID, targets
from tadistill.structure import resolve_layout
from tadistill.structure.compactors import fold_into_copy

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-5


def _bert(ffn: int = 64, family: str = "bert") -> nn.Module:
    """A 3x32 masked LM, 4 heads, no dropout: BERT, RoBERTa (position ids after the padding index) or DistilBERT
    (no token types; its own names for every map)."""
    torch.manual_seed(0)
    if family == "distilbert":
        return tf.DistilBertForMaskedLM(tf.DistilBertConfig(
            vocab_size=97, dim=32, n_layers=3, n_heads=4, hidden_dim=ffn, max_position_embeddings=32, dropout=0.0,
            attention_dropout=0.0)).eval()
    config_class, model_class = {"bert": (tf.BertConfig, tf.BertForMaskedLM),
                                 "roberta": (tf.RobertaConfig, tf.RobertaForMaskedLM)}[family]
    config = config_class(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                          intermediate_size=ffn, max_position_embeddings=40, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)
    return model_class(config).eval()


def _wid(model, **settings) -> WID:
    layout = resolve_layout(model)
    cfg = WIDConfig(**settings)
    return WID(cfg, model, layout, targets(cfg, layout))


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 97, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family, attention", [("bert", "dims"), ("bert", "heads"), ("roberta", "dims"),
                                               ("distilbert", "heads")])
def test_folded_compactors_equal_the_unfolded_network(family, attention):
    model = _bert(family=family)
    with torch.no_grad():
        plain = model(**_inputs()).logits
    wid = _wid(model, hidden_size=16, attention=attention, w_step=1, intervals=2, fade_steps=0)
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs()).logits, plain, rtol=0, atol=ATOL)  # identity compactors
        for weight in wid.compactors.parameters():  # trained compactors: far from the identity
            weight.add_(0.3 * torch.randn_like(weight))
    wid.step_begins(1)  # nothing masked yet
    with torch.no_grad():
        hooked = model(**_inputs()).logits
        folded = fold_into_copy(model, wid.compactors)(**_inputs()).logits
    assert (hooked - plain).abs().max() > 0.1  # the compactors do change the network
    torch.testing.assert_close(folded, hooked, rtol=0, atol=ATOL)

    for step in (2, 3):  # half, then all of the way to the targets; fade 0: masked units are gone at once
        wid.step_begins(step)
    with torch.no_grad():
        masked = model(**_inputs()).logits
        small = wid.final_student(model)
        torch.testing.assert_close(small(**_inputs()).logits, masked, rtol=0, atol=ATOL)
    heads = 4 if attention == "dims" else 2  # 16 wide: 4 heads of 4 dimensions, or 2 whole heads of 8
    shape = resolve_layout(small)
    assert (shape.num_layers, shape.hidden_size, shape.num_heads, shape.ffn_size) == (3, 16, heads, 32)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in small.modules())  # a plain model


def test_the_masks_reach_the_target_widths_at_the_right_steps():
    model = _bert(ffn=128)  # BERT's 4x FFN: FFN units go 4x as fast as hidden channels (the paper's rule)
    wid = _wid(model, hidden_size=8, w_step=3, intervals=4, fade_steps=0)
    kept = []
    for step in range(1, 17):
        wid.step_begins(step)
        row = wid.log_values()
        kept.append((row["wid/hidden"], row["wid/ffn"], row["wid/attention"]))
    # (32 - 8) / 4 = 6 hidden channels and (128 - 32) / 4 = 24 FFN units more at steps 4, 7, 10, 13; per head
    # ceil(k * 6 / 4) of its 8 dimensions (2, 3, 5, 6 after k = 1 .. 4 growths), so 4 x (8 - that) per block.
    expected = {1: (32, 128, 32), 4: (26, 104, 24), 7: (20, 80, 20), 10: (14, 56, 12), 13: (8, 32, 8)}
    current = expected[1]
    for step, row in enumerate(kept, start=1):
        current = expected.get(step, current)
        assert row == current, step
    # Every block keeps the same count; each head the same number of dimensions.
    free = wid.masked_at["attention"] < 0
    assert free.view(3, 4, 8).sum(-1).eq(2).all()
    assert (wid.masked_at["ffn"] < 0).sum(1).eq(32).all()


def test_masked_units_fade_and_their_entries_get_lambda_w():
    model = _bert()
    wid = _wid(model, hidden_size=16, w_step=1, intervals=1, fade_steps=2, decay=20.0)
    wid.step_begins(2)  # everything is masked at step 2, fading over 2 steps
    assert wid.stream.hidden.unique().tolist() == [0.5, 1.0]
    wid.step_begins(3)
    assert wid.stream.hidden.unique().tolist() == [0.0, 1.0]

    for weight in wid.compactors.parameters():
        weight.grad = torch.full_like(weight, 7.0)
    wid.before_update(3)
    site = next(s for s in wid.compactors.sites if s.axis == "ffn" and s.side == "out")  # FFN up map, rows
    weight = wid.compactors.matrix(site)
    masked = wid.masked_at["ffn"][site.block] >= 0
    assert int(masked.sum()) == 32
    torch.testing.assert_close(weight.grad[masked], 20.0 * weight.detach()[masked])
    assert (weight.grad[~masked] == 7.0).all()  # kept rows keep the task gradient
    site = next(s for s in wid.compactors.sites if s.axis == "hidden" and s.side == "in")  # a reader: columns
    weight = wid.compactors.matrix(site)
    masked = wid.masked_at["hidden"] >= 0
    torch.testing.assert_close(weight.grad[:, masked], 20.0 * weight.detach()[:, masked])


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


WID_TINY = ("wid.w_step=1", "wid.intervals=4", "wid.fade_steps=1", "wid.compactor_lr=0.05", "train.steps=7",
            "train.save_every=3")


def test_cli_end_to_end_narrower_checkpoint_and_exact_resume(tiny_args, tmp_path):
    common = ["distill", "wid", *tiny_args(*WID_TINY), "--no-progress"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--out", str(straight)]) == 0
    rows = [r for r in _rows(straight) if "loss" in r]
    assert [r["wid/hidden"] for r in rows] == [32, 26, 20, 14, 8, 8, 8]  # 4x32 teacher -> 8 wide (ratio 0.25)
    # Masked compactor entries decay (gradient lambda W) once their units are masked.
    norms = [r["wid/masked_norm"] for r in rows[1:]]
    assert norms[-1] < norms[1] < 1.0

    student = tf.AutoModelForMaskedLM.from_pretrained(straight / "student")
    assert isinstance(student, tf.BertForMaskedLM)
    assert (student.config.num_hidden_layers, student.config.hidden_size, student.config.num_attention_heads,
            student.config.intermediate_size) == (4, 8, 4, 16)  # teacher's depth; 4 heads of 2 dimensions
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["student_shape"] == "4x8 (4 heads)"
    assert summary["student_parameters"] == sum(p.numel() for p in student.parameters())
    modules = load_file(str(straight / "modules.safetensors"))
    assert any("compactors" in k for k in modules)

    # Resume: the masks (the step each unit was masked at), compactors and their optimizer state come back.
    assert main([*common, "--set", "train.stop_at=3", "--out", str(split)]) == 0
    assert main([*common, "--out", str(split), "--resume"]) == 0
    again = [r for r in _rows(split) if "loss" in r]
    keys = ("loss", "wid/hidden", "wid/attention", "wid/ffn", "wid/masked_norm")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in rows]
    other = load_file(str(split / "student" / "model.safetensors"))
    mine = load_file(str(straight / "student" / "model.safetensors"))
    assert all(torch.equal(mine[k], other[k]) for k in mine)


@pytest.mark.parametrize("sets, message", [
    (["wid.hidden_size=64"], "wid.hidden_size=64 is larger than the student's 32"),
    (["wid.hidden_size=16", "wid.intermediate_size=100"], "wid.intermediate_size=100 is larger than the student's 64"),
    (["wid.hidden_size=10"], "must be a multiple of 4 (e.g. 8), or use wid.attention=heads"),
    (["wid.hidden_size=12", "wid.attention=heads"], "must be a multiple of 8 (e.g. 8), or use wid.attention=dims"),
    (["wid.w_step=500"], "wid masks over wid.intervals x wid.w_step + fade = 8500 steps but train.steps is 2"),
])
def test_bad_input_is_one_line(sets, message, tiny_args, tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["distill", "wid", *tiny_args(*sets), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_causal_students_are_refused(tmp_path):
    model = tf.GPT2LMHeadModel.from_pretrained(make_tiny_causal(tmp_path / "gpt2"))
    from tadistill.capture.architectures import resolve_architecture
    from tadistill.config import DistillConfig
    from tadistill.methods.wid import build
    from tadistill.training.lane import LaneParts

    config = DistillConfig(objectives=[{"kind": "lm"}], wid={"hidden_size": 16})
    with pytest.raises(ConfigError, match="wid supports the encoder families"):
        build(config, LaneParts(model, resolve_architecture(model), []))


def test_the_student_inherits_the_teachers_mlm_head(tiny_teacher, tiny_encoder, tiny_tokenizer):
    """The mlm objective never runs the teacher, so the run loads it without its head: WID copies the head."""
    from tadistill.config import DistillConfig
    from tadistill.loading import load_pretrained
    from tadistill.methods.wid import inherit_head
    from tadistill.students.spec import build_student_from_spec

    config = DistillConfig(teacher=str(tiny_teacher), objectives=[{"kind": "mlm"}],
                           student={"init": "teacher", "num_layers": 4}, wid={})
    body = load_pretrained(str(tiny_teacher), head="base")
    student = build_student_from_spec(config, body, tiny_tokenizer, head="mlm")
    teacher = load_pretrained(str(tiny_teacher), head="mlm")
    dense = "cls.predictions.transform.dense.weight"
    assert not torch.equal(student.state_dict()[dense], teacher.state_dict()[dense])  # random before
    inherit_head(config, student)
    for name, tensor in teacher.state_dict().items():
        torch.testing.assert_close(student.state_dict()[name], tensor, rtol=0, atol=0)
    with pytest.raises(ModelError, match="inherits the teacher's masked-LM head"):
        inherit_head(config.model_copy(update={"teacher": str(tiny_encoder)}), student)
