"""ulog-dump against stores and captures made by a real dm-ulogd run (kernel model over unix).

The stores come from :func:`ulog_disk.testing.handover.build_store`: a real daemon (LMDB backend,
a fixed ``--boot-id``) driven by the kernel model through a mirror's life and then a hand-over
(CTR B while A is live, PRESUSPEND/POSTSUSPEND A) cut by ``kill -9`` before or after RESUME B, plus
a second uuid that was removed (its state retained); the fixtures ``stores``, ``store_after`` and
``store_before`` are in conftest.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb
import pytest

from ulog_disk.protocol import capture, wire
from ulog_disk.protocol.wire import Reply, Request, RequestType
from ulog_disk.storage import store_format as sf
from ulog_disk.testing.handover import (
    A_DIRTY,
    A_OUT_OF_SYNC,
    B_OUT_OF_SYNC,
    BOOT1,
    BOOT2,
    CTR,
    LUID_A,
    LUID_B,
    LUID_GONE,
    REGIONS,
    UUID_GONE,
    UUID_H,
    Stores,
    connect,
    lmdb_daemon,
)
from ulog_disk.testing.kernelmodel import Mirror, UserspaceLog
from ulog_disk.testing.tools import hexluid, instances, ulog_dump, ulog_recover

# --- ulog-dump store ---------------------------------------------------------------------------


def test_store_after_kill9_following_resume_b(store_after: Path) -> None:
    r = ulog_dump("store", str(store_after), "--boot-id", BOOT1, "--json")
    assert r.rc == 0, r.err
    doc = r.json
    assert doc["tool"] == "ulog-dump" and doc["command"] == "store" and doc["json_version"] == 1
    assert doc["daemon"] == {"running": False, "pid": None}
    assert {s["uuid"] for s in doc["stores"]} == {UUID_H, UUID_GONE}
    journal = doc["journal"]
    assert journal["exists"] and len(journal["journal_id"]) == 32 and journal["segments"] == 1
    assert (journal["damage"], journal["problems"], journal["findings"]) == ([], [], [])
    assert 0 < journal["durable"] <= journal["end"]
    h = instances(doc, UUID_H)
    a, b = h[hexluid(LUID_A)], h[hexluid(LUID_B)]
    assert (a["state"], a["verdict"]) == ("suspended", "superseded")
    assert (b["state"], b["verdict"]) == ("live", "live")
    assert b["generation"] > a["generation"] > 0
    assert hexluid(LUID_B) in a["reason"]
    for inst in (a, b):
        assert inst["region_count"] == REGIONS and inst["region_size"] == 8 and inst["ctr"] == CTR
        assert inst["boot_id"] == BOOT1 and inst["log_type"] == "clustered-core"
        assert inst["committed_at"] > 0 and inst["committed_at_iso"].endswith("Z")
        assert inst["findings"] == []
        # Layout 3: the instance follows this journal from its checkpoint on; what follows the
        # checkpoint is replayed over the state shown, as the daemon's restore would.
        j = inst["journal"]
        assert (j["layout"], j["replayed"], j["damaged"], j["same_boot"]) == (3, True, None, True)
        assert j["journal_id"] == journal["journal_id"] and 0 < j["checkpoint"] <= journal["end"]
        assert not j["exists"] and j["path"] is None  # no per-instance journal file any more
    assert (a["out_of_sync_ranges"], a["dirty_ranges"]) == (A_OUT_OF_SYNC, A_DIRTY)
    assert (a["in_sync"], a["dirty"]) == (40, 2)
    assert (b["out_of_sync_ranges"], b["dirty_ranges"], b["in_sync"]) == (B_OUT_OF_SYNC, A_DIRTY, 38)
    gone = instances(doc, UUID_GONE)
    assert set(gone) == {"retained"}
    ret = gone["retained"]
    assert (ret["verdict"], ret["region_count"], ret["in_sync"]) == ("retained", 32, 20)
    assert ret["source_luid"] == LUID_GONE
    assert ret["out_of_sync_ranges"] == "20-31"

    text = ulog_dump("store", str(store_after), "--boot-id", BOOT1)
    assert text.rc == 0
    out = text.out
    assert f"uuid '{UUID_H}'" in out and f"uuid '{UUID_GONE}'" in out
    assert f"instance {hexluid(LUID_A)}: superseded -- a newer state exists: luid {hexluid(LUID_B)}" in out
    assert f"instance {hexluid(LUID_B)}: live" in out
    assert "    out of sync  40-63\n" in out and "    dirty        5-6\n" in out
    assert "    out of sync  5-6,40-63\n" in out
    assert f"regions      {REGIONS}: 40 in sync, 24 out of sync, 2 dirty" in out
    assert "retained state: retained" in out and f"from         luid {hexluid(LUID_GONE)}" in out


def test_store_before_resume_b_other_boot(store_before: Path) -> None:
    """Killed before RESUME B, looked at after a reboot: A holds the newest state (orphaned), B
    never resumed (orphaned, holds nothing)."""
    doc = ulog_dump("store", str(store_before), "--boot-id", BOOT2, "--json").json
    h = instances(doc, UUID_H)
    a, b = h[hexluid(LUID_A)], h[hexluid(LUID_B)]
    assert (a["verdict"], a["state"]) == ("orphaned", "suspended")
    assert "adopts its state" in a["reason"]
    assert (b["verdict"], b["state"], b["generation"], b["resumed"]) == ("orphaned", "constructed", 0, False)
    assert "never resumed" in b["reason"]
    # B's bitmaps were never committed: they read as all dirty, out of sync (the safe direction).
    assert (b["in_sync"], b["dirty"], b["committed_at"]) == (0, REGIONS, 0.0)
    # Another boot: the journal is replayed by the restore's rule for another boot (past the
    # durable point only flushed marks and out-of-sync ops); A's POSTSUSPEND write put every
    # record of A before its checkpoint, so nothing is left to replay.
    ja = a["journal"]
    assert (ja["same_boot"], ja["damaged"], ja["records"], ja["ops"]) == (False, None, 0, 0)
    assert (a["out_of_sync_ranges"], a["dirty_ranges"]) == (A_OUT_OF_SYNC, A_DIRTY)
    doc1 = ulog_dump("store", str(store_before), "--boot-id", BOOT1, "--json").json
    h1 = instances(doc1, UUID_H)
    assert (h1[hexluid(LUID_A)]["verdict"], h1[hexluid(LUID_B)]["verdict"]) == ("suspended", "constructed")


def test_store_filters_regions_and_one_directory(store_after: Path) -> None:
    env_dir = store_after / sf.encode_dir_name(UUID_H)
    r = ulog_dump("store", str(env_dir), "--boot-id", BOOT1, "--luid", f"{LUID_A:x}", "--per-region",
                  "--json")
    assert r.rc == 0, r.err
    doc = r.json
    assert len(doc["stores"]) == 1
    (store,) = doc["stores"]
    assert [i["luid"] for i in store["instances"]] == [LUID_A] and store["retained"] is None
    regions = store["instances"][0]["regions"]
    assert len(regions) == REGIONS
    assert regions[5] == {"region": 5, "clean": False, "in_sync": True}
    assert regions[50] == {"region": 50, "clean": True, "in_sync": False}
    assert regions[0] == {"region": 0, "clean": True, "in_sync": True}
    text = ulog_dump("store", str(store_after), "--uuid", UUID_H, "--luid", hex(LUID_A), "--per-region").out
    assert " 0  .....dd. ........ ........ ........ ........ oooooooo oooooooo oooooooo" in text
    assert UUID_GONE not in text
    assert ulog_dump("store", str(store_after), "--uuid", "LVM-nope").rc == 2
    assert ulog_dump("store", str(store_after / "nope")).rc == 2


def test_store_shows_a_damaged_store_and_one_moved_aside(store_after: Path) -> None:
    env_dir = store_after / sf.encode_dir_name(UUID_H)
    env = lmdb.open(str(env_dir), max_dbs=1024, subdir=True)
    with env.begin(write=True) as txn:
        db = env.open_db(sf.instance_db_name("meta", LUID_A), txn=txn, create=False)
        garbage = sf.record_value(sf.instance_db_name("meta", LUID_A), b"ULGM\x02\x00garbage")
        txn.put(sf.RECORD_KEY, garbage, db=db)
    env.close()
    shutil.copytree(store_after / sf.encode_dir_name(UUID_GONE),
                    store_after / (sf.encode_dir_name(UUID_GONE) + ".damaged-1767225600"))
    doc = ulog_dump("store", str(store_after), "--boot-id", BOOT1, "--json").json
    h = [s for s in doc["stores"] if s["uuid"] == UUID_H and s["kind"] == "store"][0]
    assert h["damaged"]
    a = {i["luid"]: i for i in h["instances"]}[LUID_A]
    assert a["verdict"] == "damaged" and "meta record is of version 2" in a["reason"]
    aside = [s for s in doc["stores"] if s["kind"] == "moved-aside"]
    assert len(aside) == 1 and aside[0]["uuid"] == UUID_GONE and aside[0]["moved_at"] == 1767225600
    assert aside[0]["retained"]["verdict"] == "damaged"
    text = ulog_dump("store", str(store_after), "--boot-id", BOOT1).out
    assert "DAMAGED:" in text and "moved aside" in text


# --- never blocking a running daemon -----------------------------------------------------------


def test_reading_never_blocks_a_serving_daemon(tmp_path: Path) -> None:
    """Every read-only command runs while the daemon serves a writing mirror; a reader holding
    a read transaction open does not delay the daemon's commits."""
    state = tmp_path / "state"
    d = lmdb_daemon(tmp_path, state)
    try:
        conn = connect(d)
        m = Mirror(UserspaceLog(conn, UUID_H, LUID_A, CTR))
        assert m.construct() == 0
        m.resume()
        stop = threading.Event()
        done: list[int] = []
        failures: list[str] = []

        def writer() -> None:
            i = 0
            while not stop.is_set():
                m.write([i % REGIONS, (i * 7) % REGIONS])
                m.update_states()
                m.recover_one()
                if m.log_failure:
                    failures.append("log failure")
                    return
                i += 1
                done.append(i)

        t = threading.Thread(target=writer)
        t.start()
        try:
            for _ in range(3):
                before = len(done)
                r = ulog_dump("store", str(state), "--boot-id", BOOT1, "--json")
                assert r.rc == 0, r.err
                assert r.json["daemon"]["running"] and r.json["daemon"]["pid"] == d.proc.pid
                assert ulog_recover("list", "--state-dir", str(state), "--boot-id", BOOT1).rc == 0
                assert ulog_recover("verify", "--state-dir", str(state), "--boot-id", BOOT1).rc == 0
                r = ulog_recover("export", UUID_H, "--disklog", str(tmp_path / "x.log"), "--state-dir",
                                 str(state), "--boot-id", BOOT1, "--force", "--overwrite")
                assert r.rc == 0, r.err
                deadline = time.monotonic() + 10
                while len(done) <= before:  # the mirror goes on while (and after) the tools read
                    assert time.monotonic() < deadline, "the mirror made no progress"
                    time.sleep(0.01)
            r = ulog_recover("backup", str(tmp_path / "bk"), "--state-dir", str(state), "--boot-id", BOOT1)
            assert r.rc == 0, r.out + r.err
            # A reader that keeps its snapshot open: commits go on regardless.
            env = lmdb.open(str(state / sf.encode_dir_name(UUID_H)), readonly=True, lock=True, max_dbs=1024,
                            subdir=True, create=False)
            txn = env.begin()
            try:
                start, t0 = len(done), time.monotonic()
                while len(done) < start + 20:
                    assert time.monotonic() - t0 < 10, "commits stalled behind a reader"
                    time.sleep(0.01)
            finally:
                txn.abort()
                env.close()
        finally:
            stop.set()
            t.join(30)
        assert not failures and m.log.errors == []
        assert m.legs_identical_where_in_sync() == []
    finally:
        assert d.stop() == 0


