"""Cluster mode's node (``ulog_disk.daemon.cluster.ClusterNode``) on a fake corosync in one process:
several nodes, each with its own state directory and its own kernel, in interleavings the
corosync rig (``tests/cluster``) cannot choose — hypothesis picks when each node reads its
events, when a message is ordered, when a node crashes, restarts, is cut off or comes back.

Each node's kernel is a small model of dm-raid1's use of the log (one clustered log; requests of
its worker one at a time: FLUSH carrying marks, CLEAR + FLUSH, GET_RESYNC_WORK, SET_REGION_SYNC;
IS_CLEAN, IN_SYNC and IS_REMOTE_RECOVERING asked at any time once its RESUME is answered). It
follows the kernel's discipline: it marks a region only while IS_REMOTE_RECOVERING says 0 and it
is not recovering that region itself, it clears only what it marked, it reports a region in
sync only when it was handed it.

The oracle (checked as replies come and after every settle):

1. after settle, every member of a ring holds a byte-identical snapshot of the cluster state;
2. no region is clean on a trusted node (quorate and current) while a live kernel holds it
   marked (an acknowledged FLUSH, no CLEAR sent since) or a departed kernel held it marked
   (until someone reports it in sync);
3. GET_RESYNC_WORK never hands a region to a node while another still recovers it;
4. every region a crashed node held marked is out of sync on every quorate node after settle,
   until someone reports it in sync;
5. no state change (FLUSH with marks or clears, GET_RESYNC_WORK handing work, SET_REGION_SYNC)
   is acknowledged by a node that is not quorate at that instant;
6. no acknowledged mark is lost across a whole-cluster crash (every node power-cut, then
   restarted from its state directory with a new boot id): (4) for every kernel's marks;
   and, once the cluster is whole again, every kernel's requests are answered.

The nodes run without a fence command: a node that leaves the membership counts as fenced
(docs/cluster.md, Fencing). The oracle therefore treats a node whose daemon was killed, or that a
quorate majority cut off, as fenced at that moment — what a fence agent makes true by killing
it: its kernel's marks become a departed node's (2, and 4 for a node cut off) and it forgets
them, as a rebooted kernel would.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ulog_disk.cluster import messages as msg
from ulog_disk.cluster.corosync import ConfChange, CpgEvent, Deliver, Reason, TotemChange
from ulog_disk.daemon.cluster import ClusterNode
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import Reply, Request
from ulog_disk.protocol.wire import RequestType as T
from ulog_disk.testing.client import ctr_text
from ulog_disk.testing.fakecorosync import (
    MAX_ATOMIC,
    FakeBus,
    FakeCpgGroup,
    Unsettled,
    settle,
    step,
    stop_node,
    sync_journal,
)

UUID = "fake-cluster-log"
REGIONS = 16
#: A CPG atomic size under which the state of one 16-region log takes 2 to 4 pieces.
SMALL_ATOMIC = 200
_seqs = itertools.count(1)
_luids = itertools.count(0x5000)

# --- the fake corosync itself -----------------------------------------------------------------------


def drain(group: FakeCpgGroup) -> list[CpgEvent]:
    return group.dispatch()


def test_fake_bus_agreed_order_and_membership() -> None:
    bus = FakeBus(3)
    groups = {n: bus.group(n) for n in bus.nodeids}
    for g in groups.values():
        g.join()
    for g in groups.values():
        g.dispatch()
    groups[1].send(b"a1")
    groups[2].send(b"b1")
    groups[1].send(b"a2")
    for g in groups.values():
        g.pump()
    assert bus.order(2) and bus.order(1) and bus.order(1) and not bus.order()
    seen = {n: [e.data for e in drain(g) if isinstance(e, Deliver)] for n, g in groups.items()}
    assert seen == {n: [b"b1", b"a1", b"a2"] for n in groups}
    # A partition: the sides see each other leave; the majority is quorate, the other not.
    q1, q3 = bus.quorum(1), bus.quorum(3)
    groups[3].send(b"c-before")
    groups[3].pump()
    bus.partition([{3}])
    assert bus.quorate(1) and not bus.quorate(3)
    assert q3.getquorate() is False and q3.quorate is True  # known only once dispatched
    assert [c.quorate for c in q3.dispatch()] == [False]
    assert [c.quorate for c in q1.dispatch()] == [True]
    events = drain(groups[1])
    assert isinstance(events[0], TotemChange) and events[0].members == (1, 2)
    assert isinstance(events[1], ConfChange) and [a.nodeid for a in events[1].left] == [3]
    assert events[1].left[0].reason is Reason.NODEDOWN
    # In flight across the split: ordered in the sender's new ring only.
    bus.order_all()
    assert [e.data for e in drain(groups[3]) if isinstance(e, Deliver)] == [b"c-before"]
    assert not [e for e in drain(groups[2]) if isinstance(e, Deliver)]
    bus.heal()
    merged = [e for e in drain(groups[2]) if isinstance(e, ConfChange)]
    assert [(a.nodeid, a.reason) for a in merged[0].joined] == [(3, Reason.NODEUP)]
    merged3 = [e for e in drain(groups[3]) if isinstance(e, ConfChange)]
    assert sorted(a.nodeid for a in merged3[0].joined) == [1, 2]
    # A crash: in-flight messages are lost, the others see NODEDOWN; a kill: PROCDOWN, and
    # what the process had handed over is ordered first.
    groups[1].dispatch()
    groups[2].send(b"lost")
    groups[2].pump()
    bus.crash(2)
    assert bus.order_all() == 0
    assert [(a.nodeid, a.reason) for e in drain(groups[1]) if isinstance(e, ConfChange) for a in e.left] == \
        [(2, Reason.NODEDOWN)]
    groups[3].dispatch()
    groups[3].send(b"last words")
    groups[3].pump()
    bus.kill(groups[3])
    events = drain(groups[1])
    assert isinstance(events[0], Deliver) and events[0].data == b"last words"
    assert [(a.nodeid, a.reason) for a in events[1].left] == [(3, Reason.PROCDOWN)]
    for g in groups.values():
        g.close()
    q1.close()
    q3.close()


# --- the cluster: nodes, their kernels, the oracle ---------------------------------------------------


@dataclass
class Sent:
    kind: T
    data: bytes
    marks: frozenset[int] = frozenset()
    clears: frozenset[int] = frozenset()
    region: int = -1
    in_sync: bool = False


@dataclass
class Kernel:
    """One node's kernel: its instance of the log and what the daemon acknowledged to it."""

    nodeid: int
    luid: int
    resumed: bool = False
    #: seq → request sent and not answered.
    waiting: dict[int, Sent] = field(default_factory=dict)
    #: The seq of the worker's request in progress (one at a time), or of the RESUME.
    busy: int | None = None
    #: Regions marked by an acknowledged FLUSH, with no CLEAR sent since.
    marks: set[int] = field(default_factory=set)
    recovering: int | None = None
    #: The worker's request to send again once the RESUME after a daemon restart is answered.
    resend: Sent | None = None
    #: The luid of the table a reload replaced: destroyed once the new one's RESUME is answered.
    retired: int | None = None
    answers: dict[int, Reply] = field(default_factory=dict)


