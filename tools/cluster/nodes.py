"""dm-ulogd in cluster mode on the corosync rig: one daemon per node, each listening on a unix
socket (the kernel model's transport), each node's kernel played by a client of its socket.

    daemons = ClusterDaemons(rig, Path("/tmp/x"))
    daemons.start_all()
    c1 = daemons.client("n1")
    ...
    daemons.kill("n2")          # SIGKILL of the daemon (a daemon crash)
    daemons.crash("n2")         # SIGKILL of the daemon and of corosync: the node is gone
    daemons.stop_all()

Used by tests/cluster (the contract tests and their oracle) and tools/bench (cluster metrics).
Every wait is on an event (a ready file, a reply, a log line) with a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from rig import Rig, RigError, pid_alive  # noqa: E402

from ulog_disk.protocol import wire  # noqa: E402
from ulog_disk.protocol.wire import RequestType as T  # noqa: E402
from ulog_disk.testing.client import Client, ctr_text  # noqa: E402

#: The daemon of the environment running this (the project's venv).
DAEMON = Path(sys.executable).parent / "dm-ulogd"
READY_TIMEOUT = 30.0


@dataclass
class NodeDaemon:
    name: str
    nodeid: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)
    boot_id: str = ""
    starts: int = 0

    @property
    def socket(self) -> Path:
        return self.directory / "sock"

    @property
    def state_dir(self) -> Path:
        return self.directory / "state"

    @property
    def log_path(self) -> Path:
        return self.directory / "daemon.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ClusterDaemons:
    def __init__(self, rig: Rig, base: Path, extra: Sequence[str] = ()) -> None:
        self.rig = rig
        self.base = Path(base)
        self.nodes = {
            n.name: NodeDaemon(
                n.name, n.nodeid, self.base / n.name, extra=list(extra), boot_id=f"boot-{n.name}-1"
            )
            for n in rig.nodes
        }
        self.clients: list[Client] = []

    def node(self, name: str) -> NodeDaemon:
        return self.nodes[name]

    def argv(self, d: NodeDaemon) -> list[str]:
        return [
            str(DAEMON),
            "--cluster",
            "corosync",
            "--listen",
            f"unix:{d.socket}",
            "--state-dir",
            str(d.state_dir),
            "--ready-file",
            str(d.directory / "ready"),
            "--boot-id",
            d.boot_id,
            *d.extra,
        ]

    def start(self, name: str, wait: bool = True, extra: Sequence[str] | None = None) -> NodeDaemon:
        d = self.nodes[name]
        if d.alive():
            raise RigError(f"the daemon of {name} is running")
        if extra is not None:
            d.extra = list(extra)
        d.directory.mkdir(parents=True, exist_ok=True)
        (d.directory / "ready").unlink(missing_ok=True)
        d.socket.unlink(missing_ok=True)
        out = open(d.log_path, "ab")  # noqa: SIM115 - the child keeps it
        out.write(f"--- start {d.starts + 1} ---\n".encode())
        out.flush()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        d.proc = self.rig.popen(
            name, self.argv(d), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)
        )
        out.close()
        d.starts += 1
        if wait:
            self.wait_ready(name)
        return d

    def wait_ready(self, name: str, timeout: float = READY_TIMEOUT) -> None:
        d = self.nodes[name]
        deadline = time.monotonic() + timeout
        while not (d.directory / "ready").exists():
            if d.proc is not None and d.proc.poll() is not None:
                raise RigError(f"the daemon of {name} exited {d.proc.returncode}:\n{d.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RigError(f"the daemon of {name} not ready after {timeout} s:\n{d.log_text()[-3000:]}")
            time.sleep(0.02)

    def wait_log(self, name: str, text: str, timeout: float = 30.0, after: int = 0) -> float:
        """Wait until the daemon's log (from byte ``after``) contains ``text``; seconds waited."""
        d = self.nodes[name]
        start = time.monotonic()
        while text not in d.log_text()[after:]:
            if time.monotonic() - start > timeout:
                raise RigError(f"{name}: {text!r} not logged within {timeout} s:\n{d.log_text()[-3000:]}")
            time.sleep(0.02)
        return time.monotonic() - start

    def log_size(self, name: str) -> int:
        return len(self.nodes[name].log_text())

    def start_all(self, names: Sequence[str] | None = None) -> None:
        names = list(names or self.nodes)
        for name in names:
            self.start(name, wait=False)
        for name in names:
            self.wait_ready(name)

    def client(self, name: str, timeout: float = 30.0) -> Client:
        c = Client(self.nodes[name].socket, timeout=timeout)
        self.clients.append(c)
        return c

    def kill(self, name: str) -> None:
        """SIGKILL of the daemon only (corosync goes on: the others see its process leave)."""
        d = self.nodes[name]
        if d.proc is not None and d.proc.poll() is None:
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(10)

    def crash(self, name: str) -> None:
        """The node is gone: its daemon and its corosync killed at once."""
        self.kill(name)
        self.rig.kill_corosync(name)

    def stop(self, name: str, timeout: float = 30.0) -> int:
        d = self.nodes[name]
        if d.proc is None or d.proc.poll() is not None:
            return d.proc.returncode if d.proc is not None else 0
        d.proc.send_signal(signal.SIGTERM)
        try:
            return d.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            return d.proc.wait(10)

    def stop_all(self) -> None:
        for c in self.clients:
            c.close()
        self.clients = []
        for name in self.nodes:
            self.stop(name)

    def reboot_id(self, name: str) -> str:
        """A new boot id for the node's next start: its host rebooted."""
        d = self.nodes[name]
        number = int(d.boot_id.rsplit("-", 1)[1]) + 1
        d.boot_id = f"boot-{name}-{number}"
        return d.boot_id


