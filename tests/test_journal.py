"""The journal's format (formats/journal.md): golden vectors both ways, the struct fast paths
against the construct definitions, and what ``scan`` makes of torn tails, damage, SWITCHes,
missing segments and segments of another journal. Then the segment switch: appending never makes
a segment, and a daemon whose appends outrun the store worker holds its writes instead."""

from __future__ import annotations

import errno
import struct
import threading
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ulog_disk.protocol.wire import RequestType as RT
from ulog_disk.storage import journal as jn
from ulog_disk.testing.vectors import golden_vectors

VECTORS = Path(__file__).resolve().parent.parent / "formats" / "vectors" / "journal"
_REGION_MASK = (1 << 56) - 1


def _vectors(kind: str) -> list[tuple[str, dict]]:
    return golden_vectors(VECTORS, kind)


def _unpack_ops(values) -> list[list[int]]:
    return [[v >> 56, v & _REGION_MASK] for v in values]


def _fields_by_definition(p) -> dict:
    """A record parsed with ``RecordV1`` as the vectors' JSON fields."""
    kind = jn.Kind(p.kind)
    f = {"kind": kind.name, "lsn": p.lsn, "durable": p.durable, "uuid": p.uuid.decode("latin-1"),
         "luid": p.luid, "length": p.length, "count": p.count, "crc": p.crc}
    b = p.body
    if kind is jn.Kind.OPS:
        f["ops"] = _unpack_ops(b.ops)
    elif kind is jn.Kind.FLUSH:
        f.update(generation=b.generation, cursor=b.cursor, committed_at=b.committed_at,
                 ops=_unpack_ops(b.ops))
    elif kind is jn.Kind.EVENT:
        f.update(event=jn.Event(b.event).name, state=jn.STATE_NAMES[b.state], flags=b.flags,
                 generation=b.generation, region_count=b.region_count)
    elif kind is jn.Kind.AGREED:
        f["body"] = bytes(b).hex()
    else:
        f["next_start"] = b.next_start
    return f


def _fields_by_fast_path(r: jn.Record, data: bytes) -> dict:
    """A record decoded by ``decode_record`` as the same JSON fields."""
    f = {"kind": r.kind.name, "lsn": r.lsn, "durable": r.durable, "uuid": r.uuid, "luid": r.luid,
         "length": r.length, "count": len(r.ops), "crc": struct.unpack_from("<I", data)[0]}
    if r.kind is jn.Kind.OPS:
        f["ops"] = [list(op) for op in r.ops]
    elif r.kind is jn.Kind.FLUSH:
        f.update(generation=r.generation, cursor=r.cursor, committed_at=r.committed_at,
                 ops=[list(op) for op in r.ops])
    elif r.kind is jn.Kind.EVENT:
        f.update(event=jn.Event(r.event).name, state=r.state, flags=r.flags, generation=r.generation,
                 region_count=r.region_count)
    elif r.kind is jn.Kind.AGREED:
        f["body"] = r.body.hex()
    else:
        f["next_start"] = r.next_start
    return f


def _encode(f: dict) -> bytes:
    """The vector's fields through the writer's functions (what the daemon appends)."""
    kind = jn.Kind[f["kind"]]
    ops = [tuple(op) for op in f.get("ops", [])]
    count = 0
    if kind is jn.Kind.OPS:
        body, count = jn.ops_body(ops)
    elif kind is jn.Kind.FLUSH:
        body, count = jn.flush_body(f["generation"], f["cursor"], f["committed_at"], ops)
    elif kind is jn.Kind.EVENT:
        body = jn.event_body(jn.Event[f["event"]], f["state"], bool(f["flags"] & jn.FLAG_RESUMED),
                             bool(f["flags"] & jn.FLAG_SUPERSEDED), f["generation"], f["region_count"])
    else:
        body = struct.pack("<Q", f["next_start"])
    return jn.encode_record(kind, f["lsn"], f["durable"], f["uuid"].encode("latin-1"), f["luid"], body, count)


def test_every_kind_has_a_vector():
    kinds = {vec["fields"]["kind"] for _, vec in _vectors("record")}
    assert kinds == {"OPS", "FLUSH", "EVENT", "SWITCH"}
    flushes = [vec for _, vec in _vectors("record") if vec["fields"]["kind"] == "FLUSH"]
    assert {bool(v["fields"]["ops"]) for v in flushes} == {True, False}  # with and without marks
    assert len(_vectors("segment_header")) == 1


