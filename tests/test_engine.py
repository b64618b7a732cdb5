"""Engine semantics, one rule per test (protocol ref §1.7, §3, §4, §5).

Every request goes through the wire both ways (encode_request → decode_frame → Applier.handle_now →
encode_reply → decode_reply), so the checks are on what the kernel would read.
"""

from __future__ import annotations

import errno
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ulog_disk.daemon.applier import Applier
from ulog_disk.log.records import OP_MARK
from ulog_disk.protocol import requests, wire
from ulog_disk.protocol.wire import RequestType
from ulog_disk.storage.base import Commit
from ulog_disk.storage.memory import MemoryBackend
from ulog_disk.testing.journaled import RecordingJournal
from ulog_disk.testing.kernel import Kernel

T = RequestType
U = "LVM-enginetest"
A, B, C = 0xFFFF8D8142769400, 0xFFFF8D8142769C00, 0xFFFF8D814276A400
CORE = b"32768 clustered-core 1024"  # 32 regions
DISK = b"32768 clustered-disk 7:3 1024"  # the same, with a health letter in its status


def drive(engine: Applier) -> Kernel:
    """The in-process kernel on this file's log (uuid U, luid A, 32 regions)."""
    return Kernel(engine, uuid=U, luid=A, ctr=CORE)


@pytest.fixture
def backend(tmp_path):
    return RecordingJournal(tmp_path)


@pytest.fixture
def engine(backend):
    return Applier.over(backend, boot_id="x")


@pytest.fixture
def k(engine):
    return drive(engine)


# --- reply sizes --------------------------------------------------------------------------------------

VALUE_SIZES = [
    (T.GET_REGION_SIZE, b"", 8), (T.IS_CLEAN, wire.build_u64(3), 8), (T.IN_SYNC, wire.build_u64(3), 8),
    (T.GET_SYNC_COUNT, b"", 8), (T.GET_RESYNC_WORK, b"", 16),
    (T.IS_REMOTE_RECOVERING, wire.build_u64(3), 16),
]


@pytest.mark.parametrize("type_,data,size", VALUE_SIZES, ids=[t.name for t, _, _ in VALUE_SIZES])
@pytest.mark.parametrize("resumed", [False, True])
def test_value_replies_have_their_exact_size(k, type_, data, size, resumed):
    k.ctr()
    if resumed:
        k.ok(T.RESUME)
    assert len(k.ok(type_, data)) == size


NO_BUFFER = [
    (T.RESUME, b""), (T.PRESUSPEND, b""), (T.POSTSUSPEND, b""), (T.FLUSH, b""),
    (T.FLUSH, wire.build_regions([1, 2, 3])), (T.MARK_REGION, wire.build_regions([4, 5])),
    (T.CLEAR_REGION, wire.build_regions([4, 5])), (T.SET_REGION_SYNC, wire.build_set_region_sync(6, 1)),
    (T.SET_REGION_SYNC, wire.build_set_region_sync(6, 0)), (T.DTR, b""),
    (T.CTR, CORE + b"\0"),
]


@pytest.mark.parametrize("type_,data", NO_BUFFER, ids=[f"{t.name}-{len(d)}" for t, d in NO_BUFFER])
def test_requests_without_reply_buffer_get_data_size_0(k, type_, data):
    k.ctr()
    k.ok(T.RESUME)
    assert k.ok(type_, data) == b""


def test_region_requests_of_32_regions(k):
    k.up()
    group = list(range(31, -1, -1))
    for t in (T.MARK_REGION, T.CLEAR_REGION, T.FLUSH):
        assert k.ok(t, wire.build_regions(group)) == b""


def test_seq_is_echoed_up_to_u32_max(k):
    k.ctr()
    k.seq = 2**32 - 2
    assert k.send(T.GET_REGION_SIZE).seq == 2**32 - 1


# --- CTR -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,regions,region_size", [
    (b"32768 core 1024", 32, 1024),
    (b"32768 clustered-core 1024", 32, 1024),
    (b"1000 core 64", 16, 64),  # ceil(1000 / 64)
    (b"1024 core 1024", 1, 1024),  # region size == length
    (b"3 core 2", 2, 2),
    (b"32768 disk 7:3 1024", 32, 1024),
    (b"32768 clustered-disk 253:2 1024 nosync", 32, 1024),
    (b"32768 clustered-core 1024 sync block_on_error", 32, 1024),
    (b"32768 clustered-core 1024 block_on_error nosync", 32, 1024),
    (b"32768  clustered-core   1024 ", 32, 1024),
])
def test_ctr_accepts(k, text, regions, region_size):
    k.ctr(text)
    assert wire.parse_u64(k.ok(T.GET_REGION_SIZE)) == region_size
    k.ok(T.IN_SYNC, wire.build_u64(regions - 1))
    assert k.err(T.IN_SYNC, wire.build_u64(regions)) == -errno.EINVAL


