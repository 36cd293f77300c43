"""Peak memory of the chunked logit divergence against the plain one on full logits, forward + backward.

Setting: a causal-LM distillation step's output layers at a large vocabulary. Student and teacher each
have last hidden states (1, N, d) and an output layer ``nn.Linear(d, V)``; N = 2,048 positions,
V = 128,256 (Llama 3's vocabulary), d = 256 by default so that it fits a CPU. The divergence is forward
KL, every position distilled.

* plain: teacher logits (N, V) under no_grad, student logits (N, V), then
  ``tadistill.objectives.logits.logit_divergence`` and backward;
* chunked: ``tadistill.objectives.chunked.chunked_logit_divergence`` with the teacher logits produced per
  chunk from its hidden states (as tadistill's ``logits`` term does), then backward; one run per chunk
  size: the library default (2^24 / V rows, 130 at V = 128,256), the former fixed default 1,024 and 256.

How memory is measured: every variant runs in a fresh Python process, after the weights and hidden
states exist. On CUDA the figure is ``torch.cuda.max_memory_allocated`` minus what was allocated before
the step (tensor bytes, the caching allocator's slack excluded). On a CPU PyTorch has no allocator
statistics, so the figure is the growth of the process's peak resident set: VmHWM from /proc/self/status,
reset just before the step, minus the resident set at that point; what the step really costs the machine.
glibc is told to serve every allocation over 1 MiB with its own mmap (``MALLOC_MMAP_THRESHOLD_``), so freed
tensors go back to the OS at once and the resident set follows the live tensors instead of the allocator's
high-water mark.
Both include the gradient of the student's output layer (d x V), which both variants must produce.

The losses and gradients of every chunked run are compared with the plain run's.

Run alone: ``python benchmarks/chunked_memory.py [--quick] [--vocab 256000 --positions 16384 --hidden 4096]``.
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

from tadistill.objectives.chunked import default_chunk_size

if __package__:  # imported as benchmarks.chunked_memory
    from .common import Figure, pick_device
else:  # run as a script, or imported by run.py with benchmarks/ on sys.path
    from common import Figure, pick_device

NAME = "chunked_memory"
HOW = ("Each variant runs in a fresh process. CUDA: torch.cuda.max_memory_allocated growth over the step. CPU: growth "
       "of the peak resident set (VmHWM, reset before the step) over the resident set before it, with glibc serving "
       "every allocation over 1 MiB by mmap so that freed tensors leave the resident set at once. Both count the "
       "output layer's weight gradient, which both variants produce.")
TARGET = 1 / 8
MMAP_THRESHOLD = 1 << 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------- child: one variant


def _resident_bytes() -> int:
    """The process's current resident set (Linux /proc), in bytes."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_resident_bytes() -> int:
    """The high-water mark of this process's resident set (VmHWM), in bytes.

    Not getrusage's ru_maxrss: Linux carries that over from the parent through fork / vfork + exec, so a
    child of a large process (run.py after the other benchmarks) would start with the parent's peak.
    """
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS needs Linux")


