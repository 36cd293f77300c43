"""``tadistill lingua annotate|train|evaluate`` and ``tadistill compress``: prompt compression (LLMLingua-2).

Registered in ``cli/main.py`` by ``add_parsers(sub)`` and the ``COMMANDS`` entries; the work is in
``tadistill.lingua``.
"""

from __future__ import annotations

import argparse
import json
import sys

from tadistill.errors import ConfigError


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def add_parsers(sub) -> None:
    """Add ``lingua`` (with its actions) and ``compress`` to the sub-parsers of ``tadistill``."""
    from tadistill.lingua.options import (  # no torch: a fast parser
        AnnotateOptions,
        EvaluateOptions,
        TrainOptions,
    )

    a, t, e = AnnotateOptions(), TrainOptions(), EvaluateOptions()
    p = sub.add_parser("lingua", help="prompt compression by data distillation (LLMLingua-2): annotate, train, "
                       "evaluate")
    lingua = p.add_subparsers(dest="lingua_command", required=True, metavar="ACTION")

    q = lingua.add_parser("annotate", help="a causal LM labels the words of corpus chunks keep / drop")
    q.add_argument("--teacher", default="builtin-gpt2", help="causal LM: local path, hub id or builtin-gpt2 (default)")
    q.add_argument("--data", default="builtin", help="corpus: builtin, a .txt/.jsonl/.parquet/.csv file or folder")
    q.add_argument("--out", required=True, help="folder for samples.jsonl and stats.json")
    q.add_argument("--annotator", choices=["auto", "instruction", "information"], default=a.annotator,
                   help="instruction: the LLM deletes words as told (the paper); information: how much each word's "
                   "removal raises the teacher's loss on what follows; auto: instruction when the teacher has a chat "
                   "template")
    q.add_argument("--max-chunks", type=int, default=a.max_chunks)
    q.add_argument("--chunk-tokens", type=int, default=a.chunk_tokens, help="most teacher tokens in a chunk")
    q.add_argument("--keep-fraction", type=float, default=a.keep_fraction, help="information annotator: words kept")
    q.add_argument("--follow-only", action="store_true", help="information annotator: score a word by its effect "
                   "on the next tokens only, without its own surprisal")
    q.add_argument("--window", type=int, default=a.window, help="instruction annotator: matching window (words)")
    q.add_argument("--instruction-file", help="a file with the instruction; {text} marks where the chunk goes")
    q.add_argument("--batch-size", type=int, default=a.batch_size)
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--no-progress", action="store_true")

    q = lingua.add_parser("train", help="train the token classifier (the compressor) on annotated data")
    q.add_argument("--data", required=True, help="folder written by 'tadistill lingua annotate'")
    q.add_argument("--encoder", default="builtin", help="bidirectional encoder: builtin (default), or a path / hub "
                   "id (XLM-R, mBERT, ...)")
    q.add_argument("--out", required=True, help="folder for the token-classification checkpoint")
    q.add_argument("--steps", type=int, default=t.steps)
    q.add_argument("--batch-size", type=int, default=t.batch_size)
    q.add_argument("--lr", type=float, default=t.lr)
    q.add_argument("--label-subtokens", choices=["all", "first"], default=t.label_subtokens,
                   help="which sub-tokens of a word carry its label (all: compression averages them)")
    q.add_argument("--seed", type=int, default=t.seed)
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--no-progress", action="store_true")

    q = lingua.add_parser("evaluate", help="continuation loss of a causal LM with compressed prompts vs baselines")
    q.add_argument("--model", required=True, help="compressor folder (tadistill lingua train)")
    q.add_argument("--lm", default="builtin-gpt2", help="causal LM that reads the prompts (default builtin-gpt2)")
    q.add_argument("--data", default="builtin", help="corpus whose held-out tail gives the examples")
    q.add_argument("--rates", type=float, nargs="+", default=list(e.rates))
    q.add_argument("--examples", type=int, default=e.examples)
    q.add_argument("--prompt-tokens", type=int, default=e.prompt_tokens)
    q.add_argument("--continuation-tokens", type=int, default=e.continuation_tokens)
    q.add_argument("--seed", type=int, default=e.seed)
    q.add_argument("--embedder", default="builtin", help="sentence encoder for the embedding cosine of compressed "
                   "and full prompts (default: builtin, all-MiniLM-L6-v2); 'none' to skip it")
    q.add_argument("--out", required=True, help="folder for results.json/.csv/.md, summary.json and the plot")
    q.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("compress", help="compress a prompt with a trained compressor (LLMLingua-2)")
    p.add_argument("file", metavar="FILE", help="UTF-8 text file to compress ('-': standard input)")
    p.add_argument("--model", required=True, help="compressor folder (tadistill lingua train)")
    p.add_argument("--rate", type=_number, default=0.33, help="share of words kept, in (0, 1] (default 0.33)")
    p.add_argument("--target-tokens", type=int, help="a token budget instead of the rate")
    p.add_argument("--force-tokens", default="", help='words always kept, comma-separated, e.g. "\\n,?"')
    p.add_argument("--keep-digits", action="store_true", help="always keep words with a digit")
    p.add_argument("--batch-size", type=int, help="chunks per forward (default: 32 on a GPU, 1 on a CPU)")
    p.add_argument("--json", action="store_true", help="one JSON object: text, token counts, ratio")


