"""Corosync in one process, for cluster mode's fast tests: several :class:`ClusterNode` on one
:class:`FakeBus`, the test choosing every interleaving a real cluster leaves to chance.

The rig of ``tests/cluster`` runs the real corosync in network namespaces: faithful, but slow
(seconds per membership change) and never twice the same. Here the bus plays corosync for N
nodes (node ids 1..N, one vote each) and the test (or hypothesis) decides when each thing
happens:

* **the agreed order.** A node's :meth:`FakeCpgGroup.pump` hands its queued messages to the bus
  (as ``cpg_mcast_joined`` hands them to the local corosync); they stay *in flight* until
  :meth:`FakeBus.order` puts the oldest of one sender's into its ring's agreed order: that
  appends the :class:`Deliver` to the inbox of every group member of the ring at once, so every
  member sees the same sequence (one sender's messages in the order it sent them). A node sees
  its inbox when the test dispatches it (its descriptor is a real pipe, readable while the inbox
  is not empty, so a node's ``fds()`` can be selected on).
* **membership, at the same place of the order for every member** (as CPG does): a join, a
  leave (``LEAVE``), a daemon killed (``PROCDOWN``: what it had handed to corosync is ordered
  first), a node crashed (``NODEDOWN``: its corosync dies with it, so its messages still in
  flight are lost), a partition (two rings, each with its own order and quorum: the side with a
  majority of the votes is quorate) and its heal (a merge: ``NODEUP`` for the other side's
  members). A ring change comes as a :class:`TotemChange` and then the :class:`ConfChange`,
  and every quorum handle of the ring gets a :class:`QuorumChange`.
* **quorum**: :meth:`FakeQuorum.getquorate` answers the truth of this instant (it asks the local
  corosync); :attr:`FakeQuorum.quorate` is what the last dispatched change said.

Messages in flight at a ring change stay with the sender and are ordered in its new ring (totem
originates what was queued during a membership change in the ring it forms next): after a split
the sender's side applies them and the other side never does. They are ordered before the ring
changes again: a message never outlives two ring changes.

:func:`settle` runs a set of nodes until nothing is left to do: every message ordered, every
inbox dispatched, and every node's sync thread idle with its wake-up pipe read. :func:`stop_node`
ends a node as ``kill -9`` would (no last sync of its journal), and with ``power_cut`` also drops
what its journal had not made durable, as a power cut does with the page cache.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

from ..cluster.corosync import (
    CS_ERR_BAD_HANDLE,
    CS_ERR_LIBRARY,
    CS_ERR_NOT_EXIST,
    Address,
    ConfChange,
    ConnectionLost,
    CorosyncError,
    CorosyncUnavailable,
    CpgEvent,
    Deliver,
    MessageTooLarge,
    QuorumChange,
    Reason,
    RingId,
    SendQueue,
    TotemChange,
)
from ..storage.journal import HEADER_BYTES

if TYPE_CHECKING:
    from ..daemon.cluster import ClusterNode

#: CPG's atomic message size on a default corosync 3 (knet, MTU 1500): what the rig measured.
MAX_ATOMIC = 1_048_000


class _Pipe:
    """A readable-when-not-empty descriptor for a fake handle."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        self.closed = False

    def ring(self) -> None:
        if not self.closed:
            with contextlib.suppress(BlockingIOError):
                os.write(self.w, b"!")

    def drain(self) -> None:
        if not self.closed:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.r, 4096):
                    pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.r)
            os.close(self.w)


E = TypeVar("E")


class _FakeHandle(Generic[E]):
    """What both fake handles do with the events the bus delivers them: held for the next
    dispatch, with a descriptor that is readable while any are held (what the loop selects on)."""

    closed: bool

    def __init__(self) -> None:
        self._events: list[E] = []
        self._pipe = _Pipe()
        # A node's cluster thread dispatches while the test's thread delivers.
        self._events_lock = threading.Lock()

    def _push(self, event: E) -> None:
        with self._events_lock:
            self._events.append(event)
        self._pipe.ring()

    @property
    def inbox(self) -> int:
        """Events delivered to this handle and not yet dispatched."""
        return len(self._events)

    def fileno(self) -> int:
        return self._pipe.r

    def _take(self, call: str) -> list[E]:
        """The events a dispatch hands over (the descriptor read empty); a closed handle refuses."""
        if self.closed:
            raise ConnectionLost(call, CS_ERR_BAD_HANDLE, "the handle is closed")
        with self._events_lock:
            self._pipe.drain()
            events, self._events = self._events, []
        return events

    @staticmethod
    def _lost(call: str, events: list[E]) -> ConnectionLost:
        """What a dispatch raises once the connection is lost: it carries the events taken."""
        error = ConnectionLost(call, CS_ERR_BAD_HANDLE, "the connection to corosync is lost")
        error.events = list(events)
        return error


