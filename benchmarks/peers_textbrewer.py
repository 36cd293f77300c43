"""tadistill against TextBrewer (GeneralDistiller) for hidden-state transfer: tokens per second and peak memory.

Both libraries distil the built-in teacher (all-MiniLM-L6-v2, 6x384) into the same 3x384 student, on the
same batches, with the same loss and the same optimizer. What is equal, exactly:

* **models**: the teacher loaded by ``tadistill.loading.load_pretrained("builtin")`` (one copy per library,
  float32); the student that tadistill builds for recipe ``hs`` (``student.num_layers=3``), and for TextBrewer
  a copy of it with the same initial weights (``AutoModel.from_config`` + ``load_state_dict``).
* **batches**: the batches tadistill's Trainer trains on (built-in corpus, packed, 8 x 128 tokens by default),
  taken from ``Trainer._micro_batches(step)``, input ids and attention mask; TextBrewer gets them as a list
  of CPU tensors that it moves to the device itself (no DataLoader: no worker or collation cost on its side,
  while tadistill collates its batch inside its step). The packed corpus gives full rows: no padding.
* **loss**: hidden-state MSE under the uniform mapping, student hidden state i <- teacher hidden state 2i for
  i = 1..3 (index 0 = embeddings, not matched), no projection (the widths match), weight 1 each, summed over
  the three pairs. TextBrewer: ``intermediate_matches`` with ``loss='hidden_mse'`` and ``inputs_mask`` from the
  adaptor, i.e. sum(mask * (h_S - h_T)^2) / (valid tokens * width); tadistill's ``hidden`` term: sum over
  valid tokens of mean_d (h_S - h_T)^2, divided by the valid tokens of the step. The same number. The
  adaptors return no ``logits``, so TextBrewer computes no KD loss (no hard-label loss either).
* **optimizer**: AdamW with tadistill's groups (weight decay on matrices, none on biases and norms), lr,
  betas, eps; gradient clipping at ``train.max_grad_norm`` over the student's parameters (TextBrewer's
  ``max_grad_norm``); the same linear schedule (``transformers.get_linear_schedule_with_warmup``, which
  tadistill's ``get_scheduler("linear")`` is) over the same number of steps.
* **dropout**: TextBrewer's student draws its dropout from the lane's random stream as tadistill's does (the
  lane's state is copied into torch's generator before TextBrewer's first step), so the two students see
  the same dropout masks and their losses can be compared step by step: in float32 they must agree at every
  step to 1e-4 relative (measured: 1e-7 over 20 steps); under bf16 only the first step is held to 1e-2.
* **precision**: float32 by default on every device: TextBrewer's only mixed precision is fp16 through NVIDIA
  apex. ``--precision bf16`` runs TextBrewer's ``train()`` under ``torch.autocast(bfloat16)`` (its teacher stays
  float32) and tadistill with ``train.precision=bf16`` (its teacher stored in bf16, as it does).

**Speed.** Both loops run in one process with their steps alternating, so that both see the same machine
load: TextBrewer's ``GeneralDistiller.train(num_steps=...)`` runs on a thread of its own and is held at each
request for its next batch; tadistill's real ``Trainer.run()`` (built the way ``tadistill.distill`` builds it,
as in ``minimal_loop``) has its ``_step`` wrapped so that one TextBrewer step runs after (odd steps) or before
(even steps) each tadistill step, never at the same time. A step of either library is the time from the start
of one step to the start of the next: for tadistill its ``_step`` (batch building, teacher forward,
student forward / backward, loss, clipping, AdamW, schedule) plus what ``run()`` does until the next step
(logging, checks); for TextBrewer the time from handing out batch k to its request for batch k + 1 (teacher
and student forward, adaptors, loss, ``write_loss``, backward, clipping, AdamW, schedule, its logging). The
last step of each is left out (then come tadistill's final evaluation and checkpoint, TextBrewer's
checkpoint). Figure: median tadistill step / median TextBrewer step after warm-up (target <= 1/1.3, i.e.
tadistill at least 1.3x the tokens per second); tokens per second of each (valid tokens, i.e. attention
mask ones, per step; the same batches, so the same count on both sides) are in the details.

**Memory.** Each library runs alone in a fresh process (tadistill, then TextBrewer), a few steps on the same
batches. CUDA: growth of ``torch.cuda.max_memory_allocated`` (reset at the start of the first step) over what
was allocated then. CPU: growth of the peak resident set (VmHWM from /proc/self/status, reset at the start
of the first step) over the resident set at that point, with glibc serving every allocation over 1 MiB by
mmap (``MALLOC_MMAP_THRESHOLD_``), so that freed tensors leave the resident set at once (as in
``chunked_memory``). The peak is read at the start of the last step: it covers the first steps whole
(activations, gradients, AdamW's state created at the first step). Both processes hold the models and the
batches before that point, and both have run one no-grad forward of teacher and student: tadistill's
Trainer in its evaluation at step 0, and TextBrewer's process on its first batch (in eval mode) before
``train()`` (without it the lazily made buffers of a first forward, ~60 MiB on a CPU, would count against
TextBrewer only). So the figure is what training costs beyond holding models and data; the processes'
absolute peaks are in the details too (tadistill's also holds its corpus and run directory).

**From stored teacher signals.** A third measurement replaces tadistill's live teacher by the files of
``tadistill cache-teacher`` (``tadistill.api.cache_teacher`` on the same config, float16, its wall time
measured: the one-off caching, one teacher forward per training and held-out sequence), on the first
``--cached-texts`` texts of the built-in corpus so that caching takes seconds, against TextBrewer with its
live teacher on that corpus, steps alternating as above. Figures: the step-time ratio, and the time of one
epoch including the caching against one epoch of TextBrewer, with the number of epochs (of one run, or
summed over the runs that reuse the files) from which caching pays: caching time / (steps an epoch x
(TextBrewer step - cached step)). The losses agree at step 1 to float16's precision.

Run alone: ``python benchmarks/peers_textbrewer.py [--quick] [--batch-size 32 --seq-len 128 --steps 50]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

if __package__:  # imported as benchmarks.peers_textbrewer
    from .common import (
        Figure,
        Stopwatch,
        cores_text,
        median,
        pick_device,
        print_figures,
        quiet_transformers,
        sync,
        torch_threads,
    )
    from .minimal_loop import (
        _copy_rng,
        _set_rng,
        build_tadistill,
        finish_times,
        interleave,
        uniform_pairs,
    )
else:  # run as a script, or imported by run.py with benchmarks/ on sys.path
    from common import (
        Figure,
        Stopwatch,
        cores_text,
        median,
        pick_device,
        print_figures,
        quiet_transformers,
        sync,
        torch_threads,
    )
    from minimal_loop import (
        _copy_rng,
        _set_rng,
        build_tadistill,
        finish_times,
        interleave,
        uniform_pairs,
    )

NAME = "peers_textbrewer"
HOW = ("tadistill's Trainer.run() and TextBrewer's GeneralDistiller.train() distil the same student from the same "
       "weights on the same batches with the same hidden-state MSE and AdamW, their steps alternating in one process "
       "(TextBrewer on a thread held between steps); a step is start to start of the next; median after warm-up. "
       "Peak memory: each library alone in a fresh process, growth over the first steps (CUDA max_memory_allocated, "
       "else peak RSS with mmap-served allocations).")
SPEEDUP = 1.3
TARGET_TIME = 1 / SPEEDUP
TARGET_MEMORY = 1.0
MMAP_THRESHOLD = 1 << 20
ARMS = ("tadistill", "textbrewer")


# ------------------------------------------------------------------------------------- shared pieces


@contextmanager
def on_device(device: torch.device):
    """Make accelerate (tadistill's Trainer) use ``device``: it picks CUDA when there is one unless told."""
    if device.type != "cpu" or not torch.cuda.is_available():
        yield
        return
    before = os.environ.get("ACCELERATE_USE_CPU")
    os.environ["ACCELERATE_USE_CPU"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = before


def tadistill_opts(opts: argparse.Namespace, steps: int) -> argparse.Namespace:
    """The flags ``minimal_loop.build_tadistill`` reads, for a run of ``steps`` optimizer steps."""
    return argparse.Namespace(warmup=0, steps=steps - 1, batch_size=opts.batch_size, seq_len=opts.seq_len,
                              precision=opts.precision)


def inputs_of(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """What both students and teachers are called with: input ids and attention mask, on the CPU."""
    return {"input_ids": batch["input_ids"].cpu(), "attention_mask": batch["attention_mask"].cpu()}


class _Stopped(Exception):
    """Raised inside TextBrewer's loop (from its batch feed) to end it early when the driver gives up."""


class Feed:
    """The "dataloader" TextBrewer is given: the prepared batches, in order.

    ``before(k)`` runs when TextBrewer asks for batch k (0-based), i.e. when its previous step has ended.
    TextBrewer trains with ``num_steps`` and cycles over its dataloader; it is given exactly that many
    batches and never asks for one more.
    """

    def __init__(self, batches: list[dict[str, Tensor]], before):
        self.batches, self.before = batches, before

    def __iter__(self):
        for k, batch in enumerate(self.batches):
            self.before(k)
            yield batch
        raise RuntimeError("TextBrewer asked for more batches than steps")


class TextBrewerRun:
    """TextBrewer's GeneralDistiller set up to do tadistill's math (see the module docstring).

    By default the hidden-state MSE of this module; other benchmarks pass their own ``matches`` (TextBrewer's
    ``intermediate_matches``), adaptors of teacher and student, and ``forward_args`` (what TextBrewer passes to
    both models' forward; by default ``output_hidden_states=True``).
    """

    def __init__(self, teacher, student, batches: list[dict[str, Tensor]], train_cfg, *, steps: int,
                 device: torch.device, precision: str, out_dir: str, before, matches: list[dict] | None = None,
                 adaptors=None, forward_args: dict | None = None):
        import textbrewer
        from transformers import get_linear_schedule_with_warmup

        class RecordingDistiller(textbrewer.GeneralDistiller):
            """GeneralDistiller, keeping the total loss it hands to ``write_loss`` every step."""

            def write_loss(self, total_loss, writer_step, losses_dict=None):
                self.losses.append(float(total_loss.detach()))
                super().write_loss(total_loss, writer_step, losses_dict)

        self.device, self.precision, self.steps = device, precision, steps
        self.teacher, self.student = teacher.to(device), student.to(device)  # TextBrewer does not move models
        self.pairs = uniform_pairs(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        tc = train_cfg
        if matches is None:
            matches = [{"layer_T": t, "layer_S": s, "feature": "hidden", "loss": "hidden_mse", "weight": 1}
                       for s, t in self.pairs]
        distill_config = textbrewer.DistillationConfig(kd_loss_weight=0.0, hard_label_weight=0.0,
                                                       intermediate_matches=matches)
        # No tensorboard (log_dir None); the only checkpoint is written after the last step (ckpt_steps = steps).
        train_config = textbrewer.TrainingConfig(device=device, output_dir=out_dir, log_dir=None, ckpt_steps=steps)

        def adaptor(batch, outputs):
            return {"hidden": outputs.hidden_states, "inputs_mask": batch["attention_mask"]}

        adaptor_t, adaptor_s = adaptors or (adaptor, adaptor)
        self.forward_args = {"output_hidden_states": True} if forward_args is None else forward_args
        self.distiller = RecordingDistiller(train_config, distill_config, self.teacher, self.student, adaptor_t,
                                           adaptor_s)
        self.distiller.losses = []
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
            lr=tc.lr, betas=tc.adam_betas, eps=tc.adam_eps,
        )
        self.schedule_args = {"num_warmup_steps": max(tc.warmup_steps, int(tc.warmup_ratio * steps)),
                              "num_training_steps": steps}
        self.scheduler_class = get_linear_schedule_with_warmup
        self.max_grad_norm = tc.max_grad_norm or -1.0
        self.feed = Feed(batches, before)

    def _cast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()

    def forward_once(self) -> None:
        """One no-grad forward of both models on the first batch in eval mode, as tadistill's evaluation at step 0
        does before its first step: both memory runs then enter their first step with the same lazily made
        buffers (without it TextBrewer's first step pays ~60 MiB of them, which the figure would count)."""
        batch = {k: v.to(self.device) for k, v in self.feed.batches[0].items()}
        self.teacher.eval()
        self.student.eval()
        with torch.no_grad(), self._cast():
            self.teacher(**batch)
            self.student(**batch)
        self.student.train()

    @property
    def losses(self) -> list[float]:
        return self.distiller.losses

    def train(self) -> None:
        """TextBrewer's whole loop (call from the thread that should run it: autocast is per thread)."""
        with self._cast(), self.distiller:  # the distiller as a context: teacher in eval mode, student in train mode
            self.distiller.train(self.optimizer, self.feed, num_steps=self.steps, scheduler_class=self.scheduler_class,
                                 scheduler_args=self.schedule_args, max_grad_norm=self.max_grad_norm,
                                 **self.forward_args)


class Lockstep:
    """Runs a TextBrewerRun on its own thread, one step per ``one_step()`` call, never beside the caller."""

    def __init__(self, make_run):
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.times: list[float] = []  # TextBrewer's step k: batch k handed out -> batch k + 1 asked for
        self.start_rng: dict | None = None  # the random state its first step starts from (the lane's)
        self.error: BaseException | None = None
        self.finished = self.stopping = False
        self._began = 0.0
        self.run = make_run(self._before)
        self.thread = threading.Thread(target=self._main, name="textbrewer", daemon=True)

    def _before(self, k: int) -> None:
        sync(self.run.device)
        if k > 0:
            self.times.append(time.perf_counter() - self._began)
        self.done.release()  # step k - 1 (or the set-up) is over: the driver goes on
        self.go.acquire()  # wait for the driver's next one_step()
        if self.stopping:
            raise _Stopped
        if k == 0 and self.start_rng is not None:
            _set_rng(self.start_rng)
        sync(self.run.device)
        self._began = time.perf_counter()

    def _main(self) -> None:
        try:
            self.run.train()
        except _Stopped:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the driver, raised there
            self.error = exc
        finally:
            self.finished = True
            self.done.release()

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"TextBrewer failed: {type(self.error).__name__}: {self.error}") from self.error

    def start(self) -> None:
        """Start the thread and wait until TextBrewer has set up and asks for its first batch."""
        self.thread.start()
        self.done.acquire()
        self._check()

    def one_step(self) -> None:
        if self.finished:
            self._check()
            raise RuntimeError("TextBrewer's loop ended before the driver's last step")
        self.go.release()
        self.done.acquire()
        self._check()

    def stop(self) -> None:
        if self.thread.is_alive() and not self.finished:
            self.stopping = True
            self.go.release()
        self.thread.join(timeout=60)


# --------------------------------------------------------------------------------------------- speed


@dataclass
class Timing:
    tadistill: list[float] = field(default_factory=list)  # _step + run()'s bookkeeping until the next step
    tadistill_step_only: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    textbrewer: list[float] = field(default_factory=list)
    tadistill_loss: list[float] = field(default_factory=list)
    textbrewer_loss: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # valid tokens per step (the same batches on both sides)
    positions: int = 0  # batch_size x padded length of a step
    elsewhere: float | None = None
    device: str = ""
    student_weights_equal: bool = False


def student_copy(student):
    """A fresh module of the student's class and config with its weights (TextBrewer's student)."""
    from transformers import AutoModel

    copy = AutoModel.from_config(student.config)
    copy.load_state_dict(student.state_dict())
    return copy


def measure_speed(opts: argparse.Namespace, state_dir: Path | None, extra: tuple[str, ...] = ()) -> Timing:
    """Both libraries' steps, alternating in this process; saves TextBrewer's inputs for the memory run to
    ``state_dir`` (None: not saved). ``extra``: more overrides of tadistill's config (its cached arm)."""
    from tadistill.loading import load_pretrained

    steps = opts.warmup + opts.steps + 1
    timing = Timing()
    with tempfile.TemporaryDirectory(prefix="tadistill-bench-") as out, on_device(pick_device(opts.device)):
        config, trainer, lane = build_tadistill("hs", tadistill_opts(opts, steps), out, extra)
        device = trainer.acc.device
        timing.device = str(device)
        pairs = uniform_pairs(lane.student_arch.num_layers, trainer.teacher_arch.num_layers)
        assert list(lane.terms[0].pairs) == [(s, (t,)) for s, t in pairs], lane.terms[0].pairs
        batches = [inputs_of(trainer._micro_batches(k)[0].variants[False]) for k in range(1, steps + 1)]
        timing.tokens = [int(b["attention_mask"].sum()) for b in batches]
        timing.positions = batches[0]["input_ids"].numel()
        student = student_copy(lane.student)
        if state_dir is not None:
            # TextBrewer's inputs for its memory run in a fresh process: the student's config and initial weights.
            student.config.save_pretrained(state_dir)
            torch.save({"weights": student.state_dict(), "batches": batches, "rng": _copy_rng(lane.rng)},
                       state_dir / "inputs.pt")
        tb_out = Path(out) / "textbrewer"
        lockstep = Lockstep(lambda before: TextBrewerRun(
            load_pretrained("builtin"), student, batches, config.train, steps=steps, device=device,
            precision=opts.precision, out_dir=str(tb_out), before=before))
        def same_batch(step: int) -> None:  # outside both timings: TextBrewer is given tadistill's batches
            mine = trainer._micro_batches(step)[0].variants[False]
            assert torch.equal(mine["input_ids"].cpu(), batches[step - 1]["input_ids"]), step

        def textbrewer_step(step: int, rng: dict) -> None:
            if step == 1:
                lockstep.start_rng = rng  # TextBrewer's dropout stream: the lane's
            lockstep.one_step()

        interleave(trainer, lane, timing, textbrewer_step, before=same_batch)
        try:
            lockstep.start()
            timing.student_weights_equal = all(
                torch.equal(a.cpu(), b.cpu())
                for a, b in zip(lane.student.state_dict().values(), lockstep.run.student.state_dict().values()))
            with Stopwatch() as sw:
                trainer.run()
            timing.elsewhere = sw.elsewhere
        finally:
            lockstep.stop()
            trainer.restore_teacher()
        lockstep._check()
        timing.textbrewer = lockstep.times
        timing.textbrewer_loss = lockstep.run.losses
        timing.train_sequences = len(trainer.train_set)
    finish_times(timing)
    return timing


def measure_cached(opts: argparse.Namespace) -> tuple[Timing, dict]:
    """tadistill trained from ``cache-teacher`` files against TextBrewer with its live teacher, alternating.

    The corpus is cut to its first ``--cached-texts`` texts so that the one-off caching (one teacher forward
    per sequence, train and held-out, as ``tadistill cache-teacher`` runs it: ``tadistill.cache_teacher``) takes
    seconds; both arms then train on that corpus. Returns the timing and the caching's cost.
    """
    from tadistill import resolve_config
    from tadistill.api import cache_teacher

    steps = opts.warmup + opts.steps + 1
    corpus = (f"data.max_texts={opts.cached_texts}",)
    with tempfile.TemporaryDirectory(prefix="tadistill-bench-signals-") as tmp:
        signals = Path(tmp) / "signals"
        base = tadistill_opts(opts, steps)
        config = resolve_config("hs", overrides=[
            "student.num_layers=3", f"train.steps={steps}", f"train.batch_size={base.batch_size}",
            f"data.max_length={base.seq_len}", f"train.precision='{base.precision}'", "objectives.hidden.mapping=uniform",
            *corpus])
        with Stopwatch() as sw, on_device(pick_device(opts.device)):
            info = cache_teacher(config, out=signals, progress=False)
        caching = {"wall_s": sw.wall, "cpu_s": sw.cpu, "elsewhere_cores": sw.elsewhere,
                   "sequences": info["sequences"], "bytes_per_token": info["bytes_per_token"], "dtype": info["dtype"]}
        timing = measure_speed(opts, None, extra=(*corpus, f"teacher_signals={signals}"))
    return timing, caching

# -------------------------------------------------------------------------------------------- memory


def _resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_resident_bytes() -> int:
    """VmHWM: the high-water mark of the resident set (not ru_maxrss, which a child inherits from its parent)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS needs Linux")


def _reset_peak_resident() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """Peak memory between ``start()`` (start of the first step) and ``stop()`` (start of the last one)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.result: dict = {}

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline, self.reset = torch.cuda.memory_allocated(self.device), True
        else:
            self.setup_peak = _peak_resident_bytes()
            self.reset = _reset_peak_resident()
            self.baseline = _resident_bytes()

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak, setup_peak = torch.cuda.max_memory_allocated(self.device), None
            how = "CUDA max_memory_allocated"
        else:
            peak, setup_peak = _peak_resident_bytes(), self.setup_peak
            how = "peak RSS (VmHWM), allocations over 1 MiB served by mmap"
        self.result = {"growth_bytes": peak - self.baseline, "baseline_bytes": self.baseline, "peak_bytes": peak,
                       "setup_peak_bytes": setup_peak, "peak_reset": self.reset, "measure": how}


def memory_arm(arm: str, opts: argparse.Namespace) -> dict:
    """One library alone in this (fresh) process: a few steps, peak memory over all but the last."""
    steps = opts.memory_steps
    device = pick_device(opts.device)
    meter = PeakMeter(device)
    with tempfile.TemporaryDirectory(prefix="tadistill-bench-") as out:
        if arm == "tadistill":
            with on_device(device):
                _, trainer, _ = build_tadistill("hs", tadistill_opts(opts, steps), out)
            device = meter.device = trainer.acc.device
            real_step = trainer._step

            def metered(step: int, t_cap):
                if step == 1:
                    meter.start()
                if step == steps:
                    meter.stop()
                return real_step(step, t_cap)

            trainer._step = metered
            trainer.run()
        else:
            from transformers import AutoConfig, AutoModel

            from tadistill import resolve_config
            from tadistill.loading import load_pretrained

            state = torch.load(opts.state / "inputs.pt")
            student = AutoModel.from_config(AutoConfig.from_pretrained(opts.state))
            student.load_state_dict(state["weights"])
            batches = state["batches"][:steps]
            train_cfg = resolve_config("hs").train  # lr, AdamW settings, clipping: the recipe's

            def metered_feed(k: int) -> None:
                if k == 0:
                    meter.start()
                if k == steps - 1:
                    meter.stop()

            _set_rng(state["rng"])
            del state
            run = TextBrewerRun(load_pretrained("builtin"), student, batches, train_cfg, steps=steps, device=device,
                                precision=opts.precision, out_dir=str(Path(out) / "textbrewer"), before=metered_feed)
            run.forward_once()
            run.train()
    return {"arm": arm, "device": str(device), "steps": steps, **meter.result}


def measure_memory(opts: argparse.Namespace, state_dir: Path) -> dict[str, dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    results = {}
    for arm in ARMS:
        out = state_dir / f"memory-{arm}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--result", str(out),
                   "--state", str(state_dir), "--batch-size", str(opts.batch_size), "--seq-len", str(opts.seq_len),
                   "--precision", opts.precision, "--memory-steps", str(opts.memory_steps)]
        if opts.device:
            command += ["--device", opts.device]
        began = time.perf_counter()
        subprocess.run(command, check=True, env=env)
        results[arm] = json.loads(out.read_text(encoding="utf-8"))
        results[arm]["process_seconds"] = round(time.perf_counter() - began, 1)
    return results


# ------------------------------------------------------------------------------------------- figures


def figures(timing: Timing, memory: dict[str, dict], opts: argparse.Namespace) -> list[Figure]:
    w = opts.warmup
    td, td_only = timing.tadistill[w:-1], timing.tadistill_step_only[w:-1]
    tb = timing.textbrewer[w:]
    tokens = timing.tokens[w:w + len(td)]
    td_rate = median([k / t for k, t in zip(tokens, td)])
    tb_rate = median([k / t for k, t in zip(tokens, tb)])
    ratio = median(td) / median(tb)
    n = min(len(timing.tadistill_loss), len(timing.textbrewer_loss))
    gaps = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(timing.tadistill_loss[:n], timing.textbrewer_loss[:n])]
    first_gap, worst_gap = (gaps[0], max(gaps)) if gaps else (float("nan"), float("nan"))
    # float32: the same arithmetic up to summation order, every step must agree. bf16: the teachers differ (bf16
    # weights in tadistill, float32 weights under autocast in TextBrewer), so only the first step is held to a
    # (looser) tolerance; the updates then drift apart slowly.
    if opts.precision == "no":
        tol, judged = 1e-4, worst_gap
    else:
        tol, judged = 1e-2, first_gap
    agree = judged <= tol and n == opts.warmup + opts.steps + 1
    padding = 1 - sum(timing.tokens) / max(1, timing.positions * len(timing.tokens))
    label = f"hidden-state MSE (uniform, 3x384 from 6x384), {opts.batch_size}x{opts.seq_len}"
    speed = Figure(
        benchmark=NAME, what=f"step time, tadistill / TextBrewer GeneralDistiller: {label}", ratio=ratio,
        target=TARGET_TIME, target_text=f"<= 1/{SPEEDUP} ({TARGET_TIME:.3f})",
        details=(f"{td_rate:,.0f} vs {tb_rate:,.0f} tokens/s ({1 / ratio:.2f}x; target >= {SPEEDUP}x); median step "
                 f"{median(td) * 1e3:.0f} ms vs {median(tb) * 1e3:.0f} ms over {len(td)} steps after {w} warm-up, "
                 f"alternating in one process; losses {'agree' if agree else 'DISAGREE'}: step 1 "
                 f"{timing.tadistill_loss[0]:.4f} vs {timing.textbrewer_loss[0]:.4f}, rel. diff {first_gap:.1e} there "
                 f"and at most {worst_gap:.1e} over {n} steps; other processes busy on "
                 f"{cores_text(timing.elsewhere)} cores meanwhile; {opts.threads or 'default'} torch thread(s)"),
        extra={
            "batch_size": opts.batch_size, "seq_len": opts.seq_len, "precision": opts.precision,
            "device": timing.device, "warmup_steps": w, "measured_steps": len(td),
            "tokens_per_s_tadistill": td_rate, "tokens_per_s_textbrewer": tb_rate, "speedup": 1 / ratio,
            "median_tadistill_s": median(td), "median_tadistill_step_only_s": median(td_only),
            "median_textbrewer_s": median(tb), "mean_ratio": sum(td) / sum(tb),
            "tadistill_s": timing.tadistill, "tadistill_step_only_s": timing.tadistill_step_only,
            "textbrewer_s": timing.textbrewer, "tokens_per_step": timing.tokens, "padding_fraction": padding,
            "tadistill_loss": timing.tadistill_loss, "textbrewer_loss": timing.textbrewer_loss,
            "loss_rel_diff_first": first_gap, "loss_rel_diff_max": worst_gap, "losses_agree": agree,
            "loss_tolerance": tol, "loss_judged_on": "every step" if opts.precision == "no" else "step 1",
            "student_weights_equal": timing.student_weights_equal,
            "elsewhere_cores": timing.elsewhere,
        },
    )
    out = [speed]
    if memory:
        a, b = memory["tadistill"], memory["textbrewer"]
        mib = 2 ** 20
        out.append(Figure(
            benchmark=NAME, what=f"peak memory of training steps, tadistill / TextBrewer: {label}",
            ratio=a["growth_bytes"] / b["growth_bytes"], target=TARGET_MEMORY, target_text="<= 1.0",
            details=(f"{a['growth_bytes'] / mib:,.0f} MiB vs {b['growth_bytes'] / mib:,.0f} MiB over what each held "
                     f"at its first step ({a['measure']}; each alone in a fresh process, peak over its first "
                     f"{a['steps'] - 1} step{'s' if a['steps'] != 2 else ''}); "
                     f"absolute peak {a['peak_bytes'] / mib:,.0f} vs {b['peak_bytes'] / mib:,.0f} MiB"),
            extra={"tadistill": a, "textbrewer": b, "batch_size": opts.batch_size, "seq_len": opts.seq_len,
                   "precision": opts.precision},
        ))
    return out


def cached_figures(timing: Timing, caching: dict, live: Timing, opts: argparse.Namespace) -> list[Figure]:
    """Step time from stored signals / TextBrewer's live step; time including the caching, and its break-even."""
    w = opts.warmup
    cached, tb = median(timing.tadistill[w:-1]), median(timing.textbrewer[w:])
    live_td = median(live.tadistill[w:-1]) if live.tadistill else float("nan")
    n = min(len(timing.tadistill_loss), len(timing.textbrewer_loss))
    # The signals are stored in float16 (cache-teacher's default): the losses agree to float16's precision only.
    first_gap = abs(timing.tadistill_loss[0] - timing.textbrewer_loss[0]) / max(abs(timing.textbrewer_loss[0]), 1e-12)
    agree = first_gap <= 1e-2 and n == opts.warmup + opts.steps + 1
    per_epoch = -(-timing.train_sequences // opts.batch_size)  # optimizer steps of one epoch
    cost = caching["wall_s"]
    saved = tb - cached  # per step, against TextBrewer's live teacher
    epochs = cost / (per_epoch * saved) if saved > 0 else float("inf")
    epoch_ratio = (cost + per_epoch * cached) / (per_epoch * tb)
    label = (f"hidden-state MSE (uniform, 3x384 from 6x384), {opts.batch_size}x{opts.seq_len}, first "
             f"{opts.cached_texts} texts of the built-in corpus ({timing.train_sequences} training sequences, "
             f"{per_epoch} steps an epoch)")
    stored = sum(caching["sequences"].values())
    common = (f"caching {cost:.1f} s wall ({stored} sequences, training and held-out, "
              f"{caching['bytes_per_token']:.0f} bytes a token in {caching['dtype']}; other processes busy on "
              f"{cores_text(caching['elsewhere_cores'])} cores)")
    extra = {"caching": caching, "cached_step_s": cached, "textbrewer_step_s": tb, "live_tadistill_step_s": live_td,
             "steps_per_epoch": per_epoch, "break_even_epochs": epochs, "tadistill_s": timing.tadistill,
             "textbrewer_s": timing.textbrewer, "tadistill_loss": timing.tadistill_loss,
             "textbrewer_loss": timing.textbrewer_loss, "loss_rel_diff_first": first_gap, "losses_agree": agree,
             "elsewhere_cores": timing.elsewhere, "cached_texts": opts.cached_texts}
    pays = (f"caching pays after {epochs:.2f} epochs ({epochs * per_epoch:.0f} steps of this batch), in one run or "
            "summed over the runs that reuse the files" if saved > 0 else "caching never pays here")
    return [
        Figure(
            benchmark=NAME, what=f"step time, tadistill from cache-teacher files / TextBrewer with its live teacher: "
                                 f"{label}",
            ratio=cached / tb, target=TARGET_TIME, target_text=f"<= 1/{SPEEDUP} ({TARGET_TIME:.3f})",
            details=(f"median step {cached * 1e3:.0f} vs {tb * 1e3:.0f} ms ({tb / cached:.2f}x the tokens/s) over "
                     f"{len(timing.tadistill[w:-1])} steps after {w} warm-up, alternating in one process; tadistill "
                     f"with its live teacher: {live_td * 1e3:.0f} ms (the first speed run); losses "
                     f"{'agree' if agree else 'DISAGREE'} at step 1 to {first_gap:.1e} (float16 signals); other "
                     f"processes busy on {cores_text(timing.elsewhere)} cores; {opts.threads or 'default'} torch "
                     "thread(s)"),
            extra=extra,
        ),
        Figure(
            benchmark=NAME, what=f"time of one epoch including the one-off caching, tadistill from cache-teacher "
                                 f"files / TextBrewer with its live teacher: {label}",
            ratio=epoch_ratio, target=1.0, target_text="<= 1 (caching pays within one epoch)",
            details=f"{cost:.1f} s + {per_epoch} x {cached * 1e3:.0f} ms vs {per_epoch} x {tb * 1e3:.0f} ms; {common}; "
                    f"{pays}",
            extra=extra,
        ),
    ]


# ---------------------------------------------------------------------------------------------- entry


def parse(argv: list[str] | None = None, *, quick: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="peers_textbrewer", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3, quick 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 16, quick 6)")
    p.add_argument("--memory-steps", type=int, default=3,
                   help="steps of each memory run; the peak covers all but the last (default 3)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    p.add_argument("--no-cached", action="store_true", help="skip the run from stored teacher signals")
    p.add_argument("--cached-texts", type=int, default=1000,
                   help="texts of the built-in corpus the cached comparison caches and trains on (default 1000)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--precision", choices=("no", "bf16"), default="no",
                   help="no (float32, default: TextBrewer's mixed precision needs apex) or bf16 (autocast)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads of the speed runs (default 1: see common.torch_threads; 0 leaves "
                        "torch's setting)")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.quick = opts.quick or quick
    opts.warmup = opts.warmup if opts.warmup is not None else (2 if opts.quick else 3)
    opts.steps = opts.steps if opts.steps is not None else (6 if opts.quick else 16)
    if opts.memory_steps < 2:
        p.error("--memory-steps must be at least 2")
    return opts


def run(argv: list[str] | None = None, *, quick: bool = False) -> list[Figure]:
    opts = parse(argv, quick=quick)
    with tempfile.TemporaryDirectory(prefix="tadistill-bench-") as tmp:
        state_dir = Path(tmp)
        with torch_threads(opts.threads):
            timing = measure_speed(opts, state_dir)
        memory = {} if opts.no_memory else measure_memory(opts, state_dir)
    out = figures(timing, memory, opts)
    if not opts.no_cached:
        with torch_threads(opts.threads):
            cached = measure_cached(opts)
        out += cached_figures(*cached, timing, opts)
    return out


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    quiet_transformers()
    if opts.arm:
        result = memory_arm(opts.arm, opts)
        opts.result.write_text(json.dumps(result), encoding="utf-8")
        return 0
    return print_figures(run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
