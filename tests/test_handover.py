"""Hand-over, retention, restart and resize through the engine on the LMDB store.

Every sequence is driven with kernel requests in the kernel's order (protocol ref §5.4, §5.5,
§5.7) through ``Applier.handle_now``, and checks both the replies and what sits in the store.
"""

from __future__ import annotations

import errno
import os

import lmdb
import pytest

from ulog_disk.daemon.applier import Applier
from ulog_disk.log import regionlog
from ulog_disk.log.records import OP_CLEAR
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import RequestType
from ulog_disk.storage import journal as jn
from ulog_disk.storage import store_format as sf
from ulog_disk.storage.lmdb_store import LmdbBackend
from ulog_disk.testing.kernel import Kernel

UUID = "LVM-mirror0123456789"
#: Three chunks per bitmap, so chunk-level effects (tail deletion, partial writes) show.
REGIONS = 2 * regionlog.CHUNK_BITS + 1000


def ctr_text(regions: int = REGIONS, mode: str = "", log_type: str = "core") -> str:
    dev = " 253:3" if log_type == "disk" else ""
    return f"{regions * 8} {log_type}{dev} 8" + (f" {mode}" if mode else "")


def start(state_dir, boot_id: str = "b1") -> tuple[Applier, Kernel]:
    engine = Applier.over(LmdbBackend(state_dir), boot_id=boot_id)
    engine.restore()
    return engine, Kernel(engine, uuid=UUID, ctr=ctr_text())


def stop(engine: Applier) -> None:
    """Close the store without committing anything: as far as the store is concerned, the same
    as a kill -9 (the journal is written through to the page cache at every request)."""
    engine.backend.close()


def store_dbs(engine: Applier, uuid: str = UUID) -> set[bytes]:
    return {name for name in engine.backend.contents(uuid) if name}


def luid_dbs(luid: int) -> set[bytes]:
    return {sf.instance_db_name(kind, luid) for kind in ("meta", "clean", "sync")}


RETAINED = {sf.RETAINED_META, sf.RETAINED_CLEAN, sf.RETAINED_SYNC}


def checkpoint_all(engine: Applier) -> None:
    """Run every checkpoint the daemon would run in the background."""
    while engine.unstored:
        pending = engine.checkpoint(next(iter(engine.unstored)))
        if pending is not None:
            assert pending.job is not None
            engine.complete_now(pending)


def stored_bitmaps(engine: Applier, luid: int | None, uuid: str = UUID) -> tuple[int, bytes, bytes]:
    """(region count, clean, sync) as the store holds them once the background checkpoints have
    run (``luid=None``: the retained state)."""
    checkpoint_all(engine)
    contents = engine.backend.contents(uuid)
    if luid is None:
        raw = sf.record_bytes(sf.RETAINED_META, contents[sf.RETAINED_META][sf.RECORD_KEY])
        count = sf.RetainedRecord.decode(raw).region_count
        names = (sf.RETAINED_CLEAN, sf.RETAINED_SYNC)
    else:
        name = sf.instance_db_name("meta", luid)
        count = sf.MetaRecord.decode(sf.record_bytes(name, contents[name][sf.RECORD_KEY])).region_count
        names = (sf.instance_db_name("clean", luid), sf.instance_db_name("sync", luid))
    maps = []
    for name in names:
        maps.append(sf.read_bitmap(name, contents[name], count, regionlog.CHUNK_BYTES))
    return count, maps[0], maps[1]


def memory_bitmaps(engine: Applier, luid: int, uuid: str = UUID) -> tuple[int, bytes, bytes]:
    log = engine.table[(uuid, luid)].log
    return log.region_count, log.clean.tobytes(), log.sync.tobytes()


def unsynced(engine: Applier, luid: int, uuid: str = UUID) -> list[int]:
    return engine.table[(uuid, luid)].log.unsynced_regions()


def dirty(engine: Applier, luid: int, uuid: str = UUID) -> list[int]:
    return engine.table[(uuid, luid)].log.dirty_regions()


def live_instance_with_traffic(k: Kernel, luid: int = 1, mode: str = "nosync") -> None:
    """A live instance, in sync, with: 10 marked and cleared, 40000 and 60000 marked and flushed,
    50000 marked (journal only) — the kernel's usual mix."""
    k.ctr(ctr_text(mode=mode), luid)
    k.resume(luid)
    k.mark([10, 40000], luid)
    k.flush(luid=luid)
    k.clear([10], luid)
    k.flush([60000], luid)
    k.mark([50000], luid)


