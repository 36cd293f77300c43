"""tadistill's training step against a minimal hand-written PyTorch step doing the same math.

Two objectives on the built-in teacher (all-MiniLM-L6-v2, 6x384) and the built-in corpus, student 3x384:

* ``hs``: hidden-state MSE under the uniform mapping (student hidden state i <- teacher 2i), identity
  projections since the widths match;
* ``minilmv2``: MiniLMv2's Q-Q, K-K and V-V self-attention relation KL (Wang et al. 2021, eq. 1-3) between
  the last blocks, 12 relation heads.

tadistill's side is its real loop: ``Trainer.run()`` built the way ``tadistill.distill`` builds it (same
config from ``resolve_config``, same loaders). Its ``_step`` is wrapped so that each optimizer step of
tadistill is followed (or preceded, alternately) by one step of the minimal loop on the same batch, in the
same process: both see the same machine load. A tadistill step is timed as its ``_step`` (batch building,
teacher forward under inference_mode, student forward / backward, loss, clipping, AdamW, schedule) plus what
``run()`` does between two steps (logging, progress, checks), so nothing of the real loop is left out.

The minimal loop is plain PyTorch written here: ``output_hidden_states`` for ``hs``; for ``minilmv2``
forward hooks on the last block's query / key / value projections and the relation KL written from the
paper's formula. Same student weights at the start, same batches, same dropout draws (the lane's random
state is copied in), same AdamW groups (no weight decay on biases and norms), clipping and linear schedule:
its losses must follow tadistill's, which the benchmark checks. The minimal loop gets its batch already
built (outside its timing), tadistill builds its own inside the step: a small edge for the minimal loop.

Run alone: ``python benchmarks/minimal_loop.py [--quick] [--batch-size 32 --seq-len 128 --steps 50]``.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

if __package__:  # imported as benchmarks.minimal_loop
    from .common import (
        Figure,
        Stopwatch,
        cores_text,
        default_precision,
        median,
        pick_device,
        print_figures,
        single_lane_trainer,
        sync,
    )
else:  # run as a script, or imported by run.py with benchmarks/ on sys.path
    from common import (
        Figure,
        Stopwatch,
        cores_text,
        default_precision,
        median,
        pick_device,
        print_figures,
        single_lane_trainer,
        sync,
    )

NAME = "minimal_loop"
HOW = ("tadistill's Trainer.run() and a plain-PyTorch loop train the same student from the same weights on the same "
       "batches, their steps alternating in one process; a tadistill step is its _step plus run()'s bookkeeping "
       "until the next step; median after warm-up.")
TARGET = 1.05
OBJECTIVES = ("hs", "minilmv2")
RELATION_HEADS = 12


# ------------------------------------------------------------------------------------- minimal loop


def uniform_pairs(num_student: int, num_teacher: int) -> list[tuple[int, int]]:
    """Student hidden state i (1-based) <- teacher hidden state i * L_T / L_S (the 'uniform' mapping)."""
    step = num_teacher // num_student
    return [(i, i * step) for i in range(1, num_student + 1)]


def hidden_mse(student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], mask: Tensor,
               pairs: list[tuple[int, int]]) -> Tensor:
    """Sum over mapped layers of MSE(h_S, h_T): mean over the width, mean over valid tokens."""
    valid = mask.float()  # (B, T)
    total = torch.zeros((), device=mask.device)
    for s, t in pairs:
        error = (student[s].float() - teacher[t].float()).square().mean(dim=-1)  # (B, T)
        total = total + (error * valid).sum()
    return total / valid.sum().clamp_min(1)


def relation_logits(x: Tensor, heads: int) -> Tensor:
    """(B, T, d) -> (B, A_r, T, T): x_a x_a^T / sqrt(d_r) per relation head a (MiniLMv2 eq. 1)."""
    b, t, d = x.shape
    x_a = x.float().view(b, t, heads, d // heads).transpose(1, 2)  # (B, A_r, T, d_r)
    return x_a @ x_a.transpose(-1, -2) / math.sqrt(d // heads)


def relation_kl(student: Tensor, teacher: Tensor, mask: Tensor, heads: int) -> Tensor:
    """Sum over valid query rows of mean_a KL(R_T[a, t, :] || R_S[a, t, :]) (MiniLMv2 eq. 2)."""
    # A large finite negative instead of -inf at padded keys: 0 * (x - y) stays 0, never NaN.
    blocked = ~mask[:, None, None, :]  # (B, 1, 1, T)
    lowest = torch.finfo(torch.float32).min
    log_s = relation_logits(student, heads).masked_fill(blocked, lowest).log_softmax(dim=-1)
    with torch.no_grad():
        log_t = relation_logits(teacher, heads).masked_fill(blocked, lowest).log_softmax(dim=-1)
    per_row = (log_t.exp() * (log_t - log_s)).sum(dim=-1).mean(dim=1)  # (B, T)
    return (per_row * mask.float()).sum()


class QKV:
    """Forward hooks on one BERT block's query / key / value projections: their last outputs, (B, T, d)."""

    def __init__(self, block: nn.Module):
        self.out: dict[str, Tensor] = {}
        attention = block.attention.self
        self.handles = [getattr(attention, name).register_forward_hook(self._keep(name))
                        for name in ("query", "key", "value")]

    def _keep(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self.out[name] = output

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class MinimalLoop:
    """One optimizer step in plain PyTorch: teacher under inference_mode, student forward / backward,
    loss, clipping, AdamW, linear schedule."""

    def __init__(self, objective: str, teacher: nn.Module, student: nn.Module, *, lr: float, weight_decay: float,
                 betas: tuple[float, float], eps: float, max_grad_norm: float | None, steps: int, warmup: int,
                 precision: str, device: torch.device):
        self.objective, self.device = objective, device
        # Under bf16 (fp16 on GPUs) the frozen teacher is stored in that dtype, as tadistill's Trainer does.
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16 if device.type == "cuda" else None}.get(precision)
        self.teacher = teacher.to(device, dtype=dtype).eval().requires_grad_(False)
        self.student = student.to(device).train()
        self.max_grad_norm = max_grad_norm
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                         else torch.autocast(device.type, dtype=torch.float16) if precision == "fp16" else None)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
            lr=lr, betas=betas, eps=eps,
        )

        def linear(k: int) -> float:  # warmup, then linear decay to 0 at the last step
            return k / max(1, warmup) if k < warmup else max(0.0, (steps - k) / max(1, steps - warmup))

        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear)
        n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
        self.pairs = uniform_pairs(n_s, n_t)
        if objective == "minilmv2":
            self.t_qkv = QKV(self.teacher.encoder.layer[-1])
            self.s_qkv = QKV(self.student.encoder.layer[-1])

    def _cast(self):
        return self.autocast if self.autocast is not None else nullcontext()

    def step(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.bool()  # (B, T)
        hidden = self.objective == "hs"
        with torch.inference_mode(), self._cast():
            t_out = self.teacher(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden)
        with self._cast():
            s_out = self.student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden)
        if hidden:
            loss = hidden_mse(s_out.hidden_states, t_out.hidden_states, mask, self.pairs)
        else:
            loss = sum(relation_kl(self.s_qkv.out[r], self.t_qkv.out[r], mask, RELATION_HEADS)
                       for r in ("query", "key", "value")) / mask.sum().clamp_min(1)
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


