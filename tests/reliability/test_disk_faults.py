"""Disk faults under the LMDB store.

* **Full filesystem**: the state directory on a 24 MiB tmpfs the test mounts (room for the
  journal's 4 MiB segments), then filled with a filler file. One tmpfs holds every uuid's store
  and the journal, so "keeps serving other uuids" means: their requests that need no new disk
  space (IS_CLEAN, IN_SYNC, MARK/CLEAR, resync work, status) keep being answered, and a commit
  that LMDB can fit into pages it already owns still commits. A FLUSH is answered from the
  journal's preallocated segment while it has room; once the journal cannot grow, the log whose
  commit needs space gets -EIO for FLUSH and shows ``F``; when the filler is deleted the
  next FLUSH succeeds and health is ``A`` again; no region marked under an acknowledged FLUSH, or
  marked while the disk was full, is ever reported clean, before or after a restart.
* **Read-only filesystem**: ``mount -o remount,ro`` is refused while the daemon holds its store
  open for writing (checked). What does happen in production is the kernel turning a filesystem
  read-only on an I/O error: the state directory on an ext4 image (loop device, ``errors=
  remount-ro``), made read-only under the running daemon with ext4's ``trigger_fs_error``. FLUSH
  answers -EIO, ``F``, other logs' requests are answered, dirty regions stay dirty; after fsck and
  a remount the restarted daemon has every acknowledged commit. A daemon started on a read-only
  state directory refuses to start with a message saying so.
* **Damaged files between runs**: the daemon killed, one uuid's files damaged, the daemon started
  again with the same boot id (the kernel lives on): it starts; the damaged uuid either starts from
  a full resync (logged) or, for damage it can read around, reports no region clean or in sync
  that was dirty or out of sync; the other uuids are exactly as they were.

Needs root (mount, losetup); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import pytest
from rel_lib import figures, launch, scale

from ulog_disk.log.regionlog import CHUNK_BITS
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import RequestType as T
from ulog_disk.storage import journal as jn
from ulog_disk.storage.store_format import (
    CHECKPOINT_KEY,
    encode_chunk_key,
    encode_dir_name,
    instance_db_name,
    read_checkpoint_value,
)
from ulog_disk.testing.client import Client, DaemonGone, ctr_text

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, losetup)")

PAGE = 4096


# --- filesystems made by the test ------------------------------------------------------------------


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str = "24m") -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    p = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mountpoint))
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs: {p.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        _run("umount", "-l", str(mountpoint))


@contextlib.contextmanager
def ext4_image(tmp: Path, mountpoint: Path, mib: int = 32) -> Iterator[tuple[Path, str]]:
    """An ext4 filesystem on a loop device, mounted with errors=remount-ro: (mountpoint, loopdev)."""
    for tool in ("mkfs.ext4", "losetup", "e2fsck"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    image = tmp / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(mib << 20)
    p = _run("mkfs.ext4", "-q", "-F", str(image))
    assert p.returncode == 0, p.stderr
    p = _run("losetup", "-f", "--show", str(image))
    if p.returncode:
        pytest.skip(f"no loop device: {p.stderr.strip()}")
    loop = p.stdout.strip()
    mountpoint.mkdir(parents=True, exist_ok=True)
    try:
        p = _run("mount", "-o", "errors=remount-ro", loop, str(mountpoint))
        assert p.returncode == 0, p.stderr
        yield mountpoint, loop
    finally:
        _run("umount", "-l", str(mountpoint))
        _run("losetup", "-d", loop)


def fill(path: Path) -> int:
    """Write a filler file until the filesystem is full; its size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    written = 0
    try:
        while True:
            written += os.write(fd, b"\xa5" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    try:
        while True:  # the last blocks, in small writes
            written += os.write(fd, b"\xa5" * 512)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return written


# --- what a log reports ------------------------------------------------------------------------------


@dataclass
class Mirror:
    uuid: str
    luid: int
    regions: int
    log_type: str = "clustered-core"

    @property
    def ctr(self) -> str:
        return ctr_text(self.regions, log_type=self.log_type)

    def probe(self) -> list[int]:
        """The regions worth asking about: the first 128 and the first 64 of the second chunk."""
        out = list(range(min(128, self.regions)))
        if self.regions > CHUNK_BITS:
            out += list(range(CHUNK_BITS, min(self.regions, CHUNK_BITS + 64)))
        return out


@dataclass
class Snapshot:
    clean: dict[int, int]
    sync: dict[int, int]
    sync_count: int


def snapshot(client: Client, m: Mirror) -> Snapshot:
    clean, sync = {}, {}
    for r in m.probe():
        clean[r] = wire.parse_s64(client.ok(m.uuid, m.luid, T.IS_CLEAN, wire.build_u64(r)))
        sync[r] = wire.parse_s64(client.ok(m.uuid, m.luid, T.IN_SYNC, wire.build_u64(r)))
    return Snapshot(clean, sync, client.sync_count(m.uuid, m.luid))


def false_clean(before: Snapshot, after: Snapshot) -> list[str]:
    """Regions reported clean / in sync now that were dirty / out of sync before."""
    bad = [f"region {r} clean, was dirty" for r, v in before.clean.items() if v == 0 and after.clean[r] == 1]
    bad += [f"region {r} in sync, was not" for r, v in before.sync.items() if v == 0 and after.sync[r] == 1]
    if after.sync_count > before.sync_count:
        bad.append(f"sync count {after.sync_count} > {before.sync_count}")
    return bad


def setup_mirror(client: Client, m: Mirror, in_sync: list[int], marked: list[int]) -> None:
    client.ok(m.uuid, m.luid, T.CTR, m.ctr.encode())
    client.ok(m.uuid, m.luid, T.RESUME)
    for r in in_sync:
        client.ok(m.uuid, m.luid, T.SET_REGION_SYNC, wire.build_set_region_sync(r, 1))
    client.ok(m.uuid, m.luid, T.MARK_REGION, wire.build_regions(marked))
    client.ok(m.uuid, m.luid, T.FLUSH)


def reconnect(client: Client, m: Mirror) -> None:
    """What the kernel does after -ESRCH: CTR with the constructor + NUL, then RESUME."""
    client.ok(m.uuid, m.luid, T.CTR, m.ctr.encode() + b"\0")
    client.ok(m.uuid, m.luid, T.RESUME)


# --- full filesystem ---------------------------------------------------------------------------------


def spread(m: Mirror, n: int, offset: int = 0) -> list[int]:
    """n regions spread over every chunk of m (each touches its own bitmap page)."""
    step = max(1, m.regions // n)
    return sorted({(offset + i * step) % m.regions for i in range(n)})


def exhaust_journal(c: Client, m: Mirror, regions: list[int], limit: int = 60000) -> int:
    """MARK and CLEAR ``regions`` (at most 32 a request) until the log's health leaves A: the
    journal's preallocated segments are used up and the next one cannot be made on the full
    disk. Returns the requests it took."""
    payload = wire.build_regions(regions[:32])
    for n in range(limit):
        c.ok(m.uuid, m.luid, T.MARK_REGION if n % 2 == 0 else T.CLEAR_REGION, payload)
        if n % 64 == 63 and not c.status_info(m.uuid, m.luid).endswith(" A"):
            return n + 1
    raise AssertionError(f"{limit} journal records and the journal never filled")


def test_full_filesystem(tmp_path: Path) -> None:
    big = Mirror("LVM-big", 0x10, 24 * CHUNK_BITS, "clustered-disk")   # 24 chunks per bitmap
    warm = Mirror("LVM-warm", 0x20, 256, "clustered-core")
    idle = Mirror("LVM-idle", 0x30, 256, "clustered-disk")
    with tmpfs(tmp_path / "fs") as fs:
        d = launch(tmp_path, state_dir=fs / "state", boot_id="boot-1")
        try:
            c = Client(d.socket_path, timeout=20)  # type: ignore[arg-type]
            setup_mirror(c, big, in_sync=list(range(0, 64)), marked=[1, 2, 3])
            setup_mirror(c, warm, in_sync=list(range(0, 256, 2)), marked=[4, 6])
            setup_mirror(c, idle, in_sync=list(range(0, 256)), marked=[8])
            # warm up LMDB's free list of LVM-warm: its next commits can reuse pages it owns
            for i in range(40):
                c.ok(warm.uuid, warm.luid, T.MARK_REGION, wire.build_regions([10 + i % 5]))
                c.ok(warm.uuid, warm.luid, T.FLUSH)
                c.ok(warm.uuid, warm.luid, T.CLEAR_REGION, wire.build_regions([10 + i % 5]))
            acked_dirty = {big.uuid: {1, 2, 3}, warm.uuid: {4, 6}, idle.uuid: {8}}

            filler = fs / "filler"
            filled = fill(filler)
            # A FLUSH needs no new space while the journal's preallocated segment has room: it
            # is answered (its checkpoint into the store fails in the background, retried).
            marks = spread(big, 24, offset=5)
            c.ok(big.uuid, big.luid, T.MARK_REGION, wire.build_regions(marks))
            c.ok(big.uuid, big.luid, T.FLUSH)
            assert c.status_info(big.uuid, big.luid) == "3 clustered-disk 7:3 A"
            # Once the journal cannot grow, the big log's FLUSH must go to its store, which needs
            # new pages: -EIO, health F, as many times as asked. (A store write that finds room
            # in pages LMDB freed earlier, e.g. by a background checkpoint before the disk
            # filled, succeeds: then it is durable, which the crash checks below verify.)
            records = exhaust_journal(c, big, list(range(200, 232)))
            failures = 0
            for _ in range(3):
                err, _ = c.request(big.uuid, big.luid, T.FLUSH)
                assert err in (0, -errno.EIO), err
                if err:
                    failures += 1
                    assert c.status_info(big.uuid, big.luid) == "3 clustered-disk 7:3 F"
            # The other logs keep being answered: every request that needs no new disk space.
            answered = 0
            for m in (warm, idle):
                snap = snapshot(c, m)
                answered += 2 * len(snap.clean) + 1
                assert all(snap.clean[r] == 0 for r in acked_dirty[m.uuid])
                c.ok(m.uuid, m.luid, T.GET_REGION_SIZE)
                c.ok(m.uuid, m.luid, T.STATUS_TABLE)
                c.ok(m.uuid, m.luid, T.GET_RESYNC_WORK)
                c.ok(m.uuid, m.luid, T.IS_REMOTE_RECOVERING, wire.build_u64(0))
                answered += 4
            assert c.status_info(idle.uuid, idle.luid) == "3 clustered-disk 7:3 A"
            # A commit that fits into the pages LVM-warm already owns still commits.
            c.ok(warm.uuid, warm.luid, T.MARK_REGION, wire.build_regions([20]))
            warm_flush, _ = c.request(warm.uuid, warm.luid, T.FLUSH)
            assert warm_flush in (0, -errno.EIO)
            if warm_flush == 0:
                acked_dirty[warm.uuid].add(20)
            # While full, the marked regions of the big log are dirty (memory) - never clean.
            for r in {1, 2, 3, *marks}:
                assert wire.parse_s64(c.ok(big.uuid, big.luid, T.IS_CLEAN, wire.build_u64(r))) == 0

            # Space returns: the next FLUSH succeeds, health is A again.
            filler.unlink()
            c.ok(big.uuid, big.luid, T.FLUSH)
            assert c.status_info(big.uuid, big.luid) == "3 clustered-disk 7:3 A"
            acked_dirty[big.uuid].update(marks)
            for m in (big, warm, idle):
                for r in acked_dirty[m.uuid]:
                    assert wire.parse_s64(c.ok(m.uuid, m.luid, T.IS_CLEAN, wire.build_u64(r))) == 0, (m, r)
            before = {m.uuid: snapshot(c, m) for m in (big, warm, idle)}
            c.close()
            # A daemon crash now (same boot): every log exactly as before.
            d.kill9()
            d = launch(tmp_path, state_dir=fs / "state", boot_id="boot-1", name="d2")
            c = Client(d.socket_path)  # type: ignore[arg-type]
            for m in (big, warm, idle):
                assert snapshot(c, m) == before[m.uuid], m.uuid
            c.close()
            # A host crash (new boot, new luids): every acknowledged dirty region is resynced.
            d.kill9()
            d = launch(tmp_path, state_dir=fs / "state", boot_id="boot-2", name="d3")
            c = Client(d.socket_path)  # type: ignore[arg-type]
            for m in (big, warm, idle):
                new = Mirror(m.uuid, m.luid + 1, m.regions, m.log_type)
                c.ok(new.uuid, new.luid, T.CTR, new.ctr.encode())
                c.ok(new.uuid, new.luid, T.RESUME)
                for r in acked_dirty[m.uuid]:
                    assert wire.parse_s64(c.ok(new.uuid, new.luid, T.IN_SYNC, wire.build_u64(r))) == 0, (m, r)
            c.close()
            assert d.stop() == 0
            figures("disk.full_filesystem", filler_bytes=filled, journal_records_to_full=records,
                    flush_eio=failures,
                    other_requests_answered=answered,
                    warm_commit_while_full="ok" if warm_flush == 0 else "EIO", recovered=True,
                    dirty_reported_clean=0, violations=0)
        finally:
            if d.alive():
                d.kill9()


def test_health_returns_to_a_after_journal_failures(tmp_path: Path) -> None:
    """Journal appends fail while the disk is full (D); once space returns the next commit brings
    the log back to A. (Found by this test: only F was reset; fixed in 94e3b18.)"""
    m = Mirror("LVM-journal", 0x40, 64 * 1024, "clustered-disk")
    with tmpfs(tmp_path / "fs") as fs:
        d = launch(tmp_path, state_dir=fs / "state")
        try:
            c = Client(d.socket_path)  # type: ignore[arg-type]
            setup_mirror(c, m, in_sync=[], marked=[0])
            filler = fs / "filler"
            fill(filler)
            # More journal records than the journal's preallocated segments hold: the next
            # segment cannot be made, appends fail (D).
            exhaust_journal(c, m, list(range(1000, 1032)))
            for i in range(600):
                c.ok(m.uuid, m.luid, T.MARK_REGION, wire.build_regions([1 + i]))
            assert c.status_info(m.uuid, m.luid).endswith((" D", " F"))
            filler.unlink()
            c.ok(m.uuid, m.luid, T.FLUSH)
            for r in (0, 1, 300, 600):
                assert wire.parse_s64(c.ok(m.uuid, m.luid, T.IS_CLEAN, wire.build_u64(r))) == 0
            assert c.status_info(m.uuid, m.luid) == "3 clustered-disk 7:3 A"
        finally:
            d.kill9()


def test_new_log_on_a_full_filesystem_does_not_kill_the_daemon(tmp_path: Path) -> None:
    """A new uuid's store cannot be created on a full disk: the daemon serves the log from memory
    and lives on, and restarts on the still full disk. (Found by this test: LMDB's sparse lock
    file, written through a mapping, killed the daemon with SIGBUS at every start; fixed in
    459ffb1.)"""
    old = Mirror("LVM-old", 0x50, 256)
    new = Mirror("LVM-new", 0x51, 256)
    with tmpfs(tmp_path / "fs") as fs:
        d = launch(tmp_path, state_dir=fs / "state")
        try:
            c = Client(d.socket_path)  # type: ignore[arg-type]
            setup_mirror(c, old, in_sync=[0], marked=[1])
            filler = fs / "filler"
            fill(filler)
            try:
                err, _ = c.request(new.uuid, new.luid, T.CTR, new.ctr.encode())
                assert err == 0  # served from memory, health D
                err, _ = c.request(new.uuid, new.luid, T.RESUME)
                assert err in (0, -errno.EIO)
                assert wire.parse_s64(c.ok(old.uuid, old.luid, T.IS_CLEAN, wire.build_u64(1))) == 0
            except DaemonGone:
                pytest.fail(f"the daemon died: exit status {d.proc.wait(10)} (-7 is SIGBUS)")
            c.close()
            d.kill9()
            # and it restarts on the still full filesystem
            d = launch(tmp_path, state_dir=fs / "state", name="d2")
        finally:
            if d.alive():
                d.kill9()


# --- read-only filesystem ----------------------------------------------------------------------------


def test_filesystem_turned_read_only_under_the_daemon(tmp_path: Path) -> None:
    a = Mirror("LVM-ro-disk", 0x60, 4096, "clustered-disk")
    b = Mirror("LVM-ro-core", 0x61, 256)
    with ext4_image(tmp_path, tmp_path / "fs") as (fs, loop):
        d = launch(tmp_path, state_dir=fs / "state", boot_id="boot-1")
        try:
            c = Client(d.socket_path, timeout=20)  # type: ignore[arg-type]
            setup_mirror(c, a, in_sync=list(range(64)), marked=[1, 2])
            setup_mirror(c, b, in_sync=list(range(0, 256, 3)), marked=[3])
            before_b = snapshot(c, b)
            # An administrator's remount is refused while the daemon holds its store open.
            p = _run("mount", "-o", "remount,ro", str(fs))
            assert p.returncode != 0 and "busy" in p.stderr, p
            # The kernel turns the filesystem read-only on an error, under the running daemon.
            sysfs = Path("/sys/fs/ext4") / Path(loop).name / "trigger_fs_error"
            if not sysfs.exists():
                pytest.skip("ext4 has no trigger_fs_error")
            sysfs.write_text("ulog-disk reliability test\n")
            with pytest.raises(OSError) as excinfo:
                (fs / "probe").write_text("x")
            assert excinfo.value.errno == errno.EROFS
            c.ok(a.uuid, a.luid, T.MARK_REGION, wire.build_regions([40, 41]))
            err, _ = c.request(a.uuid, a.luid, T.FLUSH)
            assert err == -errno.EIO
            assert c.status_info(a.uuid, a.luid) == "3 clustered-disk 7:3 F"
            for r in (1, 2, 40, 41):
                assert wire.parse_s64(c.ok(a.uuid, a.luid, T.IS_CLEAN, wire.build_u64(r))) == 0
            # the other log: every request that needs no write is answered as before
            assert snapshot(c, b) == before_b
            c.ok(b.uuid, b.luid, T.GET_RESYNC_WORK)
            err_b, _ = c.request(b.uuid, b.luid, T.FLUSH)
            assert err_b in (0, -errno.EIO)
            c.close()
            stop_rc = d.stop()  # commits at stop fail: exit status 1, never a hang
            assert stop_rc == 1, d.log_text()[-2000:]
        finally:
            if d.alive():
                d.kill9()
        # The administrator repairs the filesystem; the daemon starts again (the kernel lived on).
        p = _run("umount", str(fs))
        assert p.returncode == 0, p.stderr
        p = _run("e2fsck", "-fy", loop)
        assert p.returncode in (0, 1), p.stdout + p.stderr
        p = _run("mount", "-o", "errors=remount-ro", loop, str(fs))
        assert p.returncode == 0, p.stderr
        d = launch(tmp_path, state_dir=fs / "state", boot_id="boot-1", name="d2")
        try:
            c = Client(d.socket_path)  # type: ignore[arg-type]
            assert "is damaged" not in d.log_text()
            for r in (1, 2):  # acknowledged before the fault
                assert wire.parse_s64(c.ok(a.uuid, a.luid, T.IS_CLEAN, wire.build_u64(r))) == 0
            after_b = snapshot(c, b)
            assert not false_clean(before_b, after_b)
            assert after_b.sync_count == before_b.sync_count
            c.close()
            assert d.stop() == 0
        finally:
            if d.alive():
                d.kill9()
    figures("disk.read_only", admin_remount="refused (busy)", flush_eio=1, health="F", stop_exit=stop_rc,
            restart_after_fsck="ok", dirty_reported_clean=0, violations=0)


def test_refuses_to_start_on_a_read_only_state_directory(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs") as fs:
        (fs / "state").mkdir(mode=0o700)
        p = _run("mount", "-o", "remount,ro", str(fs))
        assert p.returncode == 0, p.stderr
        d = launch(tmp_path, state_dir=fs / "state", wait_ready=False)
        rc = d.proc.wait(30)
        text = d.log_text()
        assert rc == 2, text
        assert "cannot start" in text and "Read-only file system" in text, text
        figures("disk.read_only_at_start", exit_code=rc, violations=0)


# --- damaged files between runs ----------------------------------------------------------------------

A = Mirror("LVM-A", 0xA1, CHUNK_BITS + 64)  # two chunks per bitmap
B = Mirror("LVM-B", 0xB1, 512, "clustered-disk")
C = Mirror("LVM-C", 0xC1, 128)
MIRRORS = (A, B, C)


@dataclass
class Golden:
    state: Path
    snaps: dict[str, Snapshot]
    journaled: dict[str, list[int]]


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> Golden:
    """Three logs, each with regions in sync, marks committed, and marks only in the journal
    (acknowledged MARKs after the last FLUSH); then the daemon is killed (-9)."""
    tmp = tmp_path_factory.mktemp("golden")
    d = launch(tmp, state_dir=tmp / "state", boot_id="boot-1")
    journaled = {}
    try:
        c = Client(d.socket_path)  # type: ignore[arg-type]
        for m in MIRRORS:
            in_sync = list(range(0, 100)) + list(range(CHUNK_BITS, CHUNK_BITS + 40))
            setup_mirror(c, m, in_sync=[r for r in in_sync if r < m.regions], marked=[1, 2, 50])
            c.ok(m.uuid, m.luid, T.CLEAR_REGION, wire.build_regions([2]))
            c.ok(m.uuid, m.luid, T.FLUSH)
            journaled[m.uuid] = [5, 6, 70] + ([CHUNK_BITS + 3] if m.regions > CHUNK_BITS else [])
            c.ok(m.uuid, m.luid, T.SET_REGION_SYNC, wire.build_set_region_sync(60, 0))
            c.ok(m.uuid, m.luid, T.MARK_REGION, wire.build_regions(journaled[m.uuid]))
            # a last record that changes nothing (a clear of a clean region): what a torn tail loses
            c.ok(m.uuid, m.luid, T.CLEAR_REGION, wire.build_regions([99]))
        snaps = {m.uuid: snapshot(c, m) for m in MIRRORS}
        c.close()
    finally:
        d.kill9()
    return Golden(tmp / "state", snaps, journaled)


def env_dir(state: Path, m: Mirror) -> Path:
    return state / encode_dir_name(m.uuid)


def with_env(state: Path, m: Mirror, body) -> None:
    env = lmdb.open(str(env_dir(state, m)), max_dbs=64, subdir=True)
    try:
        with env.begin(write=True) as txn:
            body(env, txn)
    finally:
        env.close()


def _truncate(state: Path, size_pages: int | None) -> None:
    data = env_dir(state, A) / "data.mdb"
    os.truncate(data, 0 if size_pages is None else size_pages * PAGE)


def _garbage_meta_pages(state: Path) -> None:
    data = env_dir(state, A) / "data.mdb"
    with open(data, "r+b") as f:
        f.write(random.Random(1).randbytes(2 * PAGE))


def _garbage_lock(state: Path) -> None:
    (env_dir(state, A) / "lock.mdb").write_bytes(random.Random(2).randbytes(8192))


def _chunk_wrong_length(state: Path) -> None:
    def body(env, txn):
        db = env.open_db(instance_db_name("clean", A.luid), txn=txn)
        txn.put(encode_chunk_key(1), b"\xff" * 7, db=db)
    with_env(state, A, body)


def _chunk_deleted(state: Path) -> None:
    def body(env, txn):
        for kind in ("clean", "sync"):
            db = env.open_db(instance_db_name(kind, A.luid), txn=txn)
            assert txn.delete(encode_chunk_key(0), db=db)
    with_env(state, A, body)


def _chunk_bitflip(state: Path) -> None:
    """Region 1's bit flips in the stored bitmap (XOR: whatever the stored state, the value
    changes; with the journal the stored bit may already read clean, its MARK being replayed)."""
    def body(env, txn):
        db = env.open_db(instance_db_name("clean", A.luid), txn=txn)
        value = bytearray(txn.get(encode_chunk_key(0), db=db))
        value[0] ^= 0b10
        txn.put(encode_chunk_key(0), bytes(value), db=db)
    with_env(state, A, body)


def _meta_garbage(state: Path) -> None:
    def body(env, txn):
        db = env.open_db(instance_db_name("meta", A.luid), txn=txn)
        txn.put(b"record", b"ULGM\x01\x00" + random.Random(3).randbytes(60), db=db)
    with_env(state, A, body)


def _foreign_env(state: Path) -> None:
    shutil.rmtree(env_dir(state, A))
    shutil.copytree(env_dir(state, C), env_dir(state, A))


def checkpoints(state: Path) -> dict[str, int]:
    """Each mirror's checkpoint position (read-only)."""
    out = {}
    for m in MIRRORS:
        env = lmdb.open(str(env_dir(state, m)), max_dbs=64, subdir=True, readonly=True, lock=False)
        try:
            name = instance_db_name("meta", m.luid)
            with env.begin() as txn:
                raw = txn.get(CHECKPOINT_KEY, db=env.open_db(name, txn=txn, create=False))
            out[m.uuid] = read_checkpoint_value(name, raw).position
        finally:
            env.close()
    return out


def journal_place(state: Path, position: int) -> tuple[Path, int]:
    """The segment file and offset of journal position ``position``."""
    found = jn.scan(state)
    for start, header in found.segments.items():
        if start <= position < start + header.capacity:
            return state / jn.segment_name(start), jn.HEADER_BYTES + position - start
    raise AssertionError(f"no segment holds position {position}")


def damaged_record(state: Path) -> jn.Record:
    """The last record of A that the journal's durable claims say was synced: damage there is
    damage (not a torn tail)."""
    found = jn.scan(state)
    assert found.damage == [] and found.journal_id is not None
    return [r for r in found.records if r.uuid == A.uuid and r.end <= found.durable][-1]


def _journal_record_garbage(state: Path) -> None:
    rec = damaged_record(state)
    path, offset = journal_place(state, rec.lsn)
    with open(path, "r+b") as f:
        f.seek(offset + jn.RECORD_HEADER_SIZE)
        f.write(random.Random(4).randbytes(rec.length - jn.RECORD_HEADER_SIZE))


def _journal_torn_tail(state: Path) -> None:
    """The last record (a CLEAR of a clean region, never synced) half written."""
    found = jn.scan(state)
    last = found.records[-1]
    assert last.end > found.durable, "the last record must be past the durable point"
    path, offset = journal_place(state, last.lsn)
    with open(path, "r+b") as f:
        f.seek(offset + last.length // 2)
        f.write(bytes(jn._padded(last.length) - last.length // 2))


def _journal_segment_header_garbage(state: Path) -> None:
    path = sorted(state.glob("journal.*"))[-1]
    with open(path, "r+b") as f:
        f.write(random.Random(5).randbytes(jn.SEGMENT_HEADER_SIZE))


DAMAGE = {
    # name: (damage, expected outcome for A: "resync" (damaged, full resync) or "safe")
    "data_truncated_to_zero": (lambda s: _truncate(s, None), "resync"),
    "data_truncated_to_3_pages": (lambda s: _truncate(s, 3), "resync"),
    "data_meta_pages_garbage": (_garbage_meta_pages, "resync"),
    "lock_file_garbage": (_garbage_lock, "same"),
    "chunk_wrong_length": (_chunk_wrong_length, "resync"),
    "chunk_deleted": (_chunk_deleted, "safe"),
    "chunk_bit_flipped": (_chunk_bitflip, "resync"),
    "meta_record_garbage": (_meta_garbage, "resync"),
    "environment_of_another_uuid": (_foreign_env, "resync"),
    # The daemon-wide journal: damage to a synced record concerns every instance whose
    # checkpoint is before it ("journal": all dirty and out of sync; the others exactly as they
    # were); a torn tail is the journal's end; a segment header that fails makes the journal
    # unknown: every instance all dirty and out of sync.
    "journal_record_garbage": (_journal_record_garbage, "journal"),
    "journal_torn_tail": (_journal_torn_tail, "same"),
    "journal_segment_header_garbage": (_journal_segment_header_garbage, "journal"),
}
#: Damage the store does not handle yet (strict xfail). "data_truncated_to_3_pages" was one: LMDB read
#: past the end of the file through its map, SIGBUS at every start; fixed in 459ffb1. So was
#: a layout-2 instance journal's garbage header: its ops were dropped as "no ops"; now every region is
#: distrusted (the daemon-wide journal's damage cases above replaced those files). So was
#: "chunk_bit_flipped": a flipped bit in a stored bitmap read as valid state (a dirty region reported
#: clean); store layout 2 seals every chunk with a CRC-32, and the store is moved aside (full resync).
KNOWN_BUGS: dict[str, str] = {}


def assert_distrusted(now: Snapshot, case: str, m: Mirror) -> None:
    """Every region dirty and out of sync: what a log whose answered requests may be missing
    comes back as (never clean, whatever was lost)."""
    assert set(now.clean.values()) == {0} and set(now.sync.values()) == {0}, f"{case}: {m.uuid}"
    assert now.sync_count == 0, f"{case}: {m.uuid}"


@pytest.mark.parametrize("case", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[name])) if name in KNOWN_BUGS
    else name for name in DAMAGE
])
def test_damaged_files_between_runs(tmp_path: Path, golden: Golden, case: str) -> None:
    state = tmp_path / "state"
    shutil.copytree(golden.state, state)
    damage, expect = DAMAGE[case]
    # Journal damage concerns the instances whose checkpoint is before it (all, when the journal
    # itself is unknown); every other uuid must be exactly as it was.
    concerned: set[str] = set()
    if case == "journal_record_garbage":
        at = damaged_record(state).lsn
        concerned = {uuid for uuid, position in checkpoints(state).items() if position <= at}
        assert A.uuid in concerned
    elif expect == "journal":
        concerned = {m.uuid for m in MIRRORS}
    damage(state)
    d = launch(tmp_path, state_dir=state, boot_id="boot-1", wait_ready=False)
    try:
        ready = tmp_path / "d.ready"
        for _ in range(600):
            if ready.exists() or d.proc.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), (f"the daemon did not start: exit status {d.proc.poll()} "
                                f"({-signal.SIGBUS} is SIGBUS)\n{d.log_text()[-2000:]}")
        text = d.log_text()
        c = Client(d.socket_path)  # type: ignore[arg-type]
        # the other uuids are exactly as they were
        for m in (B, C):
            if m.uuid in concerned:
                assert_distrusted(snapshot(c, m), case, m)
            else:
                assert snapshot(c, m) == golden.snaps[m.uuid], m.uuid
        g = golden.snaps[A.uuid]
        err, _ = c.request(A.uuid, A.luid, T.IS_CLEAN, wire.build_u64(0))
        if expect == "resync":
            assert err == -errno.ESRCH, f"{case}: A is still known ({err}); log:\n{text[-2000:]}"
            assert f"store of uuid='{A.uuid}'" in text and "is damaged" in text, text[-2000:]
            assert "full resync" in text
            reconnect(c, A)
            assert c.sync_count(A.uuid, A.luid) == 0  # every region is resynced
        else:
            assert err == 0, f"{case}: A is not served ({err}); log:\n{text[-2000:]}"
            now = snapshot(c, A)
            bad = false_clean(g, now)
            assert not bad, f"{case}: {bad[:10]}"
            if expect == "same":
                assert now == g
            if expect == "journal":
                assert "answered requests may be missing" in text, text[-2000:]
                assert_distrusted(now, case, A)
            for r in golden.journaled[A.uuid]:
                assert now.clean[r] == 0, f"{case}: acknowledged MARK of region {r} lost"
        c.close()
        assert d.stop() == 0
        figures(f"disk.damaged.{case}", outcome=expect, daemon_started=True, others_unaffected=True,
                violations=0)
    finally:
        if d.alive():
            d.kill9()


def test_random_damage_to_data_mdb(tmp_path: Path, golden: Golden) -> None:
    """Random bytes or pages of data.mdb overwritten: the daemon always starts, the other uuids
    are unaffected, and A is damaged (full resync), intact, or changed only in the safe direction:
    every value is sealed (store layout 2), so no damage brings a dirty region back clean."""
    trials = int(scale("ULOG_REL_DAMAGE_TRIALS", 12, 200))
    rng = random.Random(int(os.environ.get("ULOG_REL_SEED", "7")))
    outcomes: dict[str, int] = {}
    for i in range(trials):
        state = tmp_path / f"s{i}"
        shutil.copytree(golden.state, state)
        data = env_dir(state, A) / "data.mdb"
        raw = bytearray(data.read_bytes())
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 16)):
                raw[rng.randrange(2 * PAGE, len(raw))] = rng.randrange(256)
        else:
            page = rng.randrange(2, len(raw) // PAGE)
            raw[page * PAGE:(page + 1) * PAGE] = rng.randbytes(PAGE)
        data.write_bytes(bytes(raw))
        d = launch(tmp_path, state_dir=state, boot_id="boot-1", name=f"r{i}")
        try:
            c = Client(d.socket_path)  # type: ignore[arg-type]
            for m in (B, C):
                assert snapshot(c, m) == golden.snaps[m.uuid], (i, m.uuid)
            err, _ = c.request(A.uuid, A.luid, T.IS_CLEAN, wire.build_u64(0))
            if err == -errno.ESRCH:
                outcome = "damaged, full resync"
            else:
                try:
                    now = snapshot(c, A)
                except AssertionError:
                    now = None
                if now is None:
                    outcome = "requests fail"
                elif now == golden.snaps[A.uuid]:
                    outcome = "intact"
                elif false_clean(golden.snaps[A.uuid], now):
                    outcome = "changed, unsafe (undetected)"
                else:
                    outcome = "changed, safe"
            c.close()
            d.stop()
        finally:
            if d.alive():
                d.kill9()
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(state, ignore_errors=True)
    figures("disk.random_damage", trials=trials, outcomes=outcomes, daemon_crashes=0,
            other_uuids_changed=0, violations=0)
    # Layout 1 (no checksums) let 28 of 200 through with a dirty region reading clean.
    unsafe = outcomes.get("changed, unsafe (undetected)", 0)
    figures("disk.random_damage.undetected", trials=trials, violations=unsafe)
    assert unsafe == 0, outcomes


def test_random_damage_to_journal_segments(tmp_path: Path, golden: Golden) -> None:
    """Random bytes or blocks of the journal's synced part (or its segment header) overwritten:
    the daemon always starts, and every log is intact or changed only in the safe direction
    (all dirty and out of sync when its records may be missing): every record is self-checking
    and a later record's durable claim tells damage from a torn tail, so no damage brings a
    region that must be dirty back clean. The unsynced tail is left alone: losing it is what a
    host crash may do (no FLUSH was answered for it)."""
    trials = int(scale("ULOG_REL_DAMAGE_TRIALS", 12, 200))
    rng = random.Random(int(os.environ.get("ULOG_REL_SEED", "7")) + 1)
    found = jn.scan(golden.state)
    assert found.damage == [] and len(found.segments) == 1
    (start,) = found.segments
    synced_bytes = found.durable - start
    assert synced_bytes > 0
    outcomes: dict[str, int] = {}
    unsafe = 0
    for i in range(trials):
        state = tmp_path / f"j{i}"
        shutil.copytree(golden.state, state)
        path = state / jn.segment_name(start)
        raw = bytearray(path.read_bytes())
        what = rng.random()
        if what < 0.1:
            raw[rng.randrange(jn.SEGMENT_HEADER_SIZE)] ^= 1 << rng.randrange(8)
        elif what < 0.55:
            for _ in range(rng.randint(1, 16)):
                raw[jn.HEADER_BYTES + rng.randrange(synced_bytes)] = rng.randrange(256)
        else:
            n = min(synced_bytes, rng.choice((8, 64, 512)))  # a block of the synced part only
            at = jn.HEADER_BYTES + rng.randrange(synced_bytes - n + 1)
            raw[at:at + n] = rng.randbytes(n)
        path.write_bytes(bytes(raw))
        d = launch(tmp_path, state_dir=state, boot_id="boot-1", name=f"j{i}")
        try:
            c = Client(d.socket_path)  # type: ignore[arg-type]
            for m in MIRRORS:
                err, _ = c.request(m.uuid, m.luid, T.IS_CLEAN, wire.build_u64(0))
                if err == -errno.ESRCH:
                    outcome = "damaged, full resync"
                else:
                    now = snapshot(c, m)
                    if now == golden.snaps[m.uuid]:
                        outcome = "intact"
                    elif false_clean(golden.snaps[m.uuid], now):
                        outcome = "changed, unsafe (undetected)"
                        unsafe += 1
                    else:
                        outcome = "changed, safe"
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
            c.close()
            assert d.stop() == 0
        finally:
            if d.alive():
                d.kill9()
        shutil.rmtree(state, ignore_errors=True)
    figures("disk.random_journal_damage", trials=trials, outcomes=outcomes, daemon_crashes=0,
            violations=unsafe)
    assert unsafe == 0, outcomes
