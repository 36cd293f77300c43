"""Issue 16's GPU checks in one go; start it with ``bash benchmarks/gpu.sh`` (which sets up Python, offline).

Phases, in this order, each check in a child process with its own time cap inside one overall budget (default
470 s: the issue's 8 minutes on one H200, less the set-up); a check the budget cannot fit is reported as not run,
with the flags that run it alone:

1. ``tests``: ``pytest -m gpu tests/test_gpu.py`` (the compile tests in a second pytest, they take longest);
2. ``accelerate``: one-GPU runs with configs/accelerate/{ddp,fsdp,deepspeed-zero2}.yaml against the plain run
   (benchmarks/gpu_accelerate.py);
3. ``mfu``: model FLOPs utilisation of the training step, minilmv2 on a 12x768 BERT and kd on a 1.24B Llama, both
   random weights built from configs (benchmarks/gpu_mfu.py);
4. ``benchmarks``: the side-by-side ratios of benchmarks/run.py at GPU sizes, bf16 (table below, ``BENCHMARKS``).

Writes ``results.json`` (every number), ``results.md`` (one table), ``log.txt`` (every child's output) and the
pytest reports under ``--out`` (default: $OUT when set, as on the device tool, else benchmarks/results/gpu).
``--cpu-smoke`` runs every phase at tiny sizes on the CPU (the gpu tests with TADISTILL_GPU_TESTS_ON_CPU=1), so a
typo cannot waste a GPU run; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from gpu_common import ROOT, Budget, Row, last_error, python, run_child

PHASES = ("tests", "accelerate", "mfu", "benchmarks")
DEFAULT_BUDGET = {"full": 470.0, "smoke": 3600.0}
TEST_CAPS = {"full": (170.0, 110.0), "smoke": (900.0, 0.0)}  # (tests without compile, compile tests)
BERT_BASE = {"layers": 12, "hidden": 768, "heads": 12}  # the shared_teacher figure's teacher on a GPU
# (label, benchmark module, arguments, cap in seconds), in the order they run. {bert_base}: a random 12x768 BERT.
BENCHMARKS = {
    "full": [
        ("minimal_loop", "minimal_loop", ["--batch-size", "32", "--seq-len", "128", "--steps", "20",
                                          "--precision", "bf16"], 60),
        ("peers_textbrewer bf16", "peers_textbrewer", ["--batch-size", "32", "--seq-len", "128", "--steps", "16",
                                                       "--precision", "bf16", "--device", "cuda"], 90),
        ("peers_textbrewer fp32", "peers_textbrewer", ["--batch-size", "32", "--seq-len", "128", "--steps", "12",
                                                       "--precision", "no", "--device", "cuda", "--no-memory"], 60),
        ("peers_trl_gkd", "peers_trl_gkd", ["--random-teacher", "--batch-size", "32", "--steps", "6",
                                            "--precision", "bf16"], 120),
        ("shared_teacher", "shared_teacher", ["--teacher", "{bert_base}", "--students", "4x384", "6x192",
                                              "--batch-size", "32", "--seq-len", "128", "--steps", "16",
                                              "--precision", "bf16"], 120),
        ("chunked_memory", "chunked_memory", ["--quick", "--vocab", "128256", "--positions", "16384", "--hidden",
                                              "2048", "--dtype", "bfloat16", "--device", "cuda"], 60),
        ("compile_effect", "compile_effect", ["--quick", "--objectives", "hs", "minilmv2", "--batch-size", "32",
                                              "--seq-len", "128", "--steps", "16", "--precision", "bf16"], 150),
    ],
    "smoke": [
        ("minimal_loop", "minimal_loop", ["--quick", "--batch-size", "2", "--seq-len", "32", "--steps", "2",
                                          "--warmup", "1"], 400),
        ("peers_textbrewer bf16", "peers_textbrewer", ["--quick", "--batch-size", "2", "--seq-len", "32", "--steps",
                                                       "2", "--warmup", "1", "--precision", "bf16", "--device",
                                                       "cpu", "--memory-steps", "2"], 400),
        ("peers_textbrewer fp32", "peers_textbrewer", ["--quick", "--batch-size", "2", "--seq-len", "32", "--steps",
                                                       "2", "--warmup", "1", "--device", "cpu", "--no-memory"], 400),
        ("peers_trl_gkd", "peers_trl_gkd", ["--quick", "--random-teacher", "--batch-size", "2", "--steps", "1",
                                            "--max-new-tokens", "8"], 600),
        ("shared_teacher", "shared_teacher", ["--quick", "--batch-size", "2", "--seq-len", "32", "--steps", "3",
                                              "--warmup", "1"], 600),
        ("chunked_memory", "chunked_memory", ["--quick", "--vocab", "4096", "--positions", "256", "--hidden", "64",
                                              "--device", "cpu"], 400),
        ("compile_effect", "compile_effect", ["--quick", "--batch-size", "2", "--seq-len", "32", "--steps", "4",
                                              "--warmup", "1"], 600),
    ],
}


# ---------------------------------------------------------------------------------------------- phases


def tests_phase(ctx: argparse.Namespace) -> list[Row]:
    env = {"TADISTILL_GPU_TESTS_ON_CPU": "1"} if ctx.smoke else {}
    out = []
    for label, selector, cap in (("gpu tests", "not compile", TEST_CAPS[ctx.size][0]),
                                 ("gpu tests: train.compile", "compile", TEST_CAPS[ctx.size][1])):
        if ctx.smoke and selector == "compile":
            # Inductor's C++ compilation takes about 5 minutes on 2 CPU cores: run them alone when they change.
            out.append(Row("tests", label, "skipped", "", None, "left out of the CPU smoke: run "
                           "`TADISTILL_GPU_TESTS_ON_CPU=1 pytest tests/test_gpu.py -k compile` (about 5 min)"))
            continue
        report = ctx.out / f"pytest-{'compile' if selector == 'compile' else 'main'}.xml"
        cmd = [*python(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-k", selector,
               f"--junitxml={report}", "tests/test_gpu.py"]
        child = run_child(cmd, log=ctx.log, timeout=ctx.budget.grant(cap), env=env)
        out.append(_pytest_row(label, report, child))
    return out


def _pytest_row(label: str, report: Path, child) -> Row:
    if not report.is_file():
        why = "timed out" if child.returncode is None else last_error(child.tail)
        return Row("tests", label, "not finished", "all pass", False, why)
    cases = []
    for case in ET.parse(report).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "").splitlines()[0][:200] if node.get("message") else ""
        cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                      "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    bad = [c for c in cases if c["outcome"] in ("failed", "error")]
    details = ", ".join(f"{n} {k}" for k, n in counts.items() if n) + f" in {child.seconds:.0f} s"
    if bad:
        details += "; " + "; ".join(f"{c['test']}: {c['message']}" for c in bad[:6])
    return Row("tests", label, f"{counts['passed']} passed", "all pass", not bad and counts["passed"] > 0, details,
               extra={"cases": cases})


def accelerate_phase(ctx: argparse.Namespace) -> list[Row]:
    import gpu_accelerate

    return gpu_accelerate.rows(ctx.size, ctx.work, ctx.log, ctx.budget, cpu=ctx.smoke)


def mfu_phase(ctx: argparse.Namespace) -> list[Row]:
    import gpu_mfu

    return gpu_mfu.rows(ctx.size, ctx.work, ctx.log, ctx.budget, peak_tflops=ctx.peak_tflops)


def benchmarks_phase(ctx: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    wanted = set(ctx.benchmarks or [])
    figures: dict[str, list[dict]] = {}
    for label, module, args, cap in BENCHMARKS[ctx.size]:
        if wanted and module not in wanted and label not in wanted:
            continue
        if ctx.budget.left() < min(cap, 45):
            rows.append(Row("benchmarks", label, "not run", "", None,
                            f"the time budget ran out: run it alone with --phases benchmarks --benchmarks {module}"))
            continue
        if "{bert_base}" in args:
            from gpu_models import bert_teacher

            folder = ctx.work / "bert-base-random"
            if not folder.is_dir():
                bert_teacher(folder, **BERT_BASE)
            args = [str(folder) if a == "{bert_base}" else a for a in args]
        result = ctx.work / f"bench-{label.replace(' ', '-')}.json"
        cmd = [*python(), __file__, "--bench", module, "--bench-result", str(result), "--", *args]
        child = run_child(cmd, log=ctx.log, timeout=ctx.budget.grant(cap))
        if child.returncode != 0 or not result.is_file():
            why = "timed out" if child.returncode is None else last_error(child.tail)
            rows.append(Row("benchmarks", label, "failed", "", False, why))
            continue
        figures[label] = json.loads(result.read_text())
        for f in figures[label]:
            rows.append(Row("benchmarks", f"{label}: {f['what']}", f"{f['ratio']:.3f}", f["target_text"], f["met"],
                            f["details"], extra=f))
    rows += _textbrewer_at_best_precision(figures)
    return rows


def _textbrewer_at_best_precision(figures: dict[str, list[dict]]) -> list[Row]:
    """The issue's comparison: tadistill at bf16 against TextBrewer at its own best precision, float32 (its only
    mixed precision is apex fp16, not installed), from the two peers_textbrewer runs (one after the other)."""
    try:
        bf16 = figures["peers_textbrewer bf16"][0]["extra"]["tokens_per_s_tadistill"]
        fp32 = figures["peers_textbrewer fp32"][0]["extra"]["tokens_per_s_textbrewer"]
    except (KeyError, IndexError):
        return []
    speedup = bf16 / fp32
    return [Row("benchmarks", "tadistill bf16 / TextBrewer float32 (its best without apex), tokens/s",
                f"{speedup:.2f}x", ">= 1.3x", speedup >= 1.3,
                f"{bf16:,.0f} vs {fp32:,.0f} tokens/s, from the two peers_textbrewer runs above (not interleaved)")]


PHASE_RUNNERS = {"tests": tests_phase, "accelerate": accelerate_phase, "mfu": mfu_phase,
                 "benchmarks": benchmarks_phase}


# --------------------------------------------------------------------------------------------- reports


def machine_info(smoke: bool) -> dict:
    import torch

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "mode": "cpu-smoke" if smoke else "gpu",
            "python": platform.python_version(), "platform": platform.platform(), "cpu_cores": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "accelerate", "trl", "textbrewer", "deepspeed"):
        try:
            from importlib.metadata import version

            info[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed
            info[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=ROOT, check=False).returncode != 0
        info["tadistill"] = head + (" with uncommitted changes in src/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        info["tadistill"] = None  # no git here (a copied tree)
    return info


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(info: dict, rows: list[Row], seconds: dict[str, float]) -> str:
    where = info.get("gpu") or f"CPU only ({info['cpu_cores']} cores)"
    lines = [
        f"# tadistill GPU checks ({info['mode']})", "",
        f"{info['date']} on {where}; torch {info['torch']} (CUDA {info['cuda']}), transformers {info['transformers']}, "
        f"accelerate {info['accelerate']}, trl {info['trl']}, textbrewer {info['textbrewer']}, deepspeed "
        f"{info['deepspeed']}; Python {info['python']}; tadistill {info['tadistill'] or '(no git)'}. Built-in teacher: "
        f"{info['builtin']}. Seconds per phase: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".", "",
        "| phase | check | value | target | met | details |", "|---|---|---:|---|---|---|",
    ]
    met_text = {True: "yes", False: "**no**", None: ""}
    for r in rows:
        lines.append(f"| {r.phase} | {_cell(r.check)} | {_cell(r.value)} | {_cell(r.target)} | {met_text[r.met]} "
                     f"| {_cell(r.details)} |")
    return "\n".join(lines) + "\n"


def write(ctx: argparse.Namespace, info: dict, rows: list[Row], seconds: dict[str, float]) -> None:
    payload = {"machine": info, "seconds": seconds, "rows": [r.to_dict() for r in rows]}
    (ctx.out / "results.json").write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    (ctx.out / "results.md").write_text(markdown(info, rows, seconds), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ entry


def bench_child(module_name: str, result: Path, args: list[str]) -> int:
    """Child: one benchmark module's ``run(args)``, its figures written as JSON."""
    import importlib

    module = importlib.import_module(module_name)
    figures = module.run(args)
    result.write_text(json.dumps([f.to_dict() for f in figures], default=str), encoding="utf-8")
    for figure in figures:
        print(figure.line())
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="results folder (default: $OUT, else benchmarks/results/gpu)")
    p.add_argument("--cpu-smoke", dest="smoke", action="store_true", help="every phase at tiny sizes on the CPU")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--benchmarks", nargs="+", default=None, help="only these benchmarks (module names or labels)")
    p.add_argument("--budget-s", type=float, default=None, help="overall time budget (default 470 s; smoke 3600)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (models, runs) and print its path")
    p.add_argument("--bench", help=argparse.SUPPRESS)
    p.add_argument("--bench-result", type=Path, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    args.rest = rest[1:] if rest[:1] == ["--"] else rest
    return args


def main(argv: list[str] | None = None) -> int:
    ctx = parse(argv)
    if ctx.bench:
        return bench_child(ctx.bench, ctx.bench_result, ctx.rest)
    import torch

    if not ctx.smoke and not torch.cuda.is_available():
        print("no CUDA device: these are GPU checks (use --cpu-smoke for a dry run on the CPU)", file=sys.stderr)
        return 2
    ctx.size = "smoke" if ctx.smoke else "full"
    ctx.out = (ctx.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results" / "gpu")).resolve()
    ctx.out.mkdir(parents=True, exist_ok=True)
    results = ROOT / "benchmarks" / "results"
    if ctx.out.is_relative_to(results):  # as run.py does: measured results are never committed by accident
        (results / ".gitignore").write_text("*\n", encoding="utf-8")
    ctx.log = ctx.out / "log.txt"
    ctx.work = Path(tempfile.mkdtemp(prefix="tadistill-gpu-"))
    ctx.budget = Budget(ctx.budget_s or DEFAULT_BUDGET[ctx.size])
    from gpu_models import ensure_builtin

    info = machine_info(ctx.smoke)
    info["builtin"] = ensure_builtin(ctx.work)
    info["command"] = " ".join(["bash benchmarks/gpu.sh", *(argv if argv is not None else sys.argv[1:])])
    print(f"tadistill GPU checks ({info['mode']}) on {info.get('gpu') or 'the CPU'}; budget "
          f"{ctx.budget.left():.0f} s; results in {ctx.out}", flush=True)
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    for phase in ctx.phases:
        began = time.monotonic()
        print(f"== {phase} ({ctx.budget.left():.0f} s left)", flush=True)
        if ctx.budget.left() < 30:
            rows.append(Row(phase, "phase", "not run", "", None,
                            f"the time budget ran out: run it alone with --phases {phase}"))
            continue
        try:
            found = PHASE_RUNNERS[phase](ctx)
        except Exception as exc:  # noqa: BLE001 - one broken phase must not hide the others' results
            traceback.print_exc()
            found = [Row(phase, "phase", "failed", "", False, f"{type(exc).__name__}: {exc}")]
        rows += found
        seconds[phase] = time.monotonic() - began
        for r in found:
            print(f"  [{ {True: 'ok', False: 'NO', None: '--'}[r.met] }] {r.check}: {r.value}  {r.details[:240]}",
                  flush=True)
        write(ctx, info, rows, seconds)  # after every phase: a run killed later keeps what it had
    if ctx.keep_work:
        print(f"work folder kept: {ctx.work}")
    else:
        shutil.rmtree(ctx.work, ignore_errors=True)
    print(f"written: {ctx.out / 'results.json'}, {ctx.out / 'results.md'}, {ctx.log}")
    # A missed target is a finding, not an error: the status says whether every check ran and every test passed.
    broken = [r for r in rows if r.value in ("failed", "not finished") or (r.phase == "tests" and r.met is False)]
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
