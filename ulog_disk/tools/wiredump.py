"""Decode kernel frames (a ``--capture`` file, or hex) into requests and replies, paired by seq.

The frames are decoded with :mod:`ulog_disk.protocol.wire` and the capture records with
:mod:`ulog_disk.protocol.capture`; nothing here knows an offset. Pairing follows the kernel
(``dm-log-userspace-transfer.c``): a full reply is matched on ``dm_ulog_request.seq``, an
ACK-form reply (``cn_msg.len == 0``) on ``cn_msg.seq``, which the kernel sets equal to the
request's seq.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..protocol import capture, requests, wire
from ..protocol.wire import RequestType
from .common import ranges

TRANSPORT_NAMES = {v: k for k, v in capture.TRANSPORTS.items()}

@dataclass
class Frame:
    """One request or reply, decoded."""

    index: int
    direction: str  # "request" | "reply"
    time_ns: int | None = None
    transport: str | None = None
    seq: int | None = None
    cn_seq: int | None = None
    type_code: int | None = None
    uuid: str | None = None
    luid: int | None = None
    error: int | None = None
    ack_form: bool = False
    payload: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
    size: int = 0
    #: Set on replies: index of the request they answer; on requests: index of their reply.
    peer: int | None = None
    latency_ns: int | None = None
    #: A full reply's data, decoded once its request (and so its type) is known.
    raw_data: bytes | None = field(default=None, repr=False)

    @property
    def type_name(self) -> str:
        if self.type_code is None:
            return "?"
        try:
            return RequestType(self.type_code).name
        except ValueError:
            return f"TYPE_{self.type_code}"


#: How a reply value of these types reads (the table names it by its type only: ``u64``, ``s64``).
_VALUE_WORDS = {RequestType.GET_REGION_SIZE: "region size", RequestType.GET_SYNC_COUNT: "sync count"}
_YES_NO = {RequestType.IS_CLEAN: "clean", RequestType.IN_SYNC: "in sync"}


def _payload_summary(kind: RequestType | None, p: dict[str, Any]) -> str:
    if "problem" in p:
        return f"undecodable payload ({p['problem']}): {p.get('hex', '')}"
    if "ctr" in p:
        reconnect = " (reconnect: NUL-terminated, no reply buffer)" if p["nul_counted"] else ""
        return f"ctr {p['ctr']!r}{reconnect}"
    if "device" in p:
        return f"device {p['device']!r}"
    if "regions" in p:
        return f"{p['count']} region(s): {p['ranges']}" if p["count"] else "no regions"
    if "have_work" in p:
        return f"work: region {p['region']}" if p["have_work"] else "no work"
    if "in_sync" in p:
        return f"region {p['region']} {'in sync' if p['in_sync'] else 'out of sync'}"
    if "is_recovering" in p:
        return f"recovering={int(p['is_recovering'])} in_sync_hint={p['in_sync_hint']}"
    if "region" in p:
        return f"region {p['region']}"
    if "s64" in p:
        label = _YES_NO.get(kind, "s64") if kind is not None else "s64"
        return label if p["s64"] == 1 else f"not {label}"
    if "u64" in p:
        return f"{_VALUE_WORDS.get(kind, 'u64') if kind is not None else 'u64'} {p['u64']}"
    if "text" in p:
        return repr(p["text"])
    if "hex" in p:
        return f"{len(p['hex']) // 2} bytes: {p['hex']}"
    return ""


def describe_payload(frame: Frame) -> str:
    text = _payload_summary(_kind(frame.type_code), frame.payload)
    if frame.problem:
        text = (f"{text}; " if text else "") + f"malformed: {frame.problem}"
    return text


def request_payload(request_type: int, data: bytes) -> dict[str, Any]:
    """A request's data as the request table (:data:`ulog_disk.protocol.requests.REQUESTS`) names
    it; a region list also as a count and ranges."""
    try:
        p = requests.parse_payload(request_type, data)
    except ValueError as exc:
        return {"problem": str(exc), "hex": data.hex()}
    if "regions" in p:
        p.update(count=len(p["regions"]), ranges=ranges(set(p["regions"])))
    return p


def reply_payload(request_type: int | None, data: bytes) -> dict[str, Any]:
    if request_type is None:  # an unpaired reply: its own header's type is all there is
        return {"hex": data.hex()} if data else {}
    try:
        return requests.parse_payload(request_type, data, reply=True)
    except ValueError as exc:
        return {"problem": str(exc), "hex": data.hex()}


def _kind(code: int | None) -> RequestType | None:
    try:
        return None if code is None else RequestType(code)
    except ValueError:
        return None


def _fill_request(f: Frame, req: wire.Request) -> None:
    f.seq, f.cn_seq, f.type_code = req.seq, req.cn_seq, req.request_type
    f.uuid, f.luid = req.uuid, req.luid
    f.payload = request_payload(req.request_type, req.data)


def _fill_reply(f: Frame, rep: wire.DecodedReply) -> None:
    f.seq, f.error, f.ack_form = rep.seq, rep.error, rep.ack_form
    if rep.ack_form:
        f.cn_seq = rep.seq
    else:
        f.type_code, f.uuid, f.luid = rep.request_type, rep.uuid, rep.luid
        f.payload = {"hex": rep.data.hex()} if rep.data else {}
        f.raw_data = rep.data


def decode(index: int, raw: bytes, direction: str) -> Frame:
    """One frame as a ``"request"`` or a ``"reply"``; a malformed one keeps its problem and
    whatever of it could be read (a request's header, when complete)."""
    f = Frame(index=index, direction=direction, size=len(raw))
    try:
        if direction == "request":
            _fill_request(f, wire.decode_frame(raw))
        else:
            _fill_reply(f, wire.decode_reply(raw))
    except wire.FrameError as exc:
        f.problem = exc.reason
        if exc.request is not None:
            _fill_request(f, exc.request)
    return f


def pair(frames: list[Frame]) -> None:
    """Match every reply to the latest unanswered request with its seq; decode reply payloads
    with the request's type (an ACK-form reply carries none)."""
    waiting: dict[int, Frame] = {}
    for f in frames:
        if f.seq is None:
            continue
        if f.direction == "request":
            waiting[f.seq] = f
            continue
        req = waiting.pop(f.seq, None)
        if req is not None:
            f.peer, req.peer = req.index, f.index
            if f.type_code is None:
                f.type_code = req.type_code
            if f.uuid is None:
                f.uuid, f.luid = req.uuid, req.luid
            if f.time_ns is not None and req.time_ns is not None:
                f.latency_ns = f.time_ns - req.time_ns
        data = f.raw_data
        if data is not None:
            f.payload = reply_payload(req.type_code if req is not None else f.type_code, data)


@dataclass
class Decoded:
    frames: list[Frame]
    #: Why the input stopped early (a truncated last record), or None.
    truncated: str | None = None
    source: str = ""
    start_ns: int | None = None


def from_capture(data: bytes, source: str = "") -> Decoded:
    """Decode a capture file (``formats/capture.md``); a truncated last record is reported in
    ``truncated``, every complete record before it is kept. Raises CaptureFormatError when the
    file is not a capture at all."""
    frames: list[Frame] = []
    truncated = None
    try:
        for i, rec in enumerate(capture.read_capture(data)):
            f = decode(i, rec.frame, "request" if rec.direction == capture.TO_DAEMON else "reply")
            f.time_ns, f.transport = rec.time_ns, TRANSPORT_NAMES.get(rec.transport, str(rec.transport))
            frames.append(f)
    except capture.CaptureFormatError as exc:
        if not frames and not data.startswith(capture.MAGIC):
            raise
        truncated = (f"{exc} (the daemon was stopped while writing it); {len(frames)} complete record(s) "
                     "before it")
    pair(frames)
    return Decoded(frames, truncated, source, frames[0].time_ns if frames else None)


_HEX_TOKEN = re.compile(r"(?:(req|rep|request|reply)[:=])?(?:0x)?([0-9a-fA-F]+)")


def _strip_netlink(raw: bytes) -> bytes:
    """A whole netlink datagram (nlmsghdr first) → its connector payload; anything else as is."""
    if len(raw) >= wire.NLMSGHDR_SIZE + wire.CN_MSG_SIZE:
        hdr = wire.NlMsgHdr.parse(raw[: wire.NLMSGHDR_SIZE])
        cn = wire.CnMsg.parse(raw[wire.NLMSGHDR_SIZE : wire.NLMSGHDR_SIZE + wire.CN_MSG_SIZE])
        if (hdr.type == wire.NLMSG_DONE and wire.NLMSGHDR_SIZE <= hdr.len <= len(raw)
                and (cn.idx, cn.val) == (wire.CN_IDX_DM, wire.CN_VAL_DM_USERSPACE_LOG)):
            return wire.strip_nlmsghdr(raw)[1]
    return raw


def from_hex(text: str, source: str = "-") -> Decoded:
    """Frames given as hex, separated by whitespace: one frame per token (a connector payload,
    or a whole netlink datagram). A token may start with ``req:`` or ``rep:`` to say its
    direction; otherwise a frame with ``cn_msg.len`` 0 is an ACK-form reply and anything else a
    request. Hex of a whole capture file (starting ``554c4f4743415031``) is read as a capture."""
    frames: list[Frame] = []
    for i, token in enumerate(text.split()):
        m = _HEX_TOKEN.fullmatch(token)
        if m is None or len(m.group(2)) % 2:
            f = Frame(index=i, direction="request", problem=f"not hex: {token[:40]!r}")
            frames.append(f)
            continue
        raw = bytes.fromhex(m.group(2))
        if raw.startswith(capture.MAGIC) and len(text.split()) == 1:
            return from_capture(raw, source)
        raw = _strip_netlink(raw)
        direction = m.group(1)
        if direction is None:
            ack = len(raw) >= wire.CN_MSG_SIZE and wire.CnMsg.parse(raw[: wire.CN_MSG_SIZE]).len == 0
            direction = "rep" if ack else "req"
        frames.append(decode(i, raw, "reply" if direction.startswith("rep") else "request"))
    pair(frames)
    return Decoded(frames, None, source)


def errno_name(error: int | None) -> str | None:
    if not error:
        return None
    return errno.errorcode.get(-error, f"E{-error}") if error < 0 else f"+{error}"


def result_text(f: Frame) -> str:
    if f.direction != "reply":
        return ""
    if f.problem:
        return "malformed"
    if not f.error:
        return "ok" + (" (ack)" if f.ack_form else "")
    name = errno_name(f.error)
    return f"-{name}" + (" (ack)" if f.ack_form else "")


def frame_json(f: Frame, start_ns: int | None) -> dict[str, Any]:
    return {
        "index": f.index, "direction": f.direction, "time_ns": f.time_ns,
        "t": None if f.time_ns is None or start_ns is None else (f.time_ns - start_ns) / 1e9,
        "transport": f.transport, "seq": f.seq, "cn_seq": f.cn_seq, "type": f.type_name if f.type_code
        is not None else None, "type_code": f.type_code, "uuid": f.uuid, "luid": f.luid,
        "luid_hex": None if f.luid is None else f"{f.luid:#018x}", "error": f.error,
        "errno": errno_name(f.error), "ack_form": f.ack_form, "payload": f.payload,
        "size": f.size, "problem": f.problem,
        "request_index" if f.direction == "reply" else "reply_index": f.peer,
        "latency_ms": None if f.latency_ns is None else f.latency_ns / 1e6,
    }


def summary(decoded: Decoded) -> dict[str, Any]:
    requests = [f for f in decoded.frames if f.direction == "request"]
    replies = [f for f in decoded.frames if f.direction == "reply"]
    latencies = sorted(f.latency_ns for f in replies if f.latency_ns is not None)
    by_type: dict[str, int] = {}
    for f in requests:
        by_type[f.type_name] = by_type.get(f.type_name, 0) + 1
    return {
        "records": len(decoded.frames), "requests": len(requests), "replies": len(replies),
        "unanswered": [f.index for f in requests if f.peer is None],
        "unmatched_replies": [f.index for f in replies if f.peer is None],
        "errors": sum(1 for f in replies if f.error),
        "malformed": sum(1 for f in decoded.frames if f.problem),
        "by_type": by_type,
        "latency_ms": None if not latencies else {
            "min": latencies[0] / 1e6, "median": latencies[len(latencies) // 2] / 1e6,
            "max": latencies[-1] / 1e6},
        "duration_s": None if decoded.start_ns is None or not decoded.frames
        or decoded.frames[-1].time_ns is None else (decoded.frames[-1].time_ns - decoded.start_ns) / 1e9,
        "truncated": decoded.truncated,
    }


def filter_frames(frames: Iterable[Frame], uuid: str | None, luid: int | None) -> list[Frame]:
    out = []
    for f in frames:
        if uuid is not None and f.uuid != uuid:
            continue
        if luid is not None and f.luid != luid:
            continue
        out.append(f)
    return out


def read_source(path: str) -> tuple[bytes, bool]:
    """(bytes, is_hex_text): ``-`` reads hex from stdin; a file is a capture."""
    if path == "-":
        import sys

        return sys.stdin.read().encode(), True
    with open(path, "rb") as fh:
        return fh.read(), False


__all__ = ["Decoded", "Frame", "from_capture", "from_hex"]
