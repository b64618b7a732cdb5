"""The LMDB backend on its own: layout in the environment, the journal's restore rules, damage,
faults, modes.

The chunk-size measurement behind ``regionlog.CHUNK_BYTES`` is here too (skipped unless
``ULOG_BENCH=1``; see formats/store.md, "Chunk size").
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zlib
from pathlib import Path

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ulog_disk.log import regionlog
from ulog_disk.log import restore as restore_rule
from ulog_disk.storage import journal as jn
from ulog_disk.storage import store_format as sf

# The backend's interface as a plugin imports it: one module, the record types included.
from ulog_disk.storage.base import (
    OP_CLEAR,
    OP_MARK,
    OP_SET_NOSYNC,
    OP_SET_SYNC,
    BackendError,
    Commit,
    InstanceRecord,
    Restored,
    StoredState,
    load_backend,
)
from ulog_disk.storage.lmdb_store import LmdbBackend

CB = regionlog.CHUNK_BYTES
UUID = "LVM-test0123"
BOOT = "b1"
#: Small journal segments: quick to preallocate, and a few hundred records fill one.
SEG = 64 * 1024


def make_rec(uuid: str = UUID, luid: int = 1, region_count: int = 3 * regionlog.CHUNK_BITS + 100,
             **kw) -> InstanceRecord:
    fields = dict(uuid=uuid, luid=luid, ctr=f"{region_count * 8} core 8", log_type="core", region_size=8,
                  region_count=region_count, state="live", generation=1, cursor=0, boot_id=BOOT,
                  resumed=True, committed_at=0.0)
    fields.update(kw)
    return InstanceRecord(**fields)


def nbytes(rec: InstanceRecord) -> int:
    return (rec.region_count + 7) // 8


def pattern(rec: InstanceRecord, seed: int) -> bytes:
    """A bitmap whose padding bits past region_count are 0, as the engine's are."""
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(nbytes(rec)))
    spare = nbytes(rec) * 8 - rec.region_count
    if spare:
        data[-1] &= 0xFF >> spare
    return bytes(data)


def replayed(rec: InstanceRecord, clean: bytes, sync: bytes, ops: list[tuple[int, int]],
             distrust: bool = False) -> tuple[bytes, bytes]:
    """The bitmaps ``ops`` make of ``clean``/``sync`` (the engine's replay)."""
    state = regionlog.RegionLog.from_bitmaps(rec.region_count, clean, sync)
    state.replay(ops)
    if distrust:
        state.distrust_all()
    return state.clean.tobytes(), state.sync.tobytes()


def full_commit(backend: LmdbBackend, rec: InstanceRecord, clean: bytes, sync: bytes,
                resized: bool = True, position: int | None = None) -> None:
    backend.commit(Commit(rec, sf.split_chunks(clean, rec.region_count, CB),
                          sf.split_chunks(sync, rec.region_count, CB), resized=resized, position=position))


def chunk_keys(backend: LmdbBackend, uuid: str, name: bytes) -> list[int]:
    return sorted(sf.decode_chunk_key(k) for k in backend.contents(uuid).get(name, {}))


def sub_dbs(backend: LmdbBackend, uuid: str) -> set[bytes]:
    return {name for name in backend.contents(uuid) if name}


def stored_meta(backend: LmdbBackend, uuid: str, luid: int) -> sf.MetaRecord:
    name = sf.instance_db_name("meta", luid)
    return sf.MetaRecord.decode(sf.record_bytes(name, backend.contents(uuid)[name][sf.RECORD_KEY]))


def checkpoint(backend: LmdbBackend, uuid: str, luid: int) -> sf.CheckpointRecord:
    name = sf.instance_db_name("meta", luid)
    return sf.read_checkpoint_value(name, backend.contents(uuid)[name][sf.CHECKPOINT_KEY])


def journal_id_on_disk(state_dir: Path) -> bytes | None:
    return jn.scan(state_dir).journal_id


def segment_files(state_dir: Path) -> list[Path]:
    return sorted(p for p in state_dir.iterdir() if jn.parse_segment_name(p.name) is not None)


def file_offset(state_dir: Path, position: int) -> tuple[Path, int]:
    """The segment file and byte offset holding journal position ``position``."""
    for path in segment_files(state_dir):
        start = jn.parse_segment_name(path.name)
        assert start is not None
        header = jn.decode_segment_header(path.read_bytes()[: jn.SEGMENT_HEADER_SIZE])
        if start <= position < start + header.capacity:
            return path, jn.HEADER_BYTES + position - start
    raise AssertionError(f"no segment holds position {position}")


def flip(state_dir: Path, position: int, delta: int = 0) -> None:
    """Flip one bit of the journal byte at ``position + delta`` (damage)."""
    path, offset = file_offset(state_dir, position)
    with open(path, "r+b") as f:
        f.seek(offset + delta)
        byte = f.read(1)[0]
        f.seek(offset + delta)
        f.write(bytes([byte ^ 0x10]))


def fresh(state_dir: Path, **kw) -> LmdbBackend:
    return LmdbBackend(state_dir, segment_bytes=SEG, **kw)


def restore(backend: LmdbBackend, boot: str = BOOT) -> Restored:
    return backend.restore(boot)


@pytest.fixture
def backend(tmp_path):
    b = fresh(tmp_path / "state")
    yield b
    b.close()


@pytest.fixture
def daemon(tmp_path):
    """A backend as the daemon has it: restored, the journal open for appending."""
    b = fresh(tmp_path / "state")
    restore(b)
    yield b
    b.close()


def reopen(backend: LmdbBackend) -> LmdbBackend:
    backend.close()
    return fresh(backend.state_dir)


def restart(backend: LmdbBackend, boot: str = BOOT) -> tuple[LmdbBackend, Restored]:
    """Close, open again and restore (a daemon restart; ``boot`` another id: a host reboot)."""
    b = reopen(backend)
    return b, restore(b, boot)


# --- plugin ----------------------------------------------------------------------------------------


def test_registered_as_the_lmdb_entry_point():
    assert load_backend("lmdb") is LmdbBackend
    assert LmdbBackend.name == "lmdb" and LmdbBackend.durable and LmdbBackend.journaled


# --- layout ----------------------------------------------------------------------------------------


def test_record_creates_the_instance_sub_databases_without_bitmaps(backend):
    rec = make_rec(resumed=False, state="constructed", generation=0)
    backend.record(rec)
    contents = backend.contents(UUID)
    assert set(contents) == {b"", b"meta.0000000000000001", b"clean.0000000000000001",
                             b"sync.0000000000000001"}
    assert contents[b"clean.0000000000000001"] == {} and contents[b"sync.0000000000000001"] == {}
    fmt = sf.read_format_value(contents[b""][sf.FORMAT_KEY])
    assert (fmt.uuid, fmt.chunk_bytes, fmt.version) == (UUID, CB, sf.LAYOUT_VERSION) and fmt.version == 3
    assert set(contents[b"meta.0000000000000001"]) == {sf.RECORD_KEY, sf.CHECKPOINT_KEY}
    raw = contents[b"meta.0000000000000001"][sf.RECORD_KEY]
    meta = sf.MetaRecord.decode(sf.record_bytes(b"meta.0000000000000001", raw))
    # Every value is sealed: the record's bytes, then the CRC-32 of name, key and bytes.
    assert raw[-4:] == zlib.crc32(b"meta.0000000000000001" + sf.RECORD_KEY + raw[:-4]).to_bytes(4, "little")
    raw = contents[b"meta.0000000000000001"][sf.CHECKPOINT_KEY]
    crc = zlib.crc32(b"meta.0000000000000001" + sf.CHECKPOINT_KEY + raw[:-4])
    assert raw[-4:] == crc.to_bytes(4, "little")
    # A tool's write (no restore): the checkpoint names the journal on disk (made empty if there
    # was none) at its end; the meta's commit_seq is that position.
    ckpt = checkpoint(backend, UUID, 1)
    assert ckpt.journal_id == journal_id_on_disk(backend.state_dir) and ckpt.position == 0
    assert meta.instance() == rec and meta.commit_seq == ckpt.position


def test_commit_writes_only_the_chunks_it_carries(daemon):
    backend = daemon
    rec = make_rec()
    backend.record(rec, backend.position())
    a, b = b"\x0f" * CB, b"\xf0" * CB
    backend.commit(Commit(rec, {2: a}, {}, resized=False))
    assert chunk_keys(backend, UUID, b"clean.0000000000000001") == [2]
    assert chunk_keys(backend, UUID, b"sync.0000000000000001") == []
    end = backend.log_ops(UUID, 1, [(OP_MARK, 1)])
    backend.commit(Commit(rec, {0: b}, {1: a}, resized=False, position=end))
    contents = backend.contents(UUID)
    clean_name, sync_name = b"clean.0000000000000001", b"sync.0000000000000001"
    k0, k1, k2 = (sf.encode_chunk_key(i) for i in range(3))
    assert contents[clean_name] == {k0: sf.seal(clean_name, k0, b),
                                    k2: sf.seal(clean_name, k2, a)}
    assert contents[sync_name] == {k1: sf.seal(sync_name, k1, a)}
    # Sealed: the bitmap bytes, then a CRC-32 of the sub-database name, the key and the bytes.
    assert contents[sync_name][k1] == a + zlib.crc32(sync_name + k1 + a).to_bytes(4, "little")
    # The checkpoint (and the meta's commit_seq) is the position the commit carries.
    assert checkpoint(backend, UUID, 1) == sf.CheckpointRecord(backend.journal.journal_id, end)
    assert stored_meta(backend, UUID, 1).commit_seq == end