@pytest.mark.parametrize(("name", "vec"), _vectors("record"))
def test_record_vector_decodes_to_its_fields(name, vec):
    data = bytes.fromhex(vec["hex"])
    f = vec["fields"]
    p = jn.RecordV1.parse(data)
    assert _fields_by_definition(p) == f, name
    assert _fields_by_fast_path(jn.decode_record(data, 0, f["lsn"]), data) == f, name
    # 8-byte aligned, zero padding, the CRC over bytes 4..length.
    assert len(data) % jn.ALIGN == 0 and len(data) - f["length"] < jn.ALIGN
    assert data[f["length"]:] == bytes(len(data) - f["length"])
    assert f["crc"] == zlib.crc32(data[4 : f["length"]])


@pytest.mark.parametrize(("name", "vec"), _vectors("record"))
def test_record_vector_fields_encode_to_its_bytes(name, vec):
    assert _encode(vec["fields"]).hex() == vec["hex"], name
    # The construct definition builds the same bytes from what it parsed.
    data = bytes.fromhex(vec["hex"])
    assert jn.RecordV1.build(jn.RecordV1.parse(data)) == data


@pytest.mark.parametrize(("name", "vec"), _vectors("segment_header"))
def test_segment_header_vector_both_ways(name, vec):
    data = bytes.fromhex(vec["hex"])
    f = vec["fields"]
    p = jn.SegmentHeaderV1.parse(data)
    assert (p.journal_id.hex(), p.start, p.base, p.capacity, p.created_at, p.version, p.crc) == (
        f["journal_id"], f["start"], f["base"], f["capacity"], f["created_at"], f["version"], f["crc"])
    assert len(data) == jn.SEGMENT_HEADER_SIZE == 60 and f["crc"] == zlib.crc32(data[:56])
    h = jn.decode_segment_header(data)
    assert (h.journal_id.hex(), h.start, h.base, h.capacity, h.created_at) == (
        f["journal_id"], f["start"], f["base"], f["capacity"], f["created_at"])
    built = jn.encode_segment_header(bytes.fromhex(f["journal_id"]), f["start"], f["base"], f["created_at"],
                                     f["capacity"])
    assert built.hex() == vec["hex"]
    assert jn.SegmentHeaderV1.build(p) == data


def test_segment_header_refuses_damage_and_other_versions():
    _, vec = _vectors("segment_header")[0]
    data = bytearray.fromhex(vec["hex"])
    bad = bytearray(data)
    bad[30] ^= 4
    with pytest.raises(jn.JournalError, match="checksum"):
        jn.decode_segment_header(bytes(bad))
    newer = bytearray(data)
    newer[4:6] = (2).to_bytes(2, "little")
    with pytest.raises(jn.JournalError, match="version 2; .*only version 1"):
        jn.decode_segment_header(bytes(newer))
    with pytest.raises(jn.JournalError, match="magic"):
        jn.decode_segment_header(b"XXXX" + bytes(data[4:]))


# --- the fast paths are the definitions -------------------------------------------------------

_ops = st.tuples(st.integers(1, 4), st.integers(0, 2**34 - 1))


@st.composite
def records(draw):
    kind = draw(st.sampled_from(list(jn.Kind)))
    lsn = draw(st.integers(0, 2**60)) * jn.ALIGN
    durable = draw(st.integers(0, 2**64 - 1))
    uuid, luid, count, ops = b"", 0, 0, []
    if kind not in (jn.Kind.SWITCH, jn.Kind.AGREED):
        uuid = draw(st.binary(min_size=1, max_size=128))
        luid = draw(st.integers(0, 2**64 - 1))
    if kind is jn.Kind.OPS:
        ops = draw(st.lists(_ops, min_size=1, max_size=32))
        body, count = jn.ops_body(ops)
    elif kind is jn.Kind.FLUSH:
        ops = draw(st.lists(_ops, max_size=32))
        body, count = jn.flush_body(draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1)),
                                    draw(st.floats(allow_nan=False)), ops)
    elif kind is jn.Kind.EVENT:
        body = jn.event_body(draw(st.sampled_from(list(jn.Event))), draw(st.sampled_from(sorted(jn.STATES))),
                             draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2**64 - 1)),
                             draw(st.integers(0, 2**64 - 1)))
    elif kind is jn.Kind.AGREED:
        luid = draw(st.integers(0, 2**64 - 1))
        body = draw(st.binary(max_size=256))
    else:
        body = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return kind, lsn, durable, uuid, luid, body, count, ops


