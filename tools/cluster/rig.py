"""A corosync cluster of N nodes on one machine: network namespaces, one corosync per node.

    python tools/cluster/rig.py up 3              # n1..n3 quorate, waits for it (bounded)
    python tools/cluster/rig.py status
    python tools/cluster/rig.py exec n2 corosync-quorumtool -s
    python tools/cluster/rig.py partition n3      # n3's cable out of the switch
    python tools/cluster/rig.py heal n3
    python tools/cluster/rig.py kill-corosync n2  # SIGKILL, then its /dev/shm/qb-* removed
    python tools/cluster/rig.py start-corosync n2
    python tools/cluster/rig.py down

Layout (everything under ``--dir``, default /tmp/ulog-rig):

* ``ns/``: a private bind mount of itself holding one file per network namespace (``sw`` and
  ``n1``..``nN``), each a bind mount of the namespace (``unshare --net=FILE``), entered with
  ``nsenter --net=FILE``. Not ``ip netns add``: that would leave names in the host's /run/netns.
* ``sw`` holds a bridge ``br0``; node ``nI`` has ``eth0`` = 10.213.0.I/24, a veth pair whose other
  end ``pI`` is a port of the bridge. Nothing is added to the root network namespace, and the
  addresses exist only inside these namespaces.
* ``nI/``: its corosync.conf, ``run/`` (bind-mounted on /run inside its corosync's own mount
  namespace, made by ``unshare -m``: corosync's pid file is the hard-coded /run/corosync.pid),
  ``state/`` (``system.state_dir``), ``corosync.log``. The IPC sockets of libqb are abstract unix
  sockets, which belong to the network namespace, so a client in ``nI`` talks to ``nI``'s corosync
  and no other.
* ``rig.json``: the node table and corosync pids, so that ``down`` works from another process.

knet transport without crypto, token 1000 ms, votequorum. Every wait is on an event (the
quorum tool's answer, a process's exit) with a deadline; no fixed sleeps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DIR = Path("/tmp/ulog-rig")
SUBNET = "10.213.0"
TOKEN_MS = 1000
#: How long a ring of fresh corosyncs may take to form and become quorate on a busy machine.
FORM_TIMEOUT = 30.0
POLL = 0.05


class RigError(RuntimeError):
    pass


def missing_tools() -> list[str]:
    """What the rig needs and this machine lacks (empty when it can run)."""
    return [t for t in ("unshare", "nsenter", "ip", "mount", "umount", "corosync",
                        "corosync-quorumtool") if shutil.which(t) is None]


def rig_verdict() -> tuple[str | None, str | None]:
    """(skip, fail) for a test of the rig: a reason to skip where the rig cannot exist (not root:
    network and mount namespaces; no unshare, nsenter, ip or mount), else a reason to fail where
    it lacks what ``bash tools/run.sh setup`` installs (corosync): a tier that silently skips tests
    nothing. (None, None): the rig can run."""
    if os.geteuid() != 0:
        return "the corosync rig needs root (it makes network and mount namespaces)", None
    missing = [t for t in ("unshare", "nsenter", "ip", "mount") if shutil.which(t) is None]
    if missing:
        return f"the corosync rig needs {', '.join(missing)} (util-linux, iproute2)", None
    missing = missing_tools()
    if missing:
        return None, f"missing {', '.join(missing)}: bash tools/run.sh setup installs corosync"
    return None, None


def run(argv: Sequence[str], check: bool = True, timeout: float = 20.0,
        **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise RigError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def corosync_conf(name: str, nodes: Sequence[Node], node_dir: Path, token_ms: int) -> str:
    entries = "\n".join(
        f"    node {{\n        ring0_addr: {n.addr}\n        nodeid: {n.nodeid}\n"
        f"        name: {n.name}\n    }}" for n in nodes)
    return f"""# written by tools/cluster/rig.py
