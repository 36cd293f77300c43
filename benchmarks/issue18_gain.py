"""Issue 18: does distillation at the built-in budget make the student better than its initialisation?

One call = one cell: a recipe with overrides, one training seed. It scores the untrained student (the
student the config builds, before step 1), trains it with ``tadistill.api.distill``, scores the result,
and appends one JSON line to ``OUT/results.jsonl``. The teacher is scored once (``OUT/teacher.json``).
Scores: stdlib-retrieval (acc@1, MRR; zero-shot cosine, pairs not in the corpus) and stdlib-topic
(linear probe accuracy), each over evaluation seeds 0, 1, 2 (mean and std).

    .venv/bin/python benchmarks/issue18_gain.py --name demo-s0 --out runs/issue18            # the demo
    .venv/bin/python benchmarks/issue18_gain.py --name emb-s0 --out runs/issue18 \\
        --set "objectives=[{kind: minilmv2}, {kind: embedding, loss: cosine}]"
    .venv/bin/python benchmarks/issue18_gain.py --table runs/issue18                          # the table

The CPU is shared: ``--threads`` (default 2). Everything else is the demo's config (cli/main.py
DEMO_RECIPE and DEMO_OVERRIDES) plus ``--set`` overrides.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

EVAL_SEEDS = (0, 1, 2)
TASKS = ("stdlib-retrieval", "stdlib-topic")


def scores(model_dir: str, *, max_length: int = 128) -> dict[str, float]:
    """Flat ``<task>/<metric>`` and ``<task>/<metric>_std`` of both built-in tasks."""
    from tadistill.evaluation.downstream import evaluate_task

    row: dict[str, float] = {}
    for task in TASKS:
        result = evaluate_task(model_dir, task, mode="probe", seeds=EVAL_SEEDS, max_train=2000, max_eval=1000,
                               max_length=max_length)
        for metric, stats in result["metrics"].items():
            row[f"{task}/{metric}"] = round(stats["mean"], 4)
            row[f"{task}/{metric}_std"] = round(stats["std"], 4)
    return row


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


def run_cell(name: str, overrides: list[str], out: Path) -> dict:
    from tadistill.api import distill
    from tadistill.cli.main import DEMO_OVERRIDES, DEMO_RECIPE
    from tadistill.resolve import resolve_config

    out.mkdir(parents=True, exist_ok=True)
    teacher_file = out / "teacher.json"
    if not teacher_file.is_file():
        teacher_file.write_text(json.dumps(scores("builtin"), indent=1))
    config = resolve_config(DEMO_RECIPE, overrides=[*DEMO_OVERRIDES, *overrides])
    # A student copied from the teacher is the same for every training seed; a random one is not.
    seed = str(config.train.seed) if config.student.init == "random" else ""
    student_keys = config.student.model_dump_json() + config.teacher + seed
    init_dir = out / "init" / hashlib.sha256(student_keys.encode()).hexdigest()[:12]
    init_file = init_dir / "scores.json"
    if not init_file.is_file():  # the same initial student for every cell that builds it
        save_initial_student(config, init_dir)
        init_file.write_text(json.dumps(scores(str(init_dir)), indent=1))
    began = time.perf_counter()
    result = distill(config, out=out / "cells" / name, overwrite=True, progress=False)
    seconds = round(time.perf_counter() - began, 1)
    row = {"name": name, "set": overrides, "seed": config.train.seed, "train_seconds": seconds,
           "heldout_loss": [result.summary.get("heldout_loss_start"), result.summary.get("heldout_loss_end")],
           "init": json.loads(init_file.read_text()), "final": scores(str(result.student_dir))}
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def table(out: Path) -> str:
    teacher = json.loads((out / "teacher.json").read_text())
    head = ["cell", "train s", "retrieval acc@1 init -> final", "MRR init -> final", "topic acc init -> final"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = ("stdlib-retrieval/acc@1", "stdlib-retrieval/mrr", "stdlib-topic/accuracy")

    def cell(row: dict | None, key: str) -> str:
        return "" if row is None else f"{row[key]:.4f} ± {row[key + '_std']:.4f}"

    lines.append("| teacher | | " + " | ".join(cell(teacher, k) for k in keys) + " |")
    for line in (out / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        parts = [f"{row['init'][k]:.4f} -> {row['final'][k]:.4f} (±{row['final'][k + '_std']:.4f})" for k in keys]
        lines.append(f"| {row['name']} | {row['train_seconds']:.0f} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/issue18")
    parser.add_argument("--name")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="print the table of OUT/results.jsonl and exit")
    args = parser.parse_args()
    if args.table:
        print(table(Path(args.out)))
        return
    torch.set_num_threads(args.threads)
    row = run_cell(args.name, args.overrides, Path(args.out))
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
