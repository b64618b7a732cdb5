#!/usr/bin/env python3
"""Requests and replies in dm-ulogd capture files, read with the package's own definitions.

    capture_scan.py luids UUID FILE...     # distinct luids (hex) seen with UUID, in order of appearance
    capture_scan.py headers UUID FILE...   # "luid seq type data_size" of every request with UUID
    capture_scan.py errors FILE...         # "type errno luid uuid" of every reply with an error

Formats: ``formats/capture.md`` (container) and ``formats/wire.md`` (frames); no layout is repeated
here. A truncated last record (the daemon was killed while writing it) is skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from ulog_disk import wire
from ulog_disk.capture import FROM_DAEMON, TO_DAEMON, CaptureFormatError, CaptureRecord, read_capture


def records(files: list[str]) -> Iterator[CaptureRecord]:
    for name in files:
        try:
            yield from read_capture(Path(name).read_bytes())
        except CaptureFormatError as exc:
            print(f"{name}: {exc}", file=sys.stderr)


def requests(files: list[str], uuid: str) -> Iterator[wire.Request]:
    for rec in records(files):
        if rec.direction != TO_DAEMON:
            continue
        try:
            req = wire.decode_frame(rec.frame)
        except wire.FrameError:
            continue
        if req.uuid == uuid:
            yield req


def errors(files: list[str]) -> Iterator[str]:
    """Error replies, paired with their request (by seq) for the type and log."""
    for name in files:
        pending: dict[int, wire.Request] = {}
        for rec in records([name]):
            if rec.direction == TO_DAEMON:
                try:
                    req = wire.decode_frame(rec.frame)
                except wire.FrameError:
                    continue
                pending[req.seq] = req
            elif rec.direction == FROM_DAEMON:
                reply = wire.decode_reply(rec.frame)
                req = pending.pop(reply.seq, None)
                if reply.error:
                    kind = wire.RequestType(req.request_type).name if req and req.kind else "?"
                    where = f"{req.luid:#x} {req.uuid}" if req else "? ?"
                    yield f"{kind} {-reply.error} {where}"


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("luids", "headers", "errors"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "errors":
        for line in errors(argv[1:]):
            print(line)
        return 0
    cmd, uuid, files = argv[0], argv[1], argv[2:]
    seen: list[int] = []
    for req in requests(files, uuid):
        if cmd == "headers":
            print(f"{req.luid:#x} {req.seq} {req.request_type} {len(req.data)}")
        elif req.luid not in seen:
            seen.append(req.luid)
            print(f"{req.luid:#x}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