totem {{
    version: 2
    cluster_name: {name}
    transport: knet
    token: {token_ms}
    crypto_cipher: none
    crypto_hash: none
}}
nodelist {{
{entries}
}}
quorum {{
    provider: corosync_votequorum
}}
logging {{
    to_logfile: yes
    logfile: {node_dir / "corosync.log"}
    to_stderr: no
    to_syslog: no
    timestamp: hires
}}
system {{
    state_dir: {node_dir / "state"}
    # no real-time scheduling: three corosyncs at SCHED_RR would starve a 2-core machine
    sched_rr: no
}}
"""


@dataclass
class Node:
    name: str
    nodeid: int
    addr: str
    pid: int | None = None          # its corosync's pid while it runs
    cut: bool = False               # its switch port is down (partition)


@dataclass
class Rig:
    base: Path = DEFAULT_DIR
    nodes: list[Node] = field(default_factory=list)
    cluster_name: str = "ulogrig"
    token_ms: int = TOKEN_MS
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    # --- paths and state ---

    @property
    def ns_dir(self) -> Path:
        return self.base / "ns"

    def ns(self, name: str) -> Path:
        return self.ns_dir / name

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise RigError(f"no node {name!r} (nodes: {', '.join(n.name for n in self.nodes)})")

    def node_dir(self, name: str) -> Path:
        return self.base / name

    def save(self) -> None:
        state = {"cluster_name": self.cluster_name, "token_ms": self.token_ms,
                 "nodes": [vars(n) for n in self.nodes]}
        tmp = self.base / "rig.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.base / "rig.json")

    @classmethod
    def load(cls, base: Path = DEFAULT_DIR) -> Rig:
        try:
            state = json.loads((base / "rig.json").read_text())
        except FileNotFoundError:
            raise RigError(f"no rig in {base} (run: rig.py up N)") from None
        return cls(base, [Node(**n) for n in state["nodes"]], state["cluster_name"],
                   state["token_ms"])

    # --- running things inside ---

    def argv(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside namespace ``name`` (a node, or ``sw``)."""
        return ["nsenter", f"--net={self.ns(name)}", "--", *argv]

    def exec(self, name: str, argv: Sequence[str], check: bool = True,
             timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        return run(self.argv(name, argv), check=check, timeout=timeout)

    def popen(self, name: str, argv: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(name, argv), **kw)  # type: ignore[call-overload]

    # --- up and down ---

    def up(self, count: int, wait: bool = True) -> None:
        if count < 1 or count > 200:
            raise RigError(f"a rig has 1 to 200 nodes, not {count}")
        if (self.base / "rig.json").exists():
            raise RigError(f"a rig is already up in {self.base} (rig.py down first)")
        self.base.mkdir(parents=True, exist_ok=True)
        self.nodes = [Node(f"n{i}", i, f"{SUBNET}.{i}") for i in range(1, count + 1)]
        self.save()   # before anything is made, so down() can undo a half-made rig
        try:
            self._make_namespaces()
            self._make_network()
            for n in self.nodes:
                d = self.node_dir(n.name)
                for sub in ("run", "state"):
                    (d / sub).mkdir(parents=True, exist_ok=True)
                (d / "corosync.conf").write_text(
                    corosync_conf(self.cluster_name, self.nodes, d, self.token_ms))
            for n in self.nodes:
                self.start_corosync(n.name, wait=False)
            if wait:
                self.wait_quorate([n.name for n in self.nodes], True, members=count,
                                  timeout=FORM_TIMEOUT)
        except BaseException:
            self.down()
            raise

    def _make_namespaces(self) -> None:
        self.ns_dir.mkdir(parents=True, exist_ok=True)
        # Like ip-netns: the namespace files live on a private mount, so their bind mounts neither
        # propagate anywhere nor receive anything.
        run(["mount", "--bind", str(self.ns_dir), str(self.ns_dir)])
        run(["mount", "--make-private", str(self.ns_dir)])
        for name in ["sw", *(n.name for n in self.nodes)]:
            self.ns(name).touch()
            run(["unshare", f"--net={self.ns(name)}", "true"])

    def _make_network(self) -> None:
        sw = str(self.ns("sw"))
        self.exec("sw", ["ip", "link", "set", "lo", "up"])
        self.exec("sw", ["ip", "link", "add", "br0", "type", "bridge", "stp_state", "0",
                         "forward_delay", "0"])
        self.exec("sw", ["ip", "link", "set", "br0", "up"])
        for n in self.nodes:
            port = f"p{n.nodeid}"
            self.exec(n.name, ["ip", "link", "set", "lo", "up"])
            self.exec(n.name, ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", port,
                               "netns", sw])
            self.exec(n.name, ["ip", "addr", "add", f"{n.addr}/24", "dev", "eth0"])
            self.exec(n.name, ["ip", "link", "set", "eth0", "up"])
            self.exec("sw", ["ip", "link", "set", port, "master", "br0", "up"])

    def down(self) -> None:
        """Kill every corosync, remove the namespaces and the rig's files. Safe on a half-made
        rig and on one already down."""
        for n in self.nodes:
            with contextlib.suppress(RigError):
                self.kill_corosync(n.name)
        if self.ns_dir.exists():
            for f in sorted(self.ns_dir.iterdir()):
                run(["umount", str(f)], check=False)
            run(["umount", str(self.ns_dir)], check=False)
        shutil.rmtree(self.base, ignore_errors=True)

    # --- corosync ---

    def start_corosync(self, name: str, wait: bool = True, timeout: float = FORM_TIMEOUT) -> int:
        n = self.node(name)
        if n.pid is not None and pid_alive(n.pid):
            raise RigError(f"{name}: corosync already runs (pid {n.pid})")
        d = self.node_dir(name)
        out = open(d / "corosync.out", "ab")  # noqa: SIM115 - handed to the child
        script = 'mount --bind "$1" /run && exec corosync -f -c "$2"'
        # nsenter, unshare and sh all exec: the Popen's pid is corosync's own.
        proc = self.popen(name, ["unshare", "-m", "--propagation", "private", "sh", "-c", script,
                                 "sh", str(d / "run"), str(d / "corosync.conf")],
                          stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                          start_new_session=True)
        out.close()
        self._procs[name] = proc
        n.pid = proc.pid
        self.save()
        if wait:
            self.wait_connectable(name, timeout)
        return proc.pid

    def kill_corosync(self, name: str, timeout: float = 10.0) -> None:
        """SIGKILL this node's corosync, wait for it to be gone, remove the shared-memory files it
        leaves behind (libqb's /dev/shm/qb-<pid>-*: a crashed corosync cannot unlink them)."""
        n = self.node(name)
        if n.pid is None:
            return
        pid = n.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        proc = self._procs.pop(name, None)
        if proc is not None:
            proc.wait(timeout)
        else:
            wait_gone(pid, timeout)
        remove_qb_files(pid)
        n.pid = None
        self.save()

    def corosync_alive(self, name: str) -> bool:
        n = self.node(name)
        if n.pid is None:
            return False
        proc = self._procs.get(name)
        if proc is not None:
            return proc.poll() is None
        return pid_alive(n.pid)

    # --- faults ---

    def partition(self, name: str) -> None:
        """Pull ``name``'s cable out of the switch (its port down): it and the rest each form a
        ring of their own."""
        n = self.node(name)
        self.exec("sw", ["ip", "link", "set", f"p{n.nodeid}", "down"])
        n.cut = True
        self.save()

    def heal(self, name: str) -> None:
        n = self.node(name)
        self.exec("sw", ["ip", "link", "set", f"p{n.nodeid}", "up"])
        n.cut = False
        self.save()

    def reachable(self, name: str) -> set[int]:
        """The node ids ``name``'s corosync should see once the ring settles: itself if it runs,
        and, if its port is up, every node with a running corosync and its port up."""
        me = self.node(name)
        if not self.corosync_alive(name):
            return set()
        if me.cut:
            return {me.nodeid}
        return {n.nodeid for n in self.nodes if not n.cut and self.corosync_alive(n.name)}

    def wait_settled(self, names: Sequence[str], timeout: float = FORM_TIMEOUT) -> float:
        """Wait until each of ``names`` sees exactly :meth:`reachable` as members, quorate when
        that is a majority; returns the seconds it took."""
        t0 = time.monotonic()
        for name in names:
            want = self.reachable(name)
            quorate = len(want) > len(self.nodes) // 2
            self.wait_quorate([name], quorate, members=len(want),
                              timeout=max(0.0, timeout - (time.monotonic() - t0)))
        return time.monotonic() - t0

    # --- waiting on corosync's own view ---

    def quorum_status(self, name: str) -> tuple[bool | None, set[int]]:
        """(quorate, member node ids) from ``corosync-quorumtool -s`` in ``name``; (None, set())
        when its corosync does not answer."""
        proc = self.exec(name, ["corosync-quorumtool", "-s", "-p"], check=False, timeout=10)
        if proc.returncode not in (0, 2):
            return None, set()
        members: set[int] = set()
        in_members = False
        for line in proc.stdout.splitlines():
            if line.startswith("Membership information"):
                in_members = True
                continue
            if in_members:
                m = re.match(r"\s*(\d+)\s+\d+\s", line)
                if m:
                    members.add(int(m.group(1)))
        return proc.returncode == 0, members

    def totem_timeouts(self, name: str) -> dict[str, int]:
        """The totem timeouts ``name``'s corosync runs with, in ms (``runtime.config.totem.*``):
        ``token`` is the configured token plus ``token_coefficient`` (650 ms) per node beyond two,
        so a dead node is seen after about ``token + consensus`` (1650 + 1980 ms for 3 nodes and a
        configured token of 1000 ms)."""
        out = {}
        for key in ("token", "consensus", "join", "merge", "fail_recv_const"):
            proc = self.exec(name, ["corosync-cmapctl", "-g", f"runtime.config.totem.{key}"])
            out[key] = int(proc.stdout.rsplit("=", 1)[1])
        return out

    def wait_connectable(self, name: str, timeout: float = FORM_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.corosync_alive(name):
                raise RigError(f"{name}: corosync exited; see {self.node_dir(name)}/corosync.out "
                               "and corosync.log")
            if self.quorum_status(name)[0] is not None:
                return
            time.sleep(POLL)
        raise RigError(f"{name}: corosync did not answer within {timeout:g} s")

    def wait_quorate(self, names: Sequence[str], quorate: bool, members: int | None = None,
                     timeout: float = FORM_TIMEOUT) -> float:
        """Poll each node's quorum tool until it says ``quorate`` (and has ``members`` members);
        returns the seconds it took, raises RigError at the deadline."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        pending = list(names)
        last: dict[str, tuple[bool | None, set[int]]] = {}
        while pending:
            name = pending[0]
            state = last[name] = self.quorum_status(name)
            if state[0] is quorate and (members is None or len(state[1]) == members):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise RigError(f"after {timeout:g} s: wanted quorate={quorate} members={members}, "
                               f"got {', '.join(f'{k}: {v}' for k, v in last.items())}")
            time.sleep(POLL)
        return time.monotonic() - t0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise RigError(f"pid {pid} still alive after {timeout:g} s")
        time.sleep(0.01)


def remove_qb_files(pid: int, shm: Path = Path("/dev/shm")) -> list[str]:
    """What the IPC server ``pid`` (a corosync) left in /dev/shm: libqb 2's per-connection
    directories ``qb-<server pid>-<client pid>-<n>-<random>`` and corosync's flight recorder
    ``qb-corosync-<pid>-blackbox-{header,data}`` (8 MiB each). A SIGKILLed corosync unlinks none."""
    removed = []
    for f in [*shm.glob(f"qb-{pid}-*"), *shm.glob(f"qb-corosync-{pid}-*")]:
        if f.is_dir():
            shutil.rmtree(f, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
        removed.append(f.name)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rig.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the rig's directory")
    sub = ap.add_subparsers(dest="action", required=True)
    p = sub.add_parser("up", help="N nodes, each with its corosync; waits until all are quorate")
    p.add_argument("count", type=int)
    p.add_argument("--token", type=int, default=TOKEN_MS, help="totem token, ms")
    sub.add_parser("down", help="kill every corosync, remove the namespaces and files")
    sub.add_parser("status", help="each node's corosync pid, quorum and members")
    p = sub.add_parser("exec", help="run a command inside a node's network namespace")
    p.add_argument("node")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    for name, text in (("partition", "take the node's switch port down"),
                       ("heal", "bring the node's switch port up"),
                       ("kill-corosync", "SIGKILL the node's corosync, remove its /dev/shm files"),
                       ("start-corosync", "start the node's corosync again")):
        p = sub.add_parser(name, help=f"{text}, then wait until every node's corosync agrees")
        p.add_argument("node")
        p.add_argument("--no-wait", action="store_true", help="return at once")
        p.add_argument("--timeout", type=float, default=FORM_TIMEOUT, help="seconds (%(default)s)")
    args = ap.parse_args(argv)
    try:
        if args.action == "up":
            missing = missing_tools()
            if missing:
                raise RigError(f"missing: {', '.join(missing)} (bash tools/run.sh setup)")
            rig = Rig(args.dir, token_ms=args.token)
            t0 = time.monotonic()
            rig.up(args.count)
            print(f"{args.count} nodes quorate after {time.monotonic() - t0:.1f} s in {args.dir}")
            return 0
        if args.action == "down":
            try:
                rig = Rig.load(args.dir)
            except RigError:
                return 0
            rig.down()
            return 0
        rig = Rig.load(args.dir)
        if args.action == "status":
            for n in rig.nodes:
                quorate, members = rig.quorum_status(n.name) if rig.corosync_alive(n.name) \
                    else (None, set())
                print(f"{n.name} nodeid {n.nodeid} {n.addr} corosync pid {n.pid} "
                      f"quorate {quorate} members {sorted(members)}")
            return 0
        if args.action == "exec":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                raise RigError("exec NODE CMD...: no command")
            return subprocess.call(rig.argv(args.node, cmd))
        t0 = time.monotonic()
        if args.action == "partition":
            rig.partition(args.node)
        elif args.action == "heal":
            rig.heal(args.node)
        elif args.action == "kill-corosync":
            rig.kill_corosync(args.node)
        elif args.action == "start-corosync":
            rig.start_corosync(args.node, wait=not args.no_wait, timeout=args.timeout)
        if not args.no_wait:
            rig.wait_settled([n.name for n in rig.nodes if rig.corosync_alive(n.name)],
                             args.timeout)
            print(f"{args.action} {args.node}: settled after {time.monotonic() - t0:.1f} s")
        return 0
    except (RigError, subprocess.TimeoutExpired) as e:
        print(f"rig.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
