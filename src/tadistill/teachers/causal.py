"""Train (and cache) a small GPT-2-style causal-LM teacher on the built-in corpus.

No model hub is reachable in the places tadistill must run, yet its causal-LM examples need a teacher
that knows something. So the library trains one: a byte-level BPE tokenizer and a randomly
initialised ``GPT2LMHeadModel`` (Radford et al. 2019) fitted to the built-in corpus with next-token
cross-entropy, AdamW (Loshchilov & Hutter 2019), linear warm-up and cosine decay -- the nanoGPT
recipe, in a loop you can read top to bottom.

The default :class:`TeacherSpec` was sized to finish in about 8 to 12 minutes on 2 CPU cores
(measured figures in its docstring). Texts are split train / held-out by the library's stable hash
(:func:`tadistill.data.tokenized.split_texts`); the tokenizer sees only the training texts, and the
held-out loss and perplexity are written to ``teacher.json`` next to the weights.

The folder is published atomically (built in a temporary sibling, then ``os.replace``): a reader sees
a complete teacher or none, and an interrupted run leaves at most a hidden temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

from tadistill.errors import ConfigError, DataError, TrainingError
from tadistill.teachers.tokenizer import train_bpe_tokenizer

TEACHER_FILE = "teacher.json"
# Bumped whenever training changes in a way that changes the weights, so cached teachers are retrained.
TEACHER_FORMAT = 1


@dataclass(frozen=True)
class TeacherSpec:
    """Everything that determines the teacher's weights (on a given machine and corpus).

    Defaults: 4 layers x 256 wide, 4 heads, a 4096-token BPE vocabulary, 128-token context: 4.2M
    parameters, the embeddings tied with the output layer. A 4096 vocabulary rather than 8192 halves the
    output layer, the largest matmul at this width: a step is ~30% faster (1.2 s vs 1.7 s idle), here
    and in every distillation that computes the teacher's logits. 360 steps of 32 x 128 tokens see 1.47M tokens,
    about 4 passes over the 0.36M training tokens of the built-in corpus; lr 2e-3 beat 1e-3 there
    (held-out perplexity 126 vs 148). Measured on 2 CPU cores: ~1.3 s a step when idle (~8 minutes
    in all), 11.3 minutes with another test suite running on and off, ~4 s a step under a sustained
    competing load.

    Attributes:
        layers: transformer blocks (GPT2Config.n_layer).
        hidden: model width (n_embd); the MLP is 4x wider, as in GPT-2.
        heads: attention heads (n_head); must divide ``hidden``.
        context: tokens per training sequence and the model's positions (n_positions).
        vocab_size: BPE vocabulary requested (bytes and <|endoftext|> included, >= 258).
        steps: optimizer steps.
        batch_size: sequences per step.
        lr: peak learning rate of AdamW.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio`` at the last step.
        warmup: steps of linear warm-up from ``lr / warmup`` to ``lr``.
        weight_decay: AdamW decay of the matrices (biases and LayerNorm gains are not decayed).
        dropout: dropout of embeddings, attention and residuals; 0 because the model sees each token
            only a few times (as nanoGPT pretraining).
        grad_clip: global gradient-norm clip (0 disables it).
        heldout_fraction: share of texts kept out of training for the held-out loss.
        seed: seeds the initialisation, the data order and dropout.
    """

    layers: int = 4
    hidden: int = 256
    heads: int = 4
    context: int = 128
    vocab_size: int = 4096
    steps: int = 360
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    dropout: float = 0.0
    grad_clip: float = 1.0
    heldout_fraction: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "context", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TeacherSpec.{name}={getattr(self, name)} must be at least 1")
        if self.hidden % self.heads:
            raise ConfigError(f"TeacherSpec.hidden={self.hidden} must be a multiple of heads={self.heads}")
        if self.context < 2:
            raise ConfigError(f"TeacherSpec.context={self.context} must be at least 2 (one token predicts the next)")
        if self.vocab_size < 258:
            raise ConfigError(f"TeacherSpec.vocab_size={self.vocab_size} must be at least 258 (256 bytes + merges)")
        if not 0 <= self.warmup <= self.steps:
            raise ConfigError(f"TeacherSpec.warmup={self.warmup} must be between 0 and steps={self.steps}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1):
            raise ConfigError("TeacherSpec needs lr > 0 and 0 <= min_lr_ratio <= 1")
        if self.weight_decay < 0 or self.grad_clip < 0 or not 0 <= self.dropout < 1:
            raise ConfigError("TeacherSpec needs weight_decay >= 0, grad_clip >= 0 and 0 <= dropout < 1")
        if not 0 < self.heldout_fraction < 0.5:
            raise ConfigError(f"TeacherSpec.heldout_fraction={self.heldout_fraction} must be in (0, 0.5)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TeacherSpec:
        """Rebuild a spec from ``to_dict()`` output (for example ``teacher.json["spec"]``)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown TeacherSpec fields {unknown}: use only {sorted(known)}")
        return cls(**data)

    def fingerprint(self) -> str:
        """A short stable hash of the spec, the trainer format and the built-in corpus version."""
        from tadistill.data.builtin import BUILTIN_CORPUS_VERSION

        key = json.dumps({"spec": self.to_dict(), "format": TEACHER_FORMAT, "corpus": BUILTIN_CORPUS_VERSION},
                         sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------
# Data: texts -> packed blocks


def pack_texts(texts: Sequence[str], tokenizer, context: int, *, keep_tail: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize ``texts``, join them with ``eos`` and cut the stream into blocks of ``context`` tokens.

    GPT-2 style packing: every text is followed by ``<|endoftext|>`` so the model learns where a text
    ends, and a block may span two texts (attention is not reset at the separator, as in GPT-2).

    Returns:
        ``(input_ids, labels)``, both int64 of shape (N, context). ``labels`` equals ``input_ids``
        except in the padding of the last block, which is kept only when ``keep_tail`` (held-out data:
        every token counts) and is labelled -100; otherwise the partial last block is dropped.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        stream += ids
        stream.append(eos)
    full = len(stream) // context
    tail = len(stream) - full * context
    if keep_tail and tail:
        pad = context - tail
        ids = torch.tensor(stream + [eos] * pad, dtype=torch.long).view(-1, context)
        labels = ids.clone()
        labels[-1, tail:] = -100  # padding predicts nothing; real tokens before it are unaffected (causal)
        return ids, labels
    ids = torch.tensor(stream[: full * context], dtype=torch.long).view(full, context)
    return ids, ids.clone()


def _batches(n_blocks: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Block indices, batch by batch: a fresh permutation every pass, the incomplete last batch dropped."""
    batch_size = min(batch_size, n_blocks)  # a tiny corpus trains on all of its blocks each step
    while True:
        order = torch.randperm(n_blocks, generator=generator)
        for start in range(0, n_blocks - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


# ----------------------------------------------------------------------------------------------------
# Objective and evaluation


def next_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of predicted tokens.

    Args:
        logits: (B, T, V) scores of the token after each position.
        labels: (B, T) token ids; -100 marks positions that are not predicted.

    Returns:
        ``(loss_sum, count)``: float32 scalar sum over the (B, T-1) shifted positions whose label is
        not -100, and an int64 scalar count of them. Callers divide once (house rule: sum, then
        normalize).
    """
    target = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    flat = logits[:, :-1].float().reshape(-1, logits.size(-1))  # upcast before log_softmax
    loss_sum = F.cross_entropy(flat, target.reshape(-1), ignore_index=-100, reduction="sum")
    return loss_sum, (target != -100).sum()


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats per predicted token) of ``model`` over all blocks.

    Args:
        input_ids, labels: (N, T) as returned by :func:`pack_texts`.

    Returns:
        The sum over every block of :func:`next_token_loss_sum` divided once by the total count;
        ``exp`` of it is the perplexity. Runs in eval mode and restores the model's mode.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.long)
    for start in range(0, input_ids.size(0), batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        with _autocast(device):
            logits = model(input_ids=ids).logits  # (B, T, V)
        s, c = next_token_loss_sum(logits, labels[start : start + batch_size].to(device))
        total += s.double().cpu()
        count += c.cpu()
    model.train(was_training)
    return float(total / count.clamp_min(1))


def _autocast(device: torch.device):
    """bf16 autocast on CUDA (weights and optimizer stay float32); plain float32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _lr_factor(step: int, spec: TeacherSpec) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at the last step (nanoGPT's get_lr)."""
    if step < spec.warmup:
        return (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model: torch.nn.Module, spec: TeacherSpec) -> torch.optim.AdamW:
    # Decay matrices only (GPT-2 / nanoGPT convention): decaying LayerNorm gains and biases only hurts.
    params = list(model.parameters())  # tied embeddings appear once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": spec.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.95))


# ----------------------------------------------------------------------------------------------------
# Training


def train_causal_teacher(
    out_dir: str | Path,
    spec: TeacherSpec = TeacherSpec(),
    *,
    texts: Sequence[str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    device: str | torch.device | None = None,
) -> Path:
    """Train a tokenizer and a GPT-2 causal LM on ``texts`` and publish them atomically to ``out_dir``.

    Args:
        out_dir: the teacher folder to create; it must not exist, be empty, or (with ``overwrite``)
            hold a previous teacher.
        spec: model size and schedule.
        texts: the corpus; ``None`` means the built-in corpus (``builtin_texts()``).
        progress: show a tqdm bar.
        overwrite: replace a complete teacher already in ``out_dir``.
        device: where to train; ``None`` picks CUDA when available (bf16 autocast), else CPU.

    Returns:
        ``out_dir``, holding ``model.safetensors``, ``config.json``, the tokenizer files and
        ``teacher.json`` (spec, held-out loss and perplexity before and after training, tokens seen,
        train seconds). Deterministic for a spec on a given machine and thread count.
    """
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)  # fail now, not after ten minutes of training
    corpus = "texts"
    if texts is None:
        from tadistill.data.builtin import BUILTIN_CORPUS_VERSION, builtin_texts

        texts, corpus = builtin_texts(), f"builtin-v{BUILTIN_CORPUS_VERSION}"
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise DataError("the teacher corpus is empty: pass a non-empty list of texts")

    from tadistill.data.tokenized import split_texts

    train_texts, heldout_texts = split_texts(texts, spec.heldout_fraction, seed=spec.seed)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")

    started = time.perf_counter()
    # The whole run draws from its own seeded global RNG (HF initialisation and dropout use it) and
    # gives the caller's RNG state back untouched afterwards.
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(spec.seed)
        tokenizer = train_bpe_tokenizer(train_texts, spec.vocab_size, model_max_length=spec.context)
        train_ids, _ = pack_texts(train_texts, tokenizer, spec.context)
        heldout_ids, heldout_labels = pack_texts(heldout_texts, tokenizer, spec.context, keep_tail=True)
        if train_ids.size(0) == 0:
            raise DataError(f"the training texts fill no block of {spec.context} tokens: add text or lower context")
        model = _build_model(spec, tokenizer).to(device)
        initial_loss = evaluate_loss(model, heldout_ids, heldout_labels, batch_size=spec.batch_size)
        curve = _train(model, train_ids, spec, device, progress=progress)
        heldout_loss = evaluate_loss(model, heldout_ids, heldout_labels, batch_size=spec.batch_size)
    seconds = time.perf_counter() - started

    batch = min(spec.batch_size, train_ids.size(0))
    info = {
        "format": TEACHER_FORMAT,
        "spec": spec.to_dict(),
        "fingerprint": spec.fingerprint(),
        "corpus": corpus,
        "corpus_sha256": hashlib.sha256("\0".join(texts).encode()).hexdigest(),
        "train_texts": len(train_texts),
        "heldout_texts": len(heldout_texts),
        "train_tokens": int(train_ids.numel()),
        "heldout_tokens": int((heldout_labels[:, 1:] != -100).sum()),
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_seen": spec.steps * batch * spec.context,
        "epochs": round(spec.steps * batch / train_ids.size(0), 3),
        "initial_heldout_loss": initial_loss,
        "heldout_loss": heldout_loss,
        "heldout_perplexity": math.exp(heldout_loss),
        "train_loss_curve": curve,
        "train_seconds": round(seconds, 1),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    _publish(model, tokenizer, info, out_dir, overwrite)
    return out_dir


def _build_model(spec: TeacherSpec, tokenizer) -> GPT2LMHeadModel:
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
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = eos  # generate() would otherwise warn on every call
    return model


def _train(model: GPT2LMHeadModel, train_ids: torch.Tensor, spec: TeacherSpec, device: torch.device, *,
           progress: bool) -> list[list[float]]:
    """The optimisation loop; returns ``[[step, mean train loss since the previous point], ...]``."""
    optimizer = _optimizer(model, spec)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, spec))
    order = _batches(train_ids.size(0), spec.batch_size, torch.Generator().manual_seed(spec.seed))
    every = max(1, spec.steps // 20)
    curve: list[list[float]] = []
    running, seen = 0.0, 0
    model.train()
    bar = tqdm(range(spec.steps), desc="teacher", unit="step", disable=not progress)
    for step in bar:
        ids = train_ids[next(order)].to(device)  # (B, T)
        with _autocast(device):
            logits = model(input_ids=ids).logits  # (B, T, V)
        loss_sum, count = next_token_loss_sum(logits, ids)
        loss = loss_sum / count.clamp_min(1)
        loss.backward()
        if spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        value = loss.item()
        if not math.isfinite(value):
            raise TrainingError(f"teacher training diverged at step {step} (loss {value}): lower TeacherSpec.lr")
        running, seen = running + value, seen + 1
        if (step + 1) % every == 0 or step + 1 == spec.steps:
            curve.append([step + 1, round(running / seen, 4)])
            bar.set_postfix(loss=f"{running / seen:.3f}")
            running, seen = 0.0, 0
    bar.close()
    return curve


# ----------------------------------------------------------------------------------------------------
# Publishing and the cache


def _is_teacher(folder: Path) -> bool:
    return (folder / TEACHER_FILE).is_file()


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if _is_teacher(out_dir):
        if not overwrite:
            raise ConfigError(f"{out_dir} already holds a teacher: pass overwrite=True to replace it")
    elif out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} exists and is not a tadistill teacher: choose another folder or remove it")


def _publish(model: GPT2LMHeadModel, tokenizer, info: dict, out_dir: Path, overwrite: bool) -> None:
    """Write everything into a temporary sibling of ``out_dir``, then move it into place in one rename."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a teacher in a shared cache should be readable
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / TEACHER_FILE).write_text(json.dumps(info, indent=2) + "\n")  # last: it marks completeness
        _check_target(out_dir, overwrite)  # another process may have published meanwhile
        if _is_teacher(out_dir):
            # A directory cannot be renamed over a non-empty one: move the old teacher aside first.
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)  # out_dir absent, or an empty folder that rename replaces
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def default_teacher_dir(spec: TeacherSpec = TeacherSpec()) -> Path:
    """The cache folder of the built-in-corpus teacher of ``spec`` (under ``$TADISTILL_CACHE``)."""
    # Imported here and read at call time, so that a changed cache root is honoured.
    from tadistill.data import prepare

    return Path(prepare.DEFAULT_CACHE) / "teachers" / f"gpt2-builtin-{spec.fingerprint()}"


def cached_causal_teacher(spec: TeacherSpec = TeacherSpec(), *, progress: bool = True) -> Path:
    """The cached teacher folder of ``spec``, trained on the built-in corpus first when absent."""
    folder = default_teacher_dir(spec)
    if _is_teacher(folder):
        return folder
    try:
        return train_causal_teacher(folder, spec, progress=progress)
    except ConfigError:
        if _is_teacher(folder):  # a concurrent process published the same teacher first: use it
            return folder
        raise
