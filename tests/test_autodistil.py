"""AutoDistil (methods/autodistil.py): relation MSE, the sub-space, the sandwich rule's passes, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel

from tadistill import config as C
from tadistill.capture.architectures import resolve_architecture
from tadistill.cli.main import main
from tadistill.errors import ConfigError
from tadistill.methods.autodistil import SandwichRule, resolve_space, space_subnets
from tadistill.objectives.attention import relation_kl
from tadistill.objectives.relation_mse import relation_mse
from tadistill.resolve import resolve_config
from tadistill.structure import apply_masks, materialize, resolve_layout
from tadistill.structure.subnets import PAPER_SPACES, Subnet, auto_space, kept_blocks, subnet_masks, subnets
from tadistill.training.lane import LaneParts
from tadistill.training.relation_mse_term import RelationMSETerm

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _reference(x_s, x_t, mask, heads, causal=False):
    """Loops over batch and relation heads: softmax rows of x_a x_a^T / sqrt(d_r), squared L2 per valid row."""
    total = 0.0
    b, t, _ = x_s.shape
    for i in range(b):
        valid = mask[i]
        for a in range(heads):
            rel = []
            for x in (x_s, x_t):
                d_r = x.shape[-1] // heads
                xa = x[i, :, a * d_r:(a + 1) * d_r].double()
                z = xa @ xa.T / d_r ** 0.5
                blocked = ~valid[None, :].expand(t, t)
                if causal:
                    blocked = blocked | torch.ones(t, t, dtype=torch.bool).triu(1)
                rel.append(torch.softmax(z.masked_fill(blocked, float("-inf")), -1))
            rows = (rel[0] - rel[1]).pow(2).sum(-1)
            total += float(rows[valid].sum()) / heads
    return total


@pytest.mark.parametrize("causal", [False, True])
def test_relation_mse_matches_a_plain_reference(causal):
    x_s, x_t = _rand(2, 7, 12, seed=1), _rand(2, 7, 18, seed=2)  # odd length, different widths
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    value = relation_mse(x_s, x_t, mask, relation_heads=3, causal=causal)
    assert abs(float(value) - _reference(x_s, x_t, mask, 3, causal)) < 1e-5


def test_relation_mse_properties():
    x = _rand(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    assert float(relation_mse(x, x.clone(), mask, relation_heads=4)) == 0.0  # identical relations
    empty = torch.zeros(2, 6, dtype=torch.bool)
    student = _rand(2, 6, 16, seed=3).requires_grad_()
    zero = relation_mse(student, x, empty, relation_heads=4)
    zero.backward()
    assert float(zero.detach()) == 0.0 and torch.isfinite(student.grad).all()  # an all-padded batch: 0, not NaN
    # Squared error, not KL: it differs from MiniLMv2's relation KL on the same relations, and both are 0 together.
    other = _rand(2, 6, 16, seed=4)
    assert float(relation_mse(other, x, mask, relation_heads=4)) != pytest.approx(
        float(relation_kl(other, x, mask, relation_heads=4)))
    with pytest.raises(ValueError, match="relation_heads=5"):
        relation_mse(other, x, mask, relation_heads=5)


def test_kept_blocks_are_evenly_spaced_and_end_with_the_last():
    assert kept_blocks(3, 6) == [1, 3, 5]  # every other block
    assert kept_blocks(4, 6) == [0, 2, 3, 5]
    assert kept_blocks(6, 6) == list(range(6))
    assert kept_blocks(1, 12) == [11]
    assert all(kept_blocks(k, 12)[-1] == 11 and len(set(kept_blocks(k, 12))) == k for k in range(1, 13))


def _bert(layers=6, hidden=384, heads=12, ffn=1536):
    with torch.device("meta"):
        return BertModel(BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                    intermediate_size=ffn, vocab_size=100))


def test_auto_space_fits_the_builtin_and_the_tiny_teachers():
    layout = resolve_layout(_bert())  # the built-in teacher's shape: 6 x 384, 12 heads of 32, FFN 1536
    found, _ = subnets(auto_space(layout), layout, divisor=12)
    assert len(found) == 36
    assert found[0] == Subnet(3, 192, 6, 384) and found[-1] == Subnet(6, 384, 12, 1536)  # smallest first
    tiny = resolve_layout(_bert(4, 32, 4, 64))
    assert len(subnets(auto_space(tiny), tiny, divisor=4)[0]) == 27


def test_paper_spaces_on_bert_need_derived_heads():
    layout = resolve_layout(_bert(12, 768, 12, 3072))  # BERT-base: heads of 64
    found, reasons = subnets(PAPER_SPACES["paper-small"], layout, divisor=12)
    assert not found and "hidden = heads x 64" in reasons[0]
    cfg = C.AutoDistilConfig(space="paper-small")
    with pytest.raises(ConfigError, match="heads=derived"):
        space_subnets(cfg, layout, 12)
    # Heads derived from the hidden size: 256 and 320 (4 and 5 heads of 64), with 16 relation heads dividing them.
    derived = space_subnets(C.AutoDistilConfig(space="paper-small", heads="derived"), layout, 16)
    assert {(s.hidden, s.heads) for s in derived} == {(256, 4), (320, 5)}
    assert {s.layers for s in derived} == {9, 10, 11, 12} and len(derived) == 4 * 2 * 4
    override = resolve_space(C.AutoDistilConfig(layers=(2, 3, 1)), layout)
    assert override.layers == (2, 3, 1) and override.hidden == auto_space(layout).hidden


def test_autodistil_config_ranges_are_checked():
    with pytest.raises(ValueError, match="autodistil.layers"):
        C.AutoDistilConfig(layers=(4, 2, 1))
    with pytest.raises(ValueError, match="autodistil.ffn_ratio"):
        C.AutoDistilConfig(ffn_ratio=(1.0, 2.0, 0.0))


def _sandwich(teacher: Path, **settings):
    config = resolve_config("autodistil", overrides=["student.num_layers=4", f"teacher={teacher}",
                                                     *[f"autodistil.{k}={v}" for k, v in settings.items()]])
    student = AutoModel.from_pretrained(teacher).eval()
    arch = resolve_architecture(student)
    term = RelationMSETerm(config.objective("relation-mse"), arch, arch)
    return SandwichRule(config, LaneParts(student, arch, [term]), term), student, term


def test_sandwich_passes_are_largest_smallest_and_seeded_draws(tiny_teacher_no_dropout):
    method, student, term = _sandwich(tiny_teacher_no_dropout, random_subnets=3)
    layout = resolve_layout(student)
    seen = []
    for factory in method.passes(step=1, number=5):
        with factory() as subnet:
            seen.append(subnet)
            assert term.widths == subnet.widths(layout)
        assert term.widths is None and method.active is None
    assert seen[0] == Subnet(4, 32, 4, 64) and seen[1] == Subnet(2, 16, 2, 16) and len(seen) == 5
    assert all(s in method.candidates for s in seen[2:])
    again, _, _ = _sandwich(tiny_teacher_no_dropout, random_subnets=3)
    assert [run().__enter__() for run in again.passes(step=9, number=5)][2:] == seen[2:]  # a function of the number
    draws = {tuple(again.passes(1, n)) and tuple(again.drawn) for n in range(6)}
    assert len(draws) > 1  # other numbers draw other sub-networks


def test_a_pass_computes_the_extracted_subnetwork(tiny_teacher_no_dropout):
    method, student, _ = _sandwich(tiny_teacher_no_dropout)
    layout = resolve_layout(student)
    ids = torch.randint(5, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    for subnet in (Subnet(3, 24, 3, 36), method.smallest):
        with torch.no_grad(), method.under(subnet)():
            masked = student(input_ids=ids, attention_mask=mask).last_hidden_state
        small = materialize(student, layout, subnet_masks(subnet, layout))
        assert small.config.num_hidden_layers == subnet.layers and small.config.hidden_size == subnet.hidden
        with torch.no_grad():
            out = small(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(masked[..., :subnet.hidden], out, atol=1e-5)
        assert masked[..., subnet.hidden:].abs().max() == 0


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_a_superlm_and_resumes_exactly(tiny_args, tiny_teacher_no_dropout, tmp_path):
    common = ["distill", "autodistil", *tiny_args("student.num_layers=4", "train.steps=4", "train.save_every=2",
                                                  "train.lr=1e-3", teacher=tiny_teacher_no_dropout), "--no-progress"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--out", str(straight)]) == 0
    rows = [r for r in _rows(straight) if "loss" in r]
    assert [r["autodistil/draws"] for r in rows] == [2, 4, 6, 8] and rows[0]["autodistil/subnets"] == 27
    evals = [r["eval/loss"] for r in _rows(straight) if "eval/loss" in r]
    assert evals[0] == 0.0 and evals[-1] > 0  # the SuperLM starts as the teacher, then moves
    saved = AutoModel.from_pretrained(straight / "student")
    assert saved.config.num_hidden_layers == 4 and saved.config.hidden_size == 32  # the SuperLM itself
    assert main([*common, "--set", "train.stop_at=2", "--out", str(split)]) == 0
    assert main([*common, "--out", str(split), "--resume"]) == 0
    again = [r for r in _rows(split) if "loss" in r]
    keys = ("loss", "autodistil/draws", "autodistil/random_size")
    assert [tuple(r[k] for k in keys) for r in again] == [tuple(r[k] for k in keys) for r in rows]


def _one_line(argv, capsys) -> str:
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("sets, words", [
    (["student.init_layers=uniform", "student.num_layers=2"], "autodistil trains a SuperLM of the teacher's shape (4x32, 4 heads) and the student is 2x32"),
    (["student.num_layers=4", "objectives.relation-mse.relation_heads=5"], "relation_heads=5 must divide"),
    (["student.num_layers=4", "autodistil.hidden=[20,20,4]"], "has no sub-network of this 4x32 SuperLM: 2 blocks, "
                                                               "hidden 20, 2.5 heads: not whole numbers"),
    (["student.num_layers=4", "autodistil.hidden=[16,48,8]"], "autodistil.hidden reaches 48 (auto space or your "
                                                              "range) and the SuperLM has 32 hidden channels"),
    (["student.num_layers=4", "autodistil.space=paper-tiny"], "autodistil.layers reaches 7"),
    (["student.num_layers=4", "autodistil.layers=[3,1,1]"], "autodistil.layers=[3, 1, 1] must be"),
])
def test_bad_input_is_one_line(sets, words, tiny_args, tmp_path, capsys):
    line = _one_line(["distill", "autodistil", *tiny_args(*sets), "--out", str(tmp_path / "run"), "--no-progress"],
                     capsys)
    assert words in line
    assert not (tmp_path / "run").exists()


def test_other_objectives_are_refused(tiny_args, tmp_path, capsys):
    line = _one_line(["distill", "minilmv2", *tiny_args("student.num_layers=4", "objectives.minilmv2.relation_heads=4",
                                                         "autodistil.space=auto"),
                      "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    assert "autodistil trains its sub-networks on the relation-mse objective only" in line
