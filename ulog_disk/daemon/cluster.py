"""Cluster mode (``dm-ulogd --cluster corosync``): the clustered logs of this node, agreed with
the other nodes through corosync.

A ``clustered-core`` or ``clustered-disk`` log is one log for every node that has it, named by its
uuid. Its shared state (:mod:`ulog_disk.cluster.shared`) changes only by messages multicast in
corosync's agreed order, which every node applies alike; each node journals what it applied in its
own state directory. The rest of the daemon never sees these logs: :class:`ClusterTransport`
takes their frames before the request loop does.

Which requests are agreed (the request table's ``cluster`` column): FLUSH carrying marks or clears
(with the MARKs and CLEARs sent since the last FLUSH), GET_RESYNC_WORK, SET_REGION_SYNC, and the
lifecycle points that change who has the log open (RESUME, the DTR of a node's last instance). The
rest are answered at once from this node's copy.

When a reply goes out:

* FLUSH with marks, RESUME: once the message is applied here, this node's cluster journal is
  durable past it, and every other member says its journal is too (its DURABLE message) — so a
  flushed mark is durable on every node and read by every node's IS_CLEAN; it survives the loss
  of any node's state directory, and a whole-cluster crash;
* the others agreed: once applied here;
* never while this node is not quorate (as corosync last said, asked at every membership
  change): a node cut off from the majority acknowledges no state change. Its requests wait, and
  are multicast again once it has the majority's state (see below), where they apply a second
  time harmlessly.

Membership (corosync's, never our own): at every change that adds a member, each member
multicasts a HELLO (its epoch, a digest of its state, whether it was current); when every
member's HELLO is in, the member with the highest epoch (ties: the lowest node id) is the donor,
and every member whose state differs, or that was not current, takes the donor's snapshot, in
pieces, while the others go on. When no member was current (the cluster starting from its state
directories) the exchange needs a majority of the nodes' daemons, and it counts a formation in
the epoch's high bits, so that the history that goes on from it outranks any older one. A node gone from the
membership is declared departed by the coordinator (the lowest node id among the members), which
also fences it (``--fence-command``) and multicasts FENCED when the command succeeds.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import selectors
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import filterfalse
from pathlib import Path

from ..cluster import messages as msg
from ..cluster.corosync import (
    ConfChange,
    ConnectionLost,
    CorosyncError,
    CpgGroup,
    Deliver,
    PieceError,
    Quorum,
    Reassembler,
    TotemChange,
    split,
)
from ..cluster.shared import ClusterRuleError, ClusterState, SharedLog
from ..log.lifecycle import TRANSITIONS, State, next_state
from ..protocol import wire
from ..protocol.ctrargs import CtrArgs, parse_ctr
from ..protocol.requests import RequestType
from ..protocol.wire import Reply, Request
from ..storage.cluster_store import ClusterStore, VolatileClusterStore
from ..transport import Frame, Transport

log = logging.getLogger("ulog_disk.cluster")

#: The corosync process group every dm-ulogd of a cluster joins (one for all its mirrors).
GROUP_NAME = "dm-ulogd"
#: Journal bytes after which the loop writes a new snapshot (and the journal before it goes).
SNAPSHOT_AFTER = 8 * 1024 * 1024
#: An epoch's bits above this count the times the cluster formed anew from its state directories
#: (no member current); the bits below count the state messages applied since.
EPOCH_FORMATION = 40
#: Regions of each kind in one FLUSH message (its lists are counted in 16 bits; 2 x 8 KiB of
#: regions stays far below the CPG's atomic message size).
FLUSH_REGIONS = 1024
#: Seconds a fence command may run before it counts as failed (and is killed).
FENCE_TIMEOUT = 120.0
#: Seconds between two attempts to fence a node whose fence command failed.
FENCE_RETRY = 5.0
#: Seconds between two attempts to sync a cluster journal whose sync failed.
SYNC_RETRY = 0.5
#: Regions a node remembers its writes wait for, per log, and names in one GET_RESYNC_WORK.
WANTED_REGIONS = 256
PREFER_REGIONS = 16

_CLUSTERED = ("clustered-core", "clustered-disk")
_CTR = int(RequestType.CTR)
#: A decoded request's type number → its type (``wire.request_kind``'s table; decode_frame has
#: taken the flag bits off already).
_KIND_OF: dict[int, RequestType] = {int(kind): kind for kind in RequestType}
#: The types every request's path tests (an enum class's attribute is a lookup each time).
_CTR_KIND, _IN_SYNC, _IS_CLEAN = RequestType.CTR, RequestType.IN_SYNC, RequestType.IS_CLEAN
#: The IS_CLEAN / IN_SYNC reply payloads, by the answer (built once, not per request).
_S64_0_1 = (wire.build_s64(0), wire.build_s64(1))


@dataclass
class Local:
    """This node's instance of a clustered log (the kernel's uuid + luid)."""

    ctr: CtrArgs
    state: State = State.CONSTRUCTED
    #: ``ctr.region_count``, a division each time it is read: read by every IN_SYNC and IS_CLEAN.
    region_count: int = field(init=False)

    def __post_init__(self) -> None:
        self.region_count = self.ctr.region_count


@dataclass
class Pending:
    """A request of this node's kernel waiting for its agreed message."""

    request: Request
    address: object
    kind: msg.Kind
    data: bytes
    #: Answered only once durable here and on another member (FLUSH with marks, RESUME).
    durable: bool
    #: Set when the message has been applied here: the epoch after it and the reply.
    epoch: int | None = None
    reply: Reply | None = None
    sent_at: float = field(default_factory=time.monotonic)
    #: The messages of this request multicast before this one (a FLUSH cut into pieces): a
    #: history given up loses them with it, so they go again with it.
    before: list[tuple[msg.Kind, dict[str, object]]] = field(default_factory=list)
    #: Requests of the kernel answered with this one's reply: a FLUSH resent (or sent again)
    #: with nothing new while this one waits, which must not be answered before it.
    followers: list[tuple[Request, object]] = field(default_factory=list)


@dataclass
class Counters:
    agreed: int = 0
    applied: int = 0
    transfers_sent: int = 0
    transfers_taken: int = 0
    held: int = 0
    rule_errors: int = 0
    fenced: int = 0
    departed: int = 0
    #: Seconds from multicast to answer of this node's agreed requests (sum and count).
    latency_sum: float = 0.0
    latency_count: int = 0


def connect(group_name: str = GROUP_NAME) -> tuple[CpgGroup, Quorum]:
    """Connect to the corosync of this host (not yet joining the group): the first thing cluster
    mode does, so that a corosync that is not running or refuses us costs nothing created.
    Raises :class:`~ulog_disk.cluster.corosync.CorosyncUnavailable` (one line)."""
    group = CpgGroup(group_name, join=False)
    try:
        quorum = Quorum()
    except BaseException:
        group.close()
        raise
    return group, quorum


