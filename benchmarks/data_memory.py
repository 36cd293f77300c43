"""Peak host memory of preparing and reading the corpus at 1x, 10x and 100x the built-in corpus.

Setting: the built-in corpus (about 360,000 tokens of English prose) written to a .txt file once, ten
times or a hundred times over (repeated) in a temporary folder, the built-in teacher's tokenizer (BERT
uncased, 30,522 ids), 128-token sequences. Each scale runs in a fresh process, one torch thread:

* shards: ``prepare_shards`` streams the file into memory-mapped token shards (``data.prepared``), then
  ``open_shards`` + ``BatchOrder`` read ``--batches`` micro-batches of 32 sequences at random, as the
  training loop does;
* memory (for contrast; 1x and 10x, or every scale with ``--in-memory-all``): the in-memory path,
  ``prepare_corpus`` without shards (texts as a list, tokenized whole), then the same reads.

Memory: the process's peak resident set (VmHWM, reset after the imports and the tokenizer are loaded) and
its growth over the resident set at that point; at the end also the anonymous and file-backed parts
(RssAnon, RssFile: mapped shard pages are file-backed, the kernel can drop them at any time). The figure
is the growth of the peak at 100x over the growth at 1x for the shards (target <= 1.5: flat, up to the
pages of the batches read).

Run alone: ``python benchmarks/data_memory.py [--quick] [--scales 1 10 100] [--batches 500]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__:  # imported as benchmarks.data_memory
    from .common import Figure, load_average
else:  # run as a script, or imported by run.py with benchmarks/ on sys.path
    from common import Figure, load_average

NAME = "data_memory"
HOW = ("Each scale (the built-in corpus repeated 1x / 10x / 100x into a .txt file) runs in a fresh process with one "
       "torch thread: prepare token shards by streaming, then read random micro-batches memory-mapped; peak resident "
       "set (VmHWM, reset after imports and tokenizer) and its growth. The in-memory path at 1x and 10x for contrast.")
TARGET = 1.5
BATCH = 32


def _status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status: this benchmark needs Linux")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # VmHWM back to the current resident set (Linux >= 4.0)
    except OSError:
        pass


def child(opts: argparse.Namespace) -> dict:
    """One scale, one path: prepare, read ``opts.batches`` batches; write the measurements to ``opts.result``."""
    import torch

    torch.set_num_threads(1)
    from tadistill.config import DataConfig
    from tadistill.data.batches import BatchOrder
    from tadistill.data.prepare import open_shards, prepare_corpus, prepare_shards
    from tadistill.loading import load_tokenizer

    tokenizer = load_tokenizer("builtin")
    work = Path(opts.work)
    dc = DataConfig(source=str(work / f"corpus-{opts.scale}x.txt"), max_length=128,
                    cache_dir=str(work / f"cache-{opts.path}-{opts.scale}"))
    _reset_peak()
    base = _status("VmRSS")
    began = time.perf_counter()
    if opts.path == "shards":
        folder = work / f"shards-{opts.scale}"
        manifest = prepare_shards(dc, tokenizer, seed=0, out=folder)
        prepared = time.perf_counter() - began
        peak_prepare = _status("VmHWM")
        splits = open_shards(folder, manifest, dc, seed=0)
    else:
        splits = prepare_corpus(dc, tokenizer, seed=0)
        prepared = time.perf_counter() - began
        peak_prepare = _status("VmHWM")
    order = BatchOrder(len(splits.train), BATCH, seed=0)
    tokens = 0
    for k in range(opts.batches):
        tokens += sum(splits.train[i].numel() for i in order.indices(k))
    result = {
        "scale": opts.scale, "path": opts.path, "train_tokens": splits.train.num_tokens(),
        "sequences": len(splits.train), "tokens_read": tokens, "prepare_seconds": round(prepared, 1),
        "seconds": round(time.perf_counter() - began, 1), "base_bytes": base, "peak_prepare_bytes": peak_prepare,
        "peak_bytes": _status("VmHWM"), "anon_bytes": _status("RssAnon"), "file_bytes": _status("RssFile"),
    }
    Path(opts.result).write_text(json.dumps(result), encoding="utf-8")
    return result


def write_corpora(work: Path, scales: list[int]) -> dict[int, int]:
    """The built-in corpus repeated ``scale`` times, one .txt per scale, written a copy at a time; sizes in bytes."""
    from tadistill.data.builtin import builtin_texts

    text = "\n\n".join(builtin_texts()) + "\n\n"
    sizes = {}
    for scale in scales:
        path = work / f"corpus-{scale}x.txt"
        with path.open("w", encoding="utf-8") as handle:
            for _ in range(scale):
                handle.write(text)
        sizes[scale] = path.stat().st_size
    return sizes


def measure(opts: argparse.Namespace) -> tuple[list[dict], dict[int, int]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="tadistill-data-") as tmp:
        work = Path(tmp)
        sizes = write_corpora(work, opts.scales)
        runs = [("shards", s) for s in opts.scales]
        runs += [("memory", s) for s in opts.scales if opts.in_memory_all or s <= 10]
        for path, scale in runs:
            out = work / f"{path}-{scale}.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--child", "--path", path, "--scale", str(scale),
                       "--work", str(work), "--result", str(out), "--batches", str(opts.batches)]
            subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            result = json.loads(out.read_text(encoding="utf-8"))
            result["file_mb"] = round(sizes[scale] / 2**20, 1)
            print(_row(result), flush=True)
            results.append(result)
    return results, sizes


def _mb(value: int) -> str:
    return f"{value / 2**20:.0f}"


def _row(r: dict) -> str:
    return (f"{r['path']:>6} {r['scale']:>4}x: corpus {r['file_mb']} MB, {r['train_tokens']:,} train tokens; peak RSS "
            f"{_mb(r['peak_bytes'])} MB (growth {_mb(r['peak_bytes'] - r['base_bytes'])} MB; prepare "
            f"{_mb(r['peak_prepare_bytes'] - r['base_bytes'])} MB), end anon {_mb(r['anon_bytes'])} / file "
            f"{_mb(r['file_bytes'])} MB; prepare {r['prepare_seconds']} s, total {r['seconds']} s")


def figures(results: list[dict], opts: argparse.Namespace, load: list[str]) -> list[Figure]:
    shards = {r["scale"]: r for r in results if r["path"] == "shards"}
    small, large = shards[min(shards)], shards[max(shards)]
    growth = {s: r["peak_bytes"] - r["base_bytes"] for s, r in shards.items()}
    ratio = growth[max(shards)] / max(growth[min(shards)], 1)
    details = "; ".join(f"{s}x: peak {_mb(shards[s]['peak_bytes'])} MB (+{_mb(g)})" for s, g in sorted(growth.items()))
    memory = {r["scale"]: r for r in results if r["path"] == "memory"}
    if memory:
        details += "; in memory " + ", ".join(
            f"{s}x: peak {_mb(r['peak_bytes'])} MB (+{_mb(r['peak_bytes'] - r['base_bytes'])})"
            for s, r in sorted(memory.items()))
    details += f"; load {load[0]} -> {load[-1]}"
    return [Figure(NAME, f"peak RSS growth, {max(shards)}x vs {min(shards)}x corpus (token shards)", ratio, TARGET,
                   f"<= {TARGET}", details,
                   extra={"results": results, "batches": opts.batches, "scales": opts.scales,
                          "tokens": {s: r["train_tokens"] for s, r in shards.items()},
                          "prepare_seconds": {s: r["prepare_seconds"] for s, r in shards.items()},
                          "small": small["scale"], "large": large["scale"]})]


def parse(argv: list[str] | None = None, *, quick: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="data_memory", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="scales 1 and 10, 100 batches")
    p.add_argument("--scales", type=int, nargs="+", default=None, help="corpus sizes in built-in corpora (1 10 100)")
    p.add_argument("--batches", type=int, default=None, help="micro-batches of 32 read (default 500, quick 100)")
    p.add_argument("--in-memory-all", action="store_true", help="the in-memory path at every scale, not just <= 10x")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", choices=("shards", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--scale", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.quick = opts.quick or quick
    opts.scales = opts.scales or ([1, 10] if opts.quick else [1, 10, 100])
    opts.batches = opts.batches if opts.batches is not None else (100 if opts.quick else 500)
    return opts


def run(argv: list[str] | None = None, *, quick: bool = False) -> list[Figure]:
    opts = parse(argv, quick=quick)
    load = [load_average()]
    results, _ = measure(opts)
    load.append(load_average())
    return figures(results, opts, load)


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    if opts.child:
        child(opts)
        return 0
    for figure in run(argv):
        print(figure.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