@pytest.mark.parametrize("text", [
    b"", b" ", b"32768", b"32768 core", b"32768 core 1000", b"32768 core 3", b"32768 core 1",
    b"32768 core 0", b"32768 core -2", b"32768 core 0x400", b"32768 core 1k", b"1024 core 2048",
    b"0 core 2", b"-1 core 2", b"abc core 2", b"32768 mirror 1024", b"32768 Core 1024",
    b"32768 userspace 1024", b"32768 disk 1024", b"32768 disk 7:3", b"32768 clustered-disk 7:3",
    b"32768 core 1024 sync nosync", b"32768 core 1024 nosync nosync", b"32768 core 1024 foo",
    b"32768 core 1024 integrated_flush", b"32768 core\x001024", b"32768 core 1024\0\0",
    b"32768 c\xf6re 1024", b"\xff" * 40, b"32768 disk " + b"d" * 200 + b" 1024",
])
def test_ctr_garbage_is_einval_and_creates_nothing(k, text, caplog):
    with caplog.at_level(logging.ERROR, logger="ulog_disk.engine"):
        assert k.err(T.CTR, text) == -errno.EINVAL
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "CTR" in lines[0], lines  # one clear log line
    assert k.err(T.GET_REGION_SIZE) == -errno.EINVAL
    assert k.err(T.IN_SYNC, wire.build_u64(0)) == -errno.ESRCH


def test_ctr_with_empty_uuid_is_einval(k):
    assert k.err(T.CTR, CORE, uuid="") == -errno.EINVAL


def test_initial_disk_ctr_returns_the_device(k):
    assert k.ctr(b"32768 clustered-disk 7:3 1024") == b"7:3\0"
    assert k.ctr(b"32768 disk 253:12 1024", luid=B) == b"253:12\0"


def test_device_reply_fits_dm_name_len(k):
    dev = b"/dev/" + b"x" * 122  # 127 bytes + NUL = 128
    assert k.ctr(b"32768 disk " + dev + b" 1024") == dev + b"\0"


def test_core_ctr_returns_no_data(k):
    assert k.ctr(b"32768 core 1024") == b""


@pytest.mark.parametrize("text", [b"32768 clustered-disk 7:3 1024", b"32768 clustered-core 1024"])
def test_reconnect_ctr_gets_data_size_0(k, text):
    """The reconnect CTR offers no buffer: a device there gives -ENOSPC forever (ref §1.7)."""
    assert k.ctr(text, reconnect=True) == b""  # unknown log: created by the reconnect CTR
    assert k.ctr(text, reconnect=True) == b""  # known log
    assert k.ctr(text, luid=B) == (b"7:3\0" if b"disk" in text else b"")


def test_ctr_is_idempotent_and_keeps_state(k):
    k.up()
    k.mark([3])
    k.set_sync(0)
    for _ in range(3):
        assert k.ctr() == b""
        assert k.ctr(reconnect=True) == b""
    k.ok(T.RESUME)
    assert k.is_clean(3) == 0 and k.in_sync(0) == 1 and k.sync_count() == 1


def test_repeated_disk_ctr_answers_the_device_again(k):
    assert k.ctr(b"32768 disk 7:3 1024") == b"7:3\0"
    assert k.ctr(b"32768 disk 7:3 1024") == b"7:3\0"


def test_ctr_of_a_resumed_log_with_another_constructor_keeps_the_log(k):
    k.up()
    k.set_sync(1)
    assert k.ctr(b"65536 clustered-core 2048") == b""
    assert wire.parse_u64(k.ok(T.GET_REGION_SIZE)) == 1024
    assert k.in_sync(1) == 1


# --- lifecycle -------------------------------------------------------------------------------------------


def test_requests_before_first_resume(k):
    k.ctr()
    assert wire.parse_u64(k.ok(T.GET_REGION_SIZE)) == 1024
    assert k.sync_count() == 0
    assert k.status() == b"1 clustered-core\0"
    assert k.ok(T.DTR) == b""
    assert k.err(T.GET_SYNC_COUNT) == -errno.ESRCH


@pytest.mark.parametrize("text,count", [
    (b"32768 core 1024", 0), (b"32768 core 1024 sync", 0), (b"32768 core 1024 nosync", 32),
    (b"1000 clustered-core 64 nosync", 16),
])
def test_sync_count_before_resume(k, text, count):
    k.ctr(text)
    assert k.sync_count() == count


def test_nosync_log_is_in_sync_and_clean(k):
    k.up(b"32768 core 1024 nosync")
    assert k.sync_count() == 32
    assert k.work() == (0, 0)
    assert k.remote(0) == (0, 32)
    assert k.in_sync(31) == 1 and k.is_clean(31) == 1


def test_fresh_log_is_clean_and_out_of_sync(k):
    k.up()
    assert k.in_sync(0) == 0 and k.is_clean(0) == 1


def test_mark_clear_flush_before_resume_and_after_postsuspend(k):
    k.ctr()
    k.mark([1])
    k.flush([2])
    k.clear([1])
    k.ok(T.RESUME)
    k.suspend()
    k.mark([4])
    k.clear([2])
    k.flush()
    k.ok(T.RESUME)
    assert k.is_clean(1) == 0 and k.is_clean(2) == 0 and k.is_clean(4) == 0


