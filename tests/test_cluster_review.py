"""Cluster mode under interleavings the other cluster tests do not choose: a review's findings.

Each test drives :class:`~ulog_disk.daemon.cluster.ClusterNode` on the in-process corosync
(``ulog_disk.testing.fakecorosync``), the test choosing when each node reads its events and when
each message is ordered. The review found defects under some of them (a resent FLUSH answered
before its marks were agreed, a FLUSH in pieces half lost with a history given up, replies of such
a history sent, a transfer completed into a later exchange, a departed node never declared again,
requests left waiting after quorum came back, a formation decided from quorum asked at different
instants); these tests keep them fixed, and pin the interleavings that held."""

from __future__ import annotations

import itertools
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

import pytest

from ulog_disk.daemon import cluster as cluster_mod
from ulog_disk.daemon.cluster import ClusterNode
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import Reply, Request
from ulog_disk.protocol.wire import RequestType as T
from ulog_disk.testing.client import ctr_text
from ulog_disk.testing.fakecorosync import MAX_ATOMIC, FakeBus, settle, step, stop_node, sync_journal

UUID = "review-cluster-log"
_seqs = itertools.count(1)


class Rig:
    """Daemons on some of a bus's corosync nodes, each with its kernel's replies by seq."""

    def __init__(self, base: Path, corosyncs: int = 3, daemons: Iterable[int] = (1, 2, 3),
                 regions: int = 16, nosync: bool = True, fence: str | None = None,
                 max_atomic: int = MAX_ATOMIC) -> None:
        self.base = base
        self.bus = FakeBus(corosyncs, max_atomic)
        self.ctr = ctr_text(regions, log_type="clustered-core", extra="nosync" if nosync else "").encode()
        self.fence = fence
        self.nodes: dict[int, ClusterNode] = {}
        self.replies: dict[int, dict[int, Reply]] = {}
        self.boots: dict[int, int] = {}
        for n in daemons:
            self.start(n)

    def nodes_dir(self, n: int) -> Path:
        return self.base / f"node{n}"

    def start(self, n: int) -> ClusterNode:
        self.boots[n] = self.boots.get(n, 0) + 1
        node = ClusterNode(self.base / f"node{n}", f"boot-{n}-{self.boots[n]}", self.fence,
                           self.bus.group(n), self.bus.quorum(n))
        node.send = partial(self._reply, n, node)
        self.nodes[n] = node
        self.replies.setdefault(n, {})
        return node

    def _reply(self, n: int, node: ClusterNode, reply: Reply, address: object) -> None:
        if self.nodes.get(n) is node:
            self.replies[n][reply.request.seq] = reply

    def send(self, n: int, kind: T, data: bytes = b"", luid: int | None = None) -> int:
        seq = next(_seqs)
        request = Request(luid=0x7000 + n if luid is None else luid, uuid=UUID,
                          version=wire.DM_ULOG_REQUEST_VERSION, seq=seq, request_type=int(kind), data=data,
                          cn_seq=seq)
        assert self.nodes[n].take(wire.encode_request(request), n)
        return seq

    def answer(self, n: int, seq: int) -> Reply | None:
        return self.replies[n].get(seq)

    def open(self, n: int, luid: int | None = None) -> int:
        assert self.answer(n, self.send(n, T.CTR, self.ctr, luid=luid)).error == 0  # type: ignore[union-attr]
        return self.send(n, T.RESUME, luid=luid)

    def mark(self, n: int, regions: list[int]) -> int:
        """The kernel's MARK_REGIONs (groups of 32) and its FLUSH; the FLUSH's seq."""
        for i in range(0, len(regions), 32):
            reply = self.answer(n, self.send(n, T.MARK_REGION, wire.build_regions(regions[i:i + 32])))
            assert reply is not None and reply.error == 0
        return self.send(n, T.FLUSH)

    def unsync(self, n: int, *regions: int) -> None:
        """Node ``n``'s kernel reports failed writes there (SET_REGION_SYNC 0), answered."""
        seqs = [self.send(n, T.SET_REGION_SYNC, wire.build_set_region_sync(r, 0)) for r in regions]
        self.settle()
        assert all(self.answer(n, seq) is not None for seq in seqs)

    def read(self, n: int, kind: T, region: int, luid: int | None = None) -> int:
        reply = self.answer(n, self.send(n, kind, wire.build_u64(region), luid=luid))
        assert reply is not None and reply.error == 0
        return int.from_bytes(reply.data[:8], "little", signed=True)

    def live(self) -> list[ClusterNode]:
        return [node for node in self.nodes.values() if not node.closed]

    def settle(self) -> None:
        settle(self.bus, self.live())

    def run(self, only: Iterable[int], rounds: int = 200) -> None:
        """Order every message and let only the daemons ``only`` read theirs (the others are slow
        to read: their inboxes fill), until those have nothing left to do."""
        nodes = [self.nodes[n] for n in only]
        for _ in range(rounds):
            did = self.bus.order_all() > 0
            for node in nodes:
                did |= step(node)
                did |= sync_journal(node)
            if not did:
                return
        raise AssertionError("the nodes kept talking")

    def crash(self, n: int) -> None:
        stop_node(self.nodes.pop(n), power_cut=True)
        self.bus.crash(n)

    def close(self) -> None:
        for node in self.nodes.values():
            if not node.closed:
                stop_node(node)

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def opened(base: Path, **kw: object) -> Rig:
    """A rig whose daemons all have the log open (RESUME answered), settled."""
    rig = Rig(base, **kw)  # type: ignore[arg-type]
    resumes = {n: rig.open(n) for n in rig.nodes}
    rig.settle()
    for n, seq in resumes.items():
        reply = rig.answer(n, seq)
        assert reply is not None and reply.error == 0, f"node {n}: RESUME not answered"
    return rig


