"""Token shards on disk: sequences written once, read memory-mapped, so host memory stays flat.

One prepared source is a folder::

    SOURCE/train.ids        token ids of every training sequence, concatenated (raw uint16 or uint32)
    SOURCE/train.offsets    (N + 1,) int64: sequence i is ids[offsets[i]:offsets[i + 1]]
    SOURCE/heldout.ids / heldout.offsets      the held-out split, the same way
    SOURCE/heldout_texts.jsonl                the first held-out texts, raw (for the summary's cosine)
    SOURCE/source.json      what the folder holds: its fingerprint, dtype, sequence and token counts

The layout is the flat one of :class:`~tadistill.data.tokenized.SequenceSet` (ids + offsets), on disk
(the raw arrays, readable with ``np.memmap(path, dtype)``). Ids take 2 bytes when the vocabulary has at
most 65,536 entries (BERT, GPT-2, RoBERTa) and 4 otherwise (Llama 3's 128k); offsets take 8 bytes per
sequence. A :class:`ShardSet` reads a sequence in place when asked for it, so a run's resident memory
does not grow with the corpus (``benchmarks/data_memory.py`` measures it).

Folders are written under a temporary name and renamed into place when complete (``source.json``
last), so an interrupted preparation leaves no folder that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tadistill.errors import DataError
from tadistill.fileio import atomic_write_text

SHARD_FORMAT = 1
SOURCE_FILE = "source.json"
HELDOUT_TEXTS_FILE = "heldout_texts.jsonl"
HELDOUT_TEXTS_KEPT = 256  # raw held-out texts stored per source; the summary reads a few dozen
SPLITS = ("train", "heldout")
_FLUSH_TOKENS = 1 << 20  # a writer holds at most about this many ids in memory before writing them out


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below ``vocab_size``: uint16 up to 65,536, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends sequences of one split to ``FOLDER/SPLIT.ids`` and ``.offsets``, a bounded buffer at a time."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self._limit = np.iinfo(self.dtype).max
        self._ids = open(folder / f"{split}.ids", "wb")
        self._offsets = open(folder / f"{split}.offsets", "wb")
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._ends: list[int] = []
        self.sequences = 0
        self.tokens = 0
        self._offsets.write(np.zeros(1, dtype=np.int64).tobytes())

    def append(self, ids: Sequence[int] | np.ndarray) -> None:
        """Add one sequence (its token ids, special tokens included)."""
        array = np.asarray(ids, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() > self._limit):
            raise ValueError(f"token id out of range for {self.dtype}: the vocabulary is larger than declared")
        self._pending.append(array.astype(self.dtype))
        self._pending_tokens += array.size
        self.tokens += array.size
        self.sequences += 1
        self._ends.append(self.tokens)
        if self._pending_tokens >= _FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._ids.write(np.concatenate(self._pending).tobytes())
        if self._ends:
            self._offsets.write(np.asarray(self._ends, dtype=np.int64).tobytes())
        self._pending, self._pending_tokens, self._ends = [], 0, []

    def close(self) -> dict[str, int]:
        """Write what is buffered and close the files; returns {"sequences": N, "tokens": T}."""
        self.flush()
        for handle in (self._ids, self._offsets):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        return {"sequences": self.sequences, "tokens": self.tokens}


class ShardSet:
    """One split of a prepared source, read in place: the index-based contract of ``SequenceSet``.

    ``len``, ``set[i]`` ((n_i,) int64 tensor), ``prompt_length(i)`` and ``num_tokens()``, as the loop
    reads them. ``prompt_tokens``: plain text used as prompt / continuation (``data.prompt_tokens``):
    the prompt of sequence i is min(prompt_tokens, n_i - 1) tokens, as ``prompts.split_prompts`` gives.

    Sequence i costs two positioned reads (``os.pread``: its two offsets, then its ids), nothing else: the
    files are neither loaded nor mapped into the process, so its resident memory stays the same however
    much of the corpus a run reads (with ``np.memmap`` every page read stays counted in the process's
    resident set until the kernel reclaims it, which batch schedulers and OOM killers see as growth). The
    kernel's page cache, shared and reclaimable, serves repeated reads. Descriptors are opened lazily per
    process (``os.getpid``), so a forked worker opens its own.
    """

    def __init__(self, folder: str | Path, split: str, *, dtype: str, prompt_tokens: int | None = None) -> None:
        self._files: dict[str, int] = {}
        self._pid = -1
        self.folder = Path(folder)
        self.split = split
        self.prompt_tokens = prompt_tokens
        self.dtype = np.dtype(dtype)
        self._paths = {kind: self.folder / f"{split}.{kind}" for kind in ("ids", "offsets")}
        for path in self._paths.values():
            if not path.is_file():
                raise DataError(f"token shard {path} is missing: run `tadistill prepare` again or delete its folder")
        size = self._paths["offsets"].stat().st_size
        self._count = size // 8 - 1
        self._tokens = self._paths["ids"].stat().st_size // self.dtype.itemsize
        if size % 8 or self._count < 0 or int(self._offsets(self._count, 1)[0]) != self._tokens:
            raise DataError(f"token shards in {self.folder} are damaged ({split}): run `tadistill prepare` again "
                            "or delete the folder")

    def _read(self, kind: str, position: int, size: int) -> bytes:
        if self._pid != os.getpid():  # first read in this process
            self._files = {k: os.open(p, os.O_RDONLY) for k, p in self._paths.items()}
            self._pid = os.getpid()
        data = os.pread(self._files[kind], size, position)
        if len(data) != size:
            raise DataError(f"token shard {self._paths[kind]} is shorter than its offsets say: run `tadistill "
                            "prepare` again")
        return data

    def _offsets(self, i: int, n: int) -> np.ndarray:
        return np.frombuffer(self._read("offsets", 8 * i, 8 * n), dtype=np.int64)

    def __len__(self) -> int:
        return self._count

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence index {i} out of range for {n} sequences")
        return i + n if i < 0 else i

    def __getitem__(self, i: int) -> Tensor:
        start, end = (int(x) for x in self._offsets(self._index(i), 2))
        size = self.dtype.itemsize
        ids = np.frombuffer(self._read("ids", start * size, (end - start) * size), dtype=self.dtype)
        return torch.from_numpy(ids.astype(np.int64))

    def prompt_length(self, i: int) -> int:
        i = self._index(i)
        if self.prompt_tokens is None:
            return 0
        start, end = (int(x) for x in self._offsets(i, 2))
        return max(0, min(self.prompt_tokens, end - start - 1))

    def num_tokens(self) -> int:
        return self._tokens

    def __del__(self) -> None:
        if self._pid == os.getpid():
            for fd in self._files.values():
                os.close(fd)

    def __getstate__(self) -> dict[str, Any]:  # descriptors do not travel: the receiving process opens its own
        return {**self.__dict__, "_files": {}, "_pid": -1}


def read_source_info(folder: Path) -> dict[str, Any] | None:
    """The ``source.json`` of a finished source folder, or None when it is missing or unreadable."""
    try:
        info = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("format") == SHARD_FORMAT else None


def open_source(folder: Path, *, prompt_tokens: int | None = None) -> tuple[ShardSet, ShardSet, list[str]]:
    """The train and held-out ShardSets of a finished source folder, and its stored held-out texts."""
    info = read_source_info(folder)
    if info is None:
        raise DataError(f"{folder} is not a finished token shard folder: run `tadistill prepare` again")
    train, heldout = (ShardSet(folder, s, dtype=info["dtype"], prompt_tokens=prompt_tokens) for s in SPLITS)
    texts = []
    path = folder / HELDOUT_TEXTS_FILE
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            texts = [json.loads(line) for line in f if line.strip()]
    return train, heldout, texts


class SourceFolder:
    """Writes one source's shards into a temporary folder, renamed to ``target`` by ``commit``.

    Use as a context manager: leaving it by an exception removes the temporary folder.
    """

    def __init__(self, target: Path, *, dtype: np.dtype) -> None:
        self.target = target
        self.tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.dtype = np.dtype(dtype)
        self.writers = {split: ShardWriter(self.tmp, split, self.dtype) for split in SPLITS}
        self.heldout_texts: list[str] = []

    def keep_heldout_text(self, text: str) -> None:
        if len(self.heldout_texts) < HELDOUT_TEXTS_KEPT:
            self.heldout_texts.append(text)

    def commit(self, info: dict[str, Any]) -> dict[str, Any]:
        """Close the files, write the held-out texts and ``source.json``, and move the folder into place."""
        counts = {split: writer.close() for split, writer in self.writers.items()}
        lines = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in self.heldout_texts)
        atomic_write_text(self.tmp / HELDOUT_TEXTS_FILE, lines)
        info = {"format": SHARD_FORMAT, "dtype": self.dtype.name, **info, **counts}
        atomic_write_text(self.tmp / SOURCE_FILE, json.dumps(info, indent=2))
        if self.target.exists():  # a stale, unfinished folder (a finished one is never prepared again)
            shutil.rmtree(self.target)
        os.replace(self.tmp, self.target)
        return info

    def __enter__(self) -> SourceFolder:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            for writer in self.writers.values():
                try:
                    writer.close()
                except (OSError, ValueError):
                    pass
            shutil.rmtree(self.tmp, ignore_errors=True)


def write_sequences(writer: ShardWriter, sequences: Iterable[Tensor]) -> None:
    """Append in-memory sequences (e.g. a ``SequenceSet`` of a small source) to a shard writer."""
    for seq in sequences:
        writer.append(seq.numpy())
