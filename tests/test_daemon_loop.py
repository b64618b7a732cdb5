"""The request loop's group commit and background work.

No timing is asserted: sync times are set, not measured; a sync that must be "running" is held
on an event; what is checked is which thread synced, how many syncs covered how many FLUSHes,
what was answered, and the order of store writes.
"""

from __future__ import annotations

import errno
import selectors
import socket
import threading
import time
from pathlib import Path

import pytest

from ulog_disk.daemon import loop as daemon_module
from ulog_disk.daemon.applier import Applier
from ulog_disk.daemon.loop import Daemon
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import RequestType
from ulog_disk.storage.base import BackendError, Commit
from ulog_disk.testing.journaled import CollectingTransport, RecordingJournal
from ulog_disk.transport.unix import UnixTransport


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


# --- the request loop itself, run over a unix socket: two threads take turns at it -------------


class Running:
    """A daemon of ``JournalBackend`` running in-process over the unix transport, and one client
    connection; ``run`` on a thread of its own (the test stops it as a signal would)."""

    def __init__(self, tmp_path: Path, selector: selectors.BaseSelector | None = None, **kwargs) -> None:
        self.backend = JournalBackend(tmp_path)
        self.transport = UnixTransport(tmp_path / "sock")
        self.daemon = Daemon(Applier.over(self.backend, boot_id="b"), self.transport, **kwargs)
        if selector is not None:
            self.daemon.selector = selector
            selector.register(self.daemon.wake_r, selectors.EVENT_READ, "wake")
            self.daemon.wake_key = selector.get_key(self.daemon.wake_r)
            selector.register(self.daemon.sig_r, selectors.EVENT_READ, "signal")
        #: The thread that served each request type, last one wins; and every request's, in order.
        self.served_by: dict[RequestType, int] = {}
        self.servers: list[int] = []
        handle = self.daemon.applier.handle

        def recording(request: wire.Request):  # type: ignore[no-untyped-def]
            self.served_by[RequestType(request.request_type)] = threading.get_ident()
            self.servers.append(threading.get_ident())
            return handle(request)

        self.daemon.applier.handle = recording  # type: ignore[method-assign]
        self.result: list[object] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.client.connect(str(tmp_path / "sock"))
        self.client.settimeout(10)

    def _run(self) -> None:
        try:
            self.result.append(self.daemon.run())
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            self.result.append(exc)

    def send(self, uuid: str, rtype: RequestType, data: bytes = b"") -> int:
        raw = frame(uuid, rtype, data)
        self.client.send(raw)
        return wire.decode_frame(raw).seq

    def reply(self) -> wire.DecodedReply:
        return wire.decode_reply(self.client.recv(65536))

    def call(self, uuid: str, rtype: RequestType, data: bytes = b"") -> wire.DecodedReply:
        seq = self.send(uuid, rtype, data)
        reply = self.reply()
        assert (reply.seq, reply.error) == (seq, 0), (rtype, reply)
        return reply

    def stop(self) -> object:
        self.daemon.request_stop(15, None)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the daemon did not stop"
        self.client.close()
        return self.result[0]


@pytest.mark.parametrize("poller", ["epoll", "poll"])
def test_while_a_sync_runs_the_loop_goes_on_serving_on_another_thread(tmp_path: Path, poller: str) -> None:
    """The thread whose turn ended with a FLUSH waiting syncs it; a request that comes during the
    sync is served by another thread, at once. With epoll that is the other serving thread; without
    it, the loop's one thread, which handed the sync to the group-commit thread."""
    d = Running(tmp_path, selectors.PollSelector() if poller == "poll" else None)
    d.call("A", RequestType.CTR, b"65536 clustered-core 1024\0")
    d.call("A", RequestType.RESUME)
    d.backend.hold = threading.Event()
    flush = d.send("A", RequestType.FLUSH, wire.build_u64(3))
    assert d.backend.syncing.wait(10)
    count = d.call("A", RequestType.GET_SYNC_COUNT)  # answered while the sync is held
    assert count.request_type == RequestType.GET_SYNC_COUNT
    syncer = d.backend.sync_threads[0]
    assert d.served_by[RequestType.GET_SYNC_COUNT] != syncer
    assert syncer not in (d.thread.ident, threading.get_ident())
    if poller == "epoll":  # the thread that took the FLUSH's turn syncs it itself
        assert d.served_by[RequestType.FLUSH] == syncer
    else:
        assert d.served_by[RequestType.FLUSH] == d.thread.ident
    d.backend.hold.set()
    reply = d.reply()
    assert (reply.request_type, reply.seq, reply.error) == (RequestType.FLUSH, flush, 0)
    # Once the sync is over, either thread may serve; every request is still answered once.
    for region in range(20):
        d.call("A", RequestType.FLUSH, wire.build_u64(region))
        d.call("A", RequestType.IN_SYNC, wire.build_u64(region))
    assert d.stop() == 0


