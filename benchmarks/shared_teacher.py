"""A 4-student study that shares one teacher pass, against the same 4 students trained by 4 separate runs.

The study is ``tadistill.study.compare`` with methods hs (uniform mapping) and minilmv2 x students 3x384 and
6x192 on the built-in teacher and corpus, evaluation kept minimal (no tasks, no latency, 12 fidelity texts).
The separate runs are ``tadistill.distill`` on exactly the configs the study resolves for its cells
(``tadistill.study.compare.expand_cells``), so both arms train the same students with the same settings.

Two ratios, study / separate:

* training pass: the wall time a run reports in ``summary.json`` ("seconds": from loading the teacher to the
  saved student, the study's evaluation and report excluded), the study's longest cell against the sum of
  the 4 runs; it includes per-run set-up (teacher, students, corpus, start and end embedding checks, final
  checkpoint), which a short benchmark run weighs more than a long training run would;
* loop steps only: the per-step time of the training loop (from the ``tokens_per_s`` each run logs every
  step, after warm-up), one study step against the sum of one step of each separate run. This is the
  figure that holds for long runs.

Work that one Python process caches for both arms (building the built-in corpus text, about 6 s; the
tokenized corpus; the teacher's files) is done once before anything is timed. The runs are ordered
separate, separate, study, separate, separate, so that a drift of the machine's load hits both arms.

Run alone: ``python benchmarks/shared_teacher.py [--quick] [--steps 200 --batch-size 32 --seq-len 128]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

if __package__:  # imported as benchmarks.shared_teacher
    from .common import Figure, Stopwatch, default_precision, load_average, median, pick_device
else:  # run as a script, or imported by run.py with benchmarks/ on sys.path
    from common import Figure, Stopwatch, default_precision, load_average, median, pick_device

NAME = "shared_teacher"
TARGET = 0.5
METHODS = [
    {"name": "hs", "recipe": "hs", "set": ["objectives.hidden.mapping=uniform"]},
    {"name": "minilmv2", "recipe": "minilmv2", "set": []},
]
STUDENTS = ["3x384", "6x192"]


def study_config(opts: argparse.Namespace):
    from tadistill.study.config import StudyConfig

    return StudyConfig.model_validate({
        "name": "bench-shared-teacher",
        "teacher": "builtin",
        "data": {"source": "builtin", "max_length": opts.seq_len},
        # Checkpoint only at the end, evaluate held-out loss only at the start and end, log every step.
        "train": {"batch_size": opts.batch_size, "steps": opts.steps, "eval_every": 0, "eval_batches": 1,
                  "save_every": 0, "log_every": 1, "precision": opts.precision},
        "methods": METHODS,
        "students": opts.students,
        "evaluation": {"tasks": [], "latency": False, "fidelity_texts": 12, "seeds": [0]},
    })


def warm_caches(config) -> None:
    """What one process caches for every later run: the corpus texts and tokens, the teacher's files."""
    from tadistill.data.prepare import prepare_corpus
    from tadistill.loading import load_pretrained, load_tokenizer

    tokenizer = load_tokenizer(config.teacher)
    prepare_corpus(config.data, tokenizer, seed=config.train.seed)
    load_pretrained(config.teacher)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def step_seconds(run_dir: Path, tokens_per_step: int, warmup: int) -> float:
    """Median seconds per training step after ``warmup`` steps, from the tokens/s the loop logs every step."""
    speeds = [r["tokens_per_s"] for r in _metrics(run_dir) if "tokens_per_s" in r and r["step"] > warmup]
    return median([tokens_per_step / s for s in speeds])


def final_loss(run_dir: Path) -> float:
    return [r["loss"] for r in _metrics(run_dir) if "loss" in r][-1]