# --- ulog-dump wire ----------------------------------------------------------------------------


def test_wire_capture_of_the_handover(stores: Stores) -> None:
    cap = stores["after"][1]
    r = ulog_dump("wire", str(cap), "--json")
    assert r.rc == 0, r.err
    doc = r.json
    summ = doc["summary"]
    assert summ["requests"] == summ["replies"] > 100
    assert summ["unanswered"] == [] and summ["truncated"] is None
    recs = doc["records"]
    by_index = {rec["index"]: rec for rec in recs}
    for rec in recs:
        if rec["direction"] == "reply":
            req = by_index[rec["request_index"]]
            assert (req["seq"], req["type"], req["reply_index"]) == (rec["seq"], rec["type"], rec["index"])
            assert rec["latency_ms"] >= 0 and rec["t"] >= req["t"]
    ctrs = [rec for rec in recs if rec["type"] == "CTR" and rec["direction"] == "request"]
    assert ctrs[0]["payload"] == {"ctr": "256 clustered-core 8", "nul_counted": False}
    assert {c["luid"] for c in ctrs} == {LUID_GONE, LUID_A, LUID_B}
    sizes = [rec for rec in recs if rec["type"] == "GET_REGION_SIZE" and rec["direction"] == "reply"]
    assert sizes[0]["payload"] == {"u64": 8}
    marks = [rec for rec in recs if rec["type"] == "MARK_REGION" and rec["direction"] == "request"]
    assert any(m["payload"]["ranges"] == "5-6" for m in marks)
    work = [rec for rec in recs if rec["type"] == "GET_RESYNC_WORK" and rec["direction"] == "reply"]
    assert work[0]["payload"] == {"have_work": 1, "region": 0}
    last = recs[-1]
    assert (last["direction"], last["type"], last["luid"], last["error"]) == ("reply", "RESUME", LUID_B, 0)

    text = ulog_dump("wire", str(cap), "--uuid", UUID_H).out
    assert f"u1 = uuid '{UUID_GONE}'" in text and f"u2 = uuid '{UUID_H}'" in text
    lines = text.splitlines()
    ctr_line = next(ln for ln in lines if " CTR " in ln and "ctr '" + CTR in ln)
    assert ">" in ctr_line and "0xffff888000001000" in ctr_line and " u2 " in ctr_line
    assert any(" < " in ln and "GET_REGION_SIZE" in ln and " ok " in ln and " ms " in ln
               and "region size 8" in ln for ln in lines)
    assert "unanswered requests: 0" in text and "reply latency: min" in text


