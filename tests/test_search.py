"""tadistill search (search.py): budgets, ranking, extraction of an AutoDistil SuperLM's sub-network, --distil."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel

from tadistill.cli.main import main
from tadistill.evaluation.cost import flops_per_token
from tadistill.search import Budget, Searcher, parse_count
from tadistill.errors import ConfigError
from tadistill.structure import apply_masks, resolve_layout
from tadistill.structure.subnets import Subnet, kept_blocks, subnet_masks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def superlm_run(tiny_teacher_no_dropout, tiny_corpus, tmp_path_factory) -> Path:
    """A 4-step AutoDistil run on the tiny BERT (its SuperLM: 4 x 32, 4 heads, FFN 64; 27 sub-networks)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("autodistil") / "run"
    sets = [f"teacher={tiny_teacher_no_dropout}", f"data.source={tiny_corpus}",
            f"data.cache_dir={out.parent / 'cache'}", "data.max_length=24", "data.heldout_fraction=0.2",
            "train.steps=4", "train.batch_size=4", "train.eval_batches=1", "train.lr=1e-3", "student.num_layers=4"]
    assert main(["distill", "autodistil", *[a for s in sets for a in ("--set", s)], "--out", str(out),
                 "--no-progress"]) == 0
    torch.set_num_threads(before)
    return out


def _search(run: Path, *args: str) -> int:
    return main(["search", str(run), *args, "--latency-repeats", "2", "--no-progress"])