# --------------------------------------------------------------------------------------- tadistill


def build_tadistill(objective: str, opts: argparse.Namespace, out: str, extra: tuple[str, ...] = ()):
    """The config, Trainer and lane that ``tadistill.distill`` would build for this run (same calls as api._run);
    ``extra``: more ``--set`` overrides (peers_textbrewer's run from stored teacher signals)."""
    from tadistill import resolve_config

    overrides = [
        "student.num_layers=3", f"train.steps={opts.warmup + opts.steps + 1}", f"train.batch_size={opts.batch_size}",
        f"data.max_length={opts.seq_len}", f"train.precision='{opts.precision}'", "train.eval_every=0",
        "train.eval_batches=1", "train.save_every=0",
    ]
    if objective == "hs":
        overrides.append("objectives.hidden.mapping=uniform")
    else:
        overrides.append(f"objectives.minilmv2.relation_heads={RELATION_HEADS}")
    config = resolve_config(objective, overrides=[*overrides, *extra])
    trainer, lane = single_lane_trainer(config, out)
    return config, trainer, lane


def _copy_rng(state: dict) -> dict:
    return {k: (v.clone() if isinstance(v, Tensor) else [x.clone() for x in v]) for k, v in state.items()}


def _set_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def interleave(trainer, lane, times, other_step: Callable[[int, dict], None],
               before: Callable[[int], None] | None = None) -> None:
    """Wrap ``trainer._step`` so that another loop's step runs beside each tadistill step, never at the same time.

    ``other_step(step, rng)`` runs before tadistill's even steps and after its odd ones (so that neither side is
    always first), with ``rng`` the lane's random state at the start of the step (the same dropout draws).
    tadistill's ``_step`` time goes to ``times.tadistill_step_only``, the time ``run()`` spent since the
    previous step to ``times.gaps`` and the step's loss to ``times.tadistill_loss``; ``finish_times`` adds them
    up after ``run()``. ``before(step)`` runs first, outside both timings.
    """
    device = trainer.acc.device
    real_step = trainer._step
    last_return: list[float] = []  # when the previous wrapped step handed control back to run()

    def alternating(step: int, t_cap):
        outside = time.perf_counter() - last_return[-1] if last_return else 0.0
        if before is not None:
            before(step)
        rng = _copy_rng(lane.rng)
        if step % 2 == 0:
            other_step(step, rng)
        sync(device)
        began = time.perf_counter()
        result = real_step(step, t_cap)
        sync(device)
        inside = time.perf_counter() - began
        if step % 2 == 1:
            other_step(step, rng)
        times.tadistill_step_only.append(inside)
        times.gaps.append(outside)
        rows = result[0]
        times.tadistill_loss.append(rows["student"]["loss"] if "student" in rows else float("nan"))
        last_return.append(time.perf_counter())
        return result

    trainer._step = alternating  # an instance attribute: run() calls it for every step


