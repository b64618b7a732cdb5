"""Clients of the daemon's unix socket that are not the kernel model: no threads, no resends.

:class:`Client` sends one request at a time in the caller's thread, as one kernel thread would
(or many at once with :meth:`Client.many`); :class:`LeanClient` sends prebuilt frames, for load
where the client's own cost must stay out of the figures. The kernel's behaviour (resends,
reconnect, -EAGAIN) is :mod:`ulog_disk.testing.kernelmodel`'s.
"""

from __future__ import annotations

import contextlib
import os
import sys

from ..protocol import wire
from ..protocol.wire import Request, RequestType
from .kernelmodel import connect


class DaemonGone(ConnectionError):
    """The connection failed or was closed: the daemon is gone (or dropped us)."""


class NoReply(TimeoutError):
    """No reply within the client's timeout."""


class RequestFailed(AssertionError):
    """A request that :meth:`Client.ok` expected to succeed was answered an error. An
    AssertionError: to a test, a refused request is a failed expectation."""

    def __init__(self, rtype: int, uuid: str, luid: int, error: int):
        super().__init__(f"{RequestType(rtype).name} uuid={uuid!r} luid={luid:#x}: error {error}")
        self.error = error


class Client:
    """One SOCK_SEQPACKET connection; the connect is tried again for ``connect_timeout`` seconds."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0, connect_timeout: float = 10.0):
        self.sock = connect(path, connect_timeout, pause=0.02)
        self.sock.settimeout(timeout)
        self.seq = 0

    def frame(self, uuid: str, luid: int, rtype: int, data: bytes = b"") -> bytes:
        """The next request's frame (it takes the next seq)."""
        self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
        return wire.encode_request(Request(luid=luid, uuid=uuid, version=wire.DM_ULOG_REQUEST_VERSION,
                                           seq=self.seq, request_type=int(rtype), data=data, cn_seq=self.seq))

    def send_frame(self, frame: bytes) -> None:
        try:
            self.sock.send(frame)
        except OSError as exc:
            raise DaemonGone(str(exc)) from exc

    def recv_reply(self) -> wire.DecodedReply:
        try:
            data = self.sock.recv(65536)
        except TimeoutError as exc:
            raise NoReply("no reply within the timeout") from exc
        except OSError as exc:
            raise DaemonGone(str(exc)) from exc
        if not data:
            raise DaemonGone("EOF")
        return wire.decode_reply(data)

    def request(self, uuid: str, luid: int, rtype: int, data: bytes = b"") -> tuple[int, bytes]:
        """(error, data) of one request."""
        self.send_frame(self.frame(uuid, luid, rtype, data))
        reply = self.recv_reply()
        if reply.seq != self.seq:
            raise AssertionError(f"reply seq {reply.seq} to request seq {self.seq}")
        return reply.error, reply.data

    def ok(self, uuid: str, luid: int, rtype: int, data: bytes = b"") -> bytes:
        """The reply's data; raises :class:`RequestFailed` on an error."""
        error, out = self.request(uuid, luid, rtype, data)
        if error:
            raise RequestFailed(rtype, uuid, luid, error)
        return out

    def many(self, requests: list[tuple[str, int, RequestType, bytes]], window: int = 32) -> list[int | None]:
        """Send ``requests`` (uuid, luid, type, data) keeping at most ``window`` unanswered, as
        the kernel does with requests of many mirrors; return each one's error (0: answered
        successfully), or None for those left unanswered when the connection closed or a reply
        took longer than the socket's timeout (the connection is then unusable: open another).

        The window stays well under what the daemon can send before our receive queue is full
        (its replies would be dropped, not delayed)."""
        results: list[int | None] = [None] * len(requests)
        waiting: dict[int, int] = {}
        i = 0
        try:
            while i < len(requests) or waiting:
                while i < len(requests) and len(waiting) < window:
                    frame = self.frame(*requests[i])
                    waiting[self.seq] = i
                    self.sock.send(frame)
                    i += 1
                data = self.sock.recv(65536)
                if not data:
                    break
                reply = wire.decode_reply(data)
                index = waiting.pop(reply.seq, None)
                if index is not None:
                    results[index] = reply.error
        except OSError:  # timeout, reset, or the daemon gone
            pass
        return results

    def bits(self, uuid: str, luid: int, regions: int) -> tuple[list[int], list[int]]:
        """(IS_CLEAN, IN_SYNC) of every region."""
        def ask(rtype: RequestType) -> list[int]:
            return [wire.parse_s64(self.ok(uuid, luid, rtype, wire.build_u64(r))) for r in range(regions)]

        return ask(RequestType.IS_CLEAN), ask(RequestType.IN_SYNC)

    def sync_count(self, uuid: str, luid: int) -> int:
        return wire.parse_u64(self.ok(uuid, luid, RequestType.GET_SYNC_COUNT))

    def status_info(self, uuid: str, luid: int) -> str:
        return self.ok(uuid, luid, RequestType.STATUS_INFO).rstrip(b"\0").decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class FrameTemplate:
    """One request frame built once with ``wire.encode_request``; each use patches only the two
    sequence numbers and the payload, so a load generator spends almost nothing per request (the
    real kernel's cost per request is a few microseconds in C)."""

    def __init__(self, uuid: str, luid: int, rtype: RequestType, data_len: int = 0):
        frame = wire.encode_request(Request(luid=luid, uuid=uuid, version=wire.DM_ULOG_REQUEST_VERSION,
                                            seq=0x01020304, request_type=rtype, data=bytes(data_len),
                                            cn_seq=0x01020304))
        marker = (0x01020304).to_bytes(4, sys.byteorder)
        self.cn_seq_at = frame.index(marker)
        self.seq_at = frame.index(marker, self.cn_seq_at + 4)
        self.data_at = len(frame) - data_len
        self.buf = bytearray(frame)
        # The error field of a reply's header sits 8 bytes before its seq (wire.UlogHeader).
        self.error_at = self.seq_at - 4
        check = wire.decode_frame(self.build(7, bytes(range(data_len))))
        assert check.seq == 7 and check.cn_seq == 7 and check.data == bytes(range(data_len)), check

    def build(self, seq: int, data: bytes = b"") -> bytes:
        buf = self.buf
        buf[self.cn_seq_at : self.cn_seq_at + 4] = seq.to_bytes(4, sys.byteorder)
        buf[self.seq_at : self.seq_at + 4] = seq.to_bytes(4, sys.byteorder)
        if data:
            buf[self.data_at :] = data
        return bytes(buf)

    def reply_ok(self, reply: bytes) -> bool:
        """A full-form reply with error 0 (the ACK form and errors are not ok)."""
        return len(reply) >= self.data_at and reply[self.error_at : self.error_at + 4] == b"\0\0\0\0"