def test_flops_budget_is_met_and_the_checkpoint_is_the_subnetwork(superlm_run, tiny_teacher_no_dropout):
    assert _search(superlm_run, "--flops", "0.5", "--name", "half", "--top", "3") == 0
    folder = superlm_run / "search" / "half"
    report = json.loads((folder / "search.json").read_text())
    chosen = report["chosen"]
    # The constraint, recomputed from the saved checkpoint's own config against the teacher's.
    teacher_flops = flops_per_token(AutoConfig.from_pretrained(tiny_teacher_no_dropout), seq_len=24)
    saved = AutoModel.from_pretrained(folder)
    assert flops_per_token(saved.config, seq_len=24) / teacher_flops <= 0.5
    assert (saved.config.num_hidden_layers, saved.config.hidden_size, saved.config.num_attention_heads,
            saved.config.intermediate_size) == (chosen["layers"], chosen["hidden"], chosen["heads"], chosen["ffn"])
    assert sum(p.numel() for p in saved.parameters()) == chosen["params"]
    # Ranked by held-out loss, best first; every scored one within the budget; the top 3 timed against the teacher.
    ranked = report["ranked"]
    assert [r["loss"] for r in ranked] == sorted(r["loss"] for r in ranked)
    assert all(r["flops_ratio"] <= 0.5 for r in ranked) and report["left_out"]["flops"] > 0
    assert all(r["speedup"] > 0 for r in ranked[:3]) and ranked[0]["name"] == chosen["name"]
    assert all(r["loss_at_init"] is not None for r in ranked[:3]) and ranked[3]["loss_at_init"] is None

    # The extracted checkpoint computes what the masked SuperLM computes.
    superlm = AutoModel.from_pretrained(superlm_run / "student").eval()
    subnet = Subnet(chosen["layers"], chosen["hidden"], chosen["heads"], chosen["ffn"])
    layout = resolve_layout(superlm)
    ids = torch.randint(5, 40, (2, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with apply_masks(superlm, layout, subnet_masks(subnet, layout)):
            masked = superlm(input_ids=ids, attention_mask=mask).last_hidden_state[..., :subnet.hidden]
        out = saved.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(masked, out, atol=1e-5)
    assert report["heldout_sequences"] > 0 and len(kept_blocks(subnet.layers, 4)) == subnet.layers


def test_the_teachers_own_shape_scores_zero_at_init(superlm_run):
    """At init the SuperLM is the teacher: its largest sub-network is the teacher, at loss 0 (same batches)."""
    searcher = Searcher(superlm_run, progress=False)
    largest, smallest = (searcher.cost(s) for s in (Subnet(4, 32, 4, 64), Subnet(2, 16, 2, 16)))
    searcher.losses([largest, smallest], at_init=True)
    searcher.losses([largest, smallest])
    assert largest.loss_at_init == 0.0 and smallest.loss_at_init > 0 and largest.loss > 0  # trained: moved
    assert searcher.starts_as_teacher and len(searcher.subnets) == 27


def test_params_and_latency_budgets(superlm_run):
    assert _search(superlm_run, "--params", "25k", "--name", "small", "--top", "2") == 0
    report = json.loads((superlm_run / "search" / "small" / "search.json").read_text())
    assert report["chosen"]["params"] <= 25_000 and report["budget"]["params"] == 25_000
    # A latency budget: every candidate (here: of those under 20k parameters) is timed, and each kept one within it.
    assert _search(superlm_run, "--latency-ms", "1000", "--params", "20k", "--name", "fast", "--batches", "1") == 0
    fast = json.loads((superlm_run / "search" / "fast" / "search.json").read_text())
    assert all(r["latency_ms"] is not None and r["latency_ms"] <= 1000 for r in fast["ranked"])
    assert fast["heldout_sequences"] <= 4 and all(r["params"] <= 20_000 for r in fast["ranked"])


def _one_line(argv, capsys) -> str:
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_bad_input_is_one_line(superlm_run, tmp_path, capsys):
    line = _one_line(["search", str(superlm_run), "--flops", "0.01", "--no-progress"], capsys)
    # The cheapest sub-network of the tiny SuperLM's sub-space is named, with its share of the teacher's FLOPs.
    assert "no sub-network of the sub-space meets --flops 0.01: the cheapest one, L2-H16-A2-F16, has" in line
    assert "no sub-network" in _one_line(["search", str(superlm_run), "--params", "100", "--no-progress"], capsys)
    assert "give a budget" in _one_line(["search", str(superlm_run), "--no-progress"], capsys)
    assert "(0, 1]" in _one_line(["search", str(superlm_run), "--flops", "2", "--no-progress"], capsys)
    assert "not a count" in _one_line(["search", str(superlm_run), "--params", "lots", "--no-progress"], capsys)
    assert "add --distil" in _one_line(["search", str(superlm_run), "--flops", "0.5", "--steps", "3"], capsys)
    assert _search(superlm_run, "--flops", "0.5", "--name", "twice", "--top", "1") == 0
    assert "exists: pass --overwrite" in _one_line(["search", str(superlm_run), "--flops", "0.5", "--name", "twice",
                                                    "--no-progress"], capsys)
    other = tmp_path / "not-a-run"
    other.mkdir()
    assert "config.yaml is missing" in _one_line(["search", str(other), "--flops", "0.5"], capsys)
    with pytest.raises(ConfigError):
        Budget()
    assert parse_count("15M") == 15_000_000 and parse_count("2.5e3") == 2500 and parse_count("800k") == 800_000


def test_distil_trains_the_extracted_subnetwork(superlm_run):
    assert _search(superlm_run, "--flops", "0.5", "--name", "distilled", "--distil", "--steps", "2",
                   "--set", "train.eval_batches=4", "--set", "train.log_every=1") == 0
    run = superlm_run / "search" / "distilled" / "distil"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    chosen = json.loads((superlm_run / "search" / "distilled" / "search.json").read_text())["chosen"]
    student = AutoModel.from_pretrained(run / "student")
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (chosen["layers"], chosen["hidden"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["student_parameters"] == chosen["params"]
    # The search's loss is the loop's held-out loss: the same 4 held-out batches, the same relation-mse.
    assert summary["heldout_loss_start"] == pytest.approx(chosen["loss"], rel=1e-5)


def test_a_grouped_query_llama_superlm_end_to_end(tiny_llama, tiny_corpus, tmp_path):
    """Causal and GQA (4 query heads, 2 key/value heads): sub-networks keep whole key/value groups, the extracted
    checkpoint is a LlamaForCausalLM computing what the masked SuperLM computes."""
    from transformers import AutoModelForCausalLM

    sets = [f"teacher={tiny_llama}", f"data.source={tiny_corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_length=24", "data.heldout_fraction=0.2", "train.steps=2", "train.batch_size=4",
            "train.eval_batches=1"]
    run = tmp_path / "run"
    assert main(["distill", "autodistil", *[a for s in sets for a in ("--set", s)], "--out", str(run),
                 "--no-progress"]) == 0
    assert _search(run, "--flops", "0.6", "--name", "pick", "--top", "2") == 0
    chosen = json.loads((run / "search" / "pick" / "search.json").read_text())["chosen"]
    saved = AutoModelForCausalLM.from_pretrained(run / "search" / "pick").eval()
    assert saved.config.num_key_value_heads == chosen["heads"] // 2 and chosen["flops_ratio"] <= 0.6
    superlm = AutoModelForCausalLM.from_pretrained(run / "student").eval()
    layout = resolve_layout(superlm)
    subnet = Subnet(chosen["layers"], chosen["hidden"], chosen["heads"], chosen["ffn"])
    ids = torch.randint(2, 30, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with apply_masks(superlm, layout, subnet_masks(subnet, layout)):
            masked = superlm(input_ids=ids).logits
        assert torch.allclose(masked, saved(input_ids=ids).logits, atol=1e-5)