@given(records())
def test_fast_paths_agree_with_the_construct_definitions(rec):
    kind, lsn, durable, uuid, luid, body, count, ops = rec
    data = jn.encode_record(kind, lsn, durable, uuid, luid, body, count)
    p = jn.RecordV1.parse(data)
    assert jn.RecordV1.build(p) == data
    r = jn.decode_record(data, 0, lsn)
    assert _fields_by_fast_path(r, data) == _fields_by_definition(p)
    assert (r.kind, r.lsn, r.durable, r.uuid.encode("latin-1"), r.luid) == (kind, lsn, durable, uuid, luid)
    assert r.ops == list(ops) and r.end == lsn + len(data)


@given(records(), st.integers(0, 10**9))
def test_any_single_bit_flip_of_a_record_is_detected(rec, where):
    kind, lsn, durable, uuid, luid, body, count, _ = rec
    data = bytearray(jn.encode_record(kind, lsn, durable, uuid, luid, body, count))
    length = struct.unpack_from("<I", data, 4)[0]
    bit = where % (length * 8)  # the record's bytes; the zero padding after them is not part of it
    data[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(jn.JournalError):
        jn.decode_record(bytes(data), 0, lsn)


# --- scan -------------------------------------------------------------------------------------

SMALL = jn.HEADER_BYTES + 4096  # segments of 4096 record bytes: a few dozen records each


def _journal(d: Path, segment_bytes: int = SMALL, floor: int = 0) -> jn.Journal:
    j = jn.Journal(d, segment_bytes)
    j.open(jn.scan(d), base=floor, floor=floor)  # as the daemon: nothing below ``floor`` is needed
    return j


def _append_ops(j: jn.Journal, region: int, luid: int = 1) -> int:
    """Append one OPS record (mark ``region``); returns its position (``append`` returns the end,
    and a record of a 5-byte uuid and one op is 53 bytes, 56 padded; a SWITCH may precede it).
    The next segment is made first when it is due, as the daemon's store worker would."""
    if j.wants_spare():
        j.prepare()
    body, count = jn.ops_body([(1, region)])
    return j.append(jn.Kind.OPS, b"LVM-t", luid, body, count) - 56


def _flip(d: Path, position: int, offset: int = 20) -> None:
    """Flip a bit of the record at ``position`` (in whichever segment holds it)."""
    seg = max(s for s in jn.scan(d).segments if s <= position)
    path = d / jn.segment_name(seg)
    data = bytearray(path.read_bytes())
    data[jn.HEADER_BYTES + position - seg + offset] ^= 1
    path.write_bytes(bytes(data))


def test_scan_of_a_torn_tail_is_the_end_not_damage(tmp_path: Path):
    j = _journal(tmp_path)
    first = _append_ops(j, 1)
    j.sync()
    torn = _append_ops(j, 2)  # never synced: a host crash may leave anything there
    j.close()
    _flip(tmp_path, torn)
    found = jn.scan(tmp_path)
    assert [r.lsn for r in found.records] == [first]
    assert found.end == torn and found.damage == [] and found.durable <= torn


def test_scan_of_a_record_claimed_durable_is_damage(tmp_path: Path):
    j = _journal(tmp_path)
    first = _append_ops(j, 1)
    bad = _append_ops(j, 2)
    j.sync()
    later = _append_ops(j, 3)  # claims the journal durable past ``bad``
    j.close()
    _flip(tmp_path, bad)
    found = jn.scan(tmp_path)
    assert [r.lsn for r in found.records] == [first, later]
    (d,) = found.damage
    assert (d.start, d.end) == (bad, later) and "durable" in d.reason
    assert found.damaged_after(first) is d and found.damaged_after(later) is None
    assert found.end == later + 48 + 8  # 40-byte header, 5-byte uuid, one op: 53, padded to 56


def test_scan_follows_a_switch_into_the_next_segment(tmp_path: Path):
    j = _journal(tmp_path)
    positions = [_append_ops(j, r) for r in range(100)]  # 56 bytes each: about 73 per segment
    j.sync()
    j.close()
    found = jn.scan(tmp_path)
    assert len(found.segments) == 2 and found.damage == [] and found.problems == []
    kinds = [r.kind for r in found.records]
    assert kinds.count(jn.Kind.SWITCH) == 1
    switch = found.records[kinds.index(jn.Kind.SWITCH)]
    assert switch.next_start == sorted(found.segments)[1]
    assert [r.lsn for r in found.records if r.kind is jn.Kind.OPS] == positions
    assert [r.ops for r in found.records if r.kind is jn.Kind.OPS] == [[(1, r)] for r in range(100)]


def test_scan_reports_a_missing_segment(tmp_path: Path):
    j = _journal(tmp_path)
    for r in range(100):
        _append_ops(j, r)
    j.sync()
    j.close()
    second = sorted(jn.scan(tmp_path).segments)[1]
    (tmp_path / jn.segment_name(second)).unlink()
    found = jn.scan(tmp_path)
    (d,) = found.damage
    assert "missing" in d.reason and found.damaged_after(0) is d
    # Every record before the SWITCH is still read.
    assert found.records[-1].kind is jn.Kind.SWITCH and found.records[-1].next_start == second


def test_scan_ignores_a_segment_of_another_journal(tmp_path: Path):
    j = _journal(tmp_path, floor=1 << 20)  # this journal starts at position 1 MiB
    at = _append_ops(j, 7)
    j.sync()
    j.close()
    ours = jn.scan(tmp_path).journal_id
    foreign = jn.encode_segment_header(bytes(16), 0, 0, 1.0, 4096)
    (tmp_path / jn.segment_name(0)).write_bytes(foreign.ljust(SMALL, b"\0"))
    found = jn.scan(tmp_path)
    assert found.journal_id == ours and sorted(found.segments) == [1 << 20]
    assert any("belongs to another journal" in p for p in found.problems)
    assert [r.lsn for r in found.records] == [at] and found.damage == []


# --- the segment switch: appending never makes a segment ----------------------------------------


def _append_only(j: jn.Journal, region: int) -> int:
    """Append one OPS record without making the next segment first (the store worker is late)."""
    body, count = jn.ops_body([(1, region)])
    return j.append(jn.Kind.OPS, b"LVM-t", 1, body, count)


def _count_creates(monkeypatch) -> list[tuple[int, int]]:
    """Every segment made from now on: (its start, the thread that made it)."""
    made: list[tuple[int, int]] = []
    real = jn.Journal._create

    def create(self: jn.Journal, start: int, base: int):
        made.append((start, threading.get_ident()))
        return real(self, start, base)

    monkeypatch.setattr(jn.Journal, "_create", create)
    return made


def test_appends_past_the_reserve_without_a_next_segment_fail_and_write_nothing(tmp_path: Path,
                                                                                 monkeypatch):
    j = _journal(tmp_path)
    made = _count_creates(monkeypatch)
    ends = []
    while not j.short_of_room():
        ends.append(_append_only(j, len(ends)))
    segment = j.segments[-1]
    assert segment.end - jn.SWITCH_BYTES - j.position < j.reserve == j.capacity // 4
    # The daemon would hold its writes now. Whoever appends anyway fills the reserve, then the
    # append that needs the next segment fails before writing anything: no segment is made.
    with pytest.raises(BlockingIOError):
        while True:
            ends.append(_append_only(j, len(ends)))
    failed_at = j.position
    with pytest.raises(BlockingIOError):
        _append_only(j, 0)
    assert j.position == failed_at == ends[-1] and made == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [segment.path.name]
    j.sync()
    found = jn.scan(tmp_path)
    assert [r.end for r in found.records] == ends and found.damage == [] and found.end == failed_at
    # Once the store worker has made it, the journal goes on there, behind a SWITCH.
    j.prepare()
    assert [start for start, _ in made] == [segment.end] and not j.short_of_room()
    after = _append_only(j, 7)
    j.sync()
    j.close()
    found = jn.scan(tmp_path)
    assert [r.kind for r in found.records[-2:]] == [jn.Kind.SWITCH, jn.Kind.OPS]
    assert found.records[-2].next_start == segment.end and found.end == after
    assert found.damage == [] and found.problems == []


def test_a_failure_to_make_the_next_segment_ends_the_hold_and_fails_the_append_with_its_error(
        tmp_path: Path, monkeypatch):
    """A full disk: holding the writes would wait for space that may never come. They go on in
    the reserve, then the append that needs the next segment fails with the disk's error, as a
    segment made on the loop used to fail; once a segment can be made again, appends go on."""
    j = _journal(tmp_path)
    real = jn.Journal._create

    def full(self: jn.Journal, start: int, base: int):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jn.Journal, "_create", full)
    n = 0
    while not j.short_of_room():
        _append_only(j, n)
        n += 1
    assert j.wants_spare()
    with pytest.raises(OSError) as failed:
        j.prepare()
    assert failed.value.errno == errno.ENOSPC and j.prepare_error is failed.value
    assert not j.short_of_room()  # the hold ends
    with pytest.raises(OSError) as exc:
        while True:
            _append_only(j, n)
            n += 1
    assert exc.value.errno == errno.ENOSPC and not isinstance(exc.value, BlockingIOError)
    monkeypatch.setattr(jn.Journal, "_create", real)
    j.prepare()
    assert j.prepare_error is None
    _append_only(j, n)
    j.close()
    assert jn.scan(tmp_path).damage == []