def _reset_peak_resident() -> None:
    """Set the high-water mark back to the current resident set (Linux >= 4.0), when the kernel allows it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        pass  # the mark then covers the set-up too, which ``setup_peak_excess_bytes`` reports


def run_variant(variant: str, chunk: int, opts: argparse.Namespace, out: Path) -> dict:
    """Build the inputs, measure one forward + backward, save the loss and gradient samples to ``out``."""
    from tadistill.objectives.chunked import chunked_logit_divergence
    from tadistill.objectives.logits import logit_divergence

    device, dtype = torch.device(opts.device), DTYPES[opts.dtype]
    generator = torch.Generator().manual_seed(0)
    n, d, v = opts.positions, opts.hidden, opts.vocab

    def linear() -> torch.nn.Linear:
        layer = torch.nn.Linear(d, v, dtype=dtype)
        with torch.no_grad():  # in place: no (V, d) temporary that could raise the set-up's peak
            layer.weight.normal_(0.0, d ** -0.5, generator=generator)
            layer.bias.zero_()
        return layer.to(device)

    student_head, teacher_head = linear(), linear()
    teacher_head.requires_grad_(False)
    student_hidden = torch.randn(1, n, d, generator=generator).to(device, dtype).requires_grad_(True)  # (1, N, d)
    teacher_hidden = torch.randn(1, n, d, generator=generator).to(device, dtype)  # (1, N, d)
    mask = torch.ones(1, n, dtype=torch.bool, device=device)  # (1, N): every position distilled

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        _reset_peak_resident()
        before, peak_before = _resident_bytes(), _peak_resident_bytes()

    if variant == "plain":
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)  # (1, N, V)
        loss = logit_divergence(student_head(student_hidden), teacher_logits, mask, kind="forward-kl")
    else:
        teacher_rows = teacher_hidden[mask]  # (N, d): small next to (N, V)
        loss = chunked_logit_divergence(student_hidden, student_head, lambda rows: teacher_head(teacher_rows[rows]),
                                        mask, chunk_size=chunk, kind="forward-kl")
    loss.backward()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        setup_peak_excess = 0
    else:
        peak = _peak_resident_bytes() - before
        setup_peak_excess = max(0, peak_before - before)  # > 0 would mean the set-up peaked above the baseline
    torch.save({
        "hidden_grad": student_hidden.grad.float().cpu(),  # (1, N, d)
        "weight_grad_rows": student_head.weight.grad[::64].float().cpu(),  # every 64th row of (V, d)
    }, out.with_suffix(".pt"))
    result = {"variant": variant, "chunk": chunk, "loss": float(loss.detach()), "peak_bytes": peak,
              "baseline_bytes": before, "setup_peak_excess_bytes": setup_peak_excess}
    out.write_text(json.dumps(result), encoding="utf-8")
    return result


# ------------------------------------------------------------------------------ parent: all variants


def measure(opts: argparse.Namespace) -> list[dict]:
    """Run each variant in its own process; return their results with gradient differences to plain."""
    variants = [("plain", 0)] + [("chunked", c) for c in opts.chunks]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    results = []
    with tempfile.TemporaryDirectory(prefix="tadistill-bench-") as tmp:
        for variant, chunk in variants:
            out = Path(tmp) / f"{variant}-{chunk}.json"
            command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--chunk", str(chunk),
                       "--result", str(out), "--vocab", str(opts.vocab), "--positions", str(opts.positions),
                       "--hidden", str(opts.hidden), "--device", opts.device, "--dtype", opts.dtype]
            began = time.perf_counter()
            subprocess.run(command, check=True, env=env)
            seconds = time.perf_counter() - began
            result = json.loads(out.read_text(encoding="utf-8"))
            result["grads"] = torch.load(out.with_suffix(".pt"))
            result["process_seconds"] = round(seconds, 1)
            results.append(result)
    reference = results[0]["grads"]
    for r in results:
        r["loss_rel_diff"] = abs(r["loss"] - results[0]["loss"]) / max(abs(results[0]["loss"]), 1e-12)
        grads = r.pop("grads")
        for key in ("hidden_grad", "weight_grad_rows"):  # max abs difference relative to the largest entry
            diff = (grads[key] - reference[key]).abs().max() / reference[key].abs().max().clamp_min(1e-30)
            r[f"{key}_rel_diff"] = float(diff)
    return results


def figures(results: list[dict], opts: argparse.Namespace) -> list[Figure]:
    plain = results[0]
    full_logits = opts.positions * opts.vocab * torch.finfo(DTYPES[opts.dtype]).bits // 8
    how = "CUDA max_memory_allocated" if opts.device.startswith("cuda") else "peak RSS growth, fresh process"
    out = []
    for r in results[1:]:
        tol = 1e-4 if opts.dtype == "float32" else 2e-2
        default = " (library default)" if r["chunk"] == default_chunk_size(opts.vocab) else ""
        grad_diff = max(r["hidden_grad_rel_diff"], r["weight_grad_rows_rel_diff"])
        agree = max(r["loss_rel_diff"], grad_diff) <= tol
        out.append(Figure(
            benchmark=NAME,
            what=f"peak memory fwd+bwd, chunked (chunk_size={r['chunk']}{default}) / plain, V={opts.vocab:,}, "
                 f"N={opts.positions:,}",
            ratio=r["peak_bytes"] / plain["peak_bytes"], target=TARGET, target_text="<= 1/8",
            details=(f"{r['peak_bytes'] / 2**20:,.0f} MiB vs {plain['peak_bytes'] / 2**20:,.0f} MiB ({how}; one "
                     f"(N, V) {opts.dtype} tensor is {full_logits / 2**20:,.0f} MiB); loss rel. diff "
                     f"{r['loss_rel_diff']:.1e}, grad rel. diff {grad_diff:.1e} ({'agree' if agree else 'DISAGREE'})"),
            extra={"chunked": r, "plain": plain, "losses_agree": agree, "tolerance": tol, "vocab": opts.vocab,
                   "positions": opts.positions, "hidden": opts.hidden, "dtype": opts.dtype, "device": opts.device,
                   "measure": how},
        ))
    return out


def parse(argv: list[str] | None = None, *, quick: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chunked_memory", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the default chunk size and one small one")
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--positions", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunks", type=int, nargs="+", default=None,
                   help="chunk sizes to measure (default: the library's default for --vocab, 1024 and 256; quick: "
                        "the library's default and 1024)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--child", choices=("plain", "chunked"), help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.quick = opts.quick or quick
    if opts.chunks is None:
        # The logits objective's default (2^24 / vocab rows: 130 at 128k) and the old fixed default of 1024.
        library = default_chunk_size(opts.vocab)
        opts.chunks = [library, 1024] if opts.quick else list(dict.fromkeys([library, 1024, 256]))
    opts.device = str(pick_device(opts.device))
    return opts


def run(argv: list[str] | None = None, *, quick: bool = False) -> list[Figure]:
    opts = parse(argv, quick=quick)
    return figures(measure(opts), opts)


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    if opts.child:
        run_variant(opts.child, opts.chunk, opts, opts.result)
        return 0
    for figure in figures(measure(opts), opts):
        print(figure.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