class LeanClient:
    """Requests for one log from frame templates, one at a time, in the caller's thread: what is
    left of the client's cost is a send and a recv (no kernel-model threads, no construct)."""

    def __init__(self, path: str | os.PathLike[str], uuid: str, luid: int):
        self.sock = Client(path).sock
        self.seq = 0
        self.t = {
            "mark": FrameTemplate(uuid, luid, RequestType.MARK_REGION, 8),
            "flush": FrameTemplate(uuid, luid, RequestType.FLUSH, 0),
            "flush1": FrameTemplate(uuid, luid, RequestType.FLUSH, 8),
            "in_sync": FrameTemplate(uuid, luid, RequestType.IN_SYNC, 8),
        }

    def call(self, kind: str, region: int | None = None) -> None:
        self.seq += 1
        t = self.t[kind]
        self.sock.send(t.build(self.seq, b"" if region is None else region.to_bytes(8, sys.byteorder)))
        if not t.reply_ok(self.sock.recv(65536)):
            raise RuntimeError(f"{kind} failed")

    def mark_flush(self, region: int) -> None:
        self.call("mark", region)
        self.call("flush")

    def close(self) -> None:
        self.sock.close()


def ctr_text(regions: int, region_size: int = 8, log_type: str = "clustered-core", dev: str = "7:3",
             extra: str = "") -> str:
    """A constructor string for ``regions`` regions (target sectors, log type, [device,] region
    size, [sync mode...]); a disk log type names ``dev``."""
    words = [str(regions * region_size), log_type]
    if "disk" in log_type:
        words.append(dev)
    words.append(str(region_size))
    if extra:
        words.append(extra)
    return " ".join(words)
