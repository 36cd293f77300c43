"""The method interface (training/hooks.py): a new method is a file and a registry row, never a loop edit.

The method below is a toy version of what structured pruning (DPHuBERT, Minitron-style masks) needs from
the loop: a learned gate per student block applied by forward hooks, a Lagrangian term driving the gates'
expected density to a target, a multiplier trained by gradient *ascent* in its own optimizer group, state
of its own that must survive a resume, and values to log. It plugs in through ``registry.METHODS`` only.
"""

from __future__ import annotations

import ast
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel

import tadistill.registry as registry
from tadistill.capture.architectures import get_module
from tadistill.capture.hooks import CaptureRequest
from tadistill.cli.main import main
from tadistill.structure import Masks, materialize, resolve_layout
from tadistill.training.hooks import MethodHooks

TARGET = 0.5


class BlockGates(nn.Module):
    def __init__(self, blocks: int):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((blocks,), 2.0))  # density sigmoid(2) = 0.88 at the start
        self.multiplier = nn.Parameter(torch.zeros(()))

    def density(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha).mean()


class Lagrangian(nn.Module):
    """lambda (E[density] - target): a method term, normalized by micro-batches (its value once per step)."""

    kind, weight, normalizer, cfg = "block-sparsity", 1.0, "batches", None

    def __init__(self, gates: BlockGates):
        super().__init__()
        self.gates = [gates]  # not a submodule: the gates are registered once, as the method's module
        self.student_request = CaptureRequest()
        self.teacher_request = CaptureRequest()

    def forward(self, student, teacher, batch):
        gates = self.gates[0]
        return gates.multiplier * (gates.density() - TARGET)


class ToyPruning(MethodHooks):
    name = "toy-pruning"

    def __init__(self, parts):
        arch = parts.student_arch
        self.gates = BlockGates(arch.num_layers)
        self.logged = 0  # state of the method's own: must come back on resume
        for i, block in enumerate(get_module(parts.student, arch.layers)):
            block.register_forward_hook(self._gate(i))

    def _gate(self, i):
        def hook(module, args, output):
            scale = torch.sigmoid(self.gates.log_alpha[i])
            return (output[0] * scale, *output[1:]) if isinstance(output, tuple) else output * scale
        return hook

    def modules(self):
        return {"gates": self.gates}

    def terms(self):
        return [Lagrangian(self.gates)]

    def param_groups(self, params):
        ids = {id(self.gates.multiplier)}
        return [{"params": [p for p in params if id(p) not in ids], "lr": 0.05, "weight_decay": 0.0},
                {"params": [self.gates.multiplier], "lr": 0.05, "weight_decay": 0.0, "maximize": True}]

    def log_values(self):
        self.logged += 1
        with torch.no_grad():
            density, multiplier = float(self.gates.density()), float(self.gates.multiplier)
        return {"prune/density": density, "prune/lambda": multiplier,
                "prune/logged": self.logged}

    def state_dict(self):
        return {"logged": self.logged}

    def load_state_dict(self, state):
        self.logged = int(state["logged"])


