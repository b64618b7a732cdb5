"""Cluster mode's local reads (``ClusterNode.take_frame``'s IN_SYNC and IS_CLEAN, answered from this
node's copy) and how :class:`~ulog_disk.daemon.cluster.ClusterTransport` hands frames to the node
and to the request loop, on a one-node fake corosync.

The read path answers inline what the rest of the node answers through its general handling, so
what it must keep is checked here: the answers are :class:`SharedLog`'s, a region out of range is
-EINVAL with one log line, a log this node does not have goes to the loop (-ESRCH, and the kernel
registers it again), the lifecycle is consulted and left alone, and the answer is read and sent
under the node's lock (the cluster thread changes the state under it)."""

from __future__ import annotations

import errno
import itertools
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest

from ulog_disk.daemon.applier import Applier
from ulog_disk.daemon.cluster import ClusterNode, ClusterTransport
from ulog_disk.daemon.loop import Daemon
from ulog_disk.log.lifecycle import State
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import Reply, Request
from ulog_disk.protocol.wire import RequestType as T
from ulog_disk.storage.memory import MemoryBackend
from ulog_disk.testing.client import ctr_text
from ulog_disk.testing.fakecorosync import FakeBus, settle
from ulog_disk.transport import Counters

UUID = "local-read-log"
LUID = 0x4100
REGIONS = 64
_seqs = itertools.count(1)


def frame(kind: T, data: bytes = b"", luid: int = LUID, uuid: str = UUID) -> bytes:
    return wire.encode_request(Request(luid=luid, uuid=uuid, version=wire.DM_ULOG_REQUEST_VERSION,
                                       seq=next(_seqs), request_type=int(kind), data=data))


class One:
    """One node alone in its cluster (quorate: one vote of one), its replies collected."""

    def __init__(self, tmp_path: Path) -> None:
        self.bus = FakeBus(1)
        self.node = ClusterNode(tmp_path / "node", "boot-1", None, self.bus.group(1), self.bus.quorum(1))
        self.replies: list[Reply] = []
        self.node.send = lambda reply, _address: self.replies.append(reply)
        settle(self.bus, [self.node])

    def ask(self, kind: T, data: bytes = b"", luid: int = LUID) -> Reply:
        """Send one request, let the cluster agree what it must: its reply."""
        self.replies.clear()
        assert self.node.take(frame(kind, data, luid), "kernel")
        settle(self.bus, [self.node])
        (reply,) = self.replies
        return reply

    def read(self, kind: T, region: int) -> int:
        reply = self.ask(kind, wire.build_u64(region))
        assert reply.error == 0 and len(reply.data) == 8
        return wire.parse_s64(reply.data)

    def open(self, extra: str = "") -> None:
        ctr = ctr_text(REGIONS, log_type="clustered-core", extra=extra).encode()
        assert self.ask(T.CTR, ctr).error == 0
        assert self.ask(T.RESUME).error == 0


@pytest.fixture
def one(tmp_path: Path) -> Iterator[One]:
    o = One(tmp_path)
    try:
        yield o
    finally:
        o.node.close()


@pytest.mark.parametrize("extra", ["", "nosync"])
def test_reads_before_the_log_is_open_anywhere(one: One, extra: str) -> None:
    """Between CTR and RESUME the cluster has no state of the log: IS_CLEAN says clean, IN_SYNC
    what the constructor's sync mode says."""
    ctr = ctr_text(REGIONS, log_type="clustered-core", extra=extra).encode()
    assert one.ask(T.CTR, ctr).error == 0
    assert UUID not in one.node.state.logs
    for region in (0, 5, REGIONS - 1):
        assert one.read(T.IS_CLEAN, region) == 1
        assert one.read(T.IN_SYNC, region) == (extra == "nosync")


def test_reads_are_the_shared_logs(one: One) -> None:
    """Every region's IN_SYNC and IS_CLEAN are what the node's copy of the log says, as its marks,
    clears and resync reports change it."""
    one.open()
    assert one.ask(T.FLUSH, wire.build_regions([3, 5, 40])).error == 0
    assert one.ask(T.CLEAR_REGION, wire.build_regions([5])).error == 0
    assert one.ask(T.FLUSH).error == 0
    assert one.ask(T.SET_REGION_SYNC, wire.build_set_region_sync(7, 1)).error == 0
    shared = one.node.state.logs[UUID]
    clean = [one.read(T.IS_CLEAN, r) for r in range(REGIONS)]
    in_sync = [one.read(T.IN_SYNC, r) for r in range(REGIONS)]
    assert clean == [int(shared.is_clean(r)) for r in range(REGIONS)]
    assert in_sync == [int(shared.in_sync(r)) for r in range(REGIONS)]
    assert [r for r in range(REGIONS) if not clean[r]] == [3, 40]
    assert [r for r in range(REGIONS) if in_sync[r]] == [7]


