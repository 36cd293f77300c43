"""Downstream evaluation of a teacher or student: a linear probe on frozen features, or full fine-tuning.

Both return ``{metric: (mean, std)}`` over seeds on the task's eval split: the mean and the sample
standard deviation (ddof = 1; 0.0 for a single seed). Metric values are fractions (accuracy 0.91, not
91), computed by :mod:`tadistill.evaluation.metrics`.

- ``linear_probe``: features are mean-pooled last hidden states of the frozen model (the pair of a pair
  task encoded together, as the tokenizer's text pair), computed once and shared by all seeds; they are
  standardized with the train split's mean and std. Per seed, a linear head (logistic regression, or
  least squares on standardized targets for regression) is trained with Adam, an L2 penalty on the
  weights and cosine learning-rate decay; the seed draws the head's initialization and the mini-batch
  order. This is the "linear evaluation" of representation studies: it measures what the student's
  features encode without letting fine-tuning repair them.
- ``finetune``: per seed, ``AutoModelForSequenceClassification`` from the checkpoint (new head), AdamW
  with linear warmup and linear decay, a plain torch loop. The seed drives the head initialization,
  dropout and the data order. This is the GLUE protocol of the distillation papers (BERT, MiniLM).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tadistill.capture.architectures import resolve_architecture
from tadistill.capture.hooks import CaptureRequest, capture
from tadistill.errors import ConfigError, DataError, ModelError
from tadistill.evaluation.metrics import accuracy, f1_binary, matthews_corrcoef, pearson, spearman
from tadistill.evaluation.tasks import TaskData, TaskSpec, load_task
from tadistill.measure.embeddings import mean_pool

MODES = ("probe", "finetune")

_METRIC_FUNCTIONS = {
    "accuracy": accuracy,
    "f1": f1_binary,  # F1 of label id 1 ("equivalent" / "duplicate" in MRPC / QQP)
    "matthews": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}

# Probe head defaults: standardized features make one learning rate fit all models.
PROBE_LR = 1e-2
PROBE_BATCH = 256
PROBE_MIN_STEPS = 500  # small tasks still get enough updates to converge


# ----------------------------------------------------------------------------------------------------
# Linear probe
# ----------------------------------------------------------------------------------------------------


def linear_probe(model: nn.Module, tokenizer, data: TaskData, *, seeds: Sequence[int] = (0, 1, 2),
                 max_length: int = 128, batch_size: int = 32, epochs: int = 20,
                 l2: float = 1e-3) -> dict[str, tuple[float, float]]:
    """Train a linear head on frozen mean-pooled features, once per seed; score it on the eval split.

    ``batch_size`` is the encoding batch size; the head trains with mini-batches of 256 for
    ``max(epochs, enough for 500 steps)`` epochs. ``l2`` weighs ``0.5 * ||W||^2`` (bias excluded) added
    to the mean loss. Returns ``{metric: (mean, std)}`` over seeds, in ``data.spec.metrics`` order.
    """
    seeds = _check_seeds(seeds)
    if epochs < 1 or l2 < 0:
        raise ConfigError(f"probe epochs must be >= 1 and l2 >= 0, got epochs={epochs}, l2={l2}")
    _check_splits(data)
    tokenizer = _with_pad_token(tokenizer)
    max_length = _fit_length(max_length, tokenizer, model.config)
    x_train = encode_features(model, tokenizer, data.train, max_length=max_length, batch_size=batch_size)
    x_eval = encode_features(model, tokenizer, data.eval, max_length=max_length, batch_size=batch_size)
    # Standardize with train statistics only: (N, d) -> zero mean, unit variance per feature.
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-6)
    x_train, x_eval = (x_train - mean) / std, (x_eval - mean) / std
    y_train = torch.tensor([row[2] for row in data.train], device=x_train.device)
    gold = [row[2] for row in data.eval]
    runs = []
    for seed in seeds:
        head = _train_head(x_train, y_train, data.spec, seed=seed, epochs=epochs, l2=l2)
        runs.append(_score(data.spec, head(x_eval), gold))
    return _summarize(runs, data.spec)


def encode_features(model: nn.Module, tokenizer, rows: Sequence[tuple], *, max_length: int = 128,
                    batch_size: int = 32) -> Tensor:
    """(N, d) float32 mean-pooled last hidden states of ``rows`` ``(text, text_pair or None, label)``.

    Runs in eval mode on the model's device (the training mode is restored after); the features stay
    on that device, as normal tensors that autograd may use. Pairs are encoded together as the
    tokenizer's text pair.
    """
    arch = resolve_architecture(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode(), capture(model, arch, CaptureRequest(hidden=(arch.num_layers,))) as cap:
            for start in range(0, len(rows), batch_size):
                enc = _tokenize(tokenizer, rows[start : start + batch_size], max_length, device)
                model(**enc)
                out.append(mean_pool(cap.hidden[arch.num_layers].float(), enc["attention_mask"]))  # (B, d)
            features = torch.cat(out)
    finally:
        model.train(was_training)
    # Cloned outside inference mode: inference tensors cannot be saved for the head's backward pass.
    return features.clone()


def _train_head(x: Tensor, y: Tensor, spec: TaskSpec, *, seed: int, epochs: int,
                l2: float) -> Callable[[Tensor], Tensor]:
    """Fit a linear head on standardized features x (N, d) and labels y (N,); return a function mapping
    features (M, d) to predictions (M,): class ids, or regression values in the units of y."""
    n, d = x.shape
    generator = torch.Generator().manual_seed(seed)  # CPU generator: same draws on every device
    out_dim = 1 if spec.is_regression else spec.num_labels
    steps_per_epoch = math.ceil(n / PROBE_BATCH)
    epochs = max(epochs, math.ceil(PROBE_MIN_STEPS / steps_per_epoch))
    total = epochs * steps_per_epoch
    # Everything autograd touches is made inside: the caller may hold inference or no-grad mode.
    with torch.inference_mode(False), torch.enable_grad(), _single_thread_on_cpu(x.device):
        # Tensors made under the caller's inference_mode cannot be saved for backward: clone them.
        x, y = (t.clone() if t.is_inference() else t for t in (x, y))
        weight = (0.01 * torch.randn(out_dim, d, generator=generator)).to(x.device).requires_grad_()
        bias = torch.zeros(out_dim, device=x.device, requires_grad=True)
        if spec.is_regression:
            # Least squares on standardized targets, so that the same learning rate suits any label scale.
            y_mean, y_std = y.float().mean(), y.float().std(unbiased=False).clamp_min(1e-6)
            target = (y.float() - y_mean) / y_std
        else:
            target = y.long()
        optimizer = torch.optim.Adam([weight, bias], lr=PROBE_LR)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator).to(x.device)
            for start in range(0, n, PROBE_BATCH):
                idx = order[start : start + PROBE_BATCH]
                logits = F.linear(x[idx], weight, bias)  # (b, out_dim)
                if spec.is_regression:
                    loss = F.mse_loss(logits.squeeze(-1), target[idx])
                else:
                    loss = F.cross_entropy(logits, target[idx])
                loss = loss + 0.5 * l2 * weight.square().sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    weight, bias = weight.detach(), bias.detach()

    def predict(features: Tensor) -> Tensor:
        logits = F.linear(features, weight, bias)
        if spec.is_regression:
            return logits.squeeze(-1) * y_std + y_mean
        return logits.argmax(-1)

    return predict


# ----------------------------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------------------------


def finetune(model_path: str, tokenizer, data: TaskData, *, seeds: Sequence[int] = (0, 1, 2), epochs: int = 3,
             lr: float = 5e-5, batch_size: int = 16, max_length: int = 128, device=None,
             weight_decay: float = 0.01, warmup_ratio: float = 0.1,
             trust_remote_code: bool = False) -> dict[str, tuple[float, float]]:
    """Fine-tune a fresh copy of ``model_path`` with a new classification head per seed; score on eval.

    AdamW (``weight_decay`` on matrices only, not on biases and norms), linear warmup over
    ``warmup_ratio`` of the steps then linear decay to 0, gradient clipping at 1.0, float32 weights.
    Loss: cross-entropy, or MSE on the raw labels for regression. Returns ``{metric: (mean, std)}``.
    """
    seeds = _check_seeds(seeds)
    if epochs < 1 or lr <= 0 or batch_size < 1 or not 0 <= warmup_ratio < 1:
        raise ConfigError(
            f"finetune needs epochs >= 1, lr > 0, batch_size >= 1 and 0 <= warmup_ratio < 1, got epochs={epochs}, "
            f"lr={lr}, batch_size={batch_size}, warmup_ratio={warmup_ratio}"
        )
    _check_splits(data)
    device = _device(device)
    tokenizer = _with_pad_token(tokenizer)
    gold = [row[2] for row in data.eval]
    runs = []
    for seed in seeds:
        # Hugging Face draws the new head and dropout masks from the global RNG: seed it, inside
        # fork_rng so that the caller's RNG state is left as it was.
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            model = _load_classifier(model_path, data.spec, tokenizer, trust_remote_code).to(device)
            max_length = _fit_length(max_length, tokenizer, model.config)
            _train_classifier(model, tokenizer, data, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size,
                              max_length=max_length, weight_decay=weight_decay, warmup_ratio=warmup_ratio)
            runs.append(_score(data.spec, _predict(model, tokenizer, data, batch_size, max_length), gold))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return _summarize(runs, data.spec)


def _load_classifier(model_path: str, spec: TaskSpec, tokenizer, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    from tadistill.loading import resolve_model_path

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(model_path), num_labels=spec.num_labels, use_safetensors=True,
            trust_remote_code=trust_remote_code, dtype=torch.float32,
            problem_type="regression" if spec.is_regression else "single_label_classification",
        )
    except (OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"model {model_path!r} could not be loaded for sequence classification ({reason}): "
                         "pass a local folder with safetensors weights, or use mode 'probe'") from None
    if getattr(model.config, "pad_token_id", None) is None:
        # Decoder classifiers pool the last non-pad token and need to know which id is padding.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _train_classifier(model: nn.Module, tokenizer, data: TaskData, *, seed: int, epochs: int, lr: float,
                      batch_size: int, max_length: int, weight_decay: float, warmup_ratio: float) -> None:
    device = next(model.parameters()).device
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    total = epochs * math.ceil(len(data.train) / batch_size)
    warmup = int(warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(data.train), generator=generator).split(batch_size):
            batch = [data.train[i] for i in idx.tolist()]
            enc = _tokenize(tokenizer, batch, max_length, device)
            logits = model(**enc).logits.float()  # (B, num_labels)
            labels = torch.tensor([row[2] for row in batch], device=device)
            if data.spec.is_regression:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits, labels.long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()


@torch.inference_mode()
def _predict(model: nn.Module, tokenizer, data: TaskData, batch_size: int, max_length: int) -> Tensor:
    """(N_eval,) predicted class ids or regression values."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, len(data.eval), batch_size):
        enc = _tokenize(tokenizer, data.eval[start : start + batch_size], max_length, device)
        logits = model(**enc).logits.float()  # (B, num_labels)
        out.append(logits.squeeze(-1) if data.spec.is_regression else logits.argmax(-1))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------
