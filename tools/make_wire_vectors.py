#!/usr/bin/env python3
"""Write the golden wire vectors in ``formats/vectors/wire/`` (one JSON file per frame).

Usage::

    .venv/bin/python tools/make_wire_vectors.py [--out DIR] [--capture FILE]

Every frame is built with :mod:`ulog_disk.protocol.wire`'s encoders from the hand-written specs below,
its data from the spec's payload fields through the request table (``requests.REQUESTS``); the
``fields`` of each vector are written from the same specs (not by decoding the bytes), so
``tests/test_wire_vectors.py`` checks two independent things: that decoding the committed hex
gives the committed fields, and that encoding the committed fields gives the committed hex.

The request vectors with an ``engine_step`` form one fixed conversation; the reply vectors with
an ``in_reply_to`` are what the daemon must answer at that point. They are the protocol's
answers written by hand (protocol ref §3.1, §4), not recorded from the engine, so the vector test
that replays the conversation through the engine is a real check of the engine.

``--capture`` (default: the smoke-listener capture of a real 6.1 kernel under
``results/smoke-listener/``) adds ``real-6.1-*`` request vectors: the first request of each type
the real kernel sent, byte for byte, with their netlink datagram. When the capture is missing,
existing ``real-6.1-*`` files are left as they are (the capture directory is not committed).

The JSON is committed: regenerate only when a vector is added or a spec is corrected, and review
the diff.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import construct as c

from ulog_disk.protocol import requests, wire
from ulog_disk.protocol.wire import Reply, Request, RequestType

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "formats" / "vectors" / "wire"
DEFAULT_CAPTURE = ROOT / "results" / "smoke-listener" / "smoke-listener" / "capture.bin"

# The luid of the first request seen on a real 6.1 kernel (shared/reference/qemu-real-kernel.md).
LUID_CORE = 0xFFFF8D8142769400
LUID_DISK = 0xFFFF8D8142769C00
LUID_NOSYNC = 0xFFFF8D8142769800
LUID_FAIL = 0xFFFF8D814276A000
LUID_UNKNOWN = 0xFFFF8D81427FF000
# LVM's dm uuids: "LVM-" + VG uuid (32) + LV uuid (32) = 68 characters.
UUID_CORE = "LVM-hVRmvR0Ub3Oe0qvGmL4P8xbH6aK2uB1vtuZ2ZcWw9GlqYkd3ImQ0t9eJN4r7fS2d"
UUID_DISK = "LVM-hVRmvR0Ub3Oe0qvGmL4P8xbH6aK2uB1vA7pXoLr2sFd9KcE1nY5mTq8wZg3Hj6Vb"
UUID_NOSYNC = "LVM-hVRmvR0Ub3Oe0qvGmL4P8xbH6aK2uB1vQ4mN8bV2xC7zL1kJ9hG5fD3sA6pW0eRt"
#: The vector test serves this uuid with a backend whose commit always fails.
UUID_FAIL = "fail-commit-test"

CTR_CORE = b"32768 clustered-core 1024"
CTR_DISK = b"32768 clustered-disk 7:3 1024"
CTR_NOSYNC = b"2048 clustered-core 64 nosync block_on_error"
CTR_FAIL = b"32768 clustered-disk 7:4 1024"

T = RequestType


@dataclass
class ReqSpec:
    name: str
    note: str
    type: int
    seq: int
    luid: int = LUID_CORE
    uuid: str = UUID_CORE
    data: bytes = b""
    payload: dict = field(default_factory=dict)
    raw_type: int | None = None
    step: int | None = None
    cn_seq: int | None = None


@dataclass
class RepSpec:
    name: str
    note: str
    to: str  # request spec name
    error: int = 0
    data: bytes = b""
    payload: dict = field(default_factory=dict)
    ack: bool = False


def region(r: int) -> dict:
    return {"region": r}


def regions(rs: list[int]) -> dict:
    return {"regions": rs}


def ctr(text: bytes, reconnect: bool = False) -> dict:
    return {"ctr": text.decode("ascii"), "nul_counted": reconnect}


def u64(v: int) -> dict:
    return {"u64": v}


def s64(v: int) -> dict:
    return {"s64": v}


def text(s: str) -> dict:
    return {"text": s, "nul_counted": True}


# --- the conversation ---------------------------------------------------------------------------

_steps: list[ReqSpec] = []
_replies: list[RepSpec] = []


def req(name: str, note: str, type_: int, *, data: dict | None = None, engine: bool = True, **kw) -> str:
    seq = kw.pop("seq", None)
    if seq is None:
        seq = len([s for s in _steps if s.step is not None]) if engine else 0
    payload = data or {}
    spec = ReqSpec(name=name, note=note, type=type_, seq=seq, data=requests.build_payload(type_, payload),
                   payload=payload, **kw)
    if engine:
        spec.step = len([s for s in _steps if s.step is not None])
    _steps.append(spec)
    return name


def rep(name: str, note: str, to: str, *, error: int = 0, data: dict | None = None,
        ack: bool = False) -> None:
    payload = data or {}
    type_ = next(s.type for s in _steps if s.name == to)
    _replies.append(RepSpec(name=name, note=note, to=to, error=error,
                            data=requests.build_payload(type_, payload, reply=True), payload=payload,
                            ack=ack))


def build_conversation() -> None:
    # clustered-core log, 32768 sectors / 1024 = 32 regions. seq = engine step (one global counter,
    # like the kernel's).
    r = req("ctr-initial-core", "Initial CTR as first seen on a real 6.1 kernel (luid, payload, seq 0 as in "
            "shared/reference/qemu-real-kernel.md; the uuid is not recorded there and was chosen): "
            "data_size 25 = string length, NUL not counted.", T.CTR, data=ctr(CTR_CORE))
    rep("reply-ctr-core", "Initial CTR of a core type: success, no device, data_size 0.", r)
    r = req("get-region-size", "Sent once right after CTR (direct, not looped). No payload.",
            T.GET_REGION_SIZE)
    rep("reply-get-region-size", "u64 region size in sectors (8 bytes).", r, data=u64(1024))
    r = req("get-sync-count-before-resume", "kmirrord's first pass on the inactive table, before RESUME.",
            T.GET_SYNC_COUNT)
    rep("reply-get-sync-count-0", "Before the first RESUME a default-sync log reports 0 in-sync regions.",
        r, data=u64(0))
    r = req("status-info-core", "dmsetup status on a clustered-core log. No payload.", T.STATUS_INFO)
    rep("reply-status-info-core", "'1 clustered-core' + NUL, NUL counted in data_size (17).", r,
        data=text("1 clustered-core"))
    r = req("resume", "RESUME: no payload. Recovery starts.", T.RESUME)
    rep("reply-empty-success", "Success with no payload: error 0, data_size 0, cn_msg.len 160.", r)
    r = req("get-resync-work", "First GET_RESYNC_WORK after RESUME. No payload.", T.GET_RESYNC_WORK)
    rep("reply-get-resync-work-0", "{s64 have_work = 1; u64 region = 0}: 16 bytes.", r,
        data={"have_work": 1, "region": 0})
    r = req("in-sync", "IN_SYNC(0): one u64 region.", T.IN_SYNC, data=region(0))
    rep("reply-in-sync-0", "s64 0: region 0 not in sync (8 bytes).", r, data=s64(0))
    r = req("get-resync-work-repeat", "GET_RESYNC_WORK again before SET_REGION_SYNC (e.g. a resend after "
            "a 15 s timeout).", T.GET_RESYNC_WORK)
    rep("reply-get-resync-work-repeat", "The same region is handed out again until SET_REGION_SYNC.", r,
        data={"have_work": 1, "region": 0})
    r = req("set-region-sync", "SET_REGION_SYNC {u64 region 0; s64 in_sync 1}: 16 bytes.", T.SET_REGION_SYNC,
            data={"region": 0, "in_sync": 1})
    rep("reply-set-region-sync", "Success; data_size 0 (the kernel offers no reply buffer).", r)
    r = req("clear-region", "CLEAR_REGION group of one region.", T.CLEAR_REGION, data=regions([0]))
    rep("reply-clear-region", "Success; data_size 0, not the request's 8.", r)
    r = req("flush", "FLUSH without payload (no integrated_flush, or the delayed flush).", T.FLUSH)
    rep("reply-flush", "Success after the commit; data_size 0.", r)
    r = req("is-clean", "IS_CLEAN(0): one u64 region (no caller in current dm-raid1, still answered).",
            T.IS_CLEAN, data=region(0))
    rep("reply-is-clean-1", "s64 1: region 0 is clean (in sync and cleared).", r, data=s64(1))
    r = req("mark-region-group", "MARK_REGION group: 4 regions in reverse queueing order.", T.MARK_REGION,
            data=regions([5, 4, 3, 2]))
    rep("reply-mark-region", "Success; data_size 0, not the request's 32.", r)
    r = req("flush-integrated", "integrated_flush: FLUSH carrying the regions to mark (u64[2]).", T.FLUSH,
            data=regions([7, 6]))
    rep("reply-flush-integrated", "Success after the marks are committed; data_size 0.", r)
    r = req("is-clean-marked", "IS_CLEAN(6) after the integrated flush marked it.", T.IS_CLEAN,
            data=region(6))
    rep("reply-is-clean-0", "s64 0: a marked region is not clean.", r, data=s64(0))
    r = req("is-remote-recovering", "IS_REMOTE_RECOVERING(1): one u64 region.", T.IS_REMOTE_RECOVERING,
            data=region(1))
    rep("reply-is-remote-recovering", "{s64 is_recovering 0; u64 in_sync_hint 1}: region 1 is the first "
        "region not in sync.", r,
        data={"is_recovering": 0, "in_sync_hint": 1})
    r = req("get-sync-count", "GET_SYNC_COUNT during recovery.", T.GET_SYNC_COUNT)
    rep("reply-get-sync-count-1", "u64 1 (region 0 only).", r, data=u64(1))
    r = req("status-table", "STATUS_TABLE: never sent by current kernels, still answered.", T.STATUS_TABLE)
    rep("reply-status-table", "The CTR arguments after the length, a trailing space, NUL counted.", r,
        data=text("clustered-core 1024 "))
    r = req("ctr-reconnect-core", "Reconnect CTR of the -ESRCH loop: same uuid and luid, constructor string "
            "with its NUL counted (data_size 26).", T.CTR, data=ctr(CTR_CORE, reconnect=True))
    rep("reply-ctr-reconnect-core", "Idempotent success; data_size 0 (no reply buffer).", r)
    req("resume-reconnect", "The bare RESUME that follows the reconnect CTR.", T.RESUME)
    r = req("in-sync-type-upper-bits", "IN_SYNC(0) with bits set above the low 8 of request_type "
            "(0x100 | 8): the type is request_type & 0xFF.", T.IN_SYNC, data=region(0), raw_type=0x108)
    rep("reply-in-sync-type-upper-bits", "s64 1; request_type echoed as received (the kernel ignores it).",
        r, data=s64(1))
    r = req("in-sync-out-of-range", "IN_SYNC(32) on a 32-region log.", T.IN_SYNC, data=region(32))
    rep("reply-einval-out-of-range", "error -EINVAL (-22), data_size 0.", r, error=-errno.EINVAL)
    req("clear-region-group-32", "CLEAR_REGION with the largest group the kernel sends: 32 regions.",
        T.CLEAR_REGION, data=regions(list(range(31, -1, -1))))
    r = req("presuspend", "PRESUSPEND: no payload.", T.PRESUSPEND)
    rep("reply-presuspend", "Success, data_size 0.", r)
    r = req("postsuspend", "POSTSUSPEND: no payload.", T.POSTSUSPEND)
    rep("reply-postsuspend", "Success after the commit, data_size 0.", r)
    r = req("dtr", "DTR: no payload (the header comment's argv string is not sent).", T.DTR)
    rep("reply-dtr", "Success, data_size 0.", r)
    r = req("in-sync-unknown-log", "A loop-type request for a (uuid, luid) the daemon does not know "
            "(here: after its DTR).", T.IN_SYNC, data=region(0))
    rep("reply-esrch", "error -ESRCH (-3): the kernel re-sends CTR (+NUL) and RESUME, then retries.", r,
        error=-errno.ESRCH)
    r = req("get-region-size-unknown-log", "A direct request for an unknown log.", T.GET_REGION_SIZE,
            luid=LUID_UNKNOWN)
    rep("reply-einval-unknown-log", "error -EINVAL (-22): direct requests get no reconnect loop.", r,
        error=-errno.EINVAL)
    r = req("type-0", "request_type 0: garbled on the way (cmirrord's reading).", 0)
    rep("reply-ack-eagain", "ACK form: cn_msg.len 0, cn_msg.ack = EAGAIN (11), cn_msg.seq = the request's "
        "seq; no dm_ulog_request. The kernel resends with a new seq.", r, error=-errno.EAGAIN, ack=True)
    r = req("type-18", "request_type 18: beyond the 17 known types.", 18)
    rep("reply-einval-unknown-type", "error -EINVAL (-22), data_size 0.", r, error=-errno.EINVAL)

    # clustered-disk log with a device.
    r = req("ctr-initial-disk", "Initial CTR of a clustered-disk log: '<len> clustered-disk <maj:min> "
            "<region_size>' as LVM sends it; NUL not counted.", T.CTR, luid=LUID_DISK, uuid=UUID_DISK,
            data=ctr(CTR_DISK))
    rep("reply-ctr-disk-device", "The initial CTR of a disk type returns the log device + NUL (data_size 4 "
        "<= the kernel's 128); the kernel registers it with dm_get_device.", r,
        data={"device": "7:3", "nul_counted": True})
    r = req("ctr-reconnect-disk", "Reconnect CTR of the disk log: NUL counted.", T.CTR, luid=LUID_DISK,
            uuid=UUID_DISK, data=ctr(CTR_DISK, reconnect=True))
    rep("reply-ctr-reconnect-disk", "data_size 0: the reconnect CTR offers no buffer; the device here "
        "would make the kernel fail it with -ENOSPC and loop forever.", r)
    r = req("status-info-disk", "STATUS_INFO of the clustered-disk log.", T.STATUS_INFO, luid=LUID_DISK,
            uuid=UUID_DISK)
    rep("reply-status-info-disk", "'3 clustered-disk 7:3 A' + NUL, NUL counted (23).", r,
        data=text("3 clustered-disk 7:3 A"))

    # nosync log: in sync from the start.
    r = req("ctr-nosync", "CTR with nosync and block_on_error: 2048 / 64 = 32 regions.", T.CTR,
            luid=LUID_NOSYNC, uuid=UUID_NOSYNC, data=ctr(CTR_NOSYNC))
    r = req("get-sync-count-nosync", "GET_SYNC_COUNT of a nosync log before RESUME.", T.GET_SYNC_COUNT,
            luid=LUID_NOSYNC, uuid=UUID_NOSYNC)
    rep("reply-get-sync-count-32", "u64 32: nosync starts with every region in sync.", r, data=u64(32))
    req("resume-nosync", "RESUME of the nosync log.", T.RESUME, luid=LUID_NOSYNC, uuid=UUID_NOSYNC)
    r = req("get-resync-work-nosync", "GET_RESYNC_WORK on a log fully in sync.", T.GET_RESYNC_WORK,
            luid=LUID_NOSYNC, uuid=UUID_NOSYNC)
    rep("reply-get-resync-work-none", "{s64 have_work 0; u64 region 0}: still the full 16 bytes.", r,
        data={"have_work": 0, "region": 0})
    r = req("is-remote-recovering-all-in-sync", "IS_REMOTE_RECOVERING(31) on a log fully in sync.",
            T.IS_REMOTE_RECOVERING, luid=LUID_NOSYNC, uuid=UUID_NOSYNC, data=region(31))
    rep("reply-is-remote-recovering-in-sync", "{0; in_sync_hint = region_count 32}: only when every region "
        "is in sync.", r,
        data={"is_recovering": 0, "in_sync_hint": 32})

    # A log whose backend cannot commit.
    r = req("ctr-fail", "CTR of a disk log served (in the vector test) by a backend whose commit fails.",
            T.CTR, luid=LUID_FAIL, uuid=UUID_FAIL, data=ctr(CTR_FAIL))
    r = req("flush-integrated-fail", "integrated FLUSH of one region on the failing backend.", T.FLUSH,
            luid=LUID_FAIL, uuid=UUID_FAIL, data=regions([9]))
    rep("reply-eio", "error -EIO (-5): the commit failed; the mirror sets log_failure.", r, error=-errno.EIO)
    r = req("status-info-fail", "STATUS_INFO after the failed commit.", T.STATUS_INFO, luid=LUID_FAIL,
            uuid=UUID_FAIL)
    rep("reply-status-info-disk-f", "Health F after a failed commit: '3 clustered-disk 7:4 F' + NUL.", r,
        data=text("3 clustered-disk 7:4 F"))


# --- vector building ------------------------------------------------------------------------------


def request_of(spec: ReqSpec) -> Request:
    return Request(luid=spec.luid, uuid=spec.uuid, version=wire.DM_ULOG_REQUEST_VERSION, seq=spec.seq,
                   request_type=spec.type, data=spec.data,
                   cn_seq=spec.seq if spec.cn_seq is None else spec.cn_seq,
                   raw_type=spec.raw_type or 0)


def type_name(t: int) -> str | None:
    try:
        return RequestType(t & wire.DM_ULOG_REQUEST_MASK).name
    except ValueError:
        return None


def frame_fields(*, cn_seq: int, luid: int, uuid: str, seq: int, raw_type: int, data: bytes,
                 payload: dict, error: int = 0, padding: str = "000000",
                 version: int = wire.DM_ULOG_REQUEST_VERSION) -> dict:
    """The ``fields`` of a full-form frame (formats/wire.md §10), written from what built it."""
    return {
        "cn_msg": {"idx": wire.CN_IDX_DM, "val": wire.CN_VAL_DM_USERSPACE_LOG, "seq": cn_seq, "ack": 0,
                   "len": wire.HEADER_SIZE + len(data), "flags": 0},
        "header": {"luid": luid, "uuid": uuid, "padding": padding, "version": version, "error": error,
                   "seq": seq, "request_type": raw_type, "type": raw_type & wire.DM_ULOG_REQUEST_MASK,
                   "type_name": type_name(raw_type), "data_size": len(data)},
        "data": data.hex(),
        "payload": payload,
    }


def request_vector(spec: ReqSpec) -> dict:
    frame = wire.encode_request(request_of(spec))
    vec = {
        "name": spec.name,
        "direction": "request",
        "hex": frame.hex(),
        "fields": frame_fields(cn_seq=spec.seq if spec.cn_seq is None else spec.cn_seq, luid=spec.luid,
                               uuid=spec.uuid, seq=spec.seq, raw_type=spec.raw_type or spec.type,
                               data=spec.data, payload=spec.payload),
        "note": spec.note,
    }
    if spec.step is not None:
        vec["engine_step"] = spec.step
    return vec


def reply_vector(spec: RepSpec, to: ReqSpec) -> dict:
    request = request_of(to)
    frame = wire.encode_reply(Reply(request, spec.error, spec.data, spec.ack))
    if spec.ack:
        fields: dict = {
            "ack_form": True,
            "cn_msg": {"idx": wire.CN_IDX_DM, "val": wire.CN_VAL_DM_USERSPACE_LOG, "seq": to.seq,
                       "ack": -spec.error, "len": 0, "flags": 0},
            "error": spec.error,
        }
    else:
        fields = {"ack_form": False, **frame_fields(
            cn_seq=to.seq, luid=to.luid, uuid=to.uuid, seq=to.seq, raw_type=to.raw_type or to.type,
            data=spec.data, payload=spec.payload, error=spec.error)}
    return {
        "name": spec.name,
        "direction": "reply",
        "hex": frame.hex(),
        "fields": fields,
        "note": spec.note,
        "in_reply_to": spec.to,
    }


# --- real kernel frames -----------------------------------------------------------------------------

#: The smoke listener's own capture format (tools/vm/smoke_listener.py): magic line, then records of
#: little-endian f64 time, u8 direction (0 = from the kernel), u32 length, and the netlink datagram.
_VMCAP_MAGIC = b"ULOGVMCAP1\n"
_VmCapRecord = c.Struct("time" / c.Float64l, "direction" / c.Int8ul, "length" / c.Int32ul)


def payload_fields(kind: int, data: bytes) -> dict:
    try:
        return requests.parse_payload(kind, data)
    except ValueError:  # a hostile vector's payload: described by its hex alone
        return {}


def real_vectors(capture: Path) -> list[dict]:
    blob = capture.read_bytes()
    if not blob.startswith(_VMCAP_MAGIC):
        raise SystemExit(f"{capture}: not a smoke-listener capture")
    pos = len(_VMCAP_MAGIC)
    first: dict[int, tuple[bytes, bytes]] = {}
    size = _VmCapRecord.sizeof()
    while pos + size <= len(blob):
        rec = _VmCapRecord.parse(blob[pos : pos + size])
        datagram = blob[pos + size : pos + size + rec.length]
        pos += size + rec.length
        if rec.direction != 0:
            continue
        _nl_type, payload = wire.strip_nlmsghdr(datagram)
        request = wire.decode_frame(payload)
        first.setdefault(request.request_type, (datagram, payload))
    out = []
    for kind, (datagram, payload) in sorted(first.items()):
        r = wire.decode_frame(payload)
        nl = wire.NlMsgHdr.parse(datagram[: wire.NLMSGHDR_SIZE])
        name = f"real-6.1-{RequestType(kind).name.lower().replace('_', '-')}"
        out.append({
            "name": name,
            "direction": "request",
            "hex": payload.hex(),
            "fields": frame_fields(cn_seq=r.cn_seq, luid=r.luid, uuid=r.uuid, seq=r.seq, raw_type=r.raw_type,
                                   data=r.data, payload=payload_fields(kind, r.data), error=r.error,
                                   padding=r.padding.hex(), version=r.version),
            "note": "Recorded from a real Debian 6.1 kernel (dm-log-userspace 1.3.0) under qemu by "
                    "tools/vm/smoke_listener.py: the first request of this type in the smoke run.",
            "netlink": {
                "hex": datagram.hex(),
                "nlmsghdr": {"len": nl.len, "type": nl.type, "flags": nl.flags, "seq": nl.seq, "pid": nl.pid},
            },
        })
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--capture", type=Path, default=DEFAULT_CAPTURE)
    args = p.parse_args(argv)
    _steps.clear()
    _replies.clear()
    build_conversation()
    by_name = {s.name: s for s in _steps}
    assert len(by_name) == len(_steps), "duplicate request vector name"
    vectors = [request_vector(s) for s in _steps]
    vectors += [reply_vector(r, by_name[r.to]) for r in _replies]
    if args.capture.exists():
        vectors += real_vectors(args.capture)
    else:
        print(f"{args.capture} not found: real-6.1-* vectors left as they are", file=sys.stderr)
    names = [v["name"] for v in vectors]
    assert len(set(names)) == len(names), "duplicate vector name"
    args.out.mkdir(parents=True, exist_ok=True)
    for vec in vectors:
        path = args.out / f"{vec['name']}.json"
        path.write_text(json.dumps(vec, indent=2) + "\n")
    print(f"wrote {len(vectors)} vectors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
