"""``tadistill`` command line: distill, demo, recipes, inspect, evaluate, compare, report, teacher.

Every subcommand is a thin layer over the Python API. User mistakes (TadistillError) print one line,
``error: ...``, and exit with status 2; there is no traceback for them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from tadistill.cli.lingua import add_parsers as add_lingua_parsers
from tadistill.cli.lingua import cmd_compress, cmd_lingua
from tadistill.cli.prepare import add_parser as add_prepare_parser
from tadistill.cli.prepare import cmd_prepare
from tadistill.cli.search import add_parser as add_search_parser
from tadistill.cli.search import cmd_search
from tadistill.errors import TadistillError

DEMO_RECIPE = "sentence"
EXAMPLES = {"encoder": "example.yaml", "causal": "example_causal.yaml", "paper": "paper.yaml"}  # --example NAME
# The demo: the built-in teacher (6x384) into a 3-layer student, sized to finish in minutes on 2 CPU
# cores, starting from teacher blocks 0, 3, 5. Chosen on evidence (issue 18, README "What distillation
# added", benchmarks/issue18_gain.py): MiniLMv2's relations alone left the student's retrieval where it
# started; with the pooled-embedding cosine on unpacked texts (recipe sentence) 100 steps raise its
# stdlib-topic probe accuracy well beyond noise.
DEMO_OVERRIDES = (
    "student.num_layers=3",
    "student.init=teacher",
    "student.init_layers=uniform",
    "train.steps=100",
    "train.batch_size=16",
    "train.lr=1e-4",
    "train.warmup_ratio=0.05",
    "train.eval_every=50",
    "train.save_every=100",
    "train.log_every=10",
    "data.max_length=128",
)


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors in tadistill's form: one line on stderr, status 2 (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--out", help="run directory (default: runs/<recipe>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tadistill", description="Task-agnostic distillation of Transformer models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("distill", help="distill a teacher with a recipe", description="Run a distillation recipe.")
    p.add_argument("recipe", nargs="?", help="recipe name (see 'tadistill recipes'); optional with --config")
    p.add_argument("--config", help="YAML config (a full config, or 'recipe: NAME' plus overrides)")
    _add_run_options(p)

    p = sub.add_parser("demo", help="distill the built-in teacher into a 3-layer student (recipe sentence)")
    _add_run_options(p)

    sub.add_parser("recipes", help="list the recipes, one line each")

    p = sub.add_parser("inspect", help="layers, width, heads, parameters and FLOPs of a model or spec")
    p.add_argument("model", metavar="MODEL_OR_SPEC",
                   help="local path, hub id or 'builtin', optionally @LAYERSxHIDDEN[xHEADS] (e.g. builtin@3x384)")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length for attention FLOPs (default 128)")

    p = sub.add_parser("evaluate", help="what a student kept and what it costs, against its teacher")
    p.add_argument("student", help="student folder (a run's student/ or any checkpoint)")
    p.add_argument("--teacher", required=True, help="teacher: local path, hub id or 'builtin'")
    p.add_argument("--tasks", nargs="*", default=["stdlib-topic", "stdlib-retrieval"],
                   help="known task names (GLUE, xnli-<lang>, stdlib-topic, stdlib-retrieval; token-level: stdlib-ner, "
                   "conll2003, wikiann-<lang>, squad, squad_v2) or local CSV/JSONL, CoNLL or SQuAD JSON files")
    p.add_argument("--mode", choices=["probe", "finetune"], default="probe", help="linear probe or fine-tuning")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--texts", nargs="+", default=["builtin"], metavar="[LANG=]CORPUS",
                   help="corpus whose held-out split gives the fidelity texts; LANG=CORPUS pairs (de=de.txt fr=fr.txt) "
                   "report fidelity per language")
    p.add_argument("--crosslingual", metavar="TASK", help="cross-lingual transfer: train on --train-language, test on "
                   "every language (xnli, pawsx, l10n-topic, a file with a language column, a {lang} pattern)")
    p.add_argument("--train-language", default="en", help="the language the probe / fine-tuning sees (default en)")
    p.add_argument("--languages", nargs="+", help="languages to test on (default: all of the task)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--zero-shot", nargs="*", default=[], metavar="TASK",
                   help="lm-evaluation-harness tasks for causal LMs (needs the lm-eval extra)")
    p.add_argument("--out", help="folder for results.json/.csv/.md (default: next to the student, evaluation/)")

    p = sub.add_parser("compare", help="train and evaluate a study: methods x student shapes, one table")
    p.add_argument("study", nargs="?", help="study YAML (see docs); or --example")
    p.add_argument("--example", nargs="?", const="encoder", choices=sorted(EXAMPLES),
                   help="run a built-in example study: 'encoder' (default; the built-in MiniLM teacher), "
                   "'causal' (tadistill's own small GPT-2 teacher, trained first when not cached) or 'paper' "
                   "(OD, HS and MHA from one teacher body, the comparative study of Udagawa et al. 2023)")
    p.add_argument("--quick", action="store_true", help="the study's quick: version, a smaller first look")
    p.add_argument("--out", help="study folder (default: runs/<study name>-<time>)")
    p.add_argument("--resume", action="store_true", help="skip finished cells, continue an interrupted pass")
    p.add_argument("--overwrite", action="store_true", help="replace the study in --out")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("report", help="rebuild tables and plots of finished studies")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="study folders written by tadistill compare")

    p = sub.add_parser("cache-teacher", help="run the teacher once and store what a recipe's objectives read",
                       description="Store the teacher's signals for a config; then distill it with "
                       "--set teacher_signals=DIR (no teacher forward).")
    p.add_argument("recipe", nargs="?", help="recipe name; optional with --config")
    p.add_argument("--config", help="YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="folder for the signals (must not exist)")
    p.add_argument("--no-progress", action="store_true")

    add_prepare_parser(sub)  # prepare: token shards (cli/prepare.py)
    add_search_parser(sub)  # search: a sub-network of an AutoDistil SuperLM (cli/search.py)

    p = sub.add_parser("teacher", help="tadistill's own small causal-LM teacher (builtin-gpt2)")
    teacher_sub = p.add_subparsers(dest="teacher_command", required=True, metavar="ACTION")
    t = teacher_sub.add_parser("train", help="train the small GPT-2 teacher on the built-in corpus (cached)")
    t.add_argument("--out", help="folder for the teacher (default: the cache that 'builtin-gpt2' refers to)")
    t.add_argument("--overwrite", action="store_true", help="retrain even when the teacher exists")
    t.add_argument("--no-progress", action="store_true")
    t = teacher_sub.add_parser("mlm-head", help="fit the built-in teacher's masked-LM head (builtin-mlm, cached)")
    t.add_argument("--overwrite", action="store_true", help="fit it again even when it exists")
    t.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("push", help="publish a finished run's student to the Hugging Face hub",
                       description="Upload RUN/student (with a model card) to a hub repository; the token is "
                       "huggingface_hub's (HF_TOKEN or huggingface-cli login).")
    p.add_argument("run", metavar="RUN_DIR", help="the --out folder of a finished distill run")
    p.add_argument("--repo-id", required=True, help="hub repository, e.g. your-name/minilm-3x384")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", help="branch to push to (default: main)")
    add_lingua_parsers(sub)  # lingua annotate|train|evaluate, compress (cli/lingua.py)
    return parser


def _default_out(name: str) -> str:
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _check_out_folder(out, *, must_not_exist: bool = False) -> None:
    """Refuse, before any work, an --out that cannot become a folder: a file, a broken link, a path under a
    file, no permission (``evaluate`` used to compute for a minute and then lose its results on such a path)."""
    from pathlib import Path

    from tadistill.errors import ConfigError
    from tadistill.outdir import check_out_path

    out = Path(out)
    if must_not_exist and (out.exists() or out.is_symlink()):
        raise ConfigError(f"--out {out} already exists: choose another --out or delete it")
    check_out_path(out)  # the same rules as a run directory's


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
    if config.student.pretrained is None and not config.teacher_signals:
        from tadistill.cli.demo import add_task_scores

        add_task_scores(result, config)  # stdlib-retrieval before and after training, beside the teacher (issue 18)
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
    from tadistill.teachers.causal import ensure_builtin_teacher

    ensure_builtin_teacher(args.model.partition("@")[0])  # builtin-gpt2 is trained on first use
    _ensure_builtin_mlm(args.model.partition("@")[0])
    print_inspect(args.model, seq_len=args.seq_len)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tadistill.config import DataConfig
    from tadistill.data.prepare import heldout_texts
    from tadistill.evaluation.suite import EvaluationSuite
    from tadistill.reports.tables import write_results
    from tadistill.study.config import EvaluationSpec
    from tadistill.teachers.causal import ensure_builtin_teacher

    from tadistill.errors import ConfigError
    from tadistill.loading import load_model_config

    out = Path(args.out) if args.out else Path(args.student).resolve().parent / "evaluation"
    _check_out_folder(out)  # before the minutes of evaluation, not after
    if args.max_length < 8:
        raise ConfigError(f"--max-length {args.max_length} is too short: use at least 8 tokens (default 128)")
    ensure_builtin_teacher(args.teacher, args.student)  # builtin-gpt2 is trained on first use
    _ensure_builtin_mlm(args.teacher, args.student)
    load_model_config(args.student, what="student")  # a wrong student path fails now, not after the teacher's turn
    spec = EvaluationSpec(tasks=args.tasks, mode=args.mode, seeds=args.seeds, latency=not args.no_latency,
                          zero_shot_tasks=args.zero_shot)
    from tadistill.evaluation.fidelity import parse_language_sources

    texts = {lang: heldout_texts(src, DataConfig(source=src), seed=0, limit=spec.fidelity_texts)
             for lang, src in parse_language_sources(args.texts).items()}  # "" = one unnamed corpus
    suite = EvaluationSuite(teacher=args.teacher, texts=texts, spec=spec, max_length=args.max_length)
    rows = [suite.evaluate_teacher(), suite.evaluate_student(args.student, name="student")]
    paths = write_results(out, rows)
    print(Path(paths["md"]).read_text())
    if args.crosslingual:  # after the suite's results are written: a failing transfer loses none of them
        from tadistill.evaluation.crosslingual import crosslingual_transfer, write_transfer
        from tadistill.loading import resolve_model_path

        transfer = {name: crosslingual_transfer(path, args.crosslingual, train_language=args.train_language,
                                                languages=args.languages, mode=args.mode, seeds=args.seeds,
                                                max_length=args.max_length)
                    for name, path in (("teacher", resolve_model_path(args.teacher)), ("student", args.student))}
        print(write_transfer(out, transfer)["md"].read_text())
    print(f"results: {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from importlib import resources
    from pathlib import Path

    from tadistill.errors import ConfigError
    from tadistill.study.compare import compare, load_study

    if bool(args.example) == bool(args.study):
        raise ConfigError("give a study YAML or --example (not both)")
    path = Path(str(resources.files("tadistill") / "study" / EXAMPLES[args.example])) if args.example else Path(args.study)
    study = load_study(path)
    if args.quick:
        try:
            study = study.quick_version()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    from tadistill.teachers.causal import ensure_builtin_teacher

    ensure_builtin_teacher(study.teacher, progress=not args.no_progress)  # builtin-gpt2: trained on first use
    _ensure_builtin_mlm(study.teacher, progress=not args.no_progress)
    out = args.out or _default_out(study.name)
    report = compare(study, out=out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # several processes (torchrun): the main one prints
        return 0
    table = Path(report) / "study.md"
    if table.is_file():
        print(table.read_text())
    print(f"report: {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tadistill.study.report import build_report

    for run in args.runs:
        report = build_report(run)
        print((report / "study.md").read_text())
        print(f"report: {report}")
    return 0


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    from tadistill.api import cache_teacher
    from tadistill.resolve import resolve_config

    config = resolve_config(args.recipe, config_file=args.config, overrides=args.overrides)
    _check_out_folder(args.out, must_not_exist=True)  # before the teacher runs over the corpus
    info = cache_teacher(config, out=args.out, progress=not args.no_progress)
    print(f"teacher signals: {args.out}  ({info['sequences']} sequences, {info['bytes_per_token']} bytes/token; "
          f"top-k {info['topk']}, hidden {info['hidden']}, Q/K/V blocks {info['qkv']})")
    print(f"train from them: --set teacher_signals={args.out}")
    return 0


def _ensure_builtin_mlm(*names: str, progress: bool = True) -> None:
    """builtin-mlm: the built-in teacher's masked-LM head is fitted on first use (teachers/mlm_head.py)."""
    from tadistill.teachers.mlm_head import ensure_builtin_mlm_teacher

    ensure_builtin_mlm_teacher(*names, progress=progress)


