"""Property tests: hostile frames against wire + engine, and RegionLog invariants.

* Random bytes and structurally valid but hostile frames go through ``wire.decode_frame`` and
  ``Applier.handle_now`` (memory backend). The only exception allowed is ``FrameError``; every
  frame that can be answered gets a reply that encodes, with ``error <= 0`` (or the ACK form);
  and after every hostile frame a log set up beforehand (the sentinel) still answers correctly.
* Random operation sequences on a RegionLog keep its invariants.

Absurd constructor numbers (2**64 and more) are covered by tests in
tests/test_engine.py; the CTR strategy here keeps lengths below 2**21 sectors so bitmaps stay
small and the fuzz spends its examples on everything else.
"""

from __future__ import annotations

import errno

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ulog_disk.daemon.applier import Applier
from ulog_disk.log.regionlog import RegionLog
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import FrameError, Reply, Request, RequestType
from ulog_disk.storage.memory import MemoryBackend
from ulog_disk.testing.kernel import check_success
from ulog_disk.testing.sentinel import SENTINEL_LUID, SENTINEL_UUID, check_sentinel, set_up_sentinel

T = RequestType
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ---------------------------------------------------------------------------------------

def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """Pick a strategy with the given weights (st.one_of favours its first branches)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


FEW_LUIDS = st.sampled_from([0, 1, SENTINEL_LUID, SENTINEL_LUID + 0x400, 2**64 - 1])
LUIDS = weighted((3, FEW_LUIDS), (1, st.integers(0, 2**64 - 1)))
FEW_UUIDS = st.sampled_from([SENTINEL_UUID, "", "LVM-x", "/", "..", "../../etc/passwd", "a/../b", "A" * 128,
                             ("../" * 43)[:128], ("/.." * 32), "x\xff\x01"])
UUIDS = weighted((3, FEW_UUIDS),
                 (1, st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=255), max_size=128)))
REGIONS = st.one_of(st.integers(0, 40), st.integers(0, 2**64 - 1), st.sampled_from([2**63, 2**64 - 1]))
KNOWN_TYPES = st.sampled_from([int(t) for t in T] + [T.CTR] * 6 + [T.DTR, T.RESUME] * 2)
TYPES = weighted((6, KNOWN_TYPES), (1, st.integers(0, 255)), (1, st.integers(0, 2**32 - 1)))
LOG_TYPES = st.sampled_from(["core", "disk", "clustered-core", "clustered-disk", "mirror", "", "Core"])
NUMBERS = st.one_of(
    st.integers(0, 2**20).map(str),
    st.integers(0, 21).map(lambda n: str(2**n)),
    st.sampled_from(["-2", "0x400", "1k", "", "1024 ", " 64", "٣"]),
)


@st.composite
def ctr_strings(draw) -> bytes:
    words = [draw(NUMBERS), draw(LOG_TYPES)]
    if draw(st.booleans()):
        words.append(draw(st.sampled_from(["7:3", "253:2", "/dev/loop0", "d" * 127, "d" * 128])))
    words.append(draw(NUMBERS))
    words += draw(st.lists(st.sampled_from(["sync", "nosync", "block_on_error", "foo", "integrated_flush"]),
                           max_size=3))
    sep = draw(st.sampled_from([" ", "  ", "\t"]))
    text = sep.join(words).encode("utf-8")[: wire.MAX_REQUEST_DATA - 1]
    if draw(st.booleans()):
        text += b"\0"  # reconnect form
    return text


@st.composite
def valid_ctr_strings(draw) -> bytes:
    region_size = 2 ** draw(st.integers(1, 14))
    regions = draw(weighted((2, st.integers(4, 48)), (1, st.integers(1, 48))))
    length = region_size * regions - (draw(st.integers(0, region_size - 1)) if regions > 1 else 0)
    log_type = draw(st.sampled_from(["core", "disk", "clustered-core", "clustered-disk"]))
    words = [str(length), log_type]
    if "disk" in log_type:
        words.append(draw(st.sampled_from(["7:3", "253:2", "/dev/loop0", "d" * 127])))
    words.append(str(region_size))
    words += draw(st.lists(st.sampled_from(["sync", "nosync", "block_on_error"]), max_size=2, unique=True)
                  .filter(lambda w: not {"sync", "nosync"} <= set(w)))
    text = " ".join(words).encode()
    return text + b"\0" if draw(st.booleans()) else text


PAYLOADS = weighted(
    (1, st.just(b"")),
    (1, ctr_strings()),
    (2, valid_ctr_strings()),
    (1, st.binary(max_size=wire.MAX_REQUEST_DATA)),
    (1, REGIONS.map(wire.build_u64)),
    (1, st.lists(REGIONS, min_size=0, max_size=40).map(wire.build_regions)),
    (1, st.tuples(REGIONS, st.integers(-(2**63), 2**63 - 1)).map(lambda p: wire.build_set_region_sync(*p))),
    (1, st.binary(min_size=300, max_size=wire.MAX_REQUEST_DATA)),
)


@st.composite
def hostile_requests(draw) -> Request:
    raw = draw(TYPES)
    data = draw(PAYLOADS)
    return Request(
        luid=draw(LUIDS), uuid=draw(UUIDS), version=draw(st.sampled_from([3, 0, 1, 2, 2**32 - 1])),
        seq=draw(st.integers(0, 2**32 - 1)), request_type=raw & 0xFF, raw_type=raw, data=data,
        cn_seq=draw(st.integers(0, 2**32 - 1)),
    )


def damage(frame: bytes, how: int, value: int) -> bytes:
    """Break a well-formed frame in one of a few ways, through wire's construct definitions."""
    c_size, h_size = wire.CN_MSG_SIZE, wire.HEADER_SIZE
    if how == 0:
        return frame
    if how == 1:
        return frame[: value % (len(frame) + 1)]
    if how == 2:
        return frame + bytes([value & 0xFF]) * (value % 7)
    cn = dict(wire.CnMsg.parse(frame[:c_size]))
    hdr = dict(wire.UlogHeader.parse(frame[c_size : c_size + h_size]))
    cn.pop("_io", None)
    hdr.pop("_io", None)
    if how == 3:
        cn["len"] = value & 0xFFFF
    elif how == 4:
        hdr["data_size"] = value & 0xFFFFFFFF
    elif how == 5:
        hdr["uuid"] = bytes([(value % 255) + 1]) * wire.DM_UUID_LEN  # no NUL
    elif how == 6:
        hdr["uuid"] = b"ab\0" + bytes([(value % 255) + 1]) + b"\0" * (wire.DM_UUID_LEN - 4)
    elif how == 7:
        cn["idx"], cn["val"] = value & 0xF, (value >> 4) & 0xF
    return wire.CnMsg.build(cn) + wire.UlogHeader.build(hdr) + frame[c_size + h_size :]


