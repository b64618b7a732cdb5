"""dm-ulogd, the program: its command line, the state directory and its lock, systemd's
notifications, and the start-up checks, in that order; then it builds the :class:`Daemon` (the
request loop, ``daemon.py``) and runs it. Nothing here runs once the loop serves."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path

from .. import __version__
from ..protocol.capture import TO_DAEMON, CaptureWriter
from ..storage.base import Backend, available_backends, load_backend
from ..storage.bootid import read_boot_id
from ..storage.limits import MemoryBudget
from ..transport import Transport
from ..transport.netlink import GroupTaken, NetlinkTransport
from ..transport.unix import UnixTransport
from .applier import Applier
from .cli import ToolParser, fill
from .loop import CHECKPOINT_AGE, CHECKPOINT_SPAN, Daemon
from .metrics import DEFAULT_INTERVAL as METRICS_INTERVAL
from .metrics import Metrics, check_metrics_path
from .statedir import DEFAULT_STATE_DIR, StateDirLock
from .statedir import prepare as prepare_state_dir

log = logging.getLogger("ulog_disk.service")

DEFAULT_BACKEND = "lmdb"


class StartupError(RuntimeError):
    pass


def lock_state_dir(state_dir: Path) -> StateDirLock:
    lock = StateDirLock(state_dir)
    if not lock.acquire():
        owner = lock.holder()
        raise StartupError(f"state directory {state_dir} is in use by another dm-ulogd (pid "
                           f"{owner if owner is not None else '?'}); refusing to start a second one on it")
    return lock


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


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (the daemon's own use is bounded; this is
    headroom for the kernel's and the tools' sockets): returns (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
        except (ValueError, OSError):
            pass
    return soft, soft


#: The end of ``dm-ulogd --help``: what an operator needs before the first start (the man page
#: dm-ulogd(8) says more: docs/man/dm-ulogd.8.include).
DAEMON_EPILOG = f"""\
privileges:
  With --listen netlink it needs CAP_SYS_ADMIN (the kernel ignores replies from anyone else) and
  CAP_NET_ADMIN (to join connector group 7), and must run in the initial network namespace (the
  connector exists there only). It refuses to start when another listener (cmirrord, another
  dm-ulogd) has the group. --listen unix:PATH needs no privilege (tests, the kernel model).

files (under --state-dir, default {DEFAULT_STATE_DIR}, created 0700 at the first start):
  lock              flock held while the daemon runs; holds its pid (a second daemon refuses)
  journal.<start>   the write-ahead journal's segments, shared by every mirror (formats/journal.md)
  u.<uuid>/         one LMDB store per mirror uuid (x.<base32>/ for a uuid with other characters;
                    formats/store.md); <dir>.damaged-<time>: a store that failed verification,
                    moved aside (that uuid is resynced in full)

signals:
  SIGTERM, SIGINT   answer what is queued, write every log to its store, exit 0; the kernel
                    reconnects to the next instance without a resync

exit status:
  0  stopped by SIGTERM/SIGINT, every log written to its store
  1  stopped, but some log could not be written to its store at stop (the journal still has it)
  2  could not start: bad arguments, the state directory in use or unusable, the connector group
     taken; one line 'dm-ulogd: what is wrong' on stderr

See dm-ulogd(8), ulog-recover(8), ulog-dump(8).
"""


def listen_address(text: str) -> str:
    """``--listen``: 'netlink' or 'unix:PATH' in an existing directory, checked while parsing,
    so a command line that is refused creates nothing (no state directory, no lock)."""
    if text == "netlink":
        return text
    if text.startswith("unix:") and len(text) > 5:
        parent = Path(text[5:]).parent
        if not parent.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r}: no such directory {str(parent)!r}")
        return text
    raise argparse.ArgumentTypeError(f"must be 'netlink' or 'unix:PATH', not {text!r}")


def output_file(text: str) -> Path:
    """A file the daemon writes (--capture, --ready-file): its directory must exist (checked while
    parsing, before the state directory is created)."""
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: no such directory {str(path.parent)!r}")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    return path


class _LogFormatter(logging.Formatter):
    """Log lines with time, pid and level; a record with ``plain`` set (a start-up error) as the
    one line ``dm-ulogd: what is wrong`` that the other programs print, so it reads the same at a
    terminal and in the journal and is not said twice."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s dm-ulogd[%(process)d] %(levelname)s %(name)s: %(message)s")
        #: The second last formatted and its text (see formatTime).
        self._second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "plain", False):
            return f"dm-ulogd: {record.getMessage()}"
        return super().format(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        """logging.Formatter's text, the date and time formatted once per second: a restart with a
        thousand mirrors logs four lines for each within a second or two, and ``strftime`` was a
        quarter of each line's cost. (Records are formatted under the handler's lock.)"""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime(self.default_time_format,
                                                           self.converter(record.created)))
        return self.default_msec_format % (cached[1], record.msecs)


