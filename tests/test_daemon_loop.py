"""The request loop's group commit and background work.

No timing is asserted: sync times are set, not measured; a sync that must be "running" is held
on an event; what is checked is which thread synced, how many syncs covered how many FLUSHes,
what was answered, and the order of store writes.
"""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

from ulog_disk.daemon import loop as daemon_module
from ulog_disk.daemon.applier import Applier
from ulog_disk.daemon.loop import Daemon
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import RequestType
from ulog_disk.storage.base import BackendError, Commit
from ulog_disk.testing.journaled import CollectingTransport, RecordingJournal


class JournalBackend(RecordingJournal):
    """A journal that records which thread synced, and whose syncs can be held."""

    def __init__(self, state_dir: Path):
        super().__init__(state_dir)
        self.sync_threads: list[int] = []
        self.calls: list[str] = []
        self.hold: threading.Event | None = None
        self.syncing = threading.Event()

    def sync(self) -> int:
        target = self.position()
        self.sync_threads.append(threading.get_ident())
        self.syncing.set()
        if self.hold is not None:
            self.hold.wait(10)
        if self.fail_sync:
            raise BackendError(errno.EIO, "injected")
        self.synced = target
        return target

    def commit(self, commit: Commit) -> None:
        self.calls.append(f"commit {commit.record.uuid}")

    def maintain(self, needed: int) -> None:
        self.calls.append(f"maintain {needed}")


SEQ = iter(range(1, 1 << 30))


def frame(uuid: str, rtype: RequestType, data: bytes = b"") -> bytes:
    return wire.encode_request(wire.Request(luid=1, uuid=uuid, version=3, seq=next(SEQ),
                                            request_type=rtype, data=data))


def make_daemon(tmp_path: Path, uuids: tuple[str, ...] = ("A",)) -> tuple[Daemon, JournalBackend,
                                                                          CollectingTransport]:
    backend = JournalBackend(tmp_path)
    transport = CollectingTransport()
    daemon = Daemon(Applier.over(backend, boot_id="b"), transport)  # type: ignore[arg-type]
    for uuid in uuids:
        daemon.on_frame(frame(uuid, RequestType.CTR, b"65536 clustered-core 1024\0"), "k")
        daemon.on_frame(frame(uuid, RequestType.RESUME), "k")
    daemon.wait_idle()
    backend.calls.clear()
    transport.sent.clear()
    return daemon, backend, transport


def flushes(transport: CollectingTransport) -> list[int]:
    return [r.error for r in transport.sent if r.request_type == RequestType.FLUSH]


def close(daemon: Daemon) -> None:
    daemon.group.close()
    daemon.worker.close()


def test_the_loop_never_syncs_the_group_commit_thread_does_and_the_loop_goes_on(tmp_path: Path) -> None:
    daemon, backend, transport = make_daemon(tmp_path)
    backend.hold = threading.Event()
    daemon.on_frame(frame("A", RequestType.FLUSH), "k")
    daemon.group.start()  # what the loop does after each batch
    assert backend.syncing.wait(10)
    assert backend.sync_threads[0] != threading.get_ident()
    # The loop is free meanwhile: a request that needs no disk is answered now.
    daemon.on_frame(frame("A", RequestType.GET_SYNC_COUNT), "k")
    assert [r.request_type for r in transport.sent] == [RequestType.GET_SYNC_COUNT]
    backend.hold.set()
    daemon.wait_idle()
    assert flushes(transport) == [0]
    close(daemon)


def test_flushes_of_one_batch_share_one_sync(tmp_path: Path) -> None:
    daemon, backend, transport = make_daemon(tmp_path, ("A", "B", "C"))
    for uuid in ("A", "B", "C"):
        daemon.on_frame(frame(uuid, RequestType.FLUSH, wire.build_u64(7)), "k")
    assert flushes(transport) == []  # nothing is answered before its sync
    daemon.group.start()
    daemon.wait_idle()
    assert len(backend.sync_threads) == 1 and flushes(transport) == [0, 0, 0]
    assert daemon.group.syncs == 1 and daemon.group.flushes == 3
    # Several mirrors flushing: the sync ran on the group-commit thread, so the loop could go on
    # reading the others' requests meanwhile.
    assert backend.sync_threads[0] != threading.get_ident()
    close(daemon)


def test_flushes_arriving_during_a_sync_ride_on_the_next_one_together(tmp_path: Path) -> None:
    daemon, backend, transport = make_daemon(tmp_path, ("A", "B", "C", "D"))
    backend.hold = threading.Event()
    daemon.on_frame(frame("A", RequestType.FLUSH), "k")
    daemon.group.start()
    assert backend.syncing.wait(10)
    for uuid in ("B", "C", "D"):
        daemon.on_frame(frame(uuid, RequestType.FLUSH), "k")
        daemon.group.start()  # a sync is running: nothing more starts
    assert len(backend.sync_threads) == 1
    backend.hold.set()
    daemon.wait_idle()
    assert flushes(transport) == [0, 0, 0, 0]
    assert len(backend.sync_threads) == 2  # A's sync, then one for B, C and D
    close(daemon)