class Violation(AssertionError):
    pass


class Cluster:
    def __init__(self, nodes: int, base: Path, nosync: bool, max_atomic: int = MAX_ATOMIC) -> None:
        self.bus = FakeBus(nodes, max_atomic)
        self.base = base
        self.ctr = ctr_text(REGIONS, log_type="clustered-core", extra="nosync" if nosync else "")
        self.nodes: dict[int, ClusterNode] = {}
        self.kernels: dict[int, Kernel] = {}
        self.boots: Counter[int] = Counter()
        self.trace: list[str] = []
        # The oracle's books.
        self.handed: dict[int, int] = {}
        #: Regions a crashed (or cut off) node's kernel, or a reloaded table, held marked: not
        #: clean and out of sync.
        self.dead_oos: set[int] = set()
        #: Regions a killed daemon's kernel held marked: not clean (the daemon may come back
        #: before anyone declares it departed: then they stay its marks).
        self.dead_marked: set[int] = set()
        #: Regions with a SET_REGION_SYNC(in sync) sent and not answered (it may apply any time).
        self.sync_sent: Counter[int] = Counter()
        for n in self.bus.nodeids:
            self.start(n)

    # --- nodes ---

    def state_dir(self, n: int) -> Path:
        return self.base / f"node{n}"

    def start(self, n: int, reconnect: bool = False) -> None:
        if not reconnect:
            self.boots[n] += 1
        self.bus.start(n)
        node = ClusterNode(self.state_dir(n), f"boot-{n}-{self.boots[n]}", None, self.bus.group(n),
                           self.bus.quorum(n))
        node.send = partial(self._reply, n, node)
        self.nodes[n] = node
        if reconnect:
            kernel = self.kernels[n]
            kernel.waiting.clear()
            kernel.resumed = False
            self._send(n, T.CTR, self.ctr.encode() + b"\0")  # the reconnect form
        else:
            kernel = self.kernels[n] = Kernel(n, next(_luids))
            self._send(n, T.CTR, self.ctr.encode())
        kernel.busy = self._send(n, T.RESUME)

    def live(self) -> list[ClusterNode]:
        return list(self.nodes.values())

    def crash(self, n: int, wipe: bool = False) -> None:
        node = self.nodes.pop(n, None)
        if node is None:
            return
        # The contract keeps every mark through the loss of one node's state directory: the
        # others, all up and current, hold the state.
        others = [self.nodes.get(m) for m in self.bus.nodeids if m != n]
        wipe = wipe and not any(self.bus.side.values()) and all(o is not None and o.current for o in others)
        self.trace.append(f"crash {n}{' (state directory lost)' if wipe else ''}")
        self._fenced(n, self.dead_oos)
        self.kernels.pop(n)
        stop_node(node, power_cut=True)
        self.bus.crash(n)
        if wipe:
            shutil.rmtree(self.state_dir(n))

    def restart(self, n: int) -> None:
        if n in self.nodes:
            return
        self.trace.append(f"restart {n}")
        self.start(n)

    def daemon_restart(self, n: int, clean: bool = False) -> None:
        """The daemon killed (its group killed under it), or with ``clean`` stopped cleanly (it
        leaves the group), and started again on its state."""
        node = self.nodes.get(n)
        if node is None:
            return
        self.trace.append(f"daemon stop and start {n}" if clean else f"daemon restart {n}")
        kernel = self.kernels[n]
        if kernel.busy is not None and kernel.resumed:
            kernel.resend = kernel.waiting.get(kernel.busy)
        self._fenced(n, self.dead_marked)  # leaving the group, killed or clean, counts as fenced
        if clean:
            node.close()
        else:
            stop_node(node)
            self.bus.kill(node.group)
        self.start(n, reconnect=True)

    def reload(self, n: int) -> None:
        """A table reload: the new table's CTR, the old one suspended (its writes end), the new
        one resumed, the old one destroyed."""
        kernel = self.worker_free(n)
        if kernel is None:
            return
        self.trace.append(f"node {n}: table reload")
        old, new = kernel.luid, next(_luids)
        self._send(n, T.CTR, self.ctr.encode(), luid=new)
        self._send(n, T.PRESUSPEND, luid=old)
        self._send(n, T.POSTSUSPEND, luid=old)
        # The old table's writes have ended: its marks are out of sync from the new RESUME on.
        self._fenced(n, self.dead_oos)
        kernel.luid, kernel.retired, kernel.resumed = new, old, False
        kernel.busy = self._send(n, T.RESUME)

    def partition(self, n: int) -> None:
        if n not in self.nodes or any(side for side in self.bus.side.values()):
            return
        self.trace.append(f"partition {n} from the others")
        others = [m for m in self.bus.nodeids if m != n and m in self.bus.up]
        self.bus.partition([{n}])
        if others and self.bus.quorate(others[0]):
            # A quorate majority declares it departed: fenced, for the oracle.
            self._fenced(n, self.dead_oos)

    def heal(self) -> None:
        if any(self.bus.side.values()):
            self.trace.append("heal")
            self.bus.heal()

    def whole_restart(self) -> None:
        self.trace.append("whole-cluster crash and restart")
        for n in list(self.nodes):
            self.crash(n)
        for n in self.bus.nodeids:
            self.start(n)

    def _fenced(self, n: int, into: set[int]) -> None:
        kernel = self.kernels[n]
        into |= {r for r in kernel.marks if not self.sync_sent[r]}
        kernel.marks.clear()
        kernel.recovering = None
        for region, owner in list(self.handed.items()):
            if owner == n:
                del self.handed[region]

    # --- kernels ---

    def _send(self, n: int, kind: T, data: bytes = b"", luid: int | None = None, **meta: object) -> int:
        kernel = self.kernels[n]
        seq = next(_seqs)
        kernel.waiting[seq] = Sent(kind, data, **meta)  # type: ignore[arg-type]
        frame = wire.encode_request(Request(luid=kernel.luid if luid is None else luid, uuid=UUID,
                                            version=wire.DM_ULOG_REQUEST_VERSION, seq=seq,
                                            request_type=int(kind), data=data, cn_seq=seq))
        if not self.nodes[n].take(frame, n):
            # A retired table's DTR to a daemon started since its reload: not a log it knows
            # (the request loop answers it, as on one node).
            assert kind is T.DTR, f"node {n}: a {kind.name} of a clustered log not taken"
            kernel.waiting.pop(seq)
        return seq

    def _reply(self, n: int, node: ClusterNode, reply: Reply, address: object) -> None:
        if self.nodes.get(n) is not node:
            return  # a dead daemon's
        kernel = self.kernels[n]
        seq = reply.request.seq
        sent = kernel.waiting.pop(seq, None)
        if sent is None:
            return  # a late answer the kernel no longer waits for
        kernel.answers[seq] = reply
        if reply.error:
            raise Violation(f"node {n}: {sent.kind.name} answered {reply.error}")
        if kernel.busy == seq:
            kernel.busy = None
        agreed = (sent.kind is T.FLUSH and (sent.marks or sent.clears)) or sent.kind is T.SET_REGION_SYNC
        if sent.kind is T.GET_RESYNC_WORK:
            found, region = wire.parse_resync_work(reply.data)
            agreed = bool(found)
        if agreed and not self.bus.quorate(n):
            raise Violation(f"(5) node {n} acknowledged {sent.kind.name} while not quorate")
        if sent.kind is T.RESUME:
            kernel.resumed = True
            if kernel.retired is not None:
                old, kernel.retired = kernel.retired, None
                self._send(n, T.DTR, luid=old)
            if kernel.resend is not None:
                again, kernel.resend = kernel.resend, None
                kernel.busy = self._send(n, again.kind, again.data, marks=again.marks, clears=again.clears,
                                         region=again.region, in_sync=again.in_sync)
        elif sent.kind is T.FLUSH:
            kernel.marks |= sent.marks
        elif sent.kind is T.GET_RESYNC_WORK and found:
            owner = self.handed.get(region)
            if owner not in (None, n):
                raise Violation(f"(3) region {region} handed to node {n} while node {owner} recovers it")
            self.handed[region] = n
            kernel.recovering = region
        elif sent.kind is T.SET_REGION_SYNC and sent.in_sync:
            self.sync_sent[sent.region] -= 1

    def worker_free(self, n: int) -> Kernel | None:
        kernel = self.kernels.get(n)
        if kernel is None or not kernel.resumed or kernel.busy is not None:
            return None
        return kernel

    def read(self, n: int, kind: T, region: int) -> int:
        seq = self._send(n, kind, wire.build_u64(region))
        reply = self.kernels[n].answers.pop(seq)
        return int.from_bytes(reply.data[:8], "little", signed=True)

    def mark(self, n: int, regions: Sequence[int]) -> None:
        kernel = self.worker_free(n)
        if kernel is None:
            return
        # The kernel holds a write to a region another node recovers (or that it recovers).
        ok = sorted({r for r in regions
                     if r != kernel.recovering and not self.read(n, T.IS_REMOTE_RECOVERING, r)})
        if ok:
            self.trace.append(f"node {n}: FLUSH marking {ok}")
            kernel.busy = self._send(n, T.FLUSH, wire.build_regions(ok), marks=frozenset(ok))

    def clear(self, n: int, regions: Sequence[int]) -> None:
        kernel = self.worker_free(n)
        if kernel is None:
            return
        mine = sorted(set(regions) & kernel.marks)
        if not mine:
            return
        self.trace.append(f"node {n}: CLEAR {mine} + FLUSH")
        kernel.marks -= set(mine)
        self._send(n, T.CLEAR_REGION, wire.build_regions(mine))
        kernel.busy = self._send(n, T.FLUSH, b"", clears=frozenset(mine))

    def work(self, n: int) -> None:
        kernel = self.worker_free(n)
        if kernel is None or kernel.recovering is not None:
            return
        self.trace.append(f"node {n}: GET_RESYNC_WORK")
        kernel.busy = self._send(n, T.GET_RESYNC_WORK)

    def synced(self, n: int, region: int, ok: bool) -> None:
        kernel = self.worker_free(n)
        if kernel is None:
            return
        if kernel.recovering is not None:
            region, kernel.recovering = kernel.recovering, None
            self.handed.pop(region, None)
        else:
            ok = False  # a write to a leg failed: out of sync
        self.trace.append(f"node {n}: SET_REGION_SYNC({region}, {int(ok)})")
        if ok:
            self.sync_sent[region] += 1
            self.dead_oos.discard(region)
            self.dead_marked.discard(region)
        kernel.busy = self._send(n, T.SET_REGION_SYNC, wire.build_set_region_sync(region, int(ok)),
                                 region=region, in_sync=ok)

    # --- the oracle ---

    def trusted(self, n: int) -> bool:
        node, kernel = self.nodes.get(n), self.kernels.get(n)
        return bool(node and kernel and kernel.resumed and self.bus.quorate(n) and node.current
                    and not node.receiving)

    def held(self) -> set[int]:
        out = self.dead_oos | self.dead_marked
        for kernel in self.kernels.values():
            out |= kernel.marks
        return out

    def probe(self, n: int, kind: T, region: int) -> None:
        if not self.trusted(n):
            return
        answer = self.read(n, kind, region)
        if kind is T.IS_CLEAN and answer and region in self.held():
            raise Violation(f"(2) node {n}: region {region} clean while held ({self.holders(region)})")

    def holders(self, region: int) -> str:
        who = [f"node {k.nodeid}'s kernel" for k in self.kernels.values() if region in k.marks]
        if region in self.dead_oos:
            who.append("a crashed node")
        if region in self.dead_marked:
            who.append("a killed daemon")
        return ", ".join(who)

    def settle(self, full: bool = False, rounds: int = 300) -> None:
        self.trace.append("settle")
        settle(self.bus, self.live(), rounds)
        for ring in self.bus.rings():
            snaps = {n: msg.encode_snapshot(self.nodes[n].state) for n in sorted(ring)
                     if n in self.nodes and self.nodes[n].current}
            if len(set(snaps.values())) > 1:
                epochs = {n: self.nodes[n].state.epoch for n in snaps}
                raise Violation(f"(1) members of ring {sorted(ring)} differ after settle (epochs {epochs})")
            # A daemon here stopped while others went on (its state directory says so): if its
            # copy is the newest here, they wait for one of those (docs/cluster.md, Formation).
            left_behind = any(self.nodes[n].left_behind for n in ring if n in self.nodes) and \
                not set(self.bus.nodeids) <= set(ring)
            if self.bus.quorate(min(ring)) and not left_behind:
                stale = [n for n in ring if n in self.nodes and not self.nodes[n].current]
                if stale:
                    raise Violation(f"nodes {stale} of the quorate ring {sorted(ring)} not current "
                                    "after settle")
        held = self.held()
        for n in self.nodes:
            if not self.trusted(n):
                continue
            for region in sorted(held):
                if self.read(n, T.IS_CLEAN, region):
                    raise Violation(f"(2) node {n}: region {region} clean while held "
                                    f"({self.holders(region)})")
            for region in sorted(self.dead_oos):
                if self.read(n, T.IN_SYNC, region):
                    raise Violation(f"(4) node {n}: region {region} a crashed node held marked reads in sync")
        if full:
            for n, kernel in self.kernels.items():
                if kernel.waiting or not kernel.resumed:
                    kinds = [s.kind.name for s in kernel.waiting.values()]
                    raise Violation(f"node {n}: the cluster is whole and settled, yet its kernel waits "
                                    f"for {kinds}")

    def close(self) -> None:
        for n in list(self.nodes):
            if self.nodes[n].closed:
                continue
            node = self.nodes.pop(n)
            stop_node(node)
            node.group.closed = node.quorum.closed = True

    # --- streams ---

    def run(self, stream: Sequence[tuple[object, ...]]) -> None:
        for op in stream:
            self.apply(op)
        self.heal()
        for n in self.bus.nodeids:
            self.restart(n)
        self.settle(full=True)

    def apply(self, op: tuple[object, ...]) -> None:
        name, *args = op
        n = args[0] if args else None
        if isinstance(n, int) and n > len(self.bus.nodeids):
            n = (n - 1) % len(self.bus.nodeids) + 1
        local = ("mark", "clear", "work", "synced", "read", "order", "dispatch", "sync", "reload")
        if name in local and n not in self.nodes:
            return
        if name == "mark":
            self.mark(n, args[1])
        elif name == "clear":
            self.clear(n, args[1])
        elif name == "work":
            self.work(n)
        elif name == "synced":
            self.synced(n, args[1], args[2])
        elif name == "read":
            self.probe(n, (T.IS_CLEAN, T.IN_SYNC, T.IS_REMOTE_RECOVERING)[args[1]], args[2])
        elif name == "order":
            self.bus.order(n)
        elif name == "dispatch":
            step(self.nodes[n])
        elif name == "sync":
            sync_journal(self.nodes[n])
            step(self.nodes[n])
        elif name == "settle":
            self.settle()
        elif name == "crash":
            self.crash(n, wipe=args[1])
        elif name == "restart":
            self.restart(n)
        elif name == "daemon_restart":
            self.daemon_restart(n)
        elif name == "clean_restart":
            self.daemon_restart(n, clean=True)
        elif name == "reload":
            self.reload(n)
        elif name == "partition":
            self.partition(n)
        elif name == "heal":
            self.heal()
        elif name == "whole_restart":
            self.whole_restart()
        else:
            raise ValueError(f"unknown step {op!r}")


