"""``tadistill search RUN``: the best sub-network of an AutoDistil SuperLM under a budget (``tadistill/search.py``)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="pick a sub-network of an AutoDistil SuperLM under a budget and extract it",
                       description="Rank the sub-networks of a finished 'tadistill distill autodistil' run by held-out "
                       "loss under a FLOPs, parameter or latency budget (no retraining); save the best one to "
                       "RUN/search/<name>/ with search.json, and with --distil distil it further.")
    p.add_argument("run", metavar="RUN_DIR", help="the --out folder of a finished autodistil run")
    p.add_argument("--flops", type=float, help="FLOPs per token at most this fraction of the teacher's (e.g. 0.5)")
    p.add_argument("--params", help="at most this many parameters (e.g. 15M, 800k)")
    p.add_argument("--latency-ms", type=float, help="at most this many ms per forward at batch 1, measured here")
    p.add_argument("--top", type=int, default=10, help="rows of the table (default 10)")
    p.add_argument("--name", help="folder under RUN/search/ (default: the sub-network's name, e.g. L4-H288-A9-F864)")
    p.add_argument("--batches", type=int, help="held-out batches to rank on (default: autodistil.search_batches)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence for FLOPs and latency (default: data.max_length)")
    p.add_argument("--latency-repeats", type=int, default=10, help="timed forwards per model (default 10)")
    p.add_argument("--overwrite", action="store_true", help="replace RUN/search/<name>")
    p.add_argument("--distil", action="store_true", help="then distil the chosen sub-network from the teacher "
                   "(RUN/search/<name>/distil)")
    p.add_argument("--recipe", help="with --distil: take this recipe's objectives (default: the run's relation-mse)")
    p.add_argument("--steps", type=int, help="with --distil: training steps (default: the run's train.steps)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with --distil: override a value of the distillation's config (repeatable)")
    p.add_argument("--no-progress", action="store_true")


def cmd_search(args: argparse.Namespace) -> int:
    from tadistill.errors import ConfigError
    from tadistill.search import Budget, distil_config, parse_count, print_search, run_search

    for flag, value in (("--top", args.top), ("--batches", args.batches), ("--seq-len", args.seq_len),
                        ("--latency-repeats", args.latency_repeats), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} must be at least 1")
    if not args.distil and (args.recipe or args.steps or args.overrides):
        raise ConfigError("--recipe, --steps and --set configure --distil: add --distil")
    budget = Budget(flops=args.flops, params=parse_count(args.params) if args.params is not None else None,
                    latency_ms=args.latency_ms)
    result = run_search(args.run, budget, top=args.top, name=args.name, seq_len=args.seq_len, batches=args.batches,
                        latency_repeats=args.latency_repeats, overwrite=args.overwrite,
                        progress=not args.no_progress)
    print_search(result, top=args.top)
    if args.distil:
        from tadistill.api import distill
        from tadistill.cli.show import print_summary
        from tadistill.search import load_run

        _, config = load_run(args.run)
        config = distil_config(result, config, recipe=args.recipe, steps=args.steps, overrides=args.overrides)
        done = distill(config, out=result.folder / "distil", progress=not args.no_progress)
        print_summary(done)
    return 0
