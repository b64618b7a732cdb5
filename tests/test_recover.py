"""ulog-recover against stores made by a real dm-ulogd run, and against stores damaged on purpose.

The hand-over stores (:mod:`ulog_disk.testing.handover`; fixtures in conftest.py) hold uuid UUID_H
with A (suspended, regions 40-63 out of sync, 5-6 dirty) and B (constructed, or live after adopting
A), cut by ``kill -9`` before or after RESUME B, and uuid UUID_GONE whose state is retained. After
a repair the daemon is started again on the store and driven by the kernel model, to check that
what the tool said it changed is what the daemon then does.
"""

from __future__ import annotations

import os
import pty
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb
import pytest

from ulog_disk.daemon.applier import Applier
from ulog_disk.protocol.wire import Request, RequestType
from ulog_disk.storage import disklog
from ulog_disk.storage import journal as jn
from ulog_disk.storage import store_format as sf
from ulog_disk.storage.lmdb_store import LmdbBackend
from ulog_disk.testing.handover import (
    A_DIRTY,
    A_OUT_OF_SYNC,
    B_OUT_OF_SYNC,
    BOOT1,
    BOOT2,
    CTR,
    LUID_A,
    LUID_B,
    REGIONS,
    UUID_GONE,
    UUID_H,
    connect,
    lmdb_daemon,
)
from ulog_disk.testing.kernelmodel import UserspaceLog
from ulog_disk.testing.tools import hexluid, instances, ulog_dump, ulog_recover
from ulog_disk.tools.common import bit_ranges

LUID_C = 0xFFFF888000004000


def dump_json(state: Path, boot: str = BOOT1) -> dict:
    r = ulog_dump("store", str(state), "--boot-id", boot, "--json")
    assert r.rc == 0, r.err
    return r.json


def verdicts(state: Path, boot: str) -> dict[tuple[str, str], str]:
    r = ulog_recover("list", "--state-dir", str(state), "--boot-id", boot, "--json")
    assert r.rc == 0, r.err
    return {(e["uuid"], e["luid_hex"] or "retained"): e["verdict"] for e in r.json["entries"]}


def resume_new_instance(tmp: Path, state: Path, boot: str, uuid: str, luid: int, ctr: str = CTR
                        ) -> tuple[int, list[int]]:
    """Start the daemon on ``state``, CTR + RESUME a new instance: (sync count, every region the
    daemon hands out for recovery, in order)."""
    d = lmdb_daemon(tmp, state, boot, name=f"check-{luid:x}")
    try:
        conn = connect(d)
        log = UserspaceLog(conn, uuid, luid, ctr)
        assert log.ctr() == 0 and log.resume() == 0
        count = log.get_sync_count()
        handed = []
        while (region := log.get_resync_work()) is not None:
            handed.append(region)
            log.set_region_sync(region, True)
        conn.close()
    finally:
        assert d.stop() == 0
    return count, handed