def run_stream(base: Path, nodes: int, nosync: bool, stream: Sequence[tuple[object, ...]],
               max_atomic: int = MAX_ATOMIC) -> Cluster:
    cluster = Cluster(nodes, base, nosync, max_atomic)
    try:
        cluster.settle()
        cluster.run(stream)
    except (Unsettled, Violation) as exc:
        raise Violation(f"{exc}\nsteps: {cluster.trace}") from None
    finally:
        cluster.close()
    return cluster


@contextmanager
def settled(base: Path, nodes: int = 3, nosync: bool = True) -> Iterator[Cluster]:
    """A cluster of ``nodes`` serving the log on every node, settled; closed at the end."""
    c = Cluster(nodes, base, nosync=nosync)
    try:
        c.settle(full=True)
        yield c
    finally:
        c.close()


# --- plain cases ----------------------------------------------------------------------------------


def test_three_nodes_share_one_log(base: Path) -> None:
    with settled(base) as c:
        c.mark(1, [3, 4])
        c.settle()
        assert c.kernels[1].marks == {3, 4}
        assert [c.read(n, T.IS_CLEAN, 3) for n in (1, 2, 3)] == [0, 0, 0]
        c.clear(1, [3])
        c.settle(full=True)
        assert [c.read(n, T.IS_CLEAN, 3) for n in (1, 2, 3)] == [1, 1, 1]
        assert [c.read(n, T.IS_CLEAN, 4) for n in (1, 2, 3)] == [0, 0, 0]
        c.crash(1)
        c.settle()
        assert [c.read(n, T.IN_SYNC, 4) for n in (2, 3)] == [0, 0]
        c.restart(1)
        c.settle(full=True)
        snaps = {msg.encode_snapshot(c.nodes[n].state) for n in (1, 2, 3)}
        assert len(snaps) == 1