def test_no_resync_work_before_resume_or_while_suspending(k):
    k.ctr()
    assert k.work() == (0, 0)
    k.ok(T.RESUME)
    assert k.work() == (1, 0)
    k.set_sync(0)
    k.ok(T.PRESUSPEND)
    assert k.work() == (0, 0)
    k.ok(T.POSTSUSPEND)
    assert k.work() == (0, 0)
    k.ok(T.RESUME)
    assert k.work() == (1, 1)


def test_resume_is_idempotent(k):
    k.up()
    k.set_sync(0)
    k.mark([5])
    k.ok(T.RESUME)
    k.ok(T.RESUME)
    assert k.in_sync(0) == 1 and k.is_clean(5) == 0 and k.sync_count() == 1


def test_suspend_requests_in_any_state_are_accepted(k):
    k.ctr()
    k.ok(T.POSTSUSPEND)
    k.ok(T.PRESUSPEND)
    k.ok(T.RESUME)
    k.ok(T.POSTSUSPEND)
    k.ok(T.POSTSUSPEND)
    k.ok(T.RESUME)


def test_dtr_of_a_live_log(k):
    k.up()
    assert k.ok(T.DTR) == b""
    assert k.err(T.IN_SYNC, wire.build_u64(0)) == -errno.ESRCH


def test_luid_reuse_after_dtr(k):
    k.up()
    k.ok(T.DTR)
    k.ctr(b"2048 core 64")
    assert wire.parse_u64(k.ok(T.GET_REGION_SIZE)) == 64


# --- two instances of one uuid ----------------------------------------------------------------------------


def test_two_luids_of_one_uuid_are_independent(k):
    k.up(luid=A)
    k.ctr(b"65536 clustered-core 1024", luid=B)
    k.mark([3], luid=A)
    k.set_sync(0, luid=A)
    k.flush([4], luid=A)
    assert k.is_clean(3, luid=B) == 1 and k.is_clean(4, luid=B) == 1
    assert k.in_sync(0, luid=B) == 0 and k.sync_count(luid=B) == 0
    assert wire.parse_u64(k.ok(T.GET_REGION_SIZE, luid=B)) == 1024
    k.ok(T.IN_SYNC, wire.build_u64(63), luid=B)  # B has 64 regions, A 32
    assert k.err(T.IN_SYNC, wire.build_u64(63), luid=A) == -errno.EINVAL
    k.mark([7], luid=B)
    assert k.is_clean(7, luid=A) == 1
    k.ok(T.DTR, luid=B)
    assert k.is_clean(3, luid=A) == 0 and k.sync_count(luid=A) == 1


def test_same_luid_different_uuids_are_independent(k):
    k.up(uuid="one")
    k.up(uuid="two")
    k.mark([1], uuid="one")
    assert k.is_clean(1, uuid="two") == 1


# --- unknown logs -----------------------------------------------------------------------------------------

PAYLOAD = {
    T.IS_CLEAN: wire.build_u64(0), T.IN_SYNC: wire.build_u64(0), T.IS_REMOTE_RECOVERING: wire.build_u64(0),
    T.MARK_REGION: wire.build_regions([0]), T.CLEAR_REGION: wire.build_regions([0]),
    T.SET_REGION_SYNC: wire.build_set_region_sync(0, 1),
}
LOOP = sorted(requests.REREGISTERS)
DIRECT = [T.DTR, T.PRESUSPEND, T.POSTSUSPEND, T.RESUME, T.GET_REGION_SIZE, T.STATUS_TABLE]


@pytest.mark.parametrize("type_", LOOP, ids=[t.name for t in LOOP])
def test_unknown_log_loop_request_is_esrch(k, type_):
    assert k.err(type_, PAYLOAD.get(type_, b"")) == -errno.ESRCH
    k.up(luid=B)  # same uuid, other luid: still unknown
    assert k.err(type_, PAYLOAD.get(type_, b"")) == -errno.ESRCH


@pytest.mark.parametrize("type_", DIRECT, ids=[t.name for t in DIRECT])
def test_unknown_log_direct_request_is_einval(k, type_):
    assert k.err(type_) == -errno.EINVAL
    k.up(luid=B)
    assert k.err(type_) == -errno.EINVAL


def test_esrch_then_reconnect_sequence_serves_the_log(k):
    """After a daemon restart the kernel runs CTR(+NUL), RESUME, then retries (ref §1.7)."""
    assert k.err(T.FLUSH, wire.build_regions([4])) == -errno.ESRCH
    assert k.ctr(b"32768 clustered-disk 7:3 1024", reconnect=True) == b""
    k.ok(T.RESUME)
    k.flush([4])
    assert k.is_clean(4) == 0