def finish_times(times) -> None:
    """tadistill's step = its ``_step`` + run()'s bookkeeping after it, seen when the next step starts.

    The last step has none (the final evaluation and checkpoint come instead) and is left out of the statistics.
    """
    times.tadistill = [s + g for s, g in zip(times.tadistill_step_only, times.gaps[1:] + [0.0])]


@dataclass
class StepTimes:
    tadistill: list[float] = field(default_factory=list)  # _step + run()'s bookkeeping after it
    tadistill_step_only: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # time spent in run() before each step (0 before the first)
    minimal: list[float] = field(default_factory=list)
    tadistill_loss: list[float] = field(default_factory=list)
    minimal_loss: list[float] = field(default_factory=list)
    elsewhere: float | None = None  # cores other processes kept busy meanwhile (common.Stopwatch)


def measure(objective: str, opts: argparse.Namespace) -> StepTimes:
    """Train tadistill and the minimal loop side by side, alternating their steps; per-step times and losses."""
    from transformers import AutoModel

    from tadistill.loading import load_pretrained

    times = StepTimes()
    with tempfile.TemporaryDirectory(prefix="tadistill-bench-") as out:
        config, trainer, lane = build_tadistill(objective, opts, out)
        device = trainer.acc.device
        if objective == "hs":  # the minimal loop's mapping must be the one tadistill trains
            pairs = uniform_pairs(lane.student_arch.num_layers, trainer.teacher_arch.num_layers)
            assert list(lane.terms[0].pairs) == [(s, (t,)) for s, t in pairs], lane.terms[0].pairs
        # The minimal loop's own models: a fresh teacher, and a student with the same initial weights.
        student = AutoModel.from_config(lane.student.config)
        student.load_state_dict(lane.student.state_dict())
        tc = config.train
        minimal = MinimalLoop(
            objective, load_pretrained("builtin"), student, lr=tc.lr, weight_decay=tc.weight_decay,
            betas=tc.adam_betas, eps=tc.adam_eps, max_grad_norm=tc.max_grad_norm, steps=tc.steps,
            warmup=max(tc.warmup_steps, int(tc.warmup_ratio * tc.steps)), precision=tc.precision, device=device,
        )
        def minimal_step(step: int, rng: dict) -> None:
            batch = trainer._micro_batches(step)[0].variants[False]  # the very batch tadistill trains on
            _set_rng(rng)  # the lane's dropout stream: same draws as tadistill's student
            sync(device)
            began = time.perf_counter()
            loss = minimal.step(batch["input_ids"], batch["attention_mask"])
            sync(device)
            times.minimal.append(time.perf_counter() - began)
            times.minimal_loss.append(float(loss))

        interleave(trainer, lane, times, minimal_step)
        with Stopwatch() as sw:
            trainer.run()
        times.elsewhere = sw.elsewhere
        if objective == "minilmv2":
            minimal.t_qkv.remove()
            minimal.s_qkv.remove()
    finish_times(times)
    return times