def test_minority_acknowledges_nothing_and_catches_up(base: Path) -> None:
    with settled(base) as c:
        c.partition(3)
        c.mark(3, [7])
        c.mark(1, [8])
        c.settle()
        assert c.kernels[3].busy is not None, "the cut-off node answered a FLUSH"
        assert c.kernels[1].marks == {8}
        c.heal()
        c.settle(full=True)
        assert c.kernels[3].marks == {7}
        assert all(c.read(n, T.IS_CLEAN, r) == 0 for n in (1, 2, 3) for r in (7, 8))


def test_whole_cluster_crash_keeps_acknowledged_marks(base: Path) -> None:
    with settled(base) as c:
        c.mark(2, [1, 9])
        c.settle()
        c.whole_restart()
        c.settle(full=True)
        assert c.dead_oos == {1, 9}
        assert all(c.read(n, T.IN_SYNC, r) == 0 for n in (1, 2, 3) for r in (1, 9))


# --- what the model found (each a minimal stream hypothesis shrank to) -----------------------------


def test_a_hello_said_twice_in_one_round_does_not_restart_the_exchange(base: Path) -> None:
    """M -> M' -> M with the same members, every change handled in one batch: each member says
    HELLO twice under one round name; the late copy once started the exchange again, forever."""
    with settled(base) as c:
        # Nobody reads its events in between: every member handles the three changes at once.
        c.daemon_restart(2)
        c.partition(1)
        c.heal()
        c.settle(rounds=300)


