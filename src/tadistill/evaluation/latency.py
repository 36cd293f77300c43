"""What a model costs to run: wall-clock latency and throughput of a forward pass, and bytes on disk.

FLOPs (evaluation/cost.py) say what a student should cost; latency says what it does cost on a given
machine, where attention kernels, memory bandwidth and per-call overhead decide (the speedups of
DistilBERT, Sanh et al. 2019, section 4.2, and MiniLM, Wang et al. 2020, table 3, are measured ones).

Conventions of the result dicts, keyed by batch size as ``"batch_<B>"``::

    {"batch_1": {"median_ms", "p90_ms", "sequences_per_s", "tokens_per_s"}, "batch_32": {...}}

``median_ms`` / ``p90_ms`` are per forward call (one batch of B sequences of ``seq_len`` tokens);
the throughputs are derived from the median. ``flatten_latency`` turns such a dict into the flat keys
of a results row (``latency_b1_ms`` ...).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tadistill.errors import ConfigError, ModelError

# HF Trainer writes this next to the weights; it holds arguments, not weights.
_NOT_WEIGHTS = {"training_args.bin"}


def _positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_args(model: nn.Module, vocab_size, batch_sizes, seq_len, repeats, warmup) -> tuple[int, ...]:
    _positive_int("vocab_size", vocab_size)
    _positive_int("seq_len", seq_len)
    _positive_int("repeats", repeats)
    _positive_int("warmup", warmup, minimum=0)
    if isinstance(batch_sizes, int) or not batch_sizes:
        raise ConfigError(f"batch_sizes must be a non-empty sequence of integers, got {batch_sizes!r}")
    sizes = tuple(_positive_int("each batch size", b) for b in batch_sizes)
    # Position tables are fixed-size: a longer input fails deep inside the embedding with an index error.
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_positions, int) and seq_len > max_positions:
        raise ConfigError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_positions}: "
                          f"pass seq_len <= {max_positions}")
    return sizes


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ModelError("the model has no parameters: pass a loaded model") from None


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without a sync the timer stops when the launch returns.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(times_ms: list[float], batch: int, seq_len: int) -> dict[str, float]:
    median = float(np.median(times_ms))
    return {
        "median_ms": median,
        "p90_ms": float(np.percentile(times_ms, 90)),  # linear interpolation between order statistics
        "sequences_per_s": batch / (median / 1e3),
        "tokens_per_s": batch * seq_len / (median / 1e3),
    }


def _time_interleaved(
    models: Sequence[nn.Module],
    *,
    vocab_size: int,
    batch_sizes: Sequence[int],
    seq_len: int,
    repeats: int,
    warmup: int,
    device: torch.device,
    seed: int,
) -> list[dict[str, dict[str, float]]]:
    """Time every model on the same inputs, one call each in turn, so machine noise hits all alike.

    Returns one result dict (see the module docstring) per model, in the order of ``models``.
    """
    generator = torch.Generator().manual_seed(seed)  # CPU generator: the same ids on every device
    results: list[dict[str, dict[str, float]]] = [{} for _ in models]
    was_training = [m.training for m in models]
    for model in models:
        model.eval()  # no dropout: the timed work is the deployed forward pass
    try:
        with torch.inference_mode():
            for batch in batch_sizes:
                input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator).to(device)  # (B, T)
                attention_mask = torch.ones_like(input_ids)  # (B, T), no padding
                times: list[list[float]] = [[] for _ in models]
                for i in range(warmup + repeats):
                    for k, model in enumerate(models):
                        _sync(device)
                        start = time.perf_counter()
                        model(input_ids=input_ids, attention_mask=attention_mask)
                        _sync(device)
                        elapsed = (time.perf_counter() - start) * 1e3
                        if i >= warmup:  # warm-up calls pay for allocator growth and kernel selection
                            times[k].append(elapsed)
                for k in range(len(models)):
                    results[k][f"batch_{batch}"] = _stats(times[k], batch, seq_len)
    finally:
        for model, mode in zip(models, was_training):
            model.train(mode)
    return results


def measure_latency(
    model: nn.Module,
    *,
    vocab_size: int,
    batch_sizes: Sequence[int] = (1, 32),
    seq_len: int = 128,
    repeats: int = 10,
    warmup: int = 2,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Latency of one forward pass of ``model`` on random token ids, per batch size.

    Inputs are (B, seq_len) ids drawn uniformly from [0, vocab_size) by a generator seeded with
    ``seed``, with an all-ones attention mask. The model runs in eval mode under
    ``torch.inference_mode`` (its training flag is restored afterwards); ``warmup`` untimed calls
    precede ``repeats`` timed ones per batch size. ``device=None`` uses the model's own device; a
    device given moves the model there (in place, as ``nn.Module.to`` does).

    Returns:
        ``{"batch_<B>": {"median_ms", "p90_ms", "sequences_per_s", "tokens_per_s"}}`` for every B.

    Raises:
        ConfigError: a non-positive size, or ``seq_len`` beyond the model's position table.
    """
    sizes = _check_args(model, vocab_size, batch_sizes, seq_len, repeats, warmup)
    if device is not None:
        model.to(device)
    (result,) = _time_interleaved(
        [model], vocab_size=vocab_size, batch_sizes=sizes, seq_len=seq_len, repeats=repeats, warmup=warmup,
        device=_model_device(model), seed=seed,
    )
    return result


