"""The engine: the log table as a deterministic state machine.

``step(request, now)`` applies one kernel request to the table and says what follows, as data:
either a :class:`~ulog_disk.protocol.wire.Reply` to send at once, or a :class:`Step` — the effects to
perform first, in order (journal records to append, store writes to run), what the reply waits
for (nothing, the journal being durable up to the step's records, or the step's store writes),
and the reply itself. The caller (:mod:`ulog_disk.daemon.applier`, on behalf of the daemon) performs
the effects and reports back how waited-for work ended (:meth:`Engine.completed`) or that a
journal append failed (:meth:`Engine.append_failed`); those calls return what to answer, if
anything. The engine opens nothing, reads no clock (``now``, wall-clock seconds, is given with
each request) and imports no storage, transport or daemon module: the same table, the same
requests and the same times give the same replies, the same effects and the same table — what a
replica of the log relies on.

Every fact about a request type (payloads, lifecycle rule, handler, whether it writes, when it is
answered, its journal event code, its cluster scope) is a row of :mod:`ulog_disk.protocol.requests`; the
per-instance and per-uuid rules (states, the CTR rule, hand-over, retention, generations,
adoption after another boot) are :mod:`ulog_disk.log.lifecycle`'s, consulted for every request.

Protocol rules applied here (protocol ref §1.7, §3, §5):

* The table is keyed by (uuid, luid). A request that re-registers (``requests.REREGISTERS``)
  for an unknown (uuid, luid) gets -ESRCH, which makes the kernel send CTR (+NUL) and RESUME
  again for that log; other requests for unknown logs get -EINVAL.
* Replies carry exactly the value size the kernel reads, ``data_size = 0`` where it offers no
  buffer, and a negative errno in ``error``.
* FLUSH (with or without integrated marks) is the durable point: answered once the journal is
  durable up to its record. RESUME and POSTSUSPEND write the instance to its store before they
  are answered, as the kernel's disk log writes its header and bits there — except the kernel's
  reconnect RESUME of a log resumed before that changes nothing stored but what a FLUSH record
  carries, which is journaled and answered as a FLUSH (:meth:`Engine._reconnect_resume`).
* A request a handler cannot read (a bad payload, a region out of range) is answered -EINVAL; a
  state the lifecycle table does not list is a bug of this program (:class:`LifecycleError`),
  raised to the caller, which logs it as one and answers -EIO.
"""

from __future__ import annotations

import collections
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..protocol import wire
from ..protocol.ctrargs import CtrArgs, parse_ctr
from ..protocol.requests import BY_JOURNAL_EVENT, REQUESTS, REREGISTERS, Answered
from ..protocol.wire import Reply, Request, RequestType
from . import restore
from .lifecycle import (
    EXISTING,
    TRANSITIONS,
    CtrAction,
    State,
    ctr_action,
    drops_adopted,
    forces_resync,
    gives_resync_work,
    hands_over,
    is_silent,
    newest_state,
    next_state,
    replaces_retained,
    retains_at_dtr,
    takes_generation,
)
from .ratelog import RateLimitedLog
from .records import (
    OP_CLEAR,
    OP_MARK,
    OP_SET_NOSYNC,
    OP_SET_SYNC,
    InstanceRecord,
    Restored,
    StoredInstance,
    StoredState,
)
from .regionlog import RegionLog, chunk_count

log = logging.getLogger("ulog_disk.engine")

Key = tuple[str, int]

_EVENT = {kind: facts.journal_event for kind, facts in REQUESTS.items()}
#: A request's type number → its type (``Request.kind``'s table, read without the property).
_KIND_OF: dict[int, RequestType] = {int(kind): kind for kind in RequestType}
_CTR = RequestType.CTR
_DURABLE = Answered.DURABLE
#: The IS_CLEAN / IN_SYNC reply payloads, by the answer (built once, not per request).
_S64_0_1 = (wire.build_s64(0), wire.build_s64(1))


def describe(uuid: str, luid: int) -> str:
    return f"uuid={uuid!r} luid={luid:#x}"


