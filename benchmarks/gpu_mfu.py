"""Model FLOPs utilisation (MFU) of tadistill's training step on larger random models built from configs.

* ``minilmv2``: a 12x768 BERT teacher (BERT-base's shape) -> 6x768 student, MiniLMv2's Q-Q / K-K / V-V relations of
  the last block (48 relation heads), 128 x 512 tokens a step;
* ``kd``: a Llama of Llama 3.2 1B's shape (16 x 2048, 32 query / 8 key-value heads, FFN 8192, 128,256-token
  vocabulary, tied embeddings: 1.24B parameters) -> 8 x 2048 student from every other teacher block, forward KL of
  next-token distributions through the chunked logits (2,048 rows a chunk), 32 x 2048 tokens a step.

Both through tadistill's real loop (``RunSetup`` and ``Trainer.run``, bf16 autocast, teacher stored in bf16).

MFU (Chowdhery et al. 2022, PaLM, appendix B) = model FLOPs per second / the GPU's peak. Model FLOPs of a step =
tokens x (3 F_S + F_T): the student's forward and backward (backward = 2 forwards) and the teacher's forward, with
F from ``tadistill.evaluation.cost.flops_per_token`` (2 per multiply-accumulate, attention over all n positions, the
output layer where it runs). Work that is not in that count costs MFU: the chunked loss recomputes the output layer
of all but one chunk in backward, the relation and divergence losses, AdamW, the loop's bookkeeping. Step time: start
of one optimizer step to the start of the next (the loop reads the loss back every step, so queued GPU work is
done), median over the steps after warm-up. Peak: dense bf16 of the GPU's data sheet (H100 / H200 SXM: 989 TFLOP/s),
or ``--peak-tflops``.

The teachers are saved in float32: transformers 5 loads a checkpoint in the dtype it was saved in, and a student
copied from a bf16 teacher would keep bf16 master weights (a separate finding, see the issue's report); float32 is
the path tadistill means: float32 master weights, bf16 autocast, the teacher cast to bf16 by the loop.

Checkpoints are not written (``Trainer._save`` is replaced for the run): a 0.75B student's optimizer state is 9 GB,
and writing it is not the step being measured.

Run alone: ``python benchmarks/gpu_mfu.py --recipe kd [--size smoke] [--batch-size 16] --result r.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

if __package__:
    from .gpu_common import Budget, Row, last_error, python, run_child
    from .gpu_models import bert_teacher, ensure_builtin, llama_teacher
else:
    from gpu_common import Budget, Row, last_error, python, run_child
    from gpu_models import bert_teacher, ensure_builtin, llama_teacher

RECIPES = ("minilmv2", "kd")
# Dense bf16 tensor-core peak of the data sheets (no sparsity), matched against torch.cuda.get_device_name.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
SHAPES = {
    "full": {
        "minilmv2": {"teacher": ("bert", {"layers": 12, "hidden": 768, "heads": 12}), "student_layers": 6,
                     "batch": 128, "seq": 512, "sets": []},
        "kd": {"teacher": ("llama", {"layers": 16, "hidden": 2048, "heads": 32, "kv_heads": 8, "intermediate": 8192,
                                     "vocab": 128_256, "context": 2048, "tokenizer_vocab": 32_000}),
               "student_layers": 8, "batch": 32, "seq": 2048, "sets": ["objectives.logits.chunk_size=2048"]},
    },
    "smoke": {  # every step of the above at sizes a CPU runs in seconds
        "minilmv2": {"teacher": ("bert", {"layers": 2, "hidden": 64, "heads": 4}), "student_layers": 1,
                     "batch": 4, "seq": 32, "sets": ["objectives.minilmv2.relation_heads=4", "data.max_texts=300"]},
        "kd": {"teacher": ("llama", {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128,
                                     "vocab": 1000, "context": 64, "tokenizer_vocab": 512, "tokenizer_texts": 300}),
               "student_layers": 1, "batch": 4, "seq": 32, "sets": ["data.max_texts=300"]},
    },
}


def peak_flops(override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


@contextmanager
def timed_steps():
    """Record the start time and token count of every optimizer step of the loop; write no checkpoint."""
    from tadistill.training.loop import Trainer

    real_step, real_save = Trainer._step, Trainer._save
    starts: list[float] = []
    tokens: list[float] = []

    def step(self, number, t_cap):
        starts.append(time.perf_counter())
        out = real_step(self, number, t_cap)  # (rows, tokens of the step, failed lanes); the loss was read back
        tokens.append(out[1])
        return out

    Trainer._step = step
    Trainer._save = lambda self, number: None
    try:
        yield starts, tokens
    finally:
        Trainer._step, Trainer._save = real_step, real_save
        starts.append(time.perf_counter())  # the end of the last step's bookkeeping


def measure(recipe: str, size: str, batch: int, warmup: int, steps: int, work: Path, peak_tflops: float | None) -> dict:
    from tadistill.evaluation.cost import flops_per_token
    from tadistill.resolve import resolve_config
    from tadistill.training.rundir import RunDir
    from tadistill.training.setup import Cell, RunSetup

    spec = SHAPES[size][recipe]
    kind, shape = spec["teacher"]
    began = time.perf_counter()
    build = bert_teacher if kind == "bert" else llama_teacher
    teacher_dir = build(work / f"teacher-{recipe}", **shape)
    built = time.perf_counter() - began
    overrides = [f"teacher={teacher_dir}", f"student.num_layers={spec['student_layers']}",
                 f"data.max_length={spec['seq']}",
                 f"train.batch_size={batch}", f"train.steps={warmup + steps}", "train.precision=bf16",
                 "train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "train.save_every=0",
                 *spec["sets"]]
    config = resolve_config(recipe, overrides=overrides)
    run = RunDir(work / f"run-{recipe}")
    setup = RunSetup([Cell("student", config, run)])
    run.prepare(config, resume=False, overwrite=False)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with timed_steps() as (starts, tokens):
        setup.train(run.checkpoints, progress=False)
    times = [b - a for a, b in itertools.pairwise(starts)][warmup:]
    tokens = tokens[warmup:]
    step_s = statistics.median(times)
    step_tokens = statistics.median(tokens)
    head = "causal-lm" if recipe == "kd" else "base"
    lane = setup.lanes[0]
    f_s = flops_per_token(lane.student.config, seq_len=spec["seq"], head=head)
    f_t = flops_per_token(setup.teacher.config, seq_len=spec["seq"], head=head)
    flops = step_tokens * (3 * f_s + f_t)
    peak = peak_flops(peak_tflops)
    result = {
        "recipe": recipe, "size": size, "teacher_shape": shape, "student_layers": spec["student_layers"],
        "batch_size": batch, "seq_len": spec["seq"], "tokens_per_step": step_tokens, "warmup_steps": warmup,
        "measured_steps": len(times), "step_s": step_s, "step_s_all": times, "tokens_per_s": step_tokens / step_s,
        "flops_per_token_student_forward": f_s, "flops_per_token_teacher_forward": f_t, "model_flops_per_step": flops,
        "achieved_tflops": flops / step_s / 1e12, "peak_tflops": peak / 1e12 if peak else None,
        "mfu": flops / step_s / peak if peak else None,
        "mfu_student_share": step_tokens * 3 * f_s / step_s / peak if peak else None,
        "student_parameters": sum(p.numel() for p in lane.student.parameters()),
        "teacher_parameters": sum(p.numel() for p in setup.teacher.parameters()),
        "student_dtype": str(next(lane.student.parameters()).dtype),
        "teacher_dtype": str(next(setup.teacher.parameters()).dtype), "build_s": built,
    }
    if torch.cuda.is_available():
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        result["gpu"] = torch.cuda.get_device_name(0)
    return result


# ------------------------------------------------------------------------------------------ the parent side


def rows(size: str, work: Path, log: Path, budget: Budget, *, peak_tflops: float | None = None) -> list[Row]:
    """One child per recipe (a fresh GPU each); an out-of-memory batch is retried once at half the size."""
    out = []
    warmup, steps = (3, 6) if size == "full" else (1, 2)
    for recipe in RECIPES:
        batch = SHAPES[size][recipe]["batch"]
        for attempt in range(2):
            result_file = work / f"mfu-{recipe}.json"
            cmd = [*python(), __file__, "--recipe", recipe, "--size", size, "--batch-size", str(batch),
                   "--warmup", str(warmup), "--steps", str(steps), "--work", str(work), "--result", str(result_file)]
            if peak_tflops:
                cmd += ["--peak-tflops", str(peak_tflops)]
            child = run_child(cmd, log=log, timeout=budget.grant(150 if size == "full" else 120))
            if child.returncode == 0 and result_file.is_file():
                out.append(_row(json.loads(result_file.read_text())))
                break
            if attempt == 0 and "OutOfMemoryError" in child.tail and batch > 1:
                batch //= 2
                continue
            why = "timed out" if child.returncode is None else last_error(child.tail)
            out.append(Row("mfu", f"MFU, {recipe}", "failed", ">= 40%", False, why))
            break
    return out


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _row(r: dict) -> Row:
    shape = r["teacher_shape"]
    teacher = f"{shape['layers']}x{shape['hidden']}"
    what = (f"MFU of the training step, {r['recipe']}: {teacher} teacher ({_count(r['teacher_parameters'])}) -> "
            f"{r['student_layers']}x{shape['hidden']} student ({_count(r['student_parameters'])}), "
            f"{r['batch_size']}x{r['seq_len']} tokens, bf16")
    value = f"{r['mfu']:.1%}" if r["mfu"] is not None else f"{r['achieved_tflops']:.2f} TFLOP/s (no peak known)"
    memory = (f"; peak memory {r['peak_memory_gib']:.0f} of {r['gpu_memory_gib']:.0f} GiB"
              if "peak_memory_gib" in r else "")
    details = (f"{r['achieved_tflops']:.0f} TFLOP/s of model FLOPs (peak {r['peak_tflops'] or '?'}); student share "
               f"{(r['mfu_student_share'] or 0):.1%}; {r['tokens_per_s']:,.0f} tokens/s, median step "
               f"{r['step_s'] * 1e3:.0f} ms over {r['measured_steps']} steps after {r['warmup_steps']}{memory}; "
               f"student {r['student_dtype']}, teacher {r['teacher_dtype']}")
    met = (r["mfu"] >= 0.40) if r["mfu"] is not None else None
    return Row("mfu", what, value, ">= 40%", met, details, extra=r)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", choices=RECIPES, required=True)
    p.add_argument("--size", choices=sorted(SHAPES), default="full")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by its name)")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--result", type=Path, required=True)
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="tadistill-mfu-"))
    ensure_builtin(work)
    batch = args.batch_size or SHAPES[args.size][args.recipe]["batch"]
    result = measure(args.recipe, args.size, batch, args.warmup, args.steps, work, args.peak_tflops)
    args.result.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(_row(result).details)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