# --- item 4: the four sequences -------------------------------------------------------------------


def test_load_b_while_a_live_then_switch(tmp_path):
    engine, k = start(tmp_path)
    live_instance_with_traffic(k, 1)
    k.ctr(ctr_text(mode="nosync"), 2)
    assert store_dbs(engine) == luid_dbs(1) | luid_dbs(2)
    # The inactive table's traffic: B answers from its own (fresh) state, A's is untouched.
    assert k.is_clean(40000, 2) and k.in_sync(40000, 2)
    assert not k.is_clean(40000, 1)
    k.mark([70], 1)
    k.flush(luid=1)
    k.ok(RequestType.PRESUSPEND, luid=1)
    k.clear([70], 1)  # a late clear after PRESUSPEND
    k.ok(RequestType.POSTSUSPEND, luid=1)
    a_final = memory_bitmaps(engine, 1)
    assert stored_bitmaps(engine, 1) == a_final  # POSTSUSPEND committed A's last state
    k.resume(2)
    k.dtr(1)
    # B has A's last state, taken over by a new kernel instance: A's dirty regions are out of sync.
    assert dirty(engine, 2) == [40000, 50000, 60000]
    assert unsynced(engine, 2) == [40000, 50000, 60000]
    assert k.sync_count(2) == REGIONS - 3
    assert k.work(2) == (1, 40000)
    assert k.is_clean(10, 2) and k.in_sync(70, 2)
    # A's sub-databases are gone; B's hold exactly B's state; nothing retained (B lives on).
    assert store_dbs(engine) == luid_dbs(2)
    assert stored_bitmaps(engine, 2) == memory_bitmaps(engine, 2)
    stop(engine)


def test_load_b_then_clear_the_inactive_table(tmp_path):
    engine, k = start(tmp_path)
    live_instance_with_traffic(k, 1)
    k.flush(luid=1)
    before_memory = memory_bitmaps(engine, 1)
    before_meta = engine.backend.contents(UUID)[sf.instance_db_name("meta", 1)]
    k.ctr(ctr_text(mode="nosync"), 2)
    assert k.is_clean(5, 2) and k.sync_count(2) == REGIONS
    k.dtr(2)
    assert store_dbs(engine) == luid_dbs(1)
    assert engine.backend.contents(UUID)[sf.instance_db_name("meta", 1)] == before_meta
    assert memory_bitmaps(engine, 1) == before_memory == stored_bitmaps(engine, 1)
    # A serves on.
    k.mark([7], 1)
    k.flush(luid=1)
    assert not k.is_clean(7, 1) and k.sync_count(1) == REGIONS
    stop(engine)


def test_reconnect_resume_of_b_while_a_live_does_not_steal(tmp_path):
    engine, k = start(tmp_path)
    live_instance_with_traffic(k, 1)
    k.ctr(ctr_text(), 2)  # B without nosync: a fresh B is all out of sync, unlike A
    k.resume(2)  # the kernel's reconnect path resumes B while A is live
    assert k.sync_count(2) == 0 and dirty(engine, 2) == []
    # A keeps serving with its own state.
    k.mark([80], 1)
    k.flush(luid=1)
    assert dirty(engine, 1) == [80, 40000, 50000, 60000]
    assert k.sync_count(1) == REGIONS
    assert stored_bitmaps(engine, 1) == memory_bitmaps(engine, 1)
    assert store_dbs(engine) == luid_dbs(1) | luid_dbs(2)
    # The real switch: A suspends, B resumes and adopts A's state.
    k.suspend(1)
    k.resume(2)
    k.dtr(1)
    assert unsynced(engine, 2) == [80, 40000, 50000, 60000]
    assert k.sync_count(2) == REGIONS - 4
    assert store_dbs(engine) == luid_dbs(2)
    assert stored_bitmaps(engine, 2) == memory_bitmaps(engine, 2)
    stop(engine)


@pytest.mark.parametrize("restart", [False, True], ids=["same-daemon", "after-restart"])
def test_remove_and_create_again_adopts_the_retained_state(tmp_path, restart):
    engine, k = start(tmp_path)
    live_instance_with_traffic(k, 1)
    k.ok(RequestType.PRESUSPEND, luid=1)
    k.ok(RequestType.POSTSUSPEND, luid=1)
    k.dtr(1)
    assert store_dbs(engine) == RETAINED
    assert stored_bitmaps(engine, None)[1:] == (
        engine.engine.gone[UUID][0].clean, engine.engine.gone[UUID][0].sync)
    if restart:
        stop(engine)
        engine, k = start(tmp_path)
        assert engine.table == {} and engine.engine.gone[UUID][0].source_luid == 1
    k.ctr(ctr_text(), 3)
    k.resume(3)
    # Dirty at the removal: out of sync. Nothing else is (no full resync, although no nosync).
    assert unsynced(engine, 3) == [40000, 50000, 60000]
    assert k.sync_count(3) == REGIONS - 3
    assert store_dbs(engine) == RETAINED | luid_dbs(3)
    assert stored_bitmaps(engine, 3) == memory_bitmaps(engine, 3)
    stop(engine)


