"""Hostile and clumsy inputs to every command and to the Python API (issue 11).

Each CLI case runs the real ``main(argv)`` and asserts what the user is promised: exit status 2, exactly
one line on stderr (``error: ...``, matching the expected cause), no traceback, and nothing changed on
disk: a snapshot of the test's own folder and of the shared inputs is taken before and after (the
tokenized-corpus cache lives apart; it is a cache). Every case fails before training, so the module
stays fast. Inputs are the tiny random models of conftest.py, damaged here in the ways users damage
them: a folder without tokenizer files, a truncated weights file, a binary config ...
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from tadistill.cli.main import main
from tadistill.errors import ConfigError, DataError, ModelError, RunDirError, TadistillError

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- helpers


def _snapshot(*roots: Path) -> dict[str, tuple]:
    """Every entry under ``roots``: its kind, and for files their size, mtime and content hash; for links the target.

    Folder mtimes are left out: creating and removing a temporary file inside is no change to the user's data.
    """
    entries: dict[str, tuple] = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = Path(folder, name)
                info = path.lstat()
                if stat.S_ISLNK(info.st_mode):
                    entries[str(path)] = ("link", os.readlink(path))
                elif stat.S_ISREG(info.st_mode):
                    digest = hashlib.sha256(path.read_bytes()).hexdigest()
                    entries[str(path)] = ("file", info.st_size, info.st_mtime_ns, digest)
                else:
                    entries[str(path)] = ("folder",)
    return entries


def _refused(capfd, argv: list[str], match: str, *roots: Path) -> str:
    """Run the CLI; assert status 2, one stderr line matching ``match``, no traceback, nothing changed."""
    capfd.readouterr()
    before = _snapshot(*roots)
    code = main([str(a) for a in argv])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"
    assert code == 2
    assert _snapshot(*roots) == before, "files changed although the command was refused"
    return lines[0]


def _sets(*assignments: str) -> list[str]:
    return [a for s in assignments for a in ("--set", s)]


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """The tokenized-corpus cache, outside the snapshots: filling a cache is no change to the user's data."""
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_teacher, tiny_encoder) -> Path:
    """Damaged models and files, built once; snapshotted by every case (a refusal must not touch its inputs)."""
    import transformers as tf

    root = tmp_path_factory.mktemp("hostile-inputs")

    def model_copy(name: str, *, without=(), source: Path = tiny_teacher) -> Path:
        folder = root / name
        shutil.copytree(source, folder)
        for pattern in without:
            for path in folder.glob(pattern):
                path.unlink()
        return folder

    # No tokenizer file at all: transformers 5 would make a 5-token tokenizer and every word [UNK].
    model_copy("no-tokenizer", without=["tokenizer*", "vocab.txt", "special_tokens_map.json"])
    # A tokenizer_config.json but no vocabulary: the same 5-token tokenizer, so the vocabulary size gives it away.
    model_copy("config-only-tokenizer", without=["tokenizer.json", "vocab.txt", "special_tokens_map.json"])
    weights = model_copy("truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (model_copy("bad-config-json") / "config.json").write_text('{"model_type": "bert", "hidden_size": ')
    sizes = model_copy("wrong-sizes") / "config.json"
    sizes.write_text(json.dumps({**json.loads(sizes.read_text()), "hidden_size": 64, "intermediate_size": 128}))
    hubert = tf.HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                             num_conv_pos_embedding_groups=4)
    tf.HubertModel(hubert).save_pretrained(root / "hubert", safe_serialization=True)

    (root / "config-folder").mkdir()
    (root / "binary.yaml").write_bytes(bytes(range(128, 256)) * 4)
    (root / "latin1.yaml").write_bytes("recipe: hs\nteacher: caf\xe9\n".encode("latin-1"))
    (root / "list.yaml").write_text("- recipe\n- hs\n")
    (root / "invalid.yaml").write_text("recipe: hs\ntrain: {steps: [1, 2\n")
    (root / "recipe-list.yaml").write_text("recipe: [hs]\n")
    (root / "int-key.yaml").write_text("recipe: hs\n1: 2\n")
    (root / "a-file.txt").write_text("not a folder\n")
    os.symlink(root / "nowhere", root / "dangling")
    return root