class FakeCpgGroup(SendQueue, _FakeHandle[CpgEvent]):
    """What :class:`~ulog_disk.cluster.corosync.CpgGroup` offers the daemon, on a :class:`FakeBus`."""

    def __init__(self, bus: FakeBus, nodeid: int, name: bytes | str, pid: int) -> None:
        self.bus = bus
        self.nodeid = nodeid
        self.pid = pid
        self.name = name.encode() if isinstance(name, str) else bytes(name)
        self.max_atomic = bus.max_atomic
        self.joined = False
        self.closed = False
        self.lost = False
        self.counters = {"sent": 0, "delivered": 0, "try_again": 0, "flow_control": 0}
        self._queue: deque[bytes] = deque()
        super().__init__()

    @property
    def member(self) -> tuple[int, int]:
        return (self.nodeid, self.pid)

    def __repr__(self) -> str:
        return f"<FakeCpgGroup node {self.nodeid} pid {self.pid}>"

    # --- the bus's side ---

    # --- membership ---

    def join(self, timeout: float = 5.0) -> None:
        if self.lost or self.closed:
            raise ConnectionLost("cpg_join", CS_ERR_BAD_HANDLE, "the connection to corosync is lost")
        if not self.joined:
            self.bus._join(self)

    def leave(self) -> None:
        if self.joined and not self.lost:
            self.bus._leave(self, Reason.LEAVE)

    # --- the loop's side ---

    def dispatch(self) -> list[CpgEvent]:
        events = self._take("cpg_dispatch")
        self.counters["delivered"] += sum(1 for e in events if isinstance(e, Deliver))
        if self.lost:
            raise self._lost("cpg_dispatch", events)
        return events

    def flow_control(self) -> bool:
        return False

    def mcast(self, data: bytes | bytearray | memoryview | Sequence[bytes]) -> None:
        if isinstance(data, bytes | bytearray | memoryview):
            payload = bytes(data)
        else:
            payload = b"".join(bytes(p) for p in data)
        if len(payload) > self.max_atomic:
            raise MessageTooLarge(len(payload), self.max_atomic)
        if self.lost or self.closed:
            raise ConnectionLost("cpg_mcast_joined", CS_ERR_BAD_HANDLE, "the connection to corosync is lost")
        if not self.joined:
            raise CorosyncError("cpg_mcast_joined", CS_ERR_NOT_EXIST, "not joined to the group")
        self.bus._in_flight(self, payload)
        self.counters["sent"] += 1

    def pump(self) -> bool:
        while self._queue:
            self.mcast(self._queue[0])
            self._queue.popleft()
        return True

    def retry_in(self) -> float | None:
        return None if not self._queue else 0.0

    def close(self) -> None:
        """Finalize: a member still joined leaves (``LEAVE``), as ``cpg_finalize`` does."""
        if self.closed:
            return
        if self.joined and not self.lost:
            self.bus._leave(self, Reason.LEAVE)
        self.closed = True
        self.joined = False
        self._pipe.close()


class FakeQuorum(_FakeHandle[QuorumChange]):
    """What :class:`~ulog_disk.cluster.corosync.Quorum` offers the daemon, on a :class:`FakeBus`."""

    provider = True

    def __init__(self, bus: FakeBus, nodeid: int) -> None:
        self.bus = bus
        self.nodeid = nodeid
        self.closed = False
        self.lost = False
        super().__init__()
        self.quorate = bus.quorate(nodeid)
        self.members: tuple[int, ...] = tuple(sorted(bus.ring(nodeid)))
        self.ring_seq = bus.ring_seq

    def getquorate(self) -> bool:
        if self.closed or self.lost:
            raise ConnectionLost("quorum_getquorate", CS_ERR_BAD_HANDLE, "the connection to corosync is lost")
        return self.bus.quorate(self.nodeid)

    def dispatch(self) -> list[QuorumChange]:
        events = self._take("quorum_dispatch")
        for event in events:
            self.quorate, self.ring_seq, self.members = event.quorate, event.ring_seq, event.members
        if self.lost:
            self.quorate = False
            raise self._lost("quorum_dispatch", events)
        return events

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._pipe.close()
            self.bus._quorums.discard(self)


