"""Words per second of prompt compression (``tadistill compress``, LLMLingua-2) at batch sizes 1 and 32.

Setting: a 10,000-word document made of consecutive paragraphs of the built-in corpus, compressed at rate 0.33
by ``Compressor.compress`` (word splitting, chunking at sentence ends, the encoder over the chunks ``batch_size``
at a time, per-chunk selection, the compressed text). The compressor is the built-in encoder (all-MiniLM-L6-v2,
6x384) with a keep / drop head; its speed does not depend on the head's weights, so without ``--model`` the head
is freshly initialised and nothing needs training first. The model is loaded before timing.

Figures (lower is better, like every figure of ``run.py``):

* seconds to compress the document at batch 1 (the CPU default) / 10 s: the issue's "a 10,000-word document in
  seconds on a CPU", held to <= 1;
* time at batch 32 / time at batch 1: what batching the chunks buys, held to <= 1.

Run alone: ``python benchmarks/lingua_speed.py [--model DIR] [--words 10000] [--repeats 3] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

if __package__:  # imported as benchmarks.lingua_speed
    from .common import Figure, Stopwatch, cores_text, torch_threads
else:  # run as a script, or imported by run.py with benchmarks/ on sys.path
    from common import Figure, Stopwatch, cores_text, torch_threads

NAME = "lingua_speed"
HOW = ("One 10,000-word document (words as compress counts them) of built-in paragraphs, compressed at rate 0.33 by Compressor.compress (splitting, "
       "chunking, encoder, selection) at batch sizes 1 and 32, alternating, median of --repeats, the model loaded before timing.")
TARGET_SECONDS = 10.0


def document(words: int) -> str:
    """Consecutive built-in paragraphs up to ``words`` words as compress counts them (punctuation marks too)."""
    from tadistill.data.builtin import builtin_texts
    from tadistill.lingua.words import split_words

    parts, count = [], 0
    for text in builtin_texts():
        parts.append(text)
        count += len(split_words(text)) + 2  # the two newlines before the next paragraph are words too
        if count >= words:
            break
    return "\n\n".join(parts)


def compressor(model: str | None):
    from tadistill.lingua.compress import Compressor
    from tadistill.lingua.train import body_with_head
    from tadistill.loading import load_tokenizer

    if model:
        return Compressor.load(model)
    head = body_with_head("builtin", seed=0).eval()
    return Compressor(head, load_tokenizer("builtin"))


def measure(opts: argparse.Namespace) -> dict:
    text = document(opts.words)
    with torch_threads(opts.threads):
        comp = compressor(opts.model)
        comp.compress(text[:2000], rate=0.33)  # warm-up: first calls allocate
        results = {"threads": torch.get_num_threads()}
        walls: dict[int, list[float]] = {1: [], 32: []}
        busy: dict[int, list[float]] = {1: [], 32: []}
        outs = {}
        # The two batch sizes alternate, repeat by repeat, so that other jobs' load falls on both alike.
        for _ in range(opts.repeats):
            for batch in (1, 32):
                with Stopwatch() as sw:
                    outs[batch] = comp.compress(text, rate=0.33, batch_size=batch)
                walls[batch].append(sw.wall)
                busy[batch].append(sw.elsewhere)
        for batch, out in outs.items():
            results[batch] = {"seconds": statistics.median(walls[batch]), "all_seconds": walls[batch],
                              "words": out.words, "tokens": out.original_tokens, "kept_words": out.kept_words,
                              "elsewhere": max((b for b in busy[batch] if b is not None), default=None)}
    return results


def figures(r: dict, opts: argparse.Namespace) -> list[Figure]:
    one, many = r[1], r[32]
    words = many["words"]
    details = (f"batch 1: {one['seconds']:.2f} s ({one['words'] / one['seconds']:,.0f} words/s); batch 32: "
               f"{many['seconds']:.2f} s ({words / many['seconds']:,.0f} words/s); {words:,} words, "
               f"{many['tokens']:,} encoder tokens, {r['threads']} torch thread(s); other processes busy on "
               f"{cores_text(many['elsewhere'])} cores")
    extra = {"results": r, "model": opts.model or "builtin encoder, fresh head"}
    return [
        Figure(benchmark=NAME, what=f"seconds to compress {words:,} words at batch 1 / {TARGET_SECONDS:g} s",
               ratio=one["seconds"] / TARGET_SECONDS, target=1.0, target_text="<= 1", details=details, extra=extra),
        Figure(benchmark=NAME, what="compress time at batch 32 / at batch 1", ratio=many["seconds"] / one["seconds"],
               target=1.0, target_text="<= 1", details=details, extra=extra),
    ]


def parse(argv: list[str] | None = None, *, quick: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=NAME, description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a compressor folder (default: the built-in encoder with a fresh head)")
    p.add_argument("--words", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's setting)")
    p.add_argument("--quick", action="store_true", help="one repeat")
    opts = p.parse_args(argv)
    if opts.quick or quick:
        opts.repeats = 1
    return opts


def run(argv: list[str] | None = None, *, quick: bool = False) -> list[Figure]:
    opts = parse(argv, quick=quick)
    return figures(measure(opts), opts)


def main(argv: list[str] | None = None) -> int:
    for figure in run(argv):
        print(figure.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
