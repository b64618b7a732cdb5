"""dm-ulogd: the daemon. Two threads take turns at the request loop, which owns the engine and the
sockets; a store worker works beside them.

The request loop reads every queued frame and lets the engine answer it. Three kinds of answer:

* at once (most requests; MARK, CLEAR and SET_REGION_SYNC after their journal record is
  written, which never waits for the disk);
* a FLUSH, once the journal is durable up to its record (**group commit**). The thread whose
  turn at the loop ends with FLUSHes waiting syncs once for all of them, outside the loop, and
  sends their replies; every FLUSH that arrives meanwhile rides on the next sync. What comes
  during a sync wakes the other thread, which serves it (:meth:`Daemon.turns`). So no thread is
  woken to start a sync, and the loop never waits for the disk: while a sync takes longer than
  :data:`STALL_AFTER` (a slow or stalled state disk), or the journal's next segment is not made
  yet (appends outran the store worker), requests that would write the journal wait in a queue
  and everything else (IN_SYNC, STATUS, GET_SYNC_COUNT…: the mirrors' reads, ``dmsetup
  status``) is still answered;
* a lifecycle request (CTR, RESUME, POSTSUSPEND, DTR), once its store write has run on the
  **store worker**, the one thread that touches the LMDB stores, in order.

The store worker also runs the background work, one job at a time and only when it is idle, so
a lifecycle write waits for at most one: checkpoints (an instance's changes written to its store
when they are older than :data:`CHECKPOINT_AGE`, the journal since them is longer than
:data:`CHECKPOINT_SPAN`, or the daemon is idle), and journal maintenance (cutting segments whose
records are all in the stores, preparing the next segment).

Four threads, whatever the number of mirrors: the two that take turns at the loop (the
group-commit thread and "requests"), the store worker, and the main thread, which only waits for
the stop. Two serving threads, because with one loop thread and a sync thread every FLUSH paid
for waking the sync thread: 40-60 µs of a FLUSH's round trip on a virtual machine whose idle
CPUs halt (docs/benchmarks.md, metric 1). The main thread apart, because Python runs a signal's
handler on the main thread only: serving, it would sometimes be the one syncing, and a stalled
disk would then hold SIGTERM unheard while the other thread went on reading requests.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import queue
import select
import selectors
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..log.ratelog import RateLimitedLog
from ..protocol import wire
from ..protocol.capture import FROM_DAEMON, TO_DAEMON, CaptureWriter
from ..protocol.requests import WRITES_NOTHING_NUMBERS
from ..protocol.wire import Reply
from ..storage.base import Backend
from ..transport import Transport
from .applier import Applier, Waiting, answered_early
from .metrics import Metrics, Snapshot

log = logging.getLogger("ulog_disk.daemon")

#: A journal sync running longer than this (seconds) means the state disk is slow or stalled:
#: requests that would write the journal wait until it completes (a write to a file of a stalled
#: filesystem can block too), the others are answered meanwhile.
STALL_AFTER = 1.0
#: An instance's changes are written to its store at the latest this long after the first of
#: them (seconds), ...
CHECKPOINT_AGE = 10.0
#: ... or once the journal since them is this long (bytes), ...
CHECKPOINT_SPAN = 2 * 1024 * 1024
#: ... or when the daemon has had nothing to do for this long (seconds).
IDLE_AFTER = 0.5
#: Journal maintenance (cutting what the stores hold) runs at least this often while busy.
MAINTENANCE_INTERVAL = 1.0

_FLUSH = int(wire.RequestType.FLUSH)


@dataclass(slots=True)
class Job:
    """Work for the store worker: ``run`` there, then ``finish`` with its exception on the loop
    (False: the work failed). On success the worker sends ``reply`` to ``address`` first, if
    there is one (:func:`~ulog_disk.daemon.applier.answered_early`)."""

    run: Callable[[], object]
    finish: Callable[[BaseException | None], bool]
    reply: Reply | None = None
    address: object = None


#: (a job, its exception)
Done = tuple[Job, BaseException | None]


def _nothing() -> None:
    """The run of a job whose work is a journal sync (the group-commit thread's)."""


class StoreWorker:
    """The one thread that runs store writes, in the order they were submitted.

    Results come back through a deque and the loop's wake-up pipe; everything else here is
    touched only by the request loop (whichever serving thread has its turn).
    """

    def __init__(self, send: Callable[[Reply, object], None], wake: Callable[[], None]) -> None:
        self.send = send
        self.wake = wake
        self.jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.inflight = 0
        self.done: collections.deque[Done] = collections.deque()
        self.thread = threading.Thread(target=self._run, daemon=True, name="store")
        self.thread.start()

    def busy(self) -> bool:
        return self.inflight > 0

    def submit(self, job: Job) -> None:
        self.inflight += 1
        self.jobs.put(job)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            exc: BaseException | None = None
            try:
                job.run()
            except BaseException as e:  # noqa: BLE001 - finish() decides what it means
                exc = e
            if answered_early(job.reply, exc):
                self.send(job.reply, job.address)
            self.done.append((job, exc))
            self.wake()

    def drain(self) -> list[Done]:
        items = _drain(self.done)
        self.inflight -= len(items)
        return items

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()


def _drain(done: collections.deque[Done]) -> list[Done]:
    items = []
    while done:
        items.append(done.popleft())
    return items


@dataclass(slots=True)
class _Flush:
    position: int
    job: Job


class GroupCommit:
    """The journal's syncs, one at a time: every FLUSH waiting when a sync starts rides on it,
    and every FLUSH that arrives while it runs rides on the next one.

    While the daemon serves, this class's thread is one of the two that take turns at the
    request loop (``serve_requests``), and the one whose turn ends with FLUSHes waiting syncs
    them itself (``claim``, ``rounds``) while the other serves requests: no thread is woken to
    start a sync (that wake-up was most of the price of a FLUSH's hand-off, docs/journal.md).
    ``start`` wakes this class's thread to sync, for the stop (``Daemon.wait_idle``) and where
    the daemon has no epoll.
    """

    def __init__(self, backend: Backend, send: Callable[[Reply, object], None],
                 wake: Callable[[], None]) -> None:
        self.backend = backend
        self.send = send
        self.wake = wake
        self.lock = threading.Lock()
        #: Released to start the thread's next round (a plain lock: cheaper than a Condition).
        self.signal = threading.Lock()
        self.signal.acquire()
        self.waiting: list[_Flush] = []
        self.running = False
        self.stopping = False
        #: When the sync under way started (monotonic); None when none runs.
        self.sync_started: float | None = None
        self.syncs = 0
        self.sync_failures = 0
        self.flushes = 0
        self.done: collections.deque[Done] = collections.deque()
        #: The request loop's turns, which this thread runs while ``Daemon.run`` serves
        #: (``serve_requests``); they return when the daemon stops.
        self.loop_turns: Callable[[], None] | None = None
        #: (standby set, loop's epoll fd) while a sync claimed by a serving thread runs.
        self.armed: tuple[select.epoll, int] | None = None
        #: The other serving thread took the loop over during the armed sync (``take_over``).
        self.taken = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="group-commit")
        self.thread.start()

    def add(self, position: int, job: Job) -> None:
        """A job (its ``run`` is not called: the sync is the work) done once the journal is
        durable up to ``position``."""
        with self.lock:
            self.waiting.append(_Flush(position, job))

    def idle(self) -> bool:
        with self.lock:
            return not self.running and not self.waiting

    def stalled_for(self, now: float) -> float:
        """How long the sync under way has been running (0 if none is)."""
        started = self.sync_started
        return 0.0 if started is None else max(0.0, now - started)

    def start(self) -> None:
        """Start a sync for the FLUSHes waiting, if none is running."""
        with self.lock:
            if self.running or not self.waiting:
                return
            self.running = True
        self.signal.release()

    def claim(self, standby: select.epoll, loop_fd: int) -> bool:
        """True if FLUSHes wait and no sync runs: the caller, a thread serving requests, is to
        run the sync (``rounds``). The loop's epoll set ``loop_fd`` is then watched from
        ``standby`` until the sync ends, so that the other serving thread is woken by the
        requests that come meanwhile."""
        with self.lock:
            if self.running or not self.waiting:
                return False
            self.running = True
            standby.register(loop_fd, select.EPOLLIN)
            self.armed = (standby, loop_fd)
            self.taken = False
            return True

    def take_over(self) -> bool:
        """For the serving thread woken on the standby set: True if the sync that armed it still
        runs, and the loop is then this thread's from now on (``rounds`` tells the syncer); False
        if the sync ended first: its thread serves on, and handles what woke this one."""
        with self.lock:
            if self.armed is None:
                return False
            self.taken = True
            return True

    def serve_requests(self, turns: Callable[[], None]) -> None:
        """Have this thread run the request loop's ``turns`` too, until they return."""
        with self.lock:
            self.loop_turns = turns
        self.signal.release()

    def rounds(self) -> bool:
        """Sync until no FLUSH waits (or this class is closing). True if the other serving
        thread took the loop over meanwhile (``take_over``): the caller stands by from now on.
        Decided under the lock that ``take_over`` takes, so that exactly one thread serves."""
        while True:
            self._round()
            with self.lock:
                if not self.waiting or self.stopping:
                    self.running = False
                    taken, self.taken = self.taken, False
                    return taken

    def _disarm(self) -> None:
        """The loop's epoll set leaves the standby set (under ``lock``): a sync claimed by a
        serving thread is over, and whoever serves now (``take_over`` decided it) reads what
        comes. Before the replies are sent, not after: a reply's client answers at once, and a
        request that came before this would wake the standby thread for nothing (a cross-CPU
        wake-up and both threads contending for the GIL, on that request's path)."""
        if self.armed is not None:
            standby, loop_fd = self.armed
            standby.unregister(loop_fd)
            self.armed = None

    def _run(self) -> None:
        while True:
            self.signal.acquire()
            if self.stopping:
                return
            with self.lock:
                turns, self.loop_turns = self.loop_turns, None
            if turns is not None:
                turns()
                # close() may have come while this thread synced inside the turns (it saw the
                # sync running, so it will not signal again).
                if self.stopping:
                    return
                continue
            self.rounds()
            if self.stopping:  # close() saw it running and will not signal again
                return

    def _round(self) -> None:
        exc: BaseException | None = None
        self.sync_started = started = time.monotonic()
        try:
            durable = self.backend.sync()
        except BaseException as e:  # noqa: BLE001 - every FLUSH waiting gets -EIO via complete()
            exc, durable = e, -1
        self.sync_started = None
        slow = time.monotonic() - started >= STALL_AFTER
        with self.lock:
            self.syncs += 1
            self.sync_failures += exc is not None
            if exc is None:
                ready = [w for w in self.waiting if w.position <= durable]
                self.waiting = [w for w in self.waiting if w.position > durable]
            else:
                ready, self.waiting = self.waiting, []
            self.flushes += len(ready)
            # Whoever serves from now on is decided: the standby set stops watching the loop
            # before the replies go out. A further round (FLUSHes read meanwhile by the thread
            # that took the loop over) needs no watch: that thread serves.
            self._disarm()
        needs_loop = slow
        for w in ready:
            if answered_early(w.job.reply, exc):
                self.send(w.job.reply, w.job.address)
            else:
                needs_loop = True
            self.done.append((w.job, exc))
        # Answered successes only keep the engine's books: the loop drains them at its next turn.
        # It must come now to answer the others, and after a slow sync to serve the requests it
        # held back meanwhile.
        if needs_loop:
            self.wake()

    def drain(self) -> list[Done]:
        return _drain(self.done)

    def close(self) -> None:
        with self.lock:
            self.stopping = True
            if not self.running:
                self.running = True
                self.signal.release()
        self.thread.join()


