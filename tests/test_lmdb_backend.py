"""The LMDB backend on its own: layout in the environment, journal rule, damage, faults, modes.

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

from ulog_disk import regionlog
from ulog_disk import store_format as sf
from ulog_disk.backends.base import (
    OP_CLEAR,
    OP_MARK,
    OP_SET_SYNC,
    BackendError,
    Commit,
    InstanceRecord,
    StoredState,
    load_backend,
)
from ulog_disk.backends.lmdb_store import LmdbBackend

CB = regionlog.CHUNK_BYTES
UUID = "LVM-test0123"


def make_rec(uuid: str = UUID, luid: int = 1, region_count: int = 3 * regionlog.CHUNK_BITS + 100,
             **kw) -> InstanceRecord:
    fields = dict(uuid=uuid, luid=luid, ctr=f"{region_count * 8} core 8", log_type="core", region_size=8,
                  region_count=region_count, state="live", generation=1, cursor=0, boot_id="b1",
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


def full_commit(backend: LmdbBackend, rec: InstanceRecord, clean: bytes, sync: bytes,
                resized: bool = True) -> None:
    backend.commit(Commit(rec, sf.split_chunks(clean, rec.region_count, CB),
                          sf.split_chunks(sync, rec.region_count, CB), resized=resized))


def chunk_keys(backend: LmdbBackend, uuid: str, name: bytes) -> list[int]:
    return sorted(sf.decode_chunk_key(k) for k in backend.contents(uuid).get(name, {}))


def sub_dbs(backend: LmdbBackend, uuid: str) -> set[bytes]:
    return {name for name in backend.contents(uuid) if name}


def stored_seq(backend: LmdbBackend, uuid: str, luid: int) -> int:
    name = sf.instance_db_name("meta", luid)
    return sf.MetaRecord.decode(sf.record_bytes(name, backend.contents(uuid)[name][sf.RECORD_KEY])).commit_seq


@pytest.fixture
def backend(tmp_path):
    b = LmdbBackend(tmp_path / "state")
    yield b
    b.close()


def reopen(backend: LmdbBackend) -> LmdbBackend:
    backend.close()
    return LmdbBackend(backend.state_dir)


# --- plugin ----------------------------------------------------------------------------------------


def test_registered_as_the_lmdb_entry_point():
    assert load_backend("lmdb") is LmdbBackend
    assert LmdbBackend.name == "lmdb" and LmdbBackend.durable


# --- layout ----------------------------------------------------------------------------------------


def test_record_creates_the_instance_sub_databases_without_bitmaps(backend):
    rec = make_rec(resumed=False, state="constructed", generation=0)
    backend.record(rec)
    contents = backend.contents(UUID)
    assert set(contents) == {b"", b"meta.0000000000000001", b"clean.0000000000000001",
                             b"sync.0000000000000001"}
    assert contents[b"clean.0000000000000001"] == {} and contents[b"sync.0000000000000001"] == {}
    fmt = sf.read_format_value(contents[b""][sf.FORMAT_KEY])
    assert (fmt.uuid, fmt.chunk_bytes, fmt.version) == (UUID, CB, sf.LAYOUT_VERSION)
    raw = contents[b"meta.0000000000000001"][sf.RECORD_KEY]
    meta = sf.MetaRecord.decode(sf.record_bytes(b"meta.0000000000000001", raw))
    # Every value is sealed: the record's bytes, then the CRC-32 of name, key and bytes.
    assert raw[-4:] == zlib.crc32(b"meta.0000000000000001" + sf.RECORD_KEY + raw[:-4]).to_bytes(4, "little")
    assert meta.instance() == rec and meta.commit_seq == 0


def test_commit_writes_only_the_chunks_it_carries(backend):
    rec = make_rec()
    backend.record(rec)
    a, b = b"\x0f" * CB, b"\xf0" * CB
    backend.commit(Commit(rec, {2: a}, {}, resized=False))
    assert chunk_keys(backend, UUID, b"clean.0000000000000001") == [2]
    assert chunk_keys(backend, UUID, b"sync.0000000000000001") == []
    backend.commit(Commit(rec, {0: b}, {1: a}, resized=False))
    contents = backend.contents(UUID)
    clean_name, sync_name = b"clean.0000000000000001", b"sync.0000000000000001"
    k0, k1, k2 = (sf.encode_chunk_key(i) for i in range(3))
    assert contents[clean_name] == {k0: sf.seal_chunk(clean_name, k0, b),
                                    k2: sf.seal_chunk(clean_name, k2, a)}
    assert contents[sync_name] == {k1: sf.seal_chunk(sync_name, k1, a)}
    # Sealed: the bitmap bytes, then a CRC-32 of the sub-database name, the key and the bytes.
    assert contents[sync_name][k1] == a + zlib.crc32(sync_name + k1 + a).to_bytes(4, "little")
    assert stored_seq(backend, UUID, 1) == 2


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
    backend = reopen(backend)
    (inst,) = backend.restore().instances
    assert (inst.clean, inst.sync) == (pattern(small, 3), pattern(small, 4))
    backend.close()


def test_resize_without_the_last_chunk_drops_a_last_chunk_of_the_old_length(backend):
    big = make_rec(region_count=2 * regionlog.CHUNK_BITS)
    full_commit(backend, big, b"\xff" * nbytes(big), b"\xff" * nbytes(big))
    small = make_rec(region_count=regionlog.CHUNK_BITS + 8)
    backend.commit(Commit(small, {0: b"\xff" * CB}, {}, resized=True))
    backend = reopen(backend)
    (inst,) = backend.restore().instances  # not damaged: the odd chunk is gone, reads as zeros
    assert inst.clean == b"\xff" * CB + b"\0" and inst.sync == b"\xff" * CB + b"\0"
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
    backend = reopen(backend)
    restored = backend.restore()
    assert restored.damaged == {}
    got = {(i.record.uuid, i.record.luid): i for i in restored.instances}
    assert set(got) == {(UUID, live.luid), (UUID, 7)}
    for r, seed in ((live, 1), (old, 2)):
        inst = got[(r.uuid, r.luid)]
        assert inst.record == r
        assert (inst.clean, inst.sync, inst.journal) == (pattern(r, seed), pattern(r, seed + 10), [])
    assert restored.retained == {odd: StoredState(uuid=odd, generation=5, region_count=9, clean=b"\xff\x01",
                                                  sync=b"\x0f\x00", source_luid=1, committed_at=2.5)}
    assert sorted(os.listdir(backend.state_dir)) == sorted(["u." + UUID, sf.encode_dir_name(odd)])
    backend.close()


def test_fresh_instance_restores_with_zero_bitmaps(backend):
    """Never committed: no chunks. It comes back all dirty and out of sync (the safe direction)."""
    rec = make_rec(region_count=1001, resumed=False, state="constructed", generation=0)
    backend.record(rec)
    backend = reopen(backend)
    (inst,) = backend.restore().instances
    assert inst.record == rec and inst.clean == bytes(126) and inst.sync == bytes(126)
    backend.close()


def test_restore_of_an_empty_or_missing_state_dir(tmp_path):
    assert LmdbBackend(tmp_path / "none").restore().instances == []
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "lock").write_text("123\n")
    (tmp_path / "s" / "not-a-store").mkdir()
    (tmp_path / "s" / "u.x.damaged-1").mkdir()
    restored = LmdbBackend(tmp_path / "s").restore()
    assert (restored.instances, restored.retained, restored.damaged) == ([], {}, {})


# --- journal ----------------------------------------------------------------------------------------


def journal_path(backend: LmdbBackend, uuid: str, luid: int) -> Path:
    return backend.env_path(uuid) / sf.journal_file_name(luid)


def test_journal_ops_since_the_last_commit_are_replayed(backend):
    rec = make_rec()
    backend.record(rec)
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    backend.journal(UUID, 1, [(OP_MARK, 5), (OP_MARK, 6)])
    backend.journal(UUID, 1, [(OP_CLEAR, 5)])
    data = journal_path(backend, UUID, 1).read_bytes()
    assert sf.JournalHeader.decode(data) == sf.JournalHeader(luid=1, commit_seq=stored_seq(backend, UUID, 1))
    assert len(data) == sf.JOURNAL_HEADER_SIZE + 3 * sf.JOURNAL_RECORD_SIZE
    backend = reopen(backend)
    (inst,) = backend.restore().instances
    assert inst.journal == [(OP_MARK, 5), (OP_MARK, 6), (OP_CLEAR, 5)]
    # Appends after a restore go on after the replayed ops, under the same header.
    backend.journal(UUID, 1, [(OP_SET_SYNC, 9)])
    backend = reopen(backend)
    (inst,) = backend.restore().instances
    assert inst.journal == [(OP_MARK, 5), (OP_MARK, 6), (OP_CLEAR, 5), (OP_SET_SYNC, 9)]
    backend.close()


def test_a_commit_empties_the_journal(backend):
    rec = make_rec()
    backend.record(rec)
    backend.journal(UUID, 1, [(OP_MARK, 5)])
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    # Until after_commit (the FLUSH reply goes first) the file keeps the older header, whose
    # ops a restore leaves alone: they are in the commit.
    stale = journal_path(backend, UUID, 1).read_bytes()
    assert sf.JournalHeader.decode(stale).commit_seq == 0 and len(stale) > sf.JOURNAL_HEADER_SIZE
    backend.after_commit(UUID, 1)
    data = journal_path(backend, UUID, 1).read_bytes()
    assert data == sf.JournalHeader(luid=1, commit_seq=1).encode()
    backend = reopen(backend)
    assert backend.restore().instances[0].journal == []
    backend.close()


def test_a_journal_write_after_a_commit_resets_the_file_if_after_commit_did_not(backend):
    rec = make_rec()
    backend.record(rec)
    backend.journal(UUID, 1, [(OP_MARK, 5)])
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    backend.journal(UUID, 1, [(OP_CLEAR, 7)])
    data = journal_path(backend, UUID, 1).read_bytes()
    assert sf.JournalHeader.decode(data).commit_seq == 1
    backend = reopen(backend)
    assert backend.restore().instances[0].journal == [(OP_CLEAR, 7)]
    backend.close()


def test_journal_of_a_crash_between_commit_and_truncation_is_not_replayed(backend):
    rec = make_rec()
    backend.record(rec)
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    backend.journal(UUID, 1, [(OP_MARK, 5), (OP_MARK, 6)])
    # The daemon dies after the LMDB commit and before after_commit truncates the journal.
    full_commit(backend, rec, pattern(rec, 3), pattern(rec, 4), resized=False)
    header = sf.JournalHeader.decode(journal_path(backend, UUID, 1).read_bytes())
    assert header.commit_seq == stored_seq(backend, UUID, 1) - 1
    backend = reopen(backend)
    (inst,) = backend.restore().instances
    assert inst.journal == [] and inst.clean == pattern(rec, 3)
    # The stale ops are gone from the file, so later appends are not hidden behind an old header.
    backend.journal(UUID, 1, [(OP_CLEAR, 6)])
    backend = reopen(backend)
    assert backend.restore().instances[0].journal == [(OP_CLEAR, 6)]
    backend.close()


def test_journal_killed_between_truncation_and_header_replays_nothing(backend):
    rec = make_rec()
    backend.record(rec)
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    backend.close()
    journal_path(backend, UUID, 1).write_bytes(b"")
    backend = LmdbBackend(backend.state_dir)
    assert backend.restore().instances[0].journal == []
    backend.journal(UUID, 1, [(OP_MARK, 1)])
    backend = reopen(backend)
    assert backend.restore().instances[0].journal == [(OP_MARK, 1)]
    backend.close()


def test_journal_with_a_partial_last_record_keeps_the_whole_ones(backend):
    rec = make_rec()
    backend.record(rec)
    backend.journal(UUID, 1, [(OP_MARK, 3)])
    backend.close()
    with open(journal_path(backend, UUID, 1), "ab") as f:
        f.write(sf.encode_journal_ops([(OP_MARK, 4)])[:9])
    backend = LmdbBackend(backend.state_dir)
    assert backend.restore().instances[0].journal == [(OP_MARK, 3)]
    backend.journal(UUID, 1, [(OP_CLEAR, 3)])
    backend = reopen(backend)
    assert backend.restore().instances[0].journal == [(OP_MARK, 3), (OP_CLEAR, 3)]
    backend.close()


def test_journal_is_never_fsynced(backend, monkeypatch):
    rec = make_rec()
    backend.record(rec)
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(fd))
    backend.journal(UUID, 1, [(OP_MARK, 1)] * 32)
    assert calls == []


def test_journal_for_an_unrecorded_instance_is_a_backend_error(backend):
    with pytest.raises(BackendError):
        backend.journal("LVM-nobody", 1, [(OP_MARK, 1)])


def test_record_replacing_an_instance_drops_its_bitmaps_and_journal(backend):
    rec = make_rec(resumed=False, state="constructed", generation=0)
    backend.record(rec)
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    backend.journal(UUID, 1, [(OP_MARK, 1)])
    seq = stored_seq(backend, UUID, 1)
    other = make_rec(ctr="999999 core 8", region_count=124_999, resumed=False, state="constructed",
                     generation=0)
    backend.record(other)
    assert chunk_keys(backend, UUID, b"clean.0000000000000001") == []
    assert stored_seq(backend, UUID, 1) == seq + 1
    backend = reopen(backend)
    (inst,) = backend.restore().instances
    assert inst.record == other and inst.journal == [] and inst.clean == bytes(nbytes(other))
    backend.close()


def test_record_reusing_the_luid_of_an_earlier_boot_keeps_its_state(backend):
    """The kernel of a new boot may reuse a luid: the old instance's state (a hand-over candidate)
    stays in the store as the retained state until the new instance commits its own."""
    old = make_rec(boot_id="b0", generation=6)
    backend.record(old)
    full_commit(backend, old, pattern(old, 1), pattern(old, 2))
    new = make_rec(boot_id="b1", resumed=False, state="constructed", generation=0)
    backend.record(new)
    backend = reopen(backend)
    restored = backend.restore()
    assert [i.record for i in restored.instances] == [new]
    kept = restored.retained[UUID]
    assert (kept.generation, kept.source_luid) == (6, 1)
    assert (kept.clean, kept.sync) == (pattern(old, 1), pattern(old, 2))
    backend.close()


def test_a_damaged_earlier_boot_state_is_not_kept_but_the_ctr_succeeds(backend):
    old = make_rec(boot_id="b0", generation=6)
    backend.record(old)
    full_commit(backend, old, pattern(old, 1), pattern(old, 2))
    name, key = b"sync.0000000000000001", sf.encode_chunk_key(1)
    value = bytearray(backend.contents(UUID)[name][key])
    value[0] ^= 1
    _poke(backend, UUID, name, key, bytes(value))
    backend = LmdbBackend(backend.state_dir)  # no restore(): it would find the damage first
    new = make_rec(boot_id="b1", resumed=False, state="constructed", generation=0)
    backend.record(new)  # not refused: damage in the state it replaces must not block a CTR
    contents = backend.contents(UUID)
    assert sf.RETAINED_META not in contents and sf.RETAINED_SYNC not in contents
    backend = reopen(backend)
    restored = backend.restore()
    assert [i.record for i in restored.instances] == [new] and UUID not in restored.retained
    backend.close()


# --- drop -------------------------------------------------------------------------------------------


def test_drop_with_retention_is_one_transaction(backend):
    a = make_rec(luid=1)
    b = make_rec(luid=2)
    for r in (a, b):
        backend.record(r)
        full_commit(backend, r, pattern(r, r.luid), pattern(r, r.luid + 10))
        backend.journal(UUID, r.luid, [(OP_MARK, 1)])
    backend.drop(UUID, 2, None)
    assert sub_dbs(backend, UUID) == {b"meta.0000000000000001", b"clean.0000000000000001",
                                      b"sync.0000000000000001"}
    assert not journal_path(backend, UUID, 2).exists()
    state = StoredState(uuid=UUID, generation=9, region_count=a.region_count, clean=pattern(a, 5),
                        sync=pattern(a, 6), source_luid=1, committed_at=3.0)
    txns = []
    real_write = LmdbBackend._write

    def counting_write(self, e, body):
        txns.append(body)
        return real_write(self, e, body)

    LmdbBackend._write = counting_write
    try:
        backend.drop(UUID, 1, state)
    finally:
        LmdbBackend._write = real_write
    assert len(txns) == 1
    assert sub_dbs(backend, UUID) == {sf.RETAINED_META, sf.RETAINED_CLEAN, sf.RETAINED_SYNC}
    assert not journal_path(backend, UUID, 1).exists()
    assert chunk_keys(backend, UUID, sf.RETAINED_CLEAN) == list(range(regionlog.chunk_count(a.region_count)))
    # A later retention replaces the earlier one whole, including a shorter geometry.
    c = make_rec(luid=3, region_count=10)
    backend.record(c)
    backend.drop(UUID, 3, StoredState(uuid=UUID, generation=10, region_count=10, clean=b"\x01\x02",
                                      sync=b"\x03\x00", source_luid=3))
    backend = reopen(backend)
    restored = backend.restore()
    assert restored.instances == []
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
     sf.seal_chunk(b"clean.0000000000000001", sf.encode_chunk_key(99), b"\0"), "past"),
    (b"sync.0000000000000001", sf.encode_chunk_key(0),
     sf.seal_chunk(b"sync.0000000000000001", sf.encode_chunk_key(0), b"\0" * 5), "bytes"),
    # Whole, but sealed for another place: the other bitmap's, another luid's, another index's.
    (b"sync.0000000000000001", sf.encode_chunk_key(0),
     sf.seal_chunk(b"clean.0000000000000001", sf.encode_chunk_key(0), b"\0" * CB), "fails its checksum"),
    (b"sync.0000000000000001", sf.encode_chunk_key(0),
     sf.seal_chunk(b"sync.0000000000000002", sf.encode_chunk_key(0), b"\0" * CB), "fails its checksum"),
    (b"sync.0000000000000001", sf.encode_chunk_key(0),
     sf.seal_chunk(b"sync.0000000000000001", sf.encode_chunk_key(1), b"\0" * CB), "fails its checksum"),
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
    backend = LmdbBackend(backend.state_dir)
    restored = backend.restore()
    _assert_moved_aside(backend.state_dir, UUID, restored, fragment)
    assert [i.record.uuid for i in restored.instances] == ["LVM-healthy"]
    # The uuid starts from nothing.
    backend.record(rec)
    assert len(sub_dbs(backend, UUID)) == 3
    backend.close()


def test_store_of_an_unknown_version_is_refused(backend):
    backend.record(make_rec())
    newer = bytearray(sf.format_value(sf.FormatRecord(chunk_bytes=CB, uuid=UUID)))
    newer[4:6] = (3).to_bytes(2, "little")
    _poke(backend, UUID, None, sf.FORMAT_KEY, bytes(newer))
    backend = LmdbBackend(backend.state_dir)
    restored = backend.restore()
    _assert_moved_aside(backend.state_dir, UUID, restored, "version 3")
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
        probe = LmdbBackend(state)
        name = names[round_ % len(names)]
        values = probe.contents(UUID)[name]
        key = rnd.choice(sorted(values))
        value = bytearray(values[key])
        value[rnd.randrange(len(value))] ^= 1 << rnd.randrange(8)  # bitmap bytes or checksum
        probe.close()
        _poke(probe, UUID, name, key, bytes(value))
        restored = LmdbBackend(state).restore()
        assert "fails its checksum" in restored.damaged[UUID], (name, key)
        assert not restored.instances and UUID not in restored.retained


def test_unknown_version_found_outside_restore_is_a_backend_error(backend):
    backend.record(make_rec())
    newer = bytearray(sf.format_value(sf.FormatRecord(chunk_bytes=CB, uuid=UUID)))
    newer[4:6] = (7).to_bytes(2, "little")
    _poke(backend, UUID, None, sf.FORMAT_KEY, bytes(newer))
    backend = LmdbBackend(backend.state_dir)
    with pytest.raises(BackendError, match="version 7"):
        backend.commit(Commit(make_rec(), {}, {}))
    backend.close()


def test_an_emptied_data_file_is_damage_once_instances_had_journals(backend):
    backend.record(make_rec())
    backend.record(make_rec(uuid="LVM-never-written"))
    backend.close()
    (backend.env_path(UUID) / "data.mdb").write_bytes(b"")
    other = backend.env_path("LVM-never-written")
    for name in ("data.mdb", *(p.name for p in other.glob("journal.*"))):
        (other / name).unlink()
    (other / "data.mdb").write_bytes(b"")  # a crash before the first commit: nothing was there
    backend = LmdbBackend(backend.state_dir)
    restored = backend.restore()
    _assert_moved_aside(backend.state_dir, UUID, restored, "data.mdb is empty but journal.")
    assert "LVM-never-written" not in restored.damaged
    backend.close()


def test_a_file_that_is_not_lmdb_is_damage(tmp_path):
    path = tmp_path / "s" / ("u." + UUID)
    path.mkdir(parents=True)
    (path / "data.mdb").write_bytes(b"\x55" * 16384)
    backend = LmdbBackend(tmp_path / "s")
    restored = backend.restore()
    assert UUID in restored.damaged
    assert not path.exists()
    backend.close()


# --- modes ------------------------------------------------------------------------------------------


def test_directories_0700_files_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        backend = LmdbBackend(tmp_path / "state")
        rec = make_rec()
        backend.record(rec)
        backend.journal(UUID, 1, [(OP_MARK, 1)])
        env_dir = backend.env_path(UUID)
        assert stat.S_IMODE(env_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
        for name in ("data.mdb", "lock.mdb", sf.journal_file_name(1)):
            assert stat.S_IMODE((env_dir / name).stat().st_mode) == 0o600, name
        backend.close()
    finally:
        os.umask(old)


# --- map growth and faults ----------------------------------------------------------------------------


def test_map_full_grows_the_map_and_retries(tmp_path):
    backend = LmdbBackend(tmp_path / "s", map_size=64 * 1024)
    rec = make_rec(region_count=40 * regionlog.CHUNK_BITS)  # 2 x 160 KiB of bitmaps
    backend.record(rec)
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    assert backend._envs[UUID].env.info()["map_size"] >= 512 * 1024
    backend = reopen(backend)
    (inst,) = backend.restore().instances
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
def test_a_failing_commit_is_a_backend_error_and_changes_nothing(backend, exc, code):
    rec = make_rec()
    backend.record(rec)
    full_commit(backend, rec, pattern(rec, 1), pattern(rec, 2))
    backend.journal(UUID, 1, [(OP_MARK, 1)])
    e = backend._envs[UUID]
    e.env = _FailingEnv(e.env, exc)
    with pytest.raises(BackendError) as info:
        full_commit(backend, rec, pattern(rec, 3), pattern(rec, 4), resized=False)
    assert info.value.errno == code
    e.env.armed = False
    seq = stored_seq(backend, UUID, 1)
    backend.journal(UUID, 1, [(OP_MARK, 2)])
    backend = reopen(backend)
    (inst,) = backend.restore().instances
    assert (inst.clean, inst.sync) == (pattern(rec, 1), pattern(rec, 2))
    assert inst.journal == [(OP_MARK, 1), (OP_MARK, 2)]
    # After a failed commit the sequence is read back from the store, not trusted from memory.
    e = backend._env(UUID, create=False)
    e.env = _FailingEnv(e.env, exc)
    with pytest.raises(BackendError):
        full_commit(backend, rec, pattern(rec, 3), pattern(rec, 4), resized=False)
    e.env.armed = False
    full_commit(backend, rec, pattern(rec, 5), pattern(rec, 6), resized=False)
    backend.after_commit(UUID, 1)
    assert stored_seq(backend, UUID, 1) == seq + 1
    header = sf.JournalHeader.decode(journal_path(backend, UUID, 1).read_bytes())
    assert header.commit_seq == seq + 1
    backend = reopen(backend)
    (inst,) = backend.restore().instances
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
        from ulog_disk import store_format as sf
        from ulog_disk.backends.base import BackendError, Commit, InstanceRecord
        from ulog_disk.backends.lmdb_store import LmdbBackend
        from ulog_disk.regionlog import CHUNK_BITS, CHUNK_BYTES

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
        (inst,) = backend.restore().instances
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
    backend = LmdbBackend(tmp_path / "s")
    rec = make_rec(region_count=5 * 8192 + 3)
    backend.record(rec)
    clean, sync = pattern(rec, 1), pattern(rec, 2)
    backend.commit(Commit(rec, sf.split_chunks(clean, rec.region_count, 1024),
                          sf.split_chunks(sync, rec.region_count, 1024), resized=True))
    backend.drop(UUID, 9, StoredState(uuid=UUID, generation=1, region_count=rec.region_count, clean=sync,
                                      sync=clean, source_luid=9))
    backend.close()
    monkeypatch.undo()
    backend = LmdbBackend(tmp_path / "s")
    restored = backend.restore()
    (inst,) = restored.instances
    assert (inst.clean, inst.sync) == (clean, sync)
    assert (restored.retained[UUID].clean, restored.retained[UUID].sync) == (sync, clean)
    contents = backend.contents(UUID)
    assert sf.read_format_value(contents[b""][sf.FORMAT_KEY]).chunk_bytes == CB
    count = regionlog.chunk_count(rec.region_count)
    assert chunk_keys(backend, UUID, b"clean.0000000000000001") == list(range(count))
    backend.close()


def test_a_layout_1_store_is_migrated_to_layout_2_in_one_transaction(backend):
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
    backend = LmdbBackend(backend.state_dir)
    restored = backend.restore()
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
    backend.close()


# --- threads ----------------------------------------------------------------------------------------------


def test_uuids_commit_in_parallel_threads(backend):
    errors = []

    def worker(n: int) -> None:
        uuid = f"LVM-thread{n}"
        try:
            rec = make_rec(uuid=uuid, region_count=2 * regionlog.CHUNK_BITS)
            backend.record(rec)
            for i in range(10):
                backend.journal(uuid, 1, [(OP_MARK, i)])
                full_commit(backend, rec, pattern(rec, n * 100 + i), pattern(rec, i), resized=i == 0)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    backend = reopen(backend)
    restored = backend.restore()
    assert len(restored.instances) == 6
    for inst in restored.instances:
        n = int(inst.record.uuid.removeprefix("LVM-thread"))
        assert inst.clean == pattern(inst.record, n * 100 + 9) and inst.journal == []
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
    backend.restore()
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
