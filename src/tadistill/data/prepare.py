"""From a DataConfig and a tokenizer to tokenized, split sequences: in memory, or as memory-mapped shards.

Three paths, chosen from the config:

1. in memory (the default for small corpora): texts read as a list, tokenized and cached in
   ``cache_dir`` (``tokenized.tokenize_corpus``); several sources without weights are concatenated;
2. in memory, mixed: sources with weights (or ``data.alpha``) are tokenized one by one and drawn by
   ``mixture.MixtureSet``;
3. token shards (``data.prepared: DIR``, or a local source larger than ``data.stream_above_mb``): each
   source is streamed, tokenized and packed into shards once (``prepare_shards``, also the
   ``tadistill prepare`` command), then read memory-mapped, so host memory stays flat as the corpus grows.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tadistill.config import DataConfig
from tadistill.data.mixture import ConcatSet, MixtureSet, mixture_probabilities
from tadistill.data.prompts import load_pairs, pairs_fingerprint, split_prompts, tokenize_pairs
from tadistill.data.readers import local_path, source_files
from tadistill.data.shards import SourceFolder, id_dtype, open_source, read_source_info
from tadistill.data.sources import BUILTIN, CORPUS, SourceEntry, iter_texts, load_texts, source_entries, source_fingerprint
from tadistill.data.streaming import prepare_stream
from tadistill.data.tokenized import CorpusSplits, _cache_key, _check_arguments, _unit_hash, split_texts, tokenize_corpus
from tadistill.errors import ConfigError, DataError
from tadistill.fileio import atomic_write_text

DEFAULT_CACHE = Path(os.environ.get("TADISTILL_CACHE", Path.home() / ".cache" / "tadistill"))
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
_SOURCE_FOLDER = re.compile(r"^[0-9a-f]{16}$")


def heldout_texts(source: str, dc: DataConfig, *, seed: int, limit: int) -> list[str]:
    """The held-out texts of one source under the same deterministic split as training (for evaluation).

    Streams the source and stops after ``limit`` held-out texts; only a source whose hash split holds out
    nothing is read whole (the split then moves the text of smallest hash, as training does).
    """
    found = []
    for text in itertools.islice(iter_texts(source, text_field=dc.text_field, split=dc.split), dc.max_texts):
        if _unit_hash(seed, text) < dc.heldout_fraction:
            found.append(text)
            if len(found) >= limit:
                break
    if found:
        return found
    texts = load_texts(source, text_field=dc.text_field, split=dc.split)
    if dc.max_texts:
        texts = texts[: dc.max_texts]
    return split_texts(texts, dc.heldout_fraction, seed=seed)[1][:limit]


def prepare_corpus(dc: DataConfig, tokenizer, *, seed: int, max_positions: int | None = None) -> CorpusSplits:
    """Load, tokenize (cached), split and pack the corpus of ``dc`` (see the module docstring for the paths)."""
    if max_positions and dc.max_length > max_positions:
        raise ConfigError(f"data.max_length={dc.max_length} exceeds the teacher's {max_positions} positions: lower it")
    entries = source_entries(dc.source)
    sources = [e.path for e in entries]
    cache_dir = Path(dc.cache_dir) if dc.cache_dir else DEFAULT_CACHE
    if dc.prompt_field:  # prompt / completion records: one sequence per record, only completions distilled
        pairs = []
        for source in sources:
            part = load_pairs(source, prompt_field=dc.prompt_field, completion_field=dc.completion_field,
                              split=dc.split)
            pairs += part[: dc.max_texts] if dc.max_texts else part
        fingerprint = "|".join(
            pairs_fingerprint(s, prompt_field=dc.prompt_field, completion_field=dc.completion_field, split=dc.split)
            for s in sources
        )
        return tokenize_pairs(pairs, tokenizer, max_length=dc.max_length, heldout_fraction=dc.heldout_fraction,
                              seed=seed, cache_dir=cache_dir, fingerprint=f"pairs|{fingerprint}|{dc.max_texts}")
    if dc.prepared or any(_too_large(e.path, dc) for e in entries):
        folder = Path(dc.prepared) if dc.prepared else cache_dir / "shards" / shard_key(dc, tokenizer, seed)[:16]
        manifest = prepare_shards(dc, tokenizer, seed=seed, out=folder, replace=not dc.prepared)
        return open_shards(folder, manifest, dc, seed=seed)
    if any(e.weight is not None for e in entries) or dc.alpha is not None:
        return _mixed_in_memory(dc, entries, tokenizer, seed=seed, cache_dir=cache_dir)

    def load() -> list[str]:
        texts = []
        for source in sources:  # several corpora (e.g. one per language) train together
            part = load_texts(source, text_field=dc.text_field, split=dc.split)
            texts += part[: dc.max_texts] if dc.max_texts else part
        return texts

    # The cache key comes from the sources' fingerprints, not their texts: a cache hit reads no corpus
    # (the built-in one takes seconds to rebuild), and the cache holds the held-out texts too.
    fingerprint = "|".join(source_fingerprint(s, text_field=dc.text_field, split=dc.split) for s in sources)
    splits = tokenize_corpus(
        load,
        tokenizer,
        max_length=dc.max_length,
        heldout_fraction=dc.heldout_fraction,
        seed=seed,
        packing=dc.packing,
        cache_dir=cache_dir,
        fingerprint=f"{fingerprint}|{dc.max_texts}",
    )
    if dc.prompt_tokens:  # plain text as prompt / continuation (on-policy training samples the continuation)
        splits = CorpusSplits(split_prompts(splits.train, dc.prompt_tokens),
                              split_prompts(splits.heldout, dc.prompt_tokens), splits.heldout_texts)
    return splits


def _mixed_in_memory(dc: DataConfig, entries: list[SourceEntry], tokenizer, *, seed: int,
                     cache_dir: Path) -> CorpusSplits:
    """Each source tokenized (and cached) on its own, then drawn by weight or by language."""
    parts = []
    for entry in entries:
        def load(path=entry.path) -> list[str]:
            texts = load_texts(path, text_field=dc.text_field, split=dc.split)
            return texts[: dc.max_texts] if dc.max_texts else texts

        fingerprint = source_fingerprint(entry.path, text_field=dc.text_field, split=dc.split)
        split = tokenize_corpus(load, tokenizer, max_length=dc.max_length, heldout_fraction=dc.heldout_fraction,
                                seed=seed, packing=dc.packing, cache_dir=cache_dir,
                                fingerprint=f"{fingerprint}|{dc.max_texts}")
        if dc.prompt_tokens:
            split = CorpusSplits(split_prompts(split.train, dc.prompt_tokens),
                                 split_prompts(split.heldout, dc.prompt_tokens), split.heldout_texts)
        parts.append(split)
    return _combine(dc, entries, [p.train for p in parts], [p.heldout for p in parts],
                    [p.heldout_texts for p in parts], seed=seed)


def _combine(dc: DataConfig, entries: list[SourceEntry], train: list, heldout: list, texts: list[list[str]], *,
             seed: int) -> CorpusSplits:
    """One CorpusSplits from per-source splits: a single source as it is, several concatenated (no weights) or
    mixed (weights or alpha); the held-out split is always a mixture, so its first batches hold every source."""
    names = [_label(e) for e in entries]
    held = [t for group in itertools.zip_longest(*texts) for t in group if t is not None]  # round robin
    if len(entries) == 1:
        return CorpusSplits(train[0], heldout[0], held)
    tokens = [part.num_tokens() for part in train]
    for name, n in zip(names, tokens):
        if n == 0:
            raise DataError(f"source {name!r} has no training tokens: add text to it or drop it")
    probabilities = mixture_probabilities(tokens, weights=[e.weight for e in entries],
                                          languages=[e.language for e in entries], alpha=dc.alpha)
    held_set = MixtureSet(heldout, probabilities, seed=seed + 1, names=names)
    if any(e.weight is not None for e in entries) or dc.alpha is not None:
        train_set = MixtureSet(train, probabilities, seed=seed, names=names)
        rows = train_set.describe()
    else:  # no weights: every sequence once per pass, as the concatenation always did
        train_set = ConcatSet(train)
        total = len(train_set)
        rows = [{"source": name, "probability": round(p, 6), "fraction": round(len(part) / total, 6),
                 "sequences": len(part), "tokens": n, "epochs_per_pass": 1.0}
                for name, p, part, n in zip(names, probabilities, train, tokens)]
    return CorpusSplits(train_set, held_set, held, mixture=_by_language(rows, entries))


def _label(entry: SourceEntry) -> str:
    return f"{entry.language}:{entry.path}" if entry.language else entry.path


def _by_language(rows: list[dict[str, Any]], entries: list[SourceEntry]) -> dict[str, Any]:
    """The mixture's report: per source, and per language when sources name one (what was drawn, by language)."""
    report: dict[str, Any] = {"sources": rows}
    languages: dict[str, dict[str, float]] = {}
    for row, entry in zip(rows, entries):
        if entry.language:
            lang = languages.setdefault(entry.language, {"probability": 0.0, "fraction": 0.0, "tokens": 0})
            lang["probability"] = round(lang["probability"] + row["probability"], 6)
            lang["fraction"] = round(lang["fraction"] + row["fraction"], 6)
            lang["tokens"] += row["tokens"]
    if languages:
        report["languages"] = languages
    return report


