"""Preemption: SIGTERM / SIGINT end a run with a checkpoint instead of killing it mid-step.

Clusters send SIGTERM before they reclaim a node (SLURM, Kubernetes), and Ctrl-C sends SIGINT. While
the loop runs, both only set a flag; the loop finishes the current optimizer step, writes a checkpoint
and stops, and ``--resume`` continues exactly where it stopped. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from tadistill.errors import TadistillError

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(TadistillError):
    """The run stopped on a signal after writing a checkpoint; ``signum`` gives the exit status 128 + signum."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopSignals:
    """Context manager: SIGTERM and SIGINT set ``received`` (the signal number) instead of stopping the process.

    Handlers can only be installed from the main thread; elsewhere (a notebook worker thread) the
    context does nothing and signals keep their usual effect.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the checkpoint
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
