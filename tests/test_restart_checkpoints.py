"""When a restart's replayed instances are written back to their stores (``Applier.checkpoint_due``).

What a restart replays from the journal is durable there, in segments an earlier run wrote; the
restarted daemon journals into a new segment after them. The span rule (a checkpoint once the
journal since an instance's first unstored change passes ``span`` bytes) counts only what this
start wrote, so the replayed instances do not all fall due the moment the daemon is ready (they
would compete with the reconnecting mirrors' group commits); they are written when the daemon is
idle, at the checkpoint age, or once this start's journal passes the span, as any change is."""

from __future__ import annotations

from test_handover import UUID, checkpoint_all, live_instance_with_traffic, start, stop

from ulog_disk.daemon.applier import Applier
from ulog_disk.protocol.wire import RequestType

AGE = 10.0


def due(applier: Applier, span: int, idle: bool = False, later: float = 0.0) -> object:
    return applier.checkpoint_due(applier.monotonic() + later, AGE, span, idle)


def restarted(tmp_path) -> tuple[Applier, object]:
    """A live instance whose marks are in the journal only, then a kill -9 and a restart."""
    engine, k = start(tmp_path)
    live_instance_with_traffic(k, 1)
    assert engine.unstored
    stop(engine)
    return start(tmp_path)


def test_replayed_instances_are_not_due_by_span_when_the_daemon_is_ready(tmp_path):
    engine, _k = restarted(tmp_path)
    [(key, (first, _since))] = engine.unstored.items()
    assert engine.backend.position() - first > 1  # the journal since them, counted across the restart
    assert engine.started_at == engine.backend.position()
    assert due(engine, span=1) is None  # this start has written nothing yet
    assert due(engine, span=1, idle=True) == key
    assert due(engine, span=1 << 40, later=AGE) == key
    stop(engine)


def test_replayed_instances_fall_due_once_this_start_journals_past_the_span(tmp_path):
    engine, k = restarted(tmp_path)
    [key] = engine.unstored
    k.ctr(None, 2)  # another mirror: its CTR is journaled by this start
    k.resume(2)
    k.mark([7], 2)
    k.flush(luid=2)
    written = engine.backend.position() - engine.started_at
    assert written > 0
    assert due(engine, span=written + 1) is None
    assert due(engine, span=written) == key
    stop(engine)


def test_replayed_state_is_written_back_by_the_deferred_checkpoints(tmp_path):
    """Deferred, not dropped: the checkpoints write what was replayed, and a third start finds it
    in the store with nothing left to replay."""
    engine, k = restarted(tmp_path)
    before = engine.table[(UUID, 1)].log.clean.tobytes()
    checkpoint_all(engine)
    assert not engine.unstored
    stop(engine)
    engine, k = start(tmp_path)
    assert not engine.unstored  # nothing replayed: the store holds it
    assert engine.table[(UUID, 1)].log.clean.tobytes() == before
    k.ok(RequestType.POSTSUSPEND, luid=1)
    stop(engine)
