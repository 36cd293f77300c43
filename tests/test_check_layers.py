"""Each check lives in one layer (issue 10, item 3).

A pure objective (``tadistill.objectives``) guards its math with ValueError and never speaks to the user;
the config (what needs no model) and the set-up (what needs both models: the terms built for a lane, and
fidelity, which uses the set-up's helpers) give the one-line ConfigError. Here every such condition is
tried on both sides: the pure function raises a ValueError that is no TadistillError, and the real CLI
prints one line ``error: ...`` naming what to change and exits with 2.
"""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest
import torch

from tadistill import config as C
from tadistill.cli.main import main
from tadistill.errors import TadistillError
from tadistill.objectives.attention import (
    attention_kl,
    attention_score_mse,
    relation_kl,
)
from tadistill.objectives.chunked import chunked_logit_divergence
from tadistill.objectives.layer_maps import layer_map
from tadistill.objectives.logits import KINDS, logit_divergence
from tadistill.objectives.moment_matching import BASELINES
from tadistill.objectives.output import soft_target_kl

OBJECTIVES_DIR = Path(__file__).resolve().parents[1] / "src" / "tadistill" / "objectives"
B, T = 2, 5


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


MASK = torch.ones(B, T, dtype=torch.bool)

# (pure call, the words its ValueError must hold): the same conditions as the CLI cases below.
PURE = {
    "divergence kind": (lambda: logit_divergence(_rand(B, T, 7), _rand(B, T, 7), MASK, kind="reverse_kl"),
                        "unknown logit divergence 'reverse_kl' (did you mean 'reverse-kl'?)"),
    "beta": (lambda: logit_divergence(_rand(B, T, 7), _rand(B, T, 7), MASK, kind="jsd", beta=1.5), "beta"),
    "chunk size": (lambda: chunked_logit_divergence(_rand(B, T, 4), torch.nn.Linear(4, 7), _rand(B, T, 7), MASK,
                                                    kind="jsd", chunk_size=0), "chunk_size"),
    "temperature": (lambda: soft_target_kl(_rand(B, T, 7), _rand(B, T, 7), MASK, temperature=0.0), "temperature"),
    "relation heads": (lambda: relation_kl(_rand(B, T, 32), _rand(B, T, 32), MASK, relation_heads=5),
                       "relation_heads=5"),
    "equal heads (minilm)": (lambda: attention_kl(_rand(B, 2, T, T), _rand(B, 4, T, T), MASK), "2 attention heads"),
    "equal heads (attention-mse)": (lambda: attention_score_mse(_rand(B, 2, T, T), _rand(B, 4, T, T), MASK),
                                    "2 attention heads"),
    "explicit layers": (lambda: layer_map("explicit", 2, 4, explicit=[1, 9]),
                        "layer mapping entry [2, 9] is out of range"),
    "deeper student": (lambda: layer_map("uniform", 6, 4), "the student has 6 layers but the teacher only 4"),
}


@pytest.mark.parametrize("case", sorted(PURE))
def test_pure_function_raises_value_error(case):
    call, words = PURE[case]
    with pytest.raises(ValueError, match=re.escape(words)) as info:
        call()
    assert not isinstance(info.value, TadistillError)


# (recipe, --set overrides, the one line the user sees, or a part of it); encoder recipes on the 4x32 tiny BERT.
ENCODER_CLI = {
    "relation heads": ("minilmv2", ["objectives.minilmv2.relation_heads=5"],
                       ("relation_heads=5 must divide the student width 32: choose a common divisor of both models' "
                       "widths [32], such as 4, 2 or 1: --set objectives.minilmv2.relation_heads=4")),
    "relation heads 0": ("minilmv2", ["objectives.minilmv2.relation_heads=0"],
                         "config objectives.0.minilmv2.relation_heads: Input should be greater than or equal to 1"),
    "equal heads (minilm)": ("minilm", ["student.num_heads=2"],
                             ("minilm needs equal head counts (teacher 4, student 2): set student.num_heads=4 or use "
                             "the minilmv2 recipe")),
    "equal heads (attention-mse)": ("tinybert-general", ["student.num_heads=2"],
                                    ("attention-mse needs equal head counts (teacher 4, student 2): set "
                                    "student.num_heads=4")),
    "explicit layers": ("hs", ["objectives.hidden.mapping=explicit", "objectives.hidden.layers=[1,9]"],
                        ("objectives.hidden: layer mapping entry [2, 9] is out of range: the teacher has hidden "
                        "states 0..4")),
    "deeper student": ("tinybert-general", ["student.num_layers=6"],
                       ("attention-mse: the student has 6 layers but the teacher only 4: a layer mapping needs a "
                       "student no deeper than its teacher")),
    "temperature": ("od", ["objectives.output-kl.temperature=0"], "config objectives.0.output-kl.temperature"),
}

CAUSAL_CLI = {
    "divergence kind": ("kd", ["objectives.logits.divergence=reverse_kl"], "config objectives.0.logits.divergence"),
    "beta": ("gkd", ["objectives.logits.beta=1.5"], "config objectives.0.logits.beta"),
    "chunk size": ("kd", ["objectives.logits.chunk_size=0"], "config objectives.0.logits.chunk_size"),
}


def _one_line_error(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0].removeprefix("error: ")


def _argv(recipe: str, sets: list[str], teacher: Path, corpus: Path, tmp_path: Path) -> list[str]:
    sets = [f"teacher={teacher}", f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_length=24", "train.steps=1", *sets]
    return ["distill", recipe, *[a for s in sets for a in ("--set", s)], "--out", str(tmp_path / "run"),
            "--no-progress"]


@pytest.mark.parametrize("case", sorted(ENCODER_CLI))
def test_cli_gives_one_line_config_error_encoder(case, tiny_teacher, tiny_corpus, tmp_path, capsys):
    recipe, sets, words = ENCODER_CLI[case]
    message = _one_line_error(_argv(recipe, sets, tiny_teacher, tiny_corpus, tmp_path), capsys)
    assert message.startswith(words), message
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


@pytest.mark.parametrize("case", sorted(CAUSAL_CLI))
def test_cli_gives_one_line_config_error_causal(case, tiny_gpt2, tiny_corpus, tmp_path, capsys):
    recipe, sets, words = CAUSAL_CLI[case]
    message = _one_line_error(_argv(recipe, sets, tiny_gpt2, tiny_corpus, tmp_path), capsys)
    assert message.startswith(words), message


def test_every_condition_is_tried_on_both_sides():
    cli = {c.split(" ")[0] for c in [*ENCODER_CLI, *CAUSAL_CLI]}
    assert {c.split(" ")[0] for c in PURE} <= cli


def test_objectives_raise_no_user_errors():
    """No module of tadistill.objectives imports a user-facing error class (did_you_mean, a string helper, may)."""
    found = []
    for path in sorted(OBJECTIVES_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "tadistill.errors":
                found += [f"{path.name}: {a.name}" for a in node.names if a.name != "did_you_mean"]
            elif isinstance(node, ast.Import) and any(a.name == "tadistill.errors" for a in node.names):
                found.append(f"{path.name}: import tadistill.errors")
    assert not found


def test_config_checks_the_objectives_own_lists():
    """The config's choices are the lists the pure functions compute with, not copies that can drift."""
    assert typing.get_args(C.LogitDivergence.model_fields["divergence"].annotation) == KINDS
    assert typing.get_args(C.MomentMatching.model_fields["baseline"].annotation) == BASELINES