# --- item 5: restart ------------------------------------------------------------------------------


def test_restart_same_boot_continues_the_state_exactly(tmp_path):
    engine, k = start(tmp_path)
    k.ctr(ctr_text(mode="nosync"), 1)
    k.resume(1)
    k.mark([5, 6], 1)
    k.flush(luid=1)
    k.clear([5], 1)          # journal only
    k.mark([9], 1)           # journal only: answered, not flushed
    k.set_sync(7, 0, 1)  # journal only
    expected = memory_bitmaps(engine, 1)
    stop(engine)  # kill -9

    engine, k = start(tmp_path)
    # Answered at once, without a CTR: the table was rebuilt from the store and the journal.
    assert memory_bitmaps(engine, 1) == expected
    assert k.is_clean(5, 1) and not k.is_clean(6, 1) and not k.is_clean(9, 1)
    assert k.in_sync(6, 1) and k.in_sync(9, 1) and not k.in_sync(7, 1)
    assert k.sync_count(1) == REGIONS - 1
    # The kernel's reconnect (CTR with its NUL, RESUME) resumes the stored state as it is:
    # marked regions stay dirty and in sync until the kernel clears them.
    k.ctr(ctr_text(mode="nosync"), 1, reconnect=True)
    k.resume(1)
    assert memory_bitmaps(engine, 1) == expected
    assert k.work(1) == (1, 7)
    k.clear([6, 9], 1)
    k.flush(luid=1)
    assert dirty(engine, 1) == []
    assert stored_bitmaps(engine, 1) == memory_bitmaps(engine, 1)
    stop(engine)


def test_restart_after_a_reboot_resyncs_the_marked_regions_only(tmp_path):
    engine, k = start(tmp_path, boot_id="b1")
    k.ctr(ctr_text(mode="nosync"), 1)
    k.resume(1)
    k.mark([5, 6, 7], 1)
    k.flush(luid=1)         # 5, 6 and 7: marks covered by an acknowledged FLUSH
    k.mark([8], 1)       # answered, never flushed
    k.clear([6], 1)      # answered (its writes are done), never flushed: in the journal, not synced
    stop(engine)
    # What a host crash may leave of the records after the last sync: here the clear was not
    # written back. The journal ends after the mark of 8.
    found = jn.scan(tmp_path)
    last = found.records[-1]
    assert last.kind is jn.Kind.OPS and last.ops == [(OP_CLEAR, 6)]
    segment = tmp_path / jn.segment_name(max(found.segments))
    with open(segment, "r+b") as f:
        f.seek(jn.HEADER_BYTES + last.lsn - max(found.segments))
        f.write(bytes(last.end - last.lsn))

    engine, k = start(tmp_path, boot_id="b2")
    # The old luid belongs to a kernel that is gone.
    assert k.send(RequestType.IS_CLEAN, wire.build_u64(5), 1).error == -errno.ESRCH
    k.ctr(ctr_text(), 0xFFFF0001)
    k.resume(0xFFFF0001)
    # The state the journal kept, taken over: marked regions are out of sync. The clear of 6 did
    # not survive, so 6 is resynced too (the safe direction); so is 8, whose mark did.
    assert unsynced(engine, 0xFFFF0001) == [5, 6, 7, 8]
    assert k.work(0xFFFF0001) == (1, 5)
    assert k.sync_count(0xFFFF0001) == REGIONS - 4
    # The earlier boot's instance gave its state to the new one: like an old table at its DTR, it
    # loses its sub-databases (logged). Instances nobody adopts stay for the recovery tool.
    assert store_dbs(engine) == luid_dbs(0xFFFF0001)
    stop(engine)


