"""What ``train.compile=true`` (torch.compile of the student's and teacher's forward) does to a training step.

Two runs of ``tadistill.distill`` on the built-in teacher (all-MiniLM-L6-v2) and corpus, student 3x384,
batches of 8 x 128 tokens, identical but for ``train.compile``: eager first, then compiled, then (not in
quick mode) eager and compiled again, so that a drift of the machine's load hits both arms. Each run is a
fresh ``distill()`` call: the compiled one pays its compilation inside the run.

Figures, for each objective (``hs``, ``minilmv2``):

* step time, compiled / eager: the median time per step from the ``tokens_per_s`` each run logs every step,
  leaving out the first ``--warmup`` steps (the compiled run compiles during its first step and first
  evaluation). Target <= 1: compiling should not slow the loop down. torch.compile's gains come from
  fusing element-wise work into few kernels, which pays most on GPUs; on a CPU the matmuls dominate.
* compile cost: the compiled run's wall time minus the eager run's, in seconds, reported beside it.

The final losses of the two arms are compared (same math: they agree to float tolerance).

Run alone: ``python benchmarks/compile_effect.py [--quick] [--steps 40 --batch-size 32 --seq-len 128]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

if __package__:  # imported as benchmarks.compile_effect
    from .common import Figure, Stopwatch, cores_text, default_precision, median, pick_device, print_figures
else:  # run as a script, or imported by run.py with benchmarks/ on sys.path
    from common import Figure, Stopwatch, cores_text, default_precision, median, pick_device, print_figures

NAME = "compile_effect"
HOW = ("tadistill.distill twice per objective, identical but for train.compile (eager, compiled, eager, compiled); "
       "per-step time from the logged tokens/s after warm-up; compile cost = wall time difference.")
TARGET = 1.0
OBJECTIVES = {"hs": ["objectives.hidden.mapping=uniform"], "minilmv2": ["objectives.minilmv2.relation_heads=12"]}


def _metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def one_run(objective: str, compiled: bool, opts: argparse.Namespace, out: Path) -> dict:
    from tadistill import distill, resolve_config

    overrides = [
        "student.num_layers=3", f"train.steps={opts.steps}", f"train.batch_size={opts.batch_size}",
        f"data.max_length={opts.seq_len}", f"train.precision='{opts.precision}'", "train.eval_every=0",
        "train.eval_batches=1", "train.save_every=0", "train.log_every=1", f"train.compile={str(compiled).lower()}",
        *OBJECTIVES[objective],
    ]
    config = resolve_config(objective, overrides=overrides)
    with Stopwatch() as sw:
        result = distill(config, out=out, progress=False)
    records = _metrics(result.run_dir)
    tokens = opts.batch_size * opts.seq_len
    steps = [tokens / r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > opts.warmup]
    return {"wall_s": sw.wall, "elsewhere_cores": sw.elsewhere, "step_s": median(steps),
            "first_step_s": next(tokens / r["tokens_per_s"] for r in records if "tokens_per_s" in r),
            "final_loss": [r["loss"] for r in records if "loss" in r][-1]}


def measure(opts: argparse.Namespace) -> dict:
    from tadistill import resolve_config
    from tadistill.data.prepare import prepare_corpus
    from tadistill.loading import load_tokenizer

    # The corpus text and tokens are built once, outside the timings (both arms would find them cached).
    warm = resolve_config("hs", overrides=[f"data.max_length={opts.seq_len}"])
    prepare_corpus(warm.data, load_tokenizer(warm.teacher), seed=warm.train.seed)
    order = [False, True] if opts.quick else [False, True, False, True]
    runs: dict = {}
    with tempfile.TemporaryDirectory(prefix="tadistill-bench-") as tmp:
        for objective in opts.objectives:
            for i, compiled in enumerate(order):
                arm = "compiled" if compiled else "eager"
                runs.setdefault(objective, {}).setdefault(arm, []).append(
                    one_run(objective, compiled, opts, Path(tmp) / f"{objective}-{i}"))
    return runs


def figures(runs: dict, opts: argparse.Namespace) -> list[Figure]:
    out = []
    for objective, arms in runs.items():
        eager = median([r["step_s"] for r in arms["eager"]])
        compiled = median([r["step_s"] for r in arms["compiled"]])
        cost = median([c["wall_s"] - e["wall_s"] for c, e in zip(arms["compiled"], arms["eager"])])
        loss_gap = max(abs(c["final_loss"] - e["final_loss"]) / max(abs(e["final_loss"]), 1e-12)
                       for c, e in zip(arms["compiled"], arms["eager"]))
        busy = [r["elsewhere_cores"] for rs in arms.values() for r in rs]
        out.append(Figure(
            benchmark=NAME,
            what=f"{objective}: step time with train.compile / without ({opts.steps} steps of "
                 f"{opts.batch_size}x{opts.seq_len}, student 3x384)",
            ratio=compiled / eager, target=TARGET, target_text=f"<= {TARGET}",
            details=(f"{compiled * 1e3:.0f} ms vs {eager * 1e3:.0f} ms per step (median after {opts.warmup}); "
                     f"compiling cost {cost:.0f} s of wall time (first compiled step "
                     f"{median([r['first_step_s'] for r in arms['compiled']]):.1f} s); final losses equal to "
                     f"{loss_gap:.1e} (relative); other processes busy on "
                     f"{cores_text(max((b for b in busy if b is not None), default=None))} cores at most"),
            extra={"runs": arms, "steps": opts.steps, "batch_size": opts.batch_size, "seq_len": opts.seq_len,
                   "precision": opts.precision, "compile_cost_s": cost, "final_loss_max_rel_diff": loss_gap},
        ))
    return out


def parse(argv: list[str] | None = None, *, quick: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="compile_effect", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one run per arm, fewer steps, hs only")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 24, quick 8)")
    p.add_argument("--warmup", type=int, default=3, help="logged steps left out of the per-step median")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--objectives", nargs="+", choices=sorted(OBJECTIVES), default=None)
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default=None,
                   help="train.precision (default: bf16 on CUDA, else no)")
    opts = p.parse_args(argv)
    opts.quick = opts.quick or quick
    if opts.steps is None:
        opts.steps = 8 if opts.quick else 24
    if opts.objectives is None:
        opts.objectives = ["hs"] if opts.quick else list(OBJECTIVES)
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
