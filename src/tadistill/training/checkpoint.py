"""Checkpoints: written atomically, verified before use, read without unpickling anything.

``checkpoints/step-N/`` holds::

    model.safetensors, model_1...       the weights of every prepared model (safetensors)
    optimizer.safetensors, optimizer_1  optimizer state as a state tree (statefile.py: tensors + JSON)
    custom_0.safetensors ...            objects registered with ``register_for_checkpointing`` (state trees)
    scaler.safetensors                  the fp16 GradScaler, when there is one
    extra_<rank>.safetensors            each process's own state (``extra``: the loop's RNG streams, lanes ...)
    trainer_state.json, config.yaml     the step reached and the resolved config
    manifest.json                       size and sha256 of every other file: written last

Everything is written to ``checkpoints/.step-N.tmp`` and renamed to ``step-N`` when the manifest is
on disk, so a process killed at any point leaves the previous checkpoints as they were. On resume
the newest checkpoint whose files match their manifest and load is used; a damaged one is skipped
with a warning on stderr naming it and the reason, and the one before is tried.

Nothing is read through pickle: weights through safetensors, everything else as state trees.
Accelerate's own files (``random_states_N.pkl``, ``custom_checkpoint_N.pkl``, ``optimizer.bin``) are
not written, and not read if someone puts them there. The exception is a sharded model (FSDP,
DeepSpeed), whose parts only Accelerate knows how to write and gather: there ``save_state`` /
``load_state`` are used, after the manifest check (untested without GPUs, like the rest of that path).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.utils import reduce as reduce_across
from safetensors.torch import load_model, save_model

from tadistill.errors import RunDirError
from tadistill.fileio import apply_umask, atomic_write_text, fsync_path, is_disk_full, is_io_failure, sha256_of
from tadistill.training.rundir import CONFIG_FILE
from tadistill.training.statefile import StateFileError, load_tree, save_tree

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
FORMAT = 2  # 1: Accelerate's save_state folders (pickles), which are no longer read
_NAME = re.compile(r"^step-(\d+)$")
_SHARDED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used (its message is the reason, for the fallback warning)."""


def _reached(point: str, step: int) -> None:
    """A named point of ``save_checkpoint`` (main process; ``extra``: every process): nothing happens here.

    tests/test_crash.py kills the process at each one in turn (and while a file is half written) to show
    that ``--resume`` always recovers."""


# ---------------------------------------------------------------------------------------- listing


def checkpoint_dirs(folder: Path) -> list[Path]:
    """Checkpoints under ``folder`` by name (complete or not), oldest first; temporary folders are ignored."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> str | None:
    """None when every file of ``path`` matches its manifest; otherwise the reason, in a few words."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError
    except FileNotFoundError:
        return f"it has no {MANIFEST} (written by an older tadistill, or damaged)"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is damaged"
    if (m := _NAME.match(path.name)) and manifest.get("step") != int(m.group(1)):
        return f"its {MANIFEST} is for another step"
    for name, info in sorted(files.items()):
        file = path / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            return f"its {MANIFEST} names a file outside it"
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if not isinstance(info, dict) or size != info.get("size"):
            expected = info.get("size") if isinstance(info, dict) else "?"
            return f"{name} is truncated ({size} of {expected} bytes)" if isinstance(expected, int) and \
                size < expected else f"{name} has {size} bytes, not {expected}"
        if sha256_of(file) != info.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def _warn(accelerator: Accelerator, message: str) -> None:
    if accelerator.is_main_process:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def latest_checkpoint(folder: Path, accelerator: Accelerator | None = None) -> Path | None:
    """The newest checkpoint that passes ``verify_checkpoint`` (skipped ones are named on stderr).

    None when there is none at all; RunDirError when there are checkpoints but none is intact.
    """
    dirs = checkpoint_dirs(folder)
    reasons = []
    for path in reversed(dirs):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        reasons.append(f"{path.name}: {reason}")
        if accelerator is None or accelerator.is_main_process:
            print(f"warning: skipped checkpoint {path}: {reason}; trying the one before", file=sys.stderr)
    if dirs:
        raise _none_usable(folder, reasons)
    return None


def _none_usable(folder: Path, reasons: list[str]) -> RunDirError:
    shown = "; ".join(reasons[:2]) + (" ..." if len(reasons) > 2 else "")
    return RunDirError(f"cannot resume: no checkpoint in {folder} is usable ({shown}); start again with "
                       "--overwrite or choose another --out")


# ----------------------------------------------------------------------------------------- saving


def _suffix(i: int) -> str:
    return f"_{i}" if i else ""


