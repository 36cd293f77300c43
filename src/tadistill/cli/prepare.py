"""``tadistill prepare``: stream a config's corpus into memory-mapped token shards once (data/prepare.py)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("prepare", help="stream a config's corpus into memory-mapped token shards",
                       description="Tokenize and pack every data.source of a config into token shards once (a no-op "
                       "when they are up to date); then train with --set data.prepared=DIR (flat host memory).")
    p.add_argument("recipe", nargs="?", help="recipe name; optional with --config")
    p.add_argument("--config", help="YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="folder for the shards (reused when it holds this preparation)")


def cmd_prepare(args: argparse.Namespace) -> int:
    from tadistill.data.prepare import open_shards, prepare_shards
    from tadistill.loading import load_tokenizer
    from tadistill.resolve import resolve_config
    from tadistill.teachers.causal import ensure_builtin_teacher

    config = resolve_config(args.recipe, config_file=args.config, overrides=args.overrides)
    ensure_builtin_teacher(config.teacher)  # builtin-gpt2: its tokenizer comes with the teacher, trained on first use
    tokenizer = load_tokenizer(config.teacher, trust_remote_code=config.trust_remote_code)
    manifest = prepare_shards(config.data, tokenizer, seed=config.train.seed, out=args.out, progress=print)
    splits = open_shards(args.out, manifest, config.data, seed=config.train.seed)
    for row in manifest["sources"]:
        print(f"{row['path']}: train {row['train']['sequences']} sequences / {row['train']['tokens']} tokens, "
              f"held-out {row['heldout']['sequences']} sequences")
    if splits.mixture:
        print("mixture: " + json.dumps(splits.mixture))
    print(f"token shards: {args.out}  (prepared in {manifest['seconds']} s; {manifest['dtype']} ids)")
    print(f"train from them: --set data.prepared={args.out}")
    return 0