@pytest.fixture
def rig3(base: Path) -> Iterator[Rig]:
    with opened(base) as rig:
        yield rig


# --- a FLUSH resent by the kernel while the first waits ----------------------------------------------


def test_a_resent_flush_waits_for_the_marks_of_the_first(rig3: Rig) -> None:
    rig = rig3
    rig.bus.partition([{3}])
    rig.settle()
    assert not rig.nodes[3].quorate
    first = rig.mark(3, [7])
    rig.settle()
    assert rig.answer(3, first) is None, "the cut-off node answered a FLUSH carrying marks"
    # dm-log-userspace resends a request unanswered for 15 s with a new seq and the same payload:
    # a FLUSH without integrated_flush carries none.
    resend = rig.send(3, T.FLUSH)
    rig.settle()
    assert rig.read(1, T.IS_CLEAN, 7) == 1   # the majority knows nothing of the mark
    assert rig.answer(3, resend) is None, "the resent FLUSH was answered: node 3's kernel writes region 7"


def test_a_resent_flush_with_its_regions_waits_too(rig3: Rig) -> None:
    """integrated_flush: the resend carries the regions again, a second agreed FLUSH that waits
    like the first; both are answered once the node is back with the majority."""
    rig = rig3
    rig.bus.partition([{3}])
    rig.settle()
    first = rig.send(3, T.FLUSH, wire.build_regions([7]))
    rig.settle()
    resend = rig.send(3, T.FLUSH, wire.build_regions([7]))
    rig.settle()
    assert rig.answer(3, first) is None and rig.answer(3, resend) is None
    rig.bus.heal()
    rig.settle()
    assert rig.answer(3, first).error == 0 and rig.answer(3, resend).error == 0  # type: ignore[union-attr]
    assert [rig.read(n, T.IS_CLEAN, 7) for n in (1, 2, 3)] == [0, 0, 0]


# --- a FLUSH cut into several messages, applied in a history its node then gives up -----------------


def test_a_flush_in_pieces_resent_in_the_new_history_keeps_every_mark(base: Path) -> None:
    with opened(base, regions=2048) as rig:
        flush = rig.mark(3, list(range(1500)))   # two FLUSH messages, handed to corosync
        rig.bus.partition([{3}])                 # ordered on node 3's side only
        # Node 1 is slow to read: the majority's coordinator declares nobody departed before the
        # heal. Node 2 goes on: three FLUSHes make the majority's history the longer.
        more = [rig.send(2, T.FLUSH, wire.build_regions([2000 + i])) for i in range(3)]
        rig.run([2, 3])
        assert rig.nodes[3].state.logs[UUID].marks[3].count(1) == 1500
        assert rig.answer(3, flush) is None
        rig.bus.heal()
        rig.settle()
        assert all(rig.answer(2, seq) is not None for seq in more)
        reply = rig.answer(3, flush)
        assert reply is not None and reply.error == 0
        # Node 3's kernel now writes regions 0..1499: every node must say they are not clean.
        assert [rig.read(n, T.IS_CLEAN, 1499) for n in (1, 2, 3)] == [0, 0, 0]
        assert [rig.read(n, T.IS_CLEAN, 0) for n in (1, 2, 3)] == [0, 0, 0]


# --- the coordinator's memory of what it declared ------------------------------------------------------


def test_a_node_declared_in_vain_is_declared_when_it_really_goes(rig3: Rig) -> None:
    rig = rig3
    flush = rig.mark(3, [5])
    rig.settle()
    assert rig.answer(3, flush) is not None
    # A short split: node 1 (the coordinator) reads it and declares node 3 departed; the heal
    # comes before the DEPARTED is ordered, so every member drops it (node 3 is a member there).
    rig.bus.partition([{3}])
    step(rig.nodes[1])
    rig.bus.heal()
    rig.settle()
    shared = rig.nodes[1].state.logs[UUID]
    assert shared.marks[3][5] and shared.in_sync(5) and not rig.nodes[1].state.unfenced
    # Now node 3 crashes for good, holding region 5 marked.
    rig.crash(3)
    rig.settle()
    shared = rig.nodes[1].state.logs[UUID]
    assert 3 not in shared.marks, "node 3 was never declared departed"
    assert not shared.in_sync(5), "region 5, marked by a crashed node, is still in sync (never recovered)"


# --- quorum coming back ------------------------------------------------------------------------------