# --- effects: what the caller performs, in order ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class AppendOps:
    """Journal: MARK/CLEAR/SET_REGION_SYNC operations just applied to the instance."""

    uuid: str
    luid: int
    ops: list[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class AppendFlush:
    """Journal: a FLUSH of the instance (its meta), with its integrated marks: the commit point."""

    record: InstanceRecord
    ops: list[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class AppendEvent:
    """Journal: a lifecycle request (its journal event code) and the instance's meta after it."""

    record: InstanceRecord
    event: int


@dataclass(frozen=True, slots=True)
class StoreRecord:
    """Store: a new instance's identity and geometry (after CTR); with ``retain``, first keep
    that state as the uuid's retained state, in the same write."""

    record: InstanceRecord
    retain: StoredState | None


@dataclass(frozen=True, slots=True)
class StoreCommit:
    """Store: the instance's changed chunks and meta (a checkpoint, or a commit that an answer
    waits for); ``resized``: chunks past the region count go."""

    record: InstanceRecord
    clean_chunks: dict[int, bytes]
    sync_chunks: dict[int, bytes]
    resized: bool


@dataclass(frozen=True, slots=True)
class StoreDrop:
    """Store: remove the instance (with ``retain``, keep that as the uuid's retained state in the
    same write); ``release``: the uuid has no instance left. ``best_effort``: a failure is logged
    and fails nothing (the removal of an adopted earlier boot's instance)."""

    uuid: str
    luid: int
    retain: StoredState | None
    release: bool = False
    best_effort: bool = False


JournalEffect = AppendOps | AppendFlush | AppendEvent
StoreEffect = StoreRecord | StoreCommit | StoreDrop
Effect = JournalEffect | StoreEffect
JOURNAL_EFFECTS = (AppendOps, AppendFlush, AppendEvent)


def effect_key(effect: Effect) -> Key:
    if isinstance(effect, AppendOps | StoreDrop):
        return (effect.uuid, effect.luid)
    return (effect.record.uuid, effect.record.luid)


@dataclass(slots=True)
class Step:
    """What a request (or background work) leads to.

    ``effects`` are performed first, in order. Then, by ``wait``: ``AT_ONCE``, ``reply`` is sent;
    ``DURABLE``, ``reply`` waits for the journal to be durable up to the step's last record;
    ``STORED``, the step's store effects run (one job, in order, stopping at the first failure
    that is not best-effort) and ``reply`` waits for them. A waiting step's outcome is reported
    with :meth:`Engine.completed` under ``work``. ``reply`` is what a success answers — sent by
    whichever thread sees the success — or None when the engine answers only through
    ``completed`` (background work, or an answer that must follow the engine's books).
    """

    reply: Reply | None
    effects: list[Effect]
    wait: Answered = Answered.AT_ONCE
    work: int = 0


@dataclass
class Instance:
    uuid: str
    luid: int
    ctr: CtrArgs
    state: State
    log: RegionLog
    boot_id: str
    #: Per-uuid generation of this instance's last commit of resumed state (0: never resumed).
    generation: int = 0
    resumed: bool = False
    #: Health character for STATUS_INFO: A ok, D backend failure, F failed commit.
    health: str = "A"
    committed_at: float = 0.0
    resized: bool = True
    #: Another instance of the uuid adopted this one's state: whatever this one still receives
    #: (late clears after POSTSUSPEND) must never make its state the uuid's newest again.
    superseded: bool = False
    #: False for an instance restored from the store until the kernel sends a request for it: a
    #: restored LIVE instance that stays silent may have been removed while the daemon was down.
    heard: bool = True
    #: The last CTR was the kernel's reconnect (NUL counted): the RESUME that follows is the
    #: reconnect's, which the kernel sends even for a table in the inactive slot.
    reconnecting: bool = False
    #: A journal append of this instance failed: the journal misses some of its changes, so its
    #: FLUSHes are made durable by writing its whole state to its store until one succeeds.
    journal_gap: bool = False

    @property
    def key(self) -> Key:
        return (self.uuid, self.luid)

    def record(self) -> InstanceRecord:
        return InstanceRecord(
            uuid=self.uuid, luid=self.luid, ctr=self.ctr.text, log_type=self.ctr.log_type,
            region_size=self.ctr.region_size, region_count=self.log.region_count,
            state=self.state.value, generation=self.generation, cursor=self.log.cursor,
            boot_id=self.boot_id, resumed=self.resumed, committed_at=self.committed_at,
            superseded=self.superseded,
        )

    def stored_state(self, now: float) -> StoredState:
        return StoredState(
            uuid=self.uuid, generation=self.generation, region_count=self.log.region_count,
            clean=self.log.clean.tobytes(), sync=self.log.sync.tobytes(), source_luid=self.luid,
            committed_at=now,
        )


@dataclass
class Stats:
    """The daemon's counters (the stop line, ``--metrics-file``): plain integers, touched only
    on the engine's thread."""

    requests: int = 0
    commits: int = 0
    commit_failures: int = 0
    checkpoints: int = 0
    checkpoint_failures: int = 0
    #: Requests of a known type, by type (type 0, unknown types and malformed frames are only
    #: in ``requests``).
    by_type: collections.Counter[RequestType] = field(default_factory=collections.Counter)
    #: Requests answered with an error, by the request type number they carried.
    errors_by_type: collections.Counter[int] = field(default_factory=collections.Counter)

    @property
    def errors(self) -> int:
        return sum(self.errors_by_type.values())


class Admission(Protocol):
    """Whether one more log fits (the daemon's memory limit): None, or why not."""

    def refusal(self, region_count: int) -> str | None: ...


@dataclass(slots=True)
class _Work:
    """What the engine must do when a waited-for step ends (:meth:`Engine.completed`)."""

    kind: str
    inst: Instance
    #: The request answered (None: background work, or the commits at stop).
    request: Request | None
    #: A store write's chunks and flags, put back for the next write if it fails (None: the work
    #: writes no store; no dict made for every FLUSH).
    clean: dict[int, bytes] | None = None
    sync: dict[int, bytes] | None = None
    resized: bool = False
    gap: bool = False
    modified: bool = False
    why: str = ""
    reply_data: bytes = b""


def _ok(req: Request, data: bytes = b"") -> Reply:
    return Reply(req, 0, data)


def _err(req: Request, code: int) -> Reply:
    return Reply(req, -code)


class Engine:
    def __init__(self, boot_id: str, *, journaled: bool = True, admission: Admission | None = None):
        #: The boot the kernel's luids belong to: instances of other boots are gone.
        self.boot_id = boot_id
        #: False for a backend without a journal: every FLUSH is then a store commit.
        self.journaled = journaled
        #: Refuses a new log that would not fit under the daemon's memory limit (None: no check).
        self.admission = admission
        self.table: dict[Key, Instance] = {}
        #: The table's instances per uuid, in the table's order (the hand-over rule and DTR
        #: look at a uuid's instances; a scan of the table per RESUME made a thousand
        #: mirrors' reconnect quadratic). Changed with the table, by :meth:`_put`, :meth:`_pop`.
        self.by_uuid: dict[str, dict[int, Instance]] = {}
        self.generations: dict[str, int] = {}
        #: States left behind by instances that are gone: DTR'd last instances (retained) and
        #: instances of earlier boots found in the store (the kernel that owned them is gone).
        self.gone: dict[str, list[StoredState]] = {}
        #: Instances of earlier boots still in the store, per uuid and luid: their state and
        #: whether they had resumed.
        self.earlier_boot: dict[str, dict[int, tuple[StoredState, bool]]] = {}
        #: The generation of each uuid's retained state in the store (absent: none).
        self.retained_generation: dict[str, int] = {}
        self.stats = Stats()
        #: The time given with the request being handled (wall clock, seconds).
        self.now = 0.0
        #: Lines about requests a sender controls (rejected, unknown): rate-limited by kind, on
        #: the time the engine is given.
        self.noisy = RateLimitedLog(log, clock=lambda: self.now)
        #: Waited-for steps not completed yet, by work token.
        self.work: dict[int, _Work] = {}
        self._tokens = 0

    # --- start-up ------------------------------------------------------------------------

    def load(self, restored: Restored) -> None:
        """Rebuild the table from what the backend read back (daemon restart)."""
        for uuid, reason in restored.damaged.items():
            log.error("store of uuid=%r is damaged (%s): its logs start from a full resync", uuid, reason)
        for uuid, state in restored.retained.items():
            self.gone.setdefault(uuid, []).append(state)
            self.retained_generation[uuid] = state.generation
            self._see_generation(uuid, state.generation)
        for stored in restored.instances:
            self._load_instance(stored)

    def _load_instance(self, stored: StoredInstance) -> None:
        rec = stored.record
        self._see_generation(rec.uuid, rec.generation)
        if restore.of_earlier_boot(stored, self.boot_id):
            # The kernel that owned this luid is gone (host reboot): its state is only a
            # candidate for hand-over, and its luid may be reused by an unrelated log.
            gone = restore.handover_candidate(stored)
            self.gone.setdefault(rec.uuid, []).append(gone)
            self.earlier_boot.setdefault(rec.uuid, {})[rec.luid] = (gone, rec.resumed)
            log.info("found %s from an earlier boot (generation %d): kept for hand-over",
                     describe(rec.uuid, rec.luid), rec.generation)
            return
        if State(rec.state) not in EXISTING:
            # No daemon writes an instance after its DTR; one found is a damaged or foreign
            # record, and serving it would answer every request for its luid with a bug.
            log.error("stored %s is in state %s: not restored (left for ulog-recover purge)",
                      describe(rec.uuid, rec.luid), rec.state)
            return
        try:
            ctr = parse_ctr(rec.ctr.encode("ascii"))
        except (ValueError, UnicodeEncodeError) as exc:
            log.error("stored %s has an unusable constructor %r (%s): not restored",
                      describe(rec.uuid, rec.luid), rec.ctr, exc)
            return
        rebuilt = restore.rebuild(stored)
        if rebuilt.distrusted is not None:
            # What was answered since the last commit is unknown and the kernel will not send it
            # again: nothing of this log can be trusted to be clean or in sync.
            log.error("%s: journal damaged (%s): every region is taken as dirty and out of sync "
                      "(full resync at the next resume)", describe(rec.uuid, rec.luid), rebuilt.distrusted)
        region_log = rebuilt.log
        inst = Instance(
            uuid=rec.uuid, luid=rec.luid, ctr=ctr, state=State(rec.state), log=region_log,
            boot_id=rec.boot_id, generation=rec.generation, resumed=rec.resumed,
            committed_at=rec.committed_at, resized=False, superseded=rec.superseded, heard=False,
        )
        self._put(inst)
        log.info("restored %s state=%s generation=%d: %d/%d in sync, %d dirty, %d journal ops replayed",
                 describe(rec.uuid, rec.luid), rec.state, rec.generation, region_log.sync_count,
                 region_log.region_count, len(region_log.dirty_regions()), rebuilt.replayed)

    def _put(self, inst: Instance) -> None:
        self.table[inst.key] = inst
        self.by_uuid.setdefault(inst.uuid, {})[inst.luid] = inst

    def _pop(self, inst: Instance) -> None:
        self.table.pop(inst.key, None)
        same = self.by_uuid.get(inst.uuid)
        if same is not None:
            same.pop(inst.luid, None)
            if not same:
                del self.by_uuid[inst.uuid]

    def _same_uuid(self, uuid: str) -> list[Instance]:
        """The uuid's instances in the table, in the table's order."""
        return list(self.by_uuid.get(uuid, {}).values())

    def _see_generation(self, uuid: str, generation: int) -> None:
        if generation > self.generations.get(uuid, 0):
            self.generations[uuid] = generation

    # --- dispatch ------------------------------------------------------------------------

    def step(self, req: Request, now: float) -> Reply | Step:
        """Apply one request at time ``now``: a reply to send at once (nothing to perform), or
        a :class:`Step`. Raises :class:`~ulog_disk.log.lifecycle.LifecycleError` on a bug."""
        self.now = now
        stats = self.stats
        stats.requests += 1
        # Every request's path: the lookups of ``Request.kind``/``key`` and ``next_state``
        # inline (the same tables), no call that is not needed.
        kind = _KIND_OF.get(req.request_type)
        if kind is None:
            stats.errors_by_type[req.request_type] += 1
            if req.request_type == 0:
                # A zero type means the request was garbled on the way (cmirrord's reading): ask
                # the kernel to send it again.
                self.noisy.log("type-0 request", logging.WARNING,
                               "request seq=%d has type 0: asking the kernel to resend", req.seq)
                return Reply(req, -errno.EAGAIN, ack=True)
            self.noisy.log("unknown request type", logging.ERROR, "unknown request type %d (seq=%d, %s)",
                           req.request_type, req.seq, describe(req.uuid, req.luid))
            return _err(req, errno.EINVAL)
        stats.by_type[kind] += 1
        if kind is _CTR:
            return self._ctr(req)
        inst = self.table.get((req.uuid, req.luid))
        if inst is None:
            stats.errors_by_type[req.request_type] += 1
            if kind in REREGISTERS:
                self.noisy.log("request for an unknown log", logging.WARNING,
                               "%s for unknown %s: answering -ESRCH so the kernel re-registers it",
                               kind.name, describe(req.uuid, req.luid))
                return _err(req, errno.ESRCH)
            self.noisy.log("request for an unknown log", logging.ERROR, "%s for unknown %s", kind.name,
                           describe(req.uuid, req.luid))
            return _err(req, errno.EINVAL)
        inst.heard = True
        # The lifecycle table is consulted for every request (a pair it does not list raises).
        new_state = TRANSITIONS.get((inst.state, kind))
        if new_state is None:
            new_state = next_state(inst.state, kind)
        try:
            return _HANDLERS[kind](self, inst, req, new_state)
        except (ValueError, IndexError) as exc:
            stats.errors_by_type[req.request_type] += 1
            self.noisy.log("rejected request", logging.ERROR, "%s %s seq=%d rejected: %s", kind.name,
                           describe(inst.uuid, inst.luid), req.seq, exc)
            return _err(req, errno.EINVAL)

    def advance(self, now: float) -> None:
        """Time passes without a request: the rate-limited log's windows that have ended say how
        many lines they held back (the time is the caller's, as in :meth:`step`)."""
        self.now = max(self.now, now)
        self.noisy.flush()

    # --- what the caller reports back ----------------------------------------------------------

    def completed(self, work: int, exc: BaseException | None) -> Reply | None:
        """A waited-for step ended (``exc``: why it failed): the engine's books are put right.
        Returns the request's reply (None for background work and the commits at stop); whether
        it still has to be sent is the caller's one rule (``daemon.applier.answered_early``)."""
        w = self.work.pop(work)
        return self._COMPLETIONS[w.kind](self, w, exc)

    def append_failed(self, effect: JournalEffect, exc: BaseException, work: int = 0) -> None:
        """A journal append of the step just returned (``work``: its token, 0 if it waits for
        nothing) failed: the instance's health is D until a commit succeeds, and the step's
        success is answered only after :meth:`completed` has put the health right. The journal
        now misses a change of the instance, so its FLUSHes go to its store until one succeeds —
        unless the step's own store commit carries the change (the record's meta and every chunk
        changed since the last store write): then that commit closes the gap, or leaves it open
        if it fails. A FLUSH whose own record failed is then served by :meth:`flush_fallback`."""
        key = effect_key(effect)
        inst = self.table.get(key)
        what = (BY_JOURNAL_EVENT[effect.event].name if isinstance(effect, AppendEvent)
                else "FLUSH" if isinstance(effect, AppendFlush) else "region ops")
        w = self.work.get(work)
        if inst is None:
            log.error("%s of %s: journal write failed (%s)", what, describe(*key), exc)
            return
        inst.health = "D"
        if w is not None and w.kind == "commit" and w.inst is inst:
            w.gap = True
        else:
            inst.journal_gap = True
        log.error("%s %s: journal write failed (%s)", what, describe(inst.uuid, inst.luid), exc)

    def flush_fallback(self, work: int) -> Step:
        """The FLUSH record of ``work`` could not be appended: make it durable by a store commit
        instead (its reply waits for that)."""
        w = self.work.pop(work)
        assert w.request is not None
        return self._commit(w.inst, w.request, w.why)

    # --- lifecycle requests --------------------------------------------------------------

    def _ctr(self, req: Request) -> Reply | Step:
        try:
            text, reconnect = wire.parse_ctr_string(req.data)
            ctr = parse_ctr(text)
        except ValueError as exc:  # CtrError is one
            self.stats.errors_by_type[req.request_type] += 1
            self.noisy.log("rejected request", logging.ERROR, "CTR %s rejected: %s",
                           describe(req.uuid, req.luid), exc)
            return _err(req, errno.EINVAL)
        if not req.uuid:
            self.stats.errors_by_type[req.request_type] += 1
            self.noisy.log("rejected request", logging.ERROR, "CTR with an empty uuid rejected (luid=%#x)",
                           req.luid)
            return _err(req, errno.EINVAL)
        # The reconnect CTR offers no reply buffer; the initial one takes the device name.
        reply_data = b"" if reconnect else ctr.device_reply()
        existing = self.table.get(req.key)
        if existing is not None:
            existing.heard = True
            existing.reconnecting = reconnect
            next_state(existing.state, RequestType.CTR)  # consulted: an existing instance keeps its state
        action = ctr_action(existing is not None, existing is not None and existing.ctr.text == ctr.text,
                            existing is not None and existing.resumed)
        if action is CtrAction.ACCEPT:
            assert existing is not None
            if existing.ctr.text != ctr.text:
                log.warning("CTR %s repeats a resumed log with another constructor %r (kept %r)",
                            describe(req.uuid, req.luid), ctr.text, existing.ctr.text)
            log.info("CTR %s: already known (%s), accepted%s", describe(req.uuid, req.luid),
                     existing.state, " (kernel reconnect)" if reconnect else "")
            return _ok(req, reply_data)
        if self.admission is not None and (refusal := self.admission.refusal(ctr.region_count)):
            self.stats.errors_by_type[req.request_type] += 1
            self.noisy.log("memory limit", logging.ERROR, "CTR %s refused: %s: answering -ENOMEM",
                           describe(req.uuid, req.luid), refusal)
            return _err(req, errno.ENOMEM)
        if action is CtrAction.REPLACE:
            assert existing is not None
            # A never-resumed instance whose luid the kernel reuses with another constructor: its
            # kernel context died after CTR without a DTR (protocol ref §3.2).
            log.warning("CTR %s replaces a never-resumed instance with constructor %r",
                        describe(req.uuid, req.luid), existing.ctr.text)
        inst = Instance(
            uuid=req.uuid, luid=req.luid, ctr=ctr, state=State.CONSTRUCTED,
            log=RegionLog.fresh(ctr.region_count, ctr.sync_mode == "nosync"), boot_id=self.boot_id,
            reconnecting=reconnect,
        )
        self._put(inst)
        log.info("CTR %s type=%s regions=%d region_size=%d%s%s", describe(req.uuid, req.luid),
                 ctr.log_type, ctr.region_count, ctr.region_size,
                 f" sync_mode={ctr.sync_mode}" if ctr.sync_mode != "default" else "",
                 " (kernel reconnect)" if reconnect else "")
        if reconnect and existing is None:
            # The kernel has served this log before (a reconnect), and this daemon knows nothing of
            # it: its state was lost (a state directory wiped or replaced, a damaged store moved
            # aside, the memory backend). Which regions were being written is unknown, so none
            # may read as clean or in sync, whatever the table says ('nosync' included).
            inst.log.distrust_all()
            log.warning("CTR %s: the kernel reconnects a log this daemon has no state for: every "
                        "region dirty and out of sync (a full resync at its next resume)",
                        describe(req.uuid, req.luid))
        keep = None if existing is not None else self._kept_at_ctr(inst)
        rec = inst.record()
        work = self._waiting(_Work("ctr", inst, req, reply_data=reply_data))
        return Step(None, [AppendEvent(rec, _EVENT[RequestType.CTR]), StoreRecord(rec, keep)],
                    Answered.STORED, work)

    def _kept_at_ctr(self, inst: Instance) -> StoredState | None:
        """The state of the earlier boot's instance whose luid the CTR reuses, if it becomes the
        uuid's retained state in the CTR's store write."""
        found = self.earlier_boot.get(inst.uuid, {}).get(inst.luid)
        if found is None:
            return None
        state, resumed = found
        if not replaces_retained(resumed, state.generation, self.retained_generation.get(inst.uuid)):
            return None
        self.retained_generation[inst.uuid] = state.generation
        log.info("CTR %s reuses the luid of an earlier boot: its state (generation %d) is kept as "
                 "the uuid's retained state", describe(inst.uuid, inst.luid), state.generation)
        return state

    def _dtr(self, inst: Instance, req: Request, new_state: State) -> Step:
        self._pop(inst)
        inst.state = new_state
        others = self._same_uuid(inst.uuid)
        newest_elsewhere = max(
            [o.generation for o in others] + [s.generation for s in self.gone.get(inst.uuid, [])],
            default=0,
        )
        retain = None
        if retains_at_dtr(inst.resumed, inst.superseded, inst.generation, newest_elsewhere):
            inst.generation = self._next_generation(inst.uuid)
            retain = inst.stored_state(self.now)
            self.gone[inst.uuid] = [retain]
            self.retained_generation[inst.uuid] = retain.generation
        log.info("DTR %s (%d instance(s) of the uuid left)%s", describe(inst.uuid, inst.luid), len(others),
                 f": its state is kept as the uuid's retained state, generation {retain.generation}"
                 if retain else "")
        work = self._waiting(_Work("dtr", inst, req))
        return Step(None, [AppendEvent(inst.record(), _EVENT[RequestType.DTR]),
                           StoreDrop(inst.uuid, inst.luid, retain, release=not others)],
                    Answered.STORED, work)

    def _presuspend(self, inst: Instance, req: Request, new_state: State) -> Reply:
        self._transition(inst, RequestType.PRESUSPEND, new_state)
        return _ok(req)

    def _postsuspend(self, inst: Instance, req: Request, new_state: State) -> Step:
        self._transition(inst, RequestType.POSTSUSPEND, new_state)
        inst.log.recovering = None
        return self._commit(inst, req, "POSTSUSPEND", event=_EVENT[RequestType.POSTSUSPEND])

    def _resume(self, inst: Instance, req: Request, new_state: State) -> Step:
        # What the store holds of the instance that a RESUME could change besides what a FLUSH
        # record carries: its lifecycle state, the resumed and superseded flags.
        unchanged = new_state is inst.state and inst.resumed and not inst.superseded
        self._transition(inst, RequestType.RESUME, new_state)
        first = not inst.resumed
        reconnect, inst.reconnecting = inst.reconnecting, False
        inst.superseded = False
        inst.log.restart_recovery()
        forced = forces_resync(first, inst.ctr.sync_mode)
        source = None if forced else self._handover_source(inst, reconnect)
        if source is not None:
            before = inst.log.sync_count
            inst.log = self._adopt(inst, source)
            inst.resized = True
            log.info("RESUME %s adopts the state of luid=%#x (generation %d): %d/%d in sync "
                     "(was %d), %d dirty", describe(inst.uuid, inst.luid), source.source_luid,
                     source.generation, inst.log.sync_count, inst.log.region_count, before,
                     len(inst.log.dirty_regions()))
        elif forced:
            inst.log = RegionLog.fresh(inst.log.region_count, False)
            log.info("RESUME %s: 'sync' forces a full resync of %d regions",
                     describe(inst.uuid, inst.luid), inst.log.region_count)
        else:
            log.info("RESUME %s: %d/%d in sync", describe(inst.uuid, inst.luid), inst.log.sync_count,
                     inst.log.region_count)
        inst.resumed = True
        if (unchanged and reconnect and source is None and not forced and self.journaled
                and not inst.journal_gap and not inst.resized and inst.health == "A"):
            return self._reconnect_resume(inst, req)
        # A state adopted, or thrown away by 'sync', is the uuid's newest from now on.
        step = self._commit(inst, req, "RESUME", force_generation=source is not None or forced,
                            event=_EVENT[RequestType.RESUME])
        if source is not None:
            drop = self._drop_adopted_earlier_boot(inst, source)
            if drop is not None:
                step.effects.append(drop)
        return step

    def _reconnect_resume(self, inst: Instance, req: Request) -> Step:
        """The kernel's reconnect RESUME of a log resumed before (a daemon restart makes a thousand
        mirrors send one each) whose stored state it changes in nothing but what a FLUSH record
        carries (generation, recovery cursor, commit time): no hand-over, no forced resync, same
        lifecycle state and flags, the journal complete for the instance. Its EVENT record and a
        FLUSH record without marks are journaled, and it is answered once the journal is durable
        up to them, as a FLUSH is: a restart replays the FLUSH record's meta over the store, so it
        finds what the RESUME's store write would have written (the cursor back at 0, the
        generation), and every request answered before it, durable. The store write is left to
        the next checkpoint. A store write per RESUME was an environment opened and two syncs
        each on the one store worker, one mirror after another (1.2 of the 2 s until a thousand
        mirrors had answered after a restart); journaled, they share the group commit."""
        if takes_generation(inst.log.take_modified(), inst.resumed, inst.superseded):
            inst.generation = self._next_generation(inst.uuid)
        inst.committed_at = self.now
        rec = inst.record()
        work = self._waiting(_Work("flush", inst, req, why="RESUME"))
        return Step(_ok(req), [AppendEvent(rec, _EVENT[RequestType.RESUME]), AppendFlush(rec, [])],
                    Answered.DURABLE, work)

    def _drop_adopted_earlier_boot(self, inst: Instance, source: StoredState) -> StoreDrop | None:
        """An instance of an earlier boot whose state was just adopted has nothing left to give:
        remove it once the adopter's state is committed, or every reboot would leave one more
        (the retained state and live instances are never removed here)."""
        stale = self.earlier_boot.get(inst.uuid, {})
        luid = source.source_luid
        if not drops_adopted(luid in stale, luid == inst.luid, (inst.uuid, luid) in self.table):
            return None
        del stale[luid]
        self.gone[inst.uuid] = [s for s in self.gone.get(inst.uuid, []) if s is not source]
        log.info("RESUME %s: luid=%#x of an earlier boot, whose state it adopts, goes from the store "
                 "once the adopter's commit is written", describe(inst.uuid, inst.luid), luid)
        return StoreDrop(inst.uuid, luid, None, best_effort=True)

    def _handover_source(self, inst: Instance, reconnect: bool) -> StoredState | None:
        """The state the resuming instance adopts, by the hand-over rule (:mod:`.lifecycle`);
        an adopted instance is flagged superseded."""
        others = self._same_uuid(inst.uuid)
        best = newest_state(inst.luid, inst.generation, others, self.gone.get(inst.uuid, []))
        if isinstance(best, Instance):
            if is_silent(best, reconnect):
                log.info("RESUME %s: live luid=%#x was restored from the store and has not been heard "
                         "from since: its kernel instance is gone, its state is adopted",
                         describe(inst.uuid, inst.luid), best.luid)
            elif not hands_over(best, reconnect):
                log.info("RESUME %s: the newest state of the uuid belongs to live luid=%#x: not adopted",
                         describe(inst.uuid, inst.luid), best.luid)
                return None
            best.superseded = True
            return best.stored_state(self.now)
        return best

    def _adopt(self, inst: Instance, source: StoredState) -> RegionLog:
        donor = RegionLog.from_bitmaps(source.region_count, source.clean, source.sync)
        inst.generation = source.generation
        return donor.adopted(inst.log.region_count, inst.ctr.sync_mode == "nosync")

    def _transition(self, inst: Instance, kind: RequestType, new: State) -> None:
        if new is not inst.state:
            log.info("%s %s: %s -> %s", kind.name, describe(inst.uuid, inst.luid), inst.state, new)
        else:
            log.info("%s %s (%s)", kind.name, describe(inst.uuid, inst.luid), inst.state)
        inst.state = new

    # --- commits ---------------------------------------------------------------------------

    def _next_generation(self, uuid: str) -> int:
        gen = self.generations.get(uuid, 0) + 1
        self.generations[uuid] = gen
        return gen

    def _waiting(self, work: _Work) -> int:
        self._tokens += 1
        self.work[self._tokens] = work
        return self._tokens

    def _commit(self, inst: Instance, req: Request | None, why: str, force_generation: bool = False,
                event: int | None = None) -> Step:
        """Write the instance to its store before answering (lifecycle points, stop, and a FLUSH
        of an instance whose journal records are incomplete). ``req`` None: the commits at stop,
        which answer no request (a failure is no request's error)."""
        modified = inst.log.take_modified()
        if takes_generation(modified or force_generation, inst.resumed, inst.superseded):
            inst.generation = self._next_generation(inst.uuid)
        inst.committed_at = self.now
        effects: list[Effect] = []
        if event is not None:
            effects.append(AppendEvent(inst.record(), event))
        store, w = self._store_effect(inst, "commit", req, why)
        w.modified = modified
        effects.append(store)
        # A commit of an instance whose health is not A is answered only after completed() put
        # it right, or a STATUS_INFO right after the reply could still show F.
        early = req is not None and inst.health == "A"
        reply = _ok(req) if early and req is not None else None
        return Step(reply, effects, Answered.STORED, self._waiting(w))

    def _store_effect(self, inst: Instance, kind: str, req: Request | None,
                      why: str) -> tuple[StoreCommit, _Work]:
        """A write of the instance's chunks changed since the last one, and its meta."""
        clean, sync = inst.log.take_chunks()
        effect = StoreCommit(inst.record(), clean, sync, inst.resized)
        w = _Work(kind, inst, req, clean=clean, sync=sync, resized=inst.resized, gap=inst.journal_gap,
                  why=why)
        inst.resized = False
        inst.journal_gap = False
        return effect, w

    def checkpoint(self, key: Key, now: float) -> Step | None:
        """Background work: write one instance's changes to its store (None if it is gone)."""
        inst = self.table.get(key)
        if inst is None:
            return None
        self.now = now
        effect, w = self._store_effect(inst, "checkpoint", None, "checkpoint")
        return Step(None, [effect], Answered.STORED, self._waiting(w))

    def commit_all(self, now: float) -> list[Step]:
        """Work that writes every instance to its store (clean stop): the journal is then not
        needed by anything."""
        self.now = now
        return [self._commit(inst, None, "stop") for inst in list(self.table.values())]

    def _stored(self, w: _Work, exc: BaseException | None) -> None:
        """The books of a store write of the instance's chunks: counted, or its chunks and
        flags put back for the next write."""
        if exc is None:
            self.stats.checkpoints += 1
            return
        self.stats.checkpoint_failures += 1
        inst = w.inst
        inst.log.restore_changes(w.clean or {}, w.sync or {}, False)
        inst.resized = inst.resized or w.resized
        inst.journal_gap = inst.journal_gap or w.gap
        log.warning("%s %s: store write failed (%s); the journal keeps its changes, retried later",
                    w.why, describe(inst.uuid, inst.luid), exc)

    def _checkpoint_done(self, w: _Work, exc: BaseException | None) -> Reply | None:
        self._stored(w, exc)
        return None

    def _commit_done(self, w: _Work, exc: BaseException | None) -> Reply | None:
        self._stored(w, exc)
        inst, req = w.inst, w.request
        if exc is None:
            self.stats.commits += 1
            if inst.health != "A":
                # The commit wrote everything the failed commits or journal writes could not.
                log.info("%s %s: commit succeeded again, health %s back to A", w.why,
                         describe(inst.uuid, inst.luid), inst.health)
                inst.health = "A"
            return _ok(req) if req is not None else None
        self.stats.commit_failures += 1
        inst.log.modified = inst.log.modified or w.modified
        inst.health = "F"
        log.error("%s %s: commit failed (%s)%s", w.why, describe(inst.uuid, inst.luid), exc,
                  ": answering -EIO" if req is not None else "")
        if req is None:
            return None
        self.stats.errors_by_type[req.request_type] += 1
        return _err(req, errno.EIO)

    def _flush_done(self, w: _Work, exc: BaseException | None) -> Reply | None:
        inst, req = w.inst, w.request
        assert req is not None
        if exc is None:
            self.stats.commits += 1
            if inst.health != "A":
                log.info("%s %s: durable again, health %s back to A", w.why, describe(inst.uuid, inst.luid),
                         inst.health)
                inst.health = "A"
            return _ok(req)
        self.stats.commit_failures += 1
        self.stats.errors_by_type[req.request_type] += 1
        inst.health = "F"
        log.error("%s %s: journal sync failed (%s): answering -EIO", w.why, describe(inst.uuid, inst.luid),
                  exc)
        return _err(req, errno.EIO)

    def _ctr_done(self, w: _Work, exc: BaseException | None) -> Reply | None:
        inst, req = w.inst, w.request
        assert req is not None
        if exc is not None:
            inst.health = "D"
            log.error("CTR %s: could not record the instance (%s); serving it from memory",
                      describe(inst.uuid, inst.luid), exc)
        return _ok(req, w.reply_data)

    def _dtr_done(self, w: _Work, exc: BaseException | None) -> Reply | None:
        inst, req = w.inst, w.request
        assert req is not None
        if exc is not None:
            log.error("DTR %s: store cleanup failed (%s); left for ulog-recover",
                      describe(inst.uuid, inst.luid), exc)
        return _ok(req)

    _COMPLETIONS: dict[str, Callable[[Engine, _Work, BaseException | None], Reply | None]] = {
        "checkpoint": _checkpoint_done,
        "commit": _commit_done,
        "flush": _flush_done,
        "ctr": _ctr_done,
        "dtr": _dtr_done,
    }

    # --- region requests -------------------------------------------------------------------

    def _get_region_size(self, inst: Instance, req: Request, new_state: State) -> Reply:
        return _ok(req, wire.build_u64(inst.ctr.region_size))

    def _is_clean(self, inst: Instance, req: Request, new_state: State) -> Reply:
        return Reply(req, 0, _S64_0_1[inst.log.is_clean(wire.parse_region(req.data))])

    def _in_sync(self, inst: Instance, req: Request, new_state: State) -> Reply:
        return Reply(req, 0, _S64_0_1[inst.log.in_sync(wire.parse_region(req.data))])

    def _flush(self, inst: Instance, req: Request, new_state: State) -> Step:
        ops: list[tuple[int, int]] = []
        if req.data:
            regions = wire.parse_regions(req.data)
            inst.log.mark(regions)
            ops = [(OP_MARK, r) for r in regions]
        if inst.journal_gap or not self.journaled:
            # Some changes never reached the journal (or there is none): only the store can
            # hold them all.
            return self._commit(inst, req, "FLUSH")
        if takes_generation(inst.log.take_modified(), inst.resumed, inst.superseded):
            inst.generation = self._next_generation(inst.uuid)
        inst.committed_at = self.now
        # A FLUSH of an instance whose health is not A is answered after completed() put it
        # right, so that no STATUS_INFO after the reply still shows the old health.
        early = inst.health == "A"
        work = self._waiting(_Work("flush", inst, req, why="FLUSH"))
        return Step(Reply(req) if early else None, [AppendFlush(inst.record(), ops)], _DURABLE, work)

    def _mark(self, inst: Instance, req: Request, new_state: State) -> Step:
        regions = wire.parse_region_group(req.request_type, req.data)
        inst.log.mark(regions)
        return Step(_ok(req), [AppendOps(inst.uuid, inst.luid, [(OP_MARK, r) for r in regions])])

    def _clear(self, inst: Instance, req: Request, new_state: State) -> Step:
        regions = wire.parse_region_group(req.request_type, req.data)
        inst.log.clear(regions)
        return Step(_ok(req), [AppendOps(inst.uuid, inst.luid, [(OP_CLEAR, r) for r in regions])])

    def _get_resync_work(self, inst: Instance, req: Request, new_state: State) -> Reply:
        if req.data:
            raise ValueError("GET_RESYNC_WORK carries no payload")
        region = inst.log.get_resync_work() if gives_resync_work(inst.state) else None
        if region is None:
            return _ok(req, wire.build_resync_work(False, 0))
        log.info("%s resync region %d", describe(inst.uuid, inst.luid), region)
        return _ok(req, wire.build_resync_work(True, region))

    def _set_region_sync(self, inst: Instance, req: Request, new_state: State) -> Step:
        region, in_sync = wire.parse_set_region_sync(req.data)
        inst.log.set_region_sync(region, bool(in_sync))
        if not in_sync:
            log.warning("%s region %d is out of sync", describe(inst.uuid, inst.luid), region)
        elif inst.log.sync_count == inst.log.region_count:
            log.info("%s in sync: %d/%d", describe(inst.uuid, inst.luid), inst.log.sync_count,
                     inst.log.region_count)
        op = OP_SET_SYNC if in_sync else OP_SET_NOSYNC
        return Step(_ok(req), [AppendOps(inst.uuid, inst.luid, [(op, region)])])

    def _get_sync_count(self, inst: Instance, req: Request, new_state: State) -> Reply:
        return _ok(req, wire.build_u64(inst.log.sync_count))

    def _status_info(self, inst: Instance, req: Request, new_state: State) -> Reply:
        ctr = inst.ctr
        text = f"3 {ctr.log_type} {ctr.device_number()} {inst.health}" if ctr.is_disk else f"1 {ctr.log_type}"
        return _ok(req, text.encode() + b"\0")

    def _status_table(self, inst: Instance, req: Request, new_state: State) -> Reply:
        # The text the kernel itself prints after "userspace <argc> <uuid> " (ref §4.7).
        args = inst.ctr.text.split(" ", 1)[1]
        return _ok(req, f"{args} ".encode() + b"\0")

    def _is_remote_recovering(self, inst: Instance, req: Request, new_state: State) -> Reply:
        region = wire.parse_region(req.data)
        inst.log.check_region(region)
        return _ok(req, wire.build_remote_recovering(False, inst.log.first_unsynced()))

    #: Each request type's handler, by the request table's ``handler`` column.
    _HANDLERS: dict[RequestType, Callable[[Engine, Instance, Request, State], Reply | Step]] = {}


Engine._HANDLERS = {
    kind: getattr(Engine, f"_{facts.handler}")
    for kind, facts in REQUESTS.items() if kind is not RequestType.CTR
}
_HANDLERS = Engine._HANDLERS

__all__ = ["Engine", "Instance", "Step", "chunk_count"]
