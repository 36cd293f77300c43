"""Train (and cache) a small GPT-2-style causal-LM teacher on the built-in corpus: an ordinary distill run.

No model hub is reachable in the places tadistill must run, yet its causal-LM examples need a teacher
that knows something. So the library trains one, with nothing of its own but the set-up:

1. a byte-level BPE tokenizer trained on the training texts (``teachers/tokenizer.py``) and a randomly
   initialised ``GPT2LMHeadModel`` (Radford et al. 2019) of the spec's shape, drawn from the spec's
   seed, are written to a temporary folder;
2. that folder is the "teacher" of a ``tadistill.api.distill`` run of the ``pretrain`` recipe: the
   ``lm`` objective alone (teacher-free, so the teacher's weights are never run) on a student that
   starts from the folder's random weights, over the corpus packed into ``spec.context``-token
   sequences joined by ``<|endoftext|>`` (``data/tokenized.py``), AdamW (Loshchilov & Hutter 2019)
   with betas (0.9, 0.95), linear warm-up and cosine decay to ``lr * min_lr_ratio`` (nanoGPT's
   recipe), in the same loop, with the same progress bar, as every distillation;
3. the run's student folder is published atomically as the teacher (built in a temporary sibling,
   then ``os.replace``: a reader sees a complete teacher or none), with ``teacher.json``: the spec,
   the held-out loss and perplexity before and after training
   (``tadistill.measure.perplexity.causal_perplexity``, one text per sequence), tokens seen, seconds.

Texts are split train / held-out by the library's stable hash (the split the data pipeline makes with
the same fraction and seed); the tokenizer sees only the training texts.

The start from the folder's weights (``student.pretrained``) rather than ``student.init=random``: the
folder then holds exactly the student's initial weights, so the "before" perplexity is measured on the
very model training starts from, and the model is the spec's ``GPT2Config`` as written (tied
embeddings, ``n_positions = context``, dropout), not a copy derived from it.

``builtin-gpt2`` is trained on first use by the entry points (``ensure_builtin_teacher``, called by
``distill``, ``cache-teacher`` and the CLI), above the training stack that trains it;
``loading.resolve_model_path`` only looks the cached folder up (``teachers/spec.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tadistill.api import distill
from tadistill.config import BUILTIN_CAUSAL_TEACHER, DistillConfig
from tadistill.data.tokenized import split_texts
from tadistill.errors import ConfigError, DataError, TrainingError
from tadistill.loading import load_pretrained, load_tokenizer
from tadistill.measure.perplexity import causal_perplexity
from tadistill.resolve import build_config, recipe_dict
from tadistill.teachers.spec import TEACHER_FILE, TEACHER_FORMAT, TeacherSpec, default_teacher_dir, is_teacher
from tadistill.teachers.tokenizer import train_bpe_tokenizer
from tadistill.training.rundir import RunDir
from tadistill.training.signals import Interrupted

__all__ = [
    "TEACHER_FILE", "TEACHER_FORMAT", "TeacherSpec", "cached_causal_teacher", "default_teacher_dir",
    "ensure_builtin_teacher", "models_named", "teacher_config", "train_causal_teacher",
]

RECIPE = "pretrain"  # its objectives (lm only) and student.init; every number that shapes the weights is set here
EVAL_BATCHES = 64  # the loop's held-out evaluation covers the built-in corpus's whole held-out split (~60 x 128)


def teacher_config(spec: TeacherSpec, source: Path, data_source: str, work: Path) -> DistillConfig:
    """The distill config of the teacher's training: the ``pretrain`` recipe with the spec's numbers.

    Every value that shapes the weights is set here from ``spec`` (or fixed, like the betas), so that an
    edit of the recipe's defaults cannot change a cached teacher without a new ``TEACHER_FORMAT``.
    """
    data = recipe_dict(RECIPE)
    data["teacher"] = str(source)
    data["student"] = {"pretrained": str(source)}  # start from the folder's random weights (module docstring)
    data["data"] = {
        "source": data_source,
        "max_length": spec.context,
        "packing": True,  # GPT-2 style: texts joined by <|endoftext|>, cut into full-length sequences
        "heldout_fraction": spec.heldout_fraction,
        "cache_dir": str(work / "tokenized"),  # the tokenizer is new: nothing to share with later runs
    }
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    data["train"] = {
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        "grad_accum": 1,
        "lr": spec.lr,
        "schedule": "cosine",
        "min_lr_ratio": spec.min_lr_ratio,
        "warmup_steps": spec.warmup,
        "warmup_ratio": 0.0,
        "weight_decay": spec.weight_decay,
        "adam_betas": (0.9, 0.95),  # nanoGPT / GPT-3 pretraining
        "adam_eps": 1e-8,
        "max_grad_norm": spec.grad_clip or None,
        "precision": "bf16" if bf16 else "no",  # autocast on GPUs; weights and optimizer stay float32
        "seed": spec.seed,
        "eval_every": 0,  # held-out loss at the start and the end only
        "eval_batches": EVAL_BATCHES,
        "save_every": 0,
        "keep_checkpoints": 1,
        "log_every": max(1, spec.steps // 20),
    }
    return build_config(data)


@contextmanager
def _caller_random_state() -> Iterator[None]:
    """Give the caller's random generators back untouched: the run seeds Python's, NumPy's and torch's."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def _write_source(folder: Path, spec: TeacherSpec, train_texts: list[str]) -> Path:
    """The run's "teacher": the BPE tokenizer of the training texts and a random GPT-2 of the spec's shape."""
    tokenizer = train_bpe_tokenizer(train_texts, spec.vocab_size, model_max_length=spec.context)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),  # a small corpus may yield fewer merges than spec.vocab_size
        n_positions=spec.context,
        n_embd=spec.hidden,
        n_layer=spec.layers,
        n_head=spec.heads,
        resid_pdrop=spec.dropout,
        embd_pdrop=spec.dropout,
        attn_pdrop=spec.dropout,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=True,
    )
    torch.manual_seed(spec.seed)  # GPT-2's initialisation (normal, std 0.02) draws from the global generator
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = eos  # generate() would otherwise warn on every call
    model.save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)
    return folder