class FakeBus:
    """Corosync for the nodes ``1..nodes`` (one vote each), in this process."""

    def __init__(self, nodes: int = 3, max_atomic: int = MAX_ATOMIC) -> None:
        self.nodeids = tuple(range(1, nodes + 1))
        self.max_atomic = max_atomic
        #: Nodes whose corosync runs.
        self.up: set[int] = set(self.nodeids)
        #: Each node's side of a partition (0 when there is none).
        self.side: dict[int, int] = dict.fromkeys(self.nodeids, 0)
        self.ring_seq = 4
        self._groups: list[FakeCpgGroup] = []          # joined, in join order
        self._flight: dict[FakeCpgGroup, deque[bytes]] = {}
        self._flight_lock = threading.Lock()
        #: How many of a sender's in-flight messages were already in flight at the last ring
        #: change: they are ordered before the next one.
        self._carried: dict[FakeCpgGroup, int] = {}
        self._quorums: set[FakeQuorum] = set()
        self._pids = itertools.count(1000)
        #: Every event in the order it was delivered, with the ring it was delivered in: what
        #: a test prints when it fails.
        self.history: list[tuple[frozenset[int], CpgEvent]] = []

    # --- what corosync knows ---

    def ring(self, nodeid: int) -> frozenset[int]:
        """The corosync nodes ``nodeid`` sees (its totem ring); empty when its corosync is down."""
        if nodeid not in self.up:
            return frozenset()
        return frozenset(n for n in self.up if self.side[n] == self.side[nodeid])

    def rings(self) -> list[frozenset[int]]:
        out: list[frozenset[int]] = []
        for n in sorted(self.up):
            ring = self.ring(n)
            if ring not in out:
                out.append(ring)
        return out

    def quorate(self, nodeid: int) -> bool:
        return 2 * len(self.ring(nodeid)) > len(self.nodeids)

    def members(self, ring: Iterable[int] | None = None) -> list[FakeCpgGroup]:
        """The joined groups (of ``ring`` only, when given), in join order."""
        nodes = None if ring is None else set(ring)
        return [g for g in self._groups if nodes is None or g.nodeid in nodes]

    # --- connecting ---

    def group(self, nodeid: int, name: bytes | str = b"dm-ulogd") -> FakeCpgGroup:
        """A new CPG connection of a process on ``nodeid`` (not joined yet)."""
        if nodeid not in self.up:
            raise CorosyncUnavailable("cpg_model_initialize", CS_ERR_LIBRARY,
                                      f"node {nodeid}: corosync is not running")
        return FakeCpgGroup(self, nodeid, name, next(self._pids))

    def quorum(self, nodeid: int) -> FakeQuorum:
        if nodeid not in self.up:
            raise CorosyncUnavailable("quorum_initialize", CS_ERR_LIBRARY,
                                      f"node {nodeid}: corosync is not running")
        q = FakeQuorum(self, nodeid)
        self._quorums.add(q)
        return q

    # --- the agreed order ---

    def _in_flight(self, group: FakeCpgGroup, data: bytes) -> None:
        with self._flight_lock:  # a node's cluster thread sends while the test's thread orders
            self._flight.setdefault(group, deque()).append(data)

    def in_flight(self) -> list[FakeCpgGroup]:
        """Senders with messages handed to corosync and not yet ordered, oldest sender first."""
        with self._flight_lock:
            return [g for g, q in self._flight.items() if q]

    def order(self, sender: FakeCpgGroup | int | None = None) -> bool:
        """Put the oldest in-flight message of ``sender`` (a group, or the first in-flight group
        of a node id; the first sender with one when None) into its ring's agreed order.
        False when there was none."""
        if isinstance(sender, int):
            sender = next((g for g in self.in_flight() if g.nodeid == sender), None)
        elif sender is None:
            sender = next(iter(self.in_flight()), None)
        with self._flight_lock:
            if sender is None or not self._flight.get(sender):
                return False
            data = self._flight[sender].popleft()
            if not self._flight[sender]:
                del self._flight[sender]
        if self._carried.get(sender):
            self._carried[sender] -= 1
        self._deliver(self.ring(sender.nodeid), Deliver(sender.nodeid, sender.pid, data))
        return True

    def order_all(self) -> int:
        count = 0
        while self.order():
            count += 1
        return count

    def _deliver(self, ring: frozenset[int], event: CpgEvent) -> None:
        self.history.append((ring, event))
        for g in self.members(ring):
            g._push(event)

    # --- membership ---

    def _confchg(self, ring: frozenset[int], left: Sequence[Address], joined: Sequence[Address]) -> None:
        members = tuple(Address(g.nodeid, g.pid) for g in self.members(ring))
        self._deliver(ring, ConfChange(members, tuple(left), tuple(joined)))

    def _join(self, group: FakeCpgGroup) -> None:
        ring = self.ring(group.nodeid)
        group.joined = True
        self._groups.append(group)
        # CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF: the joiner learns the ring it joined in.
        group._push(TotemChange(RingId(min(ring), self.ring_seq), tuple(sorted(ring))))
        self._confchg(ring, (), (Address(group.nodeid, group.pid, Reason.JOIN),))

    def _leave(self, group: FakeCpgGroup, reason: Reason) -> None:
        ring = self.ring(group.nodeid)
        if reason is not Reason.NODEDOWN:
            # What the process handed to its corosync is ordered before it leaves.
            while self.order(group):
                pass
        self._flight.pop(group, None)
        self._carried.pop(group, None)
        self._groups.remove(group)
        group.joined = False
        self._confchg(ring, (Address(group.nodeid, group.pid, reason),), ())

    def kill(self, group: FakeCpgGroup) -> None:
        """The process of ``group`` died (``kill -9``): the others see it leave (``PROCDOWN``)."""
        if group.joined and not group.lost:
            self._leave(group, Reason.PROCDOWN)
        group.lost = True

    def _order_carried(self) -> None:
        """Before a ring changes: what was in flight across the last change is ordered now.
        Totem originates a message queued during a membership change in the ring it forms
        next, and a formed ring orders what it was given before it can change again: a message
        never outlives two ring changes."""
        for group, count in list(self._carried.items()):
            for _ in range(count):
                self.order(group)
        self._carried = {}

    def _ring_change(self, before: dict[int, frozenset[int]], groups: list[FakeCpgGroup]) -> None:
        """After ``up`` or ``side`` changed (``before``: each node's ring, ``groups``: the joined
        groups, both as they were): each ring's totem change, then its CPG membership change as
        each member sees it (who left its ring, who joined from another), then the quorum
        changes."""
        self.ring_seq += 4
        for ring in self.rings():
            totem = TotemChange(RingId(min(ring), self.ring_seq), tuple(sorted(ring)))
            self.history.append((ring, totem))
            now = self.members(ring)
            for g in now:
                g._push(totem)
            views = []
            for g in now:
                was = before.get(g.nodeid, frozenset())
                left = tuple(Address(h.nodeid, h.pid, Reason.NODEDOWN) for h in groups
                             if h.nodeid in was and h not in now)
                joined = tuple(Address(h.nodeid, h.pid, Reason.NODEUP) for h in now
                               if before.get(h.nodeid, frozenset()) != was)
                views.append((g, left, joined))
            if not any(left or joined for _, left, joined in views):
                continue
            members = tuple(Address(g.nodeid, g.pid) for g in now)
            self.history.append((ring, ConfChange(members, views[0][1], views[0][2])))
            for g, left, joined in views:
                g._push(ConfChange(members, left, joined))
        self._carried = {g: len(q) for g, q in self._flight.items() if q}
        for q in list(self._quorums):
            if q.nodeid in self.up:
                ring = tuple(sorted(self.ring(q.nodeid)))
                q._push(QuorumChange(self.quorate(q.nodeid), self.ring_seq, ring))

    def _rings_now(self) -> dict[int, frozenset[int]]:
        return {n: self.ring(n) for n in self.nodeids}

    def crash(self, nodeid: int) -> None:
        """The node's corosync and every process on it die at once (a power cut): its messages
        in flight are lost; the rest of its ring sees it leave (``NODEDOWN``)."""
        if nodeid not in self.up:
            return
        self._order_carried()
        before, groups = self._rings_now(), list(self._groups)
        for g in self.members([nodeid]):
            self._flight.pop(g, None)
            self._carried.pop(g, None)
            self._groups.remove(g)
            g.joined = False
            g.lost = True
            g._pipe.ring()
        for q in list(self._quorums):
            if q.nodeid == nodeid:
                q.lost = True
                q._pipe.ring()
        self.up.discard(nodeid)
        self._ring_change(before, groups)

    def start(self, nodeid: int) -> None:
        """The node's corosync starts again (on its side of a partition, if there is one)."""
        if nodeid in self.up:
            return
        self._order_carried()
        before = self._rings_now()
        self.up.add(nodeid)
        self._ring_change(before, list(self._groups))

    def partition(self, sides: Sequence[Iterable[int]]) -> None:
        """Cut the nodes into ``sides`` (each node in at most one; nodes not named stay on side 0
        together)."""
        self._order_carried()
        before = self._rings_now()
        for n in self.nodeids:
            self.side[n] = 0
        for i, nodes in enumerate(sides, start=1):
            for n in nodes:
                self.side[n] = i
        self._ring_change(before, list(self._groups))

    def heal(self) -> None:
        self._order_carried()
        before = self._rings_now()
        for n in self.nodeids:
            self.side[n] = 0
        self._ring_change(before, list(self._groups))

    def idle(self) -> bool:
        """Nothing in flight and nothing undispatched in any member's or quorum handle's inbox."""
        return not self.in_flight() and not any(g.inbox for g in self._groups) and \
            not any(q.inbox for q in self._quorums if not q.lost)