# ------------------------------------------------------------------------------------------- shards


def _too_large(source: str, dc: DataConfig) -> bool:
    """A local source whose files exceed data.stream_above_mb (hub names and 'builtin' never count)."""
    if source == BUILTIN:
        return False
    try:
        path = local_path(source, CORPUS)
    except DataError:
        return False  # a missing path: the in-memory path gives the usual message
    if path is None:
        return False
    size = sum(f.stat().st_size for f in source_files(source, path, CORPUS))
    return size > dc.stream_above_mb * 2**20


def _settings(dc: DataConfig, seed: int) -> dict[str, Any]:
    return {"max_length": dc.max_length, "packing": dc.packing, "heldout_fraction": dc.heldout_fraction,
            "seed": seed, "text_field": dc.text_field, "split": dc.split, "max_texts": dc.max_texts}


def _source_key(dc: DataConfig, tokenizer, seed: int, path: str) -> str:
    """Fingerprint of one source's shards: tokenizer (vocabulary, special tokens), source and settings."""
    fingerprint = source_fingerprint(path, text_field=dc.text_field, split=dc.split)
    return _cache_key(tokenizer, f"shards|{fingerprint}|{dc.max_texts}|{dc.text_field}|{dc.split}",
                      dc.max_length, dc.packing, dc.heldout_fraction, seed, 1)


