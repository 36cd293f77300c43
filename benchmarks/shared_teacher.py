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
* loop steps only, side by side: in one process, the study's Trainer (4 lanes) and the 4 separate runs'
  Trainers (built by the same set-up, ``RunSetup``, teacher cut as in a run) take their steps in rotation:
  one study step, one step of each separate run, one teacher forward alone (``Trainer._teacher_outputs`` on
  a training batch: what each extra separate run pays), the order rotating every step. The figure is the
  median study step over the median sum of the 4 separate steps; next to it the bound, the best ratio a
  shared pass can reach, (sum - 3 teacher forwards) / sum, from the same rotation. The losses of every
  step are compared lane by lane. This is the figure that holds for long runs. The per-step times the
  sequential runs above log (``tokens_per_s``) are in the details, as a second reading.

Timings use one torch thread by default (``--threads``; see ``common.torch_threads``): with two, another
job on a 2-core machine turns every parallel op into a wait for the thread the scheduler parked.

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
        torch_threads,
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
        torch_threads,
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
        out["load"].append(load_average())
        out["steps_side_by_side"] = interleaved_steps(cells, opts, root)
        out["load"].append(load_average())
    out["teacher_forward_s"] = teacher_forward_seconds(cells[0].config)
    return out


def interleaved_steps(cells, opts: argparse.Namespace, root: Path) -> dict:
    """Study step, the 4 separate runs' steps and one teacher forward in rotation, in this process (module doc)."""
    from contextlib import ExitStack

    from tadistill.capture.hooks import capture
    from tadistill.training.loop import TokenizerInfo, Trainer
    from tadistill.training.rundir import RunDir
    from tadistill.training.setup import Cell, RunSetup, blocks_read_only

    stack = ExitStack()

    def trainer_of(group, name: str):
        """A Trainer over ``group``'s cells as ``RunSetup.train`` builds it, with its captures open."""
        setup = RunSetup([Cell(c.name, c.config, RunDir(root / name / c.name)) for c in group])
        for lane in setup.lanes:
            lane.run.prepare(lane.config, resume=False, overwrite=False)
        arch = stack.enter_context(blocks_read_only(setup.teacher, setup.teacher_arch, setup.lanes))
        trainer = Trainer(setup.lanes, setup.accelerator, teacher=setup.teacher, teacher_arch=arch,
                          train=setup.splits.train, heldout=setup.splits.heldout,
                          tokenizer=TokenizerInfo.of(setup.tokenizer), checkpoints=root / name / "checkpoints",
                          state_yaml="", progress=False)
        for lane in trainer.lanes:  # what Trainer.run() opens around its steps
            trainer.captured[lane.name] = stack.enter_context(capture(lane.student, lane.student_arch, lane.request))
        return trainer, stack.enter_context(capture(trainer.teacher, trainer.teacher_arch, trainer.teacher_request))

    arms = ("study", "separate", "teacher")
    wall: dict[str, list[float]] = {a: [] for a in arms}
    cpu: dict[str, list[float]] = {a: [] for a in arms}
    gaps: list[float] = []
    with stack:
        separate = [trainer_of([cell], f"step-{cell.name}") for cell in cells]
        study, study_cap = trainer_of(cells, "step-study")
        with Stopwatch() as sw:
            for step in range(1, opts.steps + 1):
                rows: dict[str, dict] = {}
                for arm in arms[step % 3:] + arms[:step % 3]:  # rotate which arm goes first
                    began, began_cpu = time.perf_counter(), time.thread_time()
                    if arm == "study":
                        rows["study"] = study._step(step, study_cap)[0]
                    elif arm == "separate":
                        for trainer, cap in separate:
                            rows.update(trainer._step(step, cap)[0])
                    else:
                        micro = study._micro_batches(step)[0]
                        study._teacher_outputs(micro.variants[False], study_cap, False, ("train", micro.indices))
                    sync(study.acc.device)
                    wall[arm].append(time.perf_counter() - began)
                    cpu[arm].append(time.thread_time() - began_cpu)
                gaps += [abs(rows["study"][c.name]["loss"] - rows[c.name]["loss"]) / max(abs(rows[c.name]["loss"]), 1e-12)
                         for c in cells]
    return {"wall_s": wall, "thread_cpu_s": cpu, "loss_max_rel_diff": max(gaps), "elsewhere_cores": sw.elsewhere}


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
    # The sequential runs' logged per-step times (a second reading, from different moments of the machine).
    logged = study["step_s"] / sep_step
    parts = " + ".join(f"{r['step_s'] * 1e3:.0f}" for r in sep.values())
    side = m["steps_side_by_side"]
    w = opts.warmup

    def med(kind: str, arm: str) -> float:
        return median(side[kind][arm][w:])

    ratio = med("wall_s", "study") / med("wall_s", "separate")
    # The most one shared pass can save: every separate run's teacher forward but one.
    bound = (med("wall_s", "separate") - (len(sep) - 1) * med("wall_s", "teacher")) / med("wall_s", "separate")
    cpu_ratio = med("thread_cpu_s", "study") / med("thread_cpu_s", "separate")
    cpu_bound = ((med("thread_cpu_s", "separate") - (len(sep) - 1) * med("thread_cpu_s", "teacher"))
                 / med("thread_cpu_s", "separate"))
    loop = Figure(
        benchmark=NAME, what="training loop per step, one study / 4 separate runs, side by side in one process",
        ratio=ratio, target=TARGET, target_text=f"<= {TARGET}",
        details=(f"bound {bound:.3f}: ratio {ratio / bound:.3f}x the bound; study step "
                 f"{med('wall_s', 'study') * 1e3:,.0f} ms vs {med('wall_s', 'separate') * 1e3:,.0f} ms for the 4 "
                 f"separate steps, one teacher forward {med('wall_s', 'teacher') * 1e3:,.0f} ms (medians of "
                 f"{opts.steps - w} rotations after {w}); thread CPU time {cpu_ratio:.3f} (bound {cpu_bound:.3f}); "
                 f"losses equal to {side['loss_max_rel_diff']:.1e} at every step; {opts.threads or 'default'} torch "
                 f"thread(s); other processes busy on {cores_text(side['elsewhere_cores'])} cores; load "
                 f"{m['load'][-2:]}. Logged by the sequential runs: {study['step_s'] * 1e3:.0f} ms vs "
                 f"{sep_step * 1e3:.0f} ms ({parts}), {logged:.3f}; teacher forward alone "
                 f"{m['teacher_forward_s'] * 1e3:.0f} ms"),
        extra={**common, "best_possible_ratio": bound, "ratio_to_bound": ratio / bound,
               "thread_cpu_ratio": cpu_ratio, "thread_cpu_bound": cpu_bound, "logged_ratio": logged,
               "teacher_forward_s": m["teacher_forward_s"], "torch_threads": opts.threads},
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
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: see common.torch_threads; 0 leaves torch's setting)")
    opts = p.parse_args(argv)
    opts.quick = opts.quick or quick
    if opts.steps is None:
        opts.steps = 6 if opts.quick else 20
    if opts.precision is None:
        opts.precision = default_precision(pick_device())
    return opts


def run(argv: list[str] | None = None, *, quick: bool = False) -> list[Figure]:
    opts = parse(argv, quick=quick)
    with torch_threads(opts.threads):
        measured = measure(opts)
    return figures(measured, opts)


def main(argv: list[str] | None = None) -> int:
    return print_figures(run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
