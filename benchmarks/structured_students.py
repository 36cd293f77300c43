"""Issue 13, item 6: students made by pruning, weight inheritance and architecture search against block selection
and random initialisation, at one parameter count and one distillation token budget.

The built-in teacher (all-MiniLM-L6-v2, 6x384, 22.7M parameters) and corpus. The size is 3x384's, 17.39M
parameters: half of the teacher's block parameters, which every method can reach (DPHuBERT gates FFN units and
keeps the width on BERT, so it cannot go far below; WID and Minitron-width keep the depth). Each cell is

1. its method's own stage, which makes the initial student (none for block selection and random init):
   ``minitron-depth`` / ``minitron-width``: a ``prune`` stage (activation importance on calibration batches; blocks
   by block importance) to 3x384 / to 6x384 with 384 FFN units; ``dphubert``: the gated stage of recipe
   ``dphubert`` at target sparsity 0.5; ``wid``: recipe ``wid`` to 6x320 (10 whole heads of 32, FFN 1280);
   ``autodistil``: recipe ``autodistil`` (a SuperLM), then ``tadistill search --params`` at the target;
2. the same distillation for every cell: recipe ``minilmv2`` (32 relation heads: they divide 384 and WID's 320),
   the same steps, batches, learning rate, schedule and seed, from the built-in teacher;
3. the initial and the distilled student scored by ``issue18_gain.scores`` (stdlib-retrieval acc@1 / MRR,
   zero-shot; the stdlib-topic linear probe; evaluation seeds 0, 1, 2), parameters and FLOPs per token from the
   distillation's summary.json.

``block-2x`` is block selection with twice the distillation steps: the tokens the method stages used besides.
``--causal``: the built-in GPT-2 (4x256) into 2x256's parameter count by block selection, random init and Minitron
depth / width pruning, distilled by recipe ``kd``, scored by held-out perplexity (``OUT/causal.jsonl``).

    .venv/bin/python benchmarks/structured_students.py --out runs/structured                 # every cell (~35 min)
    .venv/bin/python benchmarks/structured_students.py --out runs/structured --only wid      # one cell
    .venv/bin/python benchmarks/structured_students.py --out runs/structured --causal        # the causal variant
    .venv/bin/python benchmarks/structured_students.py --out runs/structured --table         # table and plots
    .venv/bin/python benchmarks/structured_students.py --out runs/smoke --steps 2 --method-steps 10 --no-scores

Finished cells are skipped (``OUT/results.jsonl``); ``--redo`` runs them again. The CPU is shared: one cell at a
time, ``--threads`` (default 1), the 1-minute load average is recorded before and after every cell.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if __package__:  # imported as benchmarks.structured_students (run.py)
    from .common import Figure
    from .issue18_gain import paired, save_initial_student, scores
else:  # python benchmarks/structured_students.py: benchmarks/ is on sys.path
    from common import Figure
    from issue18_gain import paired, save_initial_student, scores

NAME = "structured_students"
HOW = ("The built-in teacher (6x384) into students of 3x384's parameter count (17.4M) made by Minitron pruning "
       "(depth, width), DPHuBERT, WID, AutoDistil search, block selection and random init; then the same minilmv2 "
       "distillation for every one; held-out loss, stdlib-retrieval and stdlib-topic of the initial and final "
       "student (3 evaluation seeds).")
TARGET_PARAMS = 17_389_824  # 3x384 with the teacher's vocabulary: the block-selected student
SEARCH_SLACK = 1.02  # AutoDistil's --params budget: the target + 2% (its sub-space has no 17.39M point but 3x384)
RETRIEVAL, TOPIC = "stdlib-retrieval/acc@1", "stdlib-topic/accuracy"


@dataclass(frozen=True)
class Budget:
    """The distillation every cell gets, and the method stages' own steps."""

    steps: int = 50  # distillation steps (the same for every cell)
    batch_size: int = 8
    max_length: int = 128
    method_steps: int = 50  # DPHuBERT's gated stage and WID's run; AutoDistil takes half (4 passes per batch)
    calibration_batches: int = 8  # Minitron's importance
    seed: int = 0

    def data(self) -> list[str]:
        """Data and logging settings every run of the study shares."""
        return [f"train.batch_size={self.batch_size}", f"data.max_length={self.max_length}", f"train.seed={self.seed}",
                "train.report_to=[]", "train.save_every=0", "train.log_every=5"]

    def distillation(self, steps: int | None = None) -> list[str]:
        """The common distillation (recipe minilmv2): the demo's learning rate and warmup, every cell alike."""
        steps = steps or self.steps
        return [*self.data(), f"train.steps={steps}", f"train.eval_every={steps}", "train.lr=1e-4",
                "train.warmup_ratio=0.05", "objectives.minilmv2.relation_heads=32"]