def test_after_a_reboot_every_answered_request_the_journal_kept_counts(tmp_path):
    engine, k = start(tmp_path, boot_id="b1")
    k.ctr(ctr_text(mode="nosync"), 1)
    k.resume(1)
    k.mark([5, 6], 1)
    k.flush(luid=1)
    k.clear([6], 1)      # answered: both legs hold region 6's writes; it reached the journal
    k.mark([8], 1)       # answered, never flushed: resynced (the journal cannot tell it was not)
    stop(engine)
    engine, k = start(tmp_path, boot_id="b2")
    k.ctr(ctr_text(), 0xFFFF0001)
    k.resume(0xFFFF0001)
    assert unsynced(engine, 0xFFFF0001) == [5, 8]
    stop(engine)


def test_an_earlier_boot_instance_nobody_adopts_is_kept(tmp_path):
    engine, k = start(tmp_path, boot_id="b1")
    k.ctr(ctr_text(mode="nosync"), 1)
    k.resume(1)
    stop(engine)
    engine, k = start(tmp_path, boot_id="b2")
    k.ctr(ctr_text(), 2, reconnect=True)  # a reconnect RESUME: nothing is adopted
    assert store_dbs(engine) >= luid_dbs(1)
    engine2_other_uuid = Kernel(engine, uuid="LVM-other")
    engine2_other_uuid.ctr(ctr_text(), 3)
    engine2_other_uuid.resume(3)
    assert luid_dbs(1) <= store_dbs(engine)
    stop(engine)


def test_a_ctr_reusing_an_earlier_boot_luid_keeps_its_state_through_a_crash(tmp_path):
    """The new boot's kernel reuses luid 1: the CTR's write keeps the old instance's state as the
    retained state, so a crash before the RESUME still hands it over (a resync of the marked
    regions only, not of the whole mirror)."""
    engine, k = start(tmp_path, boot_id="b1")
    k.ctr(ctr_text(mode="nosync"), 1)
    k.resume(1)
    k.mark([5, 6], 1)
    k.flush(luid=1)
    stop(engine)
    engine, k = start(tmp_path, boot_id="b2")
    k.ctr(ctr_text(), 1)
    assert store_dbs(engine) >= RETAINED
    stop(engine)  # killed before the RESUME
    engine, k = start(tmp_path, boot_id="b2")
    k.ctr(ctr_text(), 1, reconnect=True)
    k.resume(1)
    assert unsynced(engine, 1) == [5, 6]
    stop(engine)


# --- resize and sync -------------------------------------------------------------------------------


@pytest.mark.parametrize(("new_regions", "mode", "expected_unsynced"), [
    (2 * REGIONS, "", lambda: [100] + list(range(REGIONS, 2 * REGIONS))),
    (2 * REGIONS, "nosync", lambda: [100]),
    (regionlog.CHUNK_BITS + 5, "", lambda: [100]),
], ids=["grow", "grow-nosync", "shrink"])
def test_resize_at_hand_over(tmp_path, new_regions, mode, expected_unsynced):
    engine, k = start(tmp_path)
    k.ctr(ctr_text(mode="nosync"), 1)
    k.resume(1)
    k.mark([100, REGIONS - 1], 1)
    k.flush(luid=1)
    k.clear([REGIONS - 1], 1)
    k.ctr(ctr_text(new_regions, mode), 2)
    k.suspend(1)
    k.resume(2)
    k.dtr(1)
    assert unsynced(engine, 2) == expected_unsynced()
    assert k.sync_count(2) == new_regions - len(expected_unsynced())
    contents = engine.backend.contents(UUID)
    for kind in ("clean", "sync"):
        keys = sorted(sf.decode_chunk_key(key) for key in contents[sf.instance_db_name(kind, 2)])
        assert keys == list(range(regionlog.chunk_count(new_regions)))
    assert stored_bitmaps(engine, 2) == memory_bitmaps(engine, 2)
    expected = memory_bitmaps(engine, 2)
    stop(engine)
    engine, k = start(tmp_path)
    assert memory_bitmaps(engine, 2) == expected
    stop(engine)


def switched_to_a_sync_table(tmp_path) -> tuple[Applier, Kernel]:
    """A live with traffic, then a table swap to B, whose constructor says 'sync'."""
    engine, k = start(tmp_path)
    live_instance_with_traffic(k, 1)
    k.ctr(ctr_text(mode="sync"), 2)
    k.suspend(1)
    k.resume(2)
    k.dtr(1)
    return engine, k


def test_sync_in_the_ctr_forces_a_full_resync(tmp_path):
    engine, k = switched_to_a_sync_table(tmp_path)
    assert k.sync_count(2) == 0 and k.work(2) == (1, 0)
    _, clean, sync = stored_bitmaps(engine, 2)
    assert sync == bytes(len(sync))
    assert store_dbs(engine) & (luid_dbs(1) | luid_dbs(2)) == luid_dbs(2)
    stop(engine)