# --- running ClusterNodes on the bus -------------------------------------------------------------


def sync_journal(node: ClusterNode) -> bool:
    """Do what ``node``'s cluster thread does after a batch of events: sync its journal, then say
    DURABLE and answer what waited for it (a test runs a node without its thread). Whether there
    was anything to sync; nothing for a stopped node."""
    return not node._stopping and node.flush_journal()


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def step(node: ClusterNode) -> bool:
    """Let ``node`` handle what is readable on its descriptors, once each. Whether anything was."""
    did = False
    for fd in node.fds():
        if _readable(fd):
            node.on_readable(fd)
            did = True
    return did


class Unsettled(AssertionError):
    """The nodes kept talking: :func:`settle` gave up after its rounds."""


def settle(bus: FakeBus, nodes: Iterable[ClusterNode], rounds: int = 1000) -> int:
    """Run ``nodes`` (and order every message) until nothing is pending anywhere: no message in
    flight, no event undispatched, every journal synced. Returns the
    number of rounds; raises :class:`Unsettled` if it does not end within ``rounds`` (a round
    orders every message in flight and lets every node read what it was delivered)."""
    nodes = [n for n in nodes if not n.closed]
    for i in range(rounds):
        did = bus.order_all() > 0
        for node in nodes:
            did |= step(node)
        if did:
            continue
        synced = False
        for node in nodes:
            synced |= sync_journal(node)
        if synced or any(step(node) for node in nodes):
            continue
        if bus.idle():
            return i
    raise Unsettled(f"the nodes did not settle in {rounds} rounds")