def test_wire_truncated_capture_is_reported_not_fatal(stores: Stores, tmp_path: Path) -> None:
    data = stores["after"][1].read_bytes()
    records = list(capture.read_capture(data))
    cut = tmp_path / "cut.cap"
    cut.write_bytes(data[:-7])  # the daemon killed in the middle of its last write
    r = ulog_dump("wire", str(cut), "--json")
    assert r.rc == 0
    assert r.json["summary"]["records"] == len(records) - 1
    assert "truncated" in r.json["summary"]["truncated"]
    assert r.json["summary"]["unanswered"] == [len(records) - 2]  # the RESUME whose reply was cut
    text = ulog_dump("wire", str(cut)).out
    assert "TRUNCATED: truncated record at byte" in text and "(no reply)" in text
    bad = tmp_path / "bad.cap"
    bad.write_bytes(b"not a capture at all")
    r = ulog_dump("wire", str(bad))
    assert r.rc == 2 and "not a capture" in r.err


def test_wire_hex_on_stdin() -> None:
    req = Request(luid=0x1000, uuid="LVM-hex", version=3, seq=41, request_type=RequestType.MARK_REGION,
                  data=wire.build_regions([9, 7, 8]), cn_seq=41)
    frame = wire.encode_request(req)
    reply = wire.encode_reply(Reply(req, 0))
    size_req = Request(luid=0x1000, uuid="LVM-hex", version=3, seq=42,
                       request_type=RequestType.GET_SYNC_COUNT, data=b"", cn_seq=42)
    size_reply = wire.encode_reply(Reply(size_req, 0, wire.build_u64(17)))
    ack = wire.encode_reply(Reply(Request(luid=0, uuid="", version=3, seq=43, request_type=0, data=b""),
                                  -11, ack=True))
    netlink = wire.add_nlmsghdr(wire.encode_request(Request(
        luid=0x1000, uuid="LVM-hex", version=3, seq=43, request_type=RequestType.CTR, data=b"8 core 8\0")))
    text = "\n".join([frame.hex(), "rep:" + reply.hex(), "  " + wire.encode_request(size_req).hex(),
                      "rep:" + size_reply.hex(), netlink.hex(), ack.hex(), "zz"])
    r = ulog_dump("wire", "-", "--json", stdin=text)
    assert r.rc == 0, r.err
    recs = r.json["records"]
    assert [x["direction"] for x in recs] == ["request", "reply"] * 3 + ["request"]
    assert recs[0]["payload"] == {"regions": [9, 7, 8], "count": 3, "ranges": "7-9"}
    assert recs[1]["request_index"] == 0 and recs[1]["type"] == "MARK_REGION"
    assert recs[3]["payload"] == {"u64": 17}
    assert recs[4]["payload"] == {"ctr": "8 core 8", "nul_counted": True} and recs[4]["seq"] == 43
    assert recs[5]["ack_form"] and recs[5]["errno"] == "EAGAIN" and recs[5]["request_index"] == 4
    assert recs[5]["type"] == "CTR"  # from the request it answers
    assert recs[6]["problem"].startswith("not hex")
    assert recs[0]["t"] is None and recs[1]["latency_ms"] is None
    out = ulog_dump("wire", "-", stdin=text).out
    assert "3 region(s): 7-9" in out and "-EAGAIN (ack)" in out and "sync count 17" in out


