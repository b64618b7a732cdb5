"""A model of the kernel side, for tests, benchmarks and the demo.

It talks to dm-ulogd over the unix transport with the same frames the kernel sends, and it
behaves as the kernel code does (protocol ref §1.5-§1.7, §3.3, §4):

* :class:`KernelConnection` is ``dm-log-userspace-transfer.c``: one global sequence counter,
  replies matched on ``seq`` (or ``cn_msg.seq`` in the ACK form), the caller's reply buffer size
  enforced (-ENOSPC), a resend with a new seq after a timeout (15 s in the kernel; configurable),
  -EAGAIN answered by a resend.
* :class:`UserspaceLog` is ``dm-log-userspace-base.c``: CTR + GET_REGION_SIZE, queued marks and
  clears sent at flush as CLEAR groups then MARK groups (≤ 32) then FLUSH, or with
  ``integrated_flush`` as FLUSH requests carrying the marks, a one-by-one retry when a group
  fails, the -ESRCH reconnect loop (CTR with the constructor string + NUL and no reply buffer,
  then RESUME, then the request again), and the ``in_sync_hint`` that stops resync questions.
* :class:`Mirror` is the part of ``dm-raid1.c`` + ``dm-region-hash.c`` that drives the log: a
  region hash (clean/dirty/nosync/recovering, pending write counts), writes that mark before
  they land, lazy clears, recovery one region at a time, suspend and resume. Its two legs are
  lists of data versions, so tests can check that every in-sync region is identical on both.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import threading
import time
from dataclasses import dataclass, field

from ..protocol import wire
from ..protocol.wire import Request, RequestType

#: The kernel's reply timeout (DM_ULOG_RETRY_TIMEOUT); tests use much less.
KERNEL_TIMEOUT = 15.0
RECONNECT_DELAY = 2.0
DEVICE_NAME_BUFFER = 128


class KernelError(OSError):
    pass


def connect(path: str | os.PathLike[str], timeout: float, pause: float = 0.05) -> socket.socket:
    """A SOCK_SEQPACKET connection to the daemon's unix socket, trying again for ``timeout``
    seconds (a daemon that is starting or restarting has no listener yet)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(os.fspath(path))
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(pause)


@dataclass
class _Waiter:
    seq: int
    max_reply: int
    event: threading.Event = field(default_factory=threading.Event)
    error: int = 0
    data: bytes = b""


class KernelConnection:
    """The transfer layer over a unix SOCK_SEQPACKET connection to the daemon."""

    def __init__(self, path: str, timeout: float = KERNEL_TIMEOUT, connect_timeout: float = 10.0):
        self.path = path
        self.timeout = timeout
        self._seq = itertools.count(1)
        self._waiters: dict[int, _Waiter] = {}
        self._lock = threading.Lock()
        self.resends = 0
        self.sent = 0
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._closed = False
        self._connect(connect_timeout)

    def _connect(self, timeout: float) -> None:
        sock = connect(self.path, timeout)
        self._sock = sock
        self._reader = threading.Thread(target=self._read_loop, args=(sock,), daemon=True)
        self._reader.start()

    def _read_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                return
            try:
                reply = wire.decode_reply(data)
            except wire.FrameError:
                continue  # "Incomplete message received": dropped; the caller times out
            with self._lock:
                waiter = self._waiters.pop(reply.seq, None)
            if waiter is None:
                continue  # a late reply to a resent request: dropped, as the kernel does
            if not reply.ack_form and len(reply.data) > waiter.max_reply:
                waiter.error = -errno.ENOSPC
            else:
                waiter.error = reply.error
                waiter.data = reply.data if not reply.ack_form else b""
            waiter.event.set()

    def reconnect(self, timeout: float = 30.0) -> None:
        """The daemon restarted: open a new connection (the kernel's socket never closes)."""
        if self._sock:
            self._sock.close()
        self._connect(timeout)

    def close(self) -> None:
        self._closed = True
        if self._sock:
            self._sock.close()

    def send_request(self, uuid: str, luid: int, rtype: RequestType, data: bytes = b"",
                     max_reply: int = 0) -> tuple[int, bytes]:
        """``dm_consult_userspace``: send, wait, resend with a new seq on timeout or -EAGAIN.

        Returns (error, data). A send failure (daemon gone) is -ESRCH, as with no listener.
        """
        if len(data) > wire.MAX_REQUEST_DATA:
            return -errno.EINVAL, b""
        while True:
            seq = next(self._seq) & 0xFFFFFFFF
            waiter = _Waiter(seq, max_reply)
            frame = wire.encode_request(Request(
                luid=luid, uuid=uuid, version=wire.DM_ULOG_REQUEST_VERSION, seq=seq,
                request_type=int(rtype), data=data, cn_seq=seq,
            ))
            with self._lock:
                self._waiters[seq] = waiter
            try:
                assert self._sock is not None
                self._sock.send(frame)
                self.sent += 1
            except OSError:
                with self._lock:
                    self._waiters.pop(seq, None)
                return -errno.ESRCH, b""
            if not waiter.event.wait(self.timeout):
                with self._lock:
                    self._waiters.pop(seq, None)
                self.resends += 1
                continue  # "Request timed out ... retrying"
            if waiter.error == -errno.EAGAIN:
                self.resends += 1
                continue
            return waiter.error, waiter.data


