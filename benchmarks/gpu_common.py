"""What the GPU checks share: a result row, the time budget, and child processes killed whole on timeout.

Every check runs in a child process: a hung launch or an out-of-memory error ends that check only, its output
goes to the log, and the GPU's memory is free again for the next one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent


@dataclass
class Row:
    """One line of the results table: what was checked, the value found, the target it is held to, and whether
    it was met (None: nothing to meet, e.g. a measurement, or a check that did not run)."""

    phase: str
    check: str
    value: str
    target: str = ""
    met: bool | None = None
    details: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Budget:
    """Wall-clock seconds left of the whole script; each check gets at most its own cap of what is left."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def grant(self, cap: float) -> float:
        return max(0.0, min(cap, self.left()))


@dataclass
class Child:
    returncode: int | None  # None: killed at its timeout
    seconds: float
    tail: str  # the last lines of its output, for the table when it failed


def run_child(cmd: list[str], *, log: Path, timeout: float, env: dict[str, str] | None = None,
              cwd: Path = ROOT) -> Child:
    """Run ``cmd`` (its output appended to ``log``), in its own process group so that a timeout kills it and every
    process it started (accelerate launch, torchrun, the benchmarks' own children)."""
    began = time.monotonic()
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"\n$ {' '.join(cmd)}\n")
        handle.flush()
        start = handle.tell()
        proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    with log.open("r", encoding="utf-8", errors="replace") as handle:
        handle.seek(start)
        lines = handle.read().splitlines()
    tail = "\n".join(line for line in lines[-40:] if line.strip())
    seconds = time.monotonic() - began
    print(f"  {'timed out' if code is None else 'exit ' + str(code)} after {seconds:.0f} s: {' '.join(cmd[:6])} ...",
          flush=True)
    return Child(code, seconds, tail)


def last_error(tail: str) -> str:
    """The line of a child's output that names its error (a traceback's last line), shortened for a table cell."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error:" in line or "Exception" in line:
            return line[:300]
    return (lines[-1] if lines else "no output")[:300]


def python() -> list[str]:
    """This interpreter (the one gpu.sh chose), unbuffered, so that logs show progress as it happens."""
    return [sys.executable, "-u"]