@pytest.fixture(scope="module")
def signals(tmp_path_factory, tiny_encoder, tiny_corpus, cache_dir) -> Path:
    """A folder of offline teacher signals (hs recipe on the tiny encoder) and damaged copies of it."""
    root = tmp_path_factory.mktemp("signals")
    good = root / "good"
    argv = ["cache-teacher", "hs", *_sets(f"teacher={tiny_encoder}", f"data.source={tiny_corpus}",
                                          f"data.cache_dir={cache_dir}", "data.max_length=24",
                                          "data.heldout_fraction=0.2"), "--out", str(good), "--no-progress"]
    assert main(argv) == 0
    shards = sorted(p.name for p in good.glob("*.safetensors"))
    assert shards == ["heldout-00000.safetensors", "train-00000.safetensors"]
    for name in ("truncated-shard", "missing-shard", "garbage-meta", "list-meta", "meta-without-counts"):
        shutil.copytree(good, root / name)
    shard = root / "truncated-shard" / "train-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size - 100])
    (root / "missing-shard" / "heldout-00000.safetensors").unlink()
    (root / "garbage-meta" / "meta.json").write_text('{"format": 1, "hidden": [')
    (root / "list-meta" / "meta.json").write_text("[1, 2, 3]")
    meta = json.loads((good / "meta.json").read_text())
    del meta["sequences"]
    (root / "meta-without-counts" / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    """Study folders as compare leaves them (study.yaml, cells/*/status.json, report/teacher.json), damaged."""
    root = tmp_path_factory.mktemp("studies")
    study = {"methods": [{"name": "hs", "recipe": "hs"}], "students": [{"layers": 2, "hidden": None, "heads": None}]}
    results = {"params": 1000, "stdlib-topic/accuracy": 0.5}

    def make(name: str) -> Path:
        folder = root / name
        (folder / "cells" / "hs_2xT").mkdir(parents=True)
        (folder / "report").mkdir()
        (folder / "study.yaml").write_text(yaml.safe_dump(study))
        (folder / "cells" / "hs_2xT" / "status.json").write_text(json.dumps({"state": "evaluated", "results": results}))
        (folder / "report" / "teacher.json").write_text(json.dumps({"params": 4000}))
        return folder

    make("binary-study-yaml").joinpath("study.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    make("invalid-study-yaml").joinpath("study.yaml").write_text("methods: [{name: hs\n")
    make("study-yaml-without-methods").joinpath("study.yaml").write_text("students: [{layers: 2}]\n")
    make("corrupt-status").joinpath("cells", "hs_2xT", "status.json").write_text('{"state": "evalu')
    make("list-status").joinpath("cells", "hs_2xT", "status.json").write_text("[]")
    make("corrupt-teacher-json").joinpath("report", "teacher.json").write_bytes(b"\xff\xfe{")
    report_is_file = make("report-is-a-file")
    shutil.rmtree(report_is_file / "report")
    (report_is_file / "report").write_text("mine\n")
    metrics = make("corrupt-metrics").joinpath("cells", "hs_2xT", "metrics.jsonl")
    metrics.write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 0.5}\n')
    (root / "not-a-study").mkdir()
    (root / "not-a-study" / "notes.txt").write_text("my notes\n")
    return root


@pytest.fixture
def run(tiny_teacher, tiny_corpus, cache_dir, inputs, tmp_path, capfd):
    """``run(argv, match)``: a distill-style command on the tiny teacher must be refused; ``{tmp}`` in argv is
    the test's own folder."""

    def refuse(argv: list[str], match: str, *roots: Path) -> str:
        argv = [str(a).replace("{tmp}", str(tmp_path)) for a in argv]
        return _refused(capfd, argv, match, tmp_path, inputs, *roots)

    return refuse


def _tiny(teacher, corpus, cache, *extra: str) -> list[str]:
    return _sets(f"teacher={teacher}", f"data.source={corpus}", f"data.cache_dir={cache}", "data.max_length=24",
                 "data.heldout_fraction=0.2", "train.steps=2", "train.batch_size=4", "train.eval_batches=1", *extra)


# ------------------------------------------------------------------------------------- distill: models

# (case id, teacher folder name under ``inputs`` or None for the tiny teacher, extra --set, expected message)
MODEL_CASES = [
    ("teacher-without-tokenizer-files", "no-tokenizer", [], r"has no tokenizer files"),
    ("teacher-with-a-5-token-tokenizer", "config-only-tokenizer", [], r"has 5 tokens but the model 126"),
    ("hubert-teacher", "hubert", [], r"hubert' has no tokenizer files"),
    ("truncated-teacher-weights", "truncated", [], r"weights look damaged"),
    ("teacher-config-json-not-json", "bad-config-json", [], r"not a valid JSON"),
    ("weights-contradict-config-json", "wrong-sizes", [], r"do not have the sizes its config.json gives"),
    ("teacher-is-a-text-file", "a-file.txt", [], r"could not be loaded"),
    ("teacher-missing", "nowhere", [], r"not found"),
    ("teacher-empty", "", [], r"a model name is ''"),
    ("student-pretrained-without-tokenizer", None, ["student.pretrained={inputs}/no-tokenizer"],
     r"student .* has no tokenizer files"),
    ("student-deeper-than-the-teacher-from-its-blocks", None, ["student.num_layers=9", "student.init=teacher"],
     r"student\.init_layers=\[0,0,0,1,1,2,2,3,3\]"),
    ("student-absurdly-deep", None, ["student.num_layers=5000"], r"larger than any Transformer"),
    ("heads-do-not-divide", None, ["student.num_heads=3"], r"not divisible by 3 heads"),
    ("student-wider-than-teacher-from-its-weights", None, ["student.init=teacher", "student.hidden_size=64"],
     r"wider than the teacher"),
    ("max-length-beyond-positions", None, ["data.max_length=100000"], r"exceeds the teacher's 64 positions"),
    ("corpus-missing", None, ["data.source={inputs}/nowhere.txt"], r"not found"),
    ("corpus-of-unknown-type", None, ["data.source={inputs}/binary.yaml"], r"unsupported type"),
]


@pytest.mark.parametrize("teacher, extra, match", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_distill_refuses_bad_models_and_data(teacher, extra, match, run, inputs, tiny_teacher, tiny_corpus,
                                            cache_dir):
    chosen = tiny_teacher if teacher is None else (inputs / teacher if teacher else "")
    extra = [e.replace("{inputs}", str(inputs)) for e in extra]
    run(["distill", "hs", *_tiny(chosen, tiny_corpus, cache_dir, *extra), "--out", "{tmp}/run", "--no-progress"],
        match)


# ------------------------------------------------------------------------------------- distill: config

CONFIG_CASES = [
    ("adam-betas-out-of-range", ["train.adam_betas=[2,3]"], r"adam_betas must each be in \[0, 1\)"),
    ("adam-betas-one-value", ["train.adam_betas=[0.9]"], r"train\.adam_betas"),
    ("lr-infinite", ["train.lr=.inf"], r"train\.lr: Input should be a finite number"),
    ("lr-nan", ["train.lr=.nan"], r"train\.lr: Input should be a finite number"),
    ("weight-infinite", ["objectives.hidden.weight=.inf"], r"weight: Input should be a finite number"),
    ("grad-clip-infinite", ["train.max_grad_norm=.inf"], r"max_grad_norm: Input should be a finite number"),
    ("seed-negative", ["train.seed=-1"], r"train\.seed"),
    ("seed-beyond-numpy", ["train.seed=1099511627776"], r"train\.seed: Input should be less than 4294967296"),
    ("lr-negative", ["train.lr=-1"], r"train\.lr: Input should be greater than 0"),
    ("steps-fractional", ["train.steps=2.5"], r"train\.steps"),
    ("unknown-key-with-suggestion", ["train.stpes=3"], r"unknown config key 'train\.stpes' \(did you mean 'steps'\?\)"),
    ("override-without-equals", ["train.steps"], r"must look like key=value"),
    ("override-empty-key", ["=3"], r"has an empty key"),
    ("override-into-a-value", ["train=5", "train.steps=3"], r"train is 5, not a section"),
    ("override-into-a-replaced-objective", ["objectives.0=5", "objectives.0.weight=1"],
     r"objectives\.0 is 5, not an objective"),
    ("unknown-objective-kind", ["objectives.0.kind=zzz"], r"unknown objective kind 'zzz'"),
    ("objective-not-in-config", ["objectives.minilm.weight=2"], r"no objective 'minilm'"),
    ("mapping-unknown", ["objectives.hidden.mapping=diagonal"], r"unknown mapping 'diagonal'"),
    ("precision-unknown", ["train.precision=fp8"], r"train\.precision"),
    ("warmup-ratio-one", ["train.warmup_ratio=1"], r"train\.warmup_ratio"),
]


@pytest.mark.parametrize("extra, match", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_distill_refuses_bad_config_values(extra, match, run, tiny_teacher, tiny_corpus, cache_dir):
    run(["distill", "hs", *_tiny(tiny_teacher, tiny_corpus, cache_dir), *_sets(*extra), "--out", "{tmp}/run"], match)


CONFIG_FILE_CASES = [
    ("config-is-a-folder", "config-folder", r"is a folder: give the YAML file inside it"),
    ("config-is-binary", "binary.yaml", r"is not UTF-8 text"),
    ("config-is-latin1", "latin1.yaml", r"is not UTF-8 text"),
    ("config-is-a-list", "list.yaml", r"must be a mapping of keys to values"),
    ("config-is-invalid-yaml", "invalid.yaml", r"is not valid YAML at line \d+"),
    ("config-recipe-is-a-list", "recipe-list.yaml", r"recipe must be a recipe name"),
    ("config-has-a-number-as-key", "int-key.yaml", r"unknown config key '1'"),
    ("config-missing", "nowhere.yaml", r"not found: check the path"),
    ("config-dangling-link", "dangling", r"not found: check the path"),
]


@pytest.mark.parametrize("name, match", [c[1:] for c in CONFIG_FILE_CASES], ids=[c[0] for c in CONFIG_FILE_CASES])
def test_distill_refuses_bad_config_files(name, match, run, inputs):
    run(["distill", "--config", inputs / name, "--out", "{tmp}/run"], match)


def test_distill_without_recipe_or_config_is_one_line(run):
    run(["distill", "--out", "{tmp}/run"], r"give a recipe name or --config FILE")


def test_distill_unknown_recipe_suggests_the_closest(run):
    run(["distill", "minilmv3", "--out", "{tmp}/run"], r"unknown recipe 'minilmv3' \(did you mean 'minilmv2'\?\)")


# A1's run-directory rules, seen from the command line: refused before anything is computed.
def test_distill_out_that_is_a_file_is_one_line(run, tiny_teacher, tiny_corpus, cache_dir, tmp_path):
    (tmp_path / "taken").write_text("mine\n")
    run(["distill", "hs", *_tiny(tiny_teacher, tiny_corpus, cache_dir), "--out", "{tmp}/taken"], r"is a file")


def test_distill_resume_and_overwrite_together_is_one_line(run, tiny_teacher, tiny_corpus, cache_dir):
    run(["distill", "hs", *_tiny(tiny_teacher, tiny_corpus, cache_dir), "--out", "{tmp}/run", "--resume",
         "--overwrite"], r"contradict")


def test_batch_larger_than_the_training_split_creates_nothing(run, tiny_teacher, tiny_corpus, cache_dir):
    run(["distill", "hs", *_tiny(tiny_teacher, tiny_corpus, cache_dir, "train.batch_size=100000"), "--out",
         "{tmp}/run", "--no-progress"], r"too few sequences .* for the batch size 100000")


# ------------------------------------------------------------------------------------- offline signals

SIGNAL_CASES = [
    ("signals-folder-without-meta", "{inputs}/no-tokenizer", r"holds no meta\.json"),
    ("signals-path-is-a-file", "{inputs}/a-file.txt", r"is not a folder"),
    ("signals-truncated-shard", "{signals}/truncated-shard", r"train-00000\.safetensors cannot be read"),
    ("signals-missing-shard", "{signals}/missing-shard", r"heldout-00000\.safetensors cannot be read"),
    ("signals-meta-not-json", "{signals}/garbage-meta", r"meta\.json is damaged \(Expecting value"),
    ("signals-meta-a-list", "{signals}/list-meta", r"meta\.json is damaged \(not a JSON object\)"),
    ("signals-meta-without-counts", "{signals}/meta-without-counts", r"meta\.json is damaged \(missing or wrong "
     r"sequences\)"),
]


@pytest.mark.parametrize("path, match", [c[1:] for c in SIGNAL_CASES], ids=[c[0] for c in SIGNAL_CASES])
def test_distill_refuses_damaged_teacher_signals(path, match, run, signals, inputs, tiny_encoder, tiny_corpus,
                                                 cache_dir):
    path = path.replace("{inputs}", str(inputs)).replace("{signals}", str(signals))
    run(["distill", "hs", *_sets(f"teacher={tiny_encoder}", f"data.source={tiny_corpus}",
                                 f"data.cache_dir={cache_dir}", "data.max_length=24", "data.heldout_fraction=0.2",
                                 "train.batch_size=4", f"teacher_signals={path}"), "--out", "{tmp}/run",
         "--no-progress"], match, signals)


# ------------------------------------------------------------------------------------ the other commands


def test_demo_refuses_bad_values_before_loading_anything(run):
    run(["demo", "--set", "train.adam_betas=[2,3]", "--out", "{tmp}/demo"], r"adam_betas")


def test_demo_refuses_unknown_keys(run):
    run(["demo", "--set", "student.layers=2", "--out", "{tmp}/demo"], r"unknown config key 'student\.layers' "
        r"\(did you mean 'num_layers'\?\)")


USAGE_CASES = [
    ("no-command", [], r"the following arguments are required: COMMAND"),
    ("unknown-command", ["distil"], r"invalid choice: 'distil'"),
    ("recipes-with-an-argument", ["recipes", "kd"], r"unrecognized arguments: kd"),
    ("inspect-without-model", ["inspect"], r"required: MODEL_OR_SPEC"),
    ("inspect-seq-len-not-a-number", ["inspect", "builtin", "--seq-len", "many"], r"invalid int value: 'many'"),
    ("evaluate-without-teacher", ["evaluate", "{tmp}/student"], r"required: --teacher"),
    ("evaluate-unknown-mode", ["evaluate", "s", "--teacher", "t", "--mode", "zero"], r"invalid choice: 'zero'"),
    ("compare-unknown-example", ["compare", "--example", "vision"], r"invalid choice: 'vision'"),
    ("cache-teacher-without-out", ["cache-teacher", "hs"], r"required: --out"),
    ("teacher-without-action", ["teacher"], r"required: ACTION"),
    ("report-without-folder", ["report"], r"required: RUN_DIR"),
]


@pytest.mark.parametrize("argv, match", [c[1:] for c in USAGE_CASES], ids=[c[0] for c in USAGE_CASES])
def test_usage_errors_are_one_line(argv, match, run):
    run(argv, match)


def test_help_still_exits_zero(capfd):
    assert main(["--help"]) == 0
    assert "distill" in capfd.readouterr().out


INSPECT_CASES = [
    ("missing-model", "{inputs}/nowhere", r"model .* not found"),
    ("binary-file", "{inputs}/binary.yaml", r"could not be loaded"),
    ("config-json-not-json", "{inputs}/bad-config-json", r"not a valid JSON"),
    ("absurd-depth", "{teacher}@99999999999x8", r"num_layers=99999999999 is larger than any Transformer"),
    ("heads-do-not-divide", "{teacher}@2x30x7", r"not divisible by 7 heads"),
    ("bad-spec", "{teacher}@two", r"not found|bad spec"),
]


@pytest.mark.parametrize("spec, match", [c[1:] for c in INSPECT_CASES], ids=[c[0] for c in INSPECT_CASES])
def test_inspect_refuses(spec, match, run, inputs, tiny_teacher):
    run(["inspect", spec.replace("{inputs}", str(inputs)).replace("{teacher}", str(tiny_teacher))], match)


def test_inspect_negative_seq_len(run, tiny_teacher):
    run(["inspect", tiny_teacher, "--seq-len", "-5"], r"seq_len must be a positive integer")


@pytest.fixture
def evaluate(run, tiny_teacher, tiny_corpus):
    def refuse(*extra, match: str, student=None, teacher=None):
        run(["evaluate", student or tiny_teacher, "--teacher", teacher or tiny_teacher, "--texts", tiny_corpus,
             "--seeds", "0", "--no-latency", *extra], match)

    return refuse


def test_evaluate_out_that_is_a_file_is_refused_before_the_work(evaluate, tmp_path):
    (tmp_path / "results").write_text("my earlier results\n")
    evaluate("--out", "{tmp}/results", match=r"--out .*results is a file")


def test_evaluate_out_under_a_file_is_refused_before_the_work(evaluate, tmp_path):
    (tmp_path / "results").write_text("my earlier results\n")
    evaluate("--out", "{tmp}/results/evaluation", match=r"is a file, not a folder")


def test_evaluate_out_a_dangling_link_is_refused(evaluate, tmp_path):
    os.symlink(tmp_path / "gone", tmp_path / "link")
    evaluate("--out", "{tmp}/link", match=r"symbolic link .* does not exist")


def test_evaluate_missing_student_is_refused_before_the_teacher_is_evaluated(evaluate):
    evaluate("--out", "{tmp}/ev", student="{tmp}/no-student", match=r"student .* not found")


def test_evaluate_teacher_without_tokenizer(evaluate, inputs):
    evaluate("--out", "{tmp}/ev", teacher=inputs / "no-tokenizer", match=r"has no tokenizer files")


def test_evaluate_too_short_max_length(evaluate):
    evaluate("--out", "{tmp}/ev", "--max-length", "2", match=r"--max-length 2 is too short")


def _study(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "study.yaml"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return path


COMPARE_CASES = [
    ("binary-study-file", b"\x89PNG\r\n\x1a\n\x00\xff", r"not valid YAML \(or not UTF-8 text\)"),
    ("invalid-yaml", "methods: [{name: hs\n", r"not valid YAML"),
    ("unknown-key", "name: s\nmethods: [{name: hs, recipe: hs}]\nstudents: [{layers: 2}]\nseeds: 3\n", r"seeds"),
    ("method-name-escapes-out", "methods: [{name: ../../x, recipe: hs}]\nstudents: [{layers: 2}]\n",
     r"must be a plain file name"),
    ("no-methods", "students: [{layers: 2}]\n", r"methods"),
]


@pytest.mark.parametrize("text, match", [c[1:] for c in COMPARE_CASES], ids=[c[0] for c in COMPARE_CASES])
def test_compare_refuses_bad_study_files(text, match, run, tmp_path):
    run(["compare", _study(tmp_path, text), "--out", "{tmp}/study"], match)


def test_compare_needs_a_study_or_an_example(run):
    run(["compare", "--out", "{tmp}/study"], r"give a study YAML or --example")


def test_compare_study_file_missing(run):
    run(["compare", "{tmp}/nowhere.yaml", "--out", "{tmp}/study"], r"not found")


REPORT_CASES = [
    ("not-a-study", r"holds no study"),
    ("binary-study-yaml", r"study\.yaml is damaged \(UnicodeDecodeError\)"),
    ("invalid-study-yaml", r"study\.yaml is damaged"),
    ("study-yaml-without-methods", r"study\.yaml is damaged \(not a study config\)"),
    ("corrupt-status", r"status\.json is damaged \(JSONDecodeError\)"),
    ("list-status", r"status\.json is damaged \(not a JSON object\)"),
    ("corrupt-teacher-json", r"teacher\.json is damaged"),
    ("report-is-a-file", r"report is a file"),
    ("corrupt-metrics", r"metrics\.jsonl"),
]


@pytest.mark.parametrize("name, match", REPORT_CASES, ids=[c[0] for c in REPORT_CASES])
def test_report_refuses_damaged_studies_without_writing(name, match, run, studies):
    run(["report", studies / name], match, studies)


CACHE_TEACHER_CASES = [
    ("out-exists", "{inputs}/config-folder", [], r"already exists: choose another --out"),
    ("out-under-a-file", "{inputs}/a-file.txt/signals", [], r"is a file, not a folder"),
    ("teacher-without-tokenizer", "{tmp}/signals", ["teacher={inputs}/no-tokenizer"], r"has no tokenizer files"),
    ("bad-value", "{tmp}/signals", ["train.adam_betas=[1,1]"], r"adam_betas"),
]


@pytest.mark.parametrize("out, extra, match", [c[1:] for c in CACHE_TEACHER_CASES],
                         ids=[c[0] for c in CACHE_TEACHER_CASES])
def test_cache_teacher_refuses_before_running_the_teacher(out, extra, match, run, inputs, tiny_encoder, tiny_corpus,
                                                          cache_dir):
    out = out.replace("{inputs}", str(inputs))
    extra = [e.replace("{inputs}", str(inputs)) for e in extra]
    run(["cache-teacher", "hs", *_tiny(tiny_encoder, tiny_corpus, cache_dir), *_sets(*extra), "--out", out,
         "--no-progress"], match)


def test_teacher_train_with_a_damaged_teacher_json_is_one_line(run, tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "teacher.json").write_text('{"heldout_perplexity": ')
    run(["teacher", "train", "--out", "{tmp}/teacher", "--no-progress"], r"teacher\.json is damaged .*--overwrite")


def test_teacher_train_into_a_file_is_one_line(run, tmp_path):
    (tmp_path / "teacher").write_text("mine\n")
    run(["teacher", "train", "--out", "{tmp}/teacher", "--no-progress"], r"is not a tadistill teacher")


def test_teacher_train_into_a_folder_of_other_files_is_one_line(run, tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "notes.txt").write_text("mine\n")
    run(["teacher", "train", "--out", "{tmp}/teacher", "--no-progress"], r"is not a tadistill teacher")


# ------------------------------------------------------------------------------------------ Python API


def _api_cases(inputs: Path, studies: Path, signals: Path):
    from tadistill.loading import load_model_config, load_pretrained, load_tokenizer
    from tadistill.resolve import resolve_config
    from tadistill.study.report import build_report

    return {
        "overrides-a-bare-string": (lambda: resolve_config("hs", overrides="train.steps=3"), ConfigError,
                                    r"overrides must be a list .* write overrides=\['train\.steps=3'\]"),
        "overrides-none": (lambda: resolve_config("hs", overrides=None), ConfigError, r"overrides must be a list"),
        "overrides-not-strings": (lambda: resolve_config("hs", overrides=[3]), ConfigError, r"got \[3\]"),
        "recipe-not-a-string": (lambda: resolve_config(["hs"]), ConfigError, r"recipe must be a recipe name"),
        "config-file-not-a-path": (lambda: resolve_config(config_file=3), ConfigError, r"config_file must be a path"),
        "config-file-a-folder": (lambda: resolve_config(config_file=inputs / "config-folder"), ConfigError,
                                 r"is a folder"),
        "config-file-binary": (lambda: resolve_config(config_file=inputs / "binary.yaml"), ConfigError,
                               r"not UTF-8"),
        "tokenizer-of-hubert": (lambda: load_tokenizer(str(inputs / "hubert")), ModelError, r"no tokenizer files"),
        "tokenizer-5-tokens": (lambda: load_tokenizer(str(inputs / "config-only-tokenizer")), ModelError,
                               r"has 5 tokens"),
        "truncated-weights": (lambda: load_pretrained(str(inputs / "truncated")), ModelError, r"damaged"),
        "config-json-not-json": (lambda: load_model_config(str(inputs / "bad-config-json")), ModelError,
                                 r"not a valid JSON"),
        "model-name-none": (lambda: load_model_config(None), ModelError, r"a model name is None"),
        "report-of-corrupt-status": (lambda: build_report(studies / "corrupt-status"), RunDirError, r"damaged"),
        "signals-truncated": (lambda: _open_signals(signals / "truncated-shard"), DataError, r"cannot be read"),
    }


def _open_signals(path: Path):
    from tadistill.training.teacher_cache import SignalSpec, TeacherSignals

    return TeacherSignals(path, meta={}, spec=SignalSpec(topk=None, hidden=(), qkv=()))


API_CASES = ["overrides-a-bare-string", "overrides-none", "overrides-not-strings", "recipe-not-a-string",
             "config-file-not-a-path", "config-file-a-folder", "config-file-binary", "tokenizer-of-hubert",
             "tokenizer-5-tokens", "truncated-weights", "config-json-not-json", "model-name-none",
             "report-of-corrupt-status", "signals-truncated"]


@pytest.mark.parametrize("case", API_CASES)
def test_python_api_raises_the_clis_errors(case, inputs, studies, signals):
    call, kind, match = _api_cases(inputs, studies, signals)[case]
    before = _snapshot(inputs, studies, signals)
    with pytest.raises(TadistillError) as caught:
        call()
    assert isinstance(caught.value, kind), type(caught.value)
    assert "\n" not in str(caught.value) and re.search(match, str(caught.value)), str(caught.value)
    assert _snapshot(inputs, studies, signals) == before


def test_python_api_distill_refuses_a_teacher_without_tokenizer_and_creates_nothing(inputs, tiny_corpus, cache_dir,
                                                                                   tmp_path):
    from tadistill.api import distill
    from tadistill.resolve import resolve_config

    config = resolve_config("hs", overrides=_tiny(inputs / "no-tokenizer", tiny_corpus, cache_dir)[1::2])
    with pytest.raises(ModelError, match="has no tokenizer files"):
        distill(config, out=tmp_path / "run", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_too_many_layers_hint_is_a_selection_init_layers_accepts():
    """The hint used to name strategy 'explicit', which student.init_layers refuses; the list it gives now works."""
    from tadistill.config import StudentConfig
    from tadistill.students.init import select_layers

    with pytest.raises(ConfigError) as caught:
        select_layers("uniform", 6, 4)
    hint = re.search(r"student\.init_layers=(\[[\d,]+\])", str(caught.value))
    assert hint is not None and "'explicit'" not in str(caught.value)
    layers = json.loads(hint.group(1))
    StudentConfig(init="teacher", init_layers=layers)  # the config takes it
    assert select_layers("explicit", 6, 4, layers) == layers == [0, 0, 1, 2, 2, 3]