def test_wire_malformed_frames_are_shown(tmp_path: Path) -> None:
    good = wire.encode_request(Request(luid=1, uuid="LVM-x", version=3, seq=5, request_type=RequestType.FLUSH,
                                       data=b"\1\2\3"))  # 3 bytes: not a region list
    short = good[:30]
    r = ulog_dump("wire", "-", "--json", stdin=f"{good.hex()} {short.hex()}")
    recs = r.json["records"]
    assert recs[0]["payload"]["problem"].startswith("region list of 3 bytes")
    assert "shorter than the 160-byte header" in recs[1]["problem"]
    assert r.json["summary"]["malformed"] == 1


# --- help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", [["--help"], ["store", "--help"], ["journal", "--help"], ["wire", "--help"],
                                 ["disklog", "--help"]])
def test_help_is_complete(cmd: list[str]) -> None:
    r = ulog_dump(*cmd)
    assert r.rc == 0
    assert "usage: ulog-dump" in r.out
    if cmd != ["--help"]:
        assert "examples:" in r.out and "--json" in r.out


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "ulog-dump"
    p = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "100"})
    assert p.returncode == 0 and "disklog" in p.stdout


def test_bit_ranges_walk_runs() -> None:
    from bitarray import bitarray
    from hypothesis import given
    from hypothesis import strategies as st

    from ulog_disk.log.regionlog import format_ranges
    from ulog_disk.tools.common import bit_ranges

    @given(st.lists(st.booleans(), min_size=1, max_size=200))
    def check(values: list[bool]) -> None:
        bits = bitarray(values, endian="little")
        for v in (0, 1):
            assert bit_ranges(bits, v) == format_ranges([i for i, b in enumerate(values) if b == v])

    check()


