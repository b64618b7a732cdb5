"""dm-ulogd as a process: start it, wait until it is ready, stop or kill it, read its log.

Readiness is the daemon's ``--ready-file`` (written once it listens with its stores restored),
so a caller never races the socket's creation. Every daemon started is kept in :data:`STARTED`
so that a test harness can kill what a failing test left running (:func:`reap`).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log_path: Path
    state_dir: Path
    #: None when it listens on netlink.
    socket_path: Path | None
    #: Its ``--capture`` file, when it was started with one.
    capture_path: Path | None = None
    netns: str | None = None
    #: Seconds from ``Popen`` to the ready file: interpreter start, imports, store restore.
    start_seconds: float = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit status; one that does not exit in time is killed
        (so nothing is left behind) and the timeout raised."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def status(self) -> dict[str, int]:
        """The numeric fields of /proc/PID/status that are sizes, in bytes (VmRSS, VmHWM, ...)."""
        out: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                words = rest.split()
                if len(words) == 2 and words[1] == "kB":
                    out[key] = int(words[0]) * 1024
        return out

    def rss_kib(self) -> int:
        return self.status()["VmRSS"] // 1024

    def memory(self) -> dict[str, int]:
        """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of the daemon, in bytes."""
        sizes = self.status()
        return {k: sizes[k] for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem") if k in sizes}

    def threads(self) -> int:
        return thread_count(self.pid)

    def fds(self) -> int:
        return fd_count(self.pid)


#: Every daemon this process started, oldest first.
STARTED: list[Daemon] = []


def reap(keep: int = 0) -> None:
    """Kill every daemon started after the first ``keep`` of :data:`STARTED` that still runs."""
    while len(STARTED) > keep:
        STARTED.pop().kill9()


def daemon_command(*, state_dir: Path, listen: str, backend: str, ready: Path | None = None,
                   boot_id: str | None = None, capture: Path | None = None,
                   extra_args: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "ulog_disk", "--listen", listen, "--backend", backend,
           "--state-dir", str(state_dir)]
    if ready is not None:
        cmd += ["--ready-file", str(ready)]
    if boot_id is not None:
        cmd += ["--boot-id", boot_id]
    if capture is not None:
        cmd += ["--capture", str(capture)]
    return cmd + list(extra_args)


def launch(workdir: Path, *, backend: str = "memory", state_dir: Path | None = None, name: str = "d",
           listen: str | None = None, boot_id: str | None = None, capture: bool = False,
           env: Mapping[str, str] | None = None, extra_args: Sequence[str] = (), netns: str | None = None,
           preexec: Callable[[], None] | None = None, nofile: int | None = None, cwd: Path | None = None,
           wait_ready: bool = True, ready_timeout: float = 30.0, poll: float = 0.01) -> Daemon:
    """Start dm-ulogd with its files in ``workdir``: ``<name>.log`` (stdout and stderr, appended),
    ``<name>.ready``, ``<name>.capture`` with ``capture``, and unless ``listen`` says otherwise
    the socket ``<name>.sock``; the state directory defaults to ``workdir/state``.

    ``env``: variables added to this process's environment. ``netns``: run it in that network
    namespace (``ip netns exec``). ``nofile``: its soft RLIMIT_NOFILE (the daemon may raise it
    itself). ``poll``: how often the ready file is looked for (the benchmarks time the start).
    Raises RuntimeError, with the end of the log, when it exits or is not ready in time."""
    workdir.mkdir(parents=True, exist_ok=True)
    state_dir = state_dir or workdir / "state"
    sock = None
    if listen is None:
        sock = workdir / f"{name}.sock"
        listen = f"unix:{sock}"
    elif listen.startswith("unix:"):
        sock = Path(listen[5:])
    ready = workdir / f"{name}.ready"
    ready.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    capture_path = workdir / f"{name}.capture" if capture else None
    cmd = daemon_command(state_dir=state_dir, listen=listen, backend=backend, ready=ready, boot_id=boot_id,
                         capture=capture_path, extra_args=extra_args)
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    if nofile is not None:
        if preexec is not None:
            raise ValueError("nofile and preexec together")
        preexec = lambda: soft_nofile_limit(nofile)  # noqa: E731
    child_env = None if env is None else {**os.environ, **env}
    with open(log_path, "ab") as log_file:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=log_file, env=child_env, cwd=cwd,
                                preexec_fn=preexec)  # noqa: PLW1509 - the caller has no threads to fork under
    d = Daemon(proc, log_path, state_dir, sock, capture_path, netns)
    STARTED.append(d)
    if not wait_ready:
        return d
    deadline = t0 + ready_timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"dm-ulogd exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if time.perf_counter() > deadline:
            d.kill9()
            raise RuntimeError(f"dm-ulogd not ready after {ready_timeout} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(poll)
    d.start_seconds = time.perf_counter() - t0
    return d


@contextlib.contextmanager
def running(workdir: Path, **kwargs: object) -> Iterator[Daemon]:
    """:func:`launch`, killed with -9 on the way out if it still runs."""
    d = launch(workdir, **kwargs)  # type: ignore[arg-type]
    try:
        yield d
    finally:
        d.kill9()


def soft_nofile_limit(soft: int) -> None:
    """Set this process's soft RLIMIT_NOFILE to ``soft`` (at most the hard limit); for preexec_fn."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = soft if hard == resource.RLIM_INFINITY else min(soft, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def thread_count(pid: int) -> int:
    """Threads of a process (entries of /proc/PID/task)."""
    return len(os.listdir(f"/proc/{pid}/task"))


def fd_count(pid: int) -> int:
    """Open descriptors of a process (entries of /proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))
