"""What makes an ``--out`` folder tadistill's, and the rules that keep a user's folder safe.

- A run (``distill``, ``demo``) or a study (``compare``) is recognised by a marker file that only
  tadistill writes, ``.tadistill-run`` (JSON: format, kind, created), never by ``config.yaml`` or
  ``study.yaml``, which any folder may hold.
- ``--overwrite`` removes only the names tadistill writes into such a folder (``remove_contents``);
  the user's other files stay.
- One process at a time: ``hold_lock`` takes an exclusive, non-blocking ``flock`` on
  ``.tadistill-lock`` inside the folder for the whole run; a second process is refused with the PID
  of the holder. The lock file is never in the removable names, so an ``--overwrite`` by the holder
  keeps it.
- ``check_out_path`` refuses a path that cannot become a folder (a file, a dangling symlink, a path
  under a file, no write permission) before any work is done.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tadistill.errors import RunDirError
from tadistill.fileio import atomic_write_text, is_temporary

MARKER = ".tadistill-run"
LOCK = ".tadistill-lock"
FORMAT = 1
KINDS = ("run", "study")

# Folders this process holds the lock of (resolved path -> depth): a run that opens its own folder
# again (a stage of a chained run, the API called from a callback) does not lock itself out.
_HELD: dict[str, int] = {}


# ------------------------------------------------------------------------------------------ marker


def read_marker(root: Path) -> dict[str, Any] | None:
    """The marker of ``root``, or None when it has none; a damaged marker is refused in one line."""
    path = root / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        marker = None
    if not isinstance(marker, dict) or marker.get("kind") not in KINDS:
        raise RunDirError(f"{path} is damaged (not a tadistill marker): delete the folder yourself or choose "
                          "another --out")
    return marker


def write_marker(root: Path, kind: str) -> None:
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_text(root / MARKER, json.dumps({"format": FORMAT, "kind": kind, "created": created}) + "\n")


def user_entries(root: Path) -> list[str]:
    """Names in ``root`` besides the lock file (an empty folder with only our lock counts as empty)."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name != LOCK)


def remove_contents(root: Path, names: Iterable[str]) -> None:
    """Delete ``names`` (files or folders tadistill wrote) and our temporary files from ``root``; nothing else.

    The marker is removed last, so a removal killed halfway leaves a folder that is still recognised
    as ours and can be overwritten again.
    """
    names = [n for n in names if n != MARKER]
    for entry in root.iterdir():
        temporary = is_temporary(entry.name) and any(entry.name[1:].startswith(f"{n}.") for n in names)
        ours = entry.name in names or temporary
        if not ours:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (root / MARKER).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- out path


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # no permission to look
        return False


def check_out_path(root: Path) -> None:
    """Refuse an ``--out`` that cannot be a folder of ours, before anything is computed or created."""
    if root.is_symlink() and not _exists(root):
        raise RunDirError(f"--out {root} is a symbolic link to {os.readlink(root)}, which does not exist: "
                          "remove the link or choose another directory")
    if _exists(root) and not root.is_dir():
        raise RunDirError(f"--out {root} is a file: choose a directory")
    existing = root
    while not _exists(existing):
        parent = existing.parent
        if existing.is_symlink():
            raise RunDirError(f"--out {root}: {existing} is a symbolic link to {os.readlink(existing)}, which does "
                              "not exist: choose another directory")
        if parent == existing:
            break
        existing = parent
    if not existing.is_dir():
        raise RunDirError(f"--out {root}: {existing} is a file, not a folder: choose another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"--out {root}: no permission to write in {existing}: choose another directory")


# -------------------------------------------------------------------------------------------- lock


def _holder(fd: int) -> str:
    text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdigit() else "a process that is just starting"


def _acquire(path: Path, root: Path, what: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunDirError(f"{root} is in use by another tadistill {what} ({holder}): wait for it to end or "
                              "choose another --out") from None
        except OSError as exc:  # a filesystem without flock (some network mounts): go on, unprotected
            print(f"warning: cannot lock {root} ({exc.strerror}); do not start a second run in it",
                  file=sys.stderr)
            return fd
        # The previous holder deletes the file on release: if it did so between our open and our lock,
        # we locked a file nobody else will see, so start again with the file that is there now.
        try:
            current = os.stat(path)
            mine = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextmanager
def hold_lock(root: str | Path, *, what: str = "run") -> Iterator[None]:
    """Hold ``root`` for this process until the block ends; raise RunDirError naming the holder if taken.

    Works before ``root`` exists: the folder is created to hold the lock file, and removed again on
    release (with the parents created for it) if nothing else was written into it, so a run refused
    after taking the lock leaves nothing behind. Under several processes of one launch (torchrun,
    accelerate launch: ``RANK`` is set) only rank 0 takes it; the others work under its lock.
    """
    root = Path(root)
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        yield
        return
    check_out_path(root)
    key = os.path.realpath(root)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    created = []
    for folder in (root, *root.parents):
        if _exists(folder):
            break
        created.append(folder)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"--out {root}: cannot create it ({exc.strerror}): choose another directory") from None
    path = root / LOCK
    fd = _acquire(path, root, what)
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        path.unlink(missing_ok=True)  # while still holding it: see _acquire
        os.close(fd)
        for folder in created:  # deepest first; stops at the first folder that has content
            try:
                folder.rmdir()
            except OSError:
                break