def _all_ok(accelerator: Accelerator, ok: bool) -> bool:
    """Whether every process got here without an error (all then raise, or all go on: no one waits forever)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return float(reduce_across(flag, reduction="sum").item()) == 0.0


def _write_state(accelerator: Accelerator, tmp: Path, extra: dict, step: int) -> None:
    """Every process writes its share of the state into ``tmp``."""
    if accelerator.distributed_type in _SHARDED:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            for leftover in tmp.glob("random_states_*.pkl"):  # the RNG we restore travels in ``extra``
                leftover.unlink()
    elif accelerator.is_main_process:
        for i, model in enumerate(accelerator._models):
            save_model(accelerator.unwrap_model(model), str(tmp / f"model{_suffix(i)}.safetensors"))
            _reached(f"model{_suffix(i)}", step)
        for i, optimizer in enumerate(accelerator._optimizers):
            save_tree(optimizer.state_dict(), tmp / f"optimizer{_suffix(i)}.safetensors")
            _reached(f"optimizer{_suffix(i)}", step)
        for i, scheduler in enumerate(accelerator._schedulers):
            save_tree(scheduler.state_dict(), tmp / f"scheduler{_suffix(i)}.safetensors")
        for i, obj in enumerate(accelerator._custom_objects):
            save_tree(obj.state_dict(), tmp / f"custom_{i}.safetensors")
        if accelerator.scaler is not None:
            save_tree(accelerator.scaler.state_dict(), tmp / "scaler.safetensors")
    save_tree(extra, tmp / f"extra_{accelerator.process_index}.safetensors")
    _reached("extra", step)


def _write_manifest(tmp: Path, step: int) -> None:
    """Size and checksum of every file (each flushed to disk first); written last, itself atomically."""
    files = {}
    apply_umask(tmp)  # safetensors creates its files 0600: a run shared with a group must stay readable
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        fsync_path(file)
        files[file.relative_to(tmp).as_posix()] = {"size": file.stat().st_size, "sha256": sha256_of(file)}
    _reached("hashed", step)
    atomic_write_text(tmp / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
    fsync_path(tmp)


def _remove_leftovers(folder: Path) -> None:
    """Temporary folders of saves killed midway (the run's lock guarantees no other writer)."""
    for path in folder.glob(".step-*"):
        shutil.rmtree(path, ignore_errors=True)


def _publish(tmp: Path, final: Path, folder: Path, keep: int, step: int) -> None:
    if final.exists():  # same step saved before (e.g. resumed and stopped again): move it aside, then replace
        aside = folder / f".{final.name}.old"
        os.replace(final, aside)
        _reached("moved-aside", step)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_path(folder)
    _reached("renamed", step)
    for old in checkpoint_dirs(folder)[:-keep]:
        # Renamed before deletion, so a kill halfway never leaves a half-deleted folder under a step-N name.
        aside = folder / f".{old.name}.old"
        try:
            os.replace(old, aside)
        except OSError:
            continue  # the new checkpoint is written: an old one left behind is removed next time
        _reached("pruning", step)
        shutil.rmtree(aside, ignore_errors=True)
    _reached("pruned", step)


def _write_error(folder: Path, step: int, exc: BaseException | None) -> RunDirError:
    previous = [p for p in checkpoint_dirs(folder) if p.name != f"step-{step:08d}"]
    kept = f"the previous checkpoint {previous[-1].name} is intact" if previous else "no earlier checkpoint exists"
    if exc is None:
        return RunDirError(f"another process failed to write checkpoint {step}; {kept}")
    if is_disk_full(exc):
        return RunDirError(f"no space left while writing checkpoint {step} in {folder}; {kept}: free some space "
                           "and continue with --resume")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc).splitlines() or ["?"])[0]
    return RunDirError(f"could not write checkpoint {step} in {folder} ({reason}); {kept}")


