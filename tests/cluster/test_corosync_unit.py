"""ulog_disk.cluster.corosync without corosync: the pieces of a large payload, the send queue's backoff
against a libcpg that pushes back (a fake library behind the same ctypes calls), the errors'
text, and that nothing loads libcpg but cluster mode."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from typing import Any

import pytest

from ulog_disk.cluster import corosync as cs
from ulog_disk.testing.clock import ManualClock

# --- pieces -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 999 - cs.PIECE.size, 1000 - cs.PIECE.size,
                                  1001 - cs.PIECE.size, 5000, 3 * (1000 - cs.PIECE.size)])
def test_split_and_reassemble(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    pieces = cs.split(payload, 7, 1000)
    assert all(len(p) <= 1000 for p in pieces)
    assert len(pieces) == max(1, -(-size // (1000 - cs.PIECE.size)))
    r = cs.Reassembler()
    out = [r.feed(1, 10, p) for p in pieces]
    assert out[:-1] == [None] * (len(pieces) - 1) and out[-1] == payload
    assert r.in_progress == 0


def test_senders_interleave_and_one_leaves() -> None:
    a, b, c = (cs.split(bytes([n]) * 3000, n, 1000) for n in (1, 2, 3))
    r = cs.Reassembler()
    done = []
    for i, (pa, pb) in enumerate(zip(a, b, strict=True)):
        for sender, piece in ((1, pa), (2, pb)):
            got = r.feed(sender, 99, piece)
            if got is not None:
                done.append((sender, got))
        if i == 0:
            assert r.feed(3, 99, c[0]) is None
            assert r.in_progress == 3
            r.forget(3, 99)        # sender 3 left after its first piece: its half is dropped
    assert done == [(1, b"\1" * 3000), (2, b"\2" * 3000)]
    assert r.in_progress == 0
    with pytest.raises(cs.PieceError, match="without its predecessors"):
        r.feed(3, 99, c[1])


def test_a_gap_or_a_foreign_piece_is_refused() -> None:
    one = cs.split(b"x" * 5000, 1, 1000)
    two = cs.split(b"y" * 5000, 2, 1000)
    r = cs.Reassembler()
    r.feed(1, 1, one[0])
    with pytest.raises(cs.PieceError, match="expected piece 1"):
        r.feed(1, 1, one[2])
    r.feed(1, 1, one[0])
    with pytest.raises(cs.PieceError, match="expected piece 1 of transfer 1"):
        r.feed(1, 1, two[1])
    # a first piece restarts the sender's transfer: the half-sent one is dropped
    r.feed(1, 1, one[0])
    r.feed(1, 1, one[1])
    assert [r.feed(1, 1, p) for p in two][-1] == b"y" * 5000
    with pytest.raises(cs.PieceError, match="not a piece"):
        r.feed(1, 1, b"Z" * 40)
    damaged = bytearray(one[-1])
    damaged[-1] ^= 1
    for p in one[:-1]:
        r.feed(1, 1, p)
    with pytest.raises(cs.PieceError, match="CRC"):
        r.feed(1, 1, bytes(damaged))
    with pytest.raises(ValueError, match="no room"):
        cs.split(b"x", 1, cs.PIECE.size)


# --- the send queue against a library that pushes back -------------------------------------------


def written(ref: Any, value: int) -> int:
    """What a libcpg call does with its out-parameter (a ``ctypes.byref``): writes ``value``
    through it, and succeeds."""
    ref._obj.value = value
    return cs.CS_OK


class FakeCpg:
    """libcpg's calls as the binding makes them; mcast answers from ``answers`` (then CS_OK)."""

    def __init__(self) -> None:
        self.answers: list[int] = []
        self.sent: list[bytes] = []
        self.calls = 0

    def cpg_model_initialize(self, handle: Any, model: int, data: Any, ctx: Any) -> int:
        return written(handle, 42)

    def cpg_fd_get(self, handle: int, fd: Any) -> int:
        return written(fd, 99)

    def cpg_max_atomic_msgsize_get(self, handle: int, size: Any) -> int:
        return written(size, 100)

    def cpg_local_get(self, handle: int, nodeid: Any) -> int:
        return written(nodeid, 3)

    def cpg_join(self, handle: int, name: Any) -> int:
        return cs.CS_OK

    def cpg_flow_control_state_get(self, handle: int, state: Any) -> int:
        return written(state, 0)

    def cpg_mcast_joined(self, handle: int, guarantee: int, iov: Any, count: int) -> int:
        assert guarantee == cs.CPG_TYPE_AGREED
        self.calls += 1
        if self.answers:
            return self.answers.pop(0)
        self.sent.append(b"".join(ctypes.string_at(iov[i].iov_base, iov[i].iov_len)
                                  for i in range(count)))
        return cs.CS_OK

    def cpg_finalize(self, handle: int) -> int:
        return cs.CS_OK


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeCpg:
    lib = FakeCpg()
    monkeypatch.setitem(cs._LIBS, "cpg", lib)
    return lib