@dataclass
class Made:
    """What a method's own stage produced: the initial student and what making it cost."""

    folder: Path | None  # None: the distillation config builds the student (block selection, random init)
    steps: int = 0
    tokens: int = 0  # training-split tokens the stage read (calibration included)
    seconds: float = 0.0
    notes: dict | None = None


def _distill(recipe: str, overrides: list[str], folder: Path):
    from tadistill.api import distill
    from tadistill.resolve import resolve_config

    return distill(resolve_config(recipe, overrides=overrides), out=folder, overwrite=True, progress=False)


def _minitron(shape: list[str], recipe: str = "minilmv2", teacher: str = "builtin") -> Callable[[Budget, Path], Made]:
    def make(budget: Budget, folder: Path) -> Made:
        began = time.perf_counter()
        # A lone prune stage: importance on calibration batches, the most important units kept, no training.
        result = _distill(recipe, [*budget.data(), f"teacher={teacher}", "stages=[{name: prune, action: prune}]",
                                   f"prune.calibration_batches={budget.calibration_batches}", *shape], folder)
        stage = json.loads((folder / "stages" / "prune" / "summary.json").read_text())
        notes = {k: stage[k] for k in ("kept_blocks", "block_importance") if k in stage}
        return Made(result.student_dir, 0, budget.calibration_batches * budget.batch_size * budget.max_length,
                    time.perf_counter() - began, notes)
    return make


def _dphubert(budget: Budget, folder: Path) -> Made:
    began = time.perf_counter()
    steps = budget.method_steps
    # The gated stage alone, a few dozen steps instead of DPHuBERT's 50k. With the recipe's settings the expected
    # sparsity was 0.05 after 50 steps (target 0.5): here the gates start at drop probability 0.5, gates and
    # multipliers learn fast at a constant rate with little momentum (close to tests/test_dphubert.py's FAST).
    result = _distill("dphubert", [*budget.data(), "stages=[]", f"train.steps={steps}", f"train.eval_every={steps}",
                                   "dphubert.target_sparsity=0.5", "dphubert.init_drop=0.5", "dphubert.gate_lr=0.5",
                                   "dphubert.multiplier_lr=0.5", "dphubert.target_warmup_ratio=0.3",
                                   "train.schedule=constant", "train.warmup_ratio=0", "train.adam_betas=[0.5,0.99]"],
                       folder)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "prune/expected_sparsity" in r][-1]
    notes = {k: round(v, 4) for k, v in last.items() if k.startswith("prune/")}
    return Made(result.student_dir, steps, steps * budget.batch_size * budget.max_length,
                time.perf_counter() - began, notes)