# --- ulog-dump journal -------------------------------------------------------------------------


def test_journal_of_the_handover(store_after: Path) -> None:
    r = ulog_dump("journal", str(store_after), "--boot-id", BOOT1, "--json", "--all")
    assert r.rc == 0, r.err
    doc = r.json
    assert (doc["tool"], doc["command"], doc["exists"]) == ("ulog-dump", "journal", True)
    assert doc["damage"] == [] and doc["problems"] == [] and doc["findings"] == []
    assert doc["records_total"] == doc["records_shown"] == len(doc["records"]) > 50
    (seg,) = doc["segments"]
    assert (seg["file"], seg["start"], seg["base"]) == ("journal.0000000000000000", 0, 0)
    assert seg["created_at_iso"].endswith("Z") and seg["end"] == seg["capacity"]
    assert 0 < doc["durable"] <= doc["end"] == doc["records"][-1]["end"]
    insts = {i["luid"]: i for i in doc["instances"]}
    assert set(insts) == {LUID_A, LUID_B}
    for i in insts.values():
        assert i["checkpoint_journal_id"] == doc["journal_id"] and 0 < i["checkpoint"] <= doc["end"]
        # A's POSTSUSPEND and B's RESUME wrote their stores before they were answered.
        assert (i["records_after"], i["ops_replayed"], i["damaged"], i["layout"]) == (0, 0, None, 3)
    recs = doc["records"]
    assert [p["position"] for p in recs] == sorted(p["position"] for p in recs)
    assert any(p["kind"] == "OPS" and p["luid"] == LUID_A
               and {"mark 5", "mark 6"} <= set(p["ops"].split(", ")) for p in recs)
    events = [(p["event"], p["luid"], p["state"]) for p in recs if p["kind"] == "EVENT"]
    assert ("CTR", LUID_B, "constructed") in events and ("RESUME", LUID_B, "live") in events
    assert ("POSTSUSPEND", LUID_A, "suspended") in events
    flushes = [p for p in recs if p["kind"] == "FLUSH" and p["luid"] == LUID_A]
    assert flushes and all(p["generation"] > 0 and p["op_list"] == [] for p in flushes)
    # --records N: the last N; --state-dir works as the positional argument does.
    last = ulog_dump("journal", "--state-dir", str(store_after), "--records", "3", "--json").json
    assert last["records_shown"] == 3 and last["records"] == recs[-3:]
    text = ulog_dump("journal", str(store_after), "--boot-id", BOOT1, "--records", "400").out
    assert f"journal {doc['journal_id']}: 1 segment(s)" in text and "journal.0000000000000000" in text
    assert f"= uuid '{UUID_H}'" in text and "RESUME -> live, resumed" in text and "mark 5" in text
    assert ulog_dump("journal", str(store_after / "nope")).rc == 2
    r = ulog_dump("journal", str(store_after), "--records", "-1")
    assert r.rc == 2 and "--records" in r.err and "Traceback" not in r.err