class ClusterNode:
    def __init__(self, state_dir: Path, boot_id: str, fence_command: str | None,
                 group: CpgGroup, quorum: Quorum, group_name: str = GROUP_NAME,
                 volatile: bool = False) -> None:
        self.boot_id = boot_id
        self.fence_command = shlex.split(fence_command) if fence_command else None
        where = Path(state_dir) / "cluster"
        # --backend memory keeps nothing: the cluster state lives in the members' memory only.
        self.store: ClusterStore | VolatileClusterStore = (
            VolatileClusterStore(where) if volatile else ClusterStore(where))
        # The state before joining: a state directory we cannot read must not make us a member.
        self.state = self._load()
        #: This node stopped while other members went on: its copy is older than theirs, and it
        #: says so in its HELLO (a formation waits for a member that was not left behind).
        self.left_behind = self.store.left_behind() is not None
        self._clear_left_behind_at: int | None = None
        self.group = group
        self.quorum = quorum
        self.nodeid = self.group.nodeid
        self.pid = self.group.pid
        self.quorate = self.quorum.quorate
        self.send: Callable[[Reply, object], None] = _no_send
        self.local: dict[tuple[str, int], Local] = {}
        #: MARKs and CLEARs since this node's last FLUSH of each uuid: (marks, clears).
        self.unflushed: dict[str, tuple[set[int], set[int]]] = {}
        #: Regions out of sync that this node's kernel wants to write (IS_REMOTE_RECOVERING said
        #: 1 and nobody recovers them), by uuid, oldest first: preferred at its GET_RESYNC_WORK.
        self.wanted: dict[str, dict[int, None]] = {}
        self.pending: dict[int, Pending] = {}
        self.token = 0
        #: Agreed work that waits until this node may multicast (current and quorate).
        self.waiting: list[tuple[msg.Kind, dict[str, object], int | None]] = []
        self.members: tuple[tuple[int, int], ...] = ()
        self.current = False
        self.syncing = False
        self.round: int | None = None
        self.hellos: dict[tuple[int, int], object] = {}
        self.receiving = False
        self.queued: list[Deliver] = []
        self.reassembler = Reassembler()
        self.durable_of: dict[int, int] = {}
        self.announced = 0
        #: The epoch another member waits to see durable here (its FLUSH with marks, its OPEN,
        #: or the state this node took): DURABLE is multicast only up to where it is owed.
        self.owed = 0
        self.rebooted_sent = False
        self.fencing: dict[int, subprocess.Popen[bytes]] = {}
        #: The history (see :attr:`history`) each running fence command was started in.
        self.fence_history: dict[int, int] = {}
        #: Counts the states this node took from another: a new history each time.
        self.history = 0
        self.fence_after: dict[int, float] = {}
        self.fence_started: dict[int, float] = {}
        self.declared: set[int] = set()
        #: The corosync nodes of this node's totem ring (alive as far as corosync knows).
        self.totem_members: set[int] = set()
        #: Nodes whose daemon this one saw leave the group (and not come back).
        self.left_nodes: set[int] = set()
        #: The members that hold the agreed state or may (every member of the last exchange,
        #: those that took the state included), less those gone since: those go on if this node
        #: stops.
        self.current_nodes: set[int] = set()
        self.declared_fenced: set[int] = set()
        #: Rounds decided since the last membership change (late HELLOs of them are ignored).
        self.rounds_done: set[int] = set()
        #: HELLOs of the rounds not decided yet, by round; the rounds this node said HELLO in.
        self.hello_book: dict[int, dict[tuple[int, int], object]] = {}
        self.hello_sent: set[int] = set()
        self.counters = Counters()
        self.closed = False
        #: Whether the last frame :meth:`take_frame` saw was another log's (how it reads the next).
        self.other_last = True
        #: The node's state, shared by the cluster thread (corosync's events, the journal) and
        #: the request loop (the kernel's requests of clustered logs); never held over a sync.
        #: Reentrant: a reply sent under it may come back as the next request (a kernel model
        #: in the same thread, in tests).
        self.lock = threading.RLock()
        #: Written by the loop to have the cluster thread look again at its timers (a send that
        #: corosync pushed back), and by :meth:`close`.
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        #: Snapshots to write before the next sync: (data, snapshot id, epoch, journal position).
        self._snapshots: list[tuple[bytes, int, int, int]] = []
        self._durable_epoch = self.store.durable_epoch
        #: After a failed sync: not before then again.
        self._sync_retry_at: float | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: Called with what stopped the cluster thread (a bug): the service stops the daemon.
        self.fatal: Callable[[BaseException], None] | None = None
        self.group.join()
        if not quorum.provider:
            log.warning("corosync has no quorum provider: every partition counts as quorate, and both "
                        "sides of a split acknowledge state changes (configure votequorum; docs/cluster.md)")
        if not self.fence_command:
            log.warning("no --fence-command: a node that leaves the membership counts as fenced at once; "
                        "unsafe against a living node cut off by a partition, which can keep writing "
                        "regions it marked without a single log request (docs/cluster.md, Fencing)")
        log.info("cluster: node %d joined group %r (state epoch %d, %d clustered log(s) known)%s",
                 self.nodeid, group_name, self.state.epoch, len(self.state.logs),
                 "; it stopped while other members went on: its state is older than theirs"
                 if self.left_behind else "")

    # --- restore -----------------------------------------------------------------------------

    def _load(self) -> ClusterState:
        loaded = self.store.load()
        state = msg.decode_snapshot(loaded.snapshot) if loaded.snapshot is not None else ClusterState()
        for applied in loaded.records:
            try:
                message = msg.decode_stored(applied.message)
                state.apply(msg.as_input(applied.sender, message))
            except (msg.MessageError, ClusterRuleError) as exc:
                # Only applied messages are journaled: this one is damage the CRC missed, or a
                # record of another version.
                log.error("cluster journal: a record is not a message (%s): the state ends before it", exc)
                break
            if state.epoch != applied.epoch:
                if state.epoch >> EPOCH_FORMATION == applied.epoch >> EPOCH_FORMATION:
                    log.warning("cluster journal: epoch %#x after a record that says %#x", state.epoch,
                                applied.epoch)
                state.epoch = applied.epoch  # a formation since the snapshot
        if self.store.damage:
            log.warning("cluster journal: damage found (%s): the state is the one before it, epoch %d; "
                        "newer copies of the other members replace it", "; ".join(self.store.damage),
                        state.epoch)
        return state

    # --- the cluster thread ----------------------------------------------------------------------

    def fds(self) -> list[int]:
        return [self.group.fileno(), self.quorum.fileno(), self.wake_r]

    def start(self) -> None:
        """Start the cluster thread: it reads corosync's events, applies the agreed messages,
        journals them and syncs the journal itself, then says DURABLE and answers what waited
        for it, with no other thread woken on the way (each hand-off between threads cost a
        FLUSH a few hundred microseconds on a loaded machine). The request loop only reads
        this node's copy and multicasts; it never waits for the cluster's disk."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="cluster")
            self._thread.start()

    def _run(self) -> None:
        try:
            poller = select.poll()
            for fd in self.fds():
                poller.register(fd, select.POLLIN)
            watching = True
            while not self._stopping:
                ready = poller.poll(self._poll_timeout())
                if self._stopping:
                    return
                self._handle([fd for fd, _ in ready])
                if self.closed and watching:  # corosync lost: its descriptors stay readable
                    watching = False
                    for fd in (self.group.fileno(), self.quorum.fileno()):
                        with contextlib.suppress(KeyError, ValueError):
                            poller.unregister(fd)
                self.flush_journal()
        except BaseException as exc:  # noqa: BLE001 - told to the service, which stops the daemon
            log.exception("internal error (a bug of dm-ulogd) in the cluster thread: clustered logs can "
                          "change no more; stopping")
            self.closed = True
            if self.fatal is not None:
                self.fatal(exc)

    def _poll_timeout(self) -> int | None:
        """Milliseconds until the cluster thread has work although nothing arrives: a send corosync
        pushed back, a fence command to poll or to retry, a failed sync to try again."""
        with self.lock:
            now = time.monotonic()
            waits = [w for w in (self.group.retry_in(),) if w is not None]
            if self.fencing:
                waits.append(0.05)
            if self.fence_after:
                waits.append(min(self.fence_after.values()) - now)
            if self._sync_retry_at is not None:
                waits.append(self._sync_retry_at - now)
        if not waits:
            return None
        return max(0, int(min(waits) * 1000 + 0.999))

    def on_readable(self, fd: int) -> None:
        """Handle what ``fd`` (one of :meth:`fds`) has, as the cluster thread does; the journal is
        synced by :meth:`flush_journal` (for tests that run a node step by step)."""
        self._handle([fd])

    def _handle(self, fds: list[int]) -> None:
        with self.lock:
            for fd in fds:
                self._readable(fd)
            self.tick()

    def _readable(self, fd: int) -> None:
        if fd == self.group.fileno():
            try:
                events = self.group.dispatch()
            except ConnectionLost as exc:
                self._apply_events(exc.events)
                self._lost(exc)
                return
            self._apply_events(events)
        elif fd == self.quorum.fileno():
            try:
                changes = self.quorum.dispatch()
            except CorosyncError as exc:
                self._lost(exc)
                return
            for change in changes:
                self._quorum_changed(change.quorate)
        elif fd == self.wake_r:
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake_r, 4096)

    def tick(self) -> None:
        """Work that is due whatever arrived: sends corosync pushed back, fence commands."""
        if not (self.fencing or self.fence_after or self.group.pending):
            return
        self._poll_fences()
        if not self.closed:
            try:
                self.group.pump()
            except CorosyncError as exc:
                self._lost(exc)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.wake_w, b"w")

    def _lost(self, exc: BaseException) -> None:
        if self.closed:
            return
        log.error("cluster: lost corosync (%s): clustered logs can change no more; the daemon must be "
                  "restarted once corosync runs again", exc)
        self.current = False
        self.quorate = False
        self.closed = True

    # --- frames of the kernel ------------------------------------------------------------------

    def take(self, frame: bytes, address: object) -> bool:
        """Whether ``frame`` is a request of a clustered log (then it is this node's to answer).

        Every frame of the host passes here first, and is decoded once: after a frame of another
        log, the next is told apart by its header alone first (the loop decodes the other logs'
        frames); after a clustered log's, it is decoded at once (reading the header twice cost
        a clustered request ~0.45 us, 4 % of a local read's CPU). So a frame of another log is
        decoded twice only right after a clustered log's: never on a host whose mirrors are all
        clustered, once per switch from a clustered mirror's requests to another's on one with
        both."""
        return self.take_frame((frame, address))

    def take_frame(self, item: Frame) -> bool:
        """:meth:`take` of a (frame, address) as a transport reads it: what
        :class:`ClusterTransport` calls for each frame.

        The request is answered here, in this one call: the lookups of ``wire.request_kind`` and
        ``next_state`` inline (the same tables, as the engine reads them), IN_SYNC and IS_CLEAN
        first. A method call or two per request would be several per cent of the rate of these
        local reads, which every host's kernel asks of each region it writes or recovers."""
        frame, address = item
        # A malformed frame is the loop's: it answers what it can of it.
        request: Request | None = None
        if self.other_last:
            peeked = wire.peek_frame(frame)
            if peeked is None:
                return False
            key, request_type = peeked
        else:
            try:
                request = wire.decode_frame(frame)
            except wire.FrameError:
                self.other_last = True
                return False
            key, request_type = (request.uuid, request.luid), request.request_type
        with self.lock:
            local = self.local.get(key)
            if local is None and request_type != _CTR:
                self.other_last = True
                return False
            if request is None:
                try:
                    request = wire.decode_frame(frame)
                except wire.FrameError:
                    return False
            self.other_last = False
            kind = _KIND_OF.get(request_type)
            try:
                if kind is _CTR_KIND:
                    taken = self._ctr(request, address)
                    self.other_last = not taken
                    return taken
                # (Any other type has its log here: ``local`` is set.)
                # The lifecycle table is consulted for every request (a pair it does not list
                # raises).
                new_state = TRANSITIONS.get((local.state, kind))  # type: ignore[union-attr,arg-type]
                if new_state is None:
                    try:
                        new_state = next_state(local.state, kind)  # type: ignore[union-attr,arg-type]
                    except Exception:  # noqa: BLE001 - an unknown transition is answered as the engine does
                        log.exception("internal error (a bug of dm-ulogd): no lifecycle rule for %s in %s",
                                      kind, local.state)
                        self.send(Reply(request, -errno.EIO), address)
                        return True
                shared = self.state.logs.get(key[0])
                try:
                    if kind is _IN_SYNC or kind is _IS_CLEAN:
                        local.state = new_state
                        region = wire.parse_region(request.data)
                        if not 0 <= region < local.region_count:
                            raise IndexError(
                                f"region {region} out of range (region count {local.region_count})")
                        if shared is None or region >= shared.region_count:
                            answer = kind is _IS_CLEAN or local.ctr.sync_mode == "nosync"
                        elif kind is _IN_SYNC:
                            answer = shared.sync[region]  # SharedLog.in_sync but its range check, done
                        else:
                            answer = shared.is_clean(region)
                        reply: Reply | None = Reply(request, 0, _S64_0_1[answer])
                    else:
                        reply = self._answer(kind, request, address, local, new_state, shared)  # type: ignore[arg-type]
                except (ValueError, IndexError, ClusterRuleError) as exc:
                    log.error("clustered %s uuid=%r luid=%#x refused: %s", kind.name, request.uuid,  # type: ignore[union-attr]
                              request.luid, exc)
                    reply = Reply(request, -errno.EINVAL)
                if reply is not None:
                    self.send(reply, address)
            except Exception:  # noqa: BLE001 - one bad request must not stop the others
                log.exception("internal error (a bug of dm-ulogd) on clustered request seq=%d type=%d "
                              "uuid=%r: answering -EIO", request.seq, request.request_type, request.uuid)
                self.send(Reply(request, -errno.EIO), address)
            return True

    def _ctr(self, request: Request, address: object) -> bool:
        """A CTR: False if its log is not a clustered one (the loop's, which refuses a malformed
        one with the reason)."""
        try:
            text, reconnect = wire.parse_ctr_string(request.data)
            ctr = parse_ctr(text)
        except ValueError:
            return False
        if ctr.log_type not in _CLUSTERED:
            return False
        if not request.uuid:
            self.send(Reply(request, -errno.EINVAL), address)
            return True
        if request.key not in self.local:
            self.local[request.key] = Local(ctr)
            log.info("CTR uuid=%r luid=%#x clustered (%s, %d regions)%s", request.uuid, request.luid,
                     ctr.log_type, ctr.region_count, " (kernel reconnect)" if reconnect else "")
        self.send(Reply(request, 0, b"" if reconnect else ctr.device_reply()), address)
        return True

    def _answer(self, kind: RequestType, request: Request, address: object, local: Local,
                new_state: State, log_: SharedLog | None) -> Reply | None:
        """The requests other than CTR, IN_SYNC and IS_CLEAN (:meth:`take_frame` answers those)."""
        ctr = local.ctr
        data = request.data
        if kind is RequestType.DTR:
            del self.local[request.key]
            last = not any(k[0] == request.uuid for k in self.local)
            if last:
                # Nothing of this node's instances is left to flush: a mark or clear not flushed
                # must not go out with the next instance's first FLUSH.
                self.wanted.pop(request.uuid, None)
                self.unflushed.pop(request.uuid, None)
            if last and log_ is not None and self.nodeid in log_.opened:
                self._agree(msg.Kind.CLOSE, {"uuid": request.uuid, "destroy": True})
            return Reply(request, 0)
        local.state = new_state
        if kind in (RequestType.PRESUSPEND, RequestType.POSTSUSPEND):
            return Reply(request, 0)
        if kind is RequestType.RESUME:
            fields = {"uuid": request.uuid, "luid": request.luid, "boot_id": self.boot_id,
                      "region_count": ctr.region_count, "in_sync": ctr.sync_mode == "nosync"}
            self._agree(msg.Kind.OPEN, fields, Pending(request, address, msg.Kind.OPEN, b"", durable=True))
            return None
        if kind is RequestType.GET_REGION_SIZE:
            return Reply(request, 0, wire.build_u64(ctr.region_size))
        if kind in (RequestType.MARK_REGION, RequestType.CLEAR_REGION):
            regions = wire.parse_region_group(request.request_type, data)
            for r in regions:
                if not 0 <= r < ctr.region_count:
                    raise IndexError(f"region {r} out of range (region count {ctr.region_count})")
            marks, clears = self.unflushed.setdefault(request.uuid, (set(), set()))
            if kind is RequestType.MARK_REGION:
                marks.update(regions)
                clears.difference_update(regions)
            else:
                clears.update(regions)
                marks.difference_update(regions)
            return Reply(request, 0)
        if kind is RequestType.FLUSH:
            regions = wire.parse_regions(data) if data else []
            for r in regions:
                if not 0 <= r < ctr.region_count:
                    raise IndexError(f"region {r} out of range (region count {ctr.region_count})")
            if log_ is None:
                # Not open anywhere in the cluster yet (an inactive table's pass before its
                # RESUME, which writes nothing): kept for the first FLUSH after it.
                marks, clears = self.unflushed.setdefault(request.uuid, (set(), set()))
                marks.update(regions)
                clears.difference_update(regions)
                return Reply(request, 0)
            marks, clears = self.unflushed.pop(request.uuid, (set(), set()))
            marks.update(regions)
            clears.difference_update(regions)
            if not marks and not clears:
                # Nothing new, but a FLUSH of this log still waits (the kernel resends a request
                # unanswered for 15 s, with a new seq and, without integrated_flush, no regions):
                # answered with it, never before the marks it carries are agreed.
                earlier = self._last_flush(request.uuid)
                if earlier is not None:
                    earlier.followers.append((request, address))
                    return None
                return Reply(request, 0)
            pieces = [{"uuid": request.uuid, "marks": m, "clears": c}
                      for m, c in _flush_pieces(sorted(marks), sorted(clears))]
            # One sender's messages are applied in the order sent: the reply waits for the last,
            # and so for all of them.
            pending = Pending(request, address, msg.Kind.FLUSH, b"", durable=bool(marks),
                              before=[(msg.Kind.FLUSH, fields) for fields in pieces[:-1]])
            for fields in pieces[:-1]:
                self._agree(msg.Kind.FLUSH, fields)
            self._agree(msg.Kind.FLUSH, pieces[-1], pending)
            return None
        if kind is RequestType.GET_RESYNC_WORK:
            if data:
                raise ValueError("GET_RESYNC_WORK carries no payload")
            if local.state is not State.LIVE or log_ is None:
                return Reply(request, 0, wire.build_resync_work(False, 0))
            fields = {"uuid": request.uuid, "prefer": self._preferred(request.uuid, log_),
                      "limit": ctr.region_count}
            self._agree(msg.Kind.RESYNC_WORK, fields,
                        Pending(request, address, msg.Kind.RESYNC_WORK, b"", durable=False))
            return None
        if kind is RequestType.SET_REGION_SYNC:
            region, in_sync = wire.parse_set_region_sync(data)
            if not 0 <= region < ctr.region_count:
                raise IndexError(f"region {region} out of range (region count {ctr.region_count})")
            if log_ is None:
                return Reply(request, 0)
            fields = {"uuid": request.uuid, "region": region, "in_sync": bool(in_sync)}
            self._agree(msg.Kind.SET_REGION_SYNC, fields,
                        Pending(request, address, msg.Kind.SET_REGION_SYNC, b"", durable=False))
            return None
        if kind is RequestType.GET_SYNC_COUNT:
            fresh = ctr.region_count if ctr.sync_mode == "nosync" else 0
            count = log_.sync_count if log_ is not None else fresh
            return Reply(request, 0, wire.build_u64(count))
        if kind is RequestType.STATUS_INFO:
            text = f"3 {ctr.log_type} {ctr.device_number()} A" if ctr.is_disk else f"1 {ctr.log_type}"
            return Reply(request, 0, text.encode() + b"\0")
        if kind is RequestType.STATUS_TABLE:
            return Reply(request, 0, f"{ctr.text.split(' ', 1)[1]} ".encode() + b"\0")
        if kind is RequestType.IS_REMOTE_RECOVERING:
            region = wire.parse_region(data)
            if not 0 <= region < ctr.region_count:
                raise IndexError(f"region {region} out of range (region count {ctr.region_count})")
            if log_ is None:
                return Reply(request, 0, wire.build_remote_recovering(False, ctr.region_count))
            # The hint within this node's table: a log shrunk by another node's reload must not
            # say that every region of this one is in sync (the kernel then asks about none).
            hint = min(log_.first_unsynced(), ctr.region_count)
            if region >= log_.region_count:
                return Reply(request, 0, wire.build_remote_recovering(False, hint))
            if local.state is not State.LIVE:
                # Suspending (or suspended): this kernel asks no GET_RESYNC_WORK any more, so a
                # write held for a region nobody recovers would hold its suspend for good. As
                # cmirrord once recovery is halted: held only while another node copies it now.
                owner = log_.recovering.get(region)
                return Reply(request, 0, wire.build_remote_recovering(
                    owner is not None and owner != self.nodeid, ctr.region_count))
            recovering = log_.remote_recovering(self.nodeid, region)
            if recovering and region not in log_.recovering:
                # A write of this node's kernel waits for it: asked for first at its next
                # GET_RESYNC_WORK (cmirrord's priority list, here one per node).
                wanted = self.wanted.setdefault(request.uuid, {})
                wanted[region] = None
                if len(wanted) > WANTED_REGIONS:
                    del wanted[next(iter(wanted))]
            return Reply(request, 0, wire.build_remote_recovering(recovering, hint))
        raise ValueError(f"request type {kind} has no clustered handler")

    def _preferred(self, uuid: str, log_: SharedLog) -> list[int]:
        """The regions this node's writes wait for that may still be handed out, oldest first."""
        wanted = self.wanted.get(uuid)
        if not wanted:
            return []
        for region in [r for r in wanted if r >= log_.region_count or log_.in_sync(r)]:
            del wanted[region]
        return [r for r in wanted if r not in log_.recovering][:PREFER_REGIONS]

    def _last_flush(self, uuid: str) -> Pending | None:
        for token in reversed(self.pending):  # tokens grow: the newest first
            pending = self.pending[token]
            if pending.kind is msg.Kind.FLUSH and pending.request.uuid == uuid:
                return pending
        return None

    # --- multicasting --------------------------------------------------------------------------

    def may_multicast(self) -> bool:
        return self.current and self.quorate and not self.syncing and not self.closed

    def _agree(self, kind: msg.Kind, fields: dict[str, object], pending: Pending | None = None) -> None:
        token = 0
        if pending is not None:
            self.token += 1
            token = self.token
            self.pending[token] = pending
        if not self.may_multicast():
            if not self.waiting:
                log.warning("cluster: %s: agreed requests wait", self._why_waiting())
            self.waiting.append((kind, fields, token))
            self.counters.held += 1
            return
        self._multicast(kind, fields, token)

    def _multicast(self, kind: msg.Kind, fields: dict[str, object], token: int) -> None:
        data = msg.encode(kind, token=token, **fields)
        pending = self.pending.get(token)
        if pending is not None:
            pending.data, pending.sent_at, pending.epoch, pending.reply = data, time.monotonic(), None, None
        self.counters.agreed += 1
        self.group.send(data)
        try:
            pumped = self.group.pump()
        except CorosyncError as exc:
            # Corosync died under us: the request waits, as every other does once the cluster
            # thread reads the loss (the daemon must be restarted with corosync).
            self._lost(exc)
            return
        if not pumped and threading.current_thread() is not self._thread:
            self._wake()  # corosync pushed back: the cluster thread retries it

    def _why_waiting(self) -> str:
        if self.closed:
            return "corosync is gone"
        if not self.quorate:
            return "this node is not quorate"
        return "this node is taking the cluster's state"

    def _release_waiting(self) -> None:
        if not self.may_multicast() or not self.waiting:
            return
        waiting, self.waiting = self.waiting, []
        log.info("cluster: multicasting %d agreed request(s) that waited", len(waiting))
        for kind, fields, token in waiting:
            if token and token not in self.pending:
                continue
            self._multicast(kind, fields, token)

    def _resend_unanswered(self) -> None:
        """After taking another state: this node's requests applied in the history it left
        behind were never answered; they go again in the new one."""
        queued = {t for _, _, t in self.waiting}
        for token, pending in list(self.pending.items()):
            if token in queued or pending.reply is not None or not pending.data:
                continue  # waiting to go anyway, applied in the new history, or never sent
            for kind, fields in pending.before:
                self.waiting.append((kind, fields, 0))
            decoded = msg.decode(pending.data)
            fields = {k: v for k, v in decoded.fields.items() if k != "token" and not k.startswith("_")}
            self.waiting.append((decoded.kind, fields, token))

    # --- the agreed stream -----------------------------------------------------------------------

    def _apply_events(self, events: list[object]) -> None:
        for index, event in enumerate(events):
            if isinstance(event, Deliver):
                self._deliver(event)
            elif isinstance(event, ConfChange):
                self._confchg(event)
                if self._round_due and not any(isinstance(e, ConfChange) for e in events[index + 1:]):
                    # One HELLO for the last change of a batch only: a membership that comes back
                    # within it (M -> M' -> M) would otherwise get two HELLOs of one name from this
                    # member, the first sent before it applied what followed.
                    self._round_due = False
                    self._start_round()
            elif isinstance(event, TotemChange):
                self.totem_members = set(event.members)
        if self._coordinate_due:
            # After the whole batch: a change read late (a split and its heal in one batch)
            # is judged by the membership as it is now.
            self._coordinate_due = False
            self._coordinate()
        # A change asks quorum itself: quorate again there, corosync's notification that
        # follows finds nothing changed.
        self._say_hello()
        self._release_waiting()
        self._answer_ready()

    _journal_pending = False
    _round_due = False
    _coordinate_due = False

    def _deliver(self, event: Deliver) -> None:
        try:
            message = msg.decode(event.data)
        except msg.MessageError as exc:
            log.error("cluster: a message from node %d is not ours (%s): ignored", event.nodeid, exc)
            return
        kind = message.kind
        if kind in msg.STATE_KINDS:
            if self.receiving:
                if self.round is None:  # after the exchange decided: what the snapshot lacks
                    self.queued.append(event)
                return
            if not self.current:
                return
            self._apply(event, message)
        elif kind is msg.Kind.HELLO:
            self._hello(event, message)
        elif kind is msg.Kind.STATE:
            self._state_piece(event, message)
        elif kind is msg.Kind.DURABLE:
            self.durable_of[event.nodeid] = max(self.durable_of.get(event.nodeid, 0), message.fields.epoch)
            self.current_nodes.add(event.nodeid)  # a member that took the state says DURABLE once it has

    def _apply(self, event: Deliver, message: msg.Decoded) -> None:
        if message.kind is msg.Kind.DEPARTED:
            # Declared from a membership change its coordinator read late: a node that is a
            # member where the declaration is ordered (the same membership on every member) has
            # not departed. What is applied, and journaled, is the rest.
            present = {n for n, _ in self.members}
            nodes = [n for n in message.fields.nodes if n not in present]
            # Declared in vain: the coordinator must declare it again if it really goes later.
            self.declared -= present.intersection(message.fields.nodes)
            if not nodes:
                return
            if len(nodes) != len(message.fields.nodes):
                data = msg.encode(msg.Kind.DEPARTED, token=message.fields.token, nodes=nodes)
                event, message = Deliver(event.nodeid, event.pid, data), msg.decode(data)
        item = msg.as_input(event.nodeid, message)
        result: object = None
        error: ClusterRuleError | None = None
        try:
            result = self.state.apply(item)
        except ClusterRuleError as exc:
            error = exc
            self.counters.rule_errors += 1
        else:
            self.counters.applied += 1
            self.store.append(self.state.epoch, event.nodeid, event.data)
            self._journal_pending = True
            self._after_apply(message, result)
        mine = event.nodeid == self.nodeid and event.pid == self.pid
        if error is None and not mine and (
                message.kind is msg.Kind.OPEN or (message.kind is msg.Kind.FLUSH and message.fields.marks)):
            self.owed = self.state.epoch  # its origin answers once every member says it is durable
        token = getattr(message.fields, "token", 0)
        if not mine or not token:
            if error is not None and mine:
                log.error("cluster: %s refused by every node: %s", message.kind.name, error)
            return
        pending = self.pending.get(token)
        if pending is None:
            return
        request = pending.request
        if error is not None:
            log.error("clustered %s uuid=%r refused: %s", message.kind.name, request.uuid, error)
            pending.reply = Reply(request, -errno.EINVAL)
            pending.epoch = 0
            return
        pending.epoch = self.state.epoch
        if message.kind is msg.Kind.RESYNC_WORK:
            region = result
            pending.reply = Reply(request, 0, wire.build_resync_work(region is not None, region or 0))
            if region is not None:
                log.info("clustered uuid=%r: node %d recovers region %d", request.uuid, self.nodeid, region)
        else:
            pending.reply = Reply(request, 0)

    def _after_apply(self, message: msg.Decoded, result: object) -> None:
        kind = message.kind
        if kind is msg.Kind.DEPARTED:
            self.counters.departed += len(message.fields.nodes)
            log.warning("cluster: node(s) %s departed: %s region(s) they held out of sync and held for their "
                        "fence", ", ".join(map(str, message.fields.nodes)), result)
            self._coordinate_due = True  # the coordinator fences them
        elif kind is msg.Kind.FENCED:
            self.counters.fenced += 1
            self.declared.discard(message.fields.node)
            self.declared_fenced.discard(message.fields.node)  # it may depart again later
            log.warning("cluster: node %d fenced: %s region(s) released for recovery", message.fields.node,
                        result)
        elif kind is msg.Kind.OPEN and result:
            log.info("cluster: %s region(s) of a node's earlier writes out of sync at its resume", result)
        elif kind is msg.Kind.REBOOTED and result:
            log.info("cluster: a node booted again: %s region(s) it had marked out of sync", result)
        if self.state.epoch and self.store.journal.position - self._snapshot_position > SNAPSHOT_AFTER:
            self._snapshot_now()

    _snapshot_position = 0

    def _snapshot_now(self) -> None:
        self._snapshot_position = self.store.journal.position
        data = msg.encode_snapshot(self.state)
        self._snapshots.append((data, self.store.snapshot_id, self.state.epoch, self._snapshot_position))

    # --- membership --------------------------------------------------------------------------------

    def _confchg(self, event: ConfChange) -> None:
        self._ask_quorate()  # the new ring's quorum, before anything is answered in it
        self.rounds_done.clear()
        self.hello_book.clear()
        self.hello_sent.clear()
        self.members = tuple(sorted(a.member for a in event.members))

        nodes = {n for n, _ in self.members}
        self.current_nodes &= nodes
        for gone in event.left:
            self.reassembler.forget(gone.nodeid, gone.pid)
            if gone.nodeid not in nodes:
                self.durable_of.pop(gone.nodeid, None)
                self.left_nodes.add(gone.nodeid)
        self.left_nodes -= nodes
        if event.left:
            log.warning("cluster: member(s) left: %s", ", ".join(f"node {a.nodeid} ({a.reason.name.lower()})"
                                                              for a in event.left))
        if event.joined:
            log.info("cluster: member(s) joined: %s; exchanging state", ", ".join(f"node {a.nodeid}"
                                                                                 for a in event.joined))
            self._round_due = True
        elif self.round is not None or self._round_due or (
                self.transfer_donor is not None and self.transfer_donor not in self.members):
            # The exchange under way waits for a member that is gone, or the donor of the last
            # one left, maybe before its last piece (every member knows who the donor was, none
            # but the receivers knows whether the pieces were all in): again, among those here.
            log.info("cluster: membership changed during the state exchange: exchanging again")
            self._round_due = True
        else:
            self._coordinate_due = True
        if self._round_due and self.receiving:
            # A transfer of an earlier round drops the state messages ordered from here on (they
            # belong to the new round's history): completed, it would be a copy missing them.
            # This node says HELLO as not current and takes the state the new round decides.
            log.info("cluster: the state transfer from node %d is given up for the new exchange",
                     self.receive_from[0])
            self.receiving = False
            self.queued = []
            self.reassembler.forget(*self.receive_from)

    def _start_round(self, round_id: int | None = None) -> None:
        self.round = self.round_id() if round_id is None else round_id
        self.syncing = True
        self._say_hello()

    def _say_hello(self) -> None:
        if self.round is None or self.round in self.hello_sent:
            return
        if not self.current and not self._ask_quorate():
            # A formation (no member current) is decided from the HELLOs alone, at the same place
            # of the agreed order on every member: each HELLO of a member that was not current
            # says that it was quorate. Asked at the decision instead, two members reading the
            # last HELLO on either side of a quorum change would decide differently.
            if self._hello_deferred != self.round:
                self._hello_deferred = self.round
                log.warning("cluster: this node is not quorate: it joins the state exchange once it is "
                            "(agreed requests wait)")
            return
        self.hello_sent.add(self.round)
        snapshot = msg.encode_snapshot(self.state)
        self._multicast_plain(msg.Kind.HELLO, round=self.round, epoch=self.state.epoch,
                              digest=msg.digest(snapshot), current=self.current, boot_id=self.boot_id,
                              left_behind=self.left_behind and not self.current,
                              known=sorted(self.state.nodes_known()))

    _hello_deferred: int | None = None

    def round_id(self) -> int:
        return msg.round_of(list(self.members))

    def _multicast_plain(self, kind: msg.Kind, **fields: object) -> None:
        self.group.send(msg.encode(kind, **fields))
        with contextlib.suppress(CorosyncError):
            self.group.pump()

    def _hello(self, event: Deliver, message: msg.Decoded) -> None:
        # One round per membership, started by its change on every member, named by it: each
        # member says HELLO once, and the round is decided at the same place of the agreed order
        # on every member (its last member's HELLO), from the same HELLOs. A HELLO of another
        # round (sent before a change, ordered after it), or a late copy of a decided one (a
        # member that handled two changes before its first HELLO was ordered), changes nothing.
        f = message.fields
        round_id = f.round
        if round_id != self.round_id() or round_id in self.rounds_done:
            return
        book = self.hello_book.setdefault(round_id, {})
        book[(event.nodeid, event.pid)] = f
        if set(book) != set(self.members):
            return
        self.rounds_done.add(round_id)
        del self.hello_book[round_id]
        if self.round == round_id:
            self.round = None
        self.hellos = book
        # No member current: the cluster forms anew from its state directories. Only a majority
        # may: a minority's newest state may lack what the others acknowledged.
        formation = not any(h.current for h in self.hellos.values())
        if formation:
            # From the HELLOs and the totem ring only, which every member has alike at this
            # place of the agreed order (not from this node's own state).
            nodes = {n for n, _ in self.hellos}
            known = nodes | self.totem_members
            for h in self.hellos.values():
                known.update(h.known)
            if 2 * len(nodes) <= len(known):
                log.warning("cluster: the daemons of %d of %d nodes are members: the cluster's state is "
                            "chosen once a majority's are (dm-ulogd runs on every corosync node); agreed "
                            "requests wait", len(nodes), len(known))
                self.syncing = False
                return
            newest = self.hellos[max(self.hellos, key=self._rank)]
            if newest.left_behind and not known <= nodes:
                # The newest copy here stopped while others went on: what those acknowledged
                # after is in none of these copies (an older one, of a node that crashed before,
                # says nothing of it). Galera's rule (safe_to_bootstrap): wait for one of them.
                log.warning("cluster: the newest state here is of a node that stopped while other nodes "
                            "went on (node(s) %s not here): the cluster forms once one of those, or every "
                            "node, is a member; agreed requests wait (docs/cluster.md, Formation)",
                            ", ".join(str(n) for n in sorted(known - nodes)))
                self.syncing = False
                return
        # The newest state: the highest epoch, whose high bits count the formations (see
        # EPOCH_FORMATION), so that a history that went on after a formation outranks an older
        # one however long that one grew.
        # Within one formation a member that was current holds the newest state: a member that
        # was not dropped what was applied since the change, and the current members' HELLOs
        # were sent before they applied it (their epochs then may tie with a stale copy's).
        donor_member = max(self.hellos, key=self._rank)
        donor = self.hellos[donor_member]
        mine = self.hellos.get((self.nodeid, self.pid))
        # A member that was not current dropped the state messages delivered since the change:
        # it takes the state even if it looked equal when it said hello.
        needs = [m for m, h in self.hellos.items() if m != donor_member and (
            (h.epoch, h.digest) != (donor.epoch, donor.digest) or not (h.current or formation))]
        for node, _ in needs:
            self.durable_of.pop(node, None)  # what it acknowledged was another history
        self.transfer_donor = donor_member if needs else None
        # Those that take the state count too: one may have it, and go on, before its DURABLE.
        self.current_nodes = {n for n, _ in self.hellos}
        if formation and (self.nodeid, self.pid) not in needs:
            self.state.epoch = ((donor.epoch >> EPOCH_FORMATION) + 1) << EPOCH_FORMATION
            log.info("cluster: formed from the state directories of node(s) %s (newest: node %d's); "
                     "epoch %#x", ", ".join(str(n) for n, _ in sorted(self.hellos)), donor_member[0],
                     self.state.epoch)
        if donor_member == (self.nodeid, self.pid):
            self.current = True
            self.syncing = False
            if needs:
                snapshot = msg.encode_snapshot(self.state)
                pieces = split(snapshot, round_id, self.group.max_atomic - 64)
                log.info("cluster: sending the state (epoch %d, %d bytes in %d piece(s)) to node(s) %s",
                         self.state.epoch, len(snapshot), len(pieces), ", ".join(str(n) for n, _ in needs))
                for piece in pieces:
                    self._multicast_plain(msg.Kind.STATE, round=round_id, piece=piece)
                self.counters.transfers_sent += 1
        elif mine is not None and (self.nodeid, self.pid) not in needs:
            self.current = True
            self.syncing = False
        else:
            log.info("cluster: taking the state of node %d (epoch %d; ours %d)", donor_member[0], donor.epoch,
                     self.state.epoch)
            self.current = False
            self.receiving = True
            self.receive_round = round_id
            self.receive_from = donor_member
            self.queued = []
        if self.current:
            self._became_current()

    def _rank(self, member: tuple[int, int]) -> tuple[int, bool, int, int, int]:
        """How a member's HELLO ranks as a donor: see _hello."""
        h = self.hellos[member]
        return (h.epoch >> EPOCH_FORMATION, h.current, h.epoch, -member[0], -member[1])

    receive_round = 0
    receive_from: tuple[int, int] = (0, 0)
    #: The donor of the last exchange that sent a state (every member knows it; none knows when
    #: the pieces were all in: its leaving later costs one exchange more, no transfer).
    transfer_donor: tuple[int, int] | None = None

    def _state_piece(self, event: Deliver, message: msg.Decoded) -> None:
        if not self.receiving or message.fields.round != self.receive_round:
            return
        if (event.nodeid, event.pid) != self.receive_from:
            return
        try:
            payload = self.reassembler.feed(event.nodeid, event.pid, bytes(message.fields.piece))
        except PieceError as exc:
            log.error("cluster: state transfer broken (%s): this node takes the state at the next "
                      "membership change (restart this daemon to force one)", exc)
            self.receiving = False
            return
        if payload is None:
            return
        try:
            state = msg.decode_snapshot(payload)
        except msg.MessageError as exc:
            log.error("cluster: the state received is not usable (%s): this node takes the state at the "
                      "next membership change (restart this daemon to force one)", exc)
            self.receiving = False
            self.queued = []  # what followed builds on the state it could not take
            return
        self.state = state
        self.receiving = False
        self.current = True
        self.syncing = False
        self.counters.transfers_taken += 1
        snapshot_id = self.store.new_snapshot_id()
        self.store.new_history()
        self._durable_epoch = 0
        self.announced = 0
        # The members' requests the snapshot holds wait for this node to say it has it on disk.
        self.owed = state.epoch
        self._snapshot_position = self.store.journal.position
        self._snapshots.append((payload, snapshot_id, state.epoch, self._snapshot_position))
        log.info("cluster: took the state at epoch %d (%d clustered log(s)); applying %d message(s) "
                 "that followed",
                 state.epoch, len(state.logs), len(self.queued))
        # The replies computed in the history given up are void: only what the new one applies
        # (the queued messages, then what goes again) is answered. So are the coordinator's
        # declarations and fences of it: FENCED says "the node's departure of this history is
        # fenced"; the coordinator derives them again from the new state.
        for pending in self.pending.values():
            pending.reply, pending.epoch = None, None
        self.history += 1
        self.waiting = [w for w in self.waiting if w[0] not in (msg.Kind.DEPARTED, msg.Kind.FENCED)]
        self.declared.clear()
        self.declared_fenced.clear()
        queued, self.queued = self.queued, []
        for later in queued:
            self._apply(later, msg.decode(later.data))
        self._resend_unanswered()
        self._became_current()

    def _became_current(self) -> None:
        if self.left_behind:
            # The agreed copy from now on: no longer left behind once it is durable here.
            self._clear_left_behind_at = self.state.epoch
            self._journal_pending = True
        # Once after every exchange, whatever it decided: what the members counted of this
        # node's durability before it may have been forgotten (a member that left and came back).
        self.announced = 0
        self.owed = max(self.owed, self.state.epoch)
        self._durable_advanced()
        if not self.rebooted_sent:  # once per start; waits with the others if it cannot go now
            self.rebooted_sent = True
            self._agree(msg.Kind.REBOOTED, {"boot_id": self.boot_id})
        self._release_waiting()
        self._coordinate()

    def _coordinator(self) -> bool:
        return bool(self.members) and self.members[0][0] == self.nodeid and self.members[0][1] == self.pid

    def _coordinate(self) -> None:
        """The coordinator's duties: declare departed nodes, fence them."""
        if not self._coordinator() or not self.may_multicast():
            return
        present = {n for n, _ in self.members}
        # Gone: its daemon left the group, or its corosync is not in the ring (a node missing when
        # the cluster forms: startup fencing). A node whose corosync runs but whose daemon has not
        # joined yet is starting: its boot id, when it comes, says whether its writes ended.
        gone = self.left_nodes | (self.state.nodes_known() - self.totem_members)
        missing = (self.state.nodes_known() & gone) - present - set(self.state.unfenced) - self.declared
        if missing and self._ask_quorate():
            self.declared |= missing
            self._agree(msg.Kind.DEPARTED, {"nodes": sorted(missing)})
        for node in list(self.state.unfenced):
            if node in self.fencing:
                continue
            if self.fence_after.get(node, 0.0) > time.monotonic():
                continue
            self._fence(node)

    def _fence(self, node: int) -> None:
        if self.fence_command is None:
            if node not in self.declared_fenced:
                self.declared_fenced.add(node)
                self._agree(msg.Kind.FENCED, {"node": node})
            return
        if node in self.fencing:
            return
        argv = [*self.fence_command, str(node)]
        log.warning("cluster: fencing node %d: %s", node, shlex.join(argv))
        try:
            self.fencing[node] = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
            self.fence_started[node] = time.monotonic()
            self.fence_history[node] = self.history
        except OSError as exc:
            log.error("cluster: cannot run the fence command for node %d: %s; retried in %g s", node, exc,
                      FENCE_RETRY)
            self.fence_after[node] = time.monotonic() + FENCE_RETRY

    def _poll_fences(self) -> None:
        for node, proc in list(self.fencing.items()):
            code = proc.poll()
            if code is None:
                if time.monotonic() - self.fence_started.get(node, time.monotonic()) < FENCE_TIMEOUT:
                    continue
                log.error("cluster: the fence command for node %d ran %g s: killed", node, FENCE_TIMEOUT)
                proc.kill()
                code = proc.wait()
            del self.fencing[node]
            if self.fence_history.pop(node, None) != self.history:
                # Run for a departure of a history this node gave up: says nothing of the node's
                # departures in this one (it may have come back and gone again since).
                log.warning("cluster: the fence command for node %d ended (exit %d) after this node took "
                            "another state: not counted; run again if this node coordinates and the node "
                            "is still to fence", node, code)
                self.fence_after[node] = time.monotonic()
                continue
            if code == 0:
                log.warning("cluster: node %d fenced (the fence command exited 0)", node)
                self._agree(msg.Kind.FENCED, {"node": node})
            else:
                log.error("cluster: fencing node %d failed (exit %d): its regions stay held; retried in %g s",
                          node, code, FENCE_RETRY)
                self.fence_after[node] = time.monotonic() + FENCE_RETRY
        if self.fence_after:
            now = time.monotonic()
            for node, when in list(self.fence_after.items()):
                if when <= now:
                    del self.fence_after[node]
                    if node in self.state.unfenced and self._coordinator() and self.may_multicast():
                        self._fence(node)

    def _ask_quorate(self) -> bool:
        try:
            self.quorate = self.quorum.getquorate()
        except CorosyncError as exc:
            self._lost(exc)
        return self.quorate

    def _quorum_changed(self, quorate: bool) -> None:
        if quorate == self.quorate:
            return
        self.quorate = quorate
        if quorate:
            log.warning("cluster: quorate again")
            self._say_hello()
            self._release_waiting()
            self._coordinate()
            self._answer_ready()
        else:
            log.warning("cluster: this node is not quorate: state changes wait for quorum")

    # --- durability ----------------------------------------------------------------------------------

    def flush_journal(self) -> bool:
        """Write the snapshots due and make the cluster journal durable past every message applied,
        then say DURABLE and answer what waited for it. The cluster thread runs it after each batch
        of events (one sync for all of them), holding no lock over the sync: the request loop
        goes on answering meanwhile. Whether there was anything to do."""
        if not (self._journal_pending or self._snapshots):
            return False
        if self._sync_retry_at is not None and time.monotonic() < self._sync_retry_at:
            return False
        with self.lock:
            self._journal_pending = False
            snapshots, self._snapshots = self._snapshots, []
        try:
            for data, snapshot_id, epoch, position in snapshots:
                self.store.write_snapshot(data, snapshot_id, epoch, position)
            durable = self.store.sync()
        except OSError as exc:
            if self._sync_retry_at is None:
                log.error("cluster: the cluster journal cannot be made durable (%s): FLUSHes wait; retried "
                          "every %g s", exc, SYNC_RETRY)
            with self.lock:
                self._snapshots[:0] = snapshots
                self._journal_pending = True
                self._sync_retry_at = time.monotonic() + SYNC_RETRY
            return True
        if self._sync_retry_at is not None:
            log.warning("cluster: the cluster journal is durable again")
            self._sync_retry_at = None
        with self.lock:
            self._durable_epoch = min(durable, self.store.durable_epoch)  # a new history resets it
            due = self._clear_left_behind_at
            clear = due is not None and self._durable_epoch >= due
        if clear:
            try:
                self.store.clear_left_behind()
            except OSError as exc:
                log.error("cluster: cannot remove %s (%s): retried at the next sync",
                          self.store.left_behind_path, exc)
            else:
                with self.lock:
                    self.left_behind = False
                    self._clear_left_behind_at = None
        with self.lock:
            self._durable_advanced()
        try:
            if self.store.journal.wants_spare():
                self.store.journal.prepare()  # after the answers: no FLUSH waits for it
        except OSError as exc:
            log.error("cluster: cannot make the cluster journal's next segment (%s); retried", exc)
        return True

    def _durable_advanced(self) -> None:
        durable = self._durable_epoch
        if (self.owed > self.announced and durable > self.announced and len(self.members) > 1
                and not self.closed and self.current):
            self.announced = durable
            self._multicast_plain(msg.Kind.DURABLE, epoch=durable)
        self._answer_ready()

    def _answer_ready(self) -> None:
        # Only from a state agreed in this membership: a reply computed in a history this node
        # may yet give up (during an exchange, or while taking the state) waits; if the history is
        # given up, the request goes again in the new one (_resend_unanswered).
        if not self.current or self.syncing or self.receiving:
            return
        ready = [t for t, p in self.pending.items() if p.reply is not None and self._durable_enough(p)]
        # Quorum as corosync last said: asked at every membership change (votequorum has counted
        # the new ring before CPG delivers anything in it) and followed through its notifications.
        if not ready or not self.quorate:
            return
        now = time.monotonic()
        for token in ready:
            pending = self.pending.pop(token)
            assert pending.reply is not None
            if pending.kind is msg.Kind.OPEN and pending.reply.error == 0:
                local = self.local.get(pending.request.key)
                if local is not None:
                    local.state = State.LIVE
            self.counters.latency_sum += now - pending.sent_at
            self.counters.latency_count += 1
            self.send(pending.reply, pending.address)
            for request, address in pending.followers:
                self.send(Reply(request, pending.reply.error, pending.reply.data), address)

    def _durable_enough(self, pending: Pending) -> bool:
        if not pending.durable or not pending.epoch:
            return True
        if self._durable_epoch < pending.epoch:
            return False
        # Every other member: a flushed mark is then durable on every node, and every node's
        # IS_CLEAN has it. A member that died holds this up only until corosync says so.
        others = {n for n, _ in self.members if n != self.nodeid}
        return all(self.durable_of.get(n, 0) >= pending.epoch for n in others)

    # --- the end ---------------------------------------------------------------------------------------

    def close(self) -> None:
        if not self.closed:
            self.closed = True
        self._stopping = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        with contextlib.suppress(OSError):
            self.flush_journal()  # what was applied since the last sync: a stop keeps it
        going_on = sorted(n for n, _ in self.members if n != self.nodeid and n in self.current_nodes)
        if going_on and not self.left_behind:
            # The others go on without this node: its copy is older than theirs from now on.
            try:
                self.store.mark_left_behind(self.state.epoch)
            except OSError as exc:
                log.error("cluster: cannot write %s (%s): a formation from the state directories may take "
                          "this node's older copy", self.store.left_behind_path, exc)
            else:
                log.info("cluster: stopped while node(s) %s go on: this node's state is marked as older",
                         ", ".join(map(str, going_on)))
        for node, proc in self.fencing.items():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("cluster: the fence command for node %d still runs at the stop: left to "
                            "finish; the next coordinator fences the node again", node)
            except OSError:
                pass
        self.group.close()
        self.quorum.close()
        self.store.close()
        os.close(self.wake_r)
        os.close(self.wake_w)

    def status(self) -> dict[str, object]:
        with self.lock:  # the metrics thread reads what the cluster thread and the loop change
            return self._status()

    def _status(self) -> dict[str, object]:
        return {
            "node": self.nodeid, "members": [n for n, _ in self.members], "quorate": self.quorate,
            "current": self.current, "epoch": self.state.epoch, "logs": len(self.state.logs),
            "pending": len(self.pending), "waiting": len(self.waiting), "unfenced": list(self.state.unfenced),
            **vars(self.counters),
        }


def _flush_pieces(marks: list[int], clears: list[int]) -> list[tuple[list[int], list[int]]]:
    """A FLUSH's marks and clears as the messages that carry them, at most FLUSH_REGIONS of each
    per message. The marks fill the last messages: the last one, which the reply waits for,
    carries marks whenever the FLUSH does, so that every member owes it a DURABLE."""
    count = max(1, -(-len(marks) // FLUSH_REGIONS), -(-len(clears) // FLUSH_REGIONS))
    skip = count - -(-len(marks) // FLUSH_REGIONS)
    pieces = []
    for i in range(count):
        j = i - skip
        pieces.append((marks[j * FLUSH_REGIONS:(j + 1) * FLUSH_REGIONS] if j >= 0 else [],
                       clears[i * FLUSH_REGIONS:(i + 1) * FLUSH_REGIONS]))
    return pieces


def _no_send(reply: Reply, address: object) -> None:
    raise RuntimeError("ClusterNode.send was not set")


class _Registering:
    """The loop's selector as the wrapped transport sees it: what it registers as its own is
    registered as the wrapper's, since the loop hands a key to the transport whose data it is."""

    def __init__(self, selector: selectors.BaseSelector, inner: object, outer: object) -> None:
        self.selector, self.inner, self.outer = selector, inner, outer

    def register(self, fileobj: object, events: int, data: object = None) -> selectors.SelectorKey:
        return self.selector.register(fileobj, events, self.outer if data is self.inner else data)

    def modify(self, fileobj: object, events: int, data: object = None) -> selectors.SelectorKey:
        return self.selector.modify(fileobj, events, self.outer if data is self.inner else data)

    def unregister(self, fileobj: object) -> selectors.SelectorKey:
        return self.selector.unregister(fileobj)

    def __getattr__(self, name: str) -> object:
        return getattr(self.selector, name)


class ClusterTransport:
    """The daemon's transport in cluster mode: frames of clustered logs go to the cluster node,
    the others to the request loop as before; the cluster's descriptors ride in the same selector."""

    def __init__(self, inner: Transport, node: ClusterNode) -> None:
        self.inner = inner
        self.node = node
        self.name = inner.name
        self.counters = inner.counters
        #: Where the frames of clustered logs are recorded as received (``--capture``).
        self.record: Callable[[bytes], None] | None = None
        #: Every reply's path: the wrapped transport's own method, no call of ours in front of it.
        self.send: Callable[[bytes, object], None] = inner.send

    def attach(self, selector: selectors.BaseSelector) -> None:
        self.inner.attach(self._registering(selector))
        self.node.start()

    def readable(self, key: selectors.SelectorKey, selector: selectors.BaseSelector) -> Iterator[Frame]:
        # As the loop takes them, as the transport reads them: each request is answered before
        # the next is read (filterfalse is as lazy as a generator, without a Python frame
        # resumed per request). Every turn's path: no call of ours but the node's, per frame.
        wrapped = self._wrapped
        if wrapped is None or wrapped[0] is not selector:
            wrapped = self._wrap(selector)
        take = self.node.take_frame if self.record is None else self._take
        return filterfalse(take, self.inner.readable(key, wrapped[1]))

    _wrapped: tuple[selectors.BaseSelector, _Registering] | None = None

    def _wrap(self, selector: selectors.BaseSelector) -> tuple[selectors.BaseSelector, _Registering]:
        self._wrapped = (selector, _Registering(selector, self.inner, self))
        return self._wrapped

    def _registering(self, selector: selectors.BaseSelector) -> _Registering:
        wrapped = self._wrapped
        if wrapped is None or wrapped[0] is not selector:
            wrapped = self._wrap(selector)
        return wrapped[1]

    def queued(self) -> list[Frame]:
        return [f for f in self.inner.queued() if not self._take(f)]

    def _take(self, frame: Frame) -> bool:
        taken = self.node.take_frame(frame)
        if taken and self.record is not None:
            self.record(frame[0])  # the loop records the others (--capture)
        return taken

    def stop_receiving(self, selector: selectors.BaseSelector) -> None:
        self.inner.stop_receiving(self._registering(selector))

    def close(self) -> None:
        self.node.close()
        self.inner.close()