def test_commit_rejects_chunks_that_do_not_fit_the_geometry(backend):
    rec = make_rec()
    with pytest.raises(BackendError):
        backend.commit(Commit(rec, {0: b"\0" * (CB - 1)}, {}))
    with pytest.raises(BackendError):
        backend.commit(Commit(rec, {regionlog.chunk_count(rec.region_count): b"\0"}, {}))


def test_resize_deletes_the_tail_chunks(backend):
    big = make_rec(region_count=5 * regionlog.CHUNK_BITS - 3)
    full_commit(backend, big, pattern(big, 1), pattern(big, 2))
    assert chunk_keys(backend, UUID, b"clean.0000000000000001") == [0, 1, 2, 3, 4]
    small = make_rec(region_count=2 * regionlog.CHUNK_BITS + 17)
    full_commit(backend, small, pattern(small, 3), pattern(small, 4))
    for name in (b"clean.0000000000000001", b"sync.0000000000000001"):
        assert chunk_keys(backend, UUID, name) == [0, 1, 2]
    assert len(backend.contents(UUID)[b"clean.0000000000000001"][sf.encode_chunk_key(2)]) == 3 + 4
    backend, restored = restart(backend)
    (inst,) = restored.instances
    assert (inst.clean, inst.sync) == (pattern(small, 3), pattern(small, 4))
    backend.close()


def test_resize_without_the_last_chunk_drops_a_last_chunk_of_the_old_length(backend):
    big = make_rec(region_count=2 * regionlog.CHUNK_BITS)
    full_commit(backend, big, b"\xff" * nbytes(big), b"\xff" * nbytes(big))
    small = make_rec(region_count=regionlog.CHUNK_BITS + 8)
    backend.commit(Commit(small, {0: b"\xff" * CB}, {}, resized=True))
    backend, restored = restart(backend)
    (inst,) = restored.instances  # not damaged: the odd chunk is gone, reads as zeros
    assert inst.clean == b"\xff" * CB + b"\0" and inst.sync == b"\xff" * CB + b"\0"
    assert restored.damaged == {} and inst.journal_damaged is None
    backend.close()


# --- restore ---------------------------------------------------------------------------------------


def test_restore_round_trip(backend):
    odd = "my mirror/../\x01\xe9"
    live = make_rec(luid=0xFFFF88812A4BC000, state="live", generation=4, cursor=77, committed_at=1.5)
    old = make_rec(luid=7, state="suspended", generation=3, region_count=100)
    other = make_rec(uuid=odd, luid=1, region_count=9)
    for r, seed in ((live, 1), (old, 2), (other, 3)):
        backend.record(r)
        full_commit(backend, r, pattern(r, seed), pattern(r, seed + 10))
    backend.drop(odd, 1, StoredState(uuid=odd, generation=5, region_count=9, clean=b"\xff\x01",
                                     sync=b"\x0f\x00", source_luid=1, committed_at=2.5))
    backend, restored = restart(backend)
    assert restored.damaged == {}
    got = {(i.record.uuid, i.record.luid): i for i in restored.instances}
    assert set(got) == {(UUID, live.luid), (UUID, 7)}
    for r, seed in ((live, 1), (old, 2)):
        inst = got[(r.uuid, r.luid)]
        assert inst.record == r
        assert (inst.clean, inst.sync, inst.journal) == (pattern(r, seed), pattern(r, seed + 10), [])
        assert (inst.journal_damaged, inst.replayed_from) == (None, None)
    assert restored.retained == {odd: StoredState(uuid=odd, generation=5, region_count=9, clean=b"\xff\x01",
                                                  sync=b"\x0f\x00", source_luid=1, committed_at=2.5)}
    stores = sorted(["u." + UUID, sf.encode_dir_name(odd)])
    assert sorted(n for n in os.listdir(backend.state_dir) if not n.startswith("journal.")) == stores
    # Each start goes on in a new segment; the first one holds nothing the stores need any more,
    # and the first maintenance removes it.
    first, second = (p.name for p in segment_files(backend.state_dir))
    assert first == jn.segment_name(0)
    backend.maintain(backend.position())
    assert [p.name for p in segment_files(backend.state_dir)] == [second]
    backend.close()


def test_fresh_instance_restores_with_zero_bitmaps(backend):
    """Never committed: no chunks. It comes back all dirty and out of sync (the safe direction)."""
    rec = make_rec(region_count=1001, resumed=False, state="constructed", generation=0)
    backend.record(rec)
    backend, restored = restart(backend)
    (inst,) = restored.instances
    assert inst.record == rec and inst.clean == bytes(126) and inst.sync == bytes(126)
    backend.close()


def test_restore_of_an_empty_or_missing_state_dir(tmp_path):
    b = fresh(tmp_path / "none")
    assert restore(b).instances == []
    b.close()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "lock").write_text("123\n")
    (tmp_path / "s" / "not-a-store").mkdir()
    (tmp_path / "s" / "u.x.damaged-1").mkdir()
    b = fresh(tmp_path / "s")
    restored = restore(b)
    assert (restored.instances, restored.retained, restored.damaged) == ([], {}, {})
    # The journal is open for appending at the end of a new, empty journal.
    assert b.position() == b.durable_position() == 0 and len(segment_files(tmp_path / "s")) == 1
    b.close()


# --- the journal: what a restore replays -------------------------------------------------------------


def test_ops_logged_after_a_checkpoint_are_replayed_by_a_restore_of_the_same_boot(daemon):
    backend = daemon
    rec = make_rec()
    backend.record(rec, backend.position())
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2), position=backend.position())
    first = backend.position()
    backend.log_ops(UUID, 1, [(OP_MARK, 5), (OP_MARK, 6)])
    backend.log_ops(UUID, 1, [(OP_CLEAR, 5)])
    # Not synced: a daemon crash keeps what was appended (the page cache outlives the process).
    backend, restored = restart(backend)
    (inst,) = restored.instances
    assert inst.journal == [(OP_MARK, 5), (OP_MARK, 6), (OP_CLEAR, 5)]
    assert (inst.clean, inst.sync) == (pattern(rec, 1), pattern(rec, 2))
    assert inst.journal_damaged is None and inst.replayed_from == first
    # Appends after a restore go on after the replayed records.
    backend.log_ops(UUID, 1, [(OP_SET_SYNC, 9)])
    backend, restored = restart(backend)
    assert restored.instances[0].journal == [(OP_MARK, 5), (OP_MARK, 6), (OP_CLEAR, 5), (OP_SET_SYNC, 9)]
    backend.close()


def test_a_checkpoint_makes_the_records_before_it_not_replayed(daemon):
    """The checkpoint's position splits the journal: records before it are in the store (a crash
    between the store write and anything else replays none of them), records at or after it are
    replayed."""
    backend = daemon
    rec = make_rec()
    backend.record(rec, backend.position())
    backend.log_ops(UUID, 1, [(OP_MARK, 5), (OP_MARK, 6)])
    split = backend.position()
    backend.log_ops(UUID, 1, [(OP_CLEAR, 6)])
    full_commit(backend, rec, pattern(rec, 3), pattern(rec, 4), position=split)
    assert checkpoint(backend, UUID, 1).position == split
    backend, restored = restart(backend)
    (inst,) = restored.instances
    assert inst.journal == [(OP_CLEAR, 6)] and inst.replayed_from == split
    assert inst.clean == pattern(rec, 3)
    # A commit without a position (what the store holds now) checkpoints at the journal's end.
    full_commit(backend, rec, pattern(rec, 5), pattern(rec, 6), resized=False)
    assert checkpoint(backend, UUID, 1).position == backend.position()
    backend, restored = restart(backend)
    (inst,) = restored.instances
    assert (inst.journal, inst.replayed_from, inst.clean) == ([], None, pattern(rec, 5))
    backend.close()


def test_a_flush_record_restores_generation_cursor_and_its_marks(daemon):
    backend = daemon
    rec = make_rec(generation=1, cursor=0)
    backend.record(rec, backend.position())
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    backend.log_ops(UUID, 1, [(OP_MARK, 3)])
    flushed = make_rec(generation=5, cursor=123, committed_at=42.5)
    ticket = backend.log_flush(flushed, [(OP_MARK, 7), (OP_CLEAR, 3)])
    assert backend.sync() >= ticket and backend.durable_position() >= ticket
    backend.log_ops(UUID, 1, [(OP_SET_NOSYNC, 8)])
    backend, restored = restart(backend)
    (inst,) = restored.instances
    assert inst.journal == [(OP_MARK, 3), (OP_MARK, 7), (OP_CLEAR, 3), (OP_SET_NOSYNC, 8)]
    assert (inst.record.generation, inst.record.cursor, inst.record.committed_at) == (5, 123, 42.5)
    assert inst.record == flushed
    backend.close()


