"""Run tadistill's benchmarks and print one table of ratios, each against its target.

    python benchmarks/run.py                         # all of them (about 20 minutes on an idle 2-core CPU)
    python benchmarks/run.py --quick                 # fewer steps and variants (a smoke run)
    python benchmarks/run.py --only chunked_memory   # one benchmark; its own flags may follow:
    python benchmarks/run.py --only minimal_loop --batch-size 32 --steps 50

Every figure is a ratio of two things measured side by side in this one run, on the same machine, models
and data. The table is also written to benchmarks/results/results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

if __package__:  # imported as benchmarks.run
    from . import (
        chunked_memory,
        compile_effect,
        data_memory,
        minimal_loop,
        peers_deep_teacher,
        peers_textbrewer,
        peers_trl_gkd,
        relation_memory,
        shared_teacher,
    )
    from .common import Figure, machine, quiet_transformers
else:  # python benchmarks/run.py: benchmarks/ is on sys.path
    import chunked_memory
    import compile_effect
    import data_memory
    import minimal_loop
    import peers_deep_teacher
    import peers_textbrewer
    import peers_trl_gkd
    import relation_memory
    import shared_teacher
    from common import Figure, machine, quiet_transformers

BENCHMARKS = {module.NAME: module for module in (minimal_loop, peers_textbrewer, peers_deep_teacher, peers_trl_gkd,
                                                 shared_teacher, chunked_memory, relation_memory, compile_effect,
                                                 data_memory)}
if __package__:  # prompt compression speed (issue 14)
    from . import lingua_speed
else:
    import lingua_speed
BENCHMARKS[lingua_speed.NAME] = lingua_speed
if __package__:  # structured students at one size (issue 13): about an hour, so only with --only
    from . import structured_students
else:
    import structured_students
BENCHMARKS[structured_students.NAME] = structured_students
OPT_IN = {structured_students.NAME}  # left out of a run of all of them
RESULTS = Path(__file__).resolve().parent / "results"


def source_version() -> str | None:
    """The commit of the measured tadistill (read-only git calls), flagged when src/ has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        # diff --quiet exits 1 when src/ differs from HEAD.
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=root, check=False).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (an installed copy)
    return head + (" with uncommitted changes in src/" if changed else "")


def _ratio_text(figure: Figure) -> str:
    return f"{figure.ratio:.3f}"


def table(figures: list[Figure], errors: dict[str, str]) -> Table:
    t = Table(title="tadistill benchmarks: ratios measured side by side in one run", show_lines=True)
    for name, style in (("benchmark", "bold"), ("figure", ""), ("ratio", "bold"), ("target", ""), ("met", ""),
                        ("measured", "dim")):
        t.add_column(name, style=style, overflow="fold")
    for f in figures:
        t.add_row(f.benchmark, f.what, _ratio_text(f), f.target_text,
                  "[green]yes[/green]" if f.met else "[red]no[/red]", f.details)
    for name, error in errors.items():
        t.add_row(name, "[red]failed[/red]", "", "", "[red]no[/red]", error)
    return t


def markdown(figures: list[Figure], errors: dict[str, str], info: dict, seconds: dict[str, float]) -> str:
    lines = [
        "# tadistill benchmarks",
        "",
        (f"Measured {info['date']} on {info['machine']} ({info['cpu_cores']} cores, {info['torch_threads']} torch "
         f"threads{', ' + info['gpu'] if info.get('gpu') else ''}), torch {info['torch']}, transformers "
         f"{info.get('transformers', '?')}; load average {info['load_average']} at the start, "
         f"{info['load_average_end']} at the end; tadistill {info['tadistill'] or '(version unknown)'}. "
         f"Command: `{info['command']}`."),
        "",
        "| benchmark | figure | ratio | target | met | measured |",
        "|---|---|---:|---|---|---|",
    ]
    for f in figures:
        lines.append(f"| {f.benchmark} | {f.what} | {_ratio_text(f)} | {f.target_text} | {'yes' if f.met else 'no'} "
                     f"| {f.details} |")
    for name, error in errors.items():
        lines.append(f"| {name} | failed | | | no | {error} |")
    lines += ["", "Seconds per benchmark: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Flags after --only NAME that run.py does not know go to that benchmark.")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), help="run one benchmark")
    parser.add_argument("--quick", action="store_true", help="fewer steps and variants (a smoke run)")
    args, rest = parser.parse_known_args(argv)
    if rest and not args.only:
        parser.error(f"unknown arguments {rest}: benchmark flags need --only NAME")
    quiet_transformers()
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: wide rows rather than one word per line
        console = Console(width=200)
    info = machine()
    info["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    info["tadistill"] = source_version()
    info["command"] = " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])])
    console.print(f"[bold]tadistill benchmarks[/bold] on {info['machine']}, {info['cpu_cores']} cores, torch "
                  f"{info['torch']}{', ' + info['gpu'] if info.get('gpu') else ''}; load {info['load_average']}")
    figures: list[Figure] = []
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    names = [args.only] if args.only else [name for name in BENCHMARKS if name not in OPT_IN]
    for name in names:
        console.rule(name)
        console.print(BENCHMARKS[name].HOW, style="dim")
        began = time.perf_counter()
        try:
            figures += BENCHMARKS[name].run(rest, quick=args.quick)
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
            traceback.print_exc()
            errors[name] = f"{type(exc).__name__}: {exc}"
        seconds[name] = time.perf_counter() - began
        console.print(f"{name}: {seconds[name]:.0f} s")
    info["load_average_end"] = machine()["load_average"]
    console.print(table(figures, errors))

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ".gitignore").write_text("*\n", encoding="utf-8")
    payload = {"machine": info, "seconds": seconds, "figures": [f.to_dict() for f in figures], "errors": errors}
    (RESULTS / "results.json").write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    (RESULTS / "results.md").write_text(markdown(figures, errors, info, seconds), encoding="utf-8")
    console.print(f"written: {RESULTS / 'results.json'}, {RESULTS / 'results.md'}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
