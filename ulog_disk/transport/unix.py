"""A unix-socket transport carrying exactly the connector payload the kernel sends.

``SOCK_SEQPACKET`` keeps datagram boundaries, so one packet is one frame
(``cn_msg`` + ``dm_ulog_request`` + data, no ``nlmsghdr``) both ways. Used by the kernel model in
tests, benchmarks and the demo; everything above the transport is the same code the kernel
drives. Only root and the daemon's own uid may connect (``SO_PEERCRED``); the socket file is 0600.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import selectors
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from termios import FIONREAD

from . import Counters, Frame

log = logging.getLogger("ulog_disk.transport.unix")

MAX_FRAME = 65536


@dataclass
class UnixCounters(Counters):
    rejected_peers: int = 0


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class UnixTransport:
    name = "unix"

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.counters = UnixCounters()
        if self.path.is_socket():
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)
        try:
            listener.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        listener.listen(64)
        listener.setblocking(False)
        self.listener = listener
        self.connections: dict[int, socket.socket] = {}
        self.allowed_uids = {0, os.geteuid()}
        log.info("listening on unix:%s", self.path)

    def attach(self, selector: selectors.BaseSelector) -> None:
        selector.register(self.listener, selectors.EVENT_READ, self)

    def readable(self, key: selectors.SelectorKey, selector: selectors.BaseSelector) -> Iterator[Frame]:
        if key.fileobj is self.listener:
            conn = self.accept()
            if conn is not None:
                selector.register(conn, selectors.EVENT_READ, self)
            return iter(())
        assert isinstance(key.fileobj, socket.socket)
        return self._frames(key.fileobj, key.fd, selector)

    def _frames(self, conn: socket.socket, fd: int, selector: selectors.BaseSelector | None,
                to_the_end: bool = False) -> Iterator[Frame]:
        """The frames queued on one connection, read as the caller takes them: a request is
        answered before the next is looked for. After a frame the bytes still queued are asked
        for (``FIONREAD``, which counts every queued message of a ``SOCK_SEQPACKET`` socket), not
        read until ``recv`` fails: one request at a time is the common case, and the failing
        ``recv`` was a syscall and a Python exception in front of every request's reply.
        Whatever that leaves (zero-length messages, a hang-up) keeps the socket readable, so the
        loop's next turn reads it. ``to_the_end`` (the stop): read until ``recv`` finds nothing;
        ``selector``: where a hung-up connection is unregistered (None: nowhere)."""
        while True:
            try:
                data = conn.recv(MAX_FRAME)
            except BlockingIOError:
                return
            except OSError:
                data, hung_up = b"", True
            else:
                # A zero-length SOCK_SEQPACKET message reads as b"" like the end of the
                # connection: only a hang-up the socket reports ends it. An empty message is a
                # frame like any other (the daemon counts and logs it as unanswerable).
                hung_up = not data and _hung_up(conn)
            if hung_up:
                self.connections.pop(fd, None)
                conn.close()
                if selector is not None:
                    selector.unregister(fd)  # the socket is closed: by its number
                return
            self.counters.received += 1
            yield data, conn
            if not to_the_end and _ioctl(fd, FIONREAD, _NONE) == _NONE:
                return  # nothing more queued

    def queued(self) -> list[Frame]:
        frames: list[Frame] = []
        for fd, conn in list(self.connections.items()):
            frames += self._frames(conn, fd, None, to_the_end=True)
        return frames

    def stop_receiving(self, selector: selectors.BaseSelector) -> None:
        """Accept no new peers; connected ones are drained and answered by the daemon."""
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(self.listener)
        self.listener.close()

    def accept(self) -> socket.socket | None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return None
        uid = peer_uid(conn)
        if uid not in self.allowed_uids:
            self.counters.rejected_peers += 1
            log.warning("refused a unix connection from uid %d (only root and uid %d may talk to "
                        "the daemon)", uid, os.geteuid())
            conn.close()
            return None
        conn.setblocking(False)
        self.connections[conn.fileno()] = conn
        return conn

    def send(self, payload: bytes, address: object) -> None:
        conn = address
        assert isinstance(conn, socket.socket)
        try:
            conn.send(payload)
            self.counters.sent += 1
        except OSError as exc:
            # The peer went away; its requests die with it, as a kernel caller's would.
            self.counters.send_errors += 1
            log.debug("reply to a closed unix peer dropped: %s", exc)

    def close(self) -> None:
        for conn in self.connections.values():
            conn.close()
        if self.listener.fileno() >= 0:
            self.listener.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


_ioctl = fcntl.ioctl
#: ``FIONREAD``'s answer (an int) when no byte is queued.
_NONE = bytes(4)


def _hung_up(conn: socket.socket) -> bool:
    poller = select.poll()
    poller.register(conn, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in poller.poll(0))