def test_a_restarted_daemon_does_not_win_the_exchange_with_a_stale_state(base: Path) -> None:
    """A restarted daemon (not current) tied on the HELLO epoch with current members whose HELLOs
    predate what followed the join, and won by its lower node id: it kept its state directory's
    copy without that, and said DURABLE for a FLUSH it never applied."""
    with settled(base) as c:
        c.mark(2, [0])                 # in flight when node 1's daemon is killed
        c.daemon_restart(1)
        settle(c.bus, c.live())
        assert c.kernels[2].marks == {0}, "node 2's FLUSH was acknowledged"
        assert c.read(1, T.IS_CLEAN, 0) == 0, "node 1 says region 0 is clean while node 2 holds it marked"
        c.settle()


def test_the_hello_digest_tells_states_apart() -> None:
    """What the state exchange compares when epochs are equal (``messages.digest``)."""
    from ulog_disk.cluster.shared import ClusterState, Flush, Open

    a, b = ClusterState(), ClusterState()
    for state in (a, b):
        state.apply(Open(1, "u", 5, "boot", 16, True))
    b.apply(Flush(2, "u", (0,), ()))
    a.epoch = b.epoch
    assert msg.encode_snapshot(a) != msg.encode_snapshot(b)
    assert msg.digest(msg.encode_snapshot(a)) != msg.digest(msg.encode_snapshot(b))


