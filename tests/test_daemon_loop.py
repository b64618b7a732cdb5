"""The request loop's choice of where a backend job runs, and when its tidying runs.

No timing is asserted: job times are set, not measured, and the order of backend calls is what
is checked.
"""

from __future__ import annotations

import selectors
from pathlib import Path

from ulog_disk import wire
from ulog_disk.backends.base import Commit
from ulog_disk.backends.memory import MemoryBackend
from ulog_disk.daemon import INLINE_JOB_LIMIT, Daemon, Lanes
from ulog_disk.engine import Engine, Pending
from ulog_disk.wire import RequestType


class RecordingBackend(MemoryBackend):
    def __init__(self, state_dir: Path):
        super().__init__(state_dir)
        self.calls: list[str] = []

    def journal(self, uuid, luid, ops) -> None:
        self.calls.append(f"journal {uuid}")

    def commit(self, commit: Commit) -> None:
        self.calls.append(f"commit {commit.record.uuid}")

    def after_commit(self, uuid: str, luid: int) -> None:
        self.calls.append(f"after_commit {uuid}")


class CollectingTransport:
    name = "test"

    def __init__(self) -> None:
        self.sent: list[wire.DecodedReply] = []

    def send(self, payload: bytes, address: object) -> None:
        self.sent.append(wire.decode_reply(payload))


def make_daemon(tmp_path: Path) -> tuple[Daemon, RecordingBackend, CollectingTransport]:
    backend = RecordingBackend(tmp_path)
    transport = CollectingTransport()
    daemon = Daemon(Engine(backend, boot_id="b"), transport)  # type: ignore[arg-type]
    daemon.selector.register(daemon.lanes.wake_r, selectors.EVENT_READ, "lanes")  # as run() does
    return daemon, backend, transport


SEQ = iter(range(1, 1 << 30))


def frame(uuid: str, rtype: RequestType, data: bytes = b"") -> bytes:
    return wire.encode_request(wire.Request(luid=1, uuid=uuid, version=3, seq=next(SEQ),
                                            request_type=rtype, data=data))


def open_log(daemon: Daemon, uuid: str) -> None:
    daemon.alone = False
    daemon.on_frame(frame(uuid, RequestType.CTR, b"65536 clustered-core 1024\0"), None)
    daemon.on_frame(frame(uuid, RequestType.RESUME), None)
    daemon.wait_lanes()


def test_job_times_are_a_moving_average_and_unknown_uuids_are_not_fast() -> None:
    lanes = Lanes(lambda reply, address: None)
    job = Pending("u", lambda: None, lambda exc: None)  # type: ignore[arg-type,return-value]
    assert not lanes.fast("u")
    lanes.timed(job, INLINE_JOB_LIMIT / 10)
    assert lanes.fast("u")
    for _ in range(3):
        lanes.timed(job, INLINE_JOB_LIMIT * 10)
    assert not lanes.fast("u")  # a disk that turned slow moves the uuid's jobs back to a worker
    quick = Pending("q", lambda: None, lambda exc: None, quick=True)  # type: ignore[arg-type,return-value]
    lanes.timed(quick, 0.0)
    assert "q" not in lanes.job_seconds  # journal writes never wait for the disk: not counted
    lanes.close()


def test_a_commit_runs_in_the_loop_only_when_that_delays_nobody(tmp_path: Path) -> None:
    daemon, backend, _ = make_daemon(tmp_path)
    open_log(daemon, "A")
    commit = Pending("A", lambda: None, lambda exc: None)  # type: ignore[arg-type,return-value]
    journal = Pending("A", lambda: None, lambda exc: None, quick=True)  # type: ignore[arg-type,return-value]
    daemon.lanes.job_seconds["A"] = INLINE_JOB_LIMIT / 10
    daemon.alone = True
    assert daemon.may_run_inline(commit) and daemon.may_run_inline(journal)
    daemon.alone = False  # other requests came with it
    assert not daemon.may_run_inline(commit) and daemon.may_run_inline(journal)
    daemon.alone = True
    daemon.lanes.job_seconds["A"] = INLINE_JOB_LIMIT * 2  # a slow store
    assert not daemon.may_run_inline(commit)
    daemon.lanes.job_seconds["A"] = INLINE_JOB_LIMIT / 10
    daemon.lanes.inflight["B"] = 1  # another uuid's job is running on its worker
    assert not daemon.may_run_inline(commit) and daemon.may_run_inline(journal)
    daemon.lanes.inflight["A"] = 1  # this uuid's own lane is busy: everything queues behind it
    assert not daemon.may_run_inline(journal)
    daemon.lanes.inflight.clear()
    daemon.lanes.close()


def test_tidying_after_an_inline_commit_waits_but_precedes_the_uuids_next_job(tmp_path: Path) -> None:
    daemon, backend, transport = make_daemon(tmp_path)
    for uuid in ("A", "B"):
        open_log(daemon, uuid)
        daemon.lanes.job_seconds[uuid] = INLINE_JOB_LIMIT / 10
    backend.calls.clear()
    transport.sent.clear()
    daemon.alone = True
    daemon.on_frame(frame("A", RequestType.FLUSH, wire.build_u64(3)), None)
    # Answered at once, in the loop; the journal reset is still to do.
    assert [r.error for r in transport.sent] == [0]
    assert backend.calls == ["commit A"] and set(daemon.deferred) == {"A"}
    daemon.on_frame(frame("B", RequestType.MARK_REGION, wire.build_u64(4)), None)
    assert backend.calls == ["commit A", "journal B"]  # another uuid's request is not delayed
    daemon.on_frame(frame("A", RequestType.MARK_REGION, wire.build_u64(5)), None)
    assert backend.calls == ["commit A", "journal B", "after_commit A", "journal A"]
    assert not daemon.deferred
    daemon.on_frame(frame("B", RequestType.FLUSH), None)
    daemon.run_deferred()  # what the loop does when nothing is readable
    assert backend.calls[-2:] == ["commit B", "after_commit B"]
    assert [r.error for r in transport.sent] == [0, 0, 0, 0]
    daemon.lanes.close()
