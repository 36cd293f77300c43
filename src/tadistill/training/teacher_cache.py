"""Offline teacher signals: run the teacher once over a corpus, store what the objectives need, train from it.

Distillation spends most of its compute in the teacher, and the same teacher outputs are recomputed by
every run and every epoch. ``write_teacher_signals`` runs the teacher once over the training and
held-out sequences of a config and stores, per token, exactly what that config's objectives read:

- ``logits`` objective: the teacher's top-k next-token log-probabilities and their token ids, plus the
  log of the remaining mass (the "rest" bucket of ``objectives/logits.py``);
- ``hidden``: the hidden states of the mapped teacher layers;
- ``minilmv2`` / ``minilm`` / ``direct-qkv`` / ``attention-mse``: the Q, K, V projections of the used
  teacher blocks (relations and attention maps are recomputed from them, which is cheaper to store than
  T x T matrices).

Layout of a signals folder (format 1)::

    meta.json                      # format, teacher, dtype, top-k, layers, corpus fingerprint, counts
    train-00000.safetensors ...    # shards of consecutive sequences
    heldout-00000.safetensors

Each shard holds, for its sequences, ``offsets`` (n + 1,) int64 token offsets and one (tokens, width)
tensor per signal, rows in token order: ``topk_logprobs`` (k + 1: the k values, then the rest),
``topk_ids`` (k,) int32, ``hidden.I``, ``query.L``, ``key.L``, ``value.L``. Bytes per token:
``(k + 1) x 2 + k x 4`` for top-k (fp16 values, int32 ids: 386 bytes at k = 64), ``2 x d`` per hidden layer and
``2 x (d_q + 2 d_kv)`` per Q/K/V block in float16 (twice that in float32).

A run reads them with ``teacher_signals: PATH``; the teacher's weights are then only read to build the
student, and no teacher forward runs. The cached log-probabilities are at temperature 1 and top-k only,
so the logits objective must use ``teacher_topk = k`` and temperature 1 (checked).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from tadistill.capture.heads import causal_lm_parts
from tadistill.capture.hooks import Captured, CaptureRequest, capture
from tadistill.data.tokenized import SequenceSet
from tadistill.errors import ConfigError, DataError
from tadistill.fileio import atomic_write_text
from tadistill.training.lane import forward_module
from tadistill.training.terms import ModelOutputs

FORMAT = 1
SHARD_SEQUENCES = 4096
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SignalSpec:
    """What to store: the teacher's top-k (None: no logits), hidden-state indices and Q/K/V blocks."""

    topk: int | None
    hidden: tuple[int, ...]
    qkv: tuple[int, ...]

    @classmethod
    def of(cls, request: CaptureRequest, topk: int | None) -> SignalSpec:
        return cls(topk=topk, hidden=tuple(sorted(request.hidden)), qkv=tuple(sorted(request.qkv)))


def _rows(values: Tensor, attention: Tensor) -> Tensor:
    """(B, T, ...) -> (tokens, ...) rows of the real tokens, row-major (sequence by sequence)."""
    return values[attention.bool()]


@torch.no_grad()
def _batch_signals(teacher, arch, captured: Captured, batch: dict[str, Tensor], spec: SignalSpec,
                   dtype: torch.dtype) -> dict[str, Tensor]:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    attention = batch["attention_mask"]
    out: dict[str, Tensor] = {}
    if spec.topk is not None:
        parts = causal_lm_parts(teacher)
        hidden = _rows(parts.base(**inputs).last_hidden_state, attention)  # (N, d)
        values, ids, rests = [], [], []
        for start in range(0, hidden.shape[0], 1024):  # (c, V) at a time
            log_p = torch.log_softmax(parts.output_layer(hidden[start:start + 1024]).float(), dim=-1)
            top = log_p.topk(spec.topk, dim=-1)
            outside = log_p.scatter(-1, top.indices, float("-inf"))
            values.append(top.values)
            ids.append(top.indices.to(torch.int32))
            rests.append(torch.logsumexp(outside, dim=-1, keepdim=True))
        out["topk_logprobs"] = torch.cat([torch.cat(values), torch.cat(rests)], dim=-1).to(dtype)  # (N, k + 1)
        out["topk_ids"] = torch.cat(ids)  # (N, k)
    else:
        forward_module(teacher, logits=False)(**inputs)  # only captured internals are stored: no head runs
    for i in spec.hidden:
        out[f"hidden.{i}"] = _rows(captured.hidden[i], attention).to(dtype)
    for layer in spec.qkv:
        for name in ("query", "key", "value"):
            out[f"{name}.{layer}"] = _rows(getattr(captured, name)[layer], attention).to(dtype)
    return {k: v.cpu().contiguous() for k, v in out.items()}