def test_records_of_other_instances_are_not_replayed(daemon):
    backend = daemon
    a, b = make_rec(luid=1), make_rec(luid=2)
    other = make_rec(uuid="LVM-other", luid=1)
    for r in (a, b, other):
        backend.record(r, backend.position())
    backend.log_ops(UUID, 1, [(OP_MARK, 1)])
    backend.log_ops(UUID, 2, [(OP_MARK, 2)])
    backend.log_ops("LVM-other", 1, [(OP_MARK, 3)])
    backend.log_ops(UUID, 3, [(OP_MARK, 4)])  # an instance the stores do not know: ignored
    backend, restored = restart(backend)
    got = {(i.record.uuid, i.record.luid): i.journal for i in restored.instances}
    assert got == {(UUID, 1): [(OP_MARK, 1)], (UUID, 2): [(OP_MARK, 2)], ("LVM-other", 1): [(OP_MARK, 3)]}
    backend.close()


def test_record_replacing_an_instance_drops_its_bitmaps_and_journal(daemon):
    backend = daemon
    rec = make_rec(resumed=False, state="constructed", generation=0)
    backend.record(rec, backend.position())
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    backend.log_ops(UUID, 1, [(OP_MARK, 1)])
    other = make_rec(ctr="999999 core 8", region_count=124_999, resumed=False, state="constructed",
                     generation=0)
    at = backend.position()
    backend.record(other, at)
    assert chunk_keys(backend, UUID, b"clean.0000000000000001") == []
    assert checkpoint(backend, UUID, 1).position == at == stored_meta(backend, UUID, 1).commit_seq
    backend, restored = restart(backend)
    (inst,) = restored.instances
    assert inst.record == other and inst.journal == [] and inst.clean == bytes(nbytes(other))
    backend.close()


def test_an_instance_of_another_boot_gets_every_record_the_journal_kept(daemon):
    """After a reboot (the kernel's state is gone) every record found is replayed, synced or not:
    each was written after its request was applied and answered, and a host crash keeps a prefix
    of them (at least everything synced). The replayed state is written back at once (a recovery
    checkpoint); the engine then turns every dirty region out of sync."""
    backend = daemon
    rec = make_rec(boot_id="b0")
    backend.record(rec, backend.position())
    clean, sync = b"\xff" * nbytes(rec), b"\0" * nbytes(rec)
    full_commit(backend, rec, clean, sync)
    synced = [(OP_MARK, 1), (OP_CLEAR, 2), (OP_SET_SYNC, 3), (OP_SET_SYNC, 4)]
    backend.log_ops(UUID, 1, synced)
    backend.sync()
    backend.log_ops(UUID, 1, [(OP_MARK, 10), (OP_CLEAR, 11), (OP_SET_SYNC, 12), (OP_SET_NOSYNC, 4)])
    backend.log_flush(make_rec(boot_id="b0", generation=2), [(OP_MARK, 14)])
    backend.log_ops(UUID, 1, [(OP_MARK, 20), (OP_SET_NOSYNC, 3), (OP_CLEAR, 1)])
    kept = synced + [(OP_MARK, 10), (OP_CLEAR, 11), (OP_SET_SYNC, 12), (OP_SET_NOSYNC, 4), (OP_MARK, 14),
                     (OP_MARK, 20), (OP_SET_NOSYNC, 3), (OP_CLEAR, 1)]
    want = replayed(rec, clean, sync, kept)
    # The same journal read by this boot replays the same (the kernel's state lives on).
    backend.close()
    same = fresh(backend.state_dir)
    (inst,) = same.restore("b0").instances
    assert inst.journal == kept
    same.close()
    backend, restored = restart(same, boot="b1")
    (inst,) = restored.instances
    assert (inst.clean, inst.sync) == want
    assert inst.record.generation == 2 and inst.record.boot_id == "b0"
    # Written back: the next start needs none of those records.
    assert inst.journal == [] and inst.replayed_from is None and inst.journal_damaged is None
    assert checkpoint(backend, UUID, 1).position == backend.position()
    backend, restored = restart(backend, boot="b2")
    (inst,) = restored.instances
    assert (inst.clean, inst.sync, inst.journal) == (*want, [])
    backend.close()


def test_a_failed_recovery_checkpoint_leaves_the_instance_as_read(daemon, monkeypatch):
    """An earlier boot's instance whose write-back fails comes back as read, journal and all, so
    that the engine's rebuild replays the journal once. Replayed twice, a region that was cleared
    while out of sync and then set in sync (dirty, in sync) would read as clean."""
    backend = daemon
    rec = make_rec(boot_id="b0", region_count=16)
    backend.record(rec, backend.position())
    clean = sync = b"\xfe\xff"  # region 0 dirty and out of sync
    full_commit(backend, rec, clean, sync, position=backend.position())
    ops = [(OP_CLEAR, 0), (OP_SET_SYNC, 0)]
    backend.log_ops(UUID, 1, ops)
    backend.sync()
    backend.close()

    def failing(self, commit):
        raise BackendError(errno.EIO, "disk on fire")

    monkeypatch.setattr(LmdbBackend, "commit", failing)
    again = fresh(backend.state_dir)
    (inst,) = again.restore("b1").instances
    assert (inst.clean, inst.sync, inst.journal) == (clean, sync, ops) and inst.replayed_from is not None
    state = restore_rule.handover_candidate(inst)
    assert (state.clean[0] & 1, state.sync[0] & 1) == (0, 1)
    monkeypatch.undo()
    again.close()
    # The next start writes it back, and hands over the same state.
    backend, restored = restart(again, boot="b1")
    (inst,) = restored.instances
    assert inst.journal == [] and restore_rule.handover_candidate(inst) == state
    backend.close()


def test_a_journal_of_another_id_makes_the_instance_journal_damaged(daemon):
    backend = daemon
    rec = make_rec()
    backend.record(rec, backend.position())
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    backend.log_ops(UUID, 1, [(OP_MARK, 5)])
    backend.close()
    old_id = jn.scan(backend.state_dir).journal_id
    for path in segment_files(backend.state_dir):
        path.unlink()  # the journal is gone: a new one (another id) starts
    backend = fresh(backend.state_dir)
    (inst,) = restore(backend).instances
    assert inst.journal_damaged is not None and old_id.hex() in inst.journal_damaged
    assert inst.journal == [] and inst.replayed_from is not None
    assert backend.journal.journal_id != old_id
    backend.close()


def test_an_instance_without_a_checkpoint_is_journal_damaged(backend):
    rec = make_rec()
    backend.record(rec)
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    name = sf.instance_db_name("meta", 1)
    backend.close()
    env = lmdb.open(str(backend.env_path(UUID)), max_dbs=16)
    with env.begin(write=True) as txn:
        assert txn.delete(sf.CHECKPOINT_KEY, db=env.open_db(name, txn=txn))
    env.close()
    backend = fresh(backend.state_dir)
    (inst,) = restore(backend).instances
    assert inst.journal_damaged is not None and "checkpoint" in inst.journal_damaged
    backend.close()


def test_damage_after_a_checkpoint_is_damage_and_before_it_is_not(daemon):
    """A record that fails, followed by a record saying the journal was durable past it: damage.
    It concerns every instance whose checkpoint is before it (its records there could have been
    anyone's), none whose checkpoint is after it."""
    backend = daemon
    before, after = make_rec(luid=1), make_rec(luid=2)
    for r in (before, after):
        backend.record(r, backend.position())
        full_commit(backend, r, pattern(r, r.luid), pattern(r, r.luid + 10))
    damaged_at = backend.position()
    backend.log_ops(UUID, 1, [(OP_MARK, 5)])
    backend.log_ops(UUID, 2, [(OP_MARK, 6)])
    backend.sync()
    backend.log_ops(UUID, 1, [(OP_MARK, 7)])   # claims the journal durable past the damage
    full_commit(backend, after, pattern(after, 3), pattern(after, 4), resized=False)
    backend.log_ops(UUID, 2, [(OP_MARK, 8)])
    backend.close()
    flip(backend.state_dir, damaged_at, delta=jn.RECORD_HEADER_SIZE + len(UUID))
    assert jn.scan(backend.state_dir).damaged_after(damaged_at) is not None
    backend = fresh(backend.state_dir)
    got = {i.record.luid: i for i in restore(backend).instances}
    assert got[1].journal_damaged is not None and "damaged" in got[1].journal_damaged
    assert got[1].replayed_from is not None and got[1].replayed_from <= damaged_at
    assert got[2].journal_damaged is None and got[2].journal == [(OP_MARK, 8)]
    assert got[2].clean == pattern(after, 3)
    backend.close()


