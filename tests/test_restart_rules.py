"""After a daemon restart: which restored instance's state a new luid may take.

A LIVE instance restored from the store is normally left alone (its kernel side may be live and
simply idle). If the kernel resumes another luid of the uuid with a real RESUME while that restored
instance has stayed silent, its kernel side is gone: a table swap would have suspended it first,
through this daemon. That is the ``dmsetup remove`` whose DTR was lost while the daemon was down.
"""

from __future__ import annotations

from test_handover import REGIONS, ctr_text, dirty, live_instance_with_traffic, start, stop, unsynced

from ulog_disk.protocol.wire import RequestType


def restarted_with_live_a(tmp_path):
    engine, k = start(tmp_path)
    live_instance_with_traffic(k, 1)  # 40000, 60000 flushed dirty; 50000 marked (journal)
    stop(engine)  # kill -9: A stays LIVE in the store, its DTR never arrives
    return start(tmp_path)


def test_silent_restored_live_instance_is_adopted_by_a_real_resume(tmp_path):
    engine, k = restarted_with_live_a(tmp_path)
    k.ctr(ctr_text(mode="nosync"), 2)
    k.resume(2)
    # The kernel-gone path: what A had marked is out of sync, nothing else; no full resync.
    assert unsynced(engine, 2) == [40000, 50000, 60000]
    assert k.sync_count(2) == REGIONS - 3
    stop(engine)


def test_restored_live_instance_that_speaks_is_not_taken_over(tmp_path):
    engine, k = restarted_with_live_a(tmp_path)
    assert k.in_sync(5, 1)  # the kernel still drives A
    k.ctr(ctr_text(), 2)
    k.resume(2)
    assert k.sync_count(2) == 0  # nothing adopted from a live instance
    assert dirty(engine, 1) == [40000, 50000, 60000]
    stop(engine)


def test_reconnect_resume_never_takes_a_silent_live_instance(tmp_path):
    engine, k = restarted_with_live_a(tmp_path)
    k.ctr(ctr_text(), 2, reconnect=True)  # the kernel's -ESRCH loop for an inactive table
    k.resume(2)
    assert k.sync_count(2) == 0
    # Later, the real swap: A is suspended through the daemon, then B really resumes.
    k.ok(RequestType.PRESUSPEND, luid=1)
    k.ok(RequestType.POSTSUSPEND, luid=1)
    k.resume(2)
    assert unsynced(engine, 2) == [40000, 50000, 60000]
    stop(engine)
