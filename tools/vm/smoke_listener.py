#!/usr/bin/env python3
"""Stand-alone dm-log-userspace listener: the harness's self-test (stdlib only, not the product).

It joins netlink connector group 7, answers every request of the kernel's ``userspace`` dirty log
with a minimal in-memory core log (enough for a mirror to be created, resynced, written, suspended,
reloaded and removed), and records what the kernel sent:

* ``--trace FILE``: one line per request:
  ``<uptime> seq=<n> <TYPE> luid=<hex> uuid=<uuid> size=<data_size> [<payload summary>] -> <error>``
* ``--capture FILE``: every datagram in both directions. File = ``b"ULOGVMCAP1\\n"`` then records of
  ``struct.pack("<dBI", time, direction, length)`` + the datagram (direction 0 = kernel to us,
  1 = us to kernel). The datagram is the whole netlink message (nlmsghdr + cn_msg + request).
* ``--summary FILE``: JSON with request counts per type and the type sequence (run-length encoded).
* ``--ready-file FILE`` is created once the socket has joined the group.

It logs lifecycle events and ``resync region <N>`` to stderr, like dm-ulogd. SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

NETLINK_CONNECTOR = 11
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG = 7, 1
NLMSG_DONE = 3
NLMSGHDR = struct.Struct("=IHHII")
CN_MSG = struct.Struct("=IIIIHH")
REQUEST = struct.Struct("=Q129s3sIiIII")

TYPES = {
    1: "CTR", 2: "DTR", 3: "PRESUSPEND", 4: "POSTSUSPEND", 5: "RESUME", 6: "GET_REGION_SIZE",
    7: "IS_CLEAN", 8: "IN_SYNC", 9: "FLUSH", 10: "MARK_REGION", 11: "CLEAR_REGION",
    12: "GET_RESYNC_WORK", 13: "SET_REGION_SYNC", 14: "GET_SYNC_COUNT", 15: "STATUS_INFO",
    16: "STATUS_TABLE", 17: "IS_REMOTE_RECOVERING",
}
DIRECT = {"CTR", "DTR", "PRESUSPEND", "POSTSUSPEND", "RESUME", "GET_REGION_SIZE"}


def uptime() -> float:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except OSError:
        return time.monotonic()


def say(msg: str) -> None:
    print(f"[{uptime():.2f}] smoke-listener: {msg}", file=sys.stderr, flush=True)


@dataclass
class Log:
    uuid: str
    luid: int
    ctr: str
    region_size: int
    region_count: int
    log_type: str
    device: str | None = None
    suspended: bool = True
    sync: list[bool] = field(default_factory=list)
    clean: list[bool] = field(default_factory=list)
    recovering: set[int] = field(default_factory=set)
    cursor: int = 0

    def first_unsynced(self) -> int:
        return next((r for r, s in enumerate(self.sync) if not s), self.region_count)


@dataclass
class CtrArgs:
    length: int
    log_type: str
    device: str | None
    region_size: int
    nosync: bool


def parse_ctr(payload: bytes) -> CtrArgs:
    words = payload.rstrip(b"\0").decode().split()
    length, log_type = int(words[0]), words[1]
    rest = words[2:]
    device = None
    if log_type == "clustered-disk":
        device, rest = rest[0], rest[1:]
    return CtrArgs(length, log_type, device, int(rest[0]), "nosync" in rest)


class Listener:
    def __init__(self, trace: Path | None, capture: Path | None) -> None:
        self.logs: dict[tuple[str, int], Log] = {}
        self.counts: dict[str, int] = {}
        self.sequence: list[list[object]] = []
        self.trace = trace.open("a") if trace else None
        self.capture = capture.open("wb") if capture else None
        if self.capture:
            self.capture.write(b"ULOGVMCAP1\n")
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((0, 0))
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, CN_IDX_DM)

    def cap(self, direction: int, frame: bytes) -> None:
        if self.capture:
            self.capture.write(struct.pack("<dBI", time.time(), direction, len(frame)) + frame)
            self.capture.flush()

    def serve(self, stop: list[bool]) -> None:
        while not stop[0]:
            try:
                frame = self.sock.recv(65536)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    say("ENOBUFS: requests were lost")
                    continue
                if stop[0]:
                    break
                raise
            self.cap(0, frame)
            reply = self.handle(frame)
            if reply is not None:
                self.cap(1, reply)
                self.sock.sendto(reply, (0, 0))

    def handle(self, frame: bytes) -> bytes | None:
        if len(frame) < NLMSGHDR.size + CN_MSG.size + REQUEST.size:
            return None
        idx, val, _cseq, _ack, clen, _flags = CN_MSG.unpack_from(frame, NLMSGHDR.size)
        if (idx, val) != (CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG) or clen < REQUEST.size:
            return None
        off = NLMSGHDR.size + CN_MSG.size
        luid, uuid_b, _pad, version, _err, seq, rtype, size = REQUEST.unpack_from(frame, off)
        payload = frame[off + REQUEST.size : off + REQUEST.size + size]
        uuid = uuid_b.split(b"\0", 1)[0].decode(errors="replace")
        name = TYPES.get(rtype & 0xFF, f"TYPE{rtype & 0xFF}")
        self.counts[name] = self.counts.get(name, 0) + 1
        if self.sequence and self.sequence[-1][0] == name:
            self.sequence[-1][1] = int(self.sequence[-1][1]) + 1  # type: ignore[call-overload]
        else:
            self.sequence.append([name, 1])
        error, data, note = self.answer(name, uuid, luid, payload)
        if self.trace:
            self.trace.write(f"{uptime():.3f} seq={seq} {name} luid={luid:#x} uuid={uuid} size={size}"
                             f" v={version}{' ' + note if note else ''} -> error={error} reply={len(data)}\n")
            self.trace.flush()
        head = REQUEST.pack(luid, uuid_b, b"\0\0\0", version, error, seq, rtype, len(data))
        body = head + data
        cn = CN_MSG.pack(CN_IDX_DM, CN_VAL_DM_USERSPACE_LOG, 0, 0, len(body), 0)
        nl_len = NLMSGHDR.size + CN_MSG.size + len(body)
        msg = NLMSGHDR.pack(nl_len, NLMSG_DONE, 0, 0, os.getpid()) + cn + body
        return msg + b"\0" * (-len(msg) % 4)

    def answer(self, name: str, uuid: str, luid: int, p: bytes) -> tuple[int, bytes, str]:
        key = (uuid, luid)
        lg = self.logs.get(key)
        if name == "CTR":
            text = p.decode(errors="replace")
            note = repr(text)
            if lg is None:
                a = parse_ctr(p)
                count = -(-a.length // a.region_size)
                lg = Log(uuid, luid, text, a.region_size, count, a.log_type, a.device,
                         sync=[a.nosync] * count, clean=[True] * count)
                self.logs[key] = lg
                say(f"constructed {uuid} luid={luid:#x} regions={count} ({text!r})")
            else:
                say(f"CTR again for {uuid} luid={luid:#x} ({text!r})")
            return 0, b"", note
        if lg is None:
            if name in DIRECT:
                return 0, b"", "unknown log"
            return -errno.ESRCH, b"", "unknown log"
        r = struct.unpack_from("<Q", p)[0] if len(p) >= 8 else -1
        if name == "DTR":
            del self.logs[key]
            say(f"destroyed {uuid} luid={luid:#x}")
        elif name == "RESUME":
            lg.cursor = 0
            lg.recovering.clear()
            old = next((o for o in self.logs.values() if o.uuid == uuid and o is not lg and o.suspended
                        and o.region_count == lg.region_count), None)
            if old is not None and lg.suspended and not any(lg.sync):
                # table swap (reload with the same uuid): take over the suspended instance's bitmaps
                lg.sync, lg.clean = list(old.sync), list(old.clean)
                say(f"luid={luid:#x} takes over the state of luid={old.luid:#x}")
            lg.suspended = False
            say(f"resumed {uuid} luid={luid:#x}")
        elif name in ("PRESUSPEND", "POSTSUSPEND"):
            lg.suspended = True
            say(f"{name.lower()} {uuid} luid={luid:#x}")
        elif name == "GET_REGION_SIZE":
            return 0, struct.pack("<Q", lg.region_size), ""
        elif name == "IS_CLEAN":
            return 0, struct.pack("<q", int(lg.clean[r])), f"r={r}"
        elif name == "IN_SYNC":
            return 0, struct.pack("<q", int(lg.sync[r])), f"r={r}"
        elif name in ("FLUSH", "MARK_REGION", "CLEAR_REGION"):
            regions = list(struct.unpack(f"<{len(p) // 8}Q", p[: len(p) // 8 * 8]))
            for reg in regions:
                lg.clean[reg] = name == "CLEAR_REGION"
            return 0, b"", f"regions={regions}" if regions else ""
        elif name == "GET_RESYNC_WORK":
            for reg in range(lg.cursor, lg.region_count):
                if not lg.sync[reg] and reg not in lg.recovering:
                    lg.recovering.add(reg)
                    lg.cursor = reg + 1
                    say(f"resync region {reg} of {uuid} luid={luid:#x}")
                    return 0, struct.pack("<qQ", 1, reg), f"work={reg}"
            lg.cursor = lg.region_count
            return 0, struct.pack("<qQ", 0, 0), "work=none"
        elif name == "SET_REGION_SYNC":
            reg, in_sync = struct.unpack_from("<Qq", p)
            lg.sync[reg] = bool(in_sync)
            lg.recovering.discard(reg)
            return 0, b"", f"r={reg} in_sync={in_sync}"
        elif name == "GET_SYNC_COUNT":
            n = sum(lg.sync)
            return 0, struct.pack("<Q", n), f"count={n}"
        elif name == "STATUS_INFO":
            if lg.device:
                return 0, f"3 {lg.log_type} {lg.device} A".encode() + b"\0", ""
            return 0, f"1 {lg.log_type}".encode() + b"\0", ""
        elif name == "IS_REMOTE_RECOVERING":
            hint = lg.first_unsynced()
            return 0, struct.pack("<qQ", 0, hint), f"r={r} hint={hint}"
        else:
            return -errno.EINVAL, b"", "unsupported"
        return 0, b"", ""

    def summary(self) -> dict[str, object]:
        return {"requests": sum(self.counts.values()), "counts": self.counts, "sequence": self.sequence}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ready-file", type=Path, required=True)
    ap.add_argument("--trace", type=Path)
    ap.add_argument("--capture", type=Path)
    ap.add_argument("--summary", type=Path)
    args = ap.parse_args()
    stop = [False]

    def on_term(_signo: int, _frame: object) -> None:
        stop[0] = True
        raise InterruptedError

    listener = Listener(args.trace, args.capture)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    args.ready_file.write_text(f"{os.getpid()}\n")
    say(f"listening on netlink connector group {CN_IDX_DM}, pid {os.getpid()}")
    with contextlib.suppress(InterruptedError):
        listener.serve(stop)
    if args.summary:
        args.summary.write_text(json.dumps(listener.summary(), indent=1) + "\n")
    say(f"stopped after {listener.summary()['requests']} requests; logs left: {len(listener.logs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
