"""Who may talk to dm-ulogd.

* netlink: only the kernel (portid 0) may send requests. Frames from a userspace netlink socket,
  unicast to the daemon's portid or multicast to connector group 7, are dropped, logged and
  counted, never answered, and the daemon keeps reading. Tested in a private network namespace the
  test creates, so the daemon and the test's sender are the only parties on the connector there.
* netlink: the daemon refuses to start (exit 2) when another process already holds connector group
  7, naming that process (a stand-in for cmirrord, in a private namespace).
* unix transport: the socket file is 0600; a peer of another uid (nobody) is refused by the file
  mode, and, should the file mode be loosened, by the daemon's SO_PEERCRED check (logged, counted).
* the state directory is 0700, its files 0600, even when the daemon starts under umask 000.
* a second daemon on the same state directory is refused and does not disturb the first.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rel_lib import figures, launch

from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import Request, RequestType
from ulog_disk.testing.client import Client, ctr_text

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, setuid)")

NOBODY = 65534
_names = itertools.count()


def _ensure_netns_tools() -> None:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 'ip' is not installed")


@pytest.fixture
def netns() -> Iterator[str]:
    """A private network namespace, removed afterwards."""
    _ensure_netns_tools()
    from pyroute2 import netns as pnetns

    name = f"ulogrel-{os.getpid()}-{next(_names)}"
    pnetns.create(name)
    try:
        yield name
    finally:
        pnetns.remove(name)


def netlink_sockets(pid: int) -> list[tuple[int, int, int]]:
    """(protocol, portid, groups) of the netlink sockets in the network namespace of ``pid``."""
    out = []
    with open(f"/proc/{pid}/net/netlink") as f:
        next(f)
        for line in f:
            cols = line.split()
            out.append((int(cols[1]), int(cols[2]), int(cols[3], 16)))
    return out


def group7_portids(pid: int) -> list[int]:
    bit = 1 << (wire.CN_IDX_DM - 1)
    return [portid for proto, portid, groups in netlink_sockets(pid)
            if proto == wire.NETLINK_CONNECTOR and groups & bit]


def request_frame(seq: int, rtype: RequestType = RequestType.CTR, data: bytes | None = None) -> bytes:
    if data is None:
        data = ctr_text(64).encode()
    return wire.encode_request(Request(luid=0x42, uuid="LVM-intruder", version=3, seq=seq,
                                       request_type=rtype, data=data, cn_seq=seq))


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --- netlink ----------------------------------------------------------------------------------------


def test_userspace_netlink_frames_are_dropped_counted_and_never_answered(tmp_path: Path, netns: str) -> None:
    from pyroute2 import netns as pnetns

    d = launch(tmp_path, listen="netlink", netns=netns, extra_args=["-v"])
    try:
        wait_for(lambda: group7_portids(d.pid), what="the daemon's group 7 socket")
        [daemon_portid] = group7_portids(d.pid)
        sender = pnetns.create_socket(netns, socket.AF_NETLINK, socket.SOCK_DGRAM, wire.NETLINK_CONNECTOR)
        sender.bind((0, 0))
        sender.settimeout(0.5)
        my_portid = sender.getsockname()[0]
        assert my_portid != 0
        kinds = [
            request_frame(1),                                                   # a CTR
            request_frame(2, RequestType.FLUSH, b""),                           # a FLUSH
            request_frame(3, RequestType.DTR, b""),                             # a DTR
            b"\x00" * 12,                                                        # not even a cn_msg
        ]
        sent = 0
        for burst in range(2):
            for payload in kinds:
                datagram = wire.add_nlmsghdr(payload, seq=burst, pid=my_portid)
                sender.sendto(datagram, (daemon_portid, 0))                     # unicast to the daemon
                sent += 1
                # Multicast to group 7. No kernel connector socket exists in a private netns, so the
                # unicast half of this send is refused; the broadcast has gone out all the same.
                with contextlib.suppress(ConnectionRefusedError):
                    sender.sendto(datagram, (0, 1 << (wire.CN_IDX_DM - 1)))
                sent += 1
            wait_for(lambda n=sent: d.log_text().count("dropped a frame from userspace netlink portid") >= n,
                     what=f"{sent} drops in the daemon log")
        text = d.log_text()
        drops = text.count(f"dropped a frame from userspace netlink portid {my_portid}")
        assert drops == sent, text[-3000:]
        # Nothing was answered: no reply reached the sender, and the engine never saw a request.
        with pytest.raises(TimeoutError):
            sender.recv(65536)
        assert "CTR uuid='LVM-intruder'" not in text
        assert "could not send a reply" not in text
        assert d.alive()
        sender.close()
        assert d.stop() == 0
        text = d.log_text()
        assert re.search(r"stopped \(0 requests, 0 errors", text), text[-2000:]
        figures("access.netlink_foreign_sender", frames_sent=sent, frames_dropped=drops, frames_answered=0,
                violations=0)
    finally:
        if d.alive():
            d.kill9()


HOLDER = r"""
import ctypes, socket, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(15, b"cmirrord", 0, 0, 0)          # PR_SET_NAME: look like cmirrord
s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 11)
s.bind((0, 0))
s.setsockopt(270, 1, 7)                          # SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group 7
print(s.getsockname()[0], flush=True)
sys.stdin.read()                                 # hold the group until the test closes stdin
"""


def test_refuses_to_start_when_group7_is_taken(tmp_path: Path, netns: str) -> None:
    holder = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", HOLDER],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        holder_portid = int(holder.stdout.readline())
        assert group7_portids(holder.pid) == [holder_portid]
        d = launch(tmp_path, listen="netlink", netns=netns, wait_ready=False)
        rc = d.proc.wait(30)
        text = d.log_text()
        assert rc == 2, text
        assert "cannot start" in text and "connector group 7" in text, text
        assert f"portid {holder_portid} (cmirrord)" in text, text
        assert not (tmp_path / "d.ready").exists()
        # The holder is left alone: it still has the group.
        assert holder.poll() is None and group7_portids(holder.pid) == [holder_portid]
        figures("access.group7_taken", exit_code=rc, message_names_holder=True, violations=0)
    finally:
        if holder.stdin:
            holder.stdin.close()
        holder.wait(10)


# --- unix transport ---------------------------------------------------------------------------------

INTRUDER = r"""
import os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
path, frame = sys.argv[1], bytes.fromhex(sys.argv[2])
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.connect(path)
except OSError as exc:
    print("connect", exc.errno); sys.exit(0)