def test_journal_of_a_state_dir_without_one(tmp_path: Path) -> None:
    (tmp_path / "lock").touch()  # a daemon of a release before the journal ran here
    r = ulog_dump("journal", str(tmp_path), "--json")
    assert r.rc == 0 and (r.json["exists"], r.json["journal_id"], r.json["records"]) == (False, None, [])
    assert "none in the state directory" in ulog_dump("journal", str(tmp_path)).out


# --- the reader's parts ------------------------------------------------------------------------------


def test_tools_common_imports_no_other_tool() -> None:
    """Every tool imports tools/common; it imports none of them (no import cycle)."""
    import ast

    from ulog_disk.tools import common

    tree = ast.parse(Path(common.__file__).read_text())
    relative = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1]
    assert relative == []


def test_newest_is_the_handover_rule_of_lifecycle() -> None:
    """What ulog-recover resyncs, exports and keeps at purge: the state a new instance's RESUME
    adopts (lifecycle.newest_state), then any other state of that generation."""
    from bitarray import bitarray

    from ulog_disk.tools import storeview as sv

    def state(luid: int | None, generation: int, boot: str = BOOT2, resumed: bool = True,
              superseded: bool = False) -> sv.StateView:
        if luid is None:
            s = sv.StateView(uuid=UUID_H, kind="retained", generation=generation)
        else:
            meta = sf.MetaRecord(uuid=UUID_H, luid=luid, ctr=CTR, log_type="core", region_size=8,
                                 region_count=8, state="suspended", generation=generation, cursor=0,
                                 boot_id=boot, resumed=resumed, superseded=superseded)
            s = sv.StateView(uuid=UUID_H, kind="instance", luid=luid, meta=meta, generation=generation)
        s.clean = s.sync = bitarray(8)
        return s

    ev = sv.EnvView(name="u.x", path=Path("/nonexistent"), uuid=UUID_H, boot_id=BOOT2)
    earlier, now, retained = state(1, 7, boot=BOOT1), state(2, 7), state(None, 6)
    ev.instances = [earlier, now, state(3, 9, superseded=True), state(4, 0, resumed=False)]
    ev.retained = retained
    # The tie at 7 goes to this boot's instance, the rule's order; the flagged one never counts.
    assert sv.newest(ev) == [now, earlier]
    ev.instances = [earlier]
    assert sv.newest(ev) == [earlier]
    ev.instances = []
    assert sv.newest(ev) == [retained]
    ev.retained = None
    assert sv.newest(ev) == []
