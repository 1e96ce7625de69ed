"""The one way this project replaces a file: written aside, flushed to disk, renamed over the target, and the
folder's entry flushed too. A reader (the server hot-reloading a model, a restarted server reading a split)
sees the old file or the new one, never a torn one, even when the writer is killed or the machine stops."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _process_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc, kernel 4.7 and later); else by
    setting and restoring it, once, at import, before the server starts threads that create files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# read once: os.umask can only be read by setting it, which for a moment lets any thread create world-writable files
UMASK = _process_umask()


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write to; when the block ends without an exception it becomes
    ``path`` (fsync, chmod ``mode`` less the umask, rename, fsync of the folder). On an exception (a full disk)
    the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode & ~UMASK)  # mkstemp's 0600 would hide it from a server running as another user
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def _fsync_folder(folder: Path) -> None:
    """The rename itself is durable only once the folder is flushed (not possible on every platform)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