@st.composite
def hostile_frames(draw) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=600))
    if kind == 1:
        cn = wire.CnMsg.build(dict(idx=7, val=1, seq=0, ack=0, len=draw(st.integers(0, 0xFFFF)), flags=0))
        return cn + draw(st.binary(max_size=520))
    req = draw(hostile_requests())
    try:
        frame = wire.encode_request(req)
    except ValueError:  # a 129-byte latin-1 uuid cannot be encoded: use a shorter one
        req.uuid = req.uuid[:128]
        frame = wire.encode_request(req)
    how = draw(st.sampled_from([0] * 12 + [1, 2, 3, 4, 5, 6, 7]))
    return damage(frame, how, draw(st.integers(0, 2**32 - 1)))


# --- the sentinel: a log that must keep working -----------------------------------------------------------


class Harness:
    def __init__(self, tmp):
        self.engine = Applier.over(MemoryBackend(tmp), boot_id="x")
        self.seq = 0
        set_up_sentinel(self.call, b"32768 clustered-core 1024")

    def call(self, type_: int, data: bytes = b"") -> wire.DecodedReply:
        self.seq += 1
        req = Request(luid=SENTINEL_LUID, uuid=SENTINEL_UUID, version=3, seq=self.seq, request_type=type_,
                      data=data)
        out = wire.encode_reply(self.engine.handle_now(wire.decode_frame(wire.encode_request(req))))
        rep = wire.decode_reply(out)
        assert rep.seq == self.seq
        return rep

    def check_sentinel(self) -> None:
        check_sentinel(self.call, b"1 clustered-core\0")

    def throw(self, frame: bytes) -> None:
        try:
            req = wire.decode_frame(frame)
        except FrameError as exc:
            if exc.answerable:
                out = wire.encode_reply(Reply(exc.request, -errno.EINVAL))
                assert wire.decode_reply(out).error == -errno.EINVAL
            return
        if req.key == (SENTINEL_UUID, SENTINEL_LUID):
            return  # the sentinel is only addressed by check_sentinel
        reply = self.engine.handle_now(req)
        assert isinstance(reply, Reply)
        out = wire.encode_reply(reply)
        rep = wire.decode_reply(out)
        if reply.ack:
            assert rep.ack_form and rep.error < 0 and rep.seq == req.seq
            return
        assert rep.error <= 0 and rep.seq == req.seq and rep.luid == req.luid
        if rep.error:
            assert rep.data == b""
        else:
            check_success(req, rep)



