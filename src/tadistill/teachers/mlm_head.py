"""Fit (and cache) a masked-LM head on the frozen body of an encoder: ``builtin-mlm``, the built-in teacher with one.

The comparative study distils one teacher body with OD (output distributions), HS and MHA. The built-in
teacher (all-MiniLM-L6-v2) has no masked-LM head, so OD has nothing to read. A head is fitted to it:

1. the body's weights are loaded unchanged into the family's masked-LM class (``BertForMaskedLM``): a
   BERT head (Devlin et al. 2019, appendix A.2; the transform dense + GELU + LayerNorm) whose decoder is
   TIED to the body's word embeddings, plus an output bias, drawn from ``spec.seed``;
2. the body and the tied decoder are frozen; only the transform and the bias train (179k numbers at
   384 x 30,522), with AdamW (Loshchilov & Hutter 2019), linear warm-up and cosine decay, on BERT-masked
   (80/10/10) packed sequences of the corpus (``data/``); the cross-entropy is summed over the masked
   positions of a batch and divided once by their count;
3. the folder is published atomically (built in a temporary sibling, then ``os.replace``) with
   ``teacher.json``: the spec, the held-out masked-LM loss and perplexity before and after the fit
   (``measure.perplexity.masked_lm_perplexity`` on the held-out texts of the same split), and what was
   seen. Every weight of the body, the pooler included, is saved too, so that ``AutoModel`` loads the
   very body of the original (tested bit for bit).

Why a small dedicated fit and not a ``tadistill distill`` run with the ``mlm`` objective (the way
``builtin-gpt2`` is trained):

- a run trains every weight of its student, and no config field freezes the body; the body must stay
  bit-identical, or OD would distil another teacher than HS and MHA;
- a run's student is in train mode (dropout 0.1 in the body), while OD reads the head over the teacher
  in eval mode: the head must be fitted to the eval-mode features it will see;
- the loop's masked-LM term computes (B, T, V) logits at every position; the fit needs only the ~15%
  masked positions, and its body runs under ``no_grad``: about 2.5x less work per step at V = 30,522.

A tied decoder rather than an untied copy of the embeddings: 0.36M training tokens give ~54k masked
predictions per pass, too few for 11.7M free decoder weights; tying also keeps "same body" literal.

Measured on the built-in teacher (``HeadSpec()``: 160 steps of 32 x 128 tokens, 1.8 passes over the
corpus, 2 CPU cores shared with other jobs at a load average of about 8): 756 s; held-out masked-LM
perplexity 37,265 (the random head) -> 351. For scale: the corpus's unigram distribution scores about
720 on a sample of the same held-out masking, an untied decoder started from the embeddings did no better
after 2 passes (421 vs 427 tied, same features), and a pretrained BERT scores in single digits. The top
layer of a sentence encoder tuned for mean-pooled embeddings keeps little of what predicts a masked word,
so OD can pass on only what this head knows (README, the paper's study).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForMaskedLM, get_scheduler

from tadistill.config import BUILTIN_MLM_TEACHER, BUILTIN_TEACHER, DataConfig
from tadistill.data.batches import BatchOrder, collate
from tadistill.data.masking import IGNORE_INDEX, mask_tokens
from tadistill.data.prepare import prepare_corpus
from tadistill.data.sources import source_paths
from tadistill.errors import ConfigError, DataError, ModelError
from tadistill.fileio import apply_umask
from tadistill.loading import is_causal_lm, load_pretrained, load_tokenizer, resolve_model_path
from tadistill.measure.perplexity import masked_lm_perplexity
from tadistill.teachers.mlm_spec import HEAD_FORMAT, HeadSpec, default_mlm_teacher_dir
from tadistill.teachers.spec import TEACHER_FILE, is_teacher

__all__ = ["HeadSpec", "cached_mlm_teacher", "ensure_builtin_mlm_teacher", "fit_mlm_head"]

# Files of a sentence-transformers folder: copied so that the teacher (and the students saved from it,
# training/pipeline.py) keep the body's pooling and normalisation.
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
LOG_EVERY = 20


def _with_head(base: nn.Module, seed: int) -> tuple[nn.Module, nn.Module]:
    """The family's masked-LM model holding ``base``'s weights unchanged, and its head module.

    The head is drawn from ``seed`` (transformers' initialisation uses the global generator, forked here
    so that the caller's stream is untouched); the decoder is tied to the word embeddings.
    """
    config = base.config.__class__.from_dict(base.config.to_dict())
    config.tie_word_embeddings = True  # decoder = word embeddings: the head adds no free vocabulary matrix
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = AutoModelForMaskedLM.from_config(config)
        except ValueError:
            raise ModelError(f"a {config.model_type} model has no masked-LM class in transformers: fit a head to a "
                             "BERT-style encoder") from None
    body = model.base_model
    missing, unexpected = body.load_state_dict(base.state_dict(), strict=False)
    own = {k for k in body.state_dict()}
    if missing or any(k in own for k in unexpected):
        raise ModelError(f"the body's weights do not fit {type(model).__name__} (missing {missing[:2]}): fit a head "
                         "to a BERT-style encoder")
    heads = [m for _, m in model.named_children() if m is not body]
    if len(heads) != 1:
        raise ModelError(f"{type(model).__name__} has {len(heads)} head modules, not one: fit a head to a "
                         "BERT-style encoder (BERT, RoBERTa, XLM-R)")
    model.tie_weights()
    return model, heads[0]


def trainable_head_parameters(model: nn.Module, head: nn.Module) -> list[nn.Parameter]:
    """The head's parameters that are not the body's (the tied decoder matrix is the word embeddings)."""
    body = {id(p) for p in model.base_model.parameters()}
    return [p for p in head.parameters() if id(p) not in body]


def _full_state(model: nn.Module, base: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights plus those of the base it lacks (BERT's pooler), under the masked-LM names."""
    state = dict(model.state_dict())
    prefix = model.base_model_prefix
    for key, value in base.state_dict().items():
        name = f"{prefix}.{key}"
        if name not in state:
            state[name] = value
    return state


def _copy_sentence_transformers(source: Path, target: Path) -> None:
    if not (source / "modules.json").is_file():
        return
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    for module in json.loads((source / "modules.json").read_text(encoding="utf-8")):
        folder = module.get("path")
        if folder and (source / folder).is_dir():
            shutil.copytree(source / folder, target / folder, dirs_exist_ok=True)


def _heldout(model, tokenizer, texts: list[str], spec: HeadSpec) -> float:
    return masked_lm_perplexity(model, tokenizer, texts, max_length=spec.max_length, batch_size=spec.batch_size,
                                probability=spec.mlm_probability, seed=spec.seed)["mlm_loss"]


def _fit(model, head, params, splits, tokenizer, spec: HeadSpec, *, progress: bool) -> tuple[list, int, int]:
    """The optimisation of the head; returns the loss curve, tokens seen and masked positions seen."""
    device = next(model.parameters()).device
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=spec.lr, eps=1e-6)
    scheduler = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=spec.warmup,
                              num_training_steps=spec.steps, scheduler_specific_kwargs={"min_lr_rate": 0.1})
    order = BatchOrder(len(splits.train), spec.batch_size, seed=spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)  # the masking's own stream (CPU)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    body = model.base_model.eval()  # no dropout: OD reads the head over the teacher in eval mode
    head.train()
    curve, tokens, predicted = [], 0, 0
    for step in range(spec.steps):
        batch = collate([splits.train[i] for i in order.indices(step)], pad_id=pad,
                        special_ids=tokenizer.all_special_ids)
        masked, labels = mask_tokens(batch["input_ids"], batch["special_tokens_mask"],
                                     mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                                     probability=spec.mlm_probability, generator=generator)
        with torch.no_grad():
            hidden = body(input_ids=masked.to(device),
                          attention_mask=batch["attention_mask"].to(device)).last_hidden_state  # (B, T, d)
        selected = (labels != IGNORE_INDEX).to(device)  # (B, T)
        logits = head(hidden[selected])  # (N, V): only the masked positions reach the vocabulary
        count = selected.sum()
        loss = F.cross_entropy(logits.float(), labels.to(device)[selected], reduction="sum") / count.clamp_min(1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ModelError(f"the head's loss is {value} at step {step + 1}: lower HeadSpec.lr")
        tokens += int(batch["attention_mask"].sum())
        predicted += int(count)
        if (step + 1) % LOG_EVERY == 0 or step + 1 == spec.steps:
            curve.append([step + 1, round(value, 4)])
            if progress:
                print(f"\rfitting the masked-LM head: step {step + 1}/{spec.steps}, loss {value:.3f}", end="",
                      file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return curve, tokens, predicted


def fit_mlm_head(body: str, out_dir: str | Path, spec: HeadSpec = HeadSpec(), *, data: DataConfig | None = None,
                 progress: bool = True, overwrite: bool = False) -> Path:
    """Fit a masked-LM head to the frozen encoder ``body`` and publish body + head atomically to ``out_dir``.

    Args:
        body: the encoder (local folder, hub id or 'builtin'); its weights are not changed.
        out_dir: the teacher folder to create; it must not exist, be empty, or (with ``overwrite``) hold a
            previous teacher.
        spec: the head's fit.
        data: the corpus (``source``, ``text_field``, ``cache_dir`` ...); None: the built-in corpus.
            ``max_length``, ``heldout_fraction`` and packing come from ``spec``.
        progress: print the step and the loss while fitting.
        overwrite: replace a complete teacher already in ``out_dir``.

    Returns:
        ``out_dir``, holding the masked-LM model (safetensors; the body's pooler kept), the tokenizer, the
        body's sentence-transformers files and ``teacher.json``. The device is CUDA when available.
    """
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)  # fail now, not after minutes of fitting
    data = (data or DataConfig()).model_copy(update={
        "max_length": spec.max_length, "heldout_fraction": spec.heldout_fraction, "packing": True})
    tokenizer = load_tokenizer(body)
    base = load_pretrained(body, head="base")
    if is_causal_lm(base.config):
        raise ConfigError(f"{body!r} is a causal LM: a masked-LM head is fitted to an encoder")
    if tokenizer.mask_token_id is None:
        raise ConfigError(f"the tokenizer of {body!r} has no [MASK] token: a masked-LM head needs one")
    model, head = _with_head(base, spec.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    params = trainable_head_parameters(model, head)
    for p in params:
        p.requires_grad_(True)
    splits = prepare_corpus(data, tokenizer, seed=spec.seed,
                            max_positions=getattr(base.config, "max_position_embeddings", None))
    if not splits.heldout_texts:
        raise DataError("the corpus has no held-out text to measure the head on: add text or raise "
                        "HeadSpec.heldout_fraction")
    if torch.cuda.is_available():
        model.to("cuda")

    started = time.perf_counter()
    initial = _heldout(model, tokenizer, splits.heldout_texts, spec)
    curve, tokens, predicted = _fit(model, head, params, splits, tokenizer, spec, progress=progress)
    final = _heldout(model, tokenizer, splits.heldout_texts, spec)
    seconds = time.perf_counter() - started

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        folder = work / "teacher"
        model.to("cpu").save_pretrained(folder, state_dict=_full_state(model, base.to("cpu")))
        tokenizer.save_pretrained(folder)
        _copy_sentence_transformers(Path(resolve_model_path(body)), folder)
        info = {
            "format": HEAD_FORMAT,
            "body": body,
            "spec": spec.to_dict(),
            "corpus": data.source if isinstance(data.source, str) else source_paths(data.source),
            "train_sequences": len(splits.train),
            "train_tokens": splits.train.num_tokens(),
            "heldout_texts": len(splits.heldout_texts),
            "head_parameters": sum(p.numel() for p in params),
            "tokens_seen": tokens,
            "masked_positions_seen": predicted,
            "epochs": round(tokens / max(1, splits.train.num_tokens()), 3),
            "initial_heldout_mlm_loss": initial,
            "initial_heldout_mlm_perplexity": math.exp(initial),
            "heldout_mlm_loss": final,
            "heldout_mlm_perplexity": math.exp(final),
            "train_loss_curve": curve,
            "fit_seconds": round(seconds, 1),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch_threads": torch.get_num_threads(),
        }
        (folder / TEACHER_FILE).write_text(json.dumps(info, indent=2) + "\n")  # last: it marks completeness
        apply_umask(folder)
        _publish(folder, out_dir, overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


# ----------------------------------------------------------------------------------------------------
# Publishing and the cache


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if is_teacher(out_dir):
        if not overwrite:
            raise ConfigError(f"{out_dir} already holds a teacher: pass overwrite=True to replace it")
    elif out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} exists and is not a tadistill teacher: choose another folder or remove it")


def _publish(folder: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished ``folder`` (on the same file system) into place with renames only."""
    _check_target(out_dir, overwrite)  # another process may have published meanwhile
    if is_teacher(out_dir):
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.replace(out_dir, old / "teacher")  # a folder cannot be renamed over a non-empty one
        try:
            os.replace(folder, out_dir)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(folder, out_dir)


def cached_mlm_teacher(spec: HeadSpec = HeadSpec(), *, progress: bool = True) -> Path:
    """The cached ``builtin-mlm`` folder of ``spec``, fitted on the built-in corpus first when absent."""
    folder = default_mlm_teacher_dir(spec)
    if is_teacher(folder):
        return folder
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"the {BUILTIN_MLM_TEACHER} head is not fitted yet: run 'tadistill teacher mlm-head' once "
                          "before a multi-process run")
    try:
        return fit_mlm_head(BUILTIN_TEACHER, folder, spec, progress=progress)
    except ConfigError:
        if is_teacher(folder):  # a concurrent process published the same teacher first: use it
            return folder
        raise


def ensure_builtin_mlm_teacher(*names: str | None, progress: bool = True) -> None:
    """Fit and cache the head of ``builtin-mlm`` when one of ``names`` is it and no fitted copy is cached yet."""
    if BUILTIN_MLM_TEACHER in names:
        cached_mlm_teacher(progress=progress)
