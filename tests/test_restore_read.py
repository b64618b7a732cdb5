"""The restore reads a store through a read-only open when the read-write open would do nothing
to it (``LmdbBackend._read_current``), and through the read-write open otherwise: either way it
finds the same thing, and a store that needs work (modes, a missing lock file, damage) gets it
as before."""

from __future__ import annotations

import os
import shutil

import lmdb
import pytest
from test_handover import UUID, live_instance_with_traffic, start, stop

from ulog_disk.storage import lmdb_env
from ulog_disk.storage import store_format as sf
from ulog_disk.storage.lmdb_store import LmdbBackend

OTHER = "LVM-other0123456789"
THIRD = "LVM-third0123456789"


@pytest.fixture
def rw_opens(monkeypatch) -> list[str]:
    """The uuids the backend opened read-write, in order."""
    opened: list[str] = []
    real = lmdb_env.open_env

    def counting(uuid, *args, **kw):
        opened.append(uuid)
        return real(uuid, *args, **kw)

    monkeypatch.setattr(lmdb_env, "open_env", counting)
    return opened


def some_state(state_dir) -> None:
    """Three uuids: a live instance whose marks are in the journal only, one whose marks a FLUSH
    carried, and a retained state (the DTR of a uuid's last resumed instance keeps it)."""
    engine, k = start(state_dir)
    live_instance_with_traffic(k, 1)
    k.ctr(None, 5, uuid=OTHER)
    k.resume(5, uuid=OTHER)
    k.mark([3, 40000], 5, uuid=OTHER)
    k.flush(luid=5, uuid=OTHER)
    k.ctr(None, 6, uuid=THIRD)
    k.resume(6, uuid=THIRD)
    k.suspend(6, uuid=THIRD)
    k.dtr(6, uuid=THIRD)
    stop(engine)


def restored(state_dir, boot: str = "b1", read_only: bool = True):
    backend = LmdbBackend(state_dir)
    if not read_only:
        backend._read_current = lambda _uuid, _path: None  # type: ignore[method-assign]
    try:
        return backend.restore(boot)
    finally:
        backend.close()


@pytest.mark.parametrize("boot", ["b1", "b2"])
def test_the_read_only_restore_finds_what_the_read_write_one_finds(tmp_path, rw_opens, boot):
    """Same boot (replayed live instances) and a later boot (earlier boot's instances written
    back at restore: those writes open their stores read-write afterwards)."""
    some_state(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    rw_opens.clear()
    fast = restored(tmp_path / "a", boot)
    read_only_opens = list(rw_opens)
    slow = restored(tmp_path / "b", boot, read_only=False)
    assert fast == slow
    assert {s.record.uuid for s in fast.instances} == {UUID, OTHER} and set(fast.retained) == {THIRD}
    assert read_only_opens == ([] if boot == "b1" else [UUID, OTHER])  # only the write-backs
    assert restored(tmp_path / "a", boot) == restored(tmp_path / "b", boot)  # and again


def test_a_store_whose_modes_are_not_exact_is_opened_read_write_and_repaired(tmp_path, rw_opens):
    some_state(tmp_path)
    data = LmdbBackend(tmp_path).env_path(UUID) / "data.mdb"
    os.chmod(data, 0o644)
    rw_opens.clear()
    restored(tmp_path)
    assert rw_opens == [UUID] and data.stat().st_mode & 0o777 == 0o600


def test_a_store_without_its_lock_file_is_opened_read_write(tmp_path, rw_opens):
    """LMDB would size a new lock file through its map (a SIGBUS on a full disk): the read-write
    open writes it first."""
    some_state(tmp_path)
    lock = LmdbBackend(tmp_path).env_path(OTHER) / "lock.mdb"
    lock.unlink()
    rw_opens.clear()
    restored(tmp_path)
    assert rw_opens == [OTHER] and lock.stat().st_size == lmdb_env.LOCK_FILE_BYTES


def test_a_damaged_store_is_judged_by_the_read_write_open_as_before(tmp_path, rw_opens):
    some_state(tmp_path / "a")
    path = LmdbBackend(tmp_path / "a").env_path(OTHER)
    env = lmdb.open(str(path), max_dbs=lmdb_env.MAX_DBS)
    with env.begin(write=True) as txn:
        db = env.open_db(sf.instance_db_name("clean", 5), txn=txn, create=False)
        key = sf.encode_chunk_key(0)
        value = txn.get(key, db=db)
        txn.put(key, bytes([value[0] ^ 1]) + value[1:], db=db)  # fails its checksum
    env.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    rw_opens.clear()
    fast = restored(tmp_path / "a")
    assert rw_opens == [OTHER]
    slow = restored(tmp_path / "b", read_only=False)
    assert set(fast.damaged) == {OTHER}
    assert fast.damaged[OTHER].split(" (moved to")[0] == slow.damaged[OTHER].split(" (moved to")[0]
    assert fast.instances == slow.instances