def test_a_reconnect_resume_that_changes_nothing_stored_is_journaled_and_answered_once_durable(
        k, engine, backend):
    """The kernel's reconnect (CTR with its NUL, RESUME) of a live log resumed before: the RESUME
    changes nothing its store holds but what a FLUSH record carries, so it is an EVENT record and
    a FLUSH record without marks, answered once the journal is durable up to them; no store
    write (the next checkpoint writes the store)."""
    k.up()
    k.flush([4])
    k.mark([5])  # appended, not durable yet: the RESUME's reply must wait for it too
    commits = len(backend.commits)
    assert k.ctr(reconnect=True) == b""
    waiting = engine.handle(wire.Request(luid=A, uuid=U, version=3, seq=1, request_type=T.RESUME, data=b""))
    assert not isinstance(waiting, wire.Reply)
    assert waiting.job is None and waiting.durable_at == backend.position()
    assert backend.records[-2:] == [("event", requests.REQUESTS[T.RESUME].journal_event), ("flush", [])]
    assert engine.complete_now(waiting).error == 0
    assert backend.synced == backend.position() and len(backend.commits) == commits
    assert (U, A) in engine.unstored  # the checkpoint's to write
    assert engine.table[(U, A)].log.cursor == 0  # recovery starts again, as at every RESUME
    assert k.is_clean(4) == 0 and k.is_clean(5) == 0


def _suspended(k):
    k.ok(T.PRESUSPEND)
    k.ok(T.POSTSUSPEND)


def _health_f(k, backend):
    backend.fail_sync = True
    assert k.err(T.FLUSH) == -errno.EIO
    backend.fail_sync = False


def _journal_gap(k, backend):
    backend.fail_journal = True
    k.mark([1])
    backend.fail_journal = False


@pytest.mark.parametrize("before", ["plain resume", "suspended", "health F", "journal gap", "first resume"])
def test_a_resume_that_changes_what_is_stored_writes_the_store_before_its_answer(k, backend, before):
    """Not the reconnect of a live log resumed before, or its log in trouble: the store write,
    as the kernel's disk log writes its header and bits at resume."""
    if before == "first resume":  # the reconnect of a log this daemon does not know
        k.ctr(DISK, reconnect=True)
    else:
        k.up(DISK)
        k.flush([4])
        {"plain resume": lambda: None, "suspended": lambda: _suspended(k),
         "health F": lambda: _health_f(k, backend), "journal gap": lambda: _journal_gap(k, backend)}[before]()
        k.ctr(DISK, reconnect=before != "plain resume")
    commits = len(backend.commits)
    k.resume()
    assert len(backend.commits) == commits + 1
    assert k.health() == "A"


def test_a_reconnect_resume_whose_sync_fails_is_eio_and_health_f(k, backend):
    k.up(DISK)
    k.ctr(DISK, reconnect=True)
    backend.fail_sync = True
    assert k.err(T.RESUME) == -errno.EIO
    assert k.health() == "F"
    backend.fail_sync = False
    k.flush()
    assert k.health() == "A"


def test_a_reconnect_resume_whose_journal_append_fails_writes_the_store_instead(k, backend):
    k.up(DISK)
    k.ctr(DISK, reconnect=True)
    backend.fail_event = True
    commits = len(backend.commits)
    k.resume()
    assert len(backend.commits) == commits + 1  # the store carries what the journal could not
    assert k.health() == "A"


def test_type_0_gets_the_ack_form_with_eagain(k):
    rep = k.send(0)
    assert rep.ack_form and rep.error == -errno.EAGAIN and rep.data == b""


@pytest.mark.parametrize("type_", [18, 100, 0xFF])
def test_unknown_type_is_einval(k, type_):
    k.up()
    assert k.err(type_) == -errno.EINVAL


# --- mark / clear ------------------------------------------------------------------------------------------


def test_mark_and_clear_tolerate_duplicates(k):
    k.up()
    k.resync_all()
    k.mark([3, 3, 3])
    k.mark([3])
    k.flush([3, 3])
    assert k.is_clean(3) == 0
    k.clear([3, 3])
    k.clear([3])
    assert k.is_clean(3) == 1
    k.clear([5])  # never marked
    assert k.is_clean(5) == 1


def test_marked_region_is_not_clean_until_cleared(k):
    k.up()
    k.resync_all()
    k.mark([2])
    k.flush()
    k.ok(T.RESUME)
    assert k.is_clean(2) == 0
    k.clear([2])
    assert k.is_clean(2) == 1


def test_integrated_flush_marks(k):
    k.up()
    k.flush([7, 6])
    assert k.is_clean(7) == 0 and k.is_clean(6) == 0 and k.is_clean(5) == 1


def test_clear_only_cleans_in_sync_regions(k):
    k.up()
    k.mark([4])
    k.clear([4])
    assert k.is_clean(4) == 0  # not in sync: stays dirty
    k.set_sync(4)
    k.clear([4])
    assert k.is_clean(4) == 1


def test_clear_of_a_region_that_fell_out_of_sync_keeps_it_dirty(k):
    k.up(b"32768 core 1024 nosync")
    k.mark([9])
    k.set_sync(9, 0)  # write failed on a leg
    k.clear([9])
    assert k.is_clean(9) == 0 and k.in_sync(9) == 0 and k.sync_count() == 31