class UserspaceLog:
    """One ``userspace`` dirty log as dm-log-userspace-base.c runs it."""

    def __init__(self, conn: KernelConnection, uuid: str, luid: int, ctr: str,
                 integrated_flush: bool = False, reconnect_delay: float = RECONNECT_DELAY):
        self.conn = conn
        self.uuid = uuid
        self.luid = luid
        self.ctr_string = ctr
        self.integrated_flush = integrated_flush
        self.reconnect_delay = reconnect_delay
        self.region_size = 0
        self.region_count = 0
        self.in_sync_hint = 0
        self.mark_list: list[int] = []
        self.clear_list: list[int] = []
        self.delayed_flush_pending = False
        self.device = b""
        self.reconnects = 0
        self.errors: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    # --- transfer ------------------------------------------------------------------------

    def _direct(self, rtype: RequestType, data: bytes = b"", max_reply: int = 0) -> tuple[int, bytes]:
        return self.conn.send_request(self.uuid, self.luid, rtype, data, max_reply)

    def _loop(self, rtype: RequestType, data: bytes = b"", max_reply: int = 0) -> tuple[int, bytes]:
        """``userspace_do_request``: -ESRCH → re-send CTR (+NUL) until it works, RESUME, retry."""
        while True:
            r, out = self._direct(rtype, data, max_reply)
            if r != -errno.ESRCH:
                if r:
                    self.errors.append((rtype.name, r))
                return r, out
            self.reconnects += 1
            while True:
                time.sleep(self.reconnect_delay)
                r, _ = self._direct(RequestType.CTR, self.ctr_string.encode() + b"\0", 0)
                if r == 0:
                    break
            r, _ = self._direct(RequestType.RESUME)
            if r:
                return -errno.ESRCH, b""

    # --- dm_dirty_log_type ---------------------------------------------------------------

    def ctr(self) -> int:
        r, out = self._direct(RequestType.CTR, self.ctr_string.encode(), DEVICE_NAME_BUFFER)
        if r < 0:
            return r
        if out and not out.endswith(b"\0"):
            return -errno.EINVAL
        self.device = out
        r, out = self._direct(RequestType.GET_REGION_SIZE, b"", 8)
        if r:
            return r
        self.region_size = wire.parse_u64(out)
        target_sectors = int(self.ctr_string.split()[0])
        self.region_count = -(-target_sectors // self.region_size)
        return 0

    def dtr(self) -> int:
        if self.delayed_flush_pending:
            self._run_delayed_flush()
        return self._direct(RequestType.DTR)[0]

    def presuspend(self) -> int:
        return self._direct(RequestType.PRESUSPEND)[0]

    def postsuspend(self) -> int:
        if self.delayed_flush_pending:
            self._run_delayed_flush()
        return self._direct(RequestType.POSTSUSPEND)[0]

    def resume(self) -> int:
        self.in_sync_hint = 0
        return self._direct(RequestType.RESUME)[0]

    def is_clean(self, region: int) -> bool:
        r, out = self._loop(RequestType.IS_CLEAN, wire.build_u64(region), 8)
        return r == 0 and wire.parse_s64(out) == 1

    def in_sync(self, region: int) -> bool:
        r, out = self._loop(RequestType.IN_SYNC, wire.build_u64(region), 8)
        return r == 0 and wire.parse_s64(out) == 1

    def mark_region(self, region: int) -> None:
        with self._lock:
            self.mark_list.append(region)

    def clear_region(self, region: int) -> None:
        with self._lock:
            self.clear_list.append(region)

    def _send_group(self, rtype: RequestType, regions: list[int]) -> int:
        r = 0
        for i in range(0, len(regions), wire.MAX_REGIONS_PER_GROUP):
            group = regions[i : i + wire.MAX_REGIONS_PER_GROUP]
            # Within a group the regions are in reverse queueing order (list_add).
            r = self._loop(rtype, wire.build_regions(list(reversed(group))))[0]
            if r:
                break
        if r and rtype is not RequestType.FLUSH:
            # A failed group: the whole list is re-sent one region per request.
            for region in regions:
                r = self._loop(rtype, wire.build_regions([region]))[0]
                if r:
                    return r
        return r

    def flush(self) -> int:
        with self._lock:
            marks, self.mark_list = self.mark_list, []
            clears, self.clear_list = self.clear_list, []
        if not marks and not clears:
            return 0
        r = self._send_group(RequestType.CLEAR_REGION, clears) if clears else 0
        if r:
            return r
        if not self.integrated_flush:
            if marks:
                r = self._send_group(RequestType.MARK_REGION, marks)
                if r:
                    return r
            return self._loop(RequestType.FLUSH)[0]
        if marks:
            self.delayed_flush_pending = False
            return self._send_group(RequestType.FLUSH, marks)
        # Only clears: the kernel schedules a payload-less FLUSH 3 s later (dmlogd); run it at
        # the next flush with marks, at suspend, or at DTR. Modelled as pending.
        self.delayed_flush_pending = True
        return 0

    def _run_delayed_flush(self) -> int:
        self.delayed_flush_pending = False
        return self._loop(RequestType.FLUSH)[0]

    def get_resync_work(self) -> int | None:
        if self.in_sync_hint >= self.region_count:
            return None
        r, out = self._loop(RequestType.GET_RESYNC_WORK, b"", 16)
        if r:
            return None
        have, region = wire.parse_resync_work(out)
        return region if have else None

    def set_region_sync(self, region: int, in_sync: bool) -> None:
        self._loop(RequestType.SET_REGION_SYNC, wire.build_set_region_sync(region, int(in_sync)))

    def get_sync_count(self) -> int:
        r, out = self._loop(RequestType.GET_SYNC_COUNT, b"", 8)
        if r:
            return 0
        count = wire.parse_u64(out)
        if count >= self.region_count:
            self.in_sync_hint = self.region_count
        return count

    def is_remote_recovering(self, region: int) -> bool:
        if region < self.in_sync_hint:
            return False
        r, out = self._loop(RequestType.IS_REMOTE_RECOVERING, wire.build_u64(region), 16)
        if r:
            return True
        recovering, hint = wire.parse_remote_recovering(out)
        self.in_sync_hint = hint
        return bool(recovering)

    def status_info(self) -> str:
        r, out = self._loop(RequestType.STATUS_INFO, b"", 4096)
        if r:
            return "userspace 1 COM_FAILURE"
        return out.rstrip(b"\0").decode()


CLEAN, DIRTY, NOSYNC, RECOVERING = "clean", "dirty", "nosync", "recovering"


class Mirror:
    """The mirror target and its region hash, with two legs of data versions."""

    def __init__(self, log: UserspaceLog, legs: list[list[int]] | None = None):
        self.log = log
        self.hash: dict[int, str] = {}
        self.pending: dict[int, int] = {}
        self.clean_list: list[int] = []
        self.recovery_allowed = False
        self.legs = legs
        self.log_failure = False
        self.recovered: list[int] = []

    def construct(self) -> int:
        r = self.log.ctr()
        if r == 0 and self.legs is None:
            self.legs = [[0] * self.log.region_count, [0] * self.log.region_count]
        return r

    def _state(self, region: int) -> str:
        state = self.hash.get(region)
        if state is None:
            state = CLEAN if self.log.in_sync(region) else NOSYNC
            self.hash[region] = state
        return state

    def write(self, regions: list[int]) -> None:
        """One kmirrord pass over writes: mark, flush, write the legs, complete."""
        for region in regions:
            while self.log.is_remote_recovering(region):
                time.sleep(0.001)
            state = self._state(region)
            if state == CLEAN:
                self.hash[region] = DIRTY
                self.log.mark_region(region)
            self.pending[region] = self.pending.get(region, 0) + 1
        if self.log.flush():
            self.log_failure = True
            return  # handle_errors: the writes are held
        assert self.legs is not None
        for region in regions:
            in_sync = self.hash[region] != NOSYNC
            self.legs[0][region] += 1
            if in_sync:
                for leg in self.legs[1:]:
                    leg[region] = self.legs[0][region]
        self.complete(regions)

    def complete(self, regions: list[int]) -> None:
        for region in regions:
            self.pending[region] -= 1
            if self.pending[region] == 0 and self.hash.get(region) == DIRTY:
                self.clean_list.append(region)

    def update_states(self) -> None:
        """``dm_rh_update_states``: clear regions whose writes finished, then flush."""
        clean, self.clean_list = self.clean_list, []
        for region in clean:
            if self.pending.get(region, 0) == 0:
                self.hash.pop(region, None)
                self.log.clear_region(region)
        if self.log.flush():
            self.log_failure = True

    def recover_one(self) -> bool:
        """``do_recovery``: one region (MAX_RECOVERY = 1). False when there is nothing to do."""
        if not self.recovery_allowed:
            return False
        region = self.log.get_resync_work()
        if region is None:
            self.log.get_sync_count()
            return False
        self.hash[region] = RECOVERING
        assert self.legs is not None
        for leg in self.legs[1:]:
            leg[region] = self.legs[0][region]
        self.recovered.append(region)
        self.log.clear_region(region)
        self.log.set_region_sync(region, True)
        self.hash.pop(region, None)
        self.update_states()
        self.log.get_sync_count()
        return True

    def recover_all(self, limit: int | None = None) -> int:
        n = 0
        while self.recover_one():
            n += 1
            if limit is not None and n >= limit:
                break
        return n

    def presuspend(self) -> None:
        self.recovery_allowed = False
        self.log.presuspend()
        self.update_states()

    def postsuspend(self) -> None:
        self.log.postsuspend()

    def suspend(self) -> None:
        self.presuspend()
        self.postsuspend()

    def resume(self) -> None:
        self.log.resume()
        self.recovery_allowed = True

    def destroy(self) -> None:
        self.log.dtr()

    def status(self) -> str:
        count = self.log.get_sync_count()
        return f"2 {count}/{self.log.region_count} 1 AA {self.log.status_info()}"

    def legs_identical_where_in_sync(self) -> list[int]:
        """Regions that the log calls in sync but whose legs differ (must be empty)."""
        assert self.legs is not None
        bad = []
        for region in range(self.log.region_count):
            if self.legs[0][region] != self.legs[1][region] and self.log.in_sync(region):
                bad.append(region)
        return bad