def test_two_sides_that_applied_one_message_each_reconcile(base: Path) -> None:
    """A 2-node split with one message ordered on each side: equal epochs, different states
    (the HELLO digest was one constant, so nobody took the other's state)."""
    with settled(base, nodes=2) as c:
        c.mark(1, [3])      # in flight when the split comes: ordered on node 1's side only
        c.mark(2, [0])      # and this on node 2's
        c.partition(1)      # two nodes: neither side is quorate, neither FLUSH is answered
        c.settle()
        c.heal()
        c.settle(full=True)


def test_a_late_membership_change_declares_no_live_member_departed(base: Path) -> None:
    """A split and its heal read late: node 1 handled 'nodes 2 and 3 left' while corosync already
    said quorate, and declared them DEPARTED in the ring where they are members again; node 2's
    marks were released while its kernel held them, and a recovery made the region clean."""
    with settled(base) as c:
        c.mark(2, [5])
        c.settle()
        assert c.kernels[2].marks == {5}
        c.partition(1)
        c.heal()            # before any node read the split
        c.settle()
        # Node 3 restarts (its RESUME opens the log again: the others were all declared gone,
        # so it is the only one GET_RESYNC_WORK serves) and recovers region 5.
        c.crash(3)
        c.restart(3)
        c.settle()
        c.work(3)
        c.settle()
        c.synced(3, 0, True)
        c.settle()          # (2): region 5 clean while node 2's kernel holds it marked