#: ``extra=`` of a log call whose message is shown as a plain error line.
PLAIN = {"plain": True}


def build_parser() -> argparse.ArgumentParser:
    backends = ", ".join(sorted(available_backends())) or "none"
    p = ToolParser(
        prog="dm-ulogd", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=fill("Userspace dirty-log server for device-mapper mirrors (dm-log-userspace, protocol "
                         "version 3, over the netlink connector), with a durable log store: a daemon-wide "
                         "write-ahead journal and one LMDB store per mirror. Runs in the foreground "
                         "(systemd: Type=notify); logs to stderr."),
        epilog=DAEMON_EPILOG,
    )
    p.add_argument("--listen", default="netlink", metavar="netlink|unix:PATH", type=listen_address,
                   help="where requests come from: the kernel's netlink connector (default), or a "
                        "unix SOCK_SEQPACKET socket carrying the same frames (tests, kernel model)")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, type=Path, metavar="DIR",
                   help=f"where the store and the lock live (default {DEFAULT_STATE_DIR}, created 0700)")
    p.add_argument("--backend", default=DEFAULT_BACKEND,
                   help=f"log store plugin from the ulog_disk.backends entry points (installed: {backends}; "
                        f"default {DEFAULT_BACKEND})")
    p.add_argument("--checkpoint-age", type=float, default=CHECKPOINT_AGE, metavar="SECONDS",
                   help="write a log's changes from the journal to its store at the latest this long after "
                        f"the first of them (default {CHECKPOINT_AGE:g}; also when the journal since them "
                        f"passes {CHECKPOINT_SPAN >> 20} MiB, and whenever the daemon is idle). Shorter: a "
                        "shorter journal to replay at start-up, more store writes")
    p.add_argument("--journal-segment-size", type=int, metavar="BYTES",
                   help="size of each journal segment file (lmdb backend; default 4 MiB; a multiple of "
                        "4096, at least 64 KiB)")
    p.add_argument("--capture", metavar="FILE", type=output_file,
                   help="append every frame received and sent to FILE (read it with ulog-dump wire)")
    p.add_argument("--metrics-file", metavar="FILE", type=Path,
                   help="write counters, FLUSH latency and per-mirror region counts to FILE in the "
                        "node_exporter textfile format, every --metrics-interval seconds and at stop "
                        "(its directory must exist; docs/metrics.md)")
    p.add_argument("--metrics-interval", type=float, default=METRICS_INTERVAL, metavar="SECONDS",
                   help=f"seconds between two writes of --metrics-file (default {METRICS_INTERVAL:g})")
    p.add_argument("--ready-file", metavar="FILE", type=output_file,
                   help="create FILE once listening (for scripts; systemd gets READY=1 via NOTIFY_SOCKET)")
    p.add_argument("--boot-id", metavar="ID",
                   help="boot id to record with each instance (default: /proc/sys/kernel/random/boot_id); "
                        "tests use it to play a host reboot")
    p.add_argument("--cluster", choices=["corosync"],
                   help="cluster mode: clustered-core and clustered-disk logs are one log shared with the "
                        "dm-ulogd of every other node of the corosync cluster running on this host "
                        "(docs/cluster.md); other logs stay this node's own")
    p.add_argument("--fence-command", metavar="CMD",
                   help="cluster mode: run CMD with a departed node's id appended before its regions are "
                        "recovered by others; exit 0 means fenced (the convention of fence agents and "
                        "'stonith_admin --confirm'). Without it, leaving the membership counts as fenced")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def make_transport(listen: str) -> Transport:
    if listen == "netlink":
        return NetlinkTransport()
    if listen.startswith("unix:") and len(listen) > 5:
        return UnixTransport(listen[5:])
    raise StartupError(f"--listen must be 'netlink' or 'unix:PATH', not {listen!r}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter())
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO, handlers=[handler])
    before, now = raise_descriptor_limit()
    if now != before:
        log.debug("descriptor limit raised from %d to %d", before, now)
    lock = None
    backend: Backend | None = None
    corosync = None
    # What a start that fails answers with exit status 2 (read when one is raised).
    refused: tuple[type[Exception], ...] = (StartupError, LookupError, GroupTaken, OSError, ValueError)
    try:
        if args.fence_command and not args.cluster:
            raise StartupError("--fence-command needs --cluster")
        if args.cluster:
            # Imported in cluster mode only: its ctypes definitions are a fifth of the imports of
            # every start.
            from ..cluster.corosync import CorosyncError

            refused += (CorosyncError,)
            # Before anything is created: corosync not running, or refusing us, costs nothing.
            from .cluster import connect

            try:
                corosync = connect()
            except CorosyncError as exc:
                raise StartupError(str(exc)) from None
        backend_cls = load_backend(args.backend)
        # The arguments first: nothing is created for a command line that is refused.
        if args.checkpoint_age < 0:
            raise StartupError("--checkpoint-age must not be negative")
        if args.journal_segment_size is not None and (
                args.journal_segment_size < 65536 or args.journal_segment_size % 4096):
            raise StartupError("--journal-segment-size must be a multiple of 4096, at least 65536 bytes")
        if not args.metrics_interval > 0:
            raise StartupError("--metrics-interval must be positive")
        if args.metrics_file is not None:
            try:
                check_metrics_path(args.metrics_file)
            except ValueError as exc:
                raise StartupError(str(exc)) from None
        prepare_state_dir(args.state_dir)
        lock = lock_state_dir(args.state_dir)
        if args.journal_segment_size is not None:
            try:
                backend = backend_cls(args.state_dir, segment_bytes=args.journal_segment_size)  # type: ignore[call-arg]
            except TypeError:
                raise StartupError(f"backend {args.backend!r} takes no --journal-segment-size") from None
        else:
            backend = backend_cls(args.state_dir)
        applier = Applier.over(backend, boot_id=args.boot_id or read_boot_id(), admission=MemoryBudget())
        applier.restore()
        transport = make_transport(args.listen)
        cluster = None
        if corosync is not None:
            from .cluster import ClusterNode, ClusterTransport

            cluster = ClusterNode(args.state_dir, applier.engine.boot_id, args.fence_command, *corosync,
                                  volatile=args.backend == "memory")
            transport = ClusterTransport(transport, cluster)
    except refused as exc:
        log.error("cannot start: %s", exc, extra=PLAIN)
        if backend is not None:
            backend.close()
        if corosync is not None:
            for part in corosync:
                part.close()
        return 2
    try:
        capture = CaptureWriter(str(args.capture), transport.name) if args.capture else None
    except OSError as exc:
        log.error("cannot start: --capture %s: %s", args.capture, exc.strerror, extra=PLAIN)
        transport.close()
        backend.close()
        if lock:
            lock.release()
        return 2
    metrics = Metrics(args.metrics_file, args.metrics_interval, args.state_dir) if args.metrics_file else None
    daemon = Daemon(applier, transport, capture, checkpoint_age=args.checkpoint_age, metrics=metrics)
    if cluster is not None:
        cluster.send = daemon.send

        def cluster_failed(exc: BaseException) -> None:
            # A bug in the cluster thread stops the daemon, as one in the request loop does.
            if daemon.loop_error is None:
                daemon.loop_error = exc
            daemon.request_stop(0, None)

        cluster.fatal = cluster_failed
        if capture is not None:
            def record(frame: bytes) -> None:
                with daemon.send_lock:
                    capture.write(TO_DAEMON, frame)

            transport.record = record  # type: ignore[attr-defined]
        if metrics is not None:
            metrics.cluster = cluster
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)

    def ready() -> None:
        log.info("dm-ulogd %s ready: backend %s, state dir %s, %d log(s) restored, boot id %s",
                 __version__, args.backend, args.state_dir, len(applier.table), applier.engine.boot_id)
        sd_notify("READY=1")
        if args.ready_file:
            args.ready_file.write_text(f"{os.getpid()}\n")

    try:
        return daemon.run(ready, stopping=lambda: sd_notify("STOPPING=1"))
    finally:
        if lock:
            lock.release()