def test_a_failed_sync_answers_eio_to_every_flush_it_covered_then_the_next_succeeds(tmp_path: Path) -> None:
    daemon, backend, transport = make_daemon(tmp_path, ("A", "B"))
    backend.fail_sync = True
    daemon.on_frame(frame("A", RequestType.FLUSH), "k")
    daemon.on_frame(frame("B", RequestType.FLUSH), "k")
    daemon.group.start()
    daemon.wait_idle()
    assert flushes(transport) == [-errno.EIO, -errno.EIO]
    assert daemon.applier.table[("A", 1)].health == "F"
    backend.fail_sync = False
    daemon.on_frame(frame("A", RequestType.FLUSH), "k")
    daemon.group.start()
    daemon.wait_idle()
    assert flushes(transport)[-1] == 0
    assert daemon.applier.table[("A", 1)].health == "A"
    close(daemon)


def test_a_flush_already_durable_is_answered_at_once(tmp_path: Path) -> None:
    daemon, backend, transport = make_daemon(tmp_path)
    daemon.on_frame(frame("A", RequestType.FLUSH), "k")
    daemon.group.start()
    daemon.wait_idle()
    backend.synced = backend.position() + 10  # another sync already covered what comes next
    syncs = len(backend.sync_threads)
    daemon.on_frame(frame("A", RequestType.FLUSH), "k")
    assert flushes(transport) == [0, 0] and len(backend.sync_threads) == syncs
    close(daemon)


def test_background_work_waits_for_an_idle_worker_and_a_lifecycle_write_waits_for_at_most_one(
        tmp_path: Path) -> None:
    daemon, backend, transport = make_daemon(tmp_path, ("A", "B"))
    daemon.cut_at = daemon.applier.needed()  # the journal is cut up to here already
    for uuid in ("A", "B"):
        daemon.on_frame(frame(uuid, RequestType.MARK_REGION, wire.build_u64(3)), "k")
    assert set(daemon.applier.unstored) == {("A", 1), ("B", 1)}
    daemon.background(idle=False)
    assert not daemon.worker.busy()  # nothing due yet: young changes, short journal
    daemon.background(idle=True)
    assert daemon.worker.busy() and daemon.worker.inflight == 1
    daemon.background(idle=True)  # the worker is busy: no second background job queued
    assert daemon.worker.inflight == 1
    daemon.on_frame(frame("B", RequestType.PRESUSPEND), "k")
    daemon.on_frame(frame("B", RequestType.POSTSUSPEND), "k")
    daemon.wait_idle()
    assert backend.calls == ["commit A", "commit B"]  # the checkpoint of A, then B's POSTSUSPEND
    assert [r.error for r in transport.sent if r.request_type == RequestType.POSTSUSPEND] == [0]
    assert set(daemon.applier.unstored) == set()
    daemon.background(idle=True)  # nothing left to store: the journal can be cut
    daemon.wait_idle()
    assert backend.calls[-1] == f"maintain {backend.position()}"
    close(daemon)


def test_changes_older_than_the_checkpoint_age_are_stored_while_busy(tmp_path: Path, monkeypatch) -> None:
    daemon, backend, _ = make_daemon(tmp_path)
    daemon.cut_at = daemon.applier.needed()
    daemon.on_frame(frame("A", RequestType.MARK_REGION, wire.build_u64(3)), "k")
    first, _since = daemon.applier.unstored[("A", 1)]
    daemon.applier.unstored[("A", 1)] = (first, time.monotonic() - 3600)
    daemon.background(idle=False)
    daemon.wait_idle()
    assert backend.calls == ["commit A"]
    close(daemon)


def test_replies_to_the_kernel_over_netlink_whose_address_is_none_are_sent(tmp_path: Path) -> None:
    """The netlink transport gives the kernel's frames the address None: a reply that waits for a
    store write (CTR, RESUME) must still be sent (background work has its own NOBODY address)."""
    backend = JournalBackend(tmp_path)
    transport = CollectingTransport()
    daemon = Daemon(Applier.over(backend, boot_id="b"), transport)  # type: ignore[arg-type]
    for rtype, data in ((RequestType.CTR, b"65536 clustered-core 1024"), (RequestType.RESUME, b""),
                        (RequestType.FLUSH, wire.build_u64(3))):
        daemon.on_frame(frame("N", rtype, data), None)  # the kernel sends one at a time
        daemon.group.start()
        daemon.wait_idle()
        assert [(r.request_type, r.error) for r in transport.sent][-1:] == [(rtype, 0)]
    assert len(transport.sent) == 3
    close(daemon)


def test_closing_the_group_commit_while_a_sync_runs_waits_for_it_and_returns(tmp_path: Path) -> None:
    daemon, backend, transport = make_daemon(tmp_path)
    backend.hold = threading.Event()
    daemon.on_frame(frame("A", RequestType.FLUSH), "k")
    daemon.group.start()
    assert backend.syncing.wait(10)
    releaser = threading.Timer(0.2, backend.hold.set)
    releaser.start()
    closer = threading.Thread(target=daemon.group.close)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "close() hung on a group-commit thread that was syncing"
    assert flushes(transport) == [0]  # the sync under way finished and was answered
    daemon.worker.close()