def pids_alive(daemons: ClusterDaemons) -> dict[str, bool]:
    return {n: d.proc is not None and pid_alive(d.proc.pid) for n, d in daemons.nodes.items()}


# --- a node's kernel, as far as the contract tests need it ------------------------------------------


def open_log(
    c: Client, uuid: str, luid: int, regions: int, log_type: str = "clustered-core", sync: str | None = None
) -> None:
    args = ctr_text(regions, log_type=log_type, extra=sync or "")
    c.ok(uuid, luid, T.CTR, args.encode() + b"\0")
    c.ok(uuid, luid, T.RESUME)


def flush_marks(
    c: Client, uuid: str, luid: int, marks: Sequence[int] = (), clears: Sequence[int] = ()
) -> None:
    for start in range(0, len(clears), 32):
        c.ok(uuid, luid, T.CLEAR_REGION, wire.build_regions(list(clears[start : start + 32])))
    c.ok(uuid, luid, T.FLUSH, wire.build_regions(list(marks)) if marks else b"")


def is_clean(c: Client, uuid: str, luid: int, region: int) -> bool:
    return bool(wire.parse_s64(c.ok(uuid, luid, T.IS_CLEAN, wire.build_u64(region))))


def in_sync(c: Client, uuid: str, luid: int, region: int) -> bool:
    return bool(wire.parse_s64(c.ok(uuid, luid, T.IN_SYNC, wire.build_u64(region))))


def remote_recovering(c: Client, uuid: str, luid: int, region: int) -> bool:
    data = c.ok(uuid, luid, T.IS_REMOTE_RECOVERING, wire.build_u64(region))
    return bool(int.from_bytes(data[:8], "little", signed=True))


def resync_work(c: Client, uuid: str, luid: int) -> int | None:
    data = c.ok(uuid, luid, T.GET_RESYNC_WORK)
    found = int.from_bytes(data[:8], "little", signed=True)
    return int.from_bytes(data[8:16], "little") if found else None


def set_region_sync(c: Client, uuid: str, luid: int, region: int, synced: bool = True) -> None:
    c.ok(
        uuid,
        luid,
        T.SET_REGION_SYNC,
        region.to_bytes(8, "little") + int(synced).to_bytes(8, "little", signed=True),
    )


def sync_count(c: Client, uuid: str, luid: int) -> int:
    return c.sync_count(uuid, luid)
