"""The state directory and its lock.

``<state dir>/lock`` is held with an exclusive ``flock`` by dm-ulogd for its whole run and by a
tool that changes the stores (``ulog-recover resync``, ``purge``…) for its whole command; the
file holds the holder's pid, so whoever finds it taken can say by whom. One definition for both:
the daemon refuses to start on a directory a tool is changing, and the reverse.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

#: Where dm-ulogd and the tools look when no --state-dir is given.
DEFAULT_STATE_DIR = "/var/lib/ulog-disk"
LOCK_NAME = "lock"
DIR_MODE = 0o700


def prepare(path: Path) -> None:
    """Create the state directory (0700, whatever the umask) if it is not there."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)


def lock_holder(path: Path) -> int | None:
    """The pid written in a lock file, if any."""
    try:
        text = path.read_text(errors="replace").strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None


class StateDirLock:
    """The exclusive ``flock`` on ``<state dir>/lock``, taken without waiting."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> bool:
        """True if taken (our pid is written in the file); False if someone holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return True

    def holder(self) -> int | None:
        return lock_holder(self.path)

    def release(self) -> None:
        """Let go (the pid is taken out of the file first: nobody holds it any more)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None