class _Progress:
    """One line on stderr, rewritten in place: 'label n/total'."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled = label, enabled and sys.stderr.isatty()

    def __call__(self, done: int, total: int, *extra) -> None:
        if not self.enabled:
            return
        tail = f" loss {extra[0]:.4f}" if extra else ""
        print(f"\r{self.label} {done}/{total}{tail}", end="" if done < total else "\n", file=sys.stderr, flush=True)


def cmd_lingua(args: argparse.Namespace) -> int:
    return {"annotate": _annotate, "train": _train, "evaluate": _evaluate}[args.lingua_command](args)


def _annotate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tadistill.lingua.annotate import annotate
    from tadistill.lingua.compress import read_text_file
    from tadistill.lingua.options import INSTRUCTION, AnnotateOptions
    from tadistill.teachers.causal import ensure_builtin_teacher

    instruction = read_text_file(args.instruction_file) if args.instruction_file else INSTRUCTION
    options = AnnotateOptions(annotator=args.annotator, max_chunks=args.max_chunks, chunk_tokens=args.chunk_tokens,
                              keep_fraction=args.keep_fraction, window=args.window,
                              own_information=not args.follow_only, batch_size=args.batch_size,
                              instruction=instruction)
    ensure_builtin_teacher(args.teacher, progress=not args.no_progress)
    stats = annotate(args.teacher, args.data, Path(args.out), options, overwrite=args.overwrite,
                     progress=_Progress("chunks", not args.no_progress))
    print(f"annotations: {args.out}  ({stats['annotator']} annotator, teacher {stats['teacher']}: {stats['samples']} of "
          f"{stats['chunks']} chunks kept, {stats['words']} words, keep rate {stats['keep_rate']:.3f}, filtered "
          f"{stats['filtered'] or 'none'}; {stats['seconds']} s)")
    print(f"train on them: tadistill lingua train --data {args.out} --out MODEL")
    return 0


def _train(args: argparse.Namespace) -> int:
    from tadistill.lingua.options import TrainOptions
    from tadistill.lingua.train import train_compressor

    options = TrainOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           label_subtokens=args.label_subtokens, seed=args.seed)
    report = train_compressor(args.data, args.out, encoder=args.encoder, options=options, overwrite=args.overwrite,
                              progress=_Progress("step", not args.no_progress))
    start, end = report["heldout_initial"], report["heldout_final"]
    print(f"compressor: {args.out}  ({report['train_pieces']} chunks, {args.steps} steps, {report['train_seconds']} s; "
          f"loss {report['loss_first']:.3f} -> {report['loss_last']:.3f})")
    if end:
        print(f"held-out ({report['heldout_pieces']} chunks): keep F1 at the annotated rate "
              f"{start['keep_f1_at_rate']:.3f} at init -> {end['keep_f1_at_rate']:.3f} (keep-everything "
              f"{end['all_keep_f1']:.3f}); word accuracy {start['word_accuracy']:.3f} -> {end['word_accuracy']:.3f}")
    print(f"use it: tadistill compress --model {args.out} --rate 0.33 FILE")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from tadistill.lingua.evaluate import run_evaluation
    from tadistill.lingua.options import EvaluateOptions
    from tadistill.reports.tables import markdown_table
    from tadistill.teachers.causal import ensure_builtin_teacher

    options = EvaluateOptions(rates=tuple(args.rates), examples=args.examples, prompt_tokens=args.prompt_tokens,
                              continuation_tokens=args.continuation_tokens, seed=args.seed)
    ensure_builtin_teacher(args.lm, progress=not args.no_progress)
    embedder = None if args.embedder.lower() == "none" else args.embedder
    result = run_evaluation(args.model, args.lm, args.data, args.out, options,
                            progress=_Progress("examples", not args.no_progress), embedder=embedder)
    columns = ["model", "words_kept", "lm_tokens_ratio", "loss", "loss_increase", "loss_increase_se",
               "kept_information", *(["embedding_cosine", "embedding_cosine_se"] if embedder else [])]
    print(markdown_table(result["rows"], columns, floatfmt=".3f"), end="")
    print(f"{result['examples']} held-out examples, LM {args.lm}, compressor trained on the "
          f"{result['annotator'] or '?'} annotator's labels; written to {args.out}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from tadistill.errors import DataError
    from tadistill.lingua.compress import (
        Compressor,
        check_rate,
        parse_force_tokens,
        read_text_file,
    )

    check_rate(args.rate)  # before the model loads
    if args.file == "-":
        text = sys.stdin.read()
        if not text.strip():
            raise DataError("standard input is empty: there is nothing to compress")
    else:
        text = read_text_file(args.file)
    if args.target_tokens is not None and args.target_tokens < 1:
        raise ConfigError(f"--target-tokens must be a positive integer, got {args.target_tokens}")
    result = Compressor.load(args.model).compress(
        text, rate=args.rate, target_tokens=args.target_tokens, force_tokens=parse_force_tokens(args.force_tokens),
        keep_digits=args.keep_digits, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return 0
    print(result.text)
    print(f"tokens: {result.original_tokens} -> {result.compressed_tokens} ({result.ratio:.2f}x); words: "
          f"{result.words} -> {result.kept_words}", file=sys.stderr)
    return 0