def write_teacher_signals(
    out: Path, *, teacher, arch, sequences: dict[str, SequenceSet], collate, spec: SignalSpec, meta: dict,
    dtype: str = "float16", batch_size: int = 32, device: str | torch.device = "cpu", progress=None,
) -> Path:
    """Run ``teacher`` over every split of ``sequences`` and write the signals of ``spec`` to ``out`` atomically.

    ``collate(list of 1-D tensors) -> batch dict`` pads like the training loop. ``meta`` (corpus and
    config fingerprints) is stored in meta.json and checked when a run reads the folder.
    """
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists: choose another --out or delete it")
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    teacher.eval().to(device)
    request = CaptureRequest(hidden=spec.hidden, qkv=spec.qkv)
    counts = {}
    with capture(teacher, arch, request) as captured:
        for split, seqs in sequences.items():
            counts[split] = len(seqs)
            for shard, first in enumerate(range(0, len(seqs), SHARD_SEQUENCES)):
                last = min(first + SHARD_SEQUENCES, len(seqs))
                parts: dict[str, list[Tensor]] = {}
                lengths = []
                for start in range(first, last, batch_size):
                    items = [seqs[i] for i in range(start, min(start + batch_size, last))]
                    lengths += [s.numel() for s in items]
                    batch = {k: v.to(device) for k, v in collate(items).items()}
                    for key, value in _batch_signals(teacher, arch, captured, batch, spec, DTYPES[dtype]).items():
                        parts.setdefault(key, []).append(value)
                    if progress is not None:
                        progress(len(items))
                tensors = {k: torch.cat(v) for k, v in parts.items()}
                offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
                offsets[1:] = torch.tensor(lengths).cumsum(0)
                tensors["offsets"] = offsets
                save_file(tensors, str(tmp / f"{split}-{shard:05d}.safetensors"))
    info = {"format": FORMAT, "dtype": dtype, "topk": spec.topk, "hidden": list(spec.hidden), "qkv": list(spec.qkv),
            "sequences": counts, "shard_sequences": SHARD_SEQUENCES, **meta}
    atomic_write_text(tmp / "meta.json", json.dumps(info, indent=2))
    os.replace(tmp, out)
    return out


class TeacherSignals:
    """Read a signals folder and serve ModelOutputs for batches of sequence indices, like a live teacher."""

    def __init__(self, path: str | Path, *, meta: dict, spec: SignalSpec):
        self.path = Path(path)
        self.info = _read_meta(self.path)
        if self.info.get("format") != FORMAT:
            raise ConfigError(f"teacher_signals {str(path)!r} has format {self.info.get('format')}, expected {FORMAT}: "
                              "write it again with this version")
        for key, value in meta.items():
            if self.info.get(key) != value:
                raise ConfigError(f"teacher_signals {str(path)!r} were written for another {key} "
                                  f"({self.info.get(key)!r}, this run: {value!r}): write them again for this config")
        missing = [f"hidden {i}" for i in spec.hidden if i not in self.info["hidden"]]
        missing += [f"Q/K/V of block {i}" for i in spec.qkv if i not in self.info["qkv"]]
        if spec.topk is not None and spec.topk != self.info["topk"]:
            missing.append(f"top-{spec.topk} logits (stored: {self.info['topk']})")
        if missing:
            raise ConfigError(f"teacher_signals {str(path)!r} lack {', '.join(missing)}: write them with "
                              "tadistill cache-teacher and the same objectives")
        self.spec = spec
        _check_shards(self.path, self.info, spec)
        self._shards: dict[tuple[str, int], dict[str, Tensor]] = {}

    def _shard(self, split: str, number: int) -> dict[str, Tensor]:
        key = (split, number)
        if key not in self._shards:
            if len(self._shards) >= 4:  # keep a few shards in memory
                self._shards.pop(next(iter(self._shards)))
            file = self.path / f"{split}-{number:05d}.safetensors"
            try:
                self._shards[key] = load_file(str(file))
            except Exception as exc:  # noqa: BLE001 - damaged after the check at start (the disk, another process)
                raise DataError(f"teacher_signals shard {file} cannot be read ({_first_line(exc)}): write the signals "
                                "again with tadistill cache-teacher") from None
        return self._shards[key]

    def _sequence(self, split: str, index: int) -> dict[str, Tensor]:
        shard = self._shard(split, index // self.info["shard_sequences"])
        local = index % self.info["shard_sequences"]
        start, end = int(shard["offsets"][local]), int(shard["offsets"][local + 1])
        return {k: v[start:end] for k, v in shard.items() if k != "offsets"}

    def outputs(self, split: str, indices: list[int], batch: dict[str, Tensor]) -> ModelOutputs:
        """Teacher outputs of the sequences ``indices`` of ``split``, padded to ``batch`` (right padding)."""
        attention = batch["attention_mask"].bool()  # (B, T)
        device = attention.device
        rows = [self._sequence(split, i) for i in indices]

        def padded(key: str) -> Tensor:
            width = rows[0][key].shape[-1]
            full = torch.zeros((*attention.shape, width), dtype=torch.float32, device=device)
            full[attention] = torch.cat([r[key] for r in rows]).to(device, torch.float32)
            return full

        captured = Captured(hidden={i: padded(f"hidden.{i}") for i in self.spec.hidden},
                            query={i: padded(f"query.{i}") for i in self.spec.qkv},
                            key={i: padded(f"key.{i}") for i in self.spec.qkv},
                            value={i: padded(f"value.{i}") for i in self.spec.qkv})
        if self.spec.topk is None:
            return ModelOutputs(captured)
        # The logits term reads teacher.last_hidden[mask] rows and maps them with teacher.output_layer: here a
        # row packs [k log-probs, rest, k ids] and the "output layer" unpacks it into pseudo-logits (c, V).
        packed = torch.cat([padded("topk_logprobs"), padded("topk_ids")], dim=-1)  # (B, T, 2k + 1)
        vocab = int(self.info["vocab_size"])
        return ModelOutputs(captured, None, packed, lambda r: topk_pseudo_logits(r, self.spec.topk, vocab))


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:160]