def test_while_a_sync_stalls_requests_that_write_wait_and_the_others_are_answered(
        tmp_path: Path, monkeypatch) -> None:
    """A stalled state disk: once a sync has run longer than STALL_AFTER, a request
    that would write the journal is held (its write could block the loop); IN_SYNC, STATUS… are
    answered meanwhile; when the sync completes the held ones are served once each, in order."""
    monkeypatch.setattr(daemon_module, "STALL_AFTER", 0.0)
    daemon, backend, transport = make_daemon(tmp_path, ("A", "B"))
    backend.hold = threading.Event()
    daemon.on_frame(frame("A", RequestType.FLUSH), "k")
    daemon.group.start()
    assert backend.syncing.wait(10)
    appended = backend.position()
    daemon.on_frame(frame("B", RequestType.MARK_REGION, wire.build_u64(5)), "k")
    daemon.on_frame(frame("B", RequestType.FLUSH), "k")
    daemon.on_frame(frame("B", RequestType.IN_SYNC, wire.build_u64(5)), "k")
    daemon.on_frame(frame("B", RequestType.IS_CLEAN, wire.build_u64(5)), "k")
    daemon.on_frame(frame("A", RequestType.STATUS_INFO), "k")
    daemon.on_frame(frame("B", RequestType.FLUSH), "k")  # the kernel's resend after its timeout
    assert backend.position() == appended  # nothing written while the sync stalls
    assert [r.request_type for r in transport.sent] == [RequestType.IN_SYNC, RequestType.IS_CLEAN,
                                                        RequestType.STATUS_INFO]
    assert daemon.applier.stats.by_type[RequestType.MARK_REGION] == 0  # not applied yet
    assert len(daemon.held) == 3
    backend.hold.set()
    deadline = time.monotonic() + 10
    while daemon.group.syncs < 1 or daemon.disk_stalled():  # the stalled sync is done
        assert time.monotonic() < deadline
        time.sleep(0.01)
    daemon.serve_held()  # what the loop does once the sync is done, with or without new frames
    assert daemon.held == [] and daemon.held_total == 3
    while daemon.group.syncs < 2:  # the held FLUSHes' own sync started without another frame
        assert time.monotonic() < deadline
        time.sleep(0.01)
    daemon.wait_idle()
    answered = [(r.request_type, r.error) for r in transport.sent[3:]]
    assert sorted(answered) == sorted([(RequestType.FLUSH, 0), (RequestType.MARK_REGION, 0),
                                       (RequestType.FLUSH, 0), (RequestType.FLUSH, 0)])
    assert daemon.applier.stats.by_type[RequestType.MARK_REGION] == 1
    close(daemon)


def test_a_commit_of_an_unhealthy_log_is_answered_after_its_health_is_put_right(tmp_path: Path) -> None:
    """The thread that ran a store write answers a success at once only for a log whose health is
    A; otherwise the loop answers after complete() has set A again, or a STATUS_INFO right after
    the reply could still read F (seen once in test_full_filesystem)."""
    daemon, backend, transport = make_daemon(tmp_path)
    backend.fail_sync = True
    daemon.on_frame(frame("A", RequestType.FLUSH), "k")
    daemon.group.start()
    daemon.wait_idle()
    assert daemon.applier.table[("A", 1)].health == "F"
    backend.fail_sync = False
    commit = daemon.applier.handle(wire.decode_frame(frame("A", RequestType.POSTSUSPEND)))
    assert not isinstance(commit, wire.Reply) and commit.reply is None
    daemon.worker.submit(daemon.job(commit, "k"))
    daemon.wait_idle()
    assert daemon.applier.table[("A", 1)].health == "A"
    assert [(r.request_type, r.error) for r in transport.sent][-1] == (RequestType.POSTSUSPEND, 0)
    close(daemon)


def test_a_missing_lifecycle_transition_is_logged_as_a_bug_and_answered_eio(tmp_path: Path, caplog) -> None:
    """A state the lifecycle table does not list for a request is a bug of ours: the daemon logs
    it as one (with its traceback) and answers -EIO, never -EINVAL as if the kernel had sent
    nonsense; the other logs are served on."""
    import logging

    from ulog_disk.log.lifecycle import State

    daemon, backend, transport = make_daemon(tmp_path, ("A", "B"))
    daemon.applier.table[("A", 1)].state = State.DESTROYED
    with caplog.at_level(logging.ERROR, logger="ulog_disk.daemon"):
        daemon.on_frame(frame("A", RequestType.IN_SYNC, wire.build_u64(0)), "k")
    assert [(r.request_type, r.error) for r in transport.sent] == [(RequestType.IN_SYNC, -errno.EIO)]
    assert any("a bug of dm-ulogd" in r.getMessage() and r.exc_info for r in caplog.records)
    daemon.on_frame(frame("B", RequestType.IN_SYNC, wire.build_u64(0)), "k")
    assert transport.sent[-1].error == 0
    close(daemon)
