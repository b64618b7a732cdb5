"""After a daemon restart: which restored instance's state a new luid may take.

A LIVE instance restored from the store is normally left alone (its kernel side may be live and
simply idle). If the kernel resumes another luid of the uuid with a real RESUME while that restored
instance has stayed silent, its kernel side is gone: a table swap would have suspended it first,
through this daemon. That is the ``dmsetup remove`` whose DTR was lost while the daemon was down.
"""

from __future__ import annotations

from test_handover import REGIONS, UUID, ctr_text, dirty, live_instance_with_traffic, start, stop, unsynced

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


def test_a_journaled_reconnect_resume_comes_back_as_its_store_write_would_have(tmp_path):
    """The kernel's reconnect RESUME after a daemon restart is journaled, not written to the store
    (``Engine._reconnect_resume``). Killed before any checkpoint, the daemon comes back with what
    the store write would have left: the same record (the recovery cursor back at 0, the
    generation the RESUME took for the journal's mark) and the same bits. The plain RESUME (no
    reconnect) still writes the store: the two are compared."""
    found = {}
    for reconnect in (True, False):
        state = tmp_path / f"reconnect-{reconnect}"
        engine, k = start(state)
        live_instance_with_traffic(k, 1)  # 50000 marked in the journal only
        assert k.work(1) == (0, 0)  # in sync: the recovery cursor goes to the end
        k.mark([20000], 1)
        k.flush(luid=1)  # ... and a FLUSH record carries it
        stop(engine)
        engine, k = start(state)  # kill -9 and restart, same boot
        assert engine.table[(UUID, 1)].log.cursor == REGIONS
        k.ctr(ctr_text(mode="nosync"), 1, reconnect=reconnect)
        k.resume(1)
        assert ((UUID, 1) in engine.unstored) is reconnect  # journaled, or written to the store
        stop(engine)  # kill -9 again: no checkpoint, no clean stop
        engine, _ = start(state)
        inst = engine.table[(UUID, 1)]
        record = inst.record()
        record.committed_at = 0.0  # the time of each run's RESUME
        found[reconnect] = (record, inst.log.clean.tobytes(), inst.log.sync.tobytes())
        stop(engine)
    assert found[True] == found[False]
    record = found[True][0]
    assert record.cursor == 0 and record.state == "live" and record.resumed