def test_send_queue_backs_off_and_keeps_order(fake: FakeCpg, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = ManualClock(1000.0)
    monkeypatch.setattr(cs.time, "monotonic", clock)
    g = cs.CpgGroup("g")
    assert (g.nodeid, g.max_atomic, g.fileno()) == (3, 100, 99)
    for i in range(3):
        g.send(bytes([i]) * 10)
    fake.answers = [cs.CS_ERR_TRY_AGAIN] * 6
    delays = []
    while g.pending:
        if g.pump():
            break
        delays.append(round(g.retry_in() or 0.0, 6))
        calls = fake.calls
        assert g.pump() is False and fake.calls == calls, "retried before its time"
        clock.now += delays[-1]
    assert delays == [0.0005, 0.001, 0.002, 0.004, 0.008, 0.01]
    assert fake.sent == [b"\0" * 10, b"\1" * 10, b"\2" * 10]
    assert g.counters["try_again"] == 6 and g.counters["sent"] == 3
    assert g.retry_in() is None
    # After a success the backoff starts again from the shortest delay.
    fake.answers = [cs.CS_ERR_TRY_AGAIN]
    with pytest.raises(cs.WouldBlock) as info:
        g.mcast(b"a")
    assert info.value.retry_after == 0.0005 and info.value.name == "CS_ERR_TRY_AGAIN"
    g.close()


def test_mcast_refuses_above_the_atomic_size_and_sends_iovecs(fake: FakeCpg) -> None:
    with cs.CpgGroup("g") as g:
        with pytest.raises(cs.MessageTooLarge) as info:
            g.mcast(b"x" * 101)
        assert (info.value.size, info.value.limit, info.value.name) == (101, 100, "CS_ERR_TOO_BIG")
        with pytest.raises(cs.MessageTooLarge):
            g.send(b"x" * 101)
        with pytest.raises(cs.MessageTooLarge):
            g.mcast([b"x" * 60, b"y" * 41])
        g.mcast([b"ab", b"", b"cd"])
        g.mcast(b"x" * 100)
    assert fake.sent == [b"abcd", b"x" * 100]
    assert fake.calls == 2, "a refused message reached libcpg"


def test_lost_connection_and_other_errors_name_the_cs_error(fake: FakeCpg) -> None:
    g = cs.CpgGroup("g")
    fake.answers = [cs.CS_ERR_LIBRARY]
    with pytest.raises(cs.ConnectionLost, match="cpg_mcast_joined: CS_ERR_LIBRARY"):
        g.mcast(b"x")
    assert g.lost
    fake.answers = [cs.CS_ERR_NOT_EXIST]
    with pytest.raises(cs.CorosyncError, match="CS_ERR_NOT_EXIST") as info:
        g.mcast(b"x")
    assert not isinstance(info.value, cs.ConnectionLost)
    with pytest.raises(cs.CorosyncError, match="CS_ERR_NAME_TOO_LONG"):
        cs.CpgGroup("x" * 129)


def test_a_lost_dispatch_carries_what_it_delivered_before_the_loss(fake: FakeCpg,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    g = cs.CpgGroup("g")
    agreed = cs.Deliver(nodeid=3, pid=7, data=b"agreed")

    def dispatch(handle: int, flags: int) -> int:
        g._on_deliver(handle, None, agreed.nodeid, agreed.pid,
                      ctypes.cast(ctypes.c_char_p(agreed.data), ctypes.c_void_p).value, len(agreed.data))
        return cs.CS_ERR_LIBRARY  # the connection broke after that delivery

    monkeypatch.setattr(fake, "cpg_dispatch", dispatch, raising=False)
    with pytest.raises(cs.ConnectionLost, match="cpg_dispatch: CS_ERR_LIBRARY") as info:
        g.dispatch()
    assert info.value.events == [agreed] and g.lost
    assert g.counters["delivered"] == 1


def test_refused_connection_is_one_line(monkeypatch: pytest.MonkeyPatch, fake: FakeCpg) -> None:
    for code, text in ((cs.CS_ERR_LIBRARY, "is corosync running on this host?"),
                       (cs.CS_ERR_ACCESS, "run as root, or allow its user or group")):
        monkeypatch.setattr(fake, "cpg_model_initialize", lambda *a, code=code: code)
        with pytest.raises(cs.CorosyncUnavailable) as info:
            cs.CpgGroup("g")
        assert text in str(info.value) and "\n" not in str(info.value)
        assert info.value.code == code


def test_missing_library_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(cs._LIBS, "quorum", raising=False)
    monkeypatch.setitem(cs._SONAMES, "quorum", "libquorum-not-there.so.5")
    monkeypatch.setattr(cs.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(cs.CorosyncUnavailable) as info:
        cs.Quorum()
    assert str(info.value) == ("cluster mode needs corosync's libquorum-not-there.so.5, which is "
                               "not installed (Debian: apt-get install corosync libquorum5)")


def test_single_node_daemon_never_loads_corosync() -> None:
    """The daemon, its tools and the binding's own import load no corosync library."""
    code = ("import sys, ulog_disk.daemon.service, ulog_disk.tools.dump, ulog_disk.tools.recover\n"
            "assert 'ulog_disk.corosync' not in sys.modules, 'imported'\n"
            "import ulog_disk.cluster.corosync as c\n"
            "maps = open('/proc/self/maps').read()\n"
            "assert not c._LIBS and 'libcpg' not in maps and 'libquorum' not in maps, 'loaded'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