def compare_latency(
    teacher: nn.Module,
    student: nn.Module,
    *,
    vocab_size: int,
    batch_sizes: Sequence[int] = (1, 32),
    seq_len: int = 128,
    repeats: int = 10,
    warmup: int = 2,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict[str, dict]:
    """Teacher and student latency measured in one interleaved run (teacher, student, teacher, ...).

    Both see the same inputs (so ``vocab_size`` must fit both vocabularies: pass the smaller one).
    With ``device=None`` both must already sit on the same device.

    Returns:
        ``{"teacher": {...}, "student": {...}, "speedup": {"batch_<B>": float}}``: the first two as
        ``measure_latency`` returns them, speedup = teacher median / student median (> 1: faster).
    """
    sizes = _check_args(teacher, vocab_size, batch_sizes, seq_len, repeats, warmup)
    _check_args(student, vocab_size, batch_sizes, seq_len, repeats, warmup)
    if device is not None:
        teacher.to(device)
        student.to(device)
    where = _model_device(teacher)
    if _model_device(student) != where:
        raise ConfigError(f"teacher is on {where} but student on {_model_device(student)}: "
                          "pass device= to measure both on one device")
    t, s = _time_interleaved(
        [teacher, student], vocab_size=vocab_size, batch_sizes=sizes, seq_len=seq_len, repeats=repeats,
        warmup=warmup, device=where, seed=seed,
    )
    speedup = {key: t[key]["median_ms"] / s[key]["median_ms"] for key in t}
    return {"teacher": t, "student": s, "speedup": speedup}


def in_reference_time(compared: dict[str, dict], reference_ms: dict[str, float]) -> dict[str, dict[str, float]]:
    """The student's timings of a ``compare_latency`` run, in the time base of a reference teacher measurement.

    A results table shows the teacher's own latency and each student's speedup. The speedup comes from
    an interleaved run (robust to the machine getting slower or faster between measurements, and between
    resumed sessions), the teacher's row from another run: placed side by side, teacher latency / student
    latency would not equal the speedup. Scaling the student's times by f = reference / (the teacher's
    median in the interleaved run) makes one measurement feed both: reference / student median equals
    the interleaved speedup.

    Args:
        compared: ``compare_latency``'s result.
        reference_ms: ``{"batch_<B>": the teacher's reference median in ms}``; batch sizes missing here
            (or not positive) keep the student's raw interleaved timings.

    Returns:
        The student's dict as ``measure_latency`` returns it: times multiplied by f, throughputs divided by f.
    """
    out: dict[str, dict[str, float]] = {}
    for key, stats in compared["student"].items():
        reference = reference_ms.get(key)
        factor = reference / compared["teacher"][key]["median_ms"] if reference and reference > 0 else 1.0
        out[key] = {name: value * factor if name.endswith("_ms") else value / factor for name, value in stats.items()}
    return out


def reference_from_row(row: dict | None) -> dict[str, float]:
    """``{"batch_<B>": median ms}`` from the flat ``latency_b<B>_ms`` keys of a results row (``flatten_latency``)."""
    out: dict[str, float] = {}
    for key, value in (row or {}).items():
        batch = key.removeprefix("latency_b").removesuffix("_ms")
        if key.startswith("latency_b") and key.endswith("_ms") and batch.isdigit() and isinstance(value, (int, float)):
            out[f"batch_{batch}"] = float(value)
    return out


def flatten_latency(result: dict[str, dict[str, float]]) -> dict[str, float]:
    """Flat results-row keys from a ``measure_latency`` dict.

    ``{"batch_1": {...}}`` -> ``latency_b1_ms`` (median), ``latency_b1_p90_ms`` and
    ``tokens_per_s_b1``, for every batch size present.
    """
    row: dict[str, float] = {}
    for key, stats in result.items():
        batch = key.removeprefix("batch_")
        row[f"latency_b{batch}_ms"] = stats["median_ms"]
        row[f"latency_b{batch}_p90_ms"] = stats["p90_ms"]
        row[f"tokens_per_s_b{batch}"] = stats["tokens_per_s"]
    return row


def size_on_disk(path: str | Path) -> int:
    """Bytes of the weight files of a saved model folder (``save_pretrained`` output).

    Counts every ``*.safetensors`` file under ``path`` (sub-folders included, e.g. a
    sentence-transformers Dense module), or, when there is none, every ``*.bin`` file: a folder that
    holds both formats is loaded from safetensors, so counting both would double the size. A path to
    a single weight file gives that file's size.

    Raises:
        ModelError: the path does not exist or holds no weight files.
    """
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise ModelError(f"no model folder at {path}: pass the folder written by save_pretrained")
    for pattern in ("*.safetensors", "*.bin"):
        files = [f for f in path.rglob(pattern) if f.is_file() and f.name not in _NOT_WEIGHTS]
        if files:
            return sum(f.stat().st_size for f in files)
    raise ModelError(f"{path} holds no *.safetensors or *.bin weight files: pass a saved model folder")