@SETTINGS
@given(frames=st.lists(hostile_frames(), min_size=1, max_size=12))
def test_hostile_frames_never_break_the_daemon(tmp_path_factory, frames):
    h = Harness(tmp_path_factory.mktemp("fuzz"))
    for frame in frames:
        h.throw(frame)
        h.check_sentinel()


SMALL_REGIONS = weighted((2, st.integers(0, 3)), (1, st.integers(0, 40)))
FITTING_PAYLOADS = {
    T.IS_CLEAN: SMALL_REGIONS.map(wire.build_u64),
    T.IN_SYNC: SMALL_REGIONS.map(wire.build_u64),
    T.IS_REMOTE_RECOVERING: SMALL_REGIONS.map(wire.build_u64),
    T.MARK_REGION: st.lists(SMALL_REGIONS, min_size=1, max_size=32).map(wire.build_regions),
    T.CLEAR_REGION: st.lists(SMALL_REGIONS, min_size=1, max_size=32).map(wire.build_regions),
    T.FLUSH: st.lists(SMALL_REGIONS, max_size=32).map(wire.build_regions),
    T.SET_REGION_SYNC: st.tuples(SMALL_REGIONS, st.integers(0, 1))
    .map(lambda p: wire.build_set_region_sync(*p)),
    T.CTR: weighted((2, valid_ctr_strings()), (1, ctr_strings()),
                    (1, st.sampled_from([b"64 core 2", b"64 disk 7:3 4 nosync\0"]))),
}


@st.composite
def lifecycle_ops(draw) -> list[tuple[int, int, bytes, str]]:
    """Requests concentrated on a few (uuid, luid) pairs: CTR/DTR churn, luid reuse after DTR,
    instances sharing the sentinel's uuid; payloads mostly of the right shape, sometimes hostile."""
    ops = []
    for luid in (1, 2):
        for uuid in (SENTINEL_UUID, "A/../" * 25 + "xyz"):
            ops.append((T.CTR, luid, draw(valid_ctr_strings()), uuid))
            if draw(st.booleans()):
                ops.append((T.RESUME, luid, b"", uuid))
    for _ in range(draw(st.integers(1, 30))):
        luid = draw(st.sampled_from([1, 2]))
        uuid = draw(st.sampled_from([SENTINEL_UUID, "A/../" * 25 + "xyz"]))
        type_ = draw(st.sampled_from([int(t) for t in T] + [T.CTR] * 3 + [T.DTR, T.RESUME] * 2 + [0, 18]))
        fitting = FITTING_PAYLOADS.get(type_, st.just(b""))
        data = draw(weighted((3, fitting), (1, PAYLOADS)))
        ops.append((type_, luid, data, uuid))
    return ops