_EPOLL_NOT_IN = ~select.EPOLLIN
_EPOLL_NOT_OUT = ~select.EPOLLOUT


class _EpollSelector(selectors.EpollSelector):
    """``selectors.EpollSelector`` whose ``select`` does the same in fewer steps: the loop calls
    it once per turn, on every request's path, and the library's version (timeout rounding that
    ``epoll.poll`` does itself, a method call per ready descriptor) was a tenth of the loop
    thread's time per IN_SYNC (py-spy, docs/benchmarks.md metric 3)."""

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        fd_to_key = self._fd_to_key  # type: ignore[attr-defined]
        try:
            # epoll.poll rounds a timeout up to the next millisecond itself.
            ready = self._selector.poll(  # type: ignore[attr-defined]
                -1 if timeout is None else timeout if timeout > 0 else 0, len(fd_to_key) or 1)
        except InterruptedError:
            return []
        out = []
        for fd, event in ready:
            key = fd_to_key.get(fd)
            if key is not None:
                out.append((key, key.events & ((selectors.EVENT_WRITE if event & _EPOLL_NOT_IN else 0)
                                               | (selectors.EVENT_READ if event & _EPOLL_NOT_OUT else 0))))
        return out


def _selector() -> selectors.BaseSelector:
    if selectors.DefaultSelector is selectors.EpollSelector:
        return _EpollSelector()
    return selectors.DefaultSelector()


