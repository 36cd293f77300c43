"""Issue 18: does distillation at the built-in budget make the student better than its initialisation?

One call = one cell: a recipe with overrides, one training seed. It scores the untrained student (the
student the config builds, before step 1), trains it with ``tadistill.api.distill``, scores the result,
and appends one JSON line to ``OUT/results.jsonl``. The teacher is scored once (``OUT/teacher.json``).
Scores: stdlib-retrieval (acc@1, MRR; zero-shot cosine, pairs not in the corpus) and stdlib-topic
(linear probe accuracy), each over evaluation seeds 0, 1, 2 (mean and std).

    .venv/bin/python benchmarks/issue18_gain.py --name demo-s0 --out runs/issue18            # the demo
    .venv/bin/python benchmarks/issue18_gain.py --name emb-s0 --out runs/issue18 \\
        --set "objectives=[{kind: minilmv2}, {kind: embedding, loss: cosine}]"
    .venv/bin/python benchmarks/issue18_gain.py --name w-imp --out runs/issue18 --init-only \\
        --set student.num_layers=6 --set student.hidden_size=192 --set student.num_heads=6 \\
        --set student.init=importance                                    # an initial student only
    .venv/bin/python benchmarks/issue18_gain.py --table runs/issue18                          # the table

The CPU is shared: ``--threads`` (default 2). Everything else is the demo's config (cli/main.py
DEMO_RECIPE and DEMO_OVERRIDES) plus ``--set`` overrides.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

EVAL_SEEDS = (0, 1, 2)


def retrieval_runs(model_dir: str, *, max_length: int = 128) -> list[dict[str, float]]:
    """stdlib-retrieval per evaluation seed (the same draws for every model: differences are paired)."""
    from tadistill.data.builtin_tasks import stdlib_retrieval_pairs
    from tadistill.evaluation.retrieval import retrieval_runs as runs
    from tadistill.loading import load_pretrained, load_tokenizer

    model = load_pretrained(model_dir, head="base", what="model")
    return runs(model, load_tokenizer(model_dir), stdlib_retrieval_pairs(), seeds=EVAL_SEEDS, max_length=max_length)


def scores(model_dir: str, *, max_length: int = 128) -> dict:
    """Flat ``<task>/<metric>`` and ``<task>/<metric>_std`` of both built-in tasks, plus the retrieval
    scores per evaluation seed (``stdlib-retrieval/runs``)."""
    import statistics

    from tadistill.evaluation.downstream import evaluate_task

    runs = retrieval_runs(model_dir, max_length=max_length)
    row: dict = {}
    for metric in ("acc@1", "mrr"):
        values = [r[metric] for r in runs]
        row[f"stdlib-retrieval/{metric}"] = round(statistics.fmean(values), 4)
        row[f"stdlib-retrieval/{metric}_std"] = round(statistics.stdev(values), 4)
    row["stdlib-retrieval/runs"] = runs
    result = evaluate_task(model_dir, "stdlib-topic", mode="probe", seeds=EVAL_SEEDS, max_train=2000, max_eval=1000,
                           max_length=max_length)
    for metric, stats in result["metrics"].items():
        row[f"stdlib-topic/{metric}"] = round(stats["mean"], 4)
        row[f"stdlib-topic/{metric}_std"] = round(stats["std"], 4)
    return row


def paired(init: dict, final: dict, metric: str) -> str:
    """final - init per evaluation seed: mean ± sample std (the same draws for both models)."""
    import statistics

    a, b = init.get("stdlib-retrieval/runs"), final.get("stdlib-retrieval/runs")
    if not a or not b:
        return ""
    diffs = [y[metric] - x[metric] for x, y in zip(a, b)]
    return f"{statistics.fmean(diffs):+.4f} ± {statistics.stdev(diffs):.4f}"


def save_initial_student(config, folder: Path) -> None:
    """The student ``config`` describes, before any training step, as a checkpoint folder."""
    from tadistill.loading import load_pretrained, load_tokenizer
    from tadistill.students.spec import build_student_from_spec

    teacher = load_pretrained(config.teacher, head="base", what="teacher")
    tokenizer = load_tokenizer(config.teacher)
    torch.manual_seed(config.train.seed)
    student = build_student_from_spec(config, teacher, tokenizer, head="base")
    student.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def run_cell(name: str, overrides: list[str], out: Path, *, init_only: bool = False) -> dict:
    from tadistill.api import distill
    from tadistill.cli.main import DEMO_OVERRIDES, DEMO_RECIPE
    from tadistill.resolve import resolve_config

    out.mkdir(parents=True, exist_ok=True)
    teacher_file = out / "teacher.json"
    if not teacher_file.is_file():
        teacher_file.write_text(json.dumps(scores("builtin"), indent=1))
    config = resolve_config(DEMO_RECIPE, overrides=[*DEMO_OVERRIDES, *overrides])
    # A student copied from the teacher is the same for every training seed; a random one is not, nor one
    # sliced by importance (its calibration batches follow the seed's data order).
    seed = "" if config.student.init == "teacher" else str(config.train.seed)
    # Only what decides the initial weights: fields other engineers add to StudentConfig must not re-key it.
    shape = config.student.model_dump(include={"num_layers", "hidden_size", "num_heads", "intermediate_size", "init",
                                               "init_layers", "pretrained"})
    if config.student.init == "importance":  # ranked on calibration batches of the training data
        shape["calibration"] = [config.data.model_dump_json(include={"source", "max_length", "packing"}),
                                config.prune.calibration_batches, config.train.batch_size]
    student_keys = json.dumps(shape, sort_keys=True) + config.teacher + seed
    init_dir = out / "init" / hashlib.sha256(student_keys.encode()).hexdigest()[:12]
    init_file = init_dir / "scores.json"
    if not init_file.is_file():  # the same initial student for every cell that builds it
        save_initial_student(config, init_dir)
        init_file.write_text(json.dumps(scores(str(init_dir)), indent=1))
    if init_only:  # e.g. slicing by importance against leading rows and columns: no training needed
        row = {"name": name, "set": overrides, "seed": config.train.seed, "init": json.loads(init_file.read_text())}
        with (out / "inits.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    result = distill(config, out=out / "cells" / name, overwrite=True, progress=False)
    seconds = round(time.perf_counter() - began, 1)
    # The CPU is shared: the 1-minute load average before and after training says how much.
    row = {"name": name, "set": overrides, "seed": config.train.seed, "train_seconds": seconds,
           "steps": config.train.steps, "s_per_step": round(seconds / config.train.steps, 2),
           "load": [round(load_before, 2), round(os.getloadavg()[0], 2)], "threads": torch.get_num_threads(),
           "command": " ".join(sys.argv),
           "heldout_loss": [result.summary.get("heldout_loss_start"), result.summary.get("heldout_loss_end")],
           "init": json.loads(init_file.read_text()), "final": scores(str(result.student_dir))}
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def table(out: Path) -> str:
    """Markdown: the teacher, every trained cell (init -> final, paired differences), every scored init."""
    teacher = json.loads((out / "teacher.json").read_text())
    head = ["cell", "steps", "train s (s/step, load)", "retrieval acc@1 init -> final", "paired diff",
            "MRR init -> final", "paired diff", "topic acc init -> final"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(row: dict, key: str) -> str:
        return f"{row[key]:.4f} ± {row[key + '_std']:.4f}"

    r, m, t = "stdlib-retrieval/acc@1", "stdlib-retrieval/mrr", "stdlib-topic/accuracy"
    lines.append(f"| teacher | | | {cell(teacher, r)} | | {cell(teacher, m)} | | {cell(teacher, t)} |")
    results = out / "results.jsonl"
    for line in results.read_text().splitlines() if results.is_file() else []:
        row = json.loads(line)
        init, final = row["init"], row["final"]

        def change(key: str, init: dict = init, final: dict = final) -> str:
            return f"{cell(init, key)} -> {cell(final, key)}"

        load = "-".join(f"{x:.1f}" for x in row.get("load", []))
        timing = f"{row['train_seconds']:.0f} ({row.get('s_per_step', '?')}, {load})"
        lines.append(f"| {row['name']} | {row.get('steps', '')} | {timing} | {change(r)} | "
                     f"{paired(init, final, 'acc@1')} | {change(m)} | {paired(init, final, 'mrr')} | {change(t)} |")
    inits = out / "inits.jsonl"
    for line in inits.read_text().splitlines() if inits.is_file() else []:
        row = json.loads(line)
        lines.append(f"| {row['name']} (init only) | 0 | | {cell(row['init'], r)} | | {cell(row['init'], m)} | | "
                     f"{cell(row['init'], t)} |")
    return "\n".join(lines)


def backfill(out: Path) -> None:
    """Add per-seed retrieval scores to results and initial students written before they were kept."""
    for init_file in sorted((out / "init").glob("*/scores.json")):
        row = json.loads(init_file.read_text())
        if "stdlib-retrieval/runs" not in row:
            row["stdlib-retrieval/runs"] = retrieval_runs(str(init_file.parent))
            init_file.write_text(json.dumps(row, indent=1))
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    for row in rows:
        cell = out / "cells" / row["name"] / "student"
        if "stdlib-retrieval/runs" not in row["final"]:
            row["final"]["stdlib-retrieval/runs"] = retrieval_runs(str(cell))
        init_dirs = [f.parent for f in (out / "init").glob("*/scores.json")
                     if json.loads(f.read_text())["stdlib-topic/accuracy"] == row["init"]["stdlib-topic/accuracy"]
                     and json.loads(f.read_text())["stdlib-retrieval/mrr"] == row["init"]["stdlib-retrieval/mrr"]]
        if "stdlib-retrieval/runs" not in row["init"] and init_dirs:
            row["init"] = json.loads((init_dirs[0] / "scores.json").read_text())
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/issue18")
    parser.add_argument("--name")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="print the table of OUT/results.jsonl and exit")
    parser.add_argument("--init-only", action="store_true",
                        help="score the initial student only (appended to OUT/inits.jsonl), no training")
    parser.add_argument("--backfill", action="store_true", help="add per-seed retrieval scores missing from OUT")
    args = parser.parse_args()
    if args.table:
        print(table(Path(args.out)))
        return
    torch.set_num_threads(args.threads)
    if args.backfill:
        backfill(Path(args.out))
        return
    row = run_cell(args.name, args.overrides, Path(args.out), init_only=args.init_only)
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