def test_replies_held_for_quorum_go_out_when_quorum_alone_comes_back(base: Path) -> None:
    # Three corosyncs, dm-ulogd on nodes 1 and 2; the log is open on node 1 only.
    with Rig(base, corosyncs=3, daemons=(1, 2)) as rig:
        resume = rig.open(1)
        rig.settle()
        assert rig.answer(1, resume) is not None
        rig.bus.crash(3)                 # a corosync-only node goes: {1, 2} still quorate
        rig.settle()
        flush = rig.mark(1, [4])         # handed to corosync ...
        rig.crash(2)                     # ... when node 2 dies: node 1 alone is not quorate
        rig.settle()
        assert not rig.nodes[1].quorate
        assert rig.nodes[1].state.logs[UUID].marks[1][4]   # applied here, held for quorum
        assert rig.answer(1, flush) is None
        rig.bus.start(3)                 # quorate again, with no change of the group's members
        rig.settle()
        assert rig.nodes[1].quorate
        assert rig.answer(1, flush) is not None, "the FLUSH waits although node 1 is quorate"


def test_requests_that_waited_for_quorum_go_out_when_a_split_moves(base: Path) -> None:
    # Five corosyncs, dm-ulogd on nodes 1..3 (a majority of the five, so the cluster forms).
    with opened(base, corosyncs=5, daemons=(1, 2, 3)) as rig:
        rig.bus.partition([{1, 2}, {3, 4, 5}])   # nodes 1 and 2: 2 votes of 5
        rig.settle()
        assert not rig.nodes[1].quorate
        flush = rig.mark(1, [6])
        rig.settle()
        assert rig.answer(1, flush) is None
        rig.bus.partition([{1, 4, 5}, {2, 3}])   # node 1 quorate again; node 2 leaves its group
        rig.settle()
        assert rig.nodes[1].quorate and rig.nodes[1].current
        assert 2 in rig.nodes[1].state.unfenced or 2 not in rig.nodes[1].state.logs[UUID].opened
        assert rig.answer(1, flush) is not None, \
            f"node 1's FLUSH still waits ({len(rig.nodes[1].waiting)} request(s) in `waiting`)"


# --- a state transfer that completes after the next membership change --------------------------------


def _work(rig: Rig, n: int, seq: int) -> int | None:
    reply = rig.answer(n, seq)
    assert reply is not None and reply.error == 0, f"node {n}: GET_RESYNC_WORK not answered"
    found, region = wire.parse_resync_work(reply.data)
    return region if found else None


def test_a_transfer_that_completes_after_another_join_hands_no_region_twice(base: Path) -> None:
    # Every region to recover.
    with opened(base, corosyncs=4, daemons=(1, 2, 3, 4), nosync=False) as rig:
        # Node 4 is cut off (1 vote of 4); its kernel's GET_RESYNC_WORK waits for quorum.
        rig.bus.partition([{4}])
        rig.run([4])                     # node 4 reads the split before its kernel asks
        work4 = rig.send(4, T.GET_RESYNC_WORK)
        work2 = rig.send(2, T.GET_RESYNC_WORK)
        rig.run([2, 3, 4])               # node 1, the coordinator, is slow: nobody is declared gone
        assert _work(rig, 2, work2) == 0 and rig.answer(4, work4) is None
        rig.bus.heal()
        for node in rig.live():          # every member reads the heal and says HELLO
            step(node)
        rig.bus.order_all()
        for node in rig.live():          # the exchange is decided: node 4 takes node 1's state
            step(node)
        assert rig.nodes[4].receiving
        # Node 3's kernel asks for work (handed to corosync), then node 2's daemon restarts: a join.
        work3 = rig.send(3, T.GET_RESYNC_WORK)
        old2 = rig.nodes.pop(2)
        stop_node(old2)
        rig.bus.kill(old2.group)
        rig.start(2)
        rig.bus.order(3)                 # node 3's DURABLE ...
        rig.bus.order(3)                 # ... and its RESYNC_WORK, ordered after the join
        rig.bus.order(1)                 # the state's piece, sent before the join
        step(rig.nodes[4])
        # Node 4's HELLO of the new round and its GET_RESYNC_WORK, released on completion; the new
        # member's HELLO is still to come, so the round is not decided.
        while rig.bus.order(4):
            pass
        step(rig.nodes[4])
        rig.settle()
        regions = {3: _work(rig, 3, work3), 4: _work(rig, 4, work4)}
        assert regions[3] != regions[4], f"region {regions[3]} handed to nodes 3 and 4"
        owners = rig.nodes[1].state.logs[UUID].recovering
        assert all(owners.get(region) == n for n, region in regions.items() if region is not None), owners


def test_a_reply_of_a_history_given_up_is_not_sent(rig3: Rig) -> None:
    rig = rig3
    rig.unsync(1, 9)   # region 9 out of sync: node 1's kernel reports a failed write there
    assert rig.read(2, T.IN_SYNC, 9) == 0
    # Node 3's kernel asks for work just as the split comes: ordered on its side only, applied
    # there (region 9 for node 3), not answered (not quorate).
    work3 = rig.send(3, T.GET_RESYNC_WORK)
    rig.bus.partition([{3}])
    rig.run([3])
    assert rig.answer(3, work3) is None
    # The majority hands region 9 to node 2 (node 1, the coordinator, is slow to read the split:
    # nobody is declared departed), and its history grows the longer; then the heal: node 3 takes
    # the majority's state.
    work2 = rig.send(2, T.GET_RESYNC_WORK)
    failed = rig.send(2, T.SET_REGION_SYNC, wire.build_set_region_sync(12, 0))
    rig.run([2])
    assert _work(rig, 2, work2) == 9 and rig.answer(2, failed) is not None
    rig.bus.heal()
    rig.settle()
    assert 3 in rig.nodes[1].state.logs[UUID].opened and not rig.nodes[1].state.unfenced
    region3 = _work(rig, 3, work3)
    assert region3 != 9, "region 9 handed to nodes 2 and 3"