def _maintenance(backend: Backend, needed: int) -> Job:
    def finish(exc: BaseException | None) -> bool:
        if exc is not None:
            log.warning("journal maintenance failed (%s); retried later", exc)
        return exc is None

    return Job(lambda: backend.maintain(needed), finish)


class Daemon:
    def __init__(self, applier: Applier, transport: Transport,
                 capture: CaptureWriter | None = None, checkpoint_age: float = CHECKPOINT_AGE,
                 checkpoint_span: int = CHECKPOINT_SPAN, metrics: Metrics | None = None):
        self.applier = applier
        self.backend = applier.backend
        self.metrics = metrics
        self.flush_latency = metrics.flush if metrics is not None else None
        self.checkpoint_age = checkpoint_age
        self.checkpoint_span = checkpoint_span
        self.transport = transport
        self.capture = capture
        # Replies go out from the loop, the store worker and the group-commit thread.
        self.send_lock = threading.Lock()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.worker = StoreWorker(self.send, self.wake)
        self.group = GroupCommit(applier.backend, self.send, self.wake)
        self.selector = _selector()
        self.stopping = False
        self.dropped_frames = 0
        #: Requests that write the journal, held back while they would wait for the disk (a stalled
        #: sync, or no next segment made yet), in arrival order.
        self.held: list[tuple[wire.Request, object]] = []
        self.held_total = 0
        #: Lines about frames a sender controls: rate-limited by kind (the counts stay exact).
        self.noisy = RateLimitedLog(log)
        #: The journal position up to which maintenance last cut, and when (monotonic).
        self.cut_at = -1
        self.maintained_at = 0.0
        self.last_frame = time.monotonic()
        self.sig_r, self.sig_w = os.pipe()
        os.set_blocking(self.sig_r, False)
        os.set_blocking(self.sig_w, False)
        self.wake_key = self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.selector.register(self.sig_r, selectors.EVENT_READ, "signal")
        #: Held by the thread doing the request loop's work (the engine, the applier's books, the
        #: sockets' frames, the held requests): while one serving thread syncs, the other may
        #: serve; neither holds it while it syncs.
        self.loop_lock = threading.Lock()
        #: Where the serving thread that is not serving waits (made by ``run``): the loop's epoll
        #: set is in it only while a sync claimed by a serving thread runs
        #: (``GroupCommit.claim``), so the kernel wakes that thread for what comes then, and at
        #: the stop (the signal pipe), for nothing else. None without epoll: one thread serves and
        #: the group-commit thread is woken for every sync.
        self.standby: select.epoll | None = None
        #: Which of the two serving threads (1, 2) waits in ``select``; the other waits on
        #: ``standby`` (``turns``).
        self.serving = 1
        #: What stopped a serving thread's turns, for ``run`` to raise.
        self.loop_error: BaseException | None = None

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe wakes the loop all the same
            os.write(self.wake_w, b"x")

    # --- frames --------------------------------------------------------------------------

    def on_frame(self, frame: bytes, address: object) -> None:
        if self.capture:
            with self.send_lock:
                self.capture.write(TO_DAEMON, frame)
        try:
            request = wire.decode_frame(frame)
        except wire.FrameError as exc:
            if exc.request is None:
                self.dropped_frames += 1
                self.noisy.log("unanswerable frame", logging.WARNING,
                               "dropped an unanswerable frame (%d bytes): %s", len(frame), exc.reason)
                return
            self.noisy.log("malformed request", logging.ERROR,
                           "malformed request seq=%d: %s: answering -EINVAL", exc.request.seq, exc.reason)
            # Counted as a garbled request (type 0): its type field is not to be trusted.
            self.applier.stats.requests += 1
            self.applier.stats.errors_by_type[0] += 1
            self.send(Reply(exc.request, -errno.EINVAL), address)
            return
        if self.flush_latency is not None and request.request_type == _FLUSH:
            self.flush_latency.received(request)
        if request.request_type not in WRITES_NOTHING_NUMBERS and (self.held or self.disk_stalled()):
            self.hold(request, address)
            return
        self.serve(request, address)

    def serve(self, request: wire.Request, address: object) -> None:
        try:
            result = self.applier.handle(request)
        except Exception:  # noqa: BLE001 - one bad request must not stop the others
            log.exception("internal error (a bug of dm-ulogd) on request seq=%d type=%d %s: "
                          "answering -EIO", request.seq, request.request_type,
                          f"uuid={request.uuid!r} luid={request.luid:#x}")
            self.applier.stats.errors_by_type[request.request_type] += 1
            self.send(Reply(request, -errno.EIO), address)
            return
        if isinstance(result, Reply):
            self.send(result, address)
        elif result.job is not None:
            self.worker.submit(self.job(result, address))
        elif result.durable_at is not None and result.durable_at <= self.backend.durable_position():
            # Durable already (a backend whose positions always are): answered here, as the
            # group-commit thread would after a sync.
            job = self.job(result, address)
            if answered_early(job.reply, None):
                self.send(job.reply, address)
            self.finish_job(job, None)
        else:
            self.group.add(result.durable_at or 0, self.job(result, address))

    def job(self, waiting: Waiting, address: object) -> Job:
        def finish(exc: BaseException | None) -> bool:
            return self.finish(waiting, address, exc)

        return Job(waiting.job or _nothing, finish, waiting.reply, address)

    # --- a stalled state disk ----------------------------------------------------------------

    def disk_stalled(self) -> bool:
        """Requests that write the journal must wait: a sync has run longer than STALL_AFTER, or
        the journal has no room for them until the store worker has made its next segment."""
        group = self.group
        return ((group.sync_started is not None and group.stalled_for(time.monotonic()) >= STALL_AFTER)
                or self.backend.writes_must_wait())

    def hold(self, request: wire.Request, address: object) -> None:
        """Keep a request that would write the journal until the slow sync completes (its write
        could block the loop, and with it the requests that need no disk), or until the journal's
        next segment is ready (the loop never makes one)."""
        if not self.held:
            stalled = self.group.stalled_for(time.monotonic())
            why = (f"a journal sync has run for {stalled:.1f} s (the state disk is slow or stalled)"
                   if stalled >= STALL_AFTER else "the journal's next segment is not made yet")
            log.warning("%s: requests that write the journal wait for it, the others are answered", why)
        self.held.append((request, address))
        self.held_total += 1

    def serve_held(self, start: bool = True) -> None:
        """Serve the requests held back, in the order they came, once the slow sync is done;
        ``start``: start their FLUSHes' sync now (the loop's turn claims it itself)."""
        held, self.held = self.held, []
        log.warning("the journal can be written again: serving %d request(s) held back meanwhile", len(held))
        for request, address in held:
            if self.held or self.disk_stalled():  # stalled again: the rest waits again
                self.held.append((request, address))
            else:
                self.serve(request, address)
        if start:
            self.group.start()  # the FLUSHes among them: their sync, now, not at the next frame

    def send(self, reply: Reply, address: object) -> None:
        payload = wire.encode_reply(reply)
        with self.send_lock:
            if self.capture:
                self.capture.write(FROM_DAEMON, payload)
            self.transport.send(payload, address)
            if self.flush_latency is not None and reply.request.request_type == _FLUSH:
                self.flush_latency.answered(reply.request)

    def on_completions(self, read_wake: bool = True) -> int:
        """Let the engine hear of finished work; answer what was not answered yet. Returns how
        many store writes failed (at stop, the commits nobody waits for). ``read_wake``: empty
        the wake-up pipe (the loop does when the selector says it is readable)."""
        failures = 0
        if read_wake:
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake_r, 65536)
        for job, exc in self.group.drain() + self.worker.drain():
            failures += not self.finish_job(job, exc)
        return failures

    def finish_job(self, job: Job, exc: BaseException | None) -> bool:
        try:
            return job.finish(exc)
        except Exception:  # noqa: BLE001 - one request's bookkeeping must not stop the loop
            log.exception("internal error (a bug of dm-ulogd) completing a request")
            return False

    def finish(self, waiting: Waiting, address: object, exc: BaseException | None) -> bool:
        """Let the engine hear how a waiting request's work ended (the loop's turn only) and send
        what is still to answer; False if the work failed."""
        reply = self.applier.completed(waiting, exc)
        if reply is not None:
            self.send(reply, address)
        return exc is None

    # --- background work -----------------------------------------------------------------

    def background(self, idle: bool) -> None:
        """Hand the store worker its next background job, if it has nothing to do."""
        if self.worker.busy():
            return
        applier = self.applier
        now = time.monotonic()
        metrics = self.metrics
        if metrics is not None and now >= metrics.due:
            # On the worker, not here: formatting thousands of mirrors would hold up requests.
            # Before maintenance and checkpoints, so that neither can keep the file from
            # following its interval; it is one short job every few seconds.
            metrics.due = now + metrics.interval
            snap = self.metrics_snapshot()
            self.worker.submit(Job(lambda: metrics.write(snap), metrics.written_or_not))
            return
        # Maintenance first when it is due, so that a steady stream of checkpoints never keeps
        # the journal from being cut or the next segment from being prepared.
        if now - self.maintained_at >= MAINTENANCE_INTERVAL or self.backend.maintenance_due():
            self.maintained_at = now
            self.noisy.flush()
            applier.engine.advance(time.time())
            needed = applier.needed()
            if needed > self.cut_at or self.backend.maintenance_due():
                self.cut_at = needed
                self.worker.submit(_maintenance(self.backend, needed))
                return
        key = applier.checkpoint_due(now, self.checkpoint_age, self.checkpoint_span, idle)
        if key is not None:
            waiting = applier.checkpoint(key)
            if waiting is not None:
                self.worker.submit(self.job(waiting, None))
                return
        if idle and not applier.unstored:
            needed = applier.needed()
            if needed > self.cut_at:
                self.cut_at, self.maintained_at = needed, now
                self.worker.submit(_maintenance(self.backend, needed))

    def metrics_snapshot(self) -> Snapshot:
        assert self.metrics is not None
        return self.metrics.snapshot(self.applier, (self.group.syncs, self.group.sync_failures),
                                     self.dropped_frames, self.send_lock,
                                     self.held_total)

    # --- loop ----------------------------------------------------------------------------

    def request_stop(self, signum: int, _frame: object) -> None:
        self.stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self.sig_w, b"s")

    def run(self, ready: Callable[[], None] | None = None,
            stopping: Callable[[], None] | None = None) -> int:
        """Serve until SIGTERM/SIGINT (``request_stop``); ``ready`` is called once listening,
        ``stopping`` when the stop begins (the service tells systemd)."""
        self.transport.attach(self.selector)
        if ready:
            ready()
        if not isinstance(self.selector, selectors.EpollSelector):
            self.turns(me=1)
        else:
            self.standby = select.epoll()
            self.standby.register(self.sig_r, select.EPOLLIN)
            # Two threads serve, the group-commit thread and this one's "requests" thread. This
            # thread (the main one: Python runs signal handlers only there) only waits for the
            # stop, so that SIGTERM's handler runs at once even while a serving thread waits for
            # a stalled disk, and the daemon stops reading then, as when it served here.
            other = threading.Thread(target=self.serving_turns, args=(1,), daemon=True, name="requests")
            other.start()
            self.group.serve_requests(lambda: self.serving_turns(2))
            stop = select.poll()
            stop.register(self.sig_r, select.POLLIN)
            while not self.stopping:
                stop.poll()
            with self.loop_lock:
                pass  # the turn under way ends; no turn starts after the stop (``turns``)
            if self.loop_error is not None:
                raise self.loop_error
        if stopping:
            stopping()
        result = self.shutdown()  # closes the group commit: its thread has left the loop
        if self.standby is not None:
            other.join()
            self.standby.close()
        return result

    def serving_turns(self, me: int) -> None:
        """The request loop on serving thread ``me``: if it fails, the daemon stops and ``run``
        raises what failed (as it did when the loop ran on the main thread)."""
        try:
            self.turns(me)
        except BaseException as exc:  # noqa: BLE001 - raised again by run
            if self.loop_error is None:
                self.loop_error = exc
            self.stopping = True
            with contextlib.suppress(BlockingIOError):
                os.write(self.sig_w, b"e")  # wakes run and the other serving thread

    def turns(self, me: int) -> None:
        """The request loop's turns until the daemon stops.

        Two threads serve (``me``: 1 or 2; without epoll, thread 1 alone), one turn at a time
        (``loop_lock``). The one serving (``self.serving``) waits in ``select``; the other waits
        on ``standby``, which watches the loop's epoll set only while a sync claimed by a
        serving thread runs. A turn that ends with FLUSHes waiting and no sync running has its
        thread sync them itself, outside the lock: no thread is woken to start a sync (a
        wake-up cost the waker and the FLUSH tens of microseconds on a virtual machine whose
        idle CPUs halt), and what comes during the sync wakes the other thread, which takes the
        loop over (``GroupCommit.take_over``) and serves from then on; the syncer then stands
        by. Which thread serves changes only there, under the group commit's lock, so one
        thread at a time waits in ``select``. So the loop never waits for the disk. Without
        epoll the one thread hands every sync to the group-commit thread instead.

        Whatever is registered in the selector is handled by whichever thread takes the turn,
        under the lock. One thread selects at a time; still, a handler must take a readiness
        with nothing to read in its stride (the transports' sockets are non-blocking)."""
        sel, transport, standby = self.selector, self.transport, self.standby
        applier, group, worker = self.applier, self.group, self.worker
        wake_key, loop_lock = self.wake_key, self.loop_lock
        loop_fd = sel.fileno() if standby is not None else -1
        synced = False
        while True:
            if (synced or group.done or worker.done) and loop_lock.acquire(blocking=False):
                # Before waiting: chiefly the books of the FLUSHes its sync answered (that
                # thread wakes nobody for them), kept off the path of the next request, and the
                # background work the turn left for after its sync. If the other thread has
                # the loop, its own turn does both.
                try:
                    if self.stopping:
                        return
                    if group.done or worker.done:
                        self.on_completions(read_wake=False)
                    if synced:
                        self.background_due(time.monotonic(), got=True)
                finally:
                    loop_lock.release()
            if self.serving == me:
                # Idle, the loop wakes up only to hand out background work (checkpoints, cutting).
                events = sel.select(IDLE_AFTER if applier.unstored else MAINTENANCE_INTERVAL)
            else:
                assert standby is not None
                standby.poll()  # the serving thread syncs and something came, or the stop
                if not group.take_over():
                    # The sync ended first: its thread serves on (and reads what came). Only
                    # the thread that serves waits in select: two there would both be woken
                    # by every request, and take turns at it.
                    if self.stopping:
                        return
                    continue
                self.serving = me
                events = sel.select(0)
            with loop_lock:
                if self.stopping:  # the rest is the stop's (``run``, ``shutdown``)
                    return
                now = time.monotonic()
                for key, _ in events:
                    if key is wake_key:
                        # A failure, a reply the loop must send, a store write done, a slow
                        # sync ended: before any request read now.
                        self.on_completions()
                        break
                if self.held and not self.disk_stalled():
                    self.serve_held(start=standby is None)
                got = 0
                for key, _ in events:
                    # A guard: a connection closed since it was selected (its descriptor may
                    # belong to a new one) is not read.
                    if key.data is transport and key.fileobj.fileno() >= 0:  # type: ignore[union-attr]
                        for frame, address in transport.readable(key, sel):
                            got += 1
                            self.on_frame(frame, address)
                if got:
                    self.last_frame = now
                # One sync for every FLUSH of the batch (and of earlier batches waiting).
                synced = False
                if group.waiting:
                    if standby is None:
                        group.start()
                    else:
                        synced = group.claim(standby, loop_fd)
                # Cheap tests first (inline: this is every request's path): most turns of a busy
                # loop have no background work to hand out. With a sync to start, after it.
                if not synced and not worker.inflight and (
                        applier.unstored or not got or self.held
                        or now - self.maintained_at >= MAINTENANCE_INTERVAL):
                    self.background(idle=now - self.last_frame >= IDLE_AFTER)
            if synced and group.rounds():
                self.serving = 3 - me  # the other thread took the loop over during the sync

    def background_due(self, now: float, got: int) -> None:
        """Hand out background work if some may be due (``got``: frames read this turn)."""
        # Cheap tests first: most turns of a busy loop have no background work to hand out.
        if not self.worker.inflight and (self.applier.unstored or not got or self.held
                                         or now - self.maintained_at >= MAINTENANCE_INTERVAL):
            self.background(idle=now - self.last_frame >= IDLE_AFTER)

    def answer_queued(self) -> int:
        """Answer every request already queued on the sockets, and finish their work.

        At stop, a request left unread would cost its kernel caller the 15 s timeout; answered,
        the caller goes on, and its next request finds no listener and reconnects within 2 s.
        """
        frames = self.transport.queued()
        for frame, address in frames:
            self.on_frame(frame, address)
        self.wait_idle()
        return len(frames)

    def wait_idle(self) -> int:
        """Wait for every sync and store write under way; returns how many failed."""
        failures = 0
        while self.worker.busy() or not self.group.idle() or self.held:
            self.group.start()
            if self.held and not self.worker.busy() and self.backend.maintenance_due():
                # Held for the journal's next segment, which only maintenance makes.
                self.worker.submit(_maintenance(self.backend, self.applier.needed()))
            self.selector.select(timeout=0.01 if not self.group.idle() else 1.0)
            failures += self.on_completions()
            if self.held and not self.disk_stalled():
                self.serve_held()
        return failures + self.on_completions()

    def shutdown(self) -> int:
        self.transport.stop_receiving(self.selector)
        answered = self.answer_queued()
        log.info("stopping: answered %d queued request(s), writing %d log(s) to their stores", answered,
                 len(self.applier.table))
        for waiting in self.applier.commit_all():
            self.worker.submit(self.job(waiting, None))
        failures = self.wait_idle()
        if not failures:
            # Everything is in the stores: the journal keeps only its last segment.
            self.worker.submit(_maintenance(self.backend, self.applier.needed()))
            self.wait_idle()
        self.answer_queued()
        self.group.close()
        self.worker.close()
        final = self.metrics_snapshot() if self.metrics is not None else None
        self.backend.close()
        self.transport.close()
        if self.capture:
            self.capture.close()
        if self.metrics is not None and final is not None:
            self.metrics.write_now(final)
        stats = self.applier.stats
        engine = self.applier.engine
        self.noisy.flush_all()
        engine.noisy.flush_all()
        quiet = self.noisy.suppressed + engine.noisy.suppressed
        counters = ", ".join(f"{k} {v}" for k, v in vars(self.transport.counters).items())
        log.info("stopped (%d requests, %d errors, %d commits, %d journal syncs for %d FLUSHes, %d "
                 "checkpoints, %d failed store writes at stop; %s: %s; %d unanswerable frames dropped; "
                 "%d log lines not logged by the rate limit%s)",
                 stats.requests, stats.errors, stats.commits, self.group.syncs, self.group.flushes,
                 stats.checkpoints, failures, self.transport.name, counters, self.dropped_frames,
                 sum(quiet.values()), "".join(f", {n} {k}" for k, n in sorted(quiet.items())))
        return 1 if failures else 0