def ranges_of(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


# --- list ---------------------------------------------------------------------------------------


def test_list_verdicts_after_kill9_mid_handover(store_after: Path, store_before: Path) -> None:
    # (store, boot id it is read under) -> verdicts of A and B; the gone uuid's state is retained.
    for state, boot, a, b in [(store_after, BOOT1, "superseded", "live"),
                              (store_after, BOOT2, "superseded", "orphaned"),
                              (store_before, BOOT1, "suspended", "constructed"),
                              (store_before, BOOT2, "orphaned", "orphaned")]:
        assert verdicts(state, boot) == {(UUID_H, hexluid(LUID_A)): a, (UUID_H, hexluid(LUID_B)): b,
                                         (UUID_GONE, "retained"): "retained"}, (state.name, boot)
    r = ulog_recover("list", "--state-dir", str(store_after), "--boot-id", BOOT1)
    lines = r.out.splitlines()
    assert lines[0].startswith(f"state dir {store_after}: dm-ulogd not running")
    header = lines[1]
    assert header.split() == ["uuid", "instance", "verdict", "state", "gen", "boot", "regions", "in", "sync",
                              "dirty", "committed"]
    row_a = next(i for i, ln in enumerate(lines) if hexluid(LUID_A) in ln and "superseded" in ln)
    assert lines[row_a + 1].strip().startswith(f"a newer state exists: luid {hexluid(LUID_B)}")
    # Columns line up: every row's verdict starts where the header's does.
    col = header.index("verdict")
    assert all(ln[col:].split()[0] in ("superseded", "live", "retained") for ln in lines[2:]
               if not ln.startswith(" "))
    r = ulog_recover("list", "--state-dir", str(store_after), "--uuid", UUID_GONE, "--json")
    (entry,) = r.json["entries"]
    assert entry["kind"] == "retained" and entry["region_count"] == 32 and entry["in_sync"] == 20


def test_kill9_at_random_points_around_resume_b(tmp_path: Path) -> None:
    """kill -9 while RESUME B is being handled: whatever landed, the tools agree with each
    other and with what the daemon does after a restart."""
    rng = random.Random(5)
    seen = set()
    for attempt, delay in enumerate((0.0, 0.0005, 0.001, 0.004)):
        tmp = tmp_path / f"a{attempt}"
        tmp.mkdir()
        state = tmp / "state"
        d = lmdb_daemon(tmp, state)
        conn = connect(d)
        a = UserspaceLog(conn, UUID_H, LUID_A, CTR)
        assert a.ctr() == 0 and a.resume() == 0
        for r in range(30):
            assert a.get_resync_work() == r
            a.set_region_sync(r, True)
        a.mark_region(3)
        assert a.flush() == 0
        b = UserspaceLog(conn, UUID_H, LUID_B, CTR)
        assert b.ctr() == 0
        assert a.presuspend() == 0 and a.postsuspend() == 0
        conn.timeout = 0.5
        t = threading.Thread(target=b.resume)
        t.start()
        if delay:
            time.sleep(rng.uniform(delay / 2, delay))
        d.kill9()
        t.join()
        conn.close()
        v = verdicts(state, BOOT1)
        got = (v[(UUID_H, hexluid(LUID_A))], v[(UUID_H, hexluid(LUID_B))])
        assert got in {("suspended", "constructed"), ("superseded", "live")}, got
        seen.add(got)
        assert ulog_recover("verify", "--state-dir", str(state), "--boot-id", BOOT1).rc == 0
        # After a reboot the newest state is adopted, whichever instance holds it.
        doc = dump_json(state, BOOT2)
        h = instances(doc, UUID_H)
        newest = max(h.values(), key=lambda i: i["generation"])
        bad = set(ranges_of(newest["out_of_sync_ranges"])) | set(ranges_of(newest["dirty_ranges"]))
        expect = 64 - len(bad)
        count, handed = resume_new_instance(tmp, state, BOOT2, UUID_H, LUID_C)
        assert count == expect == 64 - 34 - 1
        assert handed[0] == 3
    assert seen  # which cut happened is timing; both are accepted above


# --- verify -------------------------------------------------------------------------------------


def test_verify_real_stores_are_healthy(store_after: Path, store_before: Path) -> None:
    for state in (store_after, store_before):
        for boot in (BOOT1, BOOT2):
            r = ulog_recover("verify", "--state-dir", str(state), "--boot-id", boot)
            assert r.rc == 0, r.out
            assert "healthy: 2 store(s) checked, 0 problem(s)" in r.out
    r = ulog_recover("verify", UUID_H, "--state-dir", str(store_after), "--json")
    assert r.rc == 0
    doc = r.json
    assert doc["healthy"] is True and len(doc["stores"]) == 1
    (store,) = doc["stores"]
    # Records: per instance its meta record and its checkpoint record (layout 3), and the chunks.
    assert store["checked"] == {"lmdb_opened": True, "sub_databases": 6, "records": 8, "instances": 2,
                                "retained": False, "journals": 2}
    assert doc["journal"]["exists"] and doc["journal"]["damage"] == [] and doc["journal"]["findings"] == []
    assert {s["instance"]: s["in_sync"] for s in store["sync"]} == {hexluid(LUID_A): 40, hexluid(LUID_B): 38}


def test_verify_exit_codes(tmp_path: Path, store_after: Path) -> None:
    assert ulog_recover("verify", "--state-dir", str(tmp_path / "none")).rc == 2
    assert ulog_recover("verify", "LVM-unknown", "--state-dir", str(store_after)).rc == 2
    assert ulog_recover("verify", "--state-dir", str(store_after), "--bogus").rc == 2


def _engine_store(state: Path, regions: int = 100) -> None:
    """A store written through the engine and the LMDB backend (in-process): uuid LVM-v with a
    suspended instance 0x10 (gen > 0) and a constructed one 0x20, plus a retained state."""
    engine = Applier.over(LmdbBackend(state), boot_id=BOOT1)
    engine.restore()  # opens the journal, as the daemon does at start-up
    seq = iter(range(1, 10_000))

    def send(kind: RequestType, luid: int, data: bytes = b"", uuid: str = "LVM-v") -> None:
        reply = engine.handle_now(Request(luid=luid, uuid=uuid, version=3, seq=next(seq), request_type=kind,
                                          data=data))
        assert reply.error == 0, kind

    ctr = f"{regions * 8} core 8".encode()
    send(RequestType.CTR, 0x99, ctr, uuid="LVM-r")
    send(RequestType.RESUME, 0x99, uuid="LVM-r")
    send(RequestType.DTR, 0x99, uuid="LVM-r")
    send(RequestType.CTR, 0x10, ctr)
    send(RequestType.RESUME, 0x10)
    send(RequestType.SET_REGION_SYNC, 0x10, b"\x01" + bytes(7) + b"\x01" + bytes(7))
    send(RequestType.FLUSH, 0x10)
    send(RequestType.POSTSUSPEND, 0x10)
    send(RequestType.CTR, 0x20, ctr)
    engine.backend.close()


def _edit(state: Path, uuid: str, fn) -> None:
    env = lmdb.open(str(state / sf.encode_dir_name(uuid)), max_dbs=1024, subdir=True)
    try:
        with env.begin(write=True) as txn:
            fn(env, txn)
    finally:
        env.close()


def _meta(env, txn, luid: int) -> tuple[object, sf.MetaRecord]:
    name = sf.instance_db_name("meta", luid)
    db = env.open_db(name, txn=txn, create=False)
    return db, sf.MetaRecord.decode(sf.record_bytes(name, txn.get(sf.RECORD_KEY, db=db)))


def _put_meta(txn, db, meta: sf.MetaRecord) -> None:
    """Sealed, so that the invariant behind the checksum is what verify finds."""
    txn.put(sf.RECORD_KEY, sf.record_value(sf.instance_db_name("meta", meta.luid), meta.encode()), db=db)


def _set_checkpoint(env, txn, luid: int, journal_id: bytes | None = None,
                    position: int | None = None) -> None:
    """Rewrite an instance's checkpoint record (sealed, so what verify meets is the reference)."""
    name = sf.instance_db_name("meta", luid)
    db = env.open_db(name, txn=txn, create=False)
    old = sf.read_checkpoint_value(name, txn.get(sf.CHECKPOINT_KEY, db=db))
    new = sf.CheckpointRecord(journal_id if journal_id is not None else old.journal_id,
                              position if position is not None else old.position)
    txn.put(sf.CHECKPOINT_KEY, sf.checkpoint_value(name, new), db=db)


def _damage_journal_after_the_stores(state: Path) -> int:
    """Append three records of instance 0x20 to the journal, each synced (as a daemon would), then
    flip a bit of the second: the third says the journal was durable past it, so that is damage,
    not a torn tail, and it lies after every checkpoint of LVM-v. Returns its position."""
    found = jn.scan(state)
    j = jn.Journal(state)
    j.open(found, base=found.base)
    positions = []
    try:
        for region in (1, 2, 3):
            positions.append(j.position)
            body, count = jn.ops_body([(1, region)])
            j.append(jn.Kind.OPS, b"LVM-v", 0x20, body, count)
            j.sync()
    finally:
        j.close()
    seg = max(s for s in jn.scan(state).segments if s <= positions[1])
    path = state / jn.segment_name(seg)
    data = bytearray(path.read_bytes())
    data[jn.HEADER_BYTES + positions[1] - seg + 20] ^= 0x01  # a bit of its durable claim
    path.write_bytes(bytes(data))
    return positions[1]


def _findings(state: Path) -> list[tuple[str, str]]:
    r = ulog_recover("verify", "--state-dir", str(state), "--boot-id", BOOT1, "--json")
    found = [(f["level"], f["message"]) for s in r.json["stores"] for f in s["findings"]]
    return found + [(f["level"], f["message"]) for f in r.json["journal"]["findings"]], r.rc


def _as_layout_1(state: Path, uuid: str) -> None:
    """Rewrite a layout-3 store as layout 1 wrote it: the same values without their checksums, and
    no checkpoint records (layout 3 added them)."""
    def body(env, txn):
        for name, _ in list(txn.cursor()):
            if name.startswith(b"meta."):
                txn.delete(sf.CHECKPOINT_KEY, db=env.open_db(name, txn=txn, create=False))
            if name == sf.FORMAT_KEY:
                fmt = sf.read_format_value(txn.get(name))
                txn.put(name, sf.FormatRecordV1.build(dict(chunk_bytes=fmt.chunk_bytes, uuid=fmt.uuid,
                                                          created_at=fmt.created_at)))
                continue
            db = env.open_db(name, txn=txn, create=False)
            for key, value in list(txn.cursor(db=db)):
                txn.put(key, sf.unseal(name, key, value), db=db)
    _edit(state, uuid, body)


def test_tools_read_a_layout_1_store_and_note_the_migration(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _engine_store(state)
    before = ulog_dump("store", str(state), "--boot-id", BOOT1, "--per-region", "--json").json
    _as_layout_1(state, "LVM-v")
    found, rc = _findings(state)
    assert rc == 0 and ("note", "layout 1: values without checksums; the daemon migrates it to layout 3 "
                        "when it next opens it") in found, found
    after = ulog_dump("store", str(state), "--boot-id", BOOT1, "--per-region", "--json").json

    def logs(doc: dict) -> list:
        # The journal objects differ by design: layout 3 names a checkpoint, layout 1 a journal file.
        return [(st["uuid"], [{k: v for k, v in i.items() if k != "journal"} for i in st["instances"]],
                 st["retained"]) for st in doc["stores"]]

    assert logs(after) == logs(before)  # the same logs, bitmaps and verdicts
    journals = [i["journal"] for st in after["stores"] for i in st["instances"]]
    assert journals and all((j["layout"], j["exists"], j["checkpoint"]) == (1, False, None) for j in journals)
    assert [st["format"]["version"] for st in after["stores"] if st["uuid"] == "LVM-v"] == [1]


def test_verify_finds_each_broken_invariant(tmp_path: Path) -> None:
    cases = {}

    def put_chunk(env, txn, kind: str, index: int, bits: bytes) -> None:
        """Sealed, so that the invariant behind the checksum is what verify finds."""
        name, key = sf.instance_db_name(kind, 0x10), sf.encode_chunk_key(index)
        txn.put(key, sf.seal(name, key, bits), db=env.open_db(name, txn=txn, create=False))

    def padding(env, txn):
        name, key = sf.instance_db_name("sync", 0x10), sf.encode_chunk_key(0)
        chunk = bytearray(sf.unseal_chunk(name, key, txn.get(key, db=env.open_db(name, txn=txn))))
        chunk[-1] |= 0x80  # 100 regions: bits 100-103 are padding
        put_chunk(env, txn, "sync", 0, bytes(chunk))

    def flipped_bit(env, txn):
        db = env.open_db(sf.instance_db_name("clean", 0x10), txn=txn, create=False)
        chunk = bytearray(txn.get(sf.encode_chunk_key(0), db=db))
        chunk[3] ^= 0x10
        txn.put(sf.encode_chunk_key(0), bytes(chunk), db=db)

    def wrong_length(env, txn):
        put_chunk(env, txn, "clean", 0, bytes(5))

    def past_geometry(env, txn):
        put_chunk(env, txn, "clean", 3, bytes(13))

    def missing_chunk(env, txn):
        db = env.open_db(sf.instance_db_name("sync", 0x10), txn=txn, create=False)
        txn.delete(sf.encode_chunk_key(0), db=db)

    def same_generation(env, txn):
        _, a = _meta(env, txn, 0x10)
        db, b = _meta(env, txn, 0x20)
        b.generation, b.resumed = a.generation, True
        _put_meta(txn, db, b)

    def never_resumed_generation(env, txn):
        db, b = _meta(env, txn, 0x20)
        b.generation = 7
        _put_meta(txn, db, b)

    def superseded_but_newest(env, txn):
        db, a = _meta(env, txn, 0x10)
        a.superseded = True
        _put_meta(txn, db, a)

    def two_live(env, txn):
        for luid in (0x10, 0x20):
            db, m = _meta(env, txn, luid)
            m.state, m.resumed = "live", True
            _put_meta(txn, db, m)

    def leftover(env, txn):
        env.open_db(sf.instance_db_name("clean", 0x77), txn=txn, create=True)

    def bad_format(env, txn):
        txn.put(sf.FORMAT_KEY, sf.format_value(sf.FormatRecord(chunk_bytes=4076, uuid="LVM-other")))

    def other_journal(env, txn):
        _set_checkpoint(env, txn, 0x10, journal_id=bytes(range(16)))

    def journal_damage(state: Path) -> None:
        _damage_journal_after_the_stores(state)

    def foreign_segment(state: Path) -> None:
        """A segment of another journal (copied in from elsewhere) beside this journal's."""
        seg = jn.segment_name(1 << 40)
        (state / seg).write_bytes(jn.encode_segment_header(bytes(16), 1 << 40, 0, 1.0).ljust(8192, b"\0"))

    cases = {
        "padding": (padding, "warning", "padding bits past region 99 are set"),
        "flipped_bit": (flipped_bit, "error", "chunk 0 of clean.0000000000000010 fails its checksum"),
        "wrong_length": (wrong_length, "error", "chunk 0 holds 5 bytes, 13 expected for 100 regions"),
        "past_geometry": (past_geometry, "error", "chunk 3 lies past the 1 chunk(s) of 100 regions"),
        "missing_chunk": (missing_chunk, "warning", "chunk(s) 0 missing"),
        "same_generation": (same_generation, "error", "share a generation"),
        "never_resumed_generation": (never_resumed_generation, "warning", "never resumed but generation 7"),
        "superseded_but_newest": (superseded_but_newest, "warning",
                                  "is flagged superseded, yet no newer state"),
        "two_live": (two_live, "warning", "more than one instance is live in this boot"),
        "leftover": (leftover, "warning", "clean sub-database(s) without their meta"),
        "bad_format": (bad_format, "error", "format record names uuid 'LVM-other'"),
        "other_journal": (other_journal, "warning",
                          "its store follows journal 000102030405060708090a0b0c0d0e0f up to position"),
        "journal_damage": (journal_damage, "warning", "the journal is damaged at positions"),
        "foreign_segment": (foreign_segment, "warning", "belongs to another journal"),
    }
    for name, (fn, level, text) in cases.items():
        state = tmp_path / name / "state"
        _engine_store(state)
        before, rc = _findings(state)
        assert rc == 0 and not [f for f in before if f[0] != "note"], (name, before)
        if name in ("journal_damage", "foreign_segment"):
            fn(state)
        else:
            _edit(state, "LVM-v", fn)
        found, rc = _findings(state)
        assert rc == 1, (name, found)
        assert any(lv == level and text in msg for lv, msg in found), (name, found)
        out = ulog_recover("verify", "--state-dir", str(state), "--boot-id", BOOT1).out
        assert "PROBLEMS FOUND" in out and text in out


# --- the lock, confirmation, dry run --------------------------------------------------------------


def test_destructive_commands_refuse_while_the_daemon_runs(store_before: Path, tmp_path: Path) -> None:
    d = lmdb_daemon(tmp_path, store_before, BOOT2)
    try:
        before = dump_json(store_before, BOOT2)
        for argv in (["purge"], ["resync", UUID_H], ["import", UUID_H, "--disklog", str(tmp_path / "x")]):
            if argv[0] == "import":
                (tmp_path / "x").write_bytes(disklog.encode(REGIONS, b"\xff" * 8))
            r = ulog_recover(*argv, "--state-dir", str(store_before), "--boot-id", BOOT2, "--yes")
            assert r.rc == 1, (argv, r.out, r.err)
            assert f"dm-ulogd running (pid {d.proc.pid})" in r.err and "nothing" not in r.out
        after = dump_json(store_before, BOOT2)
        assert before["stores"] == after["stores"]
        # --force goes ahead, and says so.
        r = ulog_recover("resync", UUID_GONE, "--regions", "0", "--state-dir", str(store_before), "--boot-id",
                         BOOT2, "--yes", "--force")
        assert r.rc == 0, r.err
        assert "--force: dm-ulogd running" in r.err and "1 region(s) marked out of sync (0)" in r.out
    finally:
        assert d.stop() == 0


def test_not_a_terminal_without_yes_changes_nothing(store_before: Path) -> None:
    before = dump_json(store_before, BOOT2)
    r = ulog_recover("purge", "--state-dir", str(store_before), "--boot-id", BOOT2)
    assert r.rc == 1 and "stdin is not a terminal and --yes was not given: nothing changed" in r.err
    r = ulog_recover("purge", "--state-dir", str(store_before), "--boot-id", BOOT2, "--dry-run")
    assert r.rc == 0 and r.out.startswith("would (dry run, nothing changed):")
    assert r.out.count("purge uuid=") == 2
    r = ulog_recover("purge", "--state-dir", str(store_before), "--boot-id", BOOT2, "--dry-run", "--json")
    assert r.json["dry_run"] is True and len(r.json["changes"]) == 2
    assert dump_json(store_before, BOOT2)["stores"] == before["stores"]
    assert not (store_before / "lock").read_text()  # the tool's pid is gone from the lock file


@pytest.mark.parametrize(("answer", "rc"), [(b"y\n", 0), (b"n\n", 1)])
def test_confirmation_on_a_terminal(store_before: Path, answer: bytes, rc: int) -> None:
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "ulog_disk.tools.recover", "purge", "--state-dir", str(store_before),
           "--boot-id", BOOT2]
    p = subprocess.Popen(cmd, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(slave)
    os.write(master, answer)
    out, err = p.communicate(timeout=60)
    os.close(master)
    assert p.returncode == rc, (out, err)
    assert b"plan:" in err and b"make these 2 change(s)? [y/N]" in err
    remaining = verdicts(store_before, BOOT2)
    if rc == 0:
        assert out.count(b"purge uuid=") == 2
        assert (UUID_H, "retained") in remaining and (UUID_H, hexluid(LUID_A)) not in remaining
    else:
        assert b"not confirmed: nothing changed" in err and not out
        assert (UUID_H, hexluid(LUID_A)) in remaining


# --- purge ----------------------------------------------------------------------------------------


def test_purge_keeps_the_newest_orphaned_state_as_retained(store_before: Path, tmp_path: Path) -> None:
    """After a reboot: A (orphaned, the newest state) and B (orphaned, never resumed) go; A's state
    stays as the retained state, and a new instance adopts exactly it."""
    r = ulog_recover("purge", "--state-dir", str(store_before), "--boot-id", BOOT2, "--yes", "--json")
    assert r.rc == 0, r.err
    changes = {c["luid"]: c for c in r.json["changes"]}
    assert set(changes) == {LUID_A, LUID_B}
    assert changes[LUID_A]["kept_as_retained"] is True and changes[LUID_B]["kept_as_retained"] is False
    doc = dump_json(store_before, BOOT2)
    h = instances(doc, UUID_H)
    assert set(h) == {"retained"}
    ret = h["retained"]
    assert (ret["out_of_sync_ranges"], ret["dirty_ranges"]) == (A_OUT_OF_SYNC, A_DIRTY)
    assert ret["source_luid"] == LUID_A
    assert not any(n.startswith("journal.") for n in os.listdir(store_before / sf.encode_dir_name(UUID_H)))
    assert ulog_recover("verify", "--state-dir", str(store_before), "--boot-id", BOOT2).rc == 0
    count, handed = resume_new_instance(tmp_path, store_before, BOOT2, UUID_H, LUID_C)
    assert count == REGIONS - 24 - 2
    assert handed == [5, 6, *range(40, 64)]


def test_purge_superseded_in_this_boot(store_after: Path) -> None:
    r = ulog_recover("purge", "--state-dir", str(store_after), "--boot-id", BOOT1, "--yes")
    assert r.rc == 0, r.err
    assert r.out.startswith(f"purge uuid='{UUID_H}' luid={hexluid(LUID_A)} (superseded, suspended")
    assert "kept as the retained state" not in r.out
    assert verdicts(store_after, BOOT1) == {(UUID_H, hexluid(LUID_B)): "live",
                                            (UUID_GONE, "retained"): "retained"}
    r = ulog_recover("purge", "--state-dir", str(store_after), "--boot-id", BOOT1, "--yes")
    assert r.rc == 0 and r.out.strip() == "nothing to do"


# --- resync ---------------------------------------------------------------------------------------


def test_resync_of_a_suspended_instance_is_handed_out_at_the_next_resume(store_before: Path,
                                                                         tmp_path: Path) -> None:
    """Same boot, daemon restarted: B's RESUME adopts A's state, resynced regions included."""
    r = ulog_recover("resync", UUID_H, "--regions", "0-3,10", "--state-dir", str(store_before), "--boot-id",
                     BOOT1, "--yes", "--json")
    assert r.rc == 0, r.err
    (change,) = r.json["changes"]
    assert change["target"] == hexluid(LUID_A) and change["newly_out_of_sync"] == "0-3,10"
    assert change["in_sync_after"] == 40 - 5
    h = instances(dump_json(store_before, BOOT1), UUID_H)
    a = h[hexluid(LUID_A)]
    assert (a["out_of_sync_ranges"], a["dirty_ranges"]) == ("0-3,10,40-63", "0-3,5-6,10")
    d = lmdb_daemon(tmp_path, store_before, BOOT1)
    try:
        conn = connect(d)
        b = UserspaceLog(conn, UUID_H, LUID_B, CTR)
        b.region_count = REGIONS
        assert b.resume() == 0
        assert b.get_sync_count() == REGIONS - 5 - 2 - 24
        assert [b.get_resync_work() for _ in range(1)] == [0]
        conn.close()
    finally:
        assert d.stop() == 0


def test_resync_folds_the_journal_and_refuses_live_without_force(tmp_path: Path) -> None:
    state = tmp_path / "state"
    d = lmdb_daemon(tmp_path, state)
    conn = connect(d)
    log = UserspaceLog(conn, UUID_H, LUID_A, CTR)
    assert log.ctr() == 0 and log.resume() == 0
    for r in range(REGIONS):
        assert log.get_resync_work() == r
        log.set_region_sync(r, True)
    assert log.flush() == 0 or True
    # Journaled, never committed: MARK 9 and a region that fell out of sync.
    assert conn.send_request(UUID_H, LUID_A, RequestType.FLUSH)[0] == 0
    assert conn.send_request(UUID_H, LUID_A, RequestType.MARK_REGION, (9).to_bytes(8, "little"))[0] == 0
    log.set_region_sync(12, False)
    d.kill9()
    conn.close()
    a = instances(dump_json(state, BOOT1), UUID_H)[hexluid(LUID_A)]
    # How many records the background checkpoints had taken in is timing; MARK 9 and the
    # out-of-sync 12 came after the last FLUSH, so no checkpoint has them.
    folded = a["journal"]["ops"]
    assert folded >= 2 and a["journal"]["records"] >= 2 and a["journal"]["replayed"]
    assert (a["dirty_ranges"], a["out_of_sync_ranges"]) == ("9", "12")
    a2 = instances(dump_json(state, BOOT2), UUID_H)[hexluid(LUID_A)]
    # Another boot: every record found is replayed too (a host crash keeps a prefix of the
    # journal, at least every answered FLUSH); the engine then turns dirty regions out of sync.
    assert (a2["dirty_ranges"], a2["out_of_sync_ranges"]) == ("9", "12")
    assert (a2["journal"]["same_boot"], a2["journal"]["ops"], a2["journal"]["dropped"]) == (False, folded, 0)
    base = ["--state-dir", str(state), "--boot-id", BOOT1, "--yes"]
    r = ulog_recover("resync", UUID_H, "--regions", "20", *base)
    assert r.rc == 1 and "live in this boot" in r.err
    r = ulog_recover("resync", UUID_H, "--regions", "20", *base, "--force")
    assert r.rc == 0, r.err
    assert (f"its {folded} journal op(s), from {a['journal']['records']} journal record(s) after its "
            "checkpoint, are folded into this commit") in r.out
    a = instances(dump_json(state, BOOT1), UUID_H)[hexluid(LUID_A)]
    # The checkpoint moved to the journal's end: the records folded are not replayed again.
    assert (a["journal"]["ops"], a["journal"]["records"]) == (0, 0)
    assert (a["dirty_ranges"], a["out_of_sync_ranges"]) == ("9,20", "12,20")
    # The daemon restarted in the same boot continues the instance from exactly that.
    d = lmdb_daemon(tmp_path, state, name="again")
    try:
        conn = connect(d)
        log = UserspaceLog(conn, UUID_H, LUID_A, CTR)
        assert log.is_clean(9) is False and log.in_sync(12) is False and log.in_sync(20) is False
        assert log.get_sync_count() == REGIONS - 2
        conn.close()
    finally:
        assert d.stop() == 0


def test_resync_arguments(store_after: Path) -> None:
    base = ["--state-dir", str(store_after), "--boot-id", BOOT2, "--yes"]
    assert ulog_recover("resync", UUID_H, "--regions", "60-70", *base).rc == 2
    assert ulog_recover("resync", UUID_H, "--regions", "x", *base).rc == 2
    assert ulog_recover("resync", "LVM-none", *base).rc == 2
    r = ulog_recover("resync", UUID_H, "--regions", "40-45", *base)
    assert r.rc == 0 and r.out.strip() == "nothing to do"  # already out of sync
    r = ulog_recover("resync", UUID_GONE, *base)
    assert "20 region(s) marked out of sync (0-19)" in r.out and "now 0/32 in sync" in r.out


# --- backup -------------------------------------------------------------------------------------


def test_backup_and_restore(store_after: Path, tmp_path: Path) -> None:
    dest = tmp_path / "backup"
    r = ulog_recover("backup", str(dest), "--state-dir", str(store_after), "--json")
    assert r.rc == 0, r.err
    assert r.json["ok"] and {s["uuid"] for s in r.json["stores"]} == {UUID_H, UUID_GONE}
    segments = sorted(n for n in os.listdir(store_after) if jn.parse_segment_name(n) is not None)
    assert segments and r.json["journal"]["segments"] == segments and r.json["journal"]["damage"] == []
    assert {n for n in os.listdir(dest)} == {sf.encode_dir_name(UUID_H), sf.encode_dir_name(UUID_GONE),
                                              "backup.json", *segments}
    for name in segments:  # the daemon is stopped: the copy is exact
        assert (dest / name).read_bytes() == (store_after / name).read_bytes()
    assert ulog_recover("backup", str(dest), "--state-dir", str(store_after)).rc == 2  # not empty
    restored = tmp_path / "restored"
    shutil.copytree(dest, restored)
    original = dump_json(store_after, BOOT2)
    again = dump_json(restored, BOOT2)
    strip = ("path", "data_bytes", "lmdb")
    for a, b in zip(original["stores"], again["stores"], strict=True):
        for key in strip:
            a.pop(key), b.pop(key)
        for inst in [*a["instances"], b["retained"] or {}, a["retained"] or {}, *b["instances"]]:
            if inst.get("journal"):
                inst["journal"].pop("path")
        assert a == b
    assert ulog_recover("verify", "--state-dir", str(restored), "--boot-id", BOOT2).rc == 0
    count, handed = resume_new_instance(tmp_path, restored, BOOT2, UUID_H, LUID_C)
    assert count == REGIONS - 26 and handed[:2] == [5, 6]


# --- export / import ------------------------------------------------------------------------------


def test_export_import_round_trip(store_after: Path, tmp_path: Path) -> None:
    log1, log2 = tmp_path / "b.log", tmp_path / "copy.log"
    at = ["--state-dir", str(store_after), "--boot-id"]
    r = ulog_recover("export", UUID_H, "--disklog", str(log1), *at, BOOT1)
    assert r.rc == 1 and "live in this boot" in r.err and not log1.exists()
    r = ulog_recover("export", UUID_H, "--disklog", str(log1), *at, BOOT2, "--json")
    assert r.rc == 0, r.err
    doc = r.json
    assert (doc["source"], doc["source_verdict"], doc["nr_regions"], doc["log_version"]) == (
        hexluid(LUID_B), "orphaned", REGIONS, 2)
    assert (doc["clean"], doc["not_clean_ranges"], doc["region_size"]) == (38, B_OUT_OF_SYNC, 8)
    data = log1.read_bytes()
    assert len(data) == 1536 and oct(log1.stat().st_mode & 0o777) == "0o600"
    info = disklog.inspect(data)
    assert info.kind == "valid" and info.nr_regions == REGIONS
    assert ulog_dump("disklog", str(log1), "--json").json["not_clean_ranges"] == B_OUT_OF_SYNC

    r = ulog_recover("import", "LVM-copy", "--disklog", str(log1), *at, BOOT2, "--yes")
    assert r.rc == 0, r.err
    assert r.out.startswith(f"import {log1} into uuid='LVM-copy' as its retained state: generation 1 (no "
                            f"retained state before), {REGIONS} regions, 38 in sync, 26 to resync "
                            f"({B_OUT_OF_SYNC})")
    ret = instances(dump_json(store_after, BOOT2), "LVM-copy")["retained"]
    assert ret["source_luid"] == 0
    assert (ret["out_of_sync_ranges"], ret["dirty_ranges"]) == (B_OUT_OF_SYNC, B_OUT_OF_SYNC)
    assert "imported from a disk log" in ret["reason"]
    r = ulog_recover("export", "LVM-copy", "--disklog", str(log2), "--state-dir", str(store_after))
    assert r.rc == 0, r.err
    assert log2.read_bytes() == data  # the round trip is exact
    # Importing over an existing state takes a generation above every other.
    r = ulog_recover("import", UUID_H, "--disklog", str(log1), *at, BOOT2, "--yes", "--json")
    (change,) = r.json["changes"]
    gens = [i["generation"] for i in instances(dump_json(store_after, BOOT2), UUID_H).values()]
    assert change["generation"] == max(gens) and sorted(gens)[-2] < change["generation"]
    # And dm-ulogd adopts it: only the regions not clean in the disk log are resynced.
    count, handed = resume_new_instance(tmp_path, store_after, BOOT2, "LVM-copy", LUID_C)
    assert count == 38 and handed == ranges_of(B_OUT_OF_SYNC)


def test_export_refusals(store_after: Path, tmp_path: Path) -> None:
    base = ["--state-dir", str(store_after), "--boot-id", BOOT2]
    out = tmp_path / "x.log"
    r = ulog_recover("export", UUID_H, "--disklog", str(out), "--sectors", "1024", "--region-size", "8",
                     *base)
    assert r.rc == 1 and "makes 128" in r.err
    assert ulog_recover("export", UUID_H, "--disklog", str(out), "--sectors", "512", "--region-size", "8",
                        *base).rc == 0
    r = ulog_recover("export", UUID_H, "--disklog", str(out), *base)
    assert r.rc == 1 and "--overwrite" in r.err
    assert ulog_recover("export", UUID_H, "--disklog", str(out), "--overwrite", *base).rc == 0
    assert ulog_recover("export", "LVM-none", "--disklog", str(out), "--overwrite", *base).rc == 2
    assert ulog_recover("export", UUID_H, "--disklog", str(out), "--sectors", "512", *base).rc == 2
    # live in this boot: --force exports its last commit
    r = ulog_recover("export", UUID_H, "--disklog", str(out), "--overwrite", "--force", "--state-dir",
                     str(store_after), "--boot-id", BOOT1)
    assert r.rc == 0 and "exported the last commit of a live instance" in r.err


def test_import_geometry_and_refusals(store_after: Path, tmp_path: Path) -> None:
    base = ["--state-dir", str(store_after), "--boot-id", BOOT2, "--yes"]
    lvm = tmp_path / "lvm.log"
    header = disklog.DiskLogHeader.build(dict(magic=disklog.MIRROR_MAGIC, version=2,
                                              nr_regions=disklog.LVM_FRESH_NR_REGIONS))
    lvm.write_bytes(header.ljust(4096, b"\0"))
    r = ulog_recover("import", "LVM-new", "--disklog", str(lvm), *base)
    assert r.rc == 1 and "fresh-log marker" in r.err and "--sectors" in r.err
    r = ulog_recover("import", "LVM-new", "--disklog", str(lvm), "--sectors", "800", "--region-size", "8",
                     *base)
    assert r.rc == 0 and "100 regions, 0 in sync, 100 to resync (0-99)" in r.out
    zero = tmp_path / "zero.log"
    zero.write_bytes(bytes(2048))
    r = ulog_recover("import", "LVM-new2", "--disklog", str(zero), *base)
    assert r.rc == 1 and "all zeros" in r.err
    bad = tmp_path / "v7.log"
    v7 = disklog.DiskLogHeader.build(dict(magic=disklog.MIRROR_MAGIC, version=7, nr_regions=8))
    bad.write_bytes(v7 + bytes(2000))
    r = ulog_recover("import", "LVM-new2", "--disklog", str(bad), *base)
    assert r.rc == 1 and "unknown version 7" in r.err
    # Grown mirror: regions past the log's nr_regions are dirty, as the kernel would have them.
    small = tmp_path / "small.log"
    small.write_bytes(disklog.encode(32, b"\xff" * 4))
    r = ulog_recover("import", "LVM-grown", "--disklog", str(small), "--region-count", "40", *base)
    assert r.rc == 0 and "40 regions, 32 in sync, 8 to resync (32-39)" in r.out
    assert "regions from 32 on are taken as dirty" in r.err
    # A live instance of this boot: refused without --force.
    r = ulog_recover("import", UUID_H, "--disklog", str(small), "--region-count", str(REGIONS), "--state-dir",
                     str(store_after), "--boot-id", BOOT1, "--yes")
    assert r.rc == 1 and "live in this boot" in r.err
    assert ulog_recover("import", UUID_H, "--disklog", str(tmp_path / "missing"), *base).rc == 2
    # A new state directory is created for an import.
    fresh = tmp_path / "fresh-state"
    r = ulog_recover("import", "LVM-x", "--disklog", str(small), "--state-dir", str(fresh), "--yes")
    assert r.rc == 0, r.err
    assert oct(fresh.stat().st_mode & 0o777) == "0o700"
    assert verdicts(fresh, BOOT1) == {("LVM-x", "retained"): "retained"}


def test_damaged_store_is_never_changed(store_after: Path, tmp_path: Path) -> None:
    def corrupt(env, txn):
        db = env.open_db(sf.instance_db_name("clean", LUID_A), txn=txn, create=False)
        txn.put(sf.encode_chunk_key(0), b"short", db=db)

    _edit(store_after, UUID_H, corrupt)
    assert verdicts(store_after, BOOT2)[(UUID_H, hexluid(LUID_A))] == "damaged"
    base = ["--state-dir", str(store_after), "--boot-id", BOOT2, "--yes"]
    for argv in (["purge"], ["resync", UUID_H]):
        r = ulog_recover(*argv, *base)
        assert r.rc == 1 and "damaged" in r.err, argv
    small = tmp_path / "s.log"
    small.write_bytes(disklog.encode(REGIONS, bytes(8)))
    r = ulog_recover("import", UUID_H, "--disklog", str(small), *base)
    assert r.rc == 1 and ".damaged-manual" in r.err


# --- help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["list", "verify", "purge", "resync", "backup", "export", "import"])
def test_help_is_complete(cmd: str) -> None:
    r = ulog_recover(cmd, "--help")
    assert r.rc == 0
    assert "examples:" in r.out and "--json" in r.out and "--state-dir" in r.out
    # Said once, in the top-level help (and the man page), not under every command.
    assert "exit status:" not in r.out
    if cmd in ("purge", "resync", "import"):
        assert "--yes" in r.out and "--force" in r.out and "--dry-run" in r.out and "not a terminal" in r.out
    top = ulog_recover("--help").out
    assert top.count(f"\n    {cmd} ") == 1 and "exit status:" in top


def test_console_script_is_installed() -> None:
    exe = Path(sys.executable).parent / "ulog-recover"
    p = subprocess.run([str(exe), "list", "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "orphaned" in p.stdout


# --- the journal: the tools say what the daemon's restore does ---------------------------------


def _restored_bitmaps(state: Path) -> dict[int, tuple[str, str]]:
    """What the daemon's restore makes of LVM-v's instances: luid → (dirty, out of sync) ranges."""
    engine = Applier.over(LmdbBackend(state), boot_id=BOOT1)
    try:
        engine.restore()
        out = {}
        for (uuid, luid), inst in engine.table.items():
            if uuid == "LVM-v":
                n = inst.log.region_count
                out[luid] = (bit_ranges(inst.log.clean[:n], 0), bit_ranges(inst.log.sync[:n], 0))
        return out
    finally:
        engine.backend.close()


def test_journal_damage_after_a_checkpoint_is_what_the_restore_sees(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _engine_store(state)
    bad = _damage_journal_after_the_stores(state)
    doc = dump_json(state)
    assert [(d["start"] == bad, "durable" in d["reason"]) for d in doc["journal"]["damage"]] == [(True, True)]
    v = instances(doc, "LVM-v")
    for luid in (0x10, 0x20):
        inst = v[hexluid(luid)]
        assert "the journal is damaged at positions" in inst["journal"]["damaged"]
        # All dirty and out of sync, as the daemon's restore takes it.
        assert (inst["in_sync"], inst["dirty"]) == (0, 100)
        assert any(f["level"] == "warning" and "full resync" in f["message"] for f in inst["findings"])
    j = ulog_dump("journal", str(state), "--boot-id", BOOT1, "--json").json
    assert {i["luid"]: bool(i["damaged"]) for i in j["instances"]} == {0x10: True, 0x20: True}
    assert "DAMAGE" in ulog_dump("journal", str(state), "--boot-id", BOOT1).out
    assert ulog_recover("verify", "--state-dir", str(state), "--boot-id", BOOT1).rc == 1
    restored = _restored_bitmaps(state)
    assert restored == {luid: (v[hexluid(luid)]["dirty_ranges"], v[hexluid(luid)]["out_of_sync_ranges"])
                        for luid in (0x10, 0x20)} == {0x10: ("0-99", "0-99"), 0x20: ("0-99", "0-99")}


def test_tools_replay_what_the_restore_replays(tmp_path: Path) -> None:
    """Records after the checkpoint (this boot): the tools show them replayed, as the daemon does."""
    state = tmp_path / "state"
    _engine_store(state)
    found = jn.scan(state)
    j = jn.Journal(state)
    j.open(found, base=found.base)
    try:
        for ops in ([(1, 1), (1, 51)], [(2, 1)], [(4, 60)]):
            body, count = jn.ops_body(ops)
            j.append(jn.Kind.OPS, b"LVM-v", 0x10, body, count)
        j.sync()
    finally:
        j.close()
    a = instances(dump_json(state), "LVM-v")[hexluid(0x10)]
    assert (a["journal"]["records"], a["journal"]["ops"], a["journal"]["damaged"]) == (3, 4, None)
    # Region 1 (the one in sync) marked then cleared: clean again; 51 (out of sync) stays dirty.
    assert (a["dirty_ranges"], a["out_of_sync_ranges"]) == ("51", "0,2-99")
    assert _restored_bitmaps(state)[0x10] == (a["dirty_ranges"], a["out_of_sync_ranges"])


def test_a_checkpoint_past_the_journal_end_is_fine(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _engine_store(state)
    end = jn.scan(state).end
    _edit(state, "LVM-v", lambda env, txn: _set_checkpoint(env, txn, 0x10, position=end + (1 << 20)))
    found, rc = _findings(state)
    assert rc == 0, found
    assert any(lv == "note" and "past the journal's end" in msg for lv, msg in found)


def test_a_layout_2_store_shows_what_its_migration_folds_in(tmp_path: Path) -> None:
    """A layout-2 store with its instance's own journal file (same boot, following the meta's
    commit): the tools show the file's ops folded in and the migration noted; the daemon's
    migration restores exactly that, and removes the file."""
    state = tmp_path / "state"
    _engine_store(state)
    seqs = []

    def as_layout_2(env, txn):
        for name, _ in list(txn.cursor()):
            if name.startswith(b"meta."):
                txn.delete(sf.CHECKPOINT_KEY, db=env.open_db(name, txn=txn, create=False))
        fmt = sf.read_format_value(txn.get(sf.FORMAT_KEY))
        record = sf.FormatRecordV2.build(dict(chunk_bytes=fmt.chunk_bytes, uuid=fmt.uuid,
                                              created_at=fmt.created_at))
        txn.put(sf.FORMAT_KEY, sf.seal(sf.MAIN_DB, sf.FORMAT_KEY, record))
        seqs.append(_meta(env, txn, 0x10)[1].commit_seq)

    _edit(state, "LVM-v", as_layout_2)
    old = state / sf.encode_dir_name("LVM-v") / sf.journal_file_name(0x10)
    ops = sf.encode_journal_ops([(1, 1), (4, 1), (1, 70)])
    old.write_bytes(sf.JournalHeader(0x10, seqs[0]).encode() + ops)
    os.chmod(old, 0o600)
    found, rc = _findings(state)
    assert rc == 0 and any(lv == "note" and msg.startswith("layout 2: the daemon migrates it to layout 3")
                           for lv, msg in found), found
    a = instances(dump_json(state), "LVM-v")[hexluid(0x10)]
    j = a["journal"]
    assert (j["layout"], j["exists"], j["follows_meta"], j["replayed"], j["ops"]) == (2, True, True, True, 3)
    assert (a["dirty_ranges"], a["out_of_sync_ranges"]) == ("1,70", "0-99")
    assert _restored_bitmaps(state)[0x10] == (a["dirty_ranges"], a["out_of_sync_ranges"])
    assert not old.exists()
    after = instances(dump_json(state), "LVM-v")[hexluid(0x10)]
    assert after["journal"]["layout"] == 3 and after["journal"]["damaged"] is None
    assert (after["dirty_ranges"], after["out_of_sync_ranges"]) == ("1,70", "0-99")