def measure(opts: argparse.Namespace) -> dict:
    from tadistill import distill
    from tadistill.study.compare import compare, expand_cells

    study = study_config(opts)
    cells = expand_cells(study)
    broken = [f"{c.name}: {c.error}" for c in cells if c.config is None]
    if broken:
        raise RuntimeError("study cells do not resolve: " + "; ".join(broken))
    warm_caches(cells[0].config)
    tokens_per_step = opts.batch_size * opts.seq_len
    out: dict = {"cells": [c.name for c in cells], "separate": {}, "load_before": load_average()}
    with tempfile.TemporaryDirectory(prefix="tadistill-bench-") as tmp:
        root = Path(tmp)

        def separate(cell) -> None:
            with Stopwatch() as sw:
                result = distill(cell.config, out=root / "separate" / cell.name, progress=False)
            out["separate"][cell.name] = {
                "wall_s": sw.wall, "cpu_s": sw.cpu, "summary_s": result.summary["seconds"],
                "step_s": step_seconds(result.run_dir, tokens_per_step, opts.warmup),
                "final_loss": final_loss(result.run_dir),
            }

        half = len(cells) // 2
        for cell in cells[:half]:
            separate(cell)
        with Stopwatch() as sw:
            compare(study, out=root / "study", progress=False)
        cell_dirs = {c.name: root / "study" / "cells" / c.name for c in cells}
        summaries = {n: json.loads((d / "summary.json").read_text(encoding="utf-8")) for n, d in cell_dirs.items()}
        out["study"] = {
            "wall_s": sw.wall, "cpu_s": sw.cpu,
            "summary_s": max(s["seconds"] for s in summaries.values()),
            # Every lane logs the speed of the shared pass: one step of the study feeds all students.
            "step_s": median([step_seconds(d, tokens_per_step, opts.warmup) for d in cell_dirs.values()]),
            "final_loss": {n: final_loss(d) for n, d in cell_dirs.items()},
        }
        for cell in cells[half:]:
            separate(cell)
    out["load_after"] = load_average()
    return out


def figures(m: dict, opts: argparse.Namespace) -> list[Figure]:
    sep, study = m["separate"], m["study"]
    sep_train = sum(r["summary_s"] for r in sep.values())
    sep_step = sum(r["step_s"] for r in sep.values())
    sep_wall = sum(r["wall_s"] for r in sep.values())
    gaps = [abs(study["final_loss"][n] - r["final_loss"]) / max(abs(r["final_loss"]), 1e-12) for n, r in sep.items()]
    setting = (f"{len(sep)} students ({', '.join(m['cells'])}), {opts.steps} steps of "
               f"{opts.batch_size}x{opts.seq_len}")
    common = {"cells": m["cells"], "steps": opts.steps, "batch_size": opts.batch_size, "seq_len": opts.seq_len,
              "precision": opts.precision, "measurements": m, "final_loss_max_rel_diff": max(gaps)}
    train = Figure(
        benchmark=NAME, what="training pass (set-up + loop + saving), one study / 4 separate distill runs",
        ratio=study["summary_s"] / sep_train, target=TARGET, target_text=f"<= {TARGET}",
        details=(f"{study['summary_s']:.1f} s vs {sep_train:.1f} s (summary.json seconds); {setting}; "
                 f"end to end {study['wall_s']:.1f} s with the study's evaluation and report vs {sep_wall:.1f} s"),
        extra=common,
    )
    parts = " + ".join(f"{r['step_s'] * 1e3:.0f}" for r in sep.values())
    loop = Figure(
        benchmark=NAME, what="training loop per step (after warm-up), one study / 4 separate distill runs",
        ratio=study["step_s"] / sep_step, target=TARGET, target_text=f"<= {TARGET}",
        details=(f"{study['step_s'] * 1e3:.0f} ms vs {sep_step * 1e3:.0f} ms per step "
                 f"({parts}), median of the logged steps "
                 f"after {opts.warmup}; final losses equal to {max(gaps):.1e} (relative)"),
        extra=common,
    )
    return [train, loop]


def parse(argv: list[str] | None = None, *, quick: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shared_teacher", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    p.add_argument("--steps", type=int, default=None, help="training steps per student (default 20, quick 6)")
    p.add_argument("--warmup", type=int, default=2, help="logged steps left out of the per-step median")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--students", nargs="+", default=STUDENTS, help="student shapes LAYERSxHIDDEN[xHEADS]")
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default=None,
                   help="train.precision (default: bf16 on CUDA, else no)")
    opts = p.parse_args(argv)
    opts.quick = opts.quick or quick
    if opts.steps is None:
        opts.steps = 6 if opts.quick else 20
    if opts.precision is None:
        opts.precision = default_precision(pick_device())
    return opts


def run(argv: list[str] | None = None, *, quick: bool = False) -> list[Figure]:
    opts = parse(argv, quick=quick)
    return figures(measure(opts), opts)


def main(argv: list[str] | None = None) -> int:
    for figure in run(argv):
        print(f"{figure.what}: ratio {figure.ratio:.3f} (target {figure.target_text}: "
              f"{'met' if figure.met else 'MISSED'}); {figure.details}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