def test_a_record_larger_than_a_segment_is_refused_not_written_where_no_reader_looks(tmp_path: Path):
    j = _journal(tmp_path)
    before = j.position
    body, count = jn.ops_body([(1, r) for r in range(j.capacity // 8)])
    with pytest.raises(OSError) as exc:
        j.append(jn.Kind.OPS, b"LVM-t", 1, body, count)
    assert exc.value.errno == errno.EMSGSIZE and j.position == before
    j.close()


class _Transport:
    name = "test"

    def __init__(self) -> None:
        self.sent: list = []
        self.lock = threading.Lock()

    def send(self, payload: bytes, address: object) -> None:
        from ulog_disk.protocol import wire

        with self.lock:
            self.sent.append(wire.decode_reply(payload))


class _Burst:
    """An in-process daemon on the LMDB backend with the smallest segments it accepts, serving
    one mirror; the test's thread is its request loop (frames handed to ``on_frame``)."""

    def __init__(self, state: Path) -> None:
        from ulog_disk.daemon.applier import Applier
        from ulog_disk.daemon.loop import Daemon
        from ulog_disk.storage.lmdb_store import LmdbBackend

        self.backend = LmdbBackend(state, segment_bytes=65536)
        applier = Applier.over(self.backend, boot_id="b")
        applier.restore()
        self.transport = _Transport()
        self.daemon = Daemon(applier, self.transport)  # type: ignore[arg-type]
        self.journal = self.backend.journal
        self.seqs = iter(range(1, 1 << 30))
        self.writes = 0
        self.on_frame(self.frame(RT.CTR, b"65536 clustered-core 1024\0"))
        self.on_frame(self.frame(RT.RESUME))
        self.daemon.wait_idle()

    def frame(self, rtype: int, data: bytes = b"") -> bytes:
        from ulog_disk.protocol import wire

        return wire.encode_request(wire.Request(luid=1, uuid="LVM-burst", version=3, seq=next(self.seqs),
                                                request_type=rtype, data=data))

    def on_frame(self, frame: bytes) -> None:
        self.daemon.on_frame(frame, "k")

    def write(self) -> None:
        """One MARK or CLEAR (alternately, so that each changes the log: one journal record)."""
        from ulog_disk.protocol import wire

        rtype = RT.MARK_REGION if self.writes % 2 == 0 else RT.CLEAR_REGION
        self.on_frame(self.frame(rtype, wire.build_regions([self.writes // 2 % 64])))
        self.writes += 1

    def turn(self) -> None:
        """The rest of a turn of the request loop (``Daemon.run``) after its frames."""
        d = self.daemon
        if d.worker.done or d.group.done:
            d.on_completions()
        if d.held and not d.disk_stalled():
            d.serve_held()
        if not d.worker.inflight:
            d.background(idle=False)

    def replies_to_writes(self) -> list:
        return [r for r in self.transport.sent if r.request_type in (RT.MARK_REGION, RT.CLEAR_REGION)]

    def close(self) -> None:
        self.daemon.group.close()
        self.daemon.worker.close()
        self.backend.close()


def _slow_segments(monkeypatch, gate: threading.Event, making: threading.Event) -> list[tuple[int, int]]:
    """Segments made off the calling thread wait for ``gate`` (a slow disk); returns the list
    of every segment made: (start, thread), recorded when the making starts."""
    real = jn.Journal._create
    loop = threading.get_ident()

    def slow(self: jn.Journal, start: int, base: int):
        if threading.get_ident() != loop:
            making.set()
            assert gate.wait(30)
        return real(self, start, base)

    monkeypatch.setattr(jn.Journal, "_create", slow)
    return _count_creates(monkeypatch)


def test_a_daemon_whose_appends_outrun_the_store_worker_holds_its_writes_and_never_makes_a_segment(
        tmp_path: Path, monkeypatch):
    """A burst of MARK/CLEAR while the store worker is still making the next segment (held on an
    event here, as a slow disk would hold it): the loop answers every request that needs no disk
    and keeps the writes back until the segment is ready, then serves them in order. The loop's
    thread never makes a segment; no timing is involved."""
    b = _Burst(tmp_path / "state")
    gate, making = threading.Event(), threading.Event()
    try:
        made = _slow_segments(monkeypatch, gate, making)
        loop = threading.get_ident()
        first = b.journal.segments[-1]
        while len(b.daemon.held) < 400:  # more than the reserve takes: they go on in the next segment
            assert b.writes < 5000, "the journal never ran short of room"
            b.write()
            b.turn()
        for _ in range(3000):  # the worker gets to the segment once the loop hands it maintenance
            if making.wait(0.01):
                break
            b.turn()
        # The worker is making the segment; the loop has neither made one nor switched.
        assert [start for start, _ in made] == [first.end] and made[0][1] != loop
        assert b.journal.segments[-1] is first and b.journal.short_of_room()
        # The mirror's reads are still answered meanwhile.
        b.on_frame(b.frame(RT.GET_SYNC_COUNT))
        assert b.transport.sent[-1].request_type == RT.GET_SYNC_COUNT
        assert len(b.replies_to_writes()) == b.writes - len(b.daemon.held)
        gate.set()
        b.daemon.wait_idle()
        replies = b.replies_to_writes()
        assert [r.error for r in replies] == [0] * b.writes
        assert [r.seq for r in replies] == sorted(r.seq for r in replies)  # in the order they came
        assert b.daemon.held == [] and b.daemon.held_total >= 400
        assert loop not in [thread for _, thread in made]
        assert [s.start for s in b.journal.segments] == [first.start, first.end]
    finally:
        gate.set()
        b.close()
    found = jn.scan(tmp_path / "state")
    assert found.damage == [] and found.problems == []
    assert len([r for r in found.records if r.kind is jn.Kind.OPS]) == b.writes
    assert [r.kind for r in found.records].count(jn.Kind.SWITCH) == 1


def test_writes_held_for_the_next_segment_at_stop_are_served(tmp_path: Path, monkeypatch):
    """At stop the loop no longer hands out background work, yet writes held for the next
    segment must be served: ``wait_idle`` has the store worker make it."""
    b = _Burst(tmp_path / "state")
    gate, making = threading.Event(), threading.Event()
    gate.set()  # a quick disk; the point is who makes the segment, and that it is made
    try:
        made = _slow_segments(monkeypatch, gate, making)
        while len(b.daemon.held) < 10:  # no turns: nobody hands the worker maintenance
            assert b.writes < 5000, "the journal never ran short of room"
            b.write()
        assert made == [] and not b.daemon.worker.busy()
        b.daemon.wait_idle()
        assert b.daemon.held == [] and [r.error for r in b.replies_to_writes()] == [0] * b.writes
        assert len(made) == 1 and made[0][1] != threading.get_ident()
    finally:
        b.close()