def test_a_stale_hello_of_an_earlier_round_of_the_same_name_is_not_counted(base: Path) -> None:
    """M -> M' -> M (a daemon restart's join, a split, its heal) names two rounds alike; a member
    that handled the changes in one batch said HELLO for both, and the first copy (sent before it
    applied what its side ordered during the split) was counted in the second round: the donor
    lacked a FLUSH the majority had acknowledged."""
    with settled(base, nosync=True) as c:
        # Nobody reads anything from here to the settle: each node handles every change at once.
        c.daemon_restart(2)
        c.mark(3, [0])      # in flight: ordered on the majority's side of the split
        c.partition(1)
        c.heal()
        settle(c.bus, c.live())
        assert c.kernels[3].marks == {0}, "node 3's FLUSH was acknowledged"
        assert [c.read(n, T.IS_CLEAN, 0) for n in (1, 2)] == [0, 0], "region 0 clean on nodes 1 and 2"
        c.settle(full=True)


# --- streams ------------------------------------------------------------------------------------------

nodes_ = st.integers(1, 3)
regions_ = st.integers(0, REGIONS - 1)

steps = st.one_of(
    st.tuples(st.just("mark"), nodes_, st.lists(regions_, min_size=1, max_size=3).map(tuple)),
    st.tuples(st.just("clear"), nodes_, st.lists(regions_, min_size=1, max_size=3).map(tuple)),
    st.tuples(st.just("work"), nodes_),
    st.tuples(st.just("synced"), nodes_, regions_, st.booleans()),
    st.tuples(st.just("read"), nodes_, st.integers(0, 2), regions_),
    st.tuples(st.just("order"), nodes_),
    st.tuples(st.just("dispatch"), nodes_),
    st.tuples(st.just("sync"), nodes_),
    st.tuples(st.just("settle")),
    st.tuples(st.just("crash"), nodes_, st.booleans()),
    st.tuples(st.just("restart"), nodes_),
    st.tuples(st.just("daemon_restart"), nodes_),
    st.tuples(st.just("clean_restart"), nodes_),
    st.tuples(st.just("reload"), nodes_),
    st.tuples(st.just("partition"), nodes_),
    st.tuples(st.just("heal")),
    st.tuples(st.just("whole_restart")),
)


