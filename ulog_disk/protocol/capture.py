"""Capture files: every frame the daemon received and sent, with time (``--capture FILE``).

Layout (formats/capture.md)::

    file   = magic "ULOGCAP1" (8 bytes) | record*
    record = u64 time_ns | u8 direction (0 kernel→daemon, 1 daemon→kernel) | u8 transport
             (0 netlink, 1 unix) | u16 reserved (0) | u32 length | length bytes of connector
             payload (cn_msg + dm_ulog_request + data)

All integers little-endian, so a capture reads the same on any host. A truncated last record
(the daemon was killed while writing it) makes :func:`read_capture` raise
:class:`CaptureFormatError` after yielding every complete record before it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import construct as c

MAGIC = b"ULOGCAP1"
TO_DAEMON = 0
FROM_DAEMON = 1
TRANSPORTS = {"netlink": 0, "unix": 1}

RecordHeader = c.Struct(
    "time_ns" / c.Int64ul,
    "direction" / c.Int8ul,
    "transport" / c.Int8ul,
    "reserved" / c.Const(0, c.Int16ul),
    "length" / c.Int32ul,
)
RECORD_HEADER_SIZE = RecordHeader.sizeof()
_RecordHeaderC = RecordHeader.compile()


@dataclass(slots=True)
class CaptureRecord:
    time_ns: int
    direction: int
    transport: int
    frame: bytes


class CaptureWriter:
    def __init__(self, path: str, transport: str):
        self.file: BinaryIO = open(path, "ab", buffering=0)  # noqa: SIM115 - lives with the daemon
        if self.file.tell() == 0:
            self.file.write(MAGIC)
        self.transport = TRANSPORTS.get(transport, 0)

    def write(self, direction: int, frame: bytes) -> None:
        header = _RecordHeaderC.build(dict(time_ns=time.time_ns(), direction=direction,
                                           transport=self.transport, reserved=0, length=len(frame)))
        # One write per record keeps records whole when the daemon is killed between them.
        self.file.write(header + frame)

    def close(self) -> None:
        self.file.close()


class CaptureFormatError(ValueError):
    pass


def read_capture(data: bytes) -> Iterator[CaptureRecord]:
    if not data.startswith(MAGIC):
        raise CaptureFormatError("not a ulog-disk capture (magic ULOGCAP1 missing)")
    pos = len(MAGIC)
    while pos < len(data):
        if len(data) - pos < RECORD_HEADER_SIZE:
            raise CaptureFormatError(f"truncated record header at byte {pos}")
        try:
            hdr = _RecordHeaderC.parse(data[pos : pos + RECORD_HEADER_SIZE])
        except c.ConstructError as exc:
            raise CaptureFormatError(f"bad record header at byte {pos}: {exc}") from None
        start = pos + RECORD_HEADER_SIZE
        if start + hdr.length > len(data):
            raise CaptureFormatError(f"truncated record at byte {pos}")
        yield CaptureRecord(hdr.time_ns, hdr.direction, hdr.transport, data[start : start + hdr.length])
        pos = start + hdr.length