def _with_toy(monkeypatch):
    methods = {**registry.METHODS, "toy-pruning": registry.MethodEntry(lambda config, parts: ToyPruning(parts), "")}
    monkeypatch.setattr(registry, "METHODS", methods)
    import tadistill.training.lane as lane

    monkeypatch.setattr(lane, "METHODS", methods)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_pruning_like_method_plugs_in_without_the_loop(tiny_args, tmp_path, monkeypatch):
    _with_toy(monkeypatch)
    common = ["distill", "hs", *tiny_args("train.steps=6", "train.save_every=3", "train.log_every=1"), "--no-progress"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*common, "--out", str(straight)]) == 0
    rows = [r for r in _rows(straight) if "loss" in r]
    assert "loss/block-sparsity" in rows[0] and "prune/density" in rows[0]
    # Descent on the gates, ascent on the multiplier (its own group, maximize): lambda grows while the
    # density is above the target.
    lambdas = [r["prune/lambda"] for r in rows]
    assert all(b > a for a, b in zip(lambdas, lambdas[1:])) and lambdas[-1] > 0
    assert [r["prune/logged"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # The gates are trained with the student and saved beside it for a next stage.
    modules = load_file(str(straight / "modules.safetensors"))
    assert any(k.startswith("methods.") for k in modules)

    # Resume: the gates, the multiplier, their optimizer state and the method's own counter come back exactly.
    assert main([*common, "--set", "train.stop_at=3", "--out", str(split)]) == 0
    assert main([*common, "--out", str(split), "--resume"]) == 0
    again = [r for r in _rows(split) if "loss" in r]
    assert [(r["loss"], r["prune/lambda"], r["prune/logged"]) for r in again] == \
        [(r["loss"], r["prune/lambda"], r["prune/logged"]) for r in rows]
    other = load_file(str(split / "modules.safetensors"))
    assert all(torch.equal(modules[k], other[k]) for k in modules)


def _code_words(path: Path) -> tuple[set[str], set[str]]:
    """(identifiers and attribute names, string constants) of a module: its code, not docstrings or comments."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
                  and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}
    names: set[str] = set()
    strings: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id.lower())
        elif isinstance(node, ast.Attribute):
            names.add(node.attr.lower())
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            strings.add(node.value.lower())
    return names, strings


def test_the_loop_names_no_method():
    names, strings = _code_words(Path(__file__).parents[1] / "src" / "tadistill" / "training" / "loop.py")
    methods = {"on_policy", "adaptive", "replay", "gkd", "distillm", "ammd", "moment", "q_head", *registry.METHODS}
    assert not (names | strings) & methods
    assert not strings & set(registry.OBJECTIVES)  # no objective kind is special-cased by name


class ToySupernet(MethodHooks):
    """A weight-shared supernet in miniature (AutoDistil's sandwich rule needs ``passes``), with the other
    structural hooks: a schedule (``step_begins``), a gradient edit (``before_update``) and a rebuilt student
    (``final_student``: WID folds, DPHuBERT and AutoDistil keep the chosen units)."""

    name = "toy-supernet"

    def __init__(self, parts, settings):
        self.settings = settings  # which passes: "full", "short" (the last block skipped)
        self.arch = parts.student_arch
        self.short = False
        self.begun: list[int] = []
        self.updates: list[tuple[int, bool]] = []
        blocks = get_module(parts.student, self.arch.layers)
        self.last_block = blocks[-1]  # trained in the "full" pass only
        blocks[-1].register_forward_hook(self._skip)

    def _skip(self, module, args, output):
        if not self.short:
            return output
        return (args[0], *output[1:]) if isinstance(output, tuple) else args[0]

    def _setting(self, short: bool):
        @contextmanager
        def run():
            self.short = short
            try:
                yield
            finally:
                self.short = False
        return run

    def passes(self, step, number):
        return [self._setting(s == "short") for s in self.settings]

    def step_begins(self, step):
        self.begun.append(step)

    def before_update(self, step):
        has_grads = all(p.grad is not None and p.grad.abs().sum() > 0 for p in self.last_block.parameters())
        self.updates.append((step, has_grads))

    def log_values(self):
        return {"toy/begun": self.begun[-1], "toy/updates": len(self.updates),
                "toy/grads": float(all(g for _, g in self.updates))}

    def state_dict(self):
        return {"begun": self.begun, "updates": [list(u) for u in self.updates]}

    def load_state_dict(self, state):
        self.begun = list(state["begun"])
        self.updates = [tuple(u) for u in state["updates"]]

    def final_student(self, student):
        layout = resolve_layout(student)
        return materialize(student, layout, Masks.keep(layout, blocks=list(range(layout.num_layers - 1))))


def _with_supernet(monkeypatch, settings):
    build = lambda config, parts: ToySupernet(parts, settings)  # noqa: E731
    methods = {**registry.METHODS, "toy-supernet": registry.MethodEntry(build, "")}
    monkeypatch.setattr(registry, "METHODS", methods)
    import tadistill.training.lane as lane

    monkeypatch.setattr(lane, "METHODS", methods)


def _first_loss(run: Path) -> float:
    return next(r["loss"] for r in _rows(run) if "loss" in r)


def test_passes_average_and_structural_hooks(tiny_args, tiny_teacher_no_dropout, tmp_path, monkeypatch):
    args = lambda *extra: ["distill", "hs", *tiny_args(*extra, teacher=tiny_teacher_no_dropout),  # noqa: E731
                           "--no-progress"]
    firsts = {}
    for settings in (("full",), ("short",), ("full", "short")):
        _with_supernet(monkeypatch, settings)
        out = tmp_path / "-".join(settings)
        assert main([*args("train.steps=1"), "--out", str(out)]) == 0
        firsts[settings] = _first_loss(out)
    # Two passes train on the mean of their losses (and gradients): not their sum, not the last one.
    assert firsts[("full",)] != firsts[("short",)]
    assert abs(firsts[("full", "short")] - (firsts[("full",)] + firsts[("short",)]) / 2) < 1e-6

    # step_begins once per step, before_update with every gradient in place; both resume exactly.
    _with_supernet(monkeypatch, ("full", "short"))
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = args("train.steps=4", "train.save_every=2")
    assert main([*common, "--out", str(straight)]) == 0
    rows = [r for r in _rows(straight) if "loss" in r]
    assert [(r["toy/begun"], r["toy/updates"], r["toy/grads"]) for r in rows] == [(s, s, 1.0) for s in (1, 2, 3, 4)]
    assert main([*common, "--set", "train.stop_at=2", "--out", str(split)]) == 0
    assert main([*common, "--out", str(split), "--resume"]) == 0
    again = [r for r in _rows(split) if "loss" in r]
    assert [(r["loss"], r["toy/begun"], r["toy/updates"]) for r in again] == \
        [(r["loss"], r["toy/begun"], r["toy/updates"]) for r in rows]

    # final_student: the saved student is the method's rebuilt one, and the summary describes it.
    summary = json.loads((straight / "summary.json").read_text())
    teacher_layers = json.loads((tiny_teacher_no_dropout / "config.json").read_text())["num_hidden_layers"]
    saved = AutoModel.from_pretrained(straight / "student")
    assert saved.config.num_hidden_layers == teacher_layers // 2 - 1  # the hs default: half the teacher's blocks
    assert summary["student_shape"].startswith(f"{saved.config.num_hidden_layers}x")
    assert summary["student_parameters"] == sum(p.numel() for p in saved.parameters())
    assert 0 < summary["student_flops_per_token"] < summary["teacher_flops_per_token"]
