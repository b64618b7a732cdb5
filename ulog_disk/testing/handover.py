"""Stores made by a real dm-ulogd run, for the tools' tests (ulog-dump, ulog-recover).

:func:`build_store`: a real daemon (LMDB backend, a fixed ``--boot-id``) driven by the kernel
model through a mirror's life and then a hand-over (CTR B while A is live, PRESUSPEND/POSTSUSPEND
A) cut by ``kill -9`` before or after RESUME B, plus a second uuid that was removed (its state
retained).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .kernelmodel import KernelConnection, Mirror, UserspaceLog
from .launcher import Daemon, launch

BOOT1 = "boot-1-aaaaaaaa"
BOOT2 = "boot-2-bbbbbbbb"
UUID_H = "LVM-handover0123"
UUID_GONE = "LVM-removed0456"
LUID_A, LUID_B, LUID_GONE = 0xFFFF888000001000, 0xFFFF888000002000, 0xFFFF888000003000
REGIONS = 64
CTR = f"{REGIONS * 8} clustered-core 8"
#: What the hand-over store holds for A (and B after adopting A): regions 0-39 recovered,
#: 5 and 6 marked and flushed but never cleared.
A_OUT_OF_SYNC = "40-63"
A_DIRTY = "5-6"
B_OUT_OF_SYNC = "5-6,40-63"  # adopted: sync &= clean


def lmdb_daemon(tmp: Path, state: Path, boot: str = BOOT1, name: str = "d") -> Daemon:
    return launch(tmp, capture=True, backend="lmdb", state_dir=state, name=name, boot_id=boot)


def connect(d: Daemon) -> KernelConnection:
    return KernelConnection(str(d.socket_path), timeout=10)


def build_store(tmp: Path, resume_b: bool) -> tuple[Path, Path]:
    """(state dir, capture file) of the hand-over cut by kill -9 (see the module doc)."""
    tmp.mkdir(parents=True, exist_ok=True)
    state = tmp / "state"
    d = lmdb_daemon(tmp, state)
    conn = connect(d)
    # A uuid whose mirror was removed: its state is retained.
    gone = Mirror(UserspaceLog(conn, UUID_GONE, LUID_GONE, "256 clustered-core 8"))
    assert gone.construct() == 0
    gone.resume()
    gone.recover_all(limit=20)
    gone.suspend()
    assert gone.log.dtr() == 0
    # The hand-over.
    a = Mirror(UserspaceLog(conn, UUID_H, LUID_A, CTR))
    assert a.construct() == 0
    a.resume()
    assert a.recover_all(limit=40) == 40
    a.write([1, 2, 3])
    a.update_states()
    a.log.mark_region(5)
    a.log.mark_region(6)
    assert a.log.flush() == 0  # marked under a FLUSH, writes still in flight: dirty
    b = UserspaceLog(conn, UUID_H, LUID_B, CTR)
    assert b.ctr() == 0  # CTR B while A is live
    a.presuspend()
    a.postsuspend()
    if resume_b:
        assert b.resume() == 0
    d.kill9()
    conn.close()
    return state, d.capture_path


Stores = dict[str, tuple[Path, Path]]


def build_stores(base: Path) -> Stores:
    """Both hand-over stores under ``base``: ``"after"`` (killed after RESUME B) and ``"before"``."""
    return {"after": build_store(base / "after", True), "before": build_store(base / "before", False)}


def private_copy(stores: Stores, which: str, tmp_path: Path) -> Path:
    """A copy of one store for a test to read or change."""
    dest = tmp_path / f"state-{which}"
    shutil.copytree(stores[which][0], dest)
    return dest