def _write_corpus(path: Path, texts: list[str]) -> str:
    """The caller's texts as a .jsonl corpus, one record per text (newlines inside a text are kept)."""
    with path.open("w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    return str(path)


def _heldout(folder: Path, texts: list[str], spec: TeacherSpec) -> tuple[float, int]:
    """Held-out next-token loss (nats per predicted token, every text its own sequence) and the predicted count."""
    model = load_pretrained(str(folder), head="causal-lm", what="teacher")
    tokenizer = load_tokenizer(str(folder))
    if torch.cuda.is_available():
        model.to("cuda")
    loss = causal_perplexity(model, tokenizer, texts, max_length=spec.context, batch_size=spec.batch_size)["lm_loss"]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=spec.context)["input_ids"]]
    return loss, sum(max(0, n - 1) for n in lengths)


def train_causal_teacher(
    out_dir: str | Path,
    spec: TeacherSpec = TeacherSpec(),
    *,
    texts: Sequence[str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Train a tokenizer and a GPT-2 causal LM on ``texts`` with a distill run; publish them atomically to ``out_dir``.

    Args:
        out_dir: the teacher folder to create; it must not exist, be empty, or (with ``overwrite``)
            hold a previous teacher.
        spec: model size and schedule.
        texts: the corpus; ``None`` means the built-in corpus (``builtin_texts()``). Texts are stripped
            and empty ones dropped, as every corpus reader does.
        progress: show the run's progress bar.
        overwrite: replace a complete teacher already in ``out_dir``.

    Returns:
        ``out_dir``, holding ``model.safetensors``, ``config.json``, the tokenizer files and
        ``teacher.json`` (spec, held-out loss and perplexity before and after training, tokens seen,
        train seconds). Deterministic for a spec on a given machine and thread count. The device is
        Accelerate's choice, as for every run (CUDA when available, with bf16 autocast).
    """
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)  # fail now, not after ten minutes of training
    builtin = texts is None
    if builtin:
        from tadistill.data.builtin import BUILTIN_CORPUS_VERSION, builtin_texts

        texts, corpus = builtin_texts(), f"builtin-v{BUILTIN_CORPUS_VERSION}"
    else:
        corpus = "texts"
    texts = [t.strip() for t in texts if t and t.strip()]  # what data.sources.load_texts makes of any corpus
    if not texts:
        raise DataError("the teacher corpus is empty: pass a non-empty list of texts")
    # The split the data pipeline makes of the same texts with the same fraction and seed.
    train_texts, heldout_texts = split_texts(texts, spec.heldout_fraction, seed=spec.seed)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        with _caller_random_state():
            source = _write_source(work / "source", spec, train_texts)
            data_source = "builtin" if builtin else _write_corpus(work / "corpus.jsonl", texts)
            config = teacher_config(spec, source, data_source, work)
            started = time.perf_counter()
            result = _run(config, work / "run", progress=progress)
            seconds = time.perf_counter() - started
            initial_loss, heldout_tokens = _heldout(source, heldout_texts, spec)
            heldout_loss, _ = _heldout(result.student_dir, heldout_texts, spec)
        summary = result.summary
        rows = RunDir(work / "run").read_metrics()
        info = {
            "format": TEACHER_FORMAT,
            "spec": spec.to_dict(),
            "fingerprint": spec.fingerprint(),
            "recipe": RECIPE,
            "corpus": corpus,
            "corpus_sha256": hashlib.sha256("\0".join(texts).encode()).hexdigest(),
            "train_texts": len(train_texts),
            "heldout_texts": len(heldout_texts),
            "train_tokens": summary["train_split_tokens"],
            "heldout_tokens": heldout_tokens,  # predicted tokens of the held-out loss
            "vocab_size": len(load_tokenizer(str(source))),
            "parameters": summary["student_parameters"],
            "tokens_seen": summary["tokens_seen"],
            "epochs": round(summary["tokens_seen"] / max(1, summary["train_split_tokens"]), 3),
            "initial_heldout_loss": initial_loss,
            "initial_heldout_perplexity": math.exp(initial_loss),
            "heldout_loss": heldout_loss,
            "heldout_perplexity": math.exp(heldout_loss),
            # The loop's own held-out loss: packed sequences, as in training (a text sees the end of the one before).
            "packed_heldout_loss_start": summary["heldout_loss_start"],
            "packed_heldout_loss_end": summary["heldout_loss_end"],
            "train_loss_curve": [[r["step"], round(r["loss"], 4)] for r in rows if "loss" in r],
            "train_seconds": round(seconds, 1),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch_threads": torch.get_num_threads(),
        }
        student = Path(result.student_dir)
        (student / TEACHER_FILE).write_text(json.dumps(info, indent=2) + "\n")  # last: it marks completeness
        _publish(student, out_dir, overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _run(config: DistillConfig, out: Path, *, progress: bool):
    """The distill run, with its two user errors told in the teacher's terms (no --resume, no train.lr to set)."""
    try:
        return distill(config, out=out, progress=progress)
    except Interrupted as exc:
        raise Interrupted(f"teacher training stopped by {signal.Signals(exc.signum).name}: nothing was published; "
                          "run it again to start over", exc.signum) from None
    except TrainingError as exc:
        what = str(exc).partition(": training stopped")[0]  # "loss is nan at step 2 (lm: nan)"
        raise TrainingError(f"teacher training diverged, {what}: lower TeacherSpec.lr or raise TeacherSpec.warmup"
                            ) from None


# ----------------------------------------------------------------------------------------------------
# Publishing and the cache


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if is_teacher(out_dir):
        if not overwrite:
            raise ConfigError(f"{out_dir} already holds a teacher: pass overwrite=True to replace it")
    elif out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} exists and is not a tadistill teacher: choose another folder or remove it")


def _publish(folder: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished ``folder`` (a sibling's subfolder, same file system) into place in one rename."""
    _check_target(out_dir, overwrite)  # another process may have published meanwhile
    if is_teacher(out_dir):
        # A directory cannot be renamed over a non-empty one: move the old teacher aside first.
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.replace(out_dir, old / "teacher")
        try:
            os.replace(folder, out_dir)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(folder, out_dir)  # out_dir absent, or an empty folder that rename replaces


def cached_causal_teacher(spec: TeacherSpec = TeacherSpec(), *, progress: bool = True) -> Path:
    """The cached teacher folder of ``spec``, trained on the built-in corpus first when absent."""
    folder = default_teacher_dir(spec)
    if is_teacher(folder):
        return folder
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every process of a torchrun job would train its own copy as a distributed run of its own.
        raise ConfigError("the built-in teacher is not trained yet: run 'tadistill teacher train' once before a "
                          "multi-process run")
    try:
        return train_causal_teacher(folder, spec, progress=progress)
    except ConfigError:
        if is_teacher(folder):  # a concurrent process published the same teacher first: use it
            return folder
        raise


def models_named(config: DistillConfig) -> list[str]:
    """The model names a run loads: its teacher, a pretrained student, and those its stages set."""
    names = [config.teacher, config.student.pretrained or ""]
    for stage in config.stages:
        names += [value for key, _, value in (a.partition("=") for a in stage.set)
                  if key.strip() in ("teacher", "student.pretrained")]
    return [n.strip() for n in names if n]


def ensure_builtin_teacher(*names: str | None, progress: bool = True) -> None:
    """Train and cache ``builtin-gpt2`` when one of ``names`` is it and no trained copy is cached yet.

    Called by the entry points before anything loads a model (the training is a run of the loop, which
    loading sits below); any other name is left alone, and a cached teacher costs one file check.
    """
    if BUILTIN_CAUSAL_TEACHER in names:
        cached_causal_teacher(progress=progress)