def _wid(budget: Budget, folder: Path) -> Made:
    began = time.perf_counter()
    steps = budget.method_steps
    # The masks must reach the target before the end: intervals x w_step + fade <= steps.
    intervals, w_step = 8, max(1, (steps - steps // 10) // 9)
    result = _distill("wid", [*budget.data(), f"train.steps={steps}", f"train.eval_every={steps}",
                              "wid.hidden_size=320", "wid.attention=heads", f"wid.intervals={intervals}",
                              f"wid.w_step={w_step}", f"wid.fade_steps={w_step}"], folder)
    return Made(result.student_dir, steps, steps * budget.batch_size * budget.max_length,
                time.perf_counter() - began, {"intervals": intervals, "w_step": w_step})


def _autodistil(budget: Budget, folder: Path) -> Made:
    from tadistill.resolve import resolve_config
    from tadistill.search import Budget as SearchBudget
    from tadistill.search import run_search

    began = time.perf_counter()
    steps = max(1, budget.method_steps // 2)  # the sandwich rule: 4 sub-networks per batch, 2x the others' compute
    _distill("autodistil", [*budget.data(), f"train.steps={steps}", f"train.eval_every={steps}"], folder)
    trained = time.perf_counter() - began
    found = run_search(folder, SearchBudget(params=int(TARGET_PARAMS * SEARCH_SLACK)), top=3, latency_repeats=3,
                       overwrite=True, progress=False)
    heldout = resolve_config("autodistil").autodistil.search_batches * budget.batch_size * budget.max_length
    notes = {"chosen": found.chosen.subnet.name, "candidates": len(found.ranked), "superlm_seconds": round(trained, 1),
             "search_heldout_tokens": heldout}
    return Made(found.folder, steps, steps * budget.batch_size * budget.max_length, time.perf_counter() - began, notes)


@dataclass(frozen=True)
class Cell:
    name: str
    how: str  # the table's "method" column
    make: Callable[[Budget, Path], Made] | None  # None: the distillation builds the student
    student: tuple[str, ...] = ()  # student overrides of the distillation when make is None
    steps_factor: int = 1


CELLS = (
    Cell("random", "random init", None, ("student.num_layers=3", "student.init=random")),
    Cell("block", "block selection (blocks 0, 3, 5)", None,
         ("student.num_layers=3", "student.init=teacher", "student.init_layers=uniform")),
    Cell("minitron-depth", "Minitron: prune depth (block importance)", _minitron(["student.num_layers=3"])),
    Cell("minitron-width", "Minitron: prune FFN width (activations)",
         _minitron(["student.num_layers=6", "student.intermediate_size=384"])),
    Cell("dphubert", "DPHuBERT: gated FFN units, sparsity 0.5", _dphubert),
    Cell("wid", "WID: compactors to 6x320 (whole heads)", _wid),
    Cell("autodistil", "AutoDistil: SuperLM + search --params", _autodistil),
    Cell("block-2x", "block selection, 2x distillation steps", None,
         ("student.num_layers=3", "student.init=teacher", "student.init_layers=uniform"), steps_factor=2),
)


def _cached_scores(folder: Path, model_dir: Path | str, enabled: bool) -> dict | None:
    """scores() of ``model_dir``, kept in ``folder/scores.json`` (the same initial student is scored once)."""
    if not enabled:
        return None
    path = folder / "scores.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(scores(str(model_dir)), indent=1))
    return json.loads(path.read_text())


def run_cell(cell: Cell, budget: Budget, out: Path, *, score: bool = True) -> dict:
    from tadistill.resolve import resolve_config

    folder = out / "cells" / cell.name
    load_before = os.getloadavg()[0]
    made = cell.make(budget, folder / "method") if cell.make else Made(None)
    steps = budget.steps * cell.steps_factor
    student = [f"student.pretrained={made.folder}"] if made.folder else list(cell.student)
    overrides = [*budget.distillation(steps), *student]
    if made.folder:
        init_dir = made.folder
    else:  # the student the distillation config builds before step 1; shared by cells that build the same one
        init_dir = out / "init" / "-".join([*(s.split("=")[1] for s in cell.student), f"s{budget.seed}"])
        if not (init_dir / "config.json").is_file():
            save_initial_student(resolve_config("minilmv2", overrides=overrides), init_dir)
    init_scores = _cached_scores(init_dir if made.folder is None else folder / "init", init_dir, score)
    began = time.perf_counter()
    result = _distill("minilmv2", overrides, folder / "distil")
    seconds = time.perf_counter() - began
    load_after = os.getloadavg()[0]
    final_scores = _cached_scores(folder / "final", result.student_dir, score)
    s = result.summary
    row = {
        "name": cell.name, "method": cell.how, "shape": s.get("student_shape"),
        "params": s.get("student_parameters"), "flops_per_token": s.get("student_flops_per_token"),
        "teacher_params": s.get("teacher_parameters"), "teacher_flops_per_token": s.get("teacher_flops_per_token"),
        "distil_steps": steps, "distil_tokens": s.get("tokens_seen"), "distil_seconds": round(seconds, 1),
        "method_steps": made.steps, "method_tokens": made.tokens, "method_seconds": round(made.seconds, 1),
        "method_notes": made.notes, "heldout_loss": [s.get("heldout_loss_start"), s.get("heldout_loss_end")],
        "embedding_cosine": [s.get("embedding_cosine_start"), s.get("embedding_cosine_end")],
        "load": [round(load_before, 2), round(load_after, 2)], "threads": torch.get_num_threads(),
        "budget": asdict(budget), "command": " ".join(sys.argv), "init": init_scores, "final": final_scores,
    }
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def read_rows(out: Path) -> list[dict]:
    """The last row of every cell, in the order of CELLS."""
    path = out / "results.jsonl"
    rows = {r["name"]: r for r in map(json.loads, path.read_text().splitlines())} if path.is_file() else {}
    return [rows[c.name] for c in CELLS if c.name in rows]


def _score(row: dict | None, key: str) -> str:
    if not row or key not in row:
        return ""
    return f"{row[key]:.3f} ± {row[key + '_std']:.3f}"


def table(out: Path) -> str:
    """Markdown: the teacher, then one row per cell (initial -> distilled)."""
    rows = read_rows(out)
    teacher_file = out / "teacher.json"
    teacher = json.loads(teacher_file.read_text()) if teacher_file.is_file() else None
    head = ["method", "shape", "params", "FLOPs/token", "tokens: distil (+ method)", "wall s: distil (+ method)",
            "held-out loss start -> end", "emb. cosine start -> end", "retrieval acc@1 init -> final",
            "acc@1 gain (paired)", "topic acc init -> final"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---:|---|---|---|---|---|"]
    if teacher and rows:
        lines.append(f"| teacher | 6x384 (12 heads) | {rows[0]['teacher_params'] / 1e6:.2f}M | "
                     f"{rows[0]['teacher_flops_per_token'] / 1e6:.1f}M | | | | | {_score(teacher, RETRIEVAL)} | | "
                     f"{_score(teacher, TOPIC)} |")
    for r in rows:
        extra_tokens = f" (+{r['method_tokens']:,})" if r["method_tokens"] else ""
        extra_seconds = f" (+{r['method_seconds']:.0f})" if r["method_seconds"] else ""
        start, end = r["heldout_loss"]
        init, final = r.get("init"), r.get("final")
        gain = paired(init, final, "acc@1") if init and final else ""
        # Mean-pooled embeddings against the teacher's on held-out text; needs equal widths (WID's 320: none).
        cosine = " -> ".join(f"{c:.3f}" for c in r["embedding_cosine"] if c is not None)
        lines.append(
            f"| {r['method']} | {r['shape']} | {r['params'] / 1e6:.2f}M | {r['flops_per_token'] / 1e6:.1f}M | "
            f"{r['distil_tokens']:,}{extra_tokens} | {r['distil_seconds']:.0f}{extra_seconds} | {start:.3f} -> "
            f"{end:.3f} | {cosine} | {_score(init, RETRIEVAL)} -> {_score(final, RETRIEVAL)} | {gain} | "
            f"{_score(init, TOPIC)} -> {_score(final, TOPIC)} |")
    return "\n".join(lines)


def plots(out: Path, folder: Path) -> list[Path]:
    """Retrieval acc@1 against parameters (teacher as a star), the common distillation's training loss, and
    retrieval acc@1 before and after it (a line per cell, the teacher's level beside them)."""
    from tadistill.reports.plots import (
        plot_score_vs_params,
        plot_training_curves,
        read_curve,
    )

    rows = read_rows(out)
    folder.mkdir(parents=True, exist_ok=True)
    cells = [{"method": r["name"], "student": "", "params": r["params"], RETRIEVAL: (r.get("final") or {}).get(RETRIEVAL)}
             for r in rows]
    teacher_file = out / "teacher.json"
    if teacher_file.is_file() and rows:
        cells.append({"method": "teacher", "student": "6x384", "params": rows[0]["teacher_params"],
                      RETRIEVAL: json.loads(teacher_file.read_text())[RETRIEVAL]})
    curves = {r["name"]: read_curve(out / "cells" / r["name"] / "distil", "loss") for r in rows}
    # What the distillation added to each initial student (house style 15): acc@1 at step 0 and at the end.
    scored = [r for r in rows if r.get("init") and r.get("final")]
    gains = {r["name"]: [(0, r["init"][RETRIEVAL]), (r["distil_steps"], r["final"][RETRIEVAL])] for r in scored}
    if teacher_file.is_file() and scored:
        level = json.loads(teacher_file.read_text())[RETRIEVAL]
        gains["teacher"] = [(0, level), (max(r["distil_steps"] for r in scored), level)]
    return [plot_score_vs_params(cells, RETRIEVAL, folder / "structured_acc_vs_params.png"),
            plot_training_curves(curves, folder / "structured_curves.png", ylabel="minilmv2 loss (training)"),
            plot_training_curves(gains, folder / "structured_acc_init_final.png", ylabel="stdlib-retrieval acc@1")]


def figures(out: Path) -> list[Figure]:
    """The issue's aim as ratios (lower is better): the best pruned / inherited / searched student against block
    selection at the same size and distillation tokens."""
    rows = {r["name"]: r for r in read_rows(out)}
    block = rows.get("block")
    # At the same size: a method student larger than the search's budget (DPHuBERT's saved model keeps one FFN
    # width for every block, the largest any block keeps) is left out of the ratios.
    made = [r for name, r in rows.items() if name not in ("block", "block-2x", "random")
            and r["params"] <= TARGET_PARAMS * SEARCH_SLACK]
    if not block or not made:
        return []
    best = min(made, key=lambda r: r["heldout_loss"][1])
    found = [Figure(NAME, "held-out minilmv2 loss: best method student / block selection", best["heldout_loss"][1] /
                    block["heldout_loss"][1], 1.0, "<= 1", f"{best['name']} {best['heldout_loss'][1]:.3f} vs block "
                    f"{block['heldout_loss'][1]:.3f}", {"rows": list(rows.values())})]
    if block.get("final") and all(r.get("final") for r in made):
        top = max(made, key=lambda r: r["final"][RETRIEVAL])
        found.append(Figure(NAME, "retrieval acc@1: block selection / best method student",
                            block["final"][RETRIEVAL] / max(top["final"][RETRIEVAL], 1e-9), 1.0, "<= 1",
                            f"{top['name']} {_score(top['final'], RETRIEVAL)} vs block "
                            f"{_score(block['final'], RETRIEVAL)}"))
    return found


# The causal variant: the built-in GPT-2 (4x256, 4 heads) to 2x256's parameter count, distilled by recipe kd (forward
# KL of next-token distributions, the Minitron papers' choice), scored by held-out perplexity.
CAUSAL_TEXTS = 256  # held-out texts for perplexity (the run's deterministic split)
CAUSAL_CELLS = (
    Cell("random", "random init", None, ("student.num_layers=2", "student.init=random")),
    Cell("block", "block selection (blocks 0, 3)", None,
         ("student.num_layers=2", "student.init=teacher", "student.init_layers=uniform")),
    Cell("minitron-depth", "Minitron: prune depth (block importance)",
         _minitron(["student.num_layers=2"], "kd", "builtin-gpt2")),
    Cell("minitron-width", "Minitron: prune FFN width (activations)",
         _minitron(["student.num_layers=4", "student.intermediate_size=256"], "kd", "builtin-gpt2")),
)


def _save_causal_init(config, folder: Path) -> None:
    """The causal student ``config`` builds before step 1, with its LM head (issue18_gain's saves the base)."""
    from tadistill.loading import load_pretrained, load_tokenizer
    from tadistill.students.spec import build_student_from_spec

    teacher = load_pretrained(config.teacher, head="causal-lm", what="teacher")
    tokenizer = load_tokenizer(config.teacher)
    torch.manual_seed(config.train.seed)
    build_student_from_spec(config, teacher, tokenizer, head="causal-lm").save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _perplexity(model_dir: Path | str, config) -> float:
    from tadistill.data.prepare import heldout_texts
    from tadistill.loading import load_pretrained, load_tokenizer
    from tadistill.measure.perplexity import causal_perplexity

    texts = heldout_texts(config.data.source, config.data, seed=config.train.seed, limit=CAUSAL_TEXTS)
    model = load_pretrained(str(model_dir), head="causal-lm", what="model")
    return causal_perplexity(model, load_tokenizer(str(model_dir)), texts, max_length=config.data.max_length)["perplexity"]


def run_causal(budget: Budget, out: Path) -> list[dict]:
    """Every causal cell not yet in OUT/causal.jsonl: the method stage, the kd distillation, perplexities."""
    from tadistill.loading import resolve_model_path
    from tadistill.resolve import resolve_config

    path = out / "causal.jsonl"
    done = {json.loads(line)["name"] for line in path.read_text().splitlines()} if path.is_file() else set()
    base = [*budget.data(), "teacher=builtin-gpt2", f"train.steps={budget.steps}", f"train.eval_every={budget.steps}",
            "train.lr=1e-4", "train.warmup_ratio=0.05"]
    for cell in CAUSAL_CELLS:
        if cell.name in done:
            continue
        folder = out / "causal" / cell.name
        load_before = os.getloadavg()[0]
        made = cell.make(budget, folder / "method") if cell.make else Made(None)
        student = [f"student.pretrained={made.folder}"] if made.folder else list(cell.student)
        config = resolve_config("kd", overrides=[*base, *student])
        init_dir = made.folder or folder / "init"
        if made.folder is None:
            _save_causal_init(config, init_dir)
        init_ppl = _perplexity(init_dir, config)
        began = time.perf_counter()
        result = _distill("kd", [*base, *student], folder / "distil")
        s = result.summary
        row = {"name": cell.name, "method": cell.how, "shape": s.get("student_shape"),
               "params": s.get("student_parameters"), "flops_per_token": s.get("student_flops_per_token"),
               "teacher_params": s.get("teacher_parameters"), "distil_tokens": s.get("tokens_seen"),
               "distil_seconds": round(time.perf_counter() - began, 1), "method_tokens": made.tokens,
               "method_seconds": round(made.seconds, 1), "method_notes": made.notes,
               "heldout_loss": [s.get("heldout_loss_start"), s.get("heldout_loss_end")],
               "perplexity": [init_ppl, _perplexity(result.student_dir, config)],
               "teacher_perplexity": _perplexity(resolve_model_path("builtin-gpt2"), config),
               "load": [round(load_before, 2), round(os.getloadavg()[0], 2)], "budget": asdict(budget)}
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"causal {cell.name}: {row['shape']} {row['params']:,} params, perplexity {row['perplexity']}", flush=True)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def causal_table(out: Path) -> str:
    path = out / "causal.jsonl"
    rows = {r["name"]: r for r in map(json.loads, path.read_text().splitlines())} if path.is_file() else {}
    head = ("| method | shape | params | FLOPs/token | tokens: distil (+ method) | held-out KL start -> end | "
            "held-out perplexity init -> final |")
    lines = [head, "|---|---|---:|---:|---:|---|---|"]
    for r in rows.values():
        extra = f" (+{r['method_tokens']:,})" if r["method_tokens"] else ""
        (a, b), (p, q) = r["heldout_loss"], r["perplexity"]
        lines.append(f"| {r['method']} | {r['shape']} | {r['params'] / 1e6:.2f}M | {r['flops_per_token'] / 1e6:.2f}M | "
                     f"{r['distil_tokens']:,}{extra} | {a:.3f} -> {b:.3f} | {p:.1f} -> {q:.1f} |")
    if rows:
        first = next(iter(rows.values()))
        lines.append(f"| teacher | 4x256 (4 heads) | {first['teacher_params'] / 1e6:.2f}M | | | | "
                     f"{first['teacher_perplexity']:.1f} |")
    return "\n".join(lines)


def parse(argv: list[str] | None, *, quick: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # --quick (run.py --quick): a smoke run of every cell, no task scores, in its own folder.
    parser.add_argument("--out", default="runs/structured-quick" if quick else "runs/structured")
    parser.add_argument("--only", nargs="*", choices=[c.name for c in CELLS], help="these cells only")
    parser.add_argument("--steps", type=int, default=4 if quick else Budget.steps, help="distillation steps")
    parser.add_argument("--method-steps", type=int, default=10 if quick else None,
                        help="DPHuBERT / WID steps, AutoDistil half of them (default: --steps; WID needs 10 or more)")
    parser.add_argument("--batch-size", type=int, default=Budget.batch_size)
    parser.add_argument("--max-length", type=int, default=Budget.max_length)
    parser.add_argument("--seed", type=int, default=Budget.seed, help="training seed (data order, init, dropout)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--redo", action="store_true", help="run finished cells again")
    parser.add_argument("--no-scores", action="store_true", default=quick, help="skip the task scores (a smoke run)")
    parser.add_argument("--causal", action="store_true",
                        help="the causal variant instead: Minitron vs block selection on builtin-gpt2 (perplexity)")
    parser.add_argument("--table", action="store_true", help="print the table, draw the plots and exit")
    parser.add_argument("--figures", default=None, help="folder for the PNGs (default OUT/figures)")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None, *, quick: bool = False) -> list[Figure]:
    args = parse(argv, quick=quick)
    out = Path(args.out)
    if args.causal:
        if not args.table:
            torch.set_num_threads(args.threads)
            out.mkdir(parents=True, exist_ok=True)
            run_causal(Budget(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                              seed=args.seed), out)
        print(causal_table(out))
        return []
    if not args.table:
        torch.set_num_threads(args.threads)
        out.mkdir(parents=True, exist_ok=True)
        budget = Budget(steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                        method_steps=args.method_steps or args.steps, seed=args.seed)
        if not args.no_scores and not (out / "teacher.json").is_file():
            (out / "teacher.json").write_text(json.dumps(scores("builtin"), indent=1))
        done = {r["name"] for r in read_rows(out)}
        for cell in CELLS:
            if (args.only and cell.name not in args.only) or (cell.name in done and not args.redo):
                continue
            began = time.perf_counter()
            row = run_cell(cell, budget, out, score=not args.no_scores)
            print(f"{cell.name}: {row['shape']} {row['params']:,} params, held-out {row['heldout_loss']}, "
                  f"{time.perf_counter() - began:.0f} s, load {row['load']}", flush=True)
    print(table(out))
    if any(r.get("final") for r in read_rows(out)):
        for path in plots(out, Path(args.figures) if args.figures else out / "figures"):
            print(f"written: {path}")
    return figures(out)


def main(argv: list[str] | None = None) -> int:
    for figure in run(argv):
        print(figure.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