def test_empty_mark_or_clear_is_einval(k):
    k.up()
    assert k.err(T.MARK_REGION) == -errno.EINVAL
    assert k.err(T.CLEAR_REGION) == -errno.EINVAL


# --- recovery ----------------------------------------------------------------------------------------------


def test_resync_work_repeats_until_set_region_sync(k):
    k.up()
    assert k.work() == (1, 0)
    assert k.work() == (1, 0)
    k.in_sync(0)
    assert k.work() == (1, 0)
    k.set_sync(0)
    assert k.work() == (1, 1)
    assert k.work() == (1, 1)
    k.set_sync(1)
    assert k.work() == (1, 2)


def test_resync_work_skips_regions_in_sync(k):
    k.up()
    for r in (0, 1, 3):
        k.set_sync(r)
    assert k.work() == (1, 2)
    k.set_sync(2)
    assert k.work() == (1, 4)


def test_failed_recovery_moves_on_and_cursor_restarts_at_resume(k):
    k.up()
    assert k.work() == (1, 0)
    k.set_sync(0, 0)  # recovery failed (errors handled)
    assert k.work() == (1, 1)
    k.set_sync(1)
    assert k.work() == (1, 2)
    k.suspend()
    k.ok(T.RESUME)
    assert k.work() == (1, 0)


def test_cursor_restarts_at_every_resume(k):
    k.up(b"8 core 2")  # 4 regions
    k.resync_all()
    assert k.sync_count() == 4 and k.work() == (0, 0)
    k.set_sync(1, 0)
    assert k.work() == (0, 0)  # the cursor passed region 1
    k.suspend()
    k.ok(T.RESUME)
    assert k.work() == (1, 1)


def test_full_resync_reaches_region_count(k):
    k.up()
    handed = []
    while True:
        have, r = k.work()
        if not have:
            break
        handed.append(r)
        assert k.in_sync(r) == 0
        k.set_sync(r)
        k.clear([r])
    assert handed == list(range(32))
    assert k.sync_count() == 32 and k.work() == (0, 0)


def test_set_region_sync_twice_counts_once(k):
    k.up()
    k.set_sync(5)
    k.set_sync(5)
    assert k.sync_count() == 1
    k.set_sync(5, 0)
    k.set_sync(5, 0)
    assert k.sync_count() == 0


def test_is_remote_recovering_reports_the_first_region_not_in_sync(k):
    k.up(b"8 core 2")  # 4 regions
    assert k.remote(3) == (0, 0)
    for r in (0, 1, 3):
        k.set_sync(r)
    assert k.remote(3) == (0, 2)
    k.set_sync(2)
    assert k.remote(0) == (0, 4)  # region_count only when every region is in sync
    k.set_sync(1, 0)
    assert k.remote(3) == (0, 1)
    k.set_sync(1)
    k.set_sync(0, 0)
    assert k.remote(2) == (0, 0)


# --- bounds and sizes --------------------------------------------------------------------------------------

BAD_REGIONS = [32, 33, 2**31, 2**63, 2**64 - 1]


@pytest.mark.parametrize("bad", BAD_REGIONS)
def test_region_arguments_are_bounds_checked_and_nothing_applied(k, bad, caplog):
    k.up()
    k.set_sync(0)
    with caplog.at_level(logging.ERROR, logger="ulog_disk.engine"):
        assert k.err(T.IN_SYNC, wire.build_u64(bad)) == -errno.EINVAL
        assert k.err(T.IS_CLEAN, wire.build_u64(bad)) == -errno.EINVAL
        assert k.err(T.IS_REMOTE_RECOVERING, wire.build_u64(bad)) == -errno.EINVAL
        assert k.err(T.SET_REGION_SYNC, wire.build_set_region_sync(bad, 1)) == -errno.EINVAL
        assert k.err(T.MARK_REGION, wire.build_regions([1, bad])) == -errno.EINVAL
        assert k.err(T.FLUSH, wire.build_regions([2, bad])) == -errno.EINVAL
        assert k.err(T.CLEAR_REGION, wire.build_regions([0, bad])) == -errno.EINVAL
    # Each one logged, until the rate limit of its kind; the rest counted.
    logged = len([r for r in caplog.records if "rejected" in r.getMessage()])
    assert logged == 5 and logged + k.engine.engine.noisy.suppressed["rejected request"] == 7
    assert k.is_clean(1) == 1 and k.is_clean(2) == 1  # nothing of the rejected groups applied
    k.mark([0])
    assert k.err(T.CLEAR_REGION, wire.build_regions([0, bad])) == -errno.EINVAL
    assert k.is_clean(0) == 0
    assert k.sync_count() == 1