def stop_node(node: ClusterNode, power_cut: bool = False) -> None:
    """End ``node`` as ``kill -9`` does: no sync again, its files and descriptors are closed,
    nothing is left for the group (the bus reports the death: call :meth:`FakeBus.kill` or
    :meth:`FakeBus.crash` as well). With ``power_cut``, what its cluster journal appended past the
    last sync is lost too (zeroed: the page cache did not survive)."""
    node._stopping = True
    node._snapshots = []
    node.closed = True
    journal = node.store.journal
    if power_cut and hasattr(journal, "segments"):  # a volatile store has nothing on disk
        durable = journal.durable
        for segment in [*journal.segments, *([journal.spare] if journal.spare else [])]:
            if segment.end <= durable:
                continue
            offset = HEADER_BYTES + max(durable, segment.start) - segment.start
            total = HEADER_BYTES + segment.capacity
            os.pwrite(segment.fd, bytes(total - offset), offset)
    node.store.close()
    for fd in (node.wake_r, node.wake_w):
        with contextlib.suppress(OSError):
            os.close(fd)
    # The quorum connection just closes; the group's end is the bus's to report (kill or crash),
    # so its handle is closed without leaving.
    node.quorum.close()
    pipe = getattr(node.group, "_pipe", None)
    if pipe is not None:
        node.group.closed = True
        pipe.close()