def test_a_torn_tail_loses_nothing_that_was_synced(daemon):
    """Bytes past the durable point that fail (a torn write of a host crash) end the journal:
    not damage; every record synced before them is replayed."""
    backend = daemon
    rec = make_rec()
    backend.record(rec, backend.position())
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    backend.log_ops(UUID, 1, [(OP_MARK, 1)])
    backend.log_flush(rec, [(OP_MARK, 2)])
    backend.sync()
    torn = backend.position()
    backend.log_ops(UUID, 1, [(OP_MARK, 3)])
    backend.log_ops(UUID, 1, [(OP_CLEAR, 4)])
    backend.close()
    flip(backend.state_dir, torn, delta=8)  # the first unsynced record's position field
    assert jn.scan(backend.state_dir).damage == []
    backend = fresh(backend.state_dir)
    (inst,) = restore(backend).instances
    assert inst.journal_damaged is None
    assert inst.journal == [(OP_MARK, 1), (OP_MARK, 2)]
    # The journal goes on in a new segment, led to by a SWITCH at the tail: later records are
    # read, the torn bytes never again.
    assert backend.position() > torn
    backend.log_ops(UUID, 1, [(OP_MARK, 9)])
    backend.sync()
    backend, restored = restart(backend)
    assert restored.instances[0].journal == [(OP_MARK, 1), (OP_MARK, 2), (OP_MARK, 9)]
    backend.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(st.tuples(st.sampled_from([OP_MARK, OP_CLEAR, OP_SET_SYNC, OP_SET_NOSYNC]),
                                           st.integers(0, 199)), min_size=1, max_size=6),
                        min_size=1, max_size=12),
       split=st.integers(0, 12), flush_at=st.integers(0, 12), synced=st.integers(0, 12),
       reboot=st.booleans())
def test_restore_replays_exactly_the_records_the_rules_keep(tmp_path_factory, batches, split, flush_at,
                                                            synced, reboot):
    """For any records and any checkpoint: a restore replays every op at or after the checkpoint,
    in order, whatever the boot (another boot's replay is then written back at once). Batch
    ``flush_at`` is a FLUSH (none if past the end); where the journal was synced (``synced``)
    changes nothing."""
    split, synced = min(split, len(batches)), min(synced, len(batches))
    state = tmp_path_factory.mktemp("prop") / "s"
    backend = fresh(state)
    restore(backend, "b0")
    rec = make_rec(region_count=200, boot_id="b0")
    backend.record(rec, backend.position())
    clean, sync = pattern(rec, 1), pattern(rec, 2)
    positions = []
    for i, ops in enumerate(batches):
        if i == synced:
            backend.sync()
        positions.append(backend.position())
        if i == flush_at:
            backend.log_flush(rec, ops)
        else:
            backend.log_ops(UUID, 1, ops)
    positions.append(backend.position())
    full_commit(backend, rec, clean, sync, position=positions[split])
    backend.close()
    backend = fresh(state)
    (inst,) = restore(backend, "b1" if reboot else "b0").instances
    want: list[tuple[int, int]] = [op for ops in batches[split:] for op in ops]
    if reboot:
        assert (inst.clean, inst.sync) == replayed(rec, clean, sync, want) and inst.journal == []
    else:
        assert inst.journal == want
        assert inst.replayed_from == (positions[split] if split < len(batches) else None)
    assert inst.journal_damaged is None
    backend.close()


# --- the journal: durability -------------------------------------------------------------------------


def test_sync_makes_appended_records_durable(daemon, monkeypatch):
    backend = daemon
    rec = make_rec()
    backend.record(rec, backend.position())
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    start = backend.durable_position()
    ticket = backend.log_ops(UUID, 1, [(OP_MARK, 1)])
    ticket2 = backend.log_flush(rec, [(OP_MARK, 2)])
    assert start < ticket < ticket2 and backend.durable_position() == start
    assert backend.sync() == ticket2 == backend.durable_position() == backend.position()
    assert calls == [backend.journal.segments[-1].fd]  # one sync for every record appended
    assert backend.sync() == ticket2 and len(calls) == 1  # nothing new: no sync


def test_marks_are_never_fsynced_by_themselves(daemon, monkeypatch):
    backend = daemon
    rec = make_rec()
    backend.record(rec, backend.position())
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(fd))
    for i in range(32):
        backend.log_ops(UUID, 1, [(OP_MARK, i)] * 8)
        backend.log_event(rec, jn.Event.RESUME)
    assert calls == [] and backend.durable_position() < backend.position()


def test_after_a_failed_sync_the_next_sync_rewrites_and_succeeds(daemon, monkeypatch):
    """A failed fdatasync may have dropped the pages it failed to write: the next sync writes the
    unsynced records again before syncing."""
    backend = daemon
    rec = make_rec()
    backend.record(rec, backend.position())
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    start = backend.position()
    backend.log_ops(UUID, 1, [(OP_MARK, 1), (OP_MARK, 2)])
    ticket = backend.log_flush(rec, [(OP_MARK, 3)])
    real = os.fdatasync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(BackendError) as info:
        backend.sync()
    assert info.value.errno == errno.EIO and backend.durable_position() < ticket
    # What the kernel may do after a failed writeback: the pages are gone (here: zeros).
    path, offset = file_offset(backend.state_dir, start)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(ticket - start))
    monkeypatch.setattr(os, "fdatasync", real)
    assert backend.sync() == ticket == backend.durable_position()
    backend, restored = restart(backend)
    assert restored.instances[0].journal == [(OP_MARK, 1), (OP_MARK, 2), (OP_MARK, 3)]
    backend.close()


def test_journal_calls_before_restore_are_a_backend_error(backend):
    """Only a restore opens the journal for appending (it must know where the journal ends)."""
    with pytest.raises(BackendError) as info:
        backend.log_ops(UUID, 1, [(OP_MARK, 1)])
    assert info.value.errno == errno.EBADF
    with pytest.raises(BackendError):
        backend.log_flush(make_rec(), [])


# --- the journal: cutting -----------------------------------------------------------------------------


def test_the_journal_is_cut_only_behind_the_stores_and_the_newest_segments_base(daemon):
    backend = daemon
    rec = make_rec()
    backend.record(rec, backend.position())
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    ops = [(OP_MARK, i) for i in range(60)]
    capacity = SEG - jn.HEADER_BYTES
    starts: list[int] = []
    needed = 0
    for round_ in range(12):
        for _ in range(20):
            starts.append(backend.position())
            backend.log_ops(UUID, 1, ops)
        backend.sync()
        # A checkpoint never goes back; some lag half a segment behind the end.
        needed = max(needed, backend.position() - (capacity // 2 if round_ % 3 else 0))
        full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2), resized=False, position=needed)
        newest_base = backend.journal.segments[-1].base
        on_disk = {p.name for p in segment_files(backend.state_dir)}
        backend.maintain(needed)
        left = {jn.parse_segment_name(p.name) for p in segment_files(backend.state_dir)}
        for name in on_disk - {jn.segment_name(s) for s in left}:
            start = jn.parse_segment_name(name)
            assert start is not None
            # Only whole segments behind both the stores and the newest segment's base go.
            assert start + capacity <= min(needed, newest_base), (name, needed, newest_base)
        # What a restore needs (from the checkpoint on) is always still there.
        assert any(s <= needed < s + capacity for s in left if s is not None), (needed, left)
    assert len(segment_files(backend.state_dir)) <= 4  # the journal does not grow without end
    backend.log_ops(UUID, 1, [(OP_CLEAR, 1)])
    backend, restored = restart(backend)
    (inst,) = restored.instances
    assert inst.journal_damaged is None
    replayed_records = len([s for s in starts if s >= needed])
    assert replayed_records > 0
    assert inst.journal == ops * replayed_records + [(OP_CLEAR, 1)]
    backend.close()


# --- environments ---------------------------------------------------------------------------------------


def test_the_environment_cache_is_bounded(tmp_path):
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    backend = fresh(tmp_path / "s", max_open_envs=4)
    restore(backend)
    before = fds()
    for n in range(50):
        rec = make_rec(uuid=f"LVM-many{n}", region_count=100)
        backend.record(rec, backend.position())
        full_commit(backend, rec, pattern(rec, n), pattern(rec, n + 1))
        assert backend.open_environments() <= 4
    # Descriptors bounded by the cache (each environment holds a few), not by the 50 uuids.
    assert fds() - before <= 4 * 4
    backend, restored = restart(backend)
    assert len(restored.instances) == 50 and backend.open_environments() <= 4
    for inst in restored.instances:
        n = int(inst.record.uuid.removeprefix("LVM-many"))
        assert inst.clean == pattern(inst.record, n)
    backend.close()

# --- luid reuse --------------------------------------------------------------------------------------


def test_record_with_retain_keeps_that_state_as_retained_in_the_same_write(backend):
    """The kernel of a new boot may reuse a luid: the engine decides that the old instance's state
    (a hand-over candidate) is kept, and the backend keeps it as the retained state in the CTR's
    write, so it stays in the store until the new instance commits its own."""
    old = make_rec(boot_id="b0", generation=6)
    backend.record(old)
    full_commit(backend, old, pattern(old, 1), pattern(old, 2))
    keep = StoredState(uuid=UUID, generation=6, region_count=old.region_count, clean=pattern(old, 3),
                       sync=pattern(old, 4), source_luid=1, committed_at=5.0)
    new = make_rec(boot_id="b1", resumed=False, state="constructed", generation=0)
    backend.record(new, None, keep)
    backend = reopen(backend)
    restored = restore(backend)
    assert [i.record for i in restored.instances] == [new]
    assert restored.retained[UUID] == keep
    backend.close()