@pytest.mark.parametrize("type_,data", [
    (T.IN_SYNC, b""), (T.IN_SYNC, b"\0" * 4), (T.IN_SYNC, b"\0" * 16), (T.IS_CLEAN, b"\0" * 9),
    (T.IS_REMOTE_RECOVERING, b"\0" * 7), (T.MARK_REGION, b"\0" * 12), (T.CLEAR_REGION, b"\0" * 1),
    (T.FLUSH, b"\0" * 4), (T.SET_REGION_SYNC, b"\0" * 8), (T.SET_REGION_SYNC, b"\0" * 24),
    (T.GET_RESYNC_WORK, b"\0" * 8),
])
def test_wrong_payload_sizes_are_einval(k, type_, data):
    k.up()
    assert k.err(type_, data) == -errno.EINVAL
    assert k.sync_count() == 0 and k.is_clean(0) == 1


def test_log_keeps_working_after_rejected_requests(k):
    k.up()
    for bad in (b"\0" * 3, wire.build_u64(2**64 - 1)):
        k.err(T.IN_SYNC, bad)
        k.err(T.MARK_REGION, bad)
    k.mark([1])
    assert k.is_clean(1) == 0


# --- status ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,info", [
    (b"32768 core 1024", b"1 core\0"),
    (b"32768 clustered-core 1024 nosync", b"1 clustered-core\0"),
    (b"32768 disk 7:3 1024", b"3 disk 7:3 A\0"),
    (b"32768 clustered-disk 7:3 1024", b"3 clustered-disk 7:3 A\0"),
])
def test_status_info(k, text, info):
    k.ctr(text)
    assert k.status() == info
    k.ok(T.RESUME)
    assert k.status() == info


@pytest.mark.parametrize("text,table", [
    (b"32768 clustered-core 1024", b"clustered-core 1024 \0"),
    (b"32768 clustered-disk 7:3 1024 nosync block_on_error",
     b"clustered-disk 7:3 1024 nosync block_on_error \0"),
])
def test_status_table(k, text, table):
    k.ctr(text)
    assert k.ok(T.STATUS_TABLE) == table


def test_failed_journal_sync_gives_eio_then_health_f_then_recovers(k, backend):
    k.up(b"32768 clustered-disk 7:3 1024")
    k.resync_all()
    backend.fail_sync = True
    assert k.err(T.FLUSH, wire.build_regions([5])) == -errno.EIO
    assert k.status() == b"3 clustered-disk 7:3 F\0"
    assert k.err(T.FLUSH) == -errno.EIO
    assert k.is_clean(5) == 0  # the mark stays in memory (and in the journal)
    backend.fail_sync = False
    k.flush()
    assert k.status() == b"3 clustered-disk 7:3 A\0"
    assert backend.synced == backend.position()
    assert ("flush", [(OP_MARK, 5)]) in backend.records


def test_failed_postsuspend_and_resume_commits_are_eio(k, backend):
    k.up(b"32768 disk 7:3 1024")
    backend.fail_commit = True
    k.ok(T.PRESUSPEND)
    assert k.err(T.POSTSUSPEND) == -errno.EIO
    assert k.err(T.RESUME) == -errno.EIO
    assert k.status() == b"3 disk 7:3 F\0"
    backend.fail_commit = False
    k.ok(T.RESUME)
    assert k.status() == b"3 disk 7:3 A\0"


def test_journal_failure_gives_health_d_and_the_next_flush_writes_the_store(k, backend):
    k.up(b"32768 clustered-disk 7:3 1024")
    backend.fail_journal = True
    k.mark([1])
    assert k.status() == b"3 clustered-disk 7:3 D\0"
    assert k.is_clean(1) == 0
    backend.fail_journal = False
    before = len(backend.commits)
    k.flush()
    # The journal misses the mark: the FLUSH writes the instance's whole change to its store.
    assert len(backend.commits) == before + 1
    assert not backend.commits[-1].clean_chunks[0][0] & (1 << 1)
    assert k.status() == b"3 clustered-disk 7:3 A\0"
    commits = len(backend.commits)
    k.mark([2])
    k.flush()
    assert len(backend.commits) == commits  # the journal is whole again: FLUSH syncs it


def test_flush_syncs_the_journal_before_the_reply(k, backend):
    k.up()
    commits = len(backend.commits)
    k.flush([3])
    assert backend.records[-1] == ("flush", [(OP_MARK, 3)])
    assert backend.synced == backend.position()
    assert len(backend.commits) == commits  # no store write on the FLUSH's path


def test_flush_of_a_backend_without_a_journal_commits_before_the_reply(tmp_path):
    backend = MemoryCommits(tmp_path)
    kern = drive(Applier.over(backend, boot_id="b"))
    kern.up()
    before = len(backend.commits)
    kern.flush([3])
    assert len(backend.commits) == before + 1
    clean = backend.commits[-1].clean_chunks[0]
    assert not clean[0] & (1 << 3)


class MemoryCommits(MemoryBackend):
    def __init__(self, state_dir):
        super().__init__(state_dir)
        self.commits: list[Commit] = []

    def commit(self, commit: Commit) -> None:
        self.commits.append(commit)


# --- hand-over and retained state -------------------------------------------------------------------------