# One call: load, evaluate, summarize
# ----------------------------------------------------------------------------------------------------


def evaluate_task(model_path: str, task: str, *, mode: str = "probe", seeds: Sequence[int] = (0, 1, 2),
                  **kw) -> dict:
    """Load the model and its tokenizer from ``model_path`` and evaluate it on ``task`` by probe or finetune.

    Keyword arguments ``max_train``, ``max_eval`` and ``data_seed`` go to :func:`load_task`,
    ``trust_remote_code`` to the loaders, ``device`` places the model; the rest go to
    :func:`linear_probe` or :func:`finetune`. Returns ``{"task", "mode", "metrics": {metric: {"mean",
    "std"}}, "headline": first metric, "seeds", "train_size", "eval_size"}``.

    A token task (``stdlib-ner``, ``conll2003``, ``wikiann-<lang>``, ``squad``, ``squad_v2``, CoNLL / token
    JSONL / SQuAD JSON files: :mod:`tadistill.evaluation.token_tasks`) goes to
    :func:`~tadistill.evaluation.token_tasks.evaluate_token_task` with the same arguments and result shape.

    A retrieval task (``stdlib-retrieval``) has no labels to probe or fine-tune on: whatever ``mode``,
    it is scored zero-shot by :func:`tadistill.evaluation.retrieval.evaluate_retrieval` (mode
    "retrieval"); ``max_length``, ``device`` and ``trust_remote_code`` apply, the rest is ignored.
    """
    from tadistill.evaluation.retrieval import RETRIEVAL_TASKS, evaluate_retrieval
    from tadistill.evaluation.token_tasks import evaluate_token_task, token_task_kind
    from tadistill.loading import load_pretrained, load_tokenizer

    if token_task_kind(task) is not None:  # NER-style tagging and extractive QA: their own data and metrics
        if mode not in MODES:
            raise ConfigError(f"evaluation mode {mode!r} is not one of {list(MODES)}: use 'probe' or 'finetune'")
        return evaluate_token_task(model_path, str(task).strip(), mode=mode, seeds=_check_seeds(seeds), **kw)

    if str(task).strip().lower() in RETRIEVAL_TASKS:
        if mode not in MODES:
            raise ConfigError(f"evaluation mode {mode!r} is not one of {list(MODES)}: use 'probe' or 'finetune'")
        return evaluate_retrieval(model_path, str(task).strip(), seeds=_check_seeds(seeds),
                                  max_length=kw.get("max_length", 128), device=kw.get("device"),
                                  trust_remote_code=kw.get("trust_remote_code", False))

    if mode not in MODES:
        raise ConfigError(f"evaluation mode {mode!r} is not one of {list(MODES)}: use 'probe' or 'finetune'")
    seeds = _check_seeds(seeds)
    data = load_task(task, max_train=kw.pop("max_train", None), max_eval=kw.pop("max_eval", None),
                     seed=kw.pop("data_seed", 0))
    trust_remote_code = kw.pop("trust_remote_code", False)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    if mode == "probe":
        device = _device(kw.pop("device", None))
        model = load_pretrained(model_path, head="base", trust_remote_code=trust_remote_code, what="model")
        scores = linear_probe(model.to(device), tokenizer, data, seeds=seeds, **kw)
    else:
        scores = finetune(model_path, tokenizer, data, seeds=seeds, trust_remote_code=trust_remote_code, **kw)
    return {
        "task": data.spec.name,
        "mode": mode,
        "metrics": {m: {"mean": mean, "std": std} for m, (mean, std) in scores.items()},
        "headline": data.spec.metrics[0],
        "seeds": list(seeds),
        "train_size": len(data.train),
        "eval_size": len(data.eval),
    }


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _tokenize(tokenizer, rows: Sequence[tuple], max_length: int, device: torch.device) -> dict[str, Tensor]:
    """Pad and truncate one batch of rows; keep only the inputs the tokenizer's model takes."""
    texts = [row[0] for row in rows]
    pairs = [row[1] or "" for row in rows] if rows[0][1] is not None else None
    enc = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    names = getattr(tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"]
    return {k: enc[k].to(device) for k in names if k in enc}


@contextmanager
def _single_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the probe head's tiny (256 x d) matmuls on one CPU thread.

    Thread synchronization dominates GEMMs this small: on a loaded 2-core machine, 500 steps took
    19 s with 2 threads and 0.1 s with 1. The previous thread count is restored on exit.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_length(max_length: int, tokenizer, config) -> int:
    """``max_length`` capped by what the tokenizer and the position embeddings allow (no crash at 513)."""
    limits = [max_length, getattr(config, "max_position_embeddings", None)]
    model_max = getattr(tokenizer, "model_max_length", None)
    limits.append(model_max if isinstance(model_max, int) and model_max < 1_000_000 else None)  # unset: 1e30
    return min(v for v in limits if v is not None)


def _with_pad_token(tokenizer):
    """The tokenizer itself when it pads; else a copy padding with its end-of-sequence token (GPT-2)."""
    if tokenizer.pad_token is not None:
        return tokenizer
    if tokenizer.eos_token is None:
        raise ModelError("the tokenizer has neither a padding nor an end-of-sequence token: set tokenizer.pad_token")
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    seeds = tuple(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ConfigError(f"seeds must be a non-empty list of integers, got {list(seeds)!r}")
    return seeds


def _check_splits(data: TaskData) -> None:
    if not data.train or not data.eval:
        raise DataError(f"task {data.spec.name!r} has an empty train or eval split: give it more rows")


def _score(spec: TaskSpec, predictions: Tensor, gold: list) -> dict[str, float]:
    """Every metric of ``spec`` on one run: predictions (N,) against gold (N,)."""
    pred = predictions.detach().cpu().tolist()
    return {metric: float(_METRIC_FUNCTIONS[metric](pred, gold)) for metric in spec.metrics}


def _summarize(runs: list[dict[str, float]], spec: TaskSpec) -> dict[str, tuple[float, float]]:
    """Per metric: (mean, sample std with ddof = 1) over seeds; std 0.0 for a single seed."""
    out = {}
    for metric in spec.metrics:
        values = [run[metric] for run in runs]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        out[metric] = (statistics.fmean(values), std)
    return out