@SETTINGS
@given(ops=lifecycle_ops())
def test_lifecycle_churn_keeps_other_logs_served(tmp_path_factory, ops):
    h = Harness(tmp_path_factory.mktemp("churn"))
    for seq, (type_, luid, data, uuid) in enumerate(ops):
        req = Request(luid=luid, uuid=uuid, version=3, seq=seq, request_type=type_, data=data)
        h.throw(wire.encode_request(req))
        h.check_sentinel()


# --- RegionLog invariants ---------------------------------------------------------------------------------

OPS = st.one_of(
    st.tuples(st.just("mark"), st.lists(st.integers(0, 70), min_size=1, max_size=33)),
    st.tuples(st.just("clear"), st.lists(st.integers(0, 70), min_size=1, max_size=33)),
    st.tuples(st.just("set"), st.integers(0, 70), st.booleans()),
    st.tuples(st.just("work")),
    st.tuples(st.just("work")),
    st.tuples(st.just("restart")),
    st.tuples(st.just("adopt"), st.integers(1, 70), st.booleans()),
    st.tuples(st.just("take")),
    st.tuples(st.just("first")),
)


def lowest_unsynced(log: RegionLog) -> int:
    for r in range(log.region_count):
        if not log.sync[r]:
            return r
    return log.region_count


@st.composite
def region_logs(draw) -> RegionLog:
    count = draw(st.integers(1, 64))
    if draw(st.booleans()):
        return RegionLog.fresh(count, draw(st.booleans()))
    nbytes = (count + 7) // 8
    clean = draw(st.binary(min_size=nbytes, max_size=nbytes))
    sync = draw(st.binary(min_size=nbytes, max_size=nbytes))
    return RegionLog.from_bitmaps(count, clean, sync)


@SETTINGS
@given(log=region_logs(), ops=st.lists(OPS, max_size=60))
def test_region_log_invariants(log, ops):
    assert log.check() == []
    marked: set[int] = {r for r in range(log.region_count) if not log.clean[r]}
    for op in ops:
        name = op[0]
        before = (log.clean.copy(), log.sync.copy(), log.sync_count, log.recovering, log.cursor)
        try:
            if name == "mark":
                log.mark(op[1])
                marked.update(op[1])
            elif name == "clear":
                log.clear(op[1])
                for r in op[1]:
                    if log.sync[r]:
                        marked.discard(r)
            elif name == "set":
                was_recovering = log.recovering
                log.set_region_sync(op[1], op[2])
                assert bool(log.sync[op[1]]) == op[2]
                if was_recovering == op[1]:
                    assert log.recovering is None
            elif name == "work":
                r = log.get_resync_work()
                if r is not None:
                    assert not log.sync[r] and log.recovering == r
                    assert log.get_resync_work() == r  # repeats until set_region_sync
            elif name == "restart":
                log.restart_recovery()
                assert log.cursor == 0 and log.recovering is None
            elif name == "adopt":
                old = log
                log = old.adopted(op[1], op[2])
                for r in range(min(old.region_count, log.region_count)):
                    if not old.clean[r]:
                        assert not log.sync[r], "adopted() reports a marked region in sync"
                    if not old.sync[r]:
                        assert not log.sync[r]
                for r in range(old.region_count, log.region_count):
                    assert bool(log.sync[r]) == op[2] and log.clean[r]
                marked = {r for r in marked if r < log.region_count}
            elif name == "take":
                log.take_changes()
                assert not log.dirty_clean_chunks and not log.dirty_sync_chunks
            elif name == "first":
                assert log.first_unsynced() == lowest_unsynced(log)
        except IndexError:
            # A bounds error applies nothing.
            assert (log.clean, log.sync, log.sync_count, log.recovering, log.cursor) == before
        assert log.check() == []
        assert log.sync_count == log.sync[: log.region_count].count(1)
        assert log.first_unsynced_hint <= lowest_unsynced(log)
        for r in marked:
            assert not log.clean[r], f"region {r} marked and not cleared is reported clean"
            assert not log.is_clean(r)
        assert log.first_unsynced() == lowest_unsynced(log)