def test_reload_hands_state_over_at_resume_of_the_new_luid(k):
    """Protocol ref §5.4: CTR(B) while A is live, PRESUSPEND(A), POSTSUSPEND(A), RESUME(B), DTR(A)."""
    k.up(luid=A)
    for r in range(8):
        k.set_sync(r, luid=A)
    k.mark([3], luid=A)
    k.flush(luid=A)
    k.ctr(luid=B)
    assert wire.parse_u64(k.ok(T.GET_REGION_SIZE, luid=B)) == 1024
    assert k.sync_count(luid=B) == 0  # not adopted before its RESUME
    k.mark([9], luid=A)  # A keeps being served
    k.flush(luid=A)
    k.suspend(luid=A)
    k.ok(T.RESUME, luid=B)
    # B: in-sync, clean regions stay in sync; A's marked regions are out of sync in B.
    assert [k.in_sync(r, luid=B) for r in range(10)] == [1, 1, 1, 0, 1, 1, 1, 1, 0, 0]
    assert k.sync_count(luid=B) == 7
    assert k.is_clean(3, luid=B) == 0  # dirty until recovered, as a disk log would store it
    assert k.work(luid=B) == (1, 3)
    k.ok(T.DTR, luid=A)
    assert k.sync_count(luid=B) == 7
    k.set_sync(3, luid=B)
    k.clear([3], luid=B)
    assert k.is_clean(3, luid=B) == 1
    assert k.work(luid=B) == (1, 8)


def test_no_hand_over_from_a_live_instance(k):
    k.up(luid=A)
    k.resync_all(luid=A)
    k.flush(luid=A)
    k.ctr(luid=B)
    k.ok(T.RESUME, luid=B)  # A was not suspended
    assert k.sync_count(luid=B) == 0
    assert k.sync_count(luid=A) == 32


@pytest.mark.parametrize("option,count", [(b"", 32), (b" nosync", 64)])
def test_hand_over_with_resize(k, option, count):
    k.up(luid=A)
    k.resync_all(luid=A)
    k.flush(luid=A)
    k.ctr(b"65536 clustered-core 1024" + option, luid=B)  # 64 regions
    k.suspend(luid=A)
    k.ok(T.RESUME, luid=B)
    # The new regions are out of sync, or in sync with nosync.
    assert k.sync_count(luid=B) == count
    assert k.work(luid=B) == ((1, 32) if count == 32 else (0, 0))


def test_hand_over_to_a_smaller_log(k):
    k.up(luid=A)
    k.resync_all(luid=A)
    k.set_sync(31, 0, luid=A)
    k.flush(luid=A)
    k.ctr(b"16384 clustered-core 1024", luid=B)  # 16 regions
    k.suspend(luid=A)
    k.ok(T.RESUME, luid=B)
    assert k.sync_count(luid=B) == 16 and k.remote(0, luid=B) == (0, 16)


def test_state_is_retained_after_dtr_of_the_last_instance(k):
    k.up(luid=A)
    k.resync_all(luid=A)
    k.mark([4], luid=A)
    k.flush(luid=A)
    k.suspend(luid=A)
    k.ok(T.DTR, luid=A)
    assert k.err(T.GET_SYNC_COUNT, luid=A) == -errno.ESRCH
    k.up(luid=B)  # dmsetup create again, same uuid
    assert k.sync_count(luid=B) == 31
    assert k.work(luid=B) == (1, 4)
    assert k.remote(0, luid=B) == (0, 4)


def test_retained_state_survives_luid_reuse(k):
    k.up(luid=A)
    k.resync_all(luid=A)
    k.flush(luid=A)
    k.suspend(luid=A)
    k.ok(T.DTR, luid=A)
    k.up(luid=A)
    assert k.sync_count(luid=A) == 32


def test_never_resumed_instance_leaves_nothing_behind(k):
    k.ctr(luid=A)
    k.ok(T.DTR, luid=A)  # table clear (ref §5.5)
    k.up(b"32768 clustered-core 1024 nosync", luid=B)
    k.suspend(luid=B)
    k.ok(T.DTR, luid=B)
    k.ctr(luid=C)
    k.ok(T.RESUME, luid=C)
    assert k.sync_count(luid=C) == 32  # B's state, not A's


def test_inactive_table_dtr_does_not_disturb_the_live_one(k):
    k.up(luid=A)
    k.set_sync(0, luid=A)
    k.ctr(luid=B)
    k.ok(T.DTR, luid=B)
    assert k.sync_count(luid=A) == 1 and k.work(luid=A) == (1, 1)


# --- bugs found by these tests, fixed ------------------------------------------------------


def test_ctr_with_an_impossible_region_count_is_einval(k):
    assert k.err(T.CTR, b"18446744073709551615 core 2") == -errno.EINVAL


def test_region_size_beyond_u64_does_not_raise(k):
    assert k.err(T.CTR, b"36893488147419103232 core 36893488147419103232") == -errno.EINVAL
    assert k.err(T.GET_REGION_SIZE) == -errno.EINVAL


def test_region_size_must_fit_the_kernels_u32(k):
    assert k.err(T.CTR, b"8589934592 core 4294967296") == -errno.EINVAL