def test_a_forced_resync_is_not_undone_by_a_later_resume(tmp_path):
    engine, k = switched_to_a_sync_table(tmp_path)
    k.suspend(2)
    k.resume(2)
    try:
        assert k.sync_count(2) == 0
    finally:
        stop(engine)


# --- item 6: faults ----------------------------------------------------------------------------------


class _FailingTxn:
    """A write transaction whose commit fails as on a full disk (and aborts, as LMDB does)."""

    def __init__(self, txn):
        self.txn = txn

    def commit(self) -> None:
        self.txn.abort()
        exc = lmdb.DiskError("mdb_txn_commit: No space left on device", errno.ENOSPC)
        exc.code = errno.ENOSPC
        raise exc

    def __getattr__(self, name):
        return getattr(self.txn, name)


class _FailingCommits:
    """Wraps an environment so that write transactions fail at commit while ``armed``."""

    def __init__(self, env):
        self.env = env
        self.armed = True

    def begin(self, write: bool = False, **kw):
        txn = self.env.begin(write=write, **kw)
        return _FailingTxn(txn) if write and self.armed else txn

    def open_db(self, name, txn=None, **kw):
        return self.env.open_db(name, txn=getattr(txn, "txn", txn), **kw)

    def __getattr__(self, name):
        return getattr(self.env, name)


def test_failed_journal_sync_answers_eio_marks_f_and_keeps_the_changes(tmp_path, monkeypatch):
    engine, k = start(tmp_path)
    k.ctr(ctr_text(mode="nosync", log_type="disk"), 1)
    k.resume(1)
    assert k.health(1) == "A"
    real = os.fdatasync
    failing = {"on": True}

    def fdatasync(fd: int) -> None:
        if failing["on"]:
            raise OSError(errno.EIO, "injected")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    reply = k.send(RequestType.FLUSH, wire.build_regions([33, 40000]), 1)
    assert reply.error == -errno.EIO
    assert k.health(1) == "F"
    failing["on"] = False
    # Other logs are served meanwhile.
    k2 = Kernel(engine, "LVM-other")
    k2.ctr(ctr_text(), 1)
    k2.resume(1)
    k2.flush([3], 1)
    k.flush(luid=1)  # the journal's unsynced bytes are written again, then synced
    assert k.health(1) == "A"
    assert stored_bitmaps(engine, 1) == memory_bitmaps(engine, 1)
    assert dirty(engine, 1) == [33, 40000]
    stop(engine)
    engine, k = start(tmp_path)
    assert dirty(engine, 1) == [33, 40000]
    stop(engine)


def test_failed_store_write_at_postsuspend_answers_eio_and_keeps_the_changes(tmp_path):
    engine, k = start(tmp_path)
    k.ctr(ctr_text(mode="nosync", log_type="disk"), 1)
    k.resume(1)
    k.flush([33, 40000], 1)
    e = engine.backend._envs[UUID]
    e.env = _FailingCommits(e.env)
    assert k.send(RequestType.PRESUSPEND, luid=1).error == 0
    assert k.send(RequestType.POSTSUSPEND, luid=1).error == -errno.EIO
    assert k.health(1) == "F"
    e.env.armed = False
    k.resume(1)
    assert k.health(1) == "A"
    assert stored_bitmaps(engine, 1) == memory_bitmaps(engine, 1)
    assert dirty(engine, 1) == [33, 40000]
    stop(engine)


def test_damaged_store_of_one_uuid_falls_back_to_a_full_resync(tmp_path):
    engine, k = start(tmp_path)
    live_instance_with_traffic(k, 1)
    k2 = Kernel(engine, "LVM-other")
    k2.ctr(ctr_text(mode="nosync"), 1)
    k2.resume(1)
    stop(engine)
    data = tmp_path / sf.encode_dir_name(UUID) / "data.mdb"
    raw = bytearray(data.read_bytes())
    raw[: 2 * 4096] = b"\xee" * (2 * 4096)  # both meta pages
    data.write_bytes(bytes(raw))
    engine, k = start(tmp_path)
    assert (UUID, 1) not in engine.table and ("LVM-other", 1) in engine.table
    k.ctr(ctr_text(), 1)
    k.resume(1)
    assert k.sync_count(1) == 0  # a full resync, never the bad data
    assert any(p.name.startswith(sf.encode_dir_name(UUID) + ".damaged-") for p in tmp_path.iterdir())
    stop(engine)