def figures(objective: str, times: StepTimes, opts: argparse.Namespace) -> Figure:
    w = opts.warmup
    real, real_only, mini = times.tadistill[w:-1], times.tadistill_step_only[w:-1], times.minimal[w:-1]
    ratio = median(real) / median(mini)
    t_loss, m_loss = times.tadistill_loss[-1], times.minimal_loss[-1]
    loss_gap = abs(t_loss - m_loss) / max(abs(m_loss), 1e-12)
    label = {"hs": "hidden-state MSE (hs, uniform, 3x384)",
             "minilmv2": f"MiniLMv2 relations (minilmv2, {RELATION_HEADS} heads, 3x384)"}[objective]
    details = (f"median step {median(real) * 1e3:.0f} ms vs {median(mini) * 1e3:.0f} ms over {len(real)} steps "
               f"of {opts.batch_size}x{opts.seq_len} after {w} warm-up; final loss {t_loss:.4f} vs {m_loss:.4f} "
               f"(rel. diff {loss_gap:.1e}); other processes busy on {cores_text(times.elsewhere)} cores meanwhile")
    return Figure(
        benchmark=NAME, what=f"step time, tadistill / minimal loop: {label}", ratio=ratio, target=TARGET,
        target_text=f"<= {TARGET:.2f}", details=details,
        extra={
            "objective": objective, "batch_size": opts.batch_size, "seq_len": opts.seq_len,
            "precision": opts.precision, "warmup_steps": w, "measured_steps": len(real),
            "median_tadistill_s": median(real), "median_tadistill_step_only_s": median(real_only),
            "median_minimal_s": median(mini), "mean_ratio": sum(real) / sum(mini),
            "step_only_ratio": median(real_only) / median(mini),
            "tadistill_s": times.tadistill, "tadistill_step_only_s": times.tadistill_step_only,
            "minimal_s": times.minimal, "tadistill_loss": times.tadistill_loss, "minimal_loss": times.minimal_loss,
            "final_loss_rel_diff": loss_gap, "elsewhere_cores": times.elsewhere,
        },
    )


def parse(argv: list[str] | None = None, *, quick: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="minimal_loop", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    p.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3, quick 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 16, quick 6)")
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default=None,
                   help="tadistill's train.precision for both loops (default: bf16 on CUDA, else no)")
    opts = p.parse_args(argv)
    opts.quick = opts.quick or quick
    opts.warmup = opts.warmup if opts.warmup is not None else (2 if opts.quick else 3)
    opts.steps = opts.steps if opts.steps is not None else (6 if opts.quick else 16)
    if opts.precision is None:
        opts.precision = default_precision(pick_device())
    return opts


def run(argv: list[str] | None = None, *, quick: bool = False) -> list[Figure]:
    opts = parse(argv, quick=quick)
    return [figures(objective, measure(objective, opts), opts) for objective in opts.objectives]


def main(argv: list[str] | None = None) -> int:
    return print_figures(run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