def test_sync_forced_resync_is_not_undone_by_the_next_resume(k):
    k.up(b"8 core 2", luid=A)
    k.resync_all(luid=A)
    k.flush(luid=A)
    k.suspend(luid=A)
    k.ok(T.DTR, luid=A)
    k.up(b"8 core 2 sync", luid=B)
    assert k.sync_count(luid=B) == 0  # forced full resync
    k.suspend(luid=B)
    k.ok(T.RESUME, luid=B)
    assert k.sync_count(luid=B) == 0


def test_late_flush_of_the_old_instance_does_not_override_the_successor(k):
    k.up(b"16 core 2", luid=A)  # 8 regions
    k.resync_all(luid=A)
    k.mark([3], luid=A)
    k.flush(luid=A)
    k.ctr(b"16 core 2", luid=B)
    k.suspend(luid=A)
    k.ok(T.RESUME, luid=B)
    k.set_sync(5, 0, luid=B)  # a write failed on a leg: region 5 is out of sync
    k.flush(luid=B)
    k.clear([3], luid=A)  # late completion on the old table
    k.flush(luid=A)
    k.ok(T.DTR, luid=A)
    k.suspend(luid=B)
    k.ok(T.RESUME, luid=B)
    assert k.in_sync(5, luid=B) == 0


@pytest.mark.parametrize("text", [CORE, b"32768 clustered-core 1024 nosync"])
def test_a_reconnect_of_a_log_without_state_comes_back_all_dirty_and_out_of_sync(k, text, caplog):
    """The kernel reconnects (CTR + NUL) a log this daemon has no state for: its state directory was
    lost or replaced. Nothing may read as clean or in sync, 'nosync' or not; logged once."""
    with caplog.at_level(logging.WARNING, logger="ulog_disk.engine"):
        k.ctr(text, reconnect=True)
        k.ok(T.RESUME)
        k.ctr(text, reconnect=True)  # a repeat finds the log known: nothing more
    assert k.sync_count() == 0
    assert all(k.is_clean(r) == 0 for r in range(32))
    assert len([r for r in caplog.records if "has no state for" in r.getMessage()]) == 1
    assert k.engine.table[(U, A)].log.check() == []


# --- the kernel's resend after a timeout --------------------------------------------------------------
# dm_consult_userspace() waits 15 s for a reply, then sends the same request again (same log, type and
# payload) with a new seq and ignores any later reply to the old one. When the daemon was held up (a
# stalled state disk) it reads the original and the resend one after the other: together
# they must do exactly what one of them does.

REGION = st.integers(0, 31)
REGION_LISTS = st.lists(REGION, min_size=1, max_size=4)
KERNEL_REQUESTS = st.one_of(
    REGION_LISTS.map(lambda rs: (T.MARK_REGION, wire.build_regions(rs))),
    REGION_LISTS.map(lambda rs: (T.CLEAR_REGION, wire.build_regions(rs))),
    st.lists(REGION, max_size=3).map(lambda rs: (T.FLUSH, wire.build_regions(rs))),
    st.just((T.GET_RESYNC_WORK, b"")),
    st.tuples(REGION, st.integers(0, 1)).map(lambda p: (T.SET_REGION_SYNC, wire.build_set_region_sync(*p))),
    REGION.map(lambda r: (T.IN_SYNC, wire.build_u64(r))),
    REGION.map(lambda r: (T.IS_CLEAN, wire.build_u64(r))),
    REGION.map(lambda r: (T.IS_REMOTE_RECOVERING, wire.build_u64(r))),
    st.sampled_from([(T.GET_SYNC_COUNT, b""), (T.STATUS_INFO, b""), (T.GET_REGION_SIZE, b""),
                     (T.PRESUSPEND, b""), (T.POSTSUSPEND, b""), (T.RESUME, b""), (T.CTR, CORE)]),
)


def observe(k: Kernel) -> tuple:
    """Everything the kernel can read of the log."""
    return (tuple(k.send(T.IN_SYNC, wire.build_u64(r)).data for r in range(32)),
            tuple(k.send(T.IS_CLEAN, wire.build_u64(r)).data for r in range(32)),
            k.send(T.GET_SYNC_COUNT).data, k.send(T.GET_RESYNC_WORK).data)


@given(script=st.lists(st.tuples(KERNEL_REQUESTS, st.booleans()), max_size=40))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_resent_request_does_what_the_original_alone_does(tmp_path, script):
    once, twice = drive(Applier.over(RecordingJournal(tmp_path / "once"), boot_id="x")), \
        drive(Applier.over(RecordingJournal(tmp_path / "twice"), boot_id="x"))
    for kernel in (once, twice):
        kernel.up()
    for (type_, data), resent in script:
        expected = once.send(type_, data)
        original = twice.send(type_, data)
        assert (original.error, original.data) == (expected.error, expected.data), T(type_).name
        if resent:
            again = twice.send(type_, data)
            assert (again.error, again.data) == (original.error, original.data), T(type_).name
    assert observe(twice) == observe(once)