def test_record_without_retain_keeps_nothing_of_the_instance_it_replaces(backend):
    """Whether a replaced instance's state is kept is the engine's decision, never the backend's."""
    old = make_rec(boot_id="b0", generation=6)
    backend.record(old)
    full_commit(backend, old, pattern(old, 1), pattern(old, 2))
    new = make_rec(boot_id="b1", resumed=False, state="constructed", generation=0)
    backend.record(new)
    assert sf.RETAINED_META not in backend.contents(UUID)
    backend = reopen(backend)
    restored = restore(backend)
    assert [i.record for i in restored.instances] == [new] and UUID not in restored.retained
    backend.close()


# --- drop -------------------------------------------------------------------------------------------


def test_drop_with_retention_is_one_transaction(daemon):
    backend = daemon
    a = make_rec(luid=1)
    b = make_rec(luid=2)
    for r in (a, b):
        backend.record(r, backend.position())
        full_commit(backend, r, pattern(r, r.luid), pattern(r, r.luid + 10))
        backend.log_ops(UUID, r.luid, [(OP_MARK, 1)])
    backend.drop(UUID, 2, None, backend.position())
    assert sub_dbs(backend, UUID) == {b"meta.0000000000000001", b"clean.0000000000000001",
                                      b"sync.0000000000000001"}
    state = StoredState(uuid=UUID, generation=9, region_count=a.region_count, clean=pattern(a, 5),
                        sync=pattern(a, 6), source_luid=1, committed_at=3.0)
    txns = []
    real_write = LmdbBackend._write

    def counting_write(self, e, body):
        txns.append(body)
        return real_write(self, e, body)

    LmdbBackend._write = counting_write
    try:
        backend.drop(UUID, 1, state, backend.position())
    finally:
        LmdbBackend._write = real_write
    assert len(txns) == 1
    assert sub_dbs(backend, UUID) == {sf.RETAINED_META, sf.RETAINED_CLEAN, sf.RETAINED_SYNC}
    assert chunk_keys(backend, UUID, sf.RETAINED_CLEAN) == list(range(regionlog.chunk_count(a.region_count)))
    # A later retention replaces the earlier one whole, including a shorter geometry.
    c = make_rec(luid=3, region_count=10)
    backend.record(c, backend.position())
    backend.drop(UUID, 3, StoredState(uuid=UUID, generation=10, region_count=10, clean=b"\x01\x02",
                                      sync=b"\x03\x00", source_luid=3), backend.position())
    backend, restored = restart(backend)
    # The dropped instances' journal records are replayed into nothing.
    assert restored.instances == [] and restored.damaged == {}
    assert restored.retained[UUID] == StoredState(uuid=UUID, generation=10, region_count=10,
                                                  clean=b"\x01\x02", sync=b"\x03\x00", source_luid=3)
    backend.close()


def test_drop_of_an_unknown_instance_is_harmless(backend):
    backend.drop("LVM-nobody", 5, None)
    assert not backend.env_path("LVM-nobody").exists()
    backend.record(make_rec())
    backend.drop(UUID, 99, None)
    assert len(sub_dbs(backend, UUID)) == 3


# --- damage -----------------------------------------------------------------------------------------


