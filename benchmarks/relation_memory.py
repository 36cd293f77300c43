"""Peak memory of the chunked relation KL against the plain one at long sequences, forward + backward.

Setting: MiniLMv2's relation loss (one of Q-Q / K-K / V-V, Wang et al. 2021 eq. 1-3) between a student's
and a teacher's projections at T = 2,048 tokens: student x_S (B, T, 384), teacher x_T (B, T, 768),
12 relation heads, B = 1, every token valid; with ``--objective attention`` MiniLM's attention KL L_AT
from queries and keys instead (12 heads of 32 / 64), and ``--causal`` for decoders.

* plain: ``relation_kl(..., chunk_size=None)``: the (B x 12, T, T) relations of both models at once
  (``qk_attention_kl`` without chunks is ``attention_kl`` on the full attention_logits);
* chunked: the same call with ``chunk_size``, once per size: the library default
  (``default_relation_chunk_size``: 2^22 / (B x heads x T) rows, 170 here; where the default keeps the
  relation whole, e.g. ``--quick``'s T = 1,024, T / 8 instead), 512 and 64.

Memory, as in ``chunked_memory``: every variant runs in a fresh process, after its inputs exist. CUDA:
growth of ``torch.cuda.max_memory_allocated``. CPU: growth of the peak resident set (VmHWM, reset before
the step) over the resident set before it, with glibc serving every allocation over 1 MiB by mmap so that
freed tensors leave the resident set at once. Both include the student's input gradient, which both produce.
Each chunked run's loss and input gradient are compared with the plain run's.

Time: in this (parent) process the plain and the default chunked call alternate, forward + backward, one
torch thread (with two, another job on a 2-core machine turns every synchronisation point into a wait);
the figure is the median time ratio, with the load printed.

Run alone: ``python benchmarks/relation_memory.py [--quick] [--seq-len 4096 --batch-size 2 --causal]``.
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

import torch

if __package__:  # imported as benchmarks.relation_memory
    from .chunked_memory import (
        _peak_resident_bytes,
        _reset_peak_resident,
        _resident_bytes,
    )
    from .common import Figure, Stopwatch, cores_text, load_average, median, pick_device
else:  # run as a script, or imported by run.py with benchmarks/ on sys.path
    from chunked_memory import (
        _peak_resident_bytes,
        _reset_peak_resident,
        _resident_bytes,
    )
    from common import Figure, Stopwatch, cores_text, load_average, median, pick_device

NAME = "relation_memory"
HOW = ("Each variant runs in a fresh process. CUDA: torch.cuda.max_memory_allocated growth over the step. CPU: growth "
       "of the peak resident set (VmHWM, reset before the step) over the resident set before it, allocations over "
       "1 MiB served by mmap. Time: plain and default-chunked calls alternating in one process, one torch thread.")
TARGET = 1 / 4
MMAP_THRESHOLD = 1 << 20
STUDENT_WIDTH, TEACHER_WIDTH, HEADS = 384, 768, 12


def make_inputs(opts: argparse.Namespace, device: torch.device):
    """Student inputs (needing gradients) and teacher constants; (B, T) mask of valid tokens."""
    generator = torch.Generator().manual_seed(0)
    b, t = opts.batch_size, opts.seq_len

    def rand(width: int, grad: bool) -> torch.Tensor:
        return torch.randn(b, t, width, generator=generator).to(device).requires_grad_(grad)

    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    if opts.objective == "relation":
        return (rand(STUDENT_WIDTH, True),), (rand(TEACHER_WIDTH, False),), mask
    return (rand(STUDENT_WIDTH, True), rand(STUDENT_WIDTH, True)), (rand(TEACHER_WIDTH, False),
                                                                     rand(TEACHER_WIDTH, False)), mask


def loss_of(student, teacher, mask, opts: argparse.Namespace, chunk: int | None) -> torch.Tensor:
    from tadistill.objectives.attention import qk_attention_kl, relation_kl

    if opts.objective == "relation":
        return relation_kl(student[0], teacher[0], mask, relation_heads=HEADS, causal=opts.causal, chunk_size=chunk)
    return qk_attention_kl(*student, *teacher, mask, num_heads=HEADS, student_kv_heads=HEADS,
                           teacher_kv_heads=HEADS, causal=opts.causal, chunk_size=chunk)


def default_chunk(opts: argparse.Namespace) -> int | None:
    from tadistill.objectives.chunked_relations import default_relation_chunk_size

    return default_relation_chunk_size(opts.batch_size, HEADS, opts.seq_len)


# ------------------------------------------------------------------------------- child: one variant


def run_variant(chunk: int, opts: argparse.Namespace, out: Path) -> dict:
    """Measure one forward + backward (chunk 0 = plain); save the loss and the input gradients to ``out``."""
    device = torch.device(opts.device)
    student, teacher, mask = make_inputs(opts, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        _reset_peak_resident()
        before = _resident_bytes()
    loss = loss_of(student, teacher, mask, opts, chunk or None)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        peak = _peak_resident_bytes() - before
    torch.save([x.grad.cpu() for x in student], out.with_suffix(".pt"))
    result = {"chunk": chunk, "loss": float(loss.detach()), "peak_bytes": peak, "baseline_bytes": before}
    out.write_text(json.dumps(result), encoding="utf-8")
    return result


# ------------------------------------------------------------------------------ parent: all variants


def measure_memory(opts: argparse.Namespace) -> list[dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    results = []
    with tempfile.TemporaryDirectory(prefix="tadistill-bench-") as tmp:
        for chunk in [0, *opts.chunks]:
            out = Path(tmp) / f"chunk-{chunk}.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--child", "--chunk", str(chunk),
                       "--result", str(out), "--seq-len", str(opts.seq_len), "--batch-size", str(opts.batch_size),
                       "--objective", opts.objective, "--device", opts.device, *(["--causal"] if opts.causal else [])]
            began = time.perf_counter()
            subprocess.run(command, check=True, env=env)
            result = json.loads(out.read_text(encoding="utf-8"))
            result["grads"] = torch.load(out.with_suffix(".pt"))
            result["process_seconds"] = round(time.perf_counter() - began, 1)
            results.append(result)
    reference = results[0]["grads"]
    for r in results:
        r["loss_rel_diff"] = abs(r["loss"] - results[0]["loss"]) / max(abs(results[0]["loss"]), 1e-12)
        grads = r.pop("grads")
        r["grad_rel_diff"] = max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-30))
                                 for g, w in zip(grads, reference))
    return results


def measure_time(opts: argparse.Namespace) -> dict:
    """Plain and chunked (the first chunk size measured) forward + backward alternating in this process, one
    torch thread."""
    chunk = opts.chunks[0]
    device = torch.device(opts.device)
    student, teacher, mask = make_inputs(opts, device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"plain": [], "chunked": []}
    try:
        with Stopwatch() as sw:
            for k in range(opts.repeats + 1):  # the first round warms up
                for arm in (("plain", "chunked") if k % 2 else ("chunked", "plain")):
                    for x in student:
                        x.grad = None
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    began = time.perf_counter()
                    loss_of(student, teacher, mask, opts, chunk if arm == "chunked" else None).backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if k:
                        times[arm].append(time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)
    return {"chunk": chunk, "plain_s": times["plain"], "chunked_s": times["chunked"], "elsewhere": sw.elsewhere}


def figures(results: list[dict], timing: dict | None, opts: argparse.Namespace, load: list) -> list[Figure]:
    plain = results[0]
    library = default_chunk(opts)
    what = ("MiniLMv2 relation KL (12 relation heads, 384 / 768 wide)" if opts.objective == "relation"
            else "MiniLM attention KL (12 heads, 384 / 768 wide)")
    setting = f"{what}{', causal' if opts.causal else ''}, B={opts.batch_size}, T={opts.seq_len:,}"
    how = "CUDA max_memory_allocated" if opts.device.startswith("cuda") else "peak RSS growth, fresh process"
    relation = opts.batch_size * HEADS * opts.seq_len ** 2 * 4  # bytes of one (B x H, T, T) float32 tensor
    out = []
    timing_chunk = timing["chunk"] if timing else None
    for r in results[1:]:
        agree = max(r["loss_rel_diff"], r["grad_rel_diff"]) <= 1e-4
        default = " (library default)" if r["chunk"] == library else ""
        extra = {"chunked": r, "plain": plain, "losses_agree": agree, "seq_len": opts.seq_len,
                 "batch_size": opts.batch_size, "objective": opts.objective, "causal": opts.causal,
                 "device": opts.device, "measure": how, "load_average": load}
        details = (f"{r['peak_bytes'] / 2**20:,.0f} MiB vs {plain['peak_bytes'] / 2**20:,.0f} MiB ({how}; one "
                   f"(B x heads, T, T) float32 relation is {relation / 2**20:,.0f} MiB); loss rel. diff "
                   f"{r['loss_rel_diff']:.1e}, gradient rel. diff {r['grad_rel_diff']:.1e} "
                   f"({'agree' if agree else 'DISAGREE'})")
        if r["chunk"] == timing_chunk and timing:
            ratio = median(timing["chunked_s"]) / median(timing["plain_s"])
            details += (f"; time fwd+bwd {median(timing['chunked_s']) * 1e3:,.0f} vs "
                        f"{median(timing['plain_s']) * 1e3:,.0f} ms ({ratio:.2f}x, median of "
                        f"{len(timing['plain_s'])} alternating, 1 thread; other processes busy on "
                        f"{cores_text(timing['elsewhere'])} cores, load {load})")
            extra["time"] = {**timing, "ratio": ratio}
        out.append(Figure(
            benchmark=NAME, what=f"peak memory fwd+bwd, chunked (chunk_size={r['chunk']}{default}) / plain, {setting}",
            ratio=r["peak_bytes"] / plain["peak_bytes"], target=TARGET, target_text="<= 1/4", details=details,
            extra=extra,
        ))
    return out


def parse(argv: list[str] | None = None, *, quick: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="relation_memory", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T = 1,024, the default chunk size only, 2 timing rounds")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 2048, quick 1024)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--objective", choices=("relation", "attention"), default="relation")
    p.add_argument("--causal", action="store_true", help="decoder masks")
    p.add_argument("--chunks", type=int, nargs="+", default=None,
                   help="chunk sizes to measure (default: the library default, 512 and 64)")
    p.add_argument("--repeats", type=int, default=None, help="timing rounds (default 4, quick 2); 0: no timing")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.quick = opts.quick or quick
    opts.seq_len = opts.seq_len or (1024 if opts.quick else 2048)
    opts.repeats = opts.repeats if opts.repeats is not None else (2 if opts.quick else 4)
    opts.device = str(pick_device(opts.device))
    if opts.chunks is None:
        # The library's default; where it keeps the relation whole (short sequences), an eighth of it.
        library = default_chunk(opts) or max(1, opts.seq_len // 8)
        opts.chunks = [library] if opts.quick else list(dict.fromkeys([library, 512, 64]))
    return opts


def run(argv: list[str] | None = None, *, quick: bool = False) -> list[Figure]:
    opts = parse(argv, quick=quick)
    load = [load_average()]
    results = measure_memory(opts)
    timing = measure_time(opts) if opts.repeats else None
    load.append(load_average())
    return figures(results, timing, opts, load)


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    if opts.child:
        run_variant(opts.chunk, opts, opts.result)
        return 0
    for figure in run(argv):
        print(figure.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
