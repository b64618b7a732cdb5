"""dm-ulogd: the daemon. One thread owns the engine and the sockets; commits run beside it.

The request loop: read every queued frame, let the engine answer it. A request that needs the
backend (a FLUSH's durable commit, a journal write) is queued on its uuid's lane; each uuid has
its own worker thread, one job at a time and in arrival order, so a commit of one mirror never
delays the replies of another by more than the loop's own turn, and one uuid's commits are
never reordered. A successful commit is answered by its worker the moment it returns; every
other completion comes back through a pipe and is answered by the loop, after the engine has
heard of it.

The hand-off to a worker and back costs a FLUSH 60-100 us on the development VM, a third of a
fast disk's commit (docs/benchmarks.md). So the loop runs a job itself when that delays
nobody: the request came alone (nothing else was readable), no worker is busy, and the uuid's
recent jobs were fast (:data:`INLINE_JOB_LIMIT`). A slow or stalling store, or concurrent
requests, keep the work on the workers, where it never holds up another mirror's replies.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import fcntl
import logging
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import __version__, wire
from .backends.base import Backend, available_backends, load_backend
from .capture import FROM_DAEMON, TO_DAEMON, CaptureWriter
from .engine import Engine, Pending
from .transport.netlink import GroupTaken, NetlinkTransport
from .transport.unix import UnixTransport
from .wire import Reply

log = logging.getLogger("ulog_disk.daemon")

DEFAULT_STATE_DIR = "/var/lib/ulog-disk"
DEFAULT_BACKEND = "lmdb"
#: A uuid whose backend jobs took less than this lately (moving average) may have them run by
#: the request loop itself: at worst another mirror's request waits about this long.
INLINE_JOB_LIMIT = 0.002
#: Weight of the newest job in the moving average of a uuid's job time.
_JOB_TIME_WEIGHT = 0.25


class StartupError(RuntimeError):
    pass


class StateDirLock:
    """An exclusive ``flock`` on ``<state dir>/lock``; the file holds the owner's pid."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / "lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StartupError(
                f"state directory {state_dir} is in use by another dm-ulogd (pid {owner}); "
                f"refusing to start a second one on it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        os.close(self.fd)


def prepare_state_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def sd_notify(message: str) -> None:
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), address)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", target, exc)


class Lanes:
    """Per-uuid FIFO of backend jobs, each uuid with its own long-lived thread.

    One thread per uuid keeps a uuid's jobs in order and lets commits of different uuids (each its
    own LMDB environment; py-lmdb releases the GIL while it syncs) run at the same time. Results
    come back through a deque and a wake-up pipe; everything else here is touched only by the
    request loop's thread.
    """

    def __init__(self, send: Callable[[Reply, object], None]) -> None:
        self.send = send
        self.queues: dict[str, queue.SimpleQueue[tuple[Pending, object] | None]] = {}
        self.threads: list[threading.Thread] = []
        self.inflight: collections.Counter[str] = collections.Counter()
        #: Moving average of each uuid's job time (seconds), written by whichever thread ran it.
        self.job_seconds: dict[str, float] = {}
        #: (job, reply address, its exception, whether the worker already sent the reply)
        self.done: collections.deque[tuple[Pending, object, BaseException | None, bool]] = collections.deque()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def busy(self, uuid: str) -> bool:
        return self.inflight[uuid] > 0

    def submit(self, pending: Pending, address: object) -> None:
        lane = self.queues.get(pending.uuid)
        if lane is None:
            lane = self.queues[pending.uuid] = queue.SimpleQueue()
            thread = threading.Thread(target=self._run_lane, args=(lane,), daemon=True,
                                      name=f"lane-{len(self.queues)}")
            thread.start()
            self.threads.append(thread)
        self.inflight[pending.uuid] += 1
        lane.put((pending, address))

    def _run_lane(self, lane: queue.SimpleQueue[tuple[Pending, object] | None]) -> None:
        while (item := lane.get()) is not None:
            pending, address = item
            exc: BaseException | None = None
            started = time.monotonic()
            try:
                pending.job()
            except BaseException as e:  # noqa: BLE001 - reported to the engine via complete()
                exc = e
            self.timed(pending, time.monotonic() - started)
            sent = False
            if exc is None:
                if pending.reply_on_success is not None and address is not None:
                    self.send(pending.reply_on_success, address)
                    sent = True
                run_after(pending)
            self.done.append((pending, address, exc, sent))
            with contextlib.suppress(BlockingIOError):  # a full pipe wakes the loop all the same
                os.write(self.wake_w, b"x")

    def timed(self, pending: Pending, seconds: float) -> None:
        if pending.quick:
            return
        before = self.job_seconds.get(pending.uuid)
        self.job_seconds[pending.uuid] = (seconds if before is None
                                          else before + _JOB_TIME_WEIGHT * (seconds - before))

    def fast(self, uuid: str) -> bool:
        """Whether the uuid's jobs have been quick lately (unknown until one ran on a worker)."""
        return self.job_seconds.get(uuid, INLINE_JOB_LIMIT) < INLINE_JOB_LIMIT

    def drain(self) -> list[tuple[Pending, object, BaseException | None, bool]]:
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_r, 65536)
        items = []
        while self.done:
            item = self.done.popleft()
            uuid = item[0].uuid
            self.inflight[uuid] -= 1
            if not self.inflight[uuid]:
                del self.inflight[uuid]
            items.append(item)
        return items

    def idle(self) -> bool:
        return not self.inflight

    def close(self) -> None:
        for lane in self.queues.values():
            lane.put(None)
        for thread in self.threads:
            thread.join()
        os.close(self.wake_r)
        os.close(self.wake_w)