def _poke(backend: LmdbBackend, uuid: str, db_name: bytes | None, key: bytes, value: bytes) -> None:
    """Write raw bytes into a closed store (as damage or a newer daemon would)."""
    backend.close()
    env = lmdb.open(str(backend.env_path(uuid)), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            db = env.open_db(db_name, txn=txn) if db_name else None
            txn.put(key, value, db=db)
    finally:
        env.close()


def _assert_moved_aside(state_dir: Path, uuid: str, restored, fragment: str) -> None:
    assert fragment in restored.damaged[uuid]
    name = sf.encode_dir_name(uuid)
    assert not (state_dir / name).exists()
    aside = [p for p in state_dir.iterdir() if p.name.startswith(name + ".damaged-")]
    assert len(aside) == 1 and (aside[0] / "data.mdb").exists()


@pytest.mark.parametrize(("db_name", "key", "value", "fragment"), [
    (b"meta.0000000000000001", sf.RECORD_KEY, sf.record_value(b"meta.0000000000000001", b"garbage"),
     "meta record"),
    (b"meta.0000000000000001", sf.RECORD_KEY, b"garbage",
     "record of meta.0000000000000001 fails its checksum"),
    (b"clean.0000000000000001", sf.encode_chunk_key(99),
     sf.seal(b"clean.0000000000000001", sf.encode_chunk_key(99), b"\0"), "past"),
    (b"sync.0000000000000001", sf.encode_chunk_key(0),
     sf.seal(b"sync.0000000000000001", sf.encode_chunk_key(0), b"\0" * 5), "bytes"),
    # Whole, but sealed for another place: the other bitmap's, another luid's, another index's.
    (b"sync.0000000000000001", sf.encode_chunk_key(0),
     sf.seal(b"clean.0000000000000001", sf.encode_chunk_key(0), b"\0" * CB), "fails its checksum"),
    (b"sync.0000000000000001", sf.encode_chunk_key(0),
     sf.seal(b"sync.0000000000000002", sf.encode_chunk_key(0), b"\0" * CB), "fails its checksum"),
    (b"sync.0000000000000001", sf.encode_chunk_key(0),
     sf.seal(b"sync.0000000000000001", sf.encode_chunk_key(1), b"\0" * CB), "fails its checksum"),
    (b"clean.0000000000000001", sf.encode_chunk_key(0), b"\0" * 3, "no room for its checksum"),
    (b"clean.0000000000000001", b"\0\0", b"\0", "chunk key"),
    (None, sf.FORMAT_KEY, sf.format_value(sf.FormatRecord(chunk_bytes=CB, uuid="LVM-other")), "belongs to"),
    (b"meta.0000000000000001", sf.RECORD_KEY,
     sf.record_value(b"meta.0000000000000002", sf.MetaRecord.from_instance(make_rec(luid=1), 9).encode()),
     "record of meta.0000000000000001 fails its checksum"),
    (sf.RETAINED_META, sf.RECORD_KEY, sf.record_value(sf.RETAINED_META, b"ULGR\x01\x00"), "retained record"),
])
def test_damaged_store_is_reported_and_moved_aside(backend, db_name, key, value, fragment):
    rec = make_rec()
    backend.record(rec)
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    backend.record(make_rec(uuid="LVM-healthy"))
    _poke(backend, UUID, db_name, key, value)
    backend = fresh(backend.state_dir)
    restored = restore(backend)
    _assert_moved_aside(backend.state_dir, UUID, restored, fragment)
    assert [i.record.uuid for i in restored.instances] == ["LVM-healthy"]
    # The uuid starts from nothing.
    backend.record(rec)
    assert len(sub_dbs(backend, UUID)) == 3
    backend.close()


def store_of_version(backend, version: int):
    """The store of UUID as a later release of layout ``version`` would leave it; reopened."""
    backend.record(make_rec())
    newer = bytearray(sf.format_value(sf.FormatRecord(chunk_bytes=CB, uuid=UUID)))
    newer[4:6] = version.to_bytes(2, "little")
    _poke(backend, UUID, None, sf.FORMAT_KEY, bytes(newer))
    return fresh(backend.state_dir)


def test_store_of_an_unknown_version_is_refused(backend):
    backend = store_of_version(backend, 4)
    restored = restore(backend)
    _assert_moved_aside(backend.state_dir, UUID, restored, "version 4")
    backend.close()


def test_a_flipped_bit_in_any_stored_chunk_is_found_and_the_store_moved_aside(backend):
    rec = make_rec()
    backend.record(rec)
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    backend.drop(UUID, 9, StoredState(uuid=UUID, generation=1, region_count=rec.region_count,
                                      clean=pattern(rec, 3), sync=pattern(rec, 4), source_luid=9))
    backend.close()
    rnd = random.Random(7)
    names = [b"clean.0000000000000001", b"sync.0000000000000001", sf.RETAINED_CLEAN, sf.RETAINED_SYNC]
    for round_ in range(12):
        state = backend.state_dir.parent / f"copy{round_}"
        shutil.copytree(backend.state_dir, state)
        probe = fresh(state)
        name = names[round_ % len(names)]
        values = probe.contents(UUID)[name]
        key = rnd.choice(sorted(values))
        value = bytearray(values[key])
        value[rnd.randrange(len(value))] ^= 1 << rnd.randrange(8)  # bitmap bytes or checksum
        probe.close()
        _poke(probe, UUID, name, key, bytes(value))
        restored = restore(fresh(state))
        assert "fails its checksum" in restored.damaged[UUID], (name, key)
        assert not restored.instances and UUID not in restored.retained


def test_unknown_version_found_outside_restore_is_a_backend_error(backend):
    backend = store_of_version(backend, 7)
    with pytest.raises(BackendError, match="version 7"):
        backend.commit(Commit(make_rec(), {}, {}))
    backend.close()


def test_an_emptied_data_file_is_damage(backend):
    """An environment's directory is made with its first transaction: an empty data.mdb means its
    data was lost (moved aside, full resync). A directory whose data.mdb was never made (a crash
    before LMDB created it) is no damage."""
    backend.record(make_rec())
    backend.record(make_rec(uuid="LVM-never-written"))
    backend.close()
    (backend.env_path(UUID) / "data.mdb").write_bytes(b"")
    other = backend.env_path("LVM-never-written")
    for path in other.iterdir():
        path.unlink()
    backend = fresh(backend.state_dir)
    restored = restore(backend)
    _assert_moved_aside(backend.state_dir, UUID, restored, "data.mdb is empty")
    assert "LVM-never-written" not in restored.damaged
    assert restored.instances == []
    backend.close()


def test_a_file_that_is_not_lmdb_is_damage(tmp_path):
    path = tmp_path / "s" / ("u." + UUID)
    path.mkdir(parents=True)
    (path / "data.mdb").write_bytes(b"\x55" * 16384)
    backend = fresh(tmp_path / "s")
    restored = restore(backend)
    assert UUID in restored.damaged
    assert not path.exists()
    backend.close()


# --- modes ------------------------------------------------------------------------------------------


def test_directories_0700_files_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        backend = fresh(tmp_path / "state")
        restore(backend)
        rec = make_rec()
        backend.record(rec, backend.position())
        for _ in range(10):
            backend.log_ops(UUID, 1, [(OP_MARK, 1)] * 2000)  # into further segments
            backend.maintain(0)  # makes the next segment when due, as the store worker does
        env_dir = backend.env_path(UUID)
        assert stat.S_IMODE(env_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
        for name in ("data.mdb", "lock.mdb"):
            assert stat.S_IMODE((env_dir / name).stat().st_mode) == 0o600, name
        segments = segment_files(tmp_path / "state")
        assert len(segments) >= 2
        for path in segments:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
        backend.close()
    finally:
        os.umask(old)


# --- map growth and faults ----------------------------------------------------------------------------


def test_map_full_grows_the_map_and_retries(tmp_path):
    backend = fresh(tmp_path / "s", map_size=64 * 1024)
    rec = make_rec(region_count=40 * regionlog.CHUNK_BITS)  # 2 x 160 KiB of bitmaps
    backend.record(rec)
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    assert backend._envs[UUID].env.info()["map_size"] >= 512 * 1024
    backend = reopen(backend)
    (inst,) = restore(backend).instances
    assert (inst.clean, inst.sync) == (pattern(rec, 1), pattern(rec, 2))
    backend.close()


class _FailingTxn:
    """A write transaction whose commit fails the way a full or failing disk makes it fail."""

    def __init__(self, txn: lmdb.Transaction, exc: Exception):
        self.txn, self.exc = txn, exc

    def commit(self) -> None:
        self.txn.abort()
        raise self.exc

    def __getattr__(self, name: str):
        return getattr(self.txn, name)


class _FailingEnv:
    def __init__(self, env: lmdb.Environment, exc: Exception):
        self.env, self.exc, self.armed = env, exc, True

    def begin(self, write: bool = False, **kw):
        txn = self.env.begin(write=write, **kw)
        return _FailingTxn(txn, self.exc) if write and self.armed else txn

    def open_db(self, name, txn=None, **kw):
        return self.env.open_db(name, txn=getattr(txn, "txn", txn), **kw)

    def __getattr__(self, name: str):
        return getattr(self.env, name)


def lmdb_error(cls: type[lmdb.Error], code: int) -> lmdb.Error:
    """An lmdb error as py-lmdb raises it (with the LMDB/OS code in ``code``)."""
    exc = cls(f"mdb_txn_commit: {os.strerror(code) if code > 0 else 'LMDB error'}", code)
    exc.code = code
    return exc


@pytest.mark.parametrize(("exc", "code"), [
    (lmdb_error(lmdb.DiskError, errno.ENOSPC), errno.ENOSPC),
    (lmdb_error(lmdb.Error, errno.EIO), errno.EIO),
    (lmdb_error(lmdb.CorruptedError, -30796), errno.EIO),
])
def test_a_failing_commit_is_a_backend_error_and_changes_nothing(daemon, exc, code):
    backend = daemon
    rec = make_rec()
    backend.record(rec, backend.position())
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    ckpt = checkpoint(backend, UUID, 1)
    backend.log_ops(UUID, 1, [(OP_MARK, 1)])
    e = backend._envs[UUID]
    e.env = _FailingEnv(e.env, exc)
    with pytest.raises(BackendError) as info:
        full_commit(backend, rec, pattern(rec, 3), pattern(rec, 4), resized=False)
    assert info.value.errno == code
    e.env.armed = False
    # Neither the bitmaps nor the checkpoint moved: the journal since it is still replayed.
    assert checkpoint(backend, UUID, 1) == ckpt
    backend.log_ops(UUID, 1, [(OP_MARK, 2)])
    backend, restored = restart(backend)
    (inst,) = restored.instances
    assert (inst.clean, inst.sync) == (pattern(rec, 1), pattern(rec, 2))
    assert inst.journal == [(OP_MARK, 1), (OP_MARK, 2)]
    e = backend._env(UUID, create=False)
    e.env = _FailingEnv(e.env, exc)
    with pytest.raises(BackendError):
        full_commit(backend, rec, pattern(rec, 3), pattern(rec, 4), resized=False)
    assert checkpoint(backend, UUID, 1) == ckpt
    e.env.armed = False
    at = backend.position()
    full_commit(backend, rec, pattern(rec, 5), pattern(rec, 6), resized=False, position=at)
    assert checkpoint(backend, UUID, 1) == sf.CheckpointRecord(ckpt.journal_id, at)
    backend, restored = restart(backend)
    (inst,) = restored.instances
    assert (inst.clean, inst.sync, inst.journal) == (pattern(rec, 5), pattern(rec, 6), [])
    backend.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any mode bits")
def test_read_only_store_directory_is_a_backend_error(backend):
    rec = make_rec()
    backend.record(rec)
    backend = reopen(backend)
    path = backend.env_path(UUID)
    os.chmod(path / "data.mdb", 0o400)
    try:
        with pytest.raises(BackendError):
            full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    finally:
        os.chmod(path / "data.mdb", 0o600)
    backend.close()


def test_a_full_filesystem_is_a_backend_error_and_the_next_commit_succeeds(tmp_path):
    """RLIMIT_FSIZE makes the data file's growth fail (EFBIG) like a full disk, without root."""
    script = textwrap.dedent("""
        import resource, signal, sys
        from pathlib import Path
        from ulog_disk.storage import store_format as sf
        from ulog_disk.storage.base import BackendError, Commit
        from ulog_disk.log.records import InstanceRecord
        from ulog_disk.storage.lmdb_store import LmdbBackend
        from ulog_disk.log.regionlog import CHUNK_BITS, CHUNK_BYTES

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        state = Path(sys.argv[1])
        backend = LmdbBackend(state)
        n = 64 * CHUNK_BITS
        rec = InstanceRecord(uuid="full", luid=1, ctr=f"{n * 8} core 8", log_type="core", region_size=8,
                             region_count=n, state="live", generation=1, cursor=0, boot_id="b",
                             resumed=True)
        backend.record(rec)
        chunks = sf.split_chunks(b"\\xa5" * (n // 8), n, CHUNK_BYTES)
        size = (backend.env_path("full") / "data.mdb").stat().st_size
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 64 * 1024, hard))
        try:
            backend.commit(Commit(rec, chunks, chunks, resized=True))
            print("committed")
        except BackendError as exc:
            print("error", exc.errno)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        backend.commit(Commit(rec, chunks, chunks, resized=True))
        backend.close()
        backend = LmdbBackend(state)
        (inst,) = backend.restore("b").instances
        print("restored", inst.clean == b"\\xa5" * (n // 8))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "s")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    failed, restored = out.stdout.split("\n")[:2]
    # LMDB reports the short write at the limit as EIO, a write at the limit as EFBIG.
    assert failed in (f"error {errno.EIO}", f"error {errno.EFBIG}"), out.stdout
    assert restored == "restored True"


# --- chunk size changes ------------------------------------------------------------------------------


def test_a_store_written_with_another_chunk_size_is_rechunked(tmp_path, monkeypatch):
    monkeypatch.setattr(regionlog, "CHUNK_BYTES", 1024)
    monkeypatch.setattr(regionlog, "CHUNK_BITS", 8192)
    backend = fresh(tmp_path / "s")
    rec = make_rec(region_count=5 * 8192 + 3)
    backend.record(rec)
    clean, sync = pattern(rec, 1), pattern(rec, 2)
    backend.commit(Commit(rec, sf.split_chunks(clean, rec.region_count, 1024),
                          sf.split_chunks(sync, rec.region_count, 1024), resized=True))
    backend.drop(UUID, 9, StoredState(uuid=UUID, generation=1, region_count=rec.region_count, clean=sync,
                                      sync=clean, source_luid=9))
    backend.close()
    monkeypatch.undo()
    backend = fresh(tmp_path / "s")
    restored = restore(backend)
    (inst,) = restored.instances
    assert (inst.clean, inst.sync) == (clean, sync)
    assert (restored.retained[UUID].clean, restored.retained[UUID].sync) == (sync, clean)
    contents = backend.contents(UUID)
    assert sf.read_format_value(contents[b""][sf.FORMAT_KEY]).chunk_bytes == CB
    count = regionlog.chunk_count(rec.region_count)
    assert chunk_keys(backend, UUID, b"clean.0000000000000001") == list(range(count))
    backend.close()


def test_a_layout_1_store_is_migrated_to_layout_3_in_one_transaction(backend):
    """Layout 1 (4080-byte chunks, no checksums), written here from its construct definition:
    opened by this version, every bitmap is read as it was and rewritten sealed."""
    rec = make_rec(region_count=3 * 4080 * 8 + 100)
    backend.record(rec)
    clean, sync = pattern(rec, 1), pattern(rec, 2)
    retained = StoredState(uuid=UUID, generation=1, region_count=rec.region_count, clean=sync,
                           sync=clean, source_luid=9)
    backend.close()
    env = lmdb.open(str(backend.env_path(UUID)), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(sf.FORMAT_KEY, sf.FormatRecordV1.build(dict(chunk_bytes=4080, created_at=1.0, uuid=UUID)))
        meta_db = env.open_db(b"meta.0000000000000001", txn=txn)
        txn.put(sf.RECORD_KEY, sf.record_bytes(b"meta.0000000000000001", txn.get(sf.RECORD_KEY, db=meta_db)),
                db=meta_db)
        for name, bitmap in ((b"clean.0000000000000001", clean), (b"sync.0000000000000001", sync),
                             (sf.RETAINED_CLEAN, retained.clean), (sf.RETAINED_SYNC, retained.sync)):
            db = env.open_db(name, txn=txn)
            txn.drop(db, delete=False)
            for index, bits in sf.split_chunks(bitmap, rec.region_count, 4080).items():
                txn.put(sf.encode_chunk_key(index), bits, db=db)
        txn.put(sf.RECORD_KEY, sf.RetainedRecord(uuid=UUID, generation=1, region_count=rec.region_count,
                                                 source_luid=9).encode(),
                db=env.open_db(sf.RETAINED_META, txn=txn))
        assert sf.FormatRecord.decode(txn.get(sf.FORMAT_KEY)).version == 1
    env.close()
    backend = fresh(backend.state_dir)
    restored = restore(backend)
    (inst,) = restored.instances
    assert (inst.clean, inst.sync) == (clean, sync)
    assert (restored.retained[UUID].clean, restored.retained[UUID].sync) == (sync, clean)
    contents = backend.contents(UUID)
    fmt = sf.read_format_value(contents[b""][sf.FORMAT_KEY])
    assert (fmt.version, fmt.chunk_bytes, fmt.created_at) == (sf.LAYOUT_VERSION, CB, 1.0)
    for name in (b"meta.0000000000000001", sf.RETAINED_META):
        sf.record_bytes(name, contents[name][sf.RECORD_KEY])  # sealed now
    for name, bitmap in ((b"clean.0000000000000001", clean), (sf.RETAINED_SYNC, clean)):
        assert sf.read_bitmap(name, contents[name], rec.region_count, CB) == bitmap
    # The instance follows the state directory's journal from its end at the migration on.
    assert checkpoint(backend, UUID, 1).journal_id == backend.journal.journal_id
    assert inst.journal_damaged is None
    backend.close()


def _old_layout(backend: LmdbBackend, rec: InstanceRecord, layout: int, commit_seq: int,
                journal: bytes | None) -> None:
    """Rewrite a closed store as layout ``layout`` (1 or 2) wrote it: its format record, a meta
    with ``commit_seq``, no checkpoint, values sealed only from layout 2 on, the instance's own
    ``journal.<luid>`` file (``journal``), and no daemon-wide journal in the state directory."""
    env = lmdb.open(str(backend.env_path(UUID)), max_dbs=16)
    meta_name = sf.instance_db_name("meta", rec.luid)
    sealed = layout >= 2
    with env.begin(write=True) as txn:
        fmt = (sf.FormatRecordV1 if layout == 1 else sf.FormatRecordV2).build(
            dict(chunk_bytes=CB, created_at=1.0, uuid=UUID))
        txn.put(sf.FORMAT_KEY, sf.seal(sf.MAIN_DB, sf.FORMAT_KEY, fmt) if sealed else fmt)
        meta_db = env.open_db(meta_name, txn=txn)
        meta = sf.MetaRecord.from_instance(rec, commit_seq).encode()
        txn.put(sf.RECORD_KEY, sf.record_value(meta_name, meta) if sealed else meta, db=meta_db)
        assert txn.delete(sf.CHECKPOINT_KEY, db=meta_db)
        if not sealed:
            for kind in ("clean", "sync"):
                name = sf.instance_db_name(kind, rec.luid)
                db = env.open_db(name, txn=txn)
                for key, value in list(txn.cursor(db=db)):
                    txn.put(key, sf.unseal_chunk(name, key, value), db=db)
    env.close()
    for path in segment_files(backend.state_dir):
        path.unlink()
    if journal is not None:
        (backend.env_path(UUID) / sf.journal_file_name(rec.luid)).write_bytes(journal)


@pytest.mark.parametrize("layout", [1, 2])
@pytest.mark.parametrize("case", ["follows", "stale", "ahead", "garbage", "none"])
def test_an_old_layout_store_folds_its_instance_journal_in(backend, layout, case):
    """Layouts 1 and 2 kept one journal file per instance (a header naming the commit it follows,
    then fixed-size ops). Migrated to layout 3: the ops of a journal that follows the meta's
    commit are folded into the bitmaps; a stale one (an older commit, already in it) is not; a
    damaged one (ahead of the commit, or an unreadable header) makes the instance all dirty and
    out of sync; the files are removed; the instance gets a checkpoint at the journal's end."""
    rec = make_rec()
    backend.record(rec)
    clean, sync = pattern(rec, 1), pattern(rec, 2)
    full_commit(backend, rec, clean, sync)
    backend.close()
    ops = [(OP_MARK, 3), (OP_CLEAR, 4), (OP_SET_SYNC, 5), (OP_SET_NOSYNC, 6), (OP_MARK, 7)]
    body = sf.encode_journal_ops(ops)
    journal = {
        "follows": sf.JournalHeader(luid=1, commit_seq=5).encode() + body,
        "stale": sf.JournalHeader(luid=1, commit_seq=4).encode() + body,
        "ahead": sf.JournalHeader(luid=1, commit_seq=6).encode() + body,
        "garbage": random.Random(4).randbytes(sf.JOURNAL_HEADER_SIZE) + body,
        "none": None,
    }[case]
    _old_layout(backend, rec, layout, 5, journal)
    backend = fresh(backend.state_dir)
    restored = restore(backend)
    (inst,) = restored.instances
    want = {
        "follows": replayed(rec, clean, sync, ops),
        "stale": (clean, sync),
        "ahead": replayed(rec, clean, sync, [], distrust=True),
        "garbage": replayed(rec, clean, sync, [], distrust=True),
        "none": (clean, sync),
    }[case]
    assert (inst.clean, inst.sync) == want
    if case in ("ahead", "garbage"):
        assert inst.clean == bytes(nbytes(rec)) and inst.sync == bytes(nbytes(rec))
    assert (inst.journal, inst.journal_damaged, restored.damaged) == ([], None, {})
    assert not list(backend.env_path(UUID).glob("journal.*"))
    contents = backend.contents(UUID)
    assert sf.read_format_value(contents[b""][sf.FORMAT_KEY]).version == 3
    assert checkpoint(backend, UUID, 1).journal_id == backend.journal.journal_id
    sf.record_bytes(b"meta.0000000000000001", contents[b"meta.0000000000000001"][sf.RECORD_KEY])
    # Migrated once: a restart finds layout 3 and the same state.
    backend, restored = restart(backend)
    (inst,) = restored.instances
    assert (inst.clean, inst.sync, inst.journal, inst.journal_damaged) == (*want, [], None)
    backend.close()


def test_an_old_instance_journal_of_an_earlier_boot_is_not_folded_in(backend):
    """After a reboot layouts 1-2 never used an instance's journal (the kernel's state is gone):
    its ops are not folded in, and the file is removed."""
    rec = make_rec(boot_id="b0")
    backend.record(rec)
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    backend.close()
    _old_layout(backend, rec, 2, 5, sf.JournalHeader(luid=1, commit_seq=5).encode()
                + sf.encode_journal_ops([(OP_CLEAR, 1), (OP_SET_SYNC, 2)]))
    backend = fresh(backend.state_dir)
    (inst,) = restore(backend, "b1").instances
    assert (inst.clean, inst.sync) == (pattern(rec, 1), pattern(rec, 2))
    assert not list(backend.env_path(UUID).glob("journal.*"))
    backend.close()


# --- threads ----------------------------------------------------------------------------------------------


def in_threads(worker, count: int) -> None:
    """worker(0) .. worker(count - 1), each on its own thread, all joined."""
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_uuids_commit_in_parallel_threads(backend):
    """Store calls come from the store worker one at a time, but tools and tests may call from
    several threads: without a restore each write follows the journal on disk, and the first
    writers must agree on one (its creation is locked): one journal, every checkpoint naming it."""
    errors = []
    start = threading.Barrier(6)

    def worker(n: int) -> None:
        uuid = f"LVM-thread{n}"
        try:
            rec = make_rec(uuid=uuid, region_count=2 * regionlog.CHUNK_BITS)
            start.wait()
            backend.record(rec)
            for i in range(10):
                full_commit(backend, rec, pattern(rec, n * 100 + i), pattern(rec, i), resized=i == 0)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    in_threads(worker, 6)
    assert errors == []
    assert len(segment_files(backend.state_dir)) == 1
    jid = journal_id_on_disk(backend.state_dir)
    for n in range(6):
        assert checkpoint(backend, f"LVM-thread{n}", 1).journal_id == jid
    backend, restored = restart(backend)
    assert len(restored.instances) == 6 and restored.damaged == {}
    for inst in restored.instances:
        n = int(inst.record.uuid.removeprefix("LVM-thread"))
        assert inst.clean == pattern(inst.record, n * 100 + 9) and inst.journal == []
        assert inst.journal_damaged is None
    backend.close()


def test_instances_log_and_commit_from_parallel_threads(daemon):
    """The journal's appends are locked: records of many instances interleave whole."""
    backend = daemon
    errors = []
    recs = [make_rec(uuid=f"LVM-thread{n}", region_count=1000) for n in range(6)]
    for rec in recs:
        backend.record(rec, backend.position())

    def worker(n: int) -> None:
        try:
            for i in range(50):
                backend.log_ops(recs[n].uuid, 1, [(OP_MARK, n * 100 + i)])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    in_threads(worker, 6)
    assert errors == []
    backend.sync()
    backend, restored = restart(backend)
    got = {i.record.uuid: i.journal for i in restored.instances}
    for n, rec in enumerate(recs):
        assert got[rec.uuid] == [(OP_MARK, n * 100 + i) for i in range(50)]
    backend.close()


# --- chunk size measurement (formats/store.md, "Chunk size") ------------------------------------------

#: Stored value sizes measured (formats/store.md's table); the chunk's bitmap bytes are 4 fewer
#: (its checksum, store layout 2).
BENCH_VALUE_SIZES = (1024, 2016, 2048, 4080, 4096, 8176, 8192)
BENCH_SIZES = tuple(size - sf.CHECKSUM_SIZE for size in BENCH_VALUE_SIZES)


def _wchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar")).split()[1])


def _bench_one(chunk_bytes: int, regions: int, root: Path, n1: int, n100: int) -> dict[str, float]:
    """Commit latency and bytes written with 1 and 100 changed chunks, full write, size, restore."""
    regionlog.CHUNK_BYTES, regionlog.CHUNK_BITS = chunk_bytes, chunk_bytes * 8
    state = Path(tempfile.mkdtemp(dir=root))
    backend = LmdbBackend(state, map_size=1 << 20)
    rec = make_rec(uuid="bench", region_count=regions)
    backend.record(rec)
    log = regionlog.RegionLog.fresh(regions, True)
    clean, sync, _ = log.take_changes()
    t = time.perf_counter()
    backend.commit(Commit(rec, clean, sync, resized=True))
    out = {"full_ms": (time.perf_counter() - t) * 1e3}
    count = regionlog.chunk_count(regions)
    rnd = random.Random(1)
    for label, k, reps in (("1", 1, n1), ("100", 100, n100)):
        if count < k:
            out.update({f"{what}_{label}": float("nan") for what in ("p50", "p99", "kib")})
            continue
        times = []
        w0 = _wchar()
        for _ in range(reps):
            for i in rnd.sample(range(count), k):
                base = i * regionlog.CHUNK_BITS
                log.mark([base + rnd.randrange(min(regionlog.CHUNK_BITS, regions - base))])
            clean, sync, _ = log.take_changes()
            t = time.perf_counter()
            backend.commit(Commit(rec, clean, sync))
            times.append(time.perf_counter() - t)
        times.sort()
        out[f"kib_{label}"] = (_wchar() - w0) / reps / 1024
        out[f"p50_{label}"] = times[len(times) // 2] * 1e3
        out[f"p99_{label}"] = times[max(0, int(len(times) * 0.99) - 1)] * 1e3
    out["map_mib"] = backend._envs["bench"].env.info()["map_size"] / 2**20
    out["file_mib"] = (backend.env_path("bench") / "data.mdb").stat().st_size / 2**20
    backend.close()
    backend = LmdbBackend(state)
    t = time.perf_counter()
    backend.restore("bench")
    out["restore_ms"] = (time.perf_counter() - t) * 1e3
    backend.close()
    return out


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ULOG_BENCH"), reason="measurement: run with ULOG_BENCH=1 -s")
def test_chunk_size_measurement(tmp_path, monkeypatch):
    monkeypatch.setattr(regionlog, "CHUNK_BYTES", regionlog.CHUNK_BYTES)
    monkeypatch.setattr(regionlog, "CHUNK_BITS", regionlog.CHUNK_BITS)
    root = Path(os.environ.get("ULOG_BENCH_DIR") or tmp_path)
    print(f"\n{'chunk':>6} {'regions':>9} {'1ch p50':>8} {'1ch p99':>8} {'1ch KiB':>8} {'100ch p50':>9} "
          f"{'100ch p99':>9} {'100ch KiB':>9} {'full ms':>8} {'file MiB':>8} {'map MiB':>7} "
          f"{'restore ms':>10}")
    for regions in (32 * 1024, 32 * 1024 * 1024):
        for chunk_bytes in BENCH_SIZES:
            r = _bench_one(chunk_bytes, regions, root, n1=1000, n100=200)
            print(f"{chunk_bytes:>6} {regions:>9} {r['p50_1']:8.3f} {r['p99_1']:8.3f} {r['kib_1']:8.1f} "
                  f"{r['p50_100']:9.3f} {r['p99_100']:9.3f} {r['kib_100']:9.1f} {r['full_ms']:8.1f} "
                  f"{r['file_mib']:8.1f} {r['map_mib']:7.0f} {r['restore_ms']:10.1f}", flush=True)


# --- one reader ----------------------------------------------------------------------------------------


def _damage_cases():
    meta1, clean1, sync1 = (sf.instance_db_name(k, 1) for k in ("meta", "clean", "sync"))
    key0 = sf.encode_chunk_key(0)

    def flip(env, txn):
        db = env.open_db(clean1, txn=txn)
        value = bytearray(txn.get(key0, db=db))
        value[0] ^= 1
        txn.put(key0, bytes(value), db=db)

    def padding(env, txn):
        db = env.open_db(sync1, txn=txn)
        last = sf.encode_chunk_key(regionlog.chunk_count(make_rec().region_count) - 1)
        data = bytearray(sf.unseal_chunk(sync1, last, txn.get(last, db=db)))
        data[-1] |= 0x80
        txn.put(last, sf.seal(sync1, last, bytes(data)), db=db)

    def missing(env, txn):
        txn.delete(key0, db=env.open_db(sync1, txn=txn))

    def leftover(env, txn):
        env.open_db(sf.instance_db_name("clean", 0x77), txn=txn, create=True)

    def unknown_record(env, txn):
        txn.put(b"stray", b"x")

    def unknown_db(env, txn):
        env.open_db(b"whatever", txn=txn, create=True)

    def other_luid(env, txn):
        meta = sf.MetaRecord.from_instance(make_rec(luid=2), 9).encode()
        txn.put(sf.RECORD_KEY, sf.record_value(meta1, meta), db=env.open_db(meta1, txn=txn))

    def bad_checkpoint(env, txn):
        txn.put(sf.CHECKPOINT_KEY, sf.seal(meta1, sf.CHECKPOINT_KEY, b"ULGC"), db=env.open_db(meta1, txn=txn))

    def retained_bitmaps_only(env, txn):
        txn.drop(env.open_db(sf.RETAINED_META, txn=txn), delete=True)

    def nothing(env, txn):
        pass

    return {"flip": (flip, True), "padding": (padding, False), "missing": (missing, False),
            "leftover": (leftover, False), "unknown_record": (unknown_record, False),
            "unknown_db": (unknown_db, False), "other_luid": (other_luid, True),
            "bad_checkpoint": (bad_checkpoint, True), "retained_bitmaps_only": (retained_bitmaps_only, False),
            "nothing": (nothing, False)}


@pytest.mark.parametrize("case", sorted(_damage_cases()))
def test_the_daemon_refuses_exactly_the_stores_the_tools_call_damaged(daemon, case):
    """One reader: a store the tools judge damaged (an error) is the store the daemon's restore
    moves aside; what they only warn about, the daemon reads past."""
    from ulog_disk.tools import storeview as sv

    edit, refused = _damage_cases()[case]
    backend = daemon
    rec = make_rec()
    backend.record(rec, backend.position())
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2), position=backend.position())
    backend.drop(UUID, 9, StoredState(uuid=UUID, generation=2, region_count=rec.region_count,
                                      clean=pattern(rec, 3), sync=pattern(rec, 4), source_luid=9))
    backend.close()
    env = lmdb.open(str(backend.env_path(UUID)), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            edit(env, txn)
    finally:
        env.close()
    ev = sv.read_store(backend.state_dir, BOOT).env(UUID)
    assert ev is not None and ev.damaged == refused, ev.all_findings()
    restored = restore(fresh(backend.state_dir))
    assert (UUID in restored.damaged) == refused
    if not refused:
        (inst,) = restored.instances
        (view,) = ev.instances
        assert (view.clean, view.sync) == (regionlog.exact_bits(inst.clean, rec.region_count),
                                           regionlog.exact_bits(inst.sync, rec.region_count))
