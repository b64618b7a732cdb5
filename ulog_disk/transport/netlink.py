"""The kernel's transport: the netlink connector, multicast group 7 (protocol ref §1.1-§1.3).

The hot path is a raw ``AF_NETLINK`` socket read with ``recvfrom``: it gives the sender's
portid (the kernel is 0; anything else is a userspace process and is dropped), costs one
syscall per request, and leaves the framing to :mod:`ulog_disk.protocol.wire`. docs/transport.md has the
measurements behind not using pyroute2's socket classes here.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from ..protocol import wire
from . import Counters, Frame

log = logging.getLogger("ulog_disk.transport.netlink")

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_DROP_MEMBERSHIP = 2
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33
RCVBUF_BYTES = 8 * 1024 * 1024


@dataclass
class NetlinkCounters(Counters):
    dropped_foreign_sender: int = 0
    dropped_not_connector: int = 0
    overruns: int = 0


class GroupTaken(RuntimeError):
    """Another process already listens on the dm-log-userspace connector group."""


def group7_listeners() -> list[int]:
    """Netlink portids (usually pids) of sockets in connector group 7, from /proc/net/netlink."""
    found = []
    try:
        with open("/proc/net/netlink") as f:
            next(f)
            for line in f:
                cols = line.split()
                if len(cols) < 4:
                    continue
                proto, portid, groups = int(cols[1]), int(cols[2]), int(cols[3], 16)
                if proto == wire.NETLINK_CONNECTOR and groups & (1 << (wire.CN_IDX_DM - 1)):
                    found.append(portid)
    except (OSError, StopIteration, ValueError):
        return []
    return found


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


class NetlinkTransport:
    name = "netlink"

    def __init__(self) -> None:
        self.counters = NetlinkCounters()
        others = group7_listeners()
        if others:
            who = ", ".join(f"portid {p} ({process_name(p)})" for p in others)
            raise GroupTaken(
                f"another process already listens for dm-log-userspace requests on netlink "
                f"connector group 7: {who}; stop it (cmirrord?) first — two servers would both "
                f"answer every request"
            )
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, wire.NETLINK_CONNECTOR)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
        # bind() takes a group *mask*; joining by number is the only way to get exactly group 7.
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, wire.CN_IDX_DM)
        sock.setblocking(False)
        self.sock = sock
        log.info("listening on netlink connector group %d (id %d,%d)", wire.CN_IDX_DM,
                 wire.CN_IDX_DM, wire.CN_VAL_DM_USERSPACE_LOG)

    def attach(self, selector: selectors.BaseSelector) -> None:
        selector.register(self.sock, selectors.EVENT_READ, self)

    def readable(self, key: selectors.SelectorKey, selector: selectors.BaseSelector) -> Iterator[Frame]:
        # Read as the loop takes them: each request is answered before the next recvfrom, and
        # the one that finds the queue empty (a syscall and a Python exception) comes after the
        # last reply, not in front of it.
        return self._frames()

    def queued(self) -> list[Frame]:
        return self.receive()

    def stop_receiving(self, selector: selectors.BaseSelector) -> None:
        """Leave group 7: from now on the kernel's sends fail at once with -ESRCH (and its
        reconnect loop waits for the next daemon) instead of queueing requests nobody will
        answer. What is already queued can still be read and answered."""
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(self.sock)
        try:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, wire.CN_IDX_DM)
        except OSError as exc:
            log.warning("could not leave netlink group %d: %s", wire.CN_IDX_DM, exc)

    def receive(self) -> list[Frame]:
        """Drain what is queued: [(connector payload, reply address)]."""
        return list(self._frames())

    def _frames(self) -> Iterator[Frame]:
        """What is queued, read one datagram at a time as the caller takes the frames."""
        while True:
            try:
                data, (portid, _groups) = self.sock.recvfrom(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # The receive queue overflowed: requests were lost; the kernel resends them
                    # after its 15 s timeout. Not fatal.
                    self.counters.overruns += 1
                    log.warning("netlink receive queue overran: requests lost, the kernel will resend")
                    continue
                raise
            if portid != 0:
                self.counters.dropped_foreign_sender += 1
                log.warning("dropped a frame from userspace netlink portid %d (only the kernel may "
                            "send requests)", portid)
                continue
            try:
                nl_type, payload = wire.strip_nlmsghdr(data)
            except wire.FrameError as exc:
                self.counters.dropped_not_connector += 1
                log.warning("dropped a netlink datagram: %s", exc)
                continue
            if nl_type != wire.NLMSG_DONE:
                self.counters.dropped_not_connector += 1
                continue
            self.counters.received += 1
            yield payload, None

    def send(self, payload: bytes, address: object) -> None:
        try:
            self.sock.sendto(wire.add_nlmsghdr(payload, pid=os.getpid()), (0, 0))
            self.counters.sent += 1
        except OSError as exc:
            self.counters.send_errors += 1
            log.error("could not send a reply to the kernel: %s", exc)

    def close(self) -> None:
        self.sock.close()
