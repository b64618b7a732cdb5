"""A RESUME or POSTSUSPEND whose journal event append fails.

The step's store commit carries what the record missed, so it closes the journal gap when it
succeeds; and the success is answered only after the engine has put the log's health back to A
(a STATUS_INFO right after the reply must not read D).
"""

from __future__ import annotations

import pytest

from ulog_disk.daemon.applier import Applier, Waiting, answered_early
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import Request, RequestType
from ulog_disk.testing.journaled import RecordingJournal

T = RequestType
UUID, LUID = "LVM-review", 1
DISK = b"32768 clustered-disk 7:3 1024"  # a disk log: STATUS_INFO shows the health


class Driver:
    def __init__(self, tmp_path):
        self.backend = RecordingJournal(tmp_path)
        self.applier = Applier.over(self.backend, boot_id="boot")
        self.seq = 0

    def request(self, kind: RequestType, data: bytes = b"") -> Request:
        self.seq += 1
        return Request(luid=LUID, uuid=UUID, version=3, seq=self.seq, request_type=kind, data=data)

    def now(self, kind: RequestType, data: bytes = b"") -> wire.Reply:
        return self.applier.handle_now(self.request(kind, data))

    def status(self) -> bytes:
        reply = self.applier.handle(self.request(T.STATUS_INFO))
        assert isinstance(reply, wire.Reply)
        return reply.data

    def up(self) -> None:
        # The initial CTR's string has no NUL (a NUL-terminated one is the kernel's reconnect).
        assert self.now(T.CTR, DISK).error == 0
        assert self.now(T.RESUME).error == 0

    def event_fails(self, kind: RequestType) -> Waiting:
        """The step of ``kind``, its journal event append failing (a full disk, an I/O error)."""
        self.backend.fail_event = True
        try:
            waiting = self.applier.handle(self.request(kind))
        finally:
            self.backend.fail_event = False
        assert isinstance(waiting, Waiting)
        return waiting


def _suspend(d: Driver) -> RequestType:
    assert d.now(T.PRESUSPEND).error == 0
    return T.POSTSUSPEND


def _resume(d: Driver) -> RequestType:
    _suspend(d)
    assert d.now(T.POSTSUSPEND).error == 0
    return T.RESUME


@pytest.mark.parametrize("prepare", [_suspend, _resume], ids=["POSTSUSPEND", "RESUME"])
def test_no_success_reply_goes_out_while_the_health_is_still_d(tmp_path, prepare):
    """As the daemon runs it: the store worker runs the job and, if the step gave a reply, sends
    it at once; the loop may serve the kernel's next STATUS_INFO before it drains the completion.
    Before the change that reply only went out after the completion set the health back to A."""
    d = Driver(tmp_path)
    d.up()
    waiting = d.event_fails(prepare(d))
    assert waiting.job is not None
    waiting.job()  # the store worker
    if answered_early(waiting.reply, None):
        # The reply is out; what the kernel sees if it asks now (dmsetup status after resume):
        assert d.status() == b"3 clustered-disk 7:3 A\0", \
            "the success reply went out while STATUS_INFO still answers health D"
    d.applier.completed(waiting, None)  # the loop, at its next turn
    assert d.status() == b"3 clustered-disk 7:3 A\0"


@pytest.mark.parametrize("prepare", [_suspend, _resume], ids=["POSTSUSPEND", "RESUME"])
def test_the_commit_covers_the_event_that_missed_the_journal(tmp_path, prepare):
    """The commit writes the instance's whole change after the failed event append: the journal
    is whole again, so the next FLUSH syncs the journal (no store write on its path), as before."""
    d = Driver(tmp_path)
    d.up()
    waiting = d.event_fails(prepare(d))
    reply = d.applier.complete_now(waiting)
    assert reply is not None and reply.error == 0
    assert d.applier.table[(UUID, LUID)].journal_gap is False
    commits = len(d.backend.commits)
    flush = d.applier.handle(d.request(T.FLUSH))
    assert isinstance(flush, Waiting) and flush.durable_at is not None, "the FLUSH went to the store"
    assert len(d.backend.commits) == commits
