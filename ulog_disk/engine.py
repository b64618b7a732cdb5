"""The engine: applies one kernel request to the log table and says what to answer.

Sans-I/O. ``handle(request)`` returns either a :class:`~ulog_disk.wire.Reply` (answer now) or a
:class:`Pending`: a reply that waits for the journal to be durable up to a position (FLUSH), or
for a store write (lifecycle requests) that the daemon runs on its store worker. Either way the
daemon then calls the Pending's ``complete`` back on the engine's thread. Engine state is only
touched on that one thread; jobs see nothing but copies.

Every change is written to the backend's journal as it is applied (``log_ops``, ``log_flush``,
``log_event``), in the order it was applied; the engine tracks, per instance, the journal
position of its first record that is not yet in its store, and hands out **checkpoints** (the
instance's changed chunks and meta, with the position they reach) for the daemon to run in the
background. The oldest such position is how far the journal may be cut.

Protocol rules owned here (protocol ref §1.7, §3, §5; issue #2, #3):

* The table is keyed by (uuid, luid). The per-instance and per-uuid rules (states, hand-over,
  retention, generations, adoption after another boot) are :mod:`ulog_disk.lifecycle`'s; this
  module applies them and tells the backend what to store.
* A loop-type request for an unknown (uuid, luid) gets -ESRCH, which makes the kernel send CTR
  (+NUL) and RESUME again for that log; other requests for unknown logs get -EINVAL.
* Replies carry exactly the value size the kernel reads, ``data_size = 0`` where it offers no
  buffer, and a negative errno in ``error``.
* FLUSH (with or without integrated marks) is the durable point: answered once the journal is
  durable up to its record. RESUME and POSTSUSPEND write the instance to its store before they
  are answered, as the kernel's disk log writes its header and bits there.
"""

from __future__ import annotations