def cmd_mlm_head(args: argparse.Namespace) -> int:
    import json

    from tadistill.teachers.mlm_head import cached_mlm_teacher, default_mlm_teacher_dir, fit_mlm_head
    from tadistill.teachers.spec import TEACHER_FILE

    out = default_mlm_teacher_dir()
    if args.overwrite:
        fit_mlm_head("builtin", out, progress=not args.no_progress, overwrite=True)
    elif (out / TEACHER_FILE).is_file():
        print(f"head already fitted: {out} (pass --overwrite to fit it again)")
    cached_mlm_teacher(progress=not args.no_progress)
    info = _read_teacher_info(out / TEACHER_FILE)
    summary = {k: info[k] for k in ("initial_heldout_mlm_perplexity", "heldout_mlm_perplexity", "tokens_seen",
                                    "fit_seconds") if k in info}
    print(f"teacher: {out}  {json.dumps(summary)}")
    print("use it with --set teacher=builtin-mlm (recipes od, distilbert)")
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    if args.teacher_command == "mlm-head":
        return cmd_mlm_head(args)
    from tadistill.teachers.causal import TEACHER_FILE, default_teacher_dir, train_causal_teacher

    # The training is an ordinary distill run (recipe pretrain, the lm objective on a random GPT-2), published here.
    out = Path(args.out) if args.out else default_teacher_dir()
    if (out / TEACHER_FILE).is_file() and not args.overwrite:
        print(f"teacher already trained: {out} (pass --overwrite to train it again)")
    else:
        train_causal_teacher(out, progress=not args.no_progress, overwrite=args.overwrite)
    info = _read_teacher_info(out / TEACHER_FILE)
    summary = {k: info[k] for k in ("initial_heldout_perplexity", "heldout_perplexity", "tokens_seen",
                                    "train_seconds") if k in info}
    print(f"teacher: {out}  {json.dumps(summary)}")
    print("use it with --set teacher=builtin-gpt2 (the cached default) or --set teacher=" + str(out))
    return 0


