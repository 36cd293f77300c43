"""A 4-student study that shares one teacher pass, against the same 4 students trained by 4 separate runs.

The study is ``tadistill.study.compare`` with methods hs (uniform mapping) and minilmv2 x students 3x384 and
6x192 on the built-in teacher and corpus, evaluation kept minimal (no tasks, no latency, 12 fidelity texts).
The separate runs are ``tadistill.distill`` on exactly the configs the study resolves for its cells
(``tadistill.study.compare.expand_cells``), so both arms train the same students with the same settings.

Two ratios, study / separate:

* training pass: the wall time of the study's training pass (``compare()``'s call of ``train_cells``: its
  evaluation and report come after and are left out) against the sum of the 4 ``distill()`` calls, with
  the process CPU time of both beside it (less sensitive to other jobs on a shared machine). Both include
  each run's set-up and finish (teacher and students, corpus, the start and end sentence-embedding checks,
  the held-out evaluations, the final checkpoint, saving the student), which weigh more in a short
  benchmark run than in a long training run;
* loop steps only: the per-step time of the training loop (from the ``tokens_per_s`` each run logs every
  step, after warm-up), one study step against the sum of one step of each separate run. This is the
  figure that holds for long runs. Next to it: one teacher forward on a training batch, timed alone, and
  the best ratio a shared pass could reach with it, (sum of separate steps - 3 teacher forwards) / sum.

Work that one Python process caches for both arms (building the built-in corpus text, about 6 s; the
tokenized corpus; the teacher's files) is done once before anything is timed. The runs are ordered
separate, separate, study, separate, separate, so that a drift of the machine's load hits both arms.

Run alone: ``python benchmarks/shared_teacher.py [--quick] [--steps 200 --batch-size 32 --seq-len 128]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

if __package__:  # imported as benchmarks.shared_teacher
    from .common import (
        Figure,
        Stopwatch,
        cores_text,
        default_precision,
        load_average,
        median,
        pick_device,
        print_figures,
        sync,
    )
else:  # run as a script, or imported by run.py with benchmarks/ on sys.path
    from common import (
        Figure,
        Stopwatch,
        cores_text,
        default_precision,
        load_average,
        median,
        pick_device,
        print_figures,
        sync,
    )

NAME = "shared_teacher"
HOW = ("tadistill.study.compare trains 4 students in one pass (one teacher forward per batch); tadistill.distill "
       "trains the same 4 configs one by one (order: 2 runs, the study, 2 runs). Training pass: wall time of the "
       "study's train_cells against the 4 distill() calls; loop: per-step time from the logged tokens/s.")
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
        "teacher": opts.teacher,
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


def teacher_forward_seconds(config, repeats: int = 7) -> float:
    """Median time of one teacher forward (inference_mode) on one training batch: what sharing saves per student."""
    from tadistill.data.batches import collate
    from tadistill.data.prepare import prepare_corpus
    from tadistill.loading import load_pretrained, load_tokenizer

    tokenizer = load_tokenizer(config.teacher)
    teacher = load_pretrained(config.teacher).eval()
    device = pick_device()
    teacher.to(device)
    train = prepare_corpus(config.data, tokenizer, seed=config.train.seed).train
    batch = collate([train[i] for i in range(config.train.batch_size)], pad_id=tokenizer.pad_token_id or 0,
                    special_ids=tokenizer.all_special_ids)
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    dtype = torch.bfloat16 if config.train.precision == "bf16" else torch.float16
    cast = torch.autocast(device.type, dtype=dtype, enabled=config.train.precision != "no")
    times = []
    for _ in range(repeats + 2):  # the first two warm up
        sync(device)
        began = time.perf_counter()
        with torch.inference_mode(), cast:
            teacher(**inputs)
        sync(device)
        times.append(time.perf_counter() - began)
    return median(times[2:])


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
    import tadistill.study.compare as study_module
    from tadistill import distill

    study = study_config(opts)
    cells = study_module.expand_cells(study)
    broken = [f"{c.name}: {c.error}" for c in cells if c.config is None]
    if broken:
        raise RuntimeError("study cells do not resolve: " + "; ".join(broken))
    warm_caches(cells[0].config)
    tokens_per_step = opts.batch_size * opts.seq_len
    out: dict = {"cells": [c.name for c in cells], "separate": {}, "load": [load_average()]}
    with tempfile.TemporaryDirectory(prefix="tadistill-bench-") as tmp:
        root = Path(tmp)

        def separate(cell) -> None:
            with Stopwatch() as sw:
                result = distill(cell.config, out=root / "separate" / cell.name, progress=False)
            out["separate"][cell.name] = {
                "train_wall_s": sw.wall, "train_cpu_s": sw.cpu, "summary_s": result.summary["seconds"],
                "elsewhere_cores": sw.elsewhere,
                "step_s": step_seconds(result.run_dir, tokens_per_step, opts.warmup),
                "final_loss": final_loss(result.run_dir),
            }
            out["load"].append(load_average())

        # compare() has no hook that reports its phases: time its training pass by wrapping the module-level
        # train_cells it calls (evaluation and report come after it).
        train_cells, phase = study_module.train_cells, {}

        def timed_train_cells(*args, **kwargs):
            with Stopwatch() as sw:
                train_cells(*args, **kwargs)
            phase["wall"], phase["cpu"], phase["elsewhere"] = sw.wall, sw.cpu, sw.elsewhere

        half = len(cells) // 2
        for cell in cells[:half]:
            separate(cell)
        study_module.train_cells = timed_train_cells
        try:
            with Stopwatch() as sw:
                study_module.compare(study, out=root / "study", progress=False)
        finally:
            study_module.train_cells = train_cells
        out["load"].append(load_average())
        cell_dirs = {c.name: root / "study" / "cells" / c.name for c in cells}
        out["study"] = {
            "train_wall_s": phase["wall"], "train_cpu_s": phase["cpu"], "elsewhere_cores": phase["elsewhere"],
            "compare_wall_s": sw.wall,
            "compare_cpu_s": sw.cpu,
            # Every lane logs the speed of the shared pass: one step of the study feeds all students.
            "step_s": median([step_seconds(d, tokens_per_step, opts.warmup) for d in cell_dirs.values()]),
            "final_loss": {n: final_loss(d) for n, d in cell_dirs.items()},
        }
        for cell in cells[half:]:
            separate(cell)
    out["teacher_forward_s"] = teacher_forward_seconds(cells[0].config)
    return out


def figures(m: dict, opts: argparse.Namespace) -> list[Figure]:
    sep, study = m["separate"], m["study"]
    sep_train = sum(r["train_wall_s"] for r in sep.values())
    sep_cpu = sum(r["train_cpu_s"] for r in sep.values())
    sep_step = sum(r["step_s"] for r in sep.values())
    busy = [r["elsewhere_cores"] for r in sep.values()]
    sep_busy = (None if None in busy
                else sum(b * r["train_wall_s"] for b, r in zip(busy, sep.values())) / sep_train)
    load = (f"other processes busy on {cores_text(study['elsewhere_cores'])} cores during the study, "
            f"{cores_text(sep_busy)} during the separate runs")
    gaps = [abs(study["final_loss"][n] - r["final_loss"]) / max(abs(r["final_loss"]), 1e-12) for n, r in sep.items()]
    setting = (f"{len(sep)} students ({', '.join(m['cells'])}), {opts.steps} steps of "
               f"{opts.batch_size}x{opts.seq_len}")
    common = {"cells": m["cells"], "steps": opts.steps, "batch_size": opts.batch_size, "seq_len": opts.seq_len,
              "precision": opts.precision, "measurements": m, "final_loss_max_rel_diff": max(gaps)}
    train = Figure(
        benchmark=NAME, what="training pass (set-up + loop + saving), one study / 4 separate distill runs",
        ratio=study["train_wall_s"] / sep_train, target=TARGET, target_text=f"<= {TARGET}",
        details=(f"{study['train_wall_s']:.1f} s vs {sep_train:.1f} s wall (CPU time {study['train_cpu_s']:.0f} s vs "
                 f"{sep_cpu:.0f} s, ratio {study['train_cpu_s'] / sep_cpu:.2f}); {setting}; compare() with its "
                 f"minimal evaluation and report took {study['compare_wall_s']:.1f} s in all; {load}"),
        extra=common,
    )
    parts = " + ".join(f"{r['step_s'] * 1e3:.0f}" for r in sep.values())
    # The most one shared pass can save: every separate run's teacher forward but one.
    teacher_s = m["teacher_forward_s"]
    best = (sep_step - (len(sep) - 1) * teacher_s) / sep_step
    loop = Figure(
        benchmark=NAME, what="training loop per step (after warm-up), one study / 4 separate distill runs",
        ratio=study["step_s"] / sep_step, target=TARGET, target_text=f"<= {TARGET}",
        details=(f"{study['step_s'] * 1e3:.0f} ms vs {sep_step * 1e3:.0f} ms per step "
                 f"({parts}), median of the logged steps after {opts.warmup}; one teacher forward takes "
                 f"{teacher_s * 1e3:.0f} ms, so the best a shared pass can reach here is {best:.2f}; final losses "
                 f"equal to {max(gaps):.1e} (relative); {load}"),
        extra={**common, "best_possible_ratio": best, "teacher_forward_s": teacher_s},
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
    p.add_argument("--teacher", default="builtin", help="teacher (local folder; default the built-in MiniLM)")
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
    return print_figures(run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