def save_checkpoint(
    accelerator: Accelerator, folder: Path, step: int, *, config_yaml: str, keep: int, extra: dict | None = None
) -> Path:
    """Save the full training state after ``step``; keep the newest ``keep`` checkpoints.

    ``extra`` is this process's own state (nested dicts / lists / tuples of str, int, float, bool, None
    and tensors), saved by every process and returned by ``restore_checkpoint`` on the same process.
    A failure (disk full) removes the partial checkpoint and raises one RunDirError on every process.
    """
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"
    main = accelerator.is_main_process
    error: BaseException | None = None
    if main:
        _reached("start", step)
    try:
        if main:
            folder.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(folder)
            tmp.mkdir()
            _reached("begin", step)
    except OSError as exc:
        error = exc
    if _all_ok(accelerator, error is None):
        try:
            _write_state(accelerator, tmp, extra or {}, step)
        except Exception as exc:  # noqa: BLE001  reported below, after every process knows
            error = exc
    if _all_ok(accelerator, error is None) and main:
        try:
            atomic_write_text(tmp / STATE_FILE, json.dumps({"step": step}))
            atomic_write_text(tmp / CONFIG_FILE, config_yaml)
            _reached("metadata", step)
            _write_manifest(tmp, step)
            _publish(tmp, final, folder, keep, step)
        except Exception as exc:  # noqa: BLE001
            error = exc
    if not _all_ok(accelerator, error is None):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None and not is_io_failure(error):
            raise error  # a bug (say, a value in ``extra`` that cannot be saved), not the disk's fault
        raise _write_error(folder, step, error) from None
    if main:
        _reached("end", step)
    return final


# ---------------------------------------------------------------------------------------- loading


def _read_step(path: Path) -> int:
    try:
        return int(json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["step"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{STATE_FILE} is missing or damaged") from None


def _tree(path: Path) -> object:
    try:
        return load_tree(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path.name} is missing") from None
    except StateFileError as exc:
        raise CheckpointError(str(exc)) from None


def _count(path: Path, stem: str) -> int:
    return sum(1 for p in path.iterdir() if re.fullmatch(rf"{stem}(_\d+)?\.safetensors", p.name))


def load_checkpoint(accelerator: Accelerator, path: Path) -> tuple[int, dict]:
    """Restore the state saved in ``path``; return the step it was taken after and this process's extra.

    Everything is read before anything is changed where it can be (state trees), so a damaged file
    usually leaves the live objects as they were; in any case a fallback to an older checkpoint
    overwrites them all again.
    """
    step = _read_step(path)
    extra = _tree(path / f"extra_{accelerator.process_index}.safetensors")
    if not isinstance(extra, dict):
        raise CheckpointError(f"extra_{accelerator.process_index}.safetensors holds no dict")
    if accelerator.distributed_type in _SHARDED:
        accelerator.load_state(str(path))
        return step, extra
    models, optimizers = accelerator._models, accelerator._optimizers
    if _count(path, "model") != len(models) or _count(path, "optimizer") != len(optimizers):
        raise CheckpointError(f"it holds {_count(path, 'model')} models and {_count(path, 'optimizer')} optimizers, "
                              f"the run has {len(models)} and {len(optimizers)}")
    trees = {
        "optimizer": [_tree(path / f"optimizer{_suffix(i)}.safetensors") for i in range(len(optimizers))],
        "scheduler": [_tree(path / f"scheduler{_suffix(i)}.safetensors") for i in range(len(accelerator._schedulers))],
        "custom": [_tree(path / f"custom_{i}.safetensors") for i in range(len(accelerator._custom_objects))],
        "scaler": [_tree(path / "scaler.safetensors")] if accelerator.scaler is not None else [],
    }
    for i, model in enumerate(models):
        load_model(accelerator.unwrap_model(model), str(path / f"model{_suffix(i)}.safetensors"), strict=True)
    for owner, state in [*zip(optimizers, trees["optimizer"]), *zip(accelerator._schedulers, trees["scheduler"]),
                         *zip(accelerator._custom_objects, trees["custom"]),
                         *zip([accelerator.scaler] if accelerator.scaler is not None else [], trees["scaler"])]:
        owner.load_state_dict(state)
    return step, extra


def restore_checkpoint(accelerator: Accelerator, folder: Path) -> tuple[Path, int, dict] | None:
    """Load the newest usable checkpoint under ``folder``: (its path, the step, this process's extra).

    A checkpoint whose files do not match its manifest, or that fails to load, is skipped with a
    warning line on stderr, and the one before it is tried. None when ``folder`` holds no checkpoint;
    RunDirError (one line) when it holds some but none is usable.
    """
    dirs = checkpoint_dirs(folder)
    reasons = []
    for path in reversed(dirs):
        reason = verify_checkpoint(path)
        if reason is None:
            try:
                step, extra = load_checkpoint(accelerator, path)
                return path, step, extra
            except Exception as exc:  # noqa: BLE001  any failure to read a damaged file means: try the one before
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                reason = f"it cannot be loaded ({first[:200]})"
        reasons.append(f"{path.name}: {reason}")
        _warn(accelerator, f"skipped checkpoint {path}: {reason}; trying the one before")
    if dirs:
        raise _none_usable(folder, reasons)
    return None
