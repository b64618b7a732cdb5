from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    socket_path: Path
    state_dir: Path
    log_path: Path
    capture_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


#: Every daemon a test started; killed at the end of the test if still running, so a failing test
#: leaves no process behind.
STARTED: list[DaemonProcess] = []


@pytest.fixture(autouse=True)
def _reap_daemons() -> Iterator[None]:
    yield
    while STARTED:
        d = STARTED.pop()
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def start_daemon(tmp: Path, backend: str = "memory", state_dir: Path | None = None,
                 extra_env: dict[str, str] | None = None, name: str = "d",
                 socket_name: str = "d", extra_args: list[str] | None = None) -> DaemonProcess:
    state_dir = state_dir or tmp / "state"
    sock = tmp / f"{socket_name}.sock"
    ready = tmp / f"{name}.ready"
    ready.unlink(missing_ok=True)
    log_path = tmp / f"{name}.log"
    capture = tmp / f"{name}.capture"
    env = dict(os.environ)
    env.update(extra_env or {})
    log_file = open(log_path, "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "ulog_disk", "--listen", f"unix:{sock}", "--backend", backend,
         "--state-dir", str(state_dir), "--ready-file", str(ready), "--capture", str(capture),
         *(extra_args or [])],
        stdout=log_file, stderr=log_file, env=env,
    )
    log_file.close()
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}: {log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"daemon not ready: {log_path.read_text()}")
        time.sleep(0.02)
    daemon = DaemonProcess(proc, sock, state_dir, log_path, capture)
    STARTED.append(daemon)
    return daemon


@pytest.fixture
def daemon(tmp_path: Path) -> DaemonProcess:
    return start_daemon(tmp_path)
