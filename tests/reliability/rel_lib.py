"""Helpers of the reliability tests (issue #7): the daemon as a process, a raw client, figures.

Not a conftest: ``tests/conftest.py`` is imported as the module ``conftest`` by other test files,
and a second conftest here would replace it. Test files here import this module by name.

Scale: every test reads its sizes through :func:`scale`, which gives the default-run value unless
``ULOG_REL_LONG=1`` (the long mode of ``tools/reliability/run.py``) or an explicit variable says
otherwise. Figures (counts, latencies, violations) go through :func:`figures`: printed, and appended
as JSON lines to ``$ULOG_REL_FIGURES`` when it is set, which is where the runner collects them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ulog_disk import wire
from ulog_disk.wire import Request, RequestType

LONG = os.environ.get("ULOG_REL_LONG") == "1"
CHECKOUT = Path(__file__).resolve().parents[2]


def scale(name: str, default: float, long: float) -> float:
    """``$name`` if set, else ``long`` in the long mode, else ``default``."""
    raw = os.environ.get(name)
    if raw:
        return type(default)(raw)
    return long if LONG else default


def figures(test: str, **values: object) -> None:
    """Print one line of figures and keep it for the long-mode runner."""
    line = {"test": test, "long": LONG, **values}
    print("FIGURES " + json.dumps(line, sort_keys=False), flush=True)
    target = os.environ.get("ULOG_REL_FIGURES")
    if target:
        with open(target, "a") as f:
            f.write(json.dumps(line) + "\n")


# --- the daemon as a process -------------------------------------------------------------------


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log_path: Path
    state_dir: Path
    socket_path: Path | None
    netns: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")


def daemon_command(*, state_dir: Path, listen: str, backend: str = "lmdb", ready: Path | None = None,
                   boot_id: str | None = None, extra_args: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "ulog_disk", "--listen", listen, "--backend", backend,
           "--state-dir", str(state_dir)]
    if ready is not None:
        cmd += ["--ready-file", str(ready)]
    if boot_id is not None:
        cmd += ["--boot-id", boot_id]
    return cmd + list(extra_args)


def launch(tmp: Path, *, state_dir: Path | None = None, listen: str | None = None, backend: str = "lmdb",
           name: str = "d", boot_id: str | None = "boot-1", netns: str | None = None,
           extra_args: Sequence[str] = (), preexec: Callable[[], None] | None = None,
           wait_ready: bool = True, ready_timeout: float = 30.0) -> Daemon:
    """Start dm-ulogd (unix transport at ``tmp/<name>.sock`` unless ``listen`` says otherwise)."""
    state_dir = state_dir or tmp / "state"
    sock = None
    if listen is None:
        sock = tmp / f"{name}.sock"
        listen = f"unix:{sock}"
    elif listen.startswith("unix:"):
        sock = Path(listen[5:])
    ready = tmp / f"{name}.ready"
    ready.unlink(missing_ok=True)
    log_path = tmp / f"{name}.log"
    cmd = daemon_command(state_dir=state_dir, listen=listen, backend=backend, ready=ready, boot_id=boot_id,
                         extra_args=extra_args)
    if netns is not None:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=log_file, cwd=CHECKOUT,
                                preexec_fn=preexec)  # noqa: PLW1509 - test helper, no threads yet
    d = Daemon(proc, log_path, state_dir, sock, netns)
    if not wait_ready:
        return d
    deadline = time.monotonic() + ready_timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"daemon not ready: {log_path.read_text()[-3000:]}")
        time.sleep(0.01)
    return d


@contextlib.contextmanager
def running(*args: object, **kwargs: object) -> Iterator[Daemon]:
    d = launch(*args, **kwargs)  # type: ignore[arg-type]
    try:
        yield d
    finally:
        if d.alive():
            d.kill9()


# --- a raw client: one request at a time, like one kernel thread --------------------------------


class DaemonGone(Exception):
    pass


class NoReply(Exception):
    pass


class Client:
    def __init__(self, path: Path, timeout: float = 20.0, connect_timeout: float = 10.0):
        deadline = time.monotonic() + connect_timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.connect(str(path))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        sock.settimeout(timeout)
        self.sock = sock
        self.seq = 0

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
        return self.seq

    def send_frame(self, frame: bytes) -> None:
        try:
            self.sock.send(frame)
        except OSError as exc:
            raise DaemonGone(str(exc)) from exc

    def recv_reply(self) -> wire.DecodedReply:
        try:
            data = self.sock.recv(65536)
        except TimeoutError as exc:
            raise NoReply("no reply within the timeout") from exc
        except OSError as exc:
            raise DaemonGone(str(exc)) from exc
        if not data:
            raise DaemonGone("EOF")
        return wire.decode_reply(data)

    def request(self, uuid: str, luid: int, rtype: int, data: bytes = b"") -> tuple[int, bytes]:
        seq = self.next_seq()
        self.send_frame(wire.encode_request(Request(luid=luid, uuid=uuid, version=3, seq=seq,
                                                    request_type=int(rtype), data=data, cn_seq=seq)))
        reply = self.recv_reply()
        if reply.seq != seq:
            raise AssertionError(f"reply seq {reply.seq} to request seq {seq}")
        return reply.error, reply.data

    def ok(self, uuid: str, luid: int, rtype: int, data: bytes = b"") -> bytes:
        error, out = self.request(uuid, luid, rtype, data)
        if error:
            raise AssertionError(f"{RequestType(rtype).name} uuid={uuid!r} luid={luid:#x}: error {error}")
        return out

    def bits(self, uuid: str, luid: int, regions: int) -> tuple[list[int], list[int]]:
        """(IS_CLEAN, IN_SYNC) of every region."""
        def ask(rtype: RequestType) -> list[int]:
            return [wire.parse_s64(self.ok(uuid, luid, rtype, wire.build_u64(r))) for r in range(regions)]

        return ask(RequestType.IS_CLEAN), ask(RequestType.IN_SYNC)

    def sync_count(self, uuid: str, luid: int) -> int:
        return wire.parse_u64(self.ok(uuid, luid, RequestType.GET_SYNC_COUNT))

    def status_info(self, uuid: str, luid: int) -> str:
        return self.ok(uuid, luid, RequestType.STATUS_INFO).rstrip(b"\0").decode()

    def close(self) -> None:
        self.sock.close()


def ctr_text(regions: int, region_size: int = 8, log_type: str = "clustered-core", dev: str = "7:3",
             extra: str = "") -> str:
    words = [str(regions * region_size), log_type]
    if "disk" in log_type:
        words.append(dev)
    words.append(str(region_size))
    if extra:
        words.append(extra)
    return " ".join(words)


def recover_tool() -> list[str] | None:
    """``ulog-recover`` if the package has it (another part of the project provides it)."""
    try:
        import importlib.util

        if importlib.util.find_spec("ulog_disk.tools.recover") is None:
            return None
    except ImportError:
        return None
    return [sys.executable, "-m", "ulog_disk.tools.recover"]


def run_verify(state_dir: Path, boot_id: str) -> subprocess.CompletedProcess[str] | None:
    """``ulog-recover verify`` of a state directory, or None when the tool is not there."""
    tool = recover_tool()
    if tool is None:
        return None
    return subprocess.run([*tool, "verify", "--state-dir", str(state_dir), "--boot-id", boot_id],
                          capture_output=True, text=True, timeout=120, cwd=CHECKOUT)


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]
