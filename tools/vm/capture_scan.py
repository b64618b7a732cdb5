#!/usr/bin/env python3
"""Requests and replies in dm-ulogd capture files, read with the package's own definitions.

    capture_scan.py luids UUID FILE...     # distinct luids (hex) seen with UUID, in order of appearance
    capture_scan.py headers UUID FILE...   # "luid seq type data_size" of every request with UUID
    capture_scan.py errors FILE...         # "type errno luid uuid" of every reply with an error
    capture_scan.py latency FILE...        # key=value: requests, unanswered, slowest reply (received ->
                                           # sent, seconds) and its type
    capture_scan.py resends DMESG FILE...  # key=value: the kernel's timed-out requests ("Request timed
                                           # out: [TYPE/SEQ] - retrying" in DMESG), how many of them and
                                           # of their resends the daemon received and answered
    capture_scan.py flushed UUID SECONDS FILE...   # wait (at most SECONDS) until the last request of
                                           # UUID that changes its log is a FLUSH without payload (an
                                           # integrated_flush log's delayed flush); prints the seconds
                                           # waited; exit 1 if it did not come

Formats: ``formats/capture.md`` (container) and ``formats/wire.md`` (frames); no layout is repeated
here. A truncated last record (the daemon was killed while writing it) is skipped.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ulog_disk.protocol import wire
from ulog_disk.protocol.capture import FROM_DAEMON, TO_DAEMON, CaptureFormatError, CaptureRecord, read_capture


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


@dataclass
class Exchange:
    request: wire.Request
    received_ns: int
    replied_ns: int | None = None
    reply_error: int = 0


def exchanges(files: list[str]) -> list[Exchange]:
    """Every request with the time the daemon read it and the time it sent the reply (None if it
    never did); each file is one daemon run (a seq is unique within one kernel boot)."""
    out: list[Exchange] = []
    for name in files:
        waiting: dict[int, Exchange] = {}
        for rec in records([name]):
            if rec.direction == TO_DAEMON:
                try:
                    req = wire.decode_frame(rec.frame)
                except wire.FrameError:
                    continue
                ex = Exchange(req, rec.time_ns)
                waiting[req.seq] = ex
                out.append(ex)
            elif rec.direction == FROM_DAEMON:
                try:
                    reply = wire.decode_reply(rec.frame)
                except wire.FrameError:
                    continue
                if (ex := waiting.pop(reply.seq, None)) is not None:
                    ex.replied_ns, ex.reply_error = rec.time_ns, reply.error
    return out


def errors(files: list[str]) -> Iterator[str]:
    """Error replies, with their request's type and log."""
    for ex in exchanges(files):
        if ex.reply_error:
            req = ex.request
            kind = type_name(req.request_type) if req.kind else "?"
            yield f"{kind} {-ex.reply_error} {req.luid:#x} {req.uuid}"


def type_name(request_type: int) -> str:
    try:
        return wire.RequestType(request_type).name
    except ValueError:
        return str(request_type)


def latency(files: list[str]) -> dict[str, str]:
    all_ex = exchanges(files)
    answered = [(ex.replied_ns - ex.received_ns, ex) for ex in all_ex if ex.replied_ns is not None]
    slowest = max(answered, key=lambda pair: pair[0], default=None)
    return {
        "requests": str(len(all_ex)),
        "unanswered": str(len(all_ex) - len(answered)),
        "max_reply_seconds": "n/a" if slowest is None else f"{slowest[0] / 1e9:.3f}",
        "max_reply_type": "n/a" if slowest is None else type_name(slowest[1].request.request_type),
    }


#: dm-log-userspace-transfer.c: DMWARN("[%s] Request timed out: [%u/%u] - retrying", uuid, type, seq)
TIMED_OUT = re.compile(r"Request timed out: \[(\d+)/(\d+)\] - retrying")


def resends(dmesg: str, files: list[str]) -> dict[str, str]:
    """The kernel resends a timed-out request with a new seq and the same log, type and payload:
    for each one it gave up on, find the original and that resend among what the daemon read."""
    timed_out = [(int(t), int(s)) for t, s in TIMED_OUT.findall(dmesg)]
    all_ex = exchanges(files)
    by_seq = {ex.request.seq: i for i, ex in enumerate(all_ex)}
    originals_received = originals_answered = resends_received = resends_answered = 0
    for request_type, seq in timed_out:
        i = by_seq.get(seq)
        if i is None or all_ex[i].request.request_type != request_type:
            continue
        original = all_ex[i]
        originals_received += 1
        originals_answered += original.replied_ns is not None
        again = next((ex for ex in all_ex[i + 1:]
                      if (ex.request.luid, ex.request.uuid, ex.request.request_type, ex.request.data)
                      == (original.request.luid, original.request.uuid, request_type, original.request.data)),
                     None)
        if again is not None:
            resends_received += 1
            resends_answered += again.replied_ns is not None
    return {
        "timed_out": str(len(timed_out)),
        "originals_received": str(originals_received),
        "originals_answered": str(originals_answered),
        "resends_received": str(resends_received),
        "resends_answered": str(resends_answered),
    }


#: Requests that change a log: after the last of them, an integrated_flush log is settled when it
#: is a FLUSH without payload. dm-log-userspace sends one 3 s after CLEAR_REGIONs that no mark
#: followed (its delayed flush work); a mark travels in a FLUSH's payload instead.
CHANGES_LOG = {wire.RequestType.FLUSH, wire.RequestType.MARK_REGION, wire.RequestType.CLEAR_REGION,
               wire.RequestType.SET_REGION_SYNC}


def flushed(uuid: str, limit: float, files: list[str]) -> float | None:
    """Seconds until the capture shows ``uuid``'s delayed flush as its last change, or None."""
    t0 = time.monotonic()
    while True:
        last = None
        for req in requests(files, uuid):
            if req.request_type in CHANGES_LOG:
                last = req
        if last is not None and last.request_type == wire.RequestType.FLUSH and not last.data:
            return time.monotonic() - t0
        if time.monotonic() - t0 > limit:
            return None
        time.sleep(0.2)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("luids", "headers", "errors", "latency", "resends", "flushed") or (
            argv[0] == "resends" and len(argv) < 3) or (argv[0] == "flushed" and len(argv) < 4):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "flushed":
        waited = flushed(argv[1], float(argv[2]), argv[3:])
        print("none" if waited is None else f"{waited:.1f}")
        return 0 if waited is not None else 1
    if argv[0] == "errors":
        for line in errors(argv[1:]):
            print(line)
        return 0
    if argv[0] in ("latency", "resends"):
        values = (latency(argv[1:]) if argv[0] == "latency"
                  else resends(Path(argv[1]).read_text(errors="replace"), argv[2:]))
        for key, value in values.items():
            print(f"{key}={value}")
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