def run_after(pending: Pending) -> None:
    if pending.after is None:
        return
    try:
        pending.after()
    except Exception:  # noqa: BLE001 - tidying; the request itself has succeeded
        log.exception("internal error tidying after a request of uuid=%r", pending.uuid)


class Daemon:
    def __init__(self, engine: Engine, transport: NetlinkTransport | UnixTransport,
                 capture: CaptureWriter | None = None):
        self.engine = engine
        self.transport = transport
        self.capture = capture
        # Replies go out from the loop and from the lanes' workers.
        self.send_lock = threading.Lock()
        self.lanes = Lanes(self.send)
        self.selector = selectors.DefaultSelector()
        self.stopping = False
        self.dropped_frames = 0
        #: The frame being handled arrived alone: nothing else was readable with it.
        self.alone = False
        #: Jobs run here whose tidying (``Pending.after``) waits for the loop to be idle, so it
        #: delays no request; a uuid's is run before any later job of that uuid.
        self.deferred: dict[str, Pending] = {}
        self.sig_r, self.sig_w = os.pipe()
        os.set_blocking(self.sig_r, False)
        os.set_blocking(self.sig_w, False)

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
                log.warning("dropped an unanswerable frame (%d bytes): %s", len(frame), exc.reason)
                return
            log.error("malformed request seq=%d: %s: answering -EINVAL", exc.request.seq, exc.reason)
            self.engine.stats.errors += 1
            self.send(Reply(exc.request, -errno.EINVAL), address)
            return
        try:
            result = self.engine.handle(request)
        except Exception:  # noqa: BLE001 - one bad request must not stop the others
            log.exception("internal error on request seq=%d type=%d: answering -EIO",
                          request.seq, request.request_type)
            self.send(Reply(request, -errno.EIO), address)
            return
        if isinstance(result, Reply):
            self.send(result, address)
            return
        self.run_deferred(result.uuid)
        if self.may_run_inline(result):
            started = time.monotonic()
            try:
                result.job()
                exc_: BaseException | None = None
            except BaseException as e:  # noqa: BLE001
                exc_ = e
            self.lanes.timed(result, time.monotonic() - started)
            self.send(result.complete(exc_), address)
            if exc_ is None and result.after is not None:
                self.deferred[result.uuid] = result
        else:
            self.lanes.submit(result, address)

    def run_deferred(self, uuid: str | None = None) -> None:
        """The tidying left by jobs run here: the uuid's, or (None) everyone's."""
        if uuid is None:
            while self.deferred:
                run_after(self.deferred.popitem()[1])
        elif (pending := self.deferred.pop(uuid, None)) is not None:
            run_after(pending)

    def may_run_inline(self, pending: Pending) -> bool:
        """Journal writes (no disk wait) whenever the uuid's lane is idle; other jobs only when
        running them here delays nobody (see the module's docstring)."""
        if self.lanes.busy(pending.uuid):
            return False
        return pending.quick or (self.alone and self.lanes.idle() and self.lanes.fast(pending.uuid))

    def send(self, reply: Reply, address: object) -> None:
        payload = wire.encode_reply(reply)
        with self.send_lock:
            if self.capture:
                self.capture.write(FROM_DAEMON, payload)
            self.transport.send(payload, address)

    def on_completions(self) -> None:
        for pending, address, exc, sent in self.lanes.drain():
            try:
                reply = pending.complete(exc)
            except Exception:  # noqa: BLE001
                log.exception("internal error completing a request")
                continue
            if not sent:
                self.send(reply, address)

    # --- loop ----------------------------------------------------------------------------

    def request_stop(self, signum: int, _frame: object) -> None:
        self.stopping = True
        with contextlib.suppress(BlockingIOError):
            os.write(self.sig_w, b"s")

    def run(self, ready: Callable[[], None] | None = None) -> int:
        sel = self.selector
        if isinstance(self.transport, UnixTransport):
            sel.register(self.transport.fileno(), selectors.EVENT_READ, "accept")
        else:
            sel.register(self.transport.fileno(), selectors.EVENT_READ, "netlink")
        sel.register(self.lanes.wake_r, selectors.EVENT_READ, "lanes")
        sel.register(self.sig_r, selectors.EVENT_READ, "signal")
        if ready:
            ready()
        while not self.stopping:
            events = sel.select(0 if self.deferred else None)
            if not events:
                self.run_deferred()
                continue
            if self.lanes.done:
                # Completions first: a lane the engine hears is idle again lets the next
                # journal write of its uuid run inline rather than queue behind nothing.
                self.on_completions()
            for key, _ in events:
                tag = key.data
                if tag == "netlink":
                    frames = self.transport.receive()  # type: ignore[union-attr]
                    self.alone = len(events) == 1 and len(frames) == 1
                    for frame, address in frames:
                        self.on_frame(frame, address)
                elif tag == "accept":
                    conn = self.transport.accept()  # type: ignore[union-attr]
                    if conn is not None:
                        sel.register(conn.fileno(), selectors.EVENT_READ, conn)
                elif tag == "lanes":
                    self.on_completions()
                elif tag == "signal":
                    pass
                else:
                    frames, still_open = self.transport.receive_from(key.data)  # type: ignore[union-attr]
                    self.alone = len(events) == 1 and len(frames) == 1
                    for frame, address in frames:
                        self.on_frame(frame, address)
                    if not still_open:
                        sel.unregister(key.fd)
        return self.shutdown()

    def answer_queued(self) -> int:
        """Answer every request already queued on the sockets, and finish their backend work.

        At stop, a request left unread would cost its kernel caller the 15 s timeout; answered,
        the caller goes on, and its next request finds no listener and reconnects within 2 s.
        """
        frames: list[tuple[bytes, object]] = []
        self.alone = False
        if isinstance(self.transport, UnixTransport):
            for conn in list(self.transport.connections.values()):
                got, _ = self.transport.receive_from(conn)
                frames.extend(got)
        else:
            frames = self.transport.receive()
        for frame, address in frames:
            self.on_frame(frame, address)
        self.wait_lanes()
        return len(frames)

    def wait_lanes(self) -> int:
        failures = 0
        while not self.lanes.idle():
            self.selector.select(timeout=1.0)
            for pending, address, exc, sent in self.lanes.drain():
                reply = pending.complete(exc)
                if address is None:
                    failures += reply.error != 0
                elif not sent:
                    self.send(reply, address)
        return failures

    def shutdown(self) -> int:
        sd_notify("STOPPING=1")
        self.run_deferred()
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.transport.fileno())
        self.transport.stop_receiving()
        answered = self.answer_queued()
        log.info("stopping: answered %d queued request(s), committing %d log(s)", answered,
                 len(self.engine.table))
        for pending in self.engine.commit_all():
            self.lanes.submit(pending, None)
        failures = self.wait_lanes()
        self.answer_queued()
        self.lanes.close()
        self.engine.backend.close()
        self.transport.close()
        if self.capture:
            self.capture.close()
        counters = ", ".join(f"{k} {v}" for k, v in vars(self.transport.counters).items())
        log.info("stopped (%d requests, %d errors, %d commits, %d failed commits at stop; %s: %s; "
                 "%d unanswerable frames dropped)", self.engine.stats.requests, self.engine.stats.errors,
                 self.engine.stats.commits, failures, self.transport.name, counters, self.dropped_frames)
        return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    backends = ", ".join(sorted(available_backends())) or "none"
    p = argparse.ArgumentParser(
        prog="dm-ulogd",
        description="Userspace dirty-log server for device-mapper mirrors (dm-log-userspace), "
                    "with a durable log store. Runs in the foreground; SIGTERM/SIGINT commit every "
                    "log and exit 0.",
    )
    p.add_argument("--listen", default="netlink", metavar="netlink|unix:PATH",
                   help="where requests come from: the kernel's netlink connector (default), or a "
                        "unix SOCK_SEQPACKET socket carrying the same frames (tests, kernel model)")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, type=Path,
                   help=f"where the store and the lock live (default {DEFAULT_STATE_DIR}, created 0700)")
    p.add_argument("--backend", default=DEFAULT_BACKEND,
                   help=f"log store plugin from the ulog_disk.backends entry points (installed: {backends}; "
                        f"default {DEFAULT_BACKEND})")
    p.add_argument("--capture", metavar="FILE",
                   help="append every frame received and sent to FILE (read it with ulog-dump wire)")
    p.add_argument("--ready-file", metavar="FILE", type=Path,
                   help="create FILE once listening (for scripts; systemd gets READY=1 via NOTIFY_SOCKET)")
    p.add_argument("--boot-id", metavar="ID",
                   help="boot id to record with each instance (default: /proc/sys/kernel/random/boot_id); "
                        "tests use it to play a host reboot")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def make_transport(listen: str) -> NetlinkTransport | UnixTransport:
    if listen == "netlink":
        return NetlinkTransport()
    if listen.startswith("unix:") and len(listen) > 5:
        return UnixTransport(listen[5:])
    raise StartupError(f"--listen must be 'netlink' or 'unix:PATH', not {listen!r}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s dm-ulogd[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    lock = None
    backend: Backend | None = None
    try:
        backend_cls = load_backend(args.backend)
        prepare_state_dir(args.state_dir)
        lock = StateDirLock(args.state_dir)
        backend = backend_cls(args.state_dir)
        engine = Engine(backend, boot_id=args.boot_id)
        engine.restore()
        transport = make_transport(args.listen)
    except (StartupError, LookupError, GroupTaken, OSError) as exc:
        log.error("cannot start: %s", exc)
        if backend is not None:
            backend.close()
        return 2
    capture = CaptureWriter(args.capture, transport.name) if args.capture else None
    daemon = Daemon(engine, transport, capture)
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)

    def ready() -> None:
        log.info("dm-ulogd %s ready: backend %s, state dir %s, %d log(s) restored, boot id %s",
                 __version__, args.backend, args.state_dir, len(engine.table), engine.boot_id)
        sd_notify("READY=1")
        if args.ready_file:
            args.ready_file.write_text(f"{os.getpid()}\n")

    try:
        return daemon.run(ready)
    finally:
        if lock:
            lock.release()