# --- the fence command ---------------------------------------------------------------------------------


def _until(rig: Rig, done: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    """Tick the coordinator (its fence commands are child processes) and settle the cluster until
    ``done``; a bound in time only against a hang, never a measure."""
    deadline = time.monotonic() + limit
    while not done():
        assert time.monotonic() < deadline, f"not within {limit} s: {what}"
        for node in rig.live():
            with node.lock:
                node.tick()
        rig.settle()
        time.sleep(0.005)


def test_a_failing_fence_command_keeps_the_regions_held_until_it_succeeds(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_mod, "FENCE_RETRY", 0.0)
    status, runs = base / "fence-status", base / "fence-runs"
    status.write_text("1")
    script = f'echo "$1" >> {runs}; exit "$(cat {status})"'
    with opened(base, fence=f"sh -c {shlex.quote(script)} fence") as rig:
        flush = rig.mark(3, [5])
        rig.settle()
        assert rig.answer(3, flush) is not None
        rig.crash(3)
        rig.settle()
        # The fence command fails, again and again: region 5 stays held on both survivors.
        _until(rig, lambda: runs.exists() and len(runs.read_text().split()) >= 2, "two fence attempts")
        assert set(runs.read_text().split()) == {"3"}
        assert rig.nodes[1].state.unfenced == [3]
        for n in (1, 2):
            assert rig.read(n, T.IS_CLEAN, 5) == 0 and rig.read(n, T.IN_SYNC, 5) == 0
            reply = rig.answer(n, rig.send(n, T.IS_REMOTE_RECOVERING, wire.build_u64(5)))
            assert reply is not None and wire.parse_remote_recovering(reply.data)[0] == 1
        work = rig.send(2, T.GET_RESYNC_WORK)
        rig.settle()
        assert _work(rig, 2, work) is None, "a region held for a fence was handed out"
        # Now it succeeds: FENCED; region 5 goes to one node, which puts it back in sync.
        status.write_text("0")
        _until(rig, lambda: not rig.nodes[1].state.unfenced and not rig.nodes[2].state.unfenced, "FENCED")
        work = rig.send(2, T.GET_RESYNC_WORK)
        rig.settle()
        assert _work(rig, 2, work) == 5
        work1 = rig.send(1, T.GET_RESYNC_WORK)
        rig.settle()
        assert _work(rig, 1, work1) is None
        for n, busy in ((1, 1), (2, 0)):
            reply = rig.answer(n, rig.send(n, T.IS_REMOTE_RECOVERING, wire.build_u64(5)))
            assert reply is not None and wire.parse_remote_recovering(reply.data)[0] == busy
        done = rig.send(2, T.SET_REGION_SYNC, wire.build_set_region_sync(5, 1))
        rig.settle()
        assert rig.answer(2, done) is not None
        assert [rig.read(n, T.IN_SYNC, 5) for n in (1, 2)] == [1, 1]
        assert [rig.read(n, T.IS_CLEAN, 5) for n in (1, 2)] == [1, 1]


def test_a_fence_command_that_hangs_is_killed_and_retried(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_mod, "FENCE_TIMEOUT", 0.0)
    monkeypatch.setattr(cluster_mod, "FENCE_RETRY", 3600.0)
    started: list[subprocess.Popen[bytes]] = []
    popen = subprocess.Popen

    def recording(*args: object, **kw: object) -> subprocess.Popen[bytes]:
        proc = popen(*args, **kw)  # type: ignore[call-overload]
        started.append(proc)
        return proc

    monkeypatch.setattr(cluster_mod.subprocess, "Popen", recording)
    with opened(base, fence="sleep 600") as rig:
        rig.mark(3, [5])
        rig.settle()
        rig.crash(3)
        rig.settle()
        coordinator = rig.nodes[1]
        _until(rig, lambda: 3 in coordinator.fence_after, "the fence command's timeout")
        assert len(started) == 1 and started[0].returncode is not None, "the hanging fence command still runs"
        assert 3 not in coordinator.fencing
        assert coordinator.state.unfenced == [3] and coordinator.state.logs[UUID].held_regions() == [5]


def test_stopping_while_a_fence_command_runs(base: Path) -> None:
    with opened(base, fence="sleep 600") as rig:
        coordinator = rig.nodes[1]
        rig.mark(3, [5])
        rig.settle()
        rig.crash(3)
        rig.settle()
        proc = coordinator.fencing[3]
        try:
            coordinator.close()
        finally:
            proc.kill()
            proc.wait()
        assert coordinator.group.closed


# --- forming the cluster -----------------------------------------------------------------------------


def _two_of_five(base: Path) -> Rig:
    """Five corosyncs, three of them down; daemons (fresh) on nodes 1 and 2: not quorate."""
    rig = Rig(base, corosyncs=5, daemons=())
    for n in (3, 4, 5):
        rig.bus.crash(n)
    for n in (1, 2):
        rig.start(n)
    return rig


def test_a_formation_that_waited_for_quorum_goes_ahead_when_quorum_comes(base: Path) -> None:
    # Five corosyncs; after a whole-cluster stop only nodes 1 and 2 are back, with their daemons
    # (2 of 5 votes). Then node 3's corosync comes back (its dm-ulogd is not started): quorate.
    with _two_of_five(base) as rig:
        resume = rig.open(1)
        rig.settle()
        assert not rig.nodes[1].current and rig.answer(1, resume) is None
        rig.bus.start(3)
        rig.settle()
        assert rig.nodes[1].quorate
        assert rig.nodes[1].current and rig.nodes[2].current, "quorate, 2 daemons of 3 corosyncs: not formed"
        assert rig.answer(1, resume) is not None


def test_a_cluster_forms_once_dm_ulogd_runs_on_a_majority_of_the_corosync_nodes(
        base: Path, caplog: pytest.LogCaptureFixture) -> None:
    """dm-ulogd runs on every node of the corosync cluster (docs/cluster.md, "Which nodes run
    dm-ulogd"): a formation needs the daemons of a majority of the nodes, so that what a quorate
    partition acknowledged is in the newest copy among them. With daemons on 2 of 4 nodes the
    cluster waits and says why; a third daemon, on a node with no mirror, lets it form."""
    with Rig(base, corosyncs=4, daemons=(1, 2)) as rig:
        resumes = {n: rig.open(n) for n in (1, 2)}
        rig.settle()
        assert all(rig.nodes[n].quorate for n in (1, 2))
        assert all(rig.answer(n, seq) is None for n, seq in resumes.items())
        assert "the daemons of 2 of 4 nodes are members" in caplog.text
        rig.start(3)
        rig.settle()
        assert all(rig.nodes[n].current for n in (1, 2, 3))
        for n, seq in resumes.items():
            reply = rig.answer(n, seq)
            assert reply is not None and reply.error == 0, f"node {n}: RESUME not answered"


# --- interleavings that hold (pinned) -------------------------------------------------------------------


def test_a_table_reload_keeps_the_log_open_and_releases_the_old_tables_marks(rig3: Rig) -> None:
    """Two luids of one uuid on node 1: the new table's CTR, the old one suspended, the new one
    resumed, the old one destroyed (its DTR is not the node's last: no CLOSE); then a reload
    abandoned (the new table's CTR and DTR): nothing changes for the log."""
    rig = rig3
    old, new, abandoned = 0x7001, 0x9001, 0x9002
    flush = rig.mark(1, [3])
    rig.settle()
    assert rig.answer(1, flush) is not None
    assert rig.answer(1, rig.send(1, T.CTR, rig.ctr, luid=new)).error == 0  # type: ignore[union-attr]
    for kind in (T.PRESUSPEND, T.POSTSUSPEND):
        assert rig.answer(1, rig.send(1, kind, luid=old)).error == 0  # type: ignore[union-attr]
    resume = rig.send(1, T.RESUME, luid=new)
    dtr = rig.send(1, T.DTR, luid=old)    # before the new RESUME is answered
    assert rig.answer(1, dtr).error == 0  # type: ignore[union-attr]
    rig.settle()
    assert rig.answer(1, resume).error == 0  # type: ignore[union-attr]
    for n in (1, 2, 3):
        shared = rig.nodes[n].state.logs[UUID]
        assert shared.opened[1].luid == new
        assert 1 not in shared.marks and shared.released[3] and not shared.in_sync(3)
        assert rig.read(n, T.IS_CLEAN, 3, luid=new if n == 1 else None) == 0
    # The new table marks and flushes as the old one did.
    mark = rig.send(1, T.MARK_REGION, wire.build_regions([4]), luid=new)
    assert rig.answer(1, mark).error == 0  # type: ignore[union-attr]
    flush = rig.send(1, T.FLUSH, luid=new)
    rig.settle()
    assert rig.answer(1, flush).error == 0  # type: ignore[union-attr]
    assert [rig.read(n, T.IS_CLEAN, 4, luid=new if n == 1 else None) for n in (1, 2, 3)] == [0, 0, 0]
    # An abandoned reload: the new table constructed, then destroyed; the live one goes on.
    assert rig.answer(1, rig.send(1, T.CTR, rig.ctr, luid=abandoned)).error == 0  # type: ignore[union-attr]
    assert rig.answer(1, rig.send(1, T.DTR, luid=abandoned)).error == 0  # type: ignore[union-attr]
    rig.settle()
    shared = rig.nodes[2].state.logs[UUID]
    assert shared.opened[1].luid == new and shared.marks[1][4]


def test_a_member_dying_before_its_durable_holds_the_flush_only_until_it_is_gone(rig3: Rig) -> None:
    rig = rig3
    flush = rig.mark(1, [6])
    rig.bus.order_all()
    rig.run([1, 2])          # node 2 applies, syncs and says DURABLE; node 3 never reads it
    assert rig.nodes[2].state.logs[UUID].marks[1][6]
    assert rig.answer(1, flush) is None, "answered before node 3 said its journal has it"
    rig.crash(3)
    rig.settle()
    assert rig.answer(1, flush).error == 0  # type: ignore[union-attr]
    assert [rig.read(n, T.IS_CLEAN, 6) for n in (1, 2)] == [0, 0]


def test_a_member_joining_while_a_flush_waits_holds_it_until_it_has_the_state_on_disk(rig3: Rig) -> None:
    rig = rig3
    rig.crash(3)
    rig.settle()
    flush = rig.mark(1, [6])
    rig.bus.order_all()
    for n in (1, 2):
        step(rig.nodes[n])   # applied on both, synced by neither
    rig.bus.start(3)
    rig.start(3)             # a join: node 3 takes the state
    for _ in range(50):      # everything but node 3's sync
        did = rig.bus.order_all() > 0
        for n, node in rig.nodes.items():
            did |= step(node)
            if n != 3:
                did |= sync_journal(node)
        if not did:
            break
    assert rig.nodes[3].current and rig.nodes[3].state.logs[UUID].marks[1][6]
    assert rig.answer(1, flush) is None, "answered before the new member has the state on disk"
    rig.settle()
    assert rig.answer(1, flush).error == 0  # type: ignore[union-attr]


# --- corosync lost under a request ----------------------------------------------------------------------


def test_a_flush_as_corosync_dies_waits_instead_of_failing(rig3: Rig) -> None:
    rig = rig3
    rig.bus.crash(3)         # node 3's corosync is gone; its cluster thread has not read it yet
    flush = rig.mark(3, [2])
    reply = rig.answer(3, flush)
    assert reply is None or reply.error == 0, f"FLUSH answered {reply.error}"


def test_members_reading_the_last_hello_around_a_quorum_change_decide_alike(base: Path) -> None:
    with _two_of_five(base) as rig:   # fresh state directories: a formation (2 votes of 5)
        resumes = {n: rig.open(n) for n in (1, 2)}
        for node in rig.live():
            step(node)                    # the join: each says HELLO
        rig.bus.order_all()
        step(rig.nodes[1])                # node 1 reads both HELLOs: not quorate, the formation waits
        rig.bus.start(3)                  # corosync 3 is back: quorate
        step(rig.nodes[2])                # node 2 reads the same HELLOs: quorate, it forms
        rig.settle()
        current = {n: rig.nodes[n].current for n in (1, 2)}
        assert current[1] == current[2], f"one agreed stream, two decisions: current {current}"
        assert all(rig.answer(n, seq) is not None for n, seq in resumes.items())


def test_a_resync_work_resent_while_the_first_waits_gets_the_same_region(rig3: Rig) -> None:
    rig = rig3
    rig.unsync(1, 11)
    rig.bus.partition([{3}])
    rig.run([2, 3])                           # node 1, the coordinator, reads the split late
    first = rig.send(3, T.GET_RESYNC_WORK)
    rig.run([2, 3])
    resend = rig.send(3, T.GET_RESYNC_WORK)   # the kernel's resend after 15 s
    rig.run([2, 3])
    assert rig.answer(3, first) is None and rig.answer(3, resend) is None
    rig.bus.heal()
    rig.settle()
    assert _work(rig, 3, first) == _work(rig, 3, resend) == 11
    assert rig.nodes[1].state.logs[UUID].recovering == {11: 3}
    other = rig.send(2, T.GET_RESYNC_WORK)
    rig.settle()
    assert _work(rig, 2, other) is None


# --- a transfer in pieces cut by a member's departure ------------------------------------------------


def _transfer_started(rig: Rig, joiner: int) -> None:
    """Let every member read the join, say HELLO and decide, so that the donor has handed its
    pieces to corosync, none of them ordered yet."""
    for node in rig.live():
        step(node)
    rig.bus.order_all()
    for node in rig.live():
        step(node)
    assert rig.nodes[joiner].receiving


@pytest.mark.parametrize("leaving", [
    pytest.param(1, id="the donor dies"),
    pytest.param(2, id="another member dies"),
])
def test_a_member_dying_during_a_transfer_in_pieces(base: Path, leaving: int) -> None:
    with opened(base, corosyncs=4, daemons=(1, 2, 3, 4), max_atomic=200, regions=64) as rig:
        rig.mark(2, [5, 40])
        rig.settle()
        rig.crash(4)
        rig.settle()
        rig.bus.start(4)
        rig.start(4)
        resume = rig.open(4)
        _transfer_started(rig, 4)
        assert len(rig.bus._flight[rig.nodes[1].group]) > 2, "the state was not cut into pieces"
        rig.bus.order(1)                 # the first piece only
        step(rig.nodes[4])
        rig.crash(leaving)               # its messages in flight are lost with it
        rig.settle()
        node4 = rig.nodes[4]
        assert node4.current and not node4.receiving and rig.answer(4, resume) is not None
        members = [n for n in rig.nodes]
        snaps = {n: rig.nodes[n].state.epoch for n in members}
        assert len(set(snaps.values())) == 1, snaps
        shared = node4.state.logs[UUID]
        if leaving == 2:
            assert not shared.in_sync(5) and not shared.in_sync(40)   # node 2's marks: departed
        else:
            assert shared.marks[2][5] and shared.marks[2][40]
        assert [rig.read(4, T.IS_CLEAN, r) for r in (5, 40)] == [0, 0]


# --- IS_REMOTE_RECOVERING ------------------------------------------------------------------------------


def _remote(rig: Rig, n: int, region: int, luid: int | None = None) -> tuple[int, int]:
    reply = rig.answer(n, rig.send(n, T.IS_REMOTE_RECOVERING, wire.build_u64(region), luid=luid))
    assert reply is not None and reply.error == 0
    recovering, hint = wire.parse_remote_recovering(reply.data)
    return recovering, hint


def test_is_remote_recovering_follows_the_recoverer_across_a_reload(rig3: Rig) -> None:
    rig = rig3
    rig.unsync(1, 6, 9)
    work = rig.send(2, T.GET_RESYNC_WORK)
    rig.settle()
    assert _work(rig, 2, work) == 6
    # Node 2 recovers region 6: the others hold their writes there, node 2 does not; the hint is
    # the first region out of sync.
    assert [_remote(rig, n, 6) for n in (1, 2, 3)] == [(1, 6), (0, 6), (1, 6)]
    # Region 9, out of sync and recovered by nobody yet: every node holds its writes (a write to
    # the default leg alone could race the copy of whoever is handed it next).
    assert [_remote(rig, n, 9)[0] for n in (1, 2, 3)] == [1, 1, 1]
    # Node 2's table is reloaded before its recovery ended: the old table's writes (and its
    # recovery) are over, region 6 is anyone's again (and nobody's yet: every node holds).
    new = 0x9202
    assert rig.answer(2, rig.send(2, T.CTR, rig.ctr, luid=new)).error == 0  # type: ignore[union-attr]
    for kind in (T.PRESUSPEND, T.POSTSUSPEND):
        rig.send(2, kind)
    resume = rig.send(2, T.RESUME, luid=new)
    rig.settle()
    assert rig.answer(2, resume) is not None
    rig.send(2, T.DTR)
    assert [_remote(rig, n, 6, luid=new if n == 2 else None)[0] for n in (1, 2, 3)] == [1, 1, 1]
    # Node 3 asked about region 9 above (1: its write waits): it is handed 9 first, then 6.
    for region in (9, 6):
        work = rig.send(3, T.GET_RESYNC_WORK)
        rig.settle()
        assert _work(rig, 3, work) == region
        if region == 9:
            done = rig.send(3, T.SET_REGION_SYNC, wire.build_set_region_sync(9, 1))
            rig.settle()
            assert rig.answer(3, done) is not None
    done = rig.send(3, T.SET_REGION_SYNC, wire.build_set_region_sync(6, 1))
    rig.settle()
    assert rig.answer(3, done) is not None
    assert [_remote(rig, n, 6, luid=new if n == 2 else None) for n in (1, 2, 3)] == [(0, 16)] * 3


def test_a_fenced_message_that_waited_does_not_release_a_later_departure(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_mod, "FENCE_RETRY", 0.0)
    status = base / "fence-status"
    status.write_text("0")
    fence = f"sh -c {shlex.quote(f'exit $(cat {status})')} fence"
    # Five corosyncs and daemons; node 1 (the coordinator) does not have this mirror open.
    with Rig(base, corosyncs=5, daemons=(1, 2, 3, 4, 5), fence=fence) as rig:
        resumes = {n: rig.open(n) for n in (2, 3, 4, 5)}
        rig.settle()
        assert all(rig.answer(n, seq) is not None for n, seq in resumes.items())
        # Node 5 crashes; node 1 declares it departed and runs the fence command ...
        rig.crash(5)
        for _ in range(3):
            rig.bus.order_all()
            for node in rig.live():
                step(node)
        proc = rig.nodes[1].fencing[5]
        assert proc.wait() == 0
        # ... which ends after node 1 was cut off: its FENCED(5) waits for quorum.
        rig.bus.partition([{1}])
        rig.run([1])
        assert any(kind.name == "FENCED" for kind, _, _ in rig.nodes[1].waiting)
        # The majority's coordinator (node 2) fences node 5 itself; node 5 comes back, marks
        # region 3, and crashes again; this time its fence fails: region 3 stays held.
        _until(rig, lambda: not rig.nodes[2].state.unfenced, "node 2 fences node 5")
        rig.bus.start(5)
        rig.start(5)
        resume = rig.open(5)
        rig.settle()
        assert rig.answer(5, resume) is not None
        flush = rig.mark(5, [3])
        rig.settle()
        assert rig.answer(5, flush) is not None
        status.write_text("1")
        rig.crash(5)
        rig.settle()
        assert rig.nodes[2].state.unfenced == [5]
        assert rig.nodes[2].state.logs[UUID].held_regions() == [3]
        # The split heals: node 1 takes the majority's state and sends what waited.
        rig.bus.heal()
        rig.settle()
        for n in (1, 2, 3, 4):
            state = rig.nodes[n].state
            assert state.unfenced == [5], f"node {n}: node 5 counts as fenced; its fence failed"
            assert state.logs[UUID].held_regions() == [3]


# --- a whole-cluster crash after one daemon served alone -------------------------------------------------


def test_marks_acknowledged_by_a_daemon_serving_alone_survive_a_whole_cluster_crash(base: Path) -> None:
    with opened(base) as rig:
        # Nodes 2 and 3 take their mirrors down and stop their daemons (maintenance): node 1 goes on
        # alone, quorate (every corosync runs), and acknowledges a FLUSH.
        for n in (2, 3):
            assert rig.answer(n, rig.send(n, T.DTR)) is not None
        rig.settle()
        for n in (2, 3):
            rig.nodes.pop(n).close()
        rig.settle()
        flush = rig.mark(1, [7])
        rig.settle()
        assert rig.answer(1, flush) is not None and rig.read(1, T.IS_CLEAN, 7) == 0
        # The whole cluster loses power; nodes 2 and 3 come back first. Both stopped while node 1
        # went on (their state directories say so): they wait for it rather than form from
        # their older copies.
        rig.crash(1)
        for n in (2, 3):
            rig.bus.crash(n)
        for n in (1, 2, 3):
            rig.bus.start(n)
        for n in (2, 3):
            assert rig.nodes_dir(n).joinpath("cluster", "left-behind").exists()
            rig.start(n)
            rig.open(n)
        rig.settle()
        assert not rig.nodes[2].current and not rig.nodes[3].current
        rig.start(1)
        rig.open(1)
        rig.settle()
        # Node 1's kernel was writing region 7 when the power went: it must be resynced.
        assert [rig.read(n, T.IN_SYNC, 7) for n in (1, 2, 3)] == [0, 0, 0]


# --- a write that raced a recovery's hand-out ------------------------------------------------------------


def test_a_write_to_a_region_out_of_sync_waits_for_its_recovery(rig3: Rig) -> None:
    """cmirrord's policy: IS_REMOTE_RECOVERING is 1 for a region out of sync to every node but its
    recoverer. Telling a writer 0 while nobody recovered the region let it write the default leg
    alone (NOSYNC, unmarked) while a node handed the region the next moment copied the legs and
    reported it in sync: legs different under a region read in sync. The writer's next
    GET_RESYNC_WORK asks for the region first, so a write waits for one region's recovery."""
    rig = rig3
    rig.unsync(1, 2, 4)
    assert [_remote(rig, n, 4)[0] for n in (1, 2, 3)] == [1, 1, 1]   # node 2's write to 4 waits
    work = rig.send(2, T.GET_RESYNC_WORK)
    rig.settle()
    assert _work(rig, 2, work) == 4, "node 2 was not handed the region its write waits for"
    assert [_remote(rig, n, 4)[0] for n in (1, 2, 3)] == [1, 0, 1]
    other = rig.send(1, T.GET_RESYNC_WORK)
    rig.settle()
    assert _work(rig, 1, other) == 2
    done = rig.send(2, T.SET_REGION_SYNC, wire.build_set_region_sync(4, 1))
    rig.settle()
    assert rig.answer(2, done) is not None
    assert [_remote(rig, n, 4)[0] for n in (1, 2, 3)] == [0, 0, 0]
    assert [rig.read(n, T.IN_SYNC, 4) for n in (1, 2, 3)] == [1, 1, 1]


def test_members_with_different_states_decide_a_formation_alike(base: Path) -> None:
    with opened(base, corosyncs=4, daemons=(1, 2, 3)) as rig:
        rig.start(4)                     # node 4's daemon opens the log too
        resume = rig.open(4)
        rig.settle()
        assert rig.answer(4, resume) is not None
        rig.crash(1)                     # node 1's state still knows node 4
        rig.settle()
        assert rig.answer(4, rig.send(4, T.DTR)) is not None   # node 4 closes it: unknown to the rest
        for region in (2, 3):
            rig.mark(2, [region])        # and the others' history grows past node 1's
            rig.settle()
        for n in (2, 3, 4):
            rig.crash(n)                 # the whole cluster is down; node 4 is gone for good
        for n in (1, 2, 3):
            rig.bus.start(n)
        resumes = {}
        for n in (1, 2):                 # two daemons of the three corosyncs: a majority
            rig.start(n)
            resumes[n] = rig.open(n)
        rig.settle()
        # Node 1's state names node 4, node 2's does not: both count the nodes every HELLO
        # names (4), of which 2 are here: both wait, until node 3's daemon is back.
        current = {n: rig.nodes[n].current for n in (1, 2)}
        assert current[1] == current[2], f"one agreed stream, two decisions: current {current}"
        assert not current[1]
        rig.start(3)
        resumes[3] = rig.open(3)
        rig.settle()
        assert all(rig.nodes[n].current for n in (1, 2, 3))
        assert all(rig.answer(n, seq) is not None for n, seq in resumes.items())


def test_marks_not_flushed_when_the_last_instance_goes_do_not_reach_the_next(rig3: Rig) -> None:
    rig = rig3
    mark = rig.send(1, T.MARK_REGION, wire.build_regions([5]))
    assert rig.answer(1, mark).error == 0  # type: ignore[union-attr]
    assert rig.answer(1, rig.send(1, T.DTR)).error == 0  # type: ignore[union-attr]   # no FLUSH after it
    rig.settle()
    new = 0x9001
    resume = rig.open(1, luid=new)
    rig.settle()
    assert rig.answer(1, resume).error == 0  # type: ignore[union-attr]
    flush = rig.send(1, T.FLUSH, luid=new)
    rig.settle()
    assert rig.answer(1, flush).error == 0  # type: ignore[union-attr]
    assert [rig.read(n, T.IS_CLEAN, 5) for n in (2, 3)] == [1, 1], "the old instance's mark came back"
