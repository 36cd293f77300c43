"""Checkpoints: written atomically, found again on --resume.

A checkpoint is Accelerate's own state folder (model and projection weights, optimizer, scheduler,
the RNG states of every process) plus ``trainer_state.json`` (the step reached) and a copy of the
resolved config. It is written to ``checkpoints/.step-N.tmp`` and renamed to ``checkpoints/step-N``
only when complete, so a run killed while saving keeps its previous checkpoint intact. Using
Accelerate's ``save_state`` rather than our own format means the same code saves sharded FSDP and
DeepSpeed states.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

from tadistill.fileio import atomic_write_text
from tadistill.training.rundir import CONFIG_FILE

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(folder: Path) -> list[Path]:
    """Complete checkpoints under ``folder``, oldest first (temporary folders are ignored)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    dirs = checkpoint_dirs(folder)
    return dirs[-1] if dirs else None


def save_checkpoint(
    accelerator: Accelerator, folder: Path, step: int, *, config_yaml: str, keep: int, extra: dict | None = None
) -> Path:
    """Save the full training state after ``step``; keep the newest ``keep`` checkpoints.

    ``extra`` is per-process state of our own (the lanes' random streams), saved by every process.
    """
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a run killed while saving
        folder.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save(extra or {}, tmp / f"extra_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / STATE_FILE, json.dumps({"step": step}))
        atomic_write_text(tmp / CONFIG_FILE, config_yaml)
        if final.exists():  # same step saved before (e.g. resumed and stopped again): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(folder)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[int, dict]:
    """Restore the state saved in ``path``; return the step it was taken after and this process's extra."""
    accelerator.load_state(str(path))
    step = int(json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["step"])
    extra = torch.load(path / f"extra_{accelerator.process_index}.pt", weights_only=True)
    return step, extra
