#!/usr/bin/env python3
"""Find dm_ulog_request headers in capture files of any framing (stdlib only).

A capture written by dm-ulogd or by smoke_listener.py holds the kernel's requests, and whatever the
container format, each request contains the 160-byte ``struct dm_ulog_request`` header: u64 luid,
then the uuid NUL-padded to 129 bytes, 3 pad bytes, u32 version, s32 error, u32 seq, u32 type,
u32 data_size. Anchoring on the uuid makes the scan independent of the container format::

    capture_scan.py luids UUID FILE...     # distinct luids (hex), one per line, in order of appearance
    capture_scan.py headers UUID FILE...   # "luid seq type data_size" of every header found
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from pathlib import Path

TAIL = struct.Struct("=3sIiIII")  # padding, version, error, seq, request_type, data_size


def headers(data: bytes, uuid: str) -> Iterator[tuple[int, int, int, int]]:
    needle = uuid.encode().ljust(129, b"\0")
    pos = data.find(needle, 8)
    while pos >= 0:
        luid, = struct.unpack_from("=Q", data, pos - 8)
        if pos + 129 + TAIL.size <= len(data):
            pad, version, _error, seq, rtype, size = TAIL.unpack_from(data, pos + 129)
            if pad == b"\0\0\0" and 1 <= version <= 3:
                yield luid, seq, rtype & 0xFF, size
        pos = data.find(needle, pos + 1)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] not in ("luids", "headers"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, uuid, files = argv[0], argv[1], argv[2:]
    seen: list[int] = []
    for f in files:
        for luid, seq, rtype, size in headers(Path(f).read_bytes(), uuid):
            if cmd == "headers":
                print(f"{luid:#x} {seq} {rtype} {size}")
            elif luid not in seen:
                seen.append(luid)
                print(f"{luid:#x}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