import collections
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import wire
from .backends.base import (
    OP_CLEAR,
    OP_MARK,
    OP_SET_NOSYNC,
    OP_SET_SYNC,
    Backend,
    BackendError,
    Commit,
    Event,
    InstanceRecord,
    StoredInstance,
    StoredState,
)
from .bootid import read_boot_id
from .ctrargs import CtrArgs, CtrError, parse_ctr
from .lifecycle import (
    State,
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
from .limits import MemoryBudget
from .ratelog import RateLimitedLog
from .regionlog import RegionLog, chunk_count
from .wire import Reply, Request, RequestType

log = logging.getLogger("ulog_disk.engine")

Key = tuple[str, int]


def describe(uuid: str, luid: int) -> str:
    return f"uuid={uuid!r} luid={luid:#x}"


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

    def stored_state(self) -> StoredState:
        return StoredState(
            uuid=self.uuid, generation=self.generation, region_count=self.log.region_count,
            clean=self.log.clean.tobytes(), sync=self.log.sync.tobytes(), source_luid=self.luid,
            committed_at=time.time(),
        )


@dataclass
class Pending:
    """A reply that waits: for the journal to be durable up to ``durable_at`` (FLUSH), or for
    ``job`` (a store write) to run on the store worker."""

    uuid: str
    job: Callable[[], None] | None
    complete: Callable[[BaseException | None], Reply]
    #: The journal position that must be durable before the reply (then ``job`` is None).
    durable_at: int | None = None
    #: The reply a success gets, when ``complete(None)`` only keeps books: the thread that saw
    #: the success (store worker, group-commit thread) may send it at once, before the request
    #: loop hears of it. A failure is always answered through ``complete``, after it has put
    #: the engine's state right.
    reply_on_success: Reply | None = None

    def run(self, sync: Callable[[], object] | None = None) -> BaseException | None:
        """Do what the reply waits for — the job, or else ``sync`` (the journal's) — on whichever
        thread runs it; its exception, if any, goes to :attr:`complete` on the engine's thread."""
        try:
            if self.job is not None:
                self.job()
            else:
                assert sync is not None, "a reply waiting for nothing"
                sync()
        except BaseException as exc:  # noqa: BLE001 - complete() decides what it means
            return exc
        return None


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


#: The request a background store write answers (nobody: its reply is never sent).
_STOP = Request(luid=0, uuid="", version=3, seq=0, request_type=RequestType.FLUSH, data=b"")


def _ok(req: Request, data: bytes = b"") -> Reply:
    return Reply(req, 0, data)


def _err(req: Request, code: int) -> Reply:
    return Reply(req, -code)


class Engine:
    def __init__(self, backend: Backend, boot_id: str | None = None,
                 memory_budget: MemoryBudget | None = None):
        self.backend = backend
        #: Refuses a new log that would not fit under the daemon's memory limit (None: no check).
        self.memory_budget = memory_budget
        self.boot_id = boot_id or read_boot_id()
        self.table: dict[Key, Instance] = {}
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
        #: Lines about requests a sender controls (rejected, unknown): rate-limited by kind.
        self.noisy = RateLimitedLog(log)
        #: Per instance with changes not in its store: the journal position of the first of
        #: them, and when (monotonic) it was made; oldest first.
        self.unstored: dict[Key, tuple[int, float]] = {}
        #: Store writes under way (checkpoints, lifecycle writes): the position of the oldest
        #: change each carries, by a token.
        self.storing: dict[int, int] = {}
        self._tokens = 0

    # --- start-up ------------------------------------------------------------------------

    def restore(self) -> None:
        """Rebuild the table from the backend (daemon restart)."""
        restored = self.backend.restore(self.boot_id)
        for uuid, reason in restored.damaged.items():
            log.error("store of uuid=%r is damaged (%s): its logs start from a full resync", uuid, reason)
        for uuid, state in restored.retained.items():
            self.gone.setdefault(uuid, []).append(state)
            self.retained_generation[uuid] = state.generation
            self._see_generation(uuid, state.generation)
        for stored in restored.instances:
            self._restore_instance(stored)

    def _restore_instance(self, stored: StoredInstance) -> None:
        rec = stored.record
        self._see_generation(rec.uuid, rec.generation)
        if rec.boot_id != self.boot_id:
            # The kernel that owned this luid is gone (host reboot): its state is only a
            # candidate for hand-over, and its luid may be reused by an unrelated log.
            state = RegionLog.from_bitmaps(rec.region_count, stored.clean, stored.sync)
            state.replay(stored.journal)
            if stored.journal_damaged:
                state.distrust_all()
            gone = StoredState(
                uuid=rec.uuid, generation=rec.generation, region_count=rec.region_count,
                clean=state.clean.tobytes(), sync=state.sync.tobytes(), source_luid=rec.luid,
                committed_at=rec.committed_at,
            )
            self.gone.setdefault(rec.uuid, []).append(gone)
            self.earlier_boot.setdefault(rec.uuid, {})[rec.luid] = (gone, rec.resumed)
            log.info("found %s from an earlier boot (generation %d): kept for hand-over",
                     describe(rec.uuid, rec.luid), rec.generation)
            return
        try:
            ctr = parse_ctr(rec.ctr.encode("ascii"))
        except (CtrError, UnicodeEncodeError) as exc:
            log.error("stored %s has an unusable constructor %r (%s): not restored",
                      describe(rec.uuid, rec.luid), rec.ctr, exc)
            return
        region_log = RegionLog.from_bitmaps(rec.region_count, stored.clean, stored.sync, rec.cursor)
        replayed = region_log.replay(stored.journal)
        if stored.journal_damaged:
            # What was answered since the last commit is unknown and the kernel will not send it
            # again: nothing of this log can be trusted to be clean or in sync.
            log.error("%s: journal damaged (%s): every region is taken as dirty and out of sync "
                      "(full resync at the next resume)", describe(rec.uuid, rec.luid),
                      stored.journal_damaged)
            region_log.distrust_all()
        region_log.restart_recovery()
        region_log.cursor = rec.cursor
        inst = Instance(
            uuid=rec.uuid, luid=rec.luid, ctr=ctr, state=State(rec.state), log=region_log,
            boot_id=rec.boot_id, generation=rec.generation, resumed=rec.resumed,
            committed_at=rec.committed_at, resized=False, superseded=rec.superseded, heard=False,
        )
        self.table[inst.key] = inst
        if stored.replayed_from is not None:
            # What was replayed is in the journal only: the next checkpoints write it.
            self.unstored[inst.key] = (stored.replayed_from, time.monotonic())
        log.info("restored %s state=%s generation=%d: %d/%d in sync, %d dirty, %d journal ops replayed",
                 describe(rec.uuid, rec.luid), rec.state, rec.generation, region_log.sync_count,
                 region_log.region_count, len(region_log.dirty_regions()), replayed)

    def _see_generation(self, uuid: str, generation: int) -> None:
        if generation > self.generations.get(uuid, 0):
            self.generations[uuid] = generation

    # --- dispatch ------------------------------------------------------------------------

    def handle(self, req: Request) -> Reply | Pending:
        self.stats.requests += 1
        kind = req.kind
        if req.request_type == 0:
            # A zero type means the request was garbled on the way (cmirrord's reading): ask the
            # kernel to send it again.
            self.stats.errors_by_type[req.request_type] += 1
            self.noisy.log("type-0 request", logging.WARNING,
                           "request seq=%d has type 0: asking the kernel to resend", req.seq)
            return Reply(req, -errno.EAGAIN, ack=True)
        if kind is None:
            self.stats.errors_by_type[req.request_type] += 1
            self.noisy.log("unknown request type", logging.ERROR, "unknown request type %d (seq=%d, %s)",
                           req.request_type, req.seq,
                      describe(req.uuid, req.luid))
            return _err(req, errno.EINVAL)
        self.stats.by_type[kind] += 1
        if kind is RequestType.CTR:
            return self._ctr(req)
        inst = self.table.get(req.key)
        if inst is None:
            self.stats.errors_by_type[req.request_type] += 1
            if kind in wire.LOOP_REQUESTS:
                self.noisy.log("request for an unknown log", logging.WARNING,
                               "%s for unknown %s: answering -ESRCH so the kernel re-registers it",
                            kind.name, describe(req.uuid, req.luid))
                return _err(req, errno.ESRCH)
            self.noisy.log("request for an unknown log", logging.ERROR, "%s for unknown %s", kind.name,
                           describe(req.uuid, req.luid))
            return _err(req, errno.EINVAL)
        inst.heard = True
        try:
            return self._HANDLERS[kind](self, inst, req)
        except (ValueError, IndexError) as exc:
            self.stats.errors_by_type[req.request_type] += 1
            self.noisy.log("rejected request", logging.ERROR, "%s %s seq=%d rejected: %s", kind.name,
                           describe(inst.uuid, inst.luid), req.seq, exc)
            return _err(req, errno.EINVAL)

    def handle_now(self, req: Request) -> Reply:
        """Handle and run any backend work inline (tests, tools)."""
        result = self.handle(req)
        if isinstance(result, Reply):
            return result
        return result.complete(result.run(self.backend.sync))

    # --- lifecycle requests --------------------------------------------------------------

    def _ctr(self, req: Request) -> Reply | Pending:
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
        if existing is not None and (existing.ctr.text == ctr.text or existing.resumed):
            if existing.ctr.text != ctr.text:
                log.warning("CTR %s repeats a resumed log with another constructor %r (kept %r)",
                            describe(req.uuid, req.luid), ctr.text, existing.ctr.text)
            log.info("CTR %s: already known (%s), accepted%s", describe(req.uuid, req.luid),
                     existing.state, " (kernel reconnect)" if reconnect else "")
            return _ok(req, reply_data)
        if self.memory_budget is not None and (refusal := self.memory_budget.refusal(ctr.region_count)):
            self.stats.errors_by_type[req.request_type] += 1
            self.noisy.log("memory limit", logging.ERROR, "CTR %s refused: %s: answering -ENOMEM",
                           describe(req.uuid, req.luid), refusal)
            return _err(req, errno.ENOMEM)
        if existing is not None:
            # A never-resumed instance whose luid the kernel reuses with another constructor: its
            # kernel context died after CTR without a DTR (protocol ref §3.2).
            log.warning("CTR %s replaces a never-resumed instance with constructor %r",
                        describe(req.uuid, req.luid), existing.ctr.text)
        inst = Instance(
            uuid=req.uuid, luid=req.luid, ctr=ctr, state=State.CONSTRUCTED,
            log=RegionLog.fresh(ctr.region_count, ctr.sync_mode == "nosync"), boot_id=self.boot_id,
            reconnecting=reconnect,
        )
        self.table[inst.key] = inst
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
        self._log_event(inst, rec, Event.CTR)
        self.unstored.pop(inst.key, None)  # the record below is the instance's whole state
        position = self.backend.position()

        def complete(exc: BaseException | None) -> Reply:
            if exc is not None:
                inst.health = "D"
                log.error("CTR %s: could not record the instance (%s); serving it from memory",
                          describe(inst.uuid, inst.luid), exc)
                self._unstored_since(inst.key, position)
            return _ok(req, reply_data)

        return Pending(inst.uuid, lambda: self.backend.record(rec, position, keep), complete)

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

    def _dtr(self, inst: Instance, req: Request) -> Reply | Pending:
        self.table.pop(inst.key, None)
        inst.state = next_state(inst.state, RequestType.DTR)
        others = [o for o in self.table.values() if o.uuid == inst.uuid]
        newest_elsewhere = max(
            [o.generation for o in others] + [s.generation for s in self.gone.get(inst.uuid, [])],
            default=0,
        )
        retain = None
        if retains_at_dtr(inst.resumed, inst.superseded, inst.generation, newest_elsewhere):
            inst.generation = self._next_generation(inst.uuid)
            retain = inst.stored_state()
            self.gone[inst.uuid] = [retain]
            self.retained_generation[inst.uuid] = retain.generation
        log.info("DTR %s (%d instance(s) of the uuid left)%s", describe(inst.uuid, inst.luid), len(others),
                 f": its state is kept as the uuid's retained state, generation {retain.generation}"
                 if retain else "")

        self._log_event(inst, inst.record(), Event.DTR)
        position = self.backend.position()
        token = self._storing(inst.key)

        def complete(exc: BaseException | None) -> Reply:
            self.storing.pop(token, None)
            if exc is not None:
                log.error("DTR %s: store cleanup failed (%s); left for ulog-recover",
                          describe(inst.uuid, inst.luid), exc)
            return _ok(req)

        last = not others

        def job() -> None:
            self.backend.drop(inst.uuid, inst.luid, retain, position)
            if last:
                self.backend.release(inst.uuid)

        return Pending(inst.uuid, job, complete)

    def _presuspend(self, inst: Instance, req: Request) -> Reply:
        self._transition(inst, RequestType.PRESUSPEND)
        return _ok(req)

    def _postsuspend(self, inst: Instance, req: Request) -> Reply | Pending:
        self._transition(inst, RequestType.POSTSUSPEND)
        inst.log.recovering = None
        return self._commit(inst, req, "POSTSUSPEND", event=Event.POSTSUSPEND)

    def _resume(self, inst: Instance, req: Request) -> Reply | Pending:
        self._transition(inst, RequestType.RESUME)
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
        # A state adopted, or thrown away by 'sync', is the uuid's newest from now on.
        pending = self._commit(inst, req, "RESUME", force_generation=source is not None or forced,
                               event=Event.RESUME)
        if source is not None:
            self._drop_adopted_earlier_boot(inst, source, pending)
        return pending

    def _drop_adopted_earlier_boot(self, inst: Instance, source: StoredState, pending: Pending) -> None:
        """An instance of an earlier boot whose state was just adopted has nothing left to give:
        remove it once the adopter's state is committed, or every reboot would leave one more
        (the retained state and live instances are never removed here)."""
        stale = self.earlier_boot.get(inst.uuid, {})
        luid = source.source_luid
        if not drops_adopted(luid in stale, luid == inst.luid, (inst.uuid, luid) in self.table):
            return
        del stale[luid]
        self.gone[inst.uuid] = [s for s in self.gone.get(inst.uuid, []) if s is not source]
        commit_job = pending.job
        assert commit_job is not None
        position = self.backend.position()

        def job() -> None:
            commit_job()
            try:
                self.backend.drop(inst.uuid, luid, None, position)
            except BackendError as exc:  # the RESUME itself succeeded; the leftover is harmless
                log.warning("RESUME %s: luid=%#x of an earlier boot not removed (%s); left for "
                            "ulog-recover purge", describe(inst.uuid, inst.luid), luid, exc)
                return
            log.info("RESUME %s: removed luid=%#x of an earlier boot, whose state it adopted",
                     describe(inst.uuid, inst.luid), luid)

        pending.job = job

    def _handover_source(self, inst: Instance, reconnect: bool) -> StoredState | None:
        """The state the resuming instance adopts, by the hand-over rule (:mod:`.lifecycle`);
        an adopted instance is flagged superseded."""
        others = [o for o in self.table.values() if o.uuid == inst.uuid]
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
            return best.stored_state()
        return best

    def _adopt(self, inst: Instance, source: StoredState) -> RegionLog:
        donor = RegionLog.from_bitmaps(source.region_count, source.clean, source.sync)
        inst.generation = source.generation
        return donor.adopted(inst.log.region_count, inst.ctr.sync_mode == "nosync")

    def _transition(self, inst: Instance, kind: RequestType) -> None:
        new = next_state(inst.state, kind)
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

    def _commit(self, inst: Instance, req: Request, why: str, force_generation: bool = False,
                event: Event | None = None, answered: bool = True) -> Pending:
        """Write the instance to its store before answering (lifecycle points, stop, and a FLUSH
        of an instance whose journal records are incomplete). ``answered``: False for the
        commits at stop, which answer no request (a failure is no request's error)."""
        modified = inst.log.take_modified()
        if takes_generation(modified or force_generation, inst.resumed, inst.superseded):
            inst.generation = self._next_generation(inst.uuid)
        inst.committed_at = time.time()
        if event is not None:
            self._log_event(inst, inst.record(), event)
        pending = self._store(inst, why)
        store_complete = pending.complete
        ok = _ok(req)

        def complete(exc: BaseException | None) -> Reply:
            store_complete(exc)
            if exc is None:
                self.stats.commits += 1
                if inst.health != "A":
                    # The commit wrote everything the failed commits or journal writes could not.
                    log.info("%s %s: commit succeeded again, health %s back to A", why,
                             describe(inst.uuid, inst.luid), inst.health)
                    inst.health = "A"
                return ok
            self.stats.commit_failures += 1
            if answered:
                self.stats.errors_by_type[req.request_type] += 1
            inst.log.modified = inst.log.modified or modified
            inst.health = "F"
            log.error("%s %s: commit failed (%s): answering -EIO", why, describe(inst.uuid, inst.luid), exc)
            return _err(req, errno.EIO)

        pending.complete = complete
        # As for a FLUSH: a commit of an instance whose health is not A is answered only after
        # complete() put it right, or a STATUS_INFO right after the reply could still show F.
        pending.reply_on_success = ok if inst.health == "A" else None
        return pending

    def _store(self, inst: Instance, why: str) -> Pending:
        """A checkpoint of the instance: its chunks changed since the last one and its meta, with
        the journal position they reach. ``complete`` keeps the books (and puts the chunks back
        for the next checkpoint if the write failed)."""
        clean, sync = inst.log.take_chunks()
        position = self.backend.position()
        commit = Commit(inst.record(), clean, sync, resized=inst.resized, position=position)
        inst.resized = False
        gap = inst.journal_gap
        inst.journal_gap = False
        token = self._storing(inst.key)

        def job() -> None:
            self.backend.commit(commit)

        def complete(exc: BaseException | None) -> Reply:
            first = self.storing.pop(token, None)
            if exc is None:
                self.stats.checkpoints += 1
                return _ok(_STOP)
            self.stats.checkpoint_failures += 1
            inst.log.restore_changes(clean, sync, False)
            inst.resized = inst.resized or commit.resized
            inst.journal_gap = inst.journal_gap or gap
            if first is not None and inst.key in self.table:
                self._unstored_since(inst.key, first)
            log.warning("%s %s: store write failed (%s); the journal keeps its changes, retried later",
                        why, describe(inst.uuid, inst.luid), exc)
            return _err(_STOP, errno.EIO)

        return Pending(inst.uuid, job, complete)

    def _storing(self, key: Key) -> int:
        """Move the instance's unstored changes to a store write under way; its token."""
        self._tokens += 1
        first = self.unstored.pop(key, None)
        if first is not None:
            self.storing[self._tokens] = first[0]
        return self._tokens

    def _unstored_since(self, key: Key, position: int) -> None:
        found = self.unstored.get(key)
        if found is None or position < found[0]:
            self.unstored[key] = (position, found[1] if found else time.monotonic())

    def checkpoint(self, key: Key) -> Pending | None:
        """Background work: write one instance's changes to its store (None if it is gone)."""
        inst = self.table.get(key)
        if inst is None:
            self.unstored.pop(key, None)
            return None
        return self._store(inst, "checkpoint")

    def checkpoint_due(self, now: float, age: float, span: int, idle: bool) -> Key | None:
        """The instance to checkpoint next, if any is due: its changes are older than ``age``
        seconds, or the journal since them is longer than ``span`` bytes, or the daemon is idle."""
        if not self.unstored:
            return None
        key, (first, since) = next(iter(self.unstored.items()))
        if idle or now - since >= age or self.backend.position() - first >= span:
            return key
        return None

    def needed(self) -> int:
        """Every journal record below this position is in the stores."""
        oldest = self.backend.position()
        for first, _ in self.unstored.values():
            oldest = min(oldest, first)
        for first in self.storing.values():
            oldest = min(oldest, first)
        return oldest

    def commit_all(self) -> list[Pending]:
        """Work that writes every instance to its store (clean stop): the journal is then not
        needed by anything."""
        pending = []
        for inst in list(self.table.values()):
            stop = Request(luid=inst.luid, uuid=inst.uuid, version=3, seq=0,
                           request_type=RequestType.FLUSH, data=b"")
            pending.append(self._commit(inst, stop, "stop", answered=False))
        return pending

    # --- the journal -------------------------------------------------------------------------

    def _journaled(self, inst: Instance, append: Callable[[], int], what: str) -> bool:
        """Run one journal append for the instance; False (health D, journal gap) if it failed."""
        before = self.backend.position()
        # Appended or not, the instance has changes its store does not hold from here on.
        self._unstored_since(inst.key, before)
        try:
            append()
        except BackendError as exc:
            inst.health = "D"
            inst.journal_gap = True
            log.error("%s %s: journal write failed (%s)", what, describe(inst.uuid, inst.luid), exc)
            return False
        return True

    def _log_event(self, inst: Instance, rec: InstanceRecord, event: Event) -> None:
        self._journaled(inst, lambda: self.backend.log_event(rec, event), event.name)

    # --- region requests -------------------------------------------------------------------

    def _journal(self, inst: Instance, req: Request, ops: list[tuple[int, int]]) -> Reply:
        kind = RequestType(req.request_type).name
        self._journaled(inst, lambda: self.backend.log_ops(inst.uuid, inst.luid, ops), kind)
        return _ok(req)

    def _get_region_size(self, inst: Instance, req: Request) -> Reply:
        return _ok(req, wire.build_u64(inst.ctr.region_size))

    def _is_clean(self, inst: Instance, req: Request) -> Reply:
        return _ok(req, wire.build_s64(int(inst.log.is_clean(wire.parse_region(req.data)))))

    def _in_sync(self, inst: Instance, req: Request) -> Reply:
        return _ok(req, wire.build_s64(int(inst.log.in_sync(wire.parse_region(req.data)))))

    def _flush(self, inst: Instance, req: Request) -> Pending:
        ops: list[tuple[int, int]] = []
        if req.data:
            regions = wire.parse_regions(req.data)
            inst.log.mark(regions)
            ops = [(OP_MARK, r) for r in regions]
        if inst.journal_gap or not self.backend.journaled:
            # Some changes never reached the journal (or there is none): only the store can
            # hold them all.
            return self._commit(inst, req, "FLUSH")
        if takes_generation(inst.log.take_modified(), inst.resumed, inst.superseded):
            inst.generation = self._next_generation(inst.uuid)
        inst.committed_at = time.time()
        rec = inst.record()
        if not self._journaled(inst, lambda: self.backend.log_flush(rec, ops), "FLUSH"):
            return self._commit(inst, req, "FLUSH")

        ok = _ok(req)

        def complete(exc: BaseException | None) -> Reply:
            if exc is None:
                self.stats.commits += 1
                if inst.health != "A":
                    log.info("FLUSH %s: durable again, health %s back to A", describe(inst.uuid, inst.luid),
                             inst.health)
                    inst.health = "A"
                return ok
            self.stats.commit_failures += 1
            self.stats.errors_by_type[req.request_type] += 1
            inst.health = "F"
            log.error("FLUSH %s: journal sync failed (%s): answering -EIO",
                      describe(inst.uuid, inst.luid), exc)
            return _err(req, errno.EIO)

        # A FLUSH of an instance whose health is not A is answered after complete() put it
        # right, so that no STATUS_INFO after the reply still shows the old health.
        return Pending(inst.uuid, None, complete, durable_at=self.backend.position(),
                       reply_on_success=ok if inst.health == "A" else None)

    def _mark(self, inst: Instance, req: Request) -> Reply | Pending:
        regions = wire.parse_region_group(req.request_type, req.data)
        inst.log.mark(regions)
        return self._journal(inst, req, [(OP_MARK, r) for r in regions])

    def _clear(self, inst: Instance, req: Request) -> Reply | Pending:
        regions = wire.parse_region_group(req.request_type, req.data)
        inst.log.clear(regions)
        return self._journal(inst, req, [(OP_CLEAR, r) for r in regions])

    def _get_resync_work(self, inst: Instance, req: Request) -> Reply:
        if req.data:
            raise ValueError("GET_RESYNC_WORK carries no payload")
        region = inst.log.get_resync_work() if gives_resync_work(inst.state) else None
        if region is None:
            return _ok(req, wire.build_resync_work(False, 0))
        log.info("%s resync region %d", describe(inst.uuid, inst.luid), region)
        return _ok(req, wire.build_resync_work(True, region))

    def _set_region_sync(self, inst: Instance, req: Request) -> Reply | Pending:
        region, in_sync = wire.parse_set_region_sync(req.data)
        inst.log.set_region_sync(region, bool(in_sync))
        if not in_sync:
            log.warning("%s region %d is out of sync", describe(inst.uuid, inst.luid), region)
        elif inst.log.sync_count == inst.log.region_count:
            log.info("%s in sync: %d/%d", describe(inst.uuid, inst.luid), inst.log.sync_count,
                     inst.log.region_count)
        return self._journal(inst, req, [(OP_SET_SYNC if in_sync else OP_SET_NOSYNC, region)])

    def _get_sync_count(self, inst: Instance, req: Request) -> Reply:
        return _ok(req, wire.build_u64(inst.log.sync_count))

    def _status_info(self, inst: Instance, req: Request) -> Reply:
        ctr = inst.ctr
        text = f"3 {ctr.log_type} {ctr.device_number()} {inst.health}" if ctr.is_disk else f"1 {ctr.log_type}"
        return _ok(req, text.encode() + b"\0")

    def _status_table(self, inst: Instance, req: Request) -> Reply:
        # The text the kernel itself prints after "userspace <argc> <uuid> " (ref §4.7).
        args = inst.ctr.text.split(" ", 1)[1]
        return _ok(req, f"{args} ".encode() + b"\0")

    def _is_remote_recovering(self, inst: Instance, req: Request) -> Reply:
        region = wire.parse_region(req.data)
        inst.log.check_region(region)
        return _ok(req, wire.build_remote_recovering(False, inst.log.first_unsynced()))

    #: Requests whose handling writes nothing (no journal record, no store write): the daemon
    #: answers them while the state disk is stalled (everything else waits for it).
    WRITES_NOTHING = frozenset({
        RequestType.GET_REGION_SIZE, RequestType.IS_CLEAN, RequestType.IN_SYNC, RequestType.GET_RESYNC_WORK,
        RequestType.GET_SYNC_COUNT, RequestType.STATUS_INFO, RequestType.STATUS_TABLE,
        RequestType.IS_REMOTE_RECOVERING, RequestType.PRESUSPEND,
    })

    _HANDLERS: dict[RequestType, Callable[[Engine, Instance, Request], Reply | Pending]] = {
        RequestType.DTR: _dtr,
        RequestType.PRESUSPEND: _presuspend,
        RequestType.POSTSUSPEND: _postsuspend,
        RequestType.RESUME: _resume,
        RequestType.GET_REGION_SIZE: _get_region_size,
        RequestType.IS_CLEAN: _is_clean,
        RequestType.IN_SYNC: _in_sync,
        RequestType.FLUSH: _flush,
        RequestType.MARK_REGION: _mark,
        RequestType.CLEAR_REGION: _clear,
        RequestType.GET_RESYNC_WORK: _get_resync_work,
        RequestType.SET_REGION_SYNC: _set_region_sync,
        RequestType.GET_SYNC_COUNT: _get_sync_count,
        RequestType.STATUS_INFO: _status_info,
        RequestType.STATUS_TABLE: _status_table,
        RequestType.IS_REMOTE_RECOVERING: _is_remote_recovering,
    }


__all__ = ["Engine", "Instance", "Pending", "chunk_count"]
