"""``tadistill`` command line: distill, demo, recipes, inspect.

Every subcommand is a thin layer over the Python API. User mistakes (TadistillError) print one line,
``error: ...``, and exit with status 2; there is no traceback for them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from tadistill.errors import TadistillError

DEMO_RECIPE = "minilmv2"
# The demo: the built-in teacher (6x384) into a 3-layer student, sized to finish in minutes on 2 CPU
# cores. The student starts from every other teacher block so that a short run already shows a
# faithful student; the recipe's own default is a random start.
DEMO_OVERRIDES = (
    "student.num_layers=3",
    "student.init=teacher",
    "student.init_layers=uniform",
    "train.steps=200",
    "train.batch_size=16",
    "train.lr=1e-4",
    "train.warmup_ratio=0.05",
    "train.eval_every=50",
    "train.save_every=100",
    "train.log_every=10",
    "data.max_length=128",
)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--out", help="run directory (default: runs/<recipe>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tadistill", description="Task-agnostic distillation of Transformer models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("distill", help="distill a teacher with a recipe", description="Run a distillation recipe.")
    p.add_argument("recipe", nargs="?", help="recipe name (see 'tadistill recipes'); optional with --config")
    p.add_argument("--config", help="YAML config (a full config, or 'recipe: NAME' plus overrides)")
    _add_run_options(p)

    p = sub.add_parser("demo", help="distill the built-in teacher into a 3-layer student (minilmv2)")
    _add_run_options(p)

    sub.add_parser("recipes", help="list the recipes, one line each")

    p = sub.add_parser("inspect", help="layers, width, heads, parameters and FLOPs of a model or spec")
    p.add_argument("model", metavar="MODEL_OR_SPEC",
                   help="local path, hub id or 'builtin', optionally @LAYERSxHIDDEN[xHEADS] (e.g. builtin@3x384)")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length for attention FLOPs (default 128)")
    return parser


def _default_out(name: str) -> str:
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _print_summary(result) -> None:
    from tadistill.cli.show import print_summary

    print_summary(result)


def cmd_distill(args: argparse.Namespace) -> int:
    from tadistill.api import distill
    from tadistill.resolve import resolve_config

    config = resolve_config(args.recipe, config_file=args.config, overrides=args.overrides)
    out = args.out or _default_out(config.recipe or "run")
    result = distill(config, out=out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    _print_summary(result)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from tadistill.api import distill
    from tadistill.resolve import resolve_config

    config = resolve_config(DEMO_RECIPE, overrides=[*DEMO_OVERRIDES, *args.overrides])
    out = args.out or _default_out("demo")
    result = distill(config, out=out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    _print_summary(result)
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from tadistill.registry import RECIPES

    width = max(map(len, RECIPES))
    for name, entry in RECIPES.items():
        print(f"{name:<{width}}  {entry.summary}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from tadistill.cli.show import print_inspect

    print_inspect(args.model, seq_len=args.seq_len)
    return 0


COMMANDS = {"distill": cmd_distill, "demo": cmd_demo, "recipes": cmd_recipes, "inspect": cmd_inspect}


def _quiet_libraries() -> None:
    """Our own progress bar and summary are the output; silence the libraries' bars and chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except TadistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: resume with --resume (the last checkpoint is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