def _read_teacher_info(path) -> dict:
    import json

    from tadistill.errors import ConfigError

    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: not JSON, not UTF-8
        raise ConfigError(f"{path} is damaged ({type(exc).__name__}): pass --overwrite to train the teacher "
                          "again") from None
    if not isinstance(info, dict):
        raise ConfigError(f"{path} is damaged (not a JSON object): pass --overwrite to train the teacher again")
    return info


def cmd_push(args: argparse.Namespace) -> int:
    from tadistill.publish import push_student

    url = push_student(args.run, args.repo_id, private=args.private, revision=args.revision)
    print(f"pushed {args.run}/student to {url}")
    return 0


COMMANDS = {
    "push": cmd_push,
    "distill": cmd_distill, "demo": cmd_demo, "recipes": cmd_recipes, "inspect": cmd_inspect,
    "evaluate": cmd_evaluate, "compare": cmd_compare, "report": cmd_report, "teacher": cmd_teacher,
    "cache-teacher": cmd_cache_teacher, "prepare": cmd_prepare, "search": cmd_search,
    "lingua": cmd_lingua, "compress": cmd_compress,
}


def _quiet_libraries() -> None:
    """Our own progress bar and summary are the output; silence the libraries' bars and chatter."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed in one line)
        return exc.code if isinstance(exc.code, int) else 2
    _quiet_libraries()
    from tadistill.training.signals import Interrupted

    try:
        return COMMANDS[args.command](args)
    except Interrupted as exc:  # SIGTERM / Ctrl-C: a checkpoint was written first
        print(f"interrupted: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except TadistillError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: resume with --resume (the last checkpoint is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
