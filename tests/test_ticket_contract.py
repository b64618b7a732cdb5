"""A journaled backend whose ``log_flush`` returns no ticket (a plugin's missing ``return``): its
FLUSH still waits for a sync of the position after its record, never for nothing (a FLUSH answered
before its marks are durable would let the kernel write the data first). The conformance suite also
checks every journal call's ticket."""

from __future__ import annotations

from pathlib import Path

from ulog_disk.daemon.applier import Applier
from ulog_disk.daemon.loop import Daemon
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import RequestType
from ulog_disk.testing.journaled import CollectingTransport, RecordingJournal


class ForgetsTheTicket(RecordingJournal):
    """A journaled plugin whose log_flush appends but returns nothing (a missing ``return``)."""

    def log_flush(self, rec, ops):  # type: ignore[override]
        self._append("flush", list(ops))


def test_a_flush_is_never_answered_before_its_record_is_synced(tmp_path: Path) -> None:
    backend = ForgetsTheTicket(tmp_path)
    transport = CollectingTransport()
    daemon = Daemon(Applier.over(backend, boot_id="b"), transport)  # type: ignore[arg-type]
    seq = iter(range(1, 1000))

    def frame(rtype: RequestType, data: bytes = b"") -> bytes:
        return wire.encode_request(wire.Request(luid=1, uuid="A", version=3, seq=next(seq),
                                                request_type=rtype, data=data))

    daemon.on_frame(frame(RequestType.CTR, b"65536 clustered-core 1024"), "k")
    daemon.on_frame(frame(RequestType.RESUME), "k")
    daemon.wait_idle()
    daemon.on_frame(frame(RequestType.FLUSH, wire.build_u64(7)), "k")
    daemon.wait_idle()
    try:
        answered = [r for r in transport.sent if r.request_type == RequestType.FLUSH]
        assert answered, "the FLUSH was never answered"
        if answered[0].error == 0:
            assert backend.synced >= len(backend.records), \
                "FLUSH answered 0 while its journal record was never synced"
    finally:
        daemon.group.close()
        daemon.worker.close()
