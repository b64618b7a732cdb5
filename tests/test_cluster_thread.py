"""The cluster thread as the daemon runs it: each node's own thread polls its corosync handles,
applies, journals, syncs and answers, while the requests come from another thread (the request
loop's place; here the test's, which also plays corosync's agreed order on the in-process bus).

The step-by-step model (tests/test_cluster_node.py) drives the same code without the thread; this
checks that the thread alone gets a FLUSH answered across three nodes, and that a bug in it stops
the daemon instead of leaving the clustered logs frozen.
"""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ulog_disk.daemon.cluster import ClusterNode
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import Reply, Request
from ulog_disk.protocol.wire import RequestType as T
from ulog_disk.testing.client import ctr_text
from ulog_disk.testing.fakecorosync import FakeBus

UUID = "threaded-cluster-log"
REGIONS = 64
_seqs = itertools.count(1)


class Node:
    def __init__(self, bus: FakeBus, n: int, base: Path) -> None:
        self.n = n
        self.luid = 0x6000 + n
        self.replies: queue.Queue[Reply] = queue.Queue()
        self.node = ClusterNode(base / f"node{n}", f"boot-{n}", None, bus.group(n), bus.quorum(n))
        self.node.send = lambda reply, _address: self.replies.put(reply)
        self.failures: list[BaseException] = []
        self.node.fatal = self.failures.append

    def send(self, kind: T, data: bytes = b"") -> int:
        seq = next(_seqs)
        frame = wire.encode_request(Request(luid=self.luid, uuid=UUID, version=wire.DM_ULOG_REQUEST_VERSION,
                                            seq=seq, request_type=int(kind), data=data))
        assert self.node.take(frame, self.n)
        return seq


def answer(bus: FakeBus, node: Node, seq: int, timeout: float = 20.0) -> Reply:
    """Order what the nodes multicast (corosync's part) until ``node`` answers ``seq``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bus.order_all()
        try:
            reply = node.replies.get(timeout=0.002)
        except queue.Empty:
            continue
        if reply.request.seq == seq:
            return reply
    raise AssertionError(f"node {node.n}: no answer to seq {seq} within {timeout} s")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[FakeBus, list[Node]]]:
    bus = FakeBus(3)
    for n in bus.nodeids:
        bus.start(n)
    nodes = [Node(bus, n, tmp_path) for n in bus.nodeids]
    for node in nodes:
        node.node.start()
    try:
        ctr = ctr_text(REGIONS, log_type="clustered-core", extra="nosync").encode()
        for node in nodes:
            assert answer(bus, node, node.send(T.CTR, ctr)).error == 0
        resumes = [(node, node.send(T.RESUME)) for node in nodes]
        for node, seq in resumes:
            assert answer(bus, node, seq).error == 0
        yield bus, nodes
    finally:
        for node in nodes:
            node.node.close()


def read(bus: FakeBus, node: Node, kind: T, region: int) -> int:
    reply = answer(bus, node, node.send(kind, wire.build_u64(region)))
    return int.from_bytes(reply.data[:8], "little", signed=True)


def test_the_cluster_thread_alone_answers_a_flush_on_every_node(cluster: tuple[FakeBus, list[Node]]) -> None:
    bus, (n1, n2, n3) = cluster
    flush = answer(bus, n1, n1.send(T.FLUSH, wire.build_regions([5, 9])))
    assert flush.error == 0
    # Answered only once every member said its journal holds the marks: every node reads them.
    assert [read(bus, n, T.IS_CLEAN, 5) for n in (n1, n2, n3)] == [0, 0, 0]
    assert all(n.node._durable_epoch >= n1.node.state.epoch for n in (n2, n3))
    n1.send(T.CLEAR_REGION, wire.build_regions([5]))
    assert answer(bus, n1, n1.send(T.FLUSH)).error == 0
    bus.order_all()
    deadline = time.monotonic() + 20
    while read(bus, n3, T.IS_CLEAN, 5) != 1:
        assert time.monotonic() < deadline, "the clear never reached node 3"
    assert read(bus, n3, T.IS_CLEAN, 9) == 0
    assert not any(n.failures for n in (n1, n2, n3))


def test_a_bug_in_the_cluster_thread_stops_the_daemon(cluster: tuple[FakeBus, list[Node]]) -> None:
    bus, (n1, n2, _) = cluster
    bug = RuntimeError("a bug")

    def broken(events: list[object]) -> None:
        raise bug

    n2.node._apply_events = broken  # type: ignore[method-assign]
    n1.send(T.FLUSH, wire.build_regions([3]))
    deadline = time.monotonic() + 20
    while not n2.failures:
        assert time.monotonic() < deadline, "the failing thread told nobody"
        bus.order_all()
        time.sleep(0.002)
    assert n2.failures == [bug]
    assert n2.node.closed