def _read_meta(path: Path) -> dict:
    """meta.json of a signals folder, checked for the fields a reader uses; one-line errors otherwise."""
    meta_file = path / "meta.json"
    again = "write the signals again with tadistill cache-teacher"
    if not path.is_dir():
        raise ConfigError(f"teacher_signals {str(path)!r} is not a folder: give the --out folder of tadistill "
                          "cache-teacher")
    if not meta_file.is_file():
        raise ConfigError(f"teacher_signals {str(path)!r} holds no meta.json: write it with tadistill cache-teacher")
    try:
        info = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, not UTF-8
        raise DataError(f"{meta_file} is damaged ({_first_line(exc)}): {again}") from None
    if not isinstance(info, dict):
        raise DataError(f"{meta_file} is damaged (not a JSON object): {again}")
    fields = {"format": int, "hidden": list, "qkv": list, "sequences": dict, "shard_sequences": int}
    wrong = [k for k, kind in fields.items() if not isinstance(info.get(k), kind)]
    if "shard_sequences" not in wrong and info["shard_sequences"] < 1:
        wrong.append("shard_sequences")
    if "sequences" not in wrong and not all(isinstance(n, int) and n >= 0 for n in info["sequences"].values()):
        wrong.append("sequences")
    if info.get("topk") is not None and not isinstance(info.get("vocab_size"), int):
        wrong.append("vocab_size")
    if wrong:
        raise DataError(f"{meta_file} is damaged (missing or wrong {', '.join(wrong)}): {again}")
    return info


def _check_shards(path: Path, info: dict, spec: SignalSpec) -> None:
    """Every shard meta.json counts is there, readable (not truncated), and holds what ``spec`` reads.

    Only headers and the small offsets tensors are read, so a damaged folder is refused before training
    rather than at the step that first reaches the bad shard.
    """
    from safetensors import safe_open

    needed = {"offsets", *(f"hidden.{i}" for i in spec.hidden)}
    needed |= {f"{name}.{layer}" for layer in spec.qkv for name in ("query", "key", "value")}
    if spec.topk is not None:
        needed |= {"topk_logprobs", "topk_ids"}
    per_shard = info["shard_sequences"]
    for split, count in info["sequences"].items():
        for number, first in enumerate(range(0, int(count), per_shard)):
            file = path / f"{split}-{number:05d}.safetensors"
            try:
                with safe_open(str(file), framework="pt") as handle:
                    lacking = needed - set(handle.keys())
                    offsets = handle.get_tensor("offsets") if not lacking else None
            except Exception as exc:  # noqa: BLE001 - missing, truncated or not safetensors at all
                raise DataError(f"teacher_signals shard {file} cannot be read ({_first_line(exc)}): write the "
                                "signals again with tadistill cache-teacher") from None
            if lacking or offsets.numel() != min(per_shard, int(count) - first) + 1:
                raise DataError(f"teacher_signals shard {file} does not match meta.json (other sequences or "
                                "signals): write the signals again with tadistill cache-teacher")


def topk_pseudo_logits(packed: Tensor, k: int, vocab_size: int) -> Tensor:
    """(c, 2k + 1) [top-k log-probs, log rest, top-k ids] -> (c, V) logits with the same top-k and rest mass.

    The k stored log-probabilities are placed at their ids; the rest mass is spread evenly over the other
    V - k tokens (each gets log(rest / (V - k)), below every top-k value). ``logit_divergence_rows`` with
    ``teacher_topk=k`` then rebuilds exactly the stored k + 1 buckets: the same value as the live teacher
    with the same k (ids are exact in float32 below 2**24).
    """
    values, rest, ids = packed[:, :k], packed[:, k:k + 1], packed[:, k + 1:].long()
    spread = rest - torch.log(torch.tensor(float(vocab_size - k), device=packed.device))
    logits = spread.expand(-1, vocab_size).clone()
    return logits.scatter(-1, ids, values)


def lane_signal_spec(lane) -> SignalSpec:
    """The signals a lane's objectives read from the teacher."""
    logits = lane.config.objective("logits")
    return SignalSpec.of(lane.teacher_request, logits.teacher_topk if logits is not None and logits.weight > 0 else None)


def signal_meta(config, teacher_config) -> dict:
    """What must match between the run that wrote the signals and the run that reads them."""
    data = config.data.model_dump(mode="json")
    data.pop("cache_dir", None)
    return {"teacher": config.teacher, "data": data, "seed": config.train.seed,
            "vocab_size": int(teacher_config.vocab_size)}