#: Examples per run (ULOG_CLUSTER_EXAMPLES=5000 for a long search): about 15 ms each.
EXAMPLES = int(os.environ.get("ULOG_CLUSTER_EXAMPLES", "200"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(nodes=st.integers(2, 3), nosync=st.booleans(), small=st.booleans(),
       stream=st.lists(steps, max_size=50))
def test_random_streams_keep_the_contract(base: Path, nodes: int, nosync: bool, small: bool,
                                          stream: list[tuple[object, ...]]) -> None:
    """``small``: a CPG atomic size that sends the state in several pieces (interleaved with the
    others' messages, cut by membership changes)."""
    for child in base.iterdir():
        shutil.rmtree(child)
    atomic = SMALL_ATOMIC if small else MAX_ATOMIC
    run_stream(base, nodes, nosync, stream, max_atomic=atomic)


def test_a_node_that_departs_twice_is_released_twice(base: Path) -> None:
    """Without a fence command the coordinator counts a departed node fenced at once, each time it
    departs: its second departure's regions are released for recovery as the first's were."""
    with settled(base) as c:
        for region in (5, 9):
            c.mark(3, [region])
            c.settle()
            c.crash(3)
            c.settle()
            shared = c.nodes[1].state.logs[UUID]
            assert not shared.held, f"node 3's regions {shared.held_regions()} still held for a fence"
            assert shared.released[region] and not shared.in_sync(region)
            c.restart(3)
            c.settle(full=True)