s.settimeout(10)
try:
    s.send(frame)
    data = s.recv(65536)
    print("reply" if data else "eof", len(data))
except OSError as exc:
    print("error", exc.errno)
"""


def run_intruder(path: Path, frame: bytes) -> str:
    p = subprocess.run([sys.executable, "-c", INTRUDER, str(path), frame.hex()], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_unix_peer_of_another_uid_is_refused(tmp_path: Path) -> None:
    # The socket must be reachable by nobody for the second layer to be exercised: a 0755 directory.
    public = Path(tempfile.mkdtemp(prefix="ulogrel-sock-"))
    try:
        os.chmod(public, 0o755)
        d = launch(tmp_path, listen=f"unix:{public}/d.sock")
        try:
            assert d.socket_path is not None
            sock_mode = stat.S_IMODE(d.socket_path.stat().st_mode)
            assert sock_mode == 0o600
            frame = request_frame(7)
            # Layer 1: the file mode. nobody cannot even connect.
            assert run_intruder(d.socket_path, frame) == f"connect {errno.EACCES}"
            # Layer 2: should the mode be loosened (an admin's chmod), SO_PEERCRED still refuses.
            os.chmod(d.socket_path, 0o666)
            outcome = run_intruder(d.socket_path, frame)
            # closed by the daemon: EOF at the read, or already at the send (EPIPE/ECONNRESET)
            assert outcome in ("eof 0", f"error {errno.ECONNRESET}", f"error {errno.EPIPE}"), outcome
            wait_for(lambda: f"refused a unix connection from uid {NOBODY}" in d.log_text(),
                     what="the refusal in the log")
            text = d.log_text()
            assert "LVM-intruder" not in text
            # root is still served, after the refusals
            client = Client(d.socket_path)
            client.ok("LVM-root", 1, RequestType.CTR, ctr_text(16).encode())
            client.ok("LVM-root", 1, RequestType.RESUME)
            assert client.sync_count("LVM-root", 1) == 0
            client.close()
            assert d.stop() == 0
            refused = d.log_text().count("refused a unix connection")
            assert refused == 1
            figures("access.unix_other_uid", attempts=2, refused_by_file_mode=1, refused_by_peercred=refused,
                    answered=0, violations=0)
        finally:
            if d.alive():
                d.kill9()
    finally:
        shutil.rmtree(public, ignore_errors=True)


# --- modes, second instance -------------------------------------------------------------------------


def test_modes_of_state_dir_files_and_socket_under_umask_000(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o777)
    os.chmod(state, 0o777)  # a pre-existing, too open directory: the daemon tightens it
    d = launch(tmp_path, state_dir=state, preexec=lambda: os.umask(0), extra_args=[])
    try:
        client = Client(d.socket_path)  # type: ignore[arg-type]
        for luid, uuid in ((1, "LVM-modes"), (2, "needs/encoding ..")):
            client.ok(uuid, luid, RequestType.CTR, ctr_text(64).encode())
            client.ok(uuid, luid, RequestType.RESUME)
            client.ok(uuid, luid, RequestType.MARK_REGION, wire.build_regions([1, 2]))
            client.ok(uuid, luid, RequestType.FLUSH)
            client.ok(uuid, luid, RequestType.CLEAR_REGION, wire.build_regions([1]))
        client.close()
        modes = {"socket": stat.S_IMODE(d.socket_path.stat().st_mode)}  # type: ignore[union-attr]
        for path in [state, *sorted(state.rglob("*"))]:
            modes[str(path.relative_to(tmp_path))] = stat.S_IMODE(path.lstat().st_mode)
        assert d.stop() == 0
    finally:
        if d.alive():
            d.kill9()
    bad = {}
    envs = 0
    for name, mode in modes.items():
        path = tmp_path / name
        if name == "socket":
            want = 0o600
        elif path.is_dir():
            want = 0o700
            envs += path != state
        else:
            want = 0o600
        if mode != want:
            bad[name] = oct(mode)
    assert envs == 2, modes
    assert any(n.endswith("data.mdb") for n in modes) and any("journal." in n for n in modes), modes
    assert not bad, f"wrong modes: {bad}"
    figures("access.modes", paths_checked=len(modes), wrong=len(bad), violations=len(bad))


def test_second_daemon_on_same_state_dir_is_refused_and_first_keeps_serving(tmp_path: Path) -> None:
    first = launch(tmp_path, name="first")
    try:
        client = Client(first.socket_path)  # type: ignore[arg-type]
        client.ok("LVM-one", 1, RequestType.CTR, ctr_text(32).encode())
        client.ok("LVM-one", 1, RequestType.RESUME)
        # Same state dir, and even the same socket path: refused before it touches the socket.
        second = launch(tmp_path, name="second", listen=f"unix:{first.socket_path}",
                        state_dir=first.state_dir, wait_ready=False)
        rc = second.proc.wait(30)
        text = second.log_text()
        assert rc == 2, text
        assert "in use by another dm-ulogd" in text and f"pid {first.pid}" in text, text
        assert first.socket_path.is_socket()  # type: ignore[union-attr]
        # The first daemon still answers on the existing connection and on a new one.
        client.ok("LVM-one", 1, RequestType.MARK_REGION, wire.build_regions([3]))
        client.ok("LVM-one", 1, RequestType.FLUSH)
        again = Client(first.socket_path)  # type: ignore[arg-type]
        assert wire.parse_s64(again.ok("LVM-one", 1, RequestType.IS_CLEAN, wire.build_u64(3))) == 0
        again.close()
        client.close()
        assert first.stop() == 0
        figures("access.second_instance", exit_code=rc, first_kept_serving=True, violations=0)
    finally:
        if first.alive():
            first.kill9()
