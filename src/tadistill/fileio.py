"""Atomic file writes: readers see the old file or the new one, never half of one.

Used for everything tadistill writes that a crash must not corrupt: run configs, metrics rewrites,
checkpoint metadata and the tokenized-corpus cache. Files get the user's umask (``tempfile.mkstemp``
would make them 0600, so a run shared with a group would be unreadable to it).
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def _create_temporary(folder: Path, name: str) -> tuple[int, Path]:
    """A new file in ``folder`` that no other writer can have opened; mode 0666 less the umask."""
    while True:
        path = folder / f".{name[:32]}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success fsync it and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path.parent, path.name)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it (and put it back at once)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give files written by libraries that create them 0600 (safetensors does) the user's umask; folders too."""
    path = Path(path)
    mask = _umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if item.is_symlink():
            continue
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file left by ``atomic_open`` (a writer killed before its rename)."""
    return name.startswith(".") and name.endswith(".tmp")


def sha256_of(path: Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file or a folder's entries to disk (a folder's rename is durable only after this)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a folder; the rename is still atomic
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a library reports it in its own exception (safetensors: "os error 28")."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return any(f"os error {code})" in text for code in (errno.ENOSPC, errno.EDQUOT))


def is_io_failure(exc: BaseException) -> bool:
    """An operating-system failure to write (disk full, I/O error), as opposed to a bug in the caller."""
    return isinstance(exc, OSError) or is_disk_full(exc) or "I/O error" in str(exc)