@pytest.mark.parametrize("kind", [T.IN_SYNC, T.IS_CLEAN])
@pytest.mark.parametrize("opened", [False, True])
def test_a_region_out_of_range_is_einval_with_one_line(one: One, caplog: pytest.LogCaptureFixture,
                                                       kind: T, opened: bool) -> None:
    if opened:
        one.open()
    else:
        assert one.ask(T.CTR, ctr_text(REGIONS, log_type="clustered-core").encode()).error == 0
    for data in (wire.build_u64(REGIONS), wire.build_u64(2**64 - 1), b"\x01\x02\x03"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ulog_disk.cluster"):
            reply = one.ask(kind, data)
        assert reply.error == -errno.EINVAL and reply.data == b""
        assert [(r.levelno, r.name) for r in caplog.records] == [(logging.ERROR, "ulog_disk.cluster")]
        assert kind.name in caplog.records[0].getMessage()
    assert one.read(kind, REGIONS - 1) in (0, 1)  # the log goes on


@pytest.mark.parametrize("kind", [T.IN_SYNC, T.IS_CLEAN])
def test_reads_leave_the_lifecycle_alone(one: One, kind: T) -> None:
    local = one.node.local
    key = (UUID, LUID)
    assert one.ask(T.CTR, ctr_text(REGIONS, log_type="clustered-core").encode()).error == 0
    for then, expected in ((None, State.CONSTRUCTED), (T.RESUME, State.LIVE),
                           (T.PRESUSPEND, State.PRESUSPENDED), (T.POSTSUSPEND, State.SUSPENDED)):
        if then is not None:
            assert one.ask(then).error == 0
        assert local[key].state is expected
        one.read(kind, 1)
        assert local[key].state is expected
    assert one.ask(T.DTR).error == 0
    assert key not in local
    assert not one.node.take(frame(kind, wire.build_u64(1)), "kernel")  # the loop's now


def test_an_unknown_luid_is_the_loops_esrch(tmp_path: Path) -> None:
    """A read of a luid this node has no instance of (even of a clustered uuid it has) is not the
    node's: the request loop answers it, -ESRCH, so that the kernel registers the log again."""
    one = One(tmp_path)
    one.open()
    inner = ListTransport()
    transport = ClusterTransport(inner, one.node)
    daemon = Daemon(Applier.over(MemoryBackend(tmp_path / "loop"), boot_id="boot-1"), transport)
    one.node.send = daemon.send
    try:
        inner.incoming = [frame(T.IN_SYNC, wire.build_u64(1), luid=LUID + 1),
                          frame(T.IS_CLEAN, wire.build_u64(1), luid=LUID + 1)]
        for f, address in transport.readable(None, daemon.selector):  # type: ignore[arg-type]
            daemon.on_frame(f, address)
        replies = [wire.decode_reply(p) for p in inner.sent]
        assert [(r.luid, r.error) for r in replies] == [(LUID + 1, -errno.ESRCH)] * 2
    finally:
        daemon.shutdown()  # closes the transport, and the node with it


class DepthLock:
    """An RLock that says whether it is held (by anyone) when asked."""

    def __init__(self) -> None:
        self.inner = threading.RLock()
        self.depth = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self.inner.acquire(blocking, timeout)
        if got:
            self.depth += 1
        return got

    def release(self) -> None:
        self.depth -= 1
        self.inner.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.release()


def test_reads_are_answered_under_the_nodes_lock(one: One) -> None:
    """The cluster thread changes the state under the node's lock: a read of it, and its answer,
    happen while the lock is held."""
    one.open()
    lock = DepthLock()
    one.node.lock = lock  # type: ignore[assignment]
    held: list[bool] = []
    one.node.send = lambda reply, _address: (held.append(lock.depth > 0), one.replies.append(reply))
    for kind in (T.IN_SYNC, T.IS_CLEAN):
        one.read(kind, 3)
        one.ask(kind, wire.build_u64(REGIONS))  # the refusal too
    assert held == [True] * 4 and lock.depth == 0


class ListTransport:
    """A transport whose one connection has the frames of ``incoming`` queued; it records what
    it hands out, and when, against what was sent by then."""

    name = "list"

    def __init__(self) -> None:
        self.counters = Counters()
        self.incoming: list[bytes] = []
        self.sent: list[bytes] = []
        #: For each frame read: how many replies had been sent when it was read.
        self.read_after: list[int] = []

    def attach(self, selector: object) -> None:
        pass

    def readable(self, key: object, selector: object) -> Iterator[tuple[bytes, object]]:
        while self.incoming:
            self.read_after.append(len(self.sent))
            self.counters.received += 1
            yield self.incoming.pop(0), "conn"

    def queued(self) -> list[tuple[bytes, object]]:
        frames, self.incoming = [(f, "conn") for f in self.incoming], []
        return frames

    def send(self, payload: bytes, address: object) -> None:
        self.sent.append(payload)

    def stop_receiving(self, selector: object) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_transport_hands_on_the_others_frames_in_order_as_it_reads(one: One) -> None:
    """Clustered frames are answered by the node as they are read, each before the next is read;
    the others go to the loop in their order; ``--capture`` records the node's (the loop records
    the others); replies go out through the wrapped transport."""
    one.open()
    inner = ListTransport()
    transport = ClusterTransport(inner, one.node)
    one.node.send = lambda reply, address: transport.send(wire.encode_reply(reply), address)
    recorded: list[bytes] = []
    mine = [frame(T.IN_SYNC, wire.build_u64(1)), frame(T.IS_CLEAN, wire.build_u64(2)),
            frame(T.GET_REGION_SIZE)]
    others = [frame(T.IN_SYNC, wire.build_u64(1), uuid="a-core-log"),
              frame(T.STATUS_INFO, uuid="another")]
    for with_capture in (False, True):
        transport.record = recorded.append if with_capture else None
        inner.sent.clear()
        inner.read_after.clear()
        inner.incoming = [mine[0], others[0], mine[1], mine[2], others[1]]
        handed = list(transport.readable(None, None))  # type: ignore[arg-type]
        assert handed == [(others[0], "conn"), (others[1], "conn")]
        assert inner.read_after == [0, 1, 1, 2, 3]
        assert [wire.decode_reply(p).seq for p in inner.sent] == \
            [wire.decode_frame(f).seq for f in mine]
        assert recorded == (mine if with_capture else [])
        assert transport.counters.received == 5 * (1 + with_capture)
    inner.incoming = [others[0], mine[0]]
    assert transport.queued() == [(others[0], "conn")]


def test_every_frame_is_told_apart_whatever_came_before(one: One) -> None:
    """The node reads a frame's header first or decodes it at once depending on the frame before
    it (:meth:`ClusterNode.take`): which frames it takes, and what it answers, do not."""
    one.open()
    inner = ListTransport()
    transport = ClusterTransport(inner, one.node)
    one.node.send = lambda reply, address: transport.send(wire.encode_reply(reply), address)
    good = frame(T.IN_SYNC, wire.build_u64(1))
    bad_connector = b"\x09" + good[1:]
    frames = {
        "mine": lambda: frame(T.IN_SYNC, wire.build_u64(1)),
        "mine, out of range": lambda: frame(T.IS_CLEAN, wire.build_u64(REGIONS)),
        "another log": lambda: frame(T.IN_SYNC, wire.build_u64(1), uuid="a-core-log"),
        "another luid of mine": lambda: frame(T.IN_SYNC, wire.build_u64(1), luid=LUID + 7),
        "a core log's CTR": lambda: frame(T.CTR, ctr_text(8, log_type="core").encode(), uuid="a-core-log"),
        "mine, not a connector frame": lambda: bad_connector,
        "mine, its data cut short": lambda: good[:-1],
        "shorter than a header": lambda: good[:40],
    }
    answers = {"mine": 0, "mine, out of range": -errno.EINVAL}
    for before, now in itertools.product(frames, frames):
        inner.sent.clear()
        first, second = frames[before](), frames[now]()
        inner.incoming = [first, second]
        handed = [f for f, _ in transport.readable(None, None)]  # type: ignore[arg-type]
        assert handed == [f for name, f in ((before, first), (now, second)) if name not in answers], \
            (before, now)
        replies = [wire.decode_reply(p) for p in inner.sent]
        expected = [(wire.decode_frame(f).seq, answers[name])
                    for name, f in ((before, first), (now, second)) if name in answers]
        assert [(r.seq, r.error) for r in replies] == expected, (before, now)