def shard_key(dc: DataConfig, tokenizer, seed: int) -> str:
    """Fingerprint of a whole preparation: every source's key, in order (weights and alpha are not part of it:
    they change the sampling, not the shards)."""
    keys = [_source_key(dc, tokenizer, seed, e.path) for e in source_entries(dc.source)]
    return hashlib.sha256("|".join(keys).encode()).hexdigest()


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One preparer per folder: other processes (torchrun ranks, a second run) wait, then find it done."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def prepare_shards(dc: DataConfig, tokenizer, *, seed: int, out: str | Path, replace: bool = True,
                   progress=None) -> dict[str, Any]:
    """Stream every source of ``dc`` into token shards under ``out`` and write ``out/manifest.json``.

    A no-op when the manifest already has this preparation's fingerprint. Sources already prepared with the
    same fingerprint (e.g. after adding a source) are reused. ``replace=False`` refuses a folder prepared for
    another config instead of preparing it again (a run pointed at shards by ``data.prepared`` must not
    silently spend hours re-tokenizing). ``progress(message)``: called as each source starts and ends.
    Returns the manifest.
    """
    _check_arguments(tokenizer, dc.max_length, dc.heldout_fraction, 1)
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a folder for token shards: choose another place")
    key = shard_key(dc, tokenizer, seed)
    with _locked(folder):
        manifest = read_manifest(folder)
        if manifest is not None and manifest.get("fingerprint") == key:
            return manifest
        if manifest is not None and not replace:
            raise DataError(f"{folder} holds token shards prepared for another corpus, tokenizer or data settings: "
                            "run `tadistill prepare` with this config, or set data.prepared to another folder")
        began = time.perf_counter()
        rows = []
        for entry in source_entries(dc.source):
            name = _source_key(dc, tokenizer, seed, entry.path)[:16]
            info = read_source_info(folder / name)
            if info is None:
                if progress:
                    progress(f"preparing {entry.path} ...")
                info = _prepare_source(dc, tokenizer, seed=seed, entry=entry, target=folder / name)
            rows.append({"path": entry.path, "language": entry.language, "folder": name,
                         "train": info["train"], "heldout": info["heldout"]})
            if progress:
                progress(f"{entry.path}: {info['train']['sequences']} training sequences, "
                         f"{info['train']['tokens']} tokens")
        manifest = {"format": MANIFEST_FORMAT, "fingerprint": key,
                    "tokenizer": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": len(tokenizer),
                    "dtype": id_dtype(len(tokenizer)).name, "settings": _settings(dc, seed), "sources": rows,
                    "seconds": round(time.perf_counter() - began, 1)}
        atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=2))
        keep = {row["folder"] for row in rows}
        for stale in folder.iterdir():  # source folders of an earlier preparation that no longer serve
            if stale.is_dir() and _SOURCE_FOLDER.match(stale.name) and stale.name not in keep:
                shutil.rmtree(stale, ignore_errors=True)
    return manifest


def _prepare_source(dc: DataConfig, tokenizer, *, seed: int, entry: SourceEntry, target: Path) -> dict[str, Any]:
    texts = iter_texts(entry.path, text_field=dc.text_field, split=dc.split, streaming=True)
    with SourceFolder(target, dtype=id_dtype(len(tokenizer))) as out:
        prepare_stream(itertools.islice(texts, dc.max_texts), tokenizer, out, max_length=dc.max_length,
                       heldout_fraction=dc.heldout_fraction, seed=seed, packing=dc.packing, name=entry.path)
        return out.commit({"path": entry.path, "language": entry.language,
                           "fingerprint": _source_key(dc, tokenizer, seed, entry.path)})


def open_shards(folder: str | Path, manifest: dict[str, Any], dc: DataConfig, *, seed: int) -> CorpusSplits:
    """The corpus splits of prepared shards, memory-mapped; the sources' weights and languages come from ``dc``."""
    folder = Path(folder)
    entries = source_entries(dc.source)
    rows = manifest["sources"]
    if [r["path"] for r in rows] != [e.path for e in entries]:
        raise DataError(f"{folder} was prepared for other sources ({[r['path'] for r in rows]}): run "
                        "`tadistill prepare` with this config")
    opened = [open_source(folder / r["folder"], prompt_tokens=dc.prompt_tokens) for r in rows]
    return _combine(dc, entries, [o[0] for o in opened], [o[1] for o in opened], [o[2] for o in opened], seed=seed)