def test_the_thread_that_took_the_loop_over_during_a_sync_serves_alone_after_it(tmp_path: Path) -> None:
    """Which thread serves changes only when the standby one takes the loop over during a sync:
    afterwards one thread waits in select and serves every request (two there would both be
    woken by each one and take turns, a wake-up per request)."""
    d = Running(tmp_path)
    d.call("A", RequestType.CTR, b"65536 clustered-core 1024\0")
    d.call("A", RequestType.RESUME)
    d.backend.hold = threading.Event()
    d.send("A", RequestType.FLUSH)
    assert d.backend.syncing.wait(10)
    d.call("A", RequestType.GET_SYNC_COUNT)
    taker = d.served_by[RequestType.GET_SYNC_COUNT]
    assert taker != d.backend.sync_threads[0]
    d.backend.hold.set()
    assert d.reply().request_type == RequestType.FLUSH
    first = len(d.servers)
    for region in range(50):
        d.call("A", RequestType.IN_SYNC, wire.build_u64(region))
    assert set(d.servers[first:]) == {taker}
    assert d.stop() == 0


def test_flushes_one_after_another_still_get_their_background_work(tmp_path: Path, monkeypatch) -> None:
    """One client's FLUSHes, each sent when the last was answered: every turn of the loop ends
    with a sync, and the checkpoints are still handed out (after each sync, not before it), not
    only once the daemon is idle."""
    monkeypatch.setattr(daemon_module, "IDLE_AFTER", 3600.0)
    monkeypatch.setattr(daemon_module, "MAINTENANCE_INTERVAL", 3600.0)
    d = Running(tmp_path, checkpoint_age=0.0)
    d.call("A", RequestType.CTR, b"65536 clustered-core 1024\0")
    d.call("A", RequestType.RESUME)
    d.backend.calls.clear()
    region = 0
    deadline = time.monotonic() + 30
    while "commit A" not in d.backend.calls:  # never idle: one FLUSH carrying a mark after another
        assert time.monotonic() < deadline, "no checkpoint while every turn synced"
        d.call("A", RequestType.FLUSH, wire.build_u64(region % 16))
        region += 1
    assert d.stop() == 0


def test_a_stop_during_a_stalled_sync_stops_reading_at_once_and_answers_the_flush_after(
        tmp_path: Path) -> None:
    """SIGTERM while a serving thread waits for the disk: the daemon leaves the socket at once
    (the kernel's next request then waits for the next daemon instead of going unanswered), and
    the FLUSH under way is answered once its sync returns."""
    d = Running(tmp_path)
    d.call("A", RequestType.CTR, b"65536 clustered-core 1024\0")
    d.call("A", RequestType.RESUME)
    d.backend.hold = threading.Event()
    syncs = d.daemon.group.syncs
    flush = d.send("A", RequestType.FLUSH)
    assert d.backend.syncing.wait(10)
    d.daemon.request_stop(15, None)
    deadline = time.monotonic() + 8  # JournalBackend holds a sync for 10 s at most
    while True:  # no new peer is accepted, while the sync is still held
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        probe.setblocking(False)
        try:
            probe.connect(str(tmp_path / "sock"))
        except ConnectionRefusedError:
            break
        except BlockingIOError:  # a full backlog: still listening
            pass
        finally:
            probe.close()
        assert time.monotonic() < deadline, "still listening during the stalled sync"
        time.sleep(0.01)
    assert d.daemon.group.syncs == syncs  # the sync is still held
    d.backend.hold.set()
    reply = d.reply()
    assert (reply.request_type, reply.seq, reply.error) == (RequestType.FLUSH, flush, 0)
    assert d.stop() == 0


def test_a_failure_in_a_serving_thread_stops_the_daemon_and_run_raises_it(tmp_path: Path) -> None:
    d = Running(tmp_path)
    d.call("A", RequestType.CTR, b"65536 clustered-core 1024\0")

    def broken(frame: bytes, address: object) -> None:
        raise RuntimeError("broken on purpose")

    d.daemon.on_frame = broken  # type: ignore[method-assign]
    d.send("A", RequestType.RESUME)
    d.thread.join(30)
    assert not d.thread.is_alive()
    assert isinstance(d.result[0], RuntimeError) and str(d.result[0]) == "broken on purpose"
    d.client.close()
