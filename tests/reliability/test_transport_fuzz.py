"""Hostile frames through the real transport.

One dm-ulogd process (LMDB backend) behind its unix socket takes every frame, one at a time, as
the kernel would send them. Beside it, a reference engine (the same engine over the memory
backend, in this process) is fed the same frames. For every frame:

* an *answerable* frame (a complete 160-byte header) must be answered within ``REPLY_TIMEOUT``
  seconds, and the daemon's reply must be byte for byte the reference's: the transport, the
  request loop, the commit lanes and the LMDB backend add nothing and lose nothing. Replies are
  checked on their own terms too: an error is a negative errno with no data, the ACK form only for
  type 0, a success has the size the kernel reads;
* an *unanswerable* frame (shorter than a header, or not addressed to dm-log-userspace) gets no
  reply: the request sent right after it must get the next reply;
* after every frame a sentinel log, set up before, answers a valid request correctly, and after
  every example the sentinel's whole state is checked.

Frames: random bytes; connector headers with random bodies; requests of every type (and of unknown
types, 0, 18..255, 2^32-1) with hostile fields, some then damaged (truncated, padded, wrong
``cn_msg.len``/``data_size``, uuid without NUL or with bytes after it, wrong connector id); and
*valid but hostile* scripts: region numbers at 2^64-1 and 2^63, CTR strings at the 332-byte limit
(valid and not), 128-byte uuids made of ``/`` and ``..``, a luid reused after DTR with another
constructor, requests to logs after their DTR.

At the end: the daemon is alive, logged no internal error, stops with exit 0, and the state
directory holds only canonical store names (no uuid escaped it). Default: ~5000 frames;
``ULOG_REL_LONG=1`` or ``ULOG_REL_FUZZ_EXAMPLES`` for more (the long mode runs >= 100 k).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rel_lib import figures, launch, scale
from test_engine_fuzz import damage as damage_fields

from ulog_disk.daemon.applier import Applier
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import FrameError, Reply, Request, RequestType
from ulog_disk.storage.journal import parse_segment_name
from ulog_disk.storage.memory import MemoryBackend
from ulog_disk.storage.store_format import decode_dir_name
from ulog_disk.testing.client import Client, NoReply
from ulog_disk.testing.kernel import check_success
from ulog_disk.testing.launcher import Daemon
from ulog_disk.testing.sentinel import SENTINEL_LUID, SENTINEL_UUID, check_sentinel, set_up_sentinel

T = RequestType
BOOT = "boot-fuzz"
REPLY_TIMEOUT = 5.0
EXAMPLES = int(scale("ULOG_REL_FUZZ_EXAMPLES", 500, 14000))

SENTINEL_CTR = b"32768 clustered-disk 253:7 1024"  # 32 regions of 1024 sectors; a disk log (health)

# --- strategies ---------------------------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


HOSTILE_UUIDS = [
    ("../" * 43)[:128], ("/.." * 43)[:128], "/" * 128, "." * 128, ".." + "/" * 126, "a/" * 64,
    "../../../../etc/passwd" + "/.." * 35, "x" * 128, "LVM-" + "0123456789abcdef" * 7 + "0123456789ab",
    "\xff" * 128, ("\x01/../\x7f" * 25)[:128], "..", ".", "/", "u.LVM-x", "x.ABCDEF",
]
assert all(len(u.encode("latin-1")) <= 128 for u in HOSTILE_UUIDS)
POOL_UUIDS = [SENTINEL_UUID, "LVM-a", "LVM-b", "", *HOSTILE_UUIDS]
UUIDS = weighted((12, st.sampled_from(POOL_UUIDS)),
                 (1, st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=255), min_size=1,
                             max_size=128)))
OTHER_LUIDS = [0, 1, 2, 0x7F, SENTINEL_LUID + 1, 2**63, 2**64 - 1]
LUIDS = weighted((6, st.sampled_from(OTHER_LUIDS)), (1, st.integers(0, 2**64 - 1)))
EDGE_REGIONS = [2**64 - 1, 2**63, 2**63 - 1, 2**32, 2**32 - 1]
REGIONS = weighted((4, st.integers(0, 70)), (2, st.sampled_from(EDGE_REGIONS)),
                   (1, st.integers(0, 2**64 - 1)))
KNOWN_TYPES = [int(t) for t in T]
TYPES = weighted((12, st.sampled_from(KNOWN_TYPES)), (2, st.sampled_from([T.CTR, T.RESUME, T.DTR])),
                 (1, st.just(0)), (1, st.integers(18, 255)), (1, st.integers(256, 2**32 - 1)))
LOG_TYPES = ["core", "disk", "clustered-core", "clustered-disk"]


def pad_to(text: str, size: int, nul: bool) -> bytes:
    """``text`` padded with blanks to ``size`` bytes (the last one a NUL if ``nul``)."""
    raw = text.encode("utf-8")
    body = size - 1 if nul else size
    raw = raw[:body].ljust(body, b" ")
    return raw + (b"\0" if nul else b"")


@st.composite
def valid_ctrs(draw) -> bytes:
    region_size = 2 ** draw(st.integers(1, 12))
    regions = draw(weighted((4, st.integers(1, 70)), (1, st.integers(71, 2**14))))
    length = region_size * regions - draw(st.integers(0, region_size - 1))
    log_type = draw(st.sampled_from(LOG_TYPES))
    words = [str(length), log_type]
    if "disk" in log_type:
        words.append(draw(st.sampled_from(["7:3", "253:2", "/dev/loop0", "d" * 127, "/nonexistent/../x"])))
    words.append(str(region_size))
    words += draw(st.lists(st.sampled_from(["sync", "nosync", "block_on_error"]), max_size=2, unique=True)
                  .filter(lambda w: not {"sync", "nosync"} <= set(w)))
    text = " ".join(words)
    form = draw(st.integers(0, 3))
    if form == 0:
        return text.encode()
    if form == 1:
        return text.encode() + b"\0"  # reconnect form
    # at the 332-byte limit, with and without the reconnect NUL
    return pad_to(text, wire.MAX_REQUEST_DATA, nul=form == 3)


@st.composite
def hostile_ctrs(draw) -> bytes:
    words = [draw(st.sampled_from(["0", "-1", "18446744073709551615", "18446744073709551616", "1e3", "0x40",
                                   "", "٣", str(2**34)])),
             draw(st.sampled_from([*LOG_TYPES, "mirror", "Core", ""])),
             draw(st.sampled_from(["7:3", "d" * 128, "d" * 127, ""])),
             draw(st.sampled_from(["0", "1", "3", "4294967296", "8589934592", "1024", "-8"])),
             *draw(st.lists(st.sampled_from(["sync", "nosync", "integrated_flush", "foo", "\0", "\xff"]),
                            max_size=3))]
    text = " ".join(words)
    size = draw(st.sampled_from([None, wire.MAX_REQUEST_DATA, wire.MAX_REQUEST_DATA + 1, 400]))
    if size is None:
        return text.encode("utf-8")
    return pad_to(text, size, nul=draw(st.booleans()))


PAYLOAD_FOR = {
    T.CTR: weighted((3, valid_ctrs()), (2, hostile_ctrs()), (1, st.binary(max_size=wire.MAX_REQUEST_DATA))),
    T.IS_CLEAN: REGIONS.map(wire.build_u64),
    T.IN_SYNC: REGIONS.map(wire.build_u64),
    T.IS_REMOTE_RECOVERING: REGIONS.map(wire.build_u64),
    T.MARK_REGION: st.lists(REGIONS, max_size=41).map(wire.build_regions),
    T.CLEAR_REGION: st.lists(REGIONS, max_size=41).map(wire.build_regions),
    T.FLUSH: st.lists(REGIONS, max_size=41).map(wire.build_regions),
    T.SET_REGION_SYNC: st.tuples(REGIONS, st.sampled_from([0, 1, -1, 2, 2**63 - 1, -(2**63)]))
    .map(lambda p: wire.build_set_region_sync(*p)),
}
ANY_PAYLOAD = weighted((2, st.just(b"")), (1, st.binary(max_size=wire.MAX_REQUEST_DATA)),
                       (1, st.binary(min_size=1, max_size=8)), (1, REGIONS.map(wire.build_u64)))


@st.composite
def requests(draw) -> Request:
    raw = draw(TYPES)
    kind = raw & 0xFF
    fitting = PAYLOAD_FOR.get(kind, st.just(b""))
    data = draw(weighted((4, fitting), (1, ANY_PAYLOAD)))
    luid = draw(LUIDS)
    uuid = draw(UUIDS)
    if (uuid, luid) == (SENTINEL_UUID, SENTINEL_LUID):
        luid += 1  # the sentinel's own key is only addressed by the sentinel checks
    return Request(luid=luid, uuid=uuid, version=draw(st.sampled_from([3, 3, 3, 0, 2, 2**32 - 1])),
                   seq=draw(st.integers(0, 2**32 - 1)), request_type=kind, raw_type=raw, data=data,
                   cn_seq=draw(st.integers(0, 2**32 - 1)))


def damage(frame: bytes, how: int, value: int) -> bytes:
    """The engine fuzz's damage, with one change for a socket: padding is longer and never empty.
    A cut frame may be cut to nothing: an empty packet is a frame like any other, not a hang-up."""
    if how == 1:
        return frame[: value % (len(frame) + 1)]
    if how == 2:
        return frame + bytes([value & 0xFF]) * (1 + value % 300)
    return damage_fields(frame, how, value)


@st.composite
def damaged_requests(draw) -> bytes:
    frame = wire.encode_request(draw(requests()))
    how = draw(st.sampled_from([0] * 10 + [1, 2, 3, 4, 5, 6, 7]))
    return frame if how == 0 else damage(frame, how, draw(st.integers(0, 2**32 - 1)))


def req(rtype: int, uuid: str, luid: int, data: bytes = b"", seq: int = 1) -> bytes:
    return wire.encode_request(Request(luid=luid, uuid=uuid, version=3, seq=seq, request_type=rtype,
                                       data=data, cn_seq=seq))


@st.composite
def hostile_scripts(draw) -> list[bytes]:
    """A valid lifecycle with hostile values: edge regions, long uuids, luid reuse after DTR."""
    uuid = draw(weighted((3, st.sampled_from(HOSTILE_UUIDS)), (1, st.sampled_from([SENTINEL_UUID, "LVM-a"]))))
    luid = draw(st.sampled_from(OTHER_LUIDS))
    frames = [req(T.CTR, uuid, luid, draw(valid_ctrs())), req(T.RESUME, uuid, luid)]
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from([T.IS_CLEAN, T.IN_SYNC, T.MARK_REGION, T.CLEAR_REGION, T.FLUSH,
                                     T.SET_REGION_SYNC, T.IS_REMOTE_RECOVERING, T.GET_RESYNC_WORK,
                                     T.GET_SYNC_COUNT, T.STATUS_INFO, T.STATUS_TABLE]))
        frames.append(req(kind, uuid, luid, draw(PAYLOAD_FOR.get(kind, st.just(b"")))))
    if draw(st.booleans()):
        frames += [req(T.PRESUSPEND, uuid, luid), req(T.POSTSUSPEND, uuid, luid)]
    frames.append(req(T.DTR, uuid, luid))
    # after DTR: a loop request (-ESRCH), a non-loop one (-EINVAL), then the luid reused
    frames += [req(T.MARK_REGION, uuid, luid, wire.build_regions([0])), req(T.GET_REGION_SIZE, uuid, luid),
               req(T.DTR, uuid, luid)]
    if draw(st.booleans()):
        frames += [req(T.CTR, uuid, luid, draw(valid_ctrs())), req(T.RESUME, uuid, luid),
                   req(T.IN_SYNC, uuid, luid, wire.build_u64(draw(REGIONS))),
                   req(T.FLUSH, uuid, luid, wire.build_regions([2**64 - 1])),
                   req(T.GET_SYNC_COUNT, uuid, luid)]
        if draw(st.booleans()):
            frames.append(req(T.DTR, uuid, luid))
    return frames


FRAME_LISTS = st.lists(
    weighted(
        (2, st.binary(min_size=1, max_size=600).map(lambda b: [b])),
        (1, st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=520)).map(
            lambda p: [wire.CnMsg.build(dict(idx=7, val=1, seq=0, ack=0, len=p[0], flags=0)) + p[1]])),
        (8, damaged_requests().map(lambda f: [f])),
        (2, hostile_scripts()),
    ),
    min_size=1, max_size=6,
).map(lambda lists: [f for frames in lists for f in frames])

# --- the daemon and its reference -----------------------------------------------------------------------


@dataclass
class Stats:
    frames: int = 0
    unanswerable: int = 0
    answered_error: int = 0
    answered_ok: int = 0
    ack_form: int = 0
    sentinel_requests: int = 0
    examples: int = 0
    max_reply_seconds: float = 0.0
    errors: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)


class Pair:
    """The daemon and the reference engine, fed the same frames."""

    def __init__(self, daemon: Daemon, reference_dir: Path):
        self.daemon = daemon
        self.client = Client(daemon.socket_path, timeout=REPLY_TIMEOUT)  # type: ignore[arg-type]
        self.reference = Applier.over(MemoryBackend(reference_dir), boot_id=BOOT)
        self.stats = Stats()
        self.seq = 0
        self.internal_errors: list[str] = []

    def expected(self, frame: bytes) -> bytes | None:
        """What the daemon must answer (its request loop, over the reference engine), or None."""
        try:
            request = wire.decode_frame(frame)
        except FrameError as exc:
            if exc.request is None:
                return None
            return wire.encode_reply(Reply(exc.request, -errno.EINVAL))
        try:
            reply = self.reference.handle_now(request)
        except Exception as exc:  # noqa: BLE001 - the daemon answers -EIO and logs an internal error
            self.internal_errors.append(f"{type(exc).__name__}: {exc} on {request!r}"[:500])
            return wire.encode_reply(Reply(request, -errno.EIO))
        return wire.encode_reply(reply)

    def exchange(self, frame: bytes) -> bytes | None:
        want = self.expected(frame)
        self.client.send_frame(frame)
        if want is None:
            return None
        t0 = time.monotonic()
        try:
            raw = self.client.sock.recv(65536)
        except TimeoutError:
            raise NoReply(f"no reply within {REPLY_TIMEOUT} s to frame {frame.hex()}") from None
        self.stats.max_reply_seconds = max(self.stats.max_reply_seconds, time.monotonic() - t0)
        assert raw, "the daemon closed the connection"
        assert raw == want, (f"reply differs from the reference's\n frame {frame.hex()}\n got  {raw.hex()}\n"
                             f" want {want.hex()}")
        return raw

    def throw(self, frame: bytes) -> None:
        self.stats.frames += 1
        raw = self.exchange(frame)
        if raw is None:
            self.stats.unanswerable += 1
            return
        reply = wire.decode_reply(raw)
        request = wire.decode_frame(frame) if reply.error != -errno.EINVAL else None
        self.stats.kinds[RequestType(reply.request_type).name if reply.request_type in KNOWN_TYPES
                         else "ack" if reply.ack_form else "unknown"] += 1
        if reply.ack_form:
            self.stats.ack_form += 1
            assert reply.error < 0
            return
        assert reply.error <= 0
        if reply.error:
            self.stats.answered_error += 1
            self.stats.errors[-reply.error] += 1
            assert reply.data == b""
            return
        self.stats.answered_ok += 1
        if request is None:
            request = wire.decode_frame(frame)
        check_success(request, reply)

    def sentinel(self, rtype: RequestType, data: bytes = b"") -> wire.DecodedReply:
        self.seq += 1
        self.stats.sentinel_requests += 1
        raw = self.exchange(req(rtype, SENTINEL_UUID, SENTINEL_LUID, data, seq=self.seq))
        assert raw is not None
        reply = wire.decode_reply(raw)
        assert reply.seq == self.seq, "a reply to an unanswerable frame came back"
        return reply

    def setup_sentinel(self) -> None:
        set_up_sentinel(self.sentinel, SENTINEL_CTR)

    def quick_sentinel(self) -> None:
        r = self.sentinel(T.IS_CLEAN, wire.build_u64(1))
        assert (r.error, wire.parse_s64(r.data)) == (0, 0)

    def full_sentinel(self) -> None:
        check_sentinel(self.sentinel, b"3 clustered-disk 253:7 A\0")
        r = self.sentinel(T.FLUSH, wire.build_regions([5]))  # a durable commit still works
        assert r.error == 0
        r = self.sentinel(T.IS_CLEAN, wire.build_u64(5))
        assert (r.error, wire.parse_s64(r.data)) == (0, 0)




@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("transport-fuzz")
    # The reference engine runs in this process: its log lines (one per hostile frame) would only
    # cost time; the daemon's own log is kept in its file.
    engine_log = logging.getLogger("ulog_disk")
    level = engine_log.level
    engine_log.setLevel(logging.CRITICAL + 1)
    daemon = launch(tmp, boot_id=BOOT)
    try:
        p = Pair(daemon, tmp / "reference")
        p.setup_sentinel()
        yield p
    finally:
        engine_log.setLevel(level)
        if daemon.alive():
            daemon.kill9()


def test_hostile_frames_through_the_unix_transport(pair: Pair) -> None:
    t0 = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(frames=FRAME_LISTS)
    def run(frames: list[bytes]) -> None:
        pair.stats.examples += 1
        for frame in frames:
            pair.throw(frame)
            pair.quick_sentinel()
        pair.full_sentinel()

    run()
    elapsed = time.monotonic() - t0
    d = pair.daemon
    assert d.alive(), "the daemon died"
    pair.client.close()
    assert d.stop() == 0
    text = d.log_text()
    internal = text.count("internal error")
    # Nothing but canonical store names and the journal's segments in the state directory: no
    # uuid named a path outside it.
    strays = [p.name for p in d.state_dir.iterdir()
              if p.name != "lock" and decode_dir_name(p.name) is None
              and parse_segment_name(p.name) is None]
    s = pair.stats
    figures("fuzz.transport", frames=s.frames, examples=s.examples, seconds=round(elapsed, 1),
            unanswerable=s.unanswerable, answered_error=s.answered_error, answered_ok=s.answered_ok,
            ack_form=s.ack_form, sentinel_requests=s.sentinel_requests,
            max_reply_ms=round(s.max_reply_seconds * 1e3, 1), errnos=dict(s.errors.most_common()),
            stores=sum(decode_dir_name(p.name) is not None for p in d.state_dir.iterdir()),
            crashes=0, hangs=0,
            internal_errors=internal + len(pair.internal_errors), strays=len(strays),
            violations=internal + len(pair.internal_errors) + len(strays))
    assert not pair.internal_errors, pair.internal_errors[:5]
    assert internal == 0
    assert not strays, strays
    if os.environ.get("ULOG_REL_LONG") == "1":
        assert s.frames >= 100_000, f"long mode ran only {s.frames} frames"
