"""What a restart rebuilds for one stored instance: the rule, once, with no I/O.

A restart finds each instance as its store holds it (its record with the recovery cursor, its
``clean`` and ``sync`` bitmaps as of its last checkpoint) and, from the journal, the ops recorded
for it since that checkpoint and whether the journal is damaged there. What it serves is:

1. the stored bitmaps with those ops **replayed** over them, in order, by the rules that applied
   when they were answered (:meth:`RegionLog.replay`);
2. then, if the journal is damaged, **every region dirty and out of sync**
   (:meth:`RegionLog.distrust_all`): what was answered since the checkpoint is unknown and the
   kernel will not send it again, so no region may read as clean or in sync;
3. for an instance of the current boot (its kernel lives on and will go on asking), **recovery
   restarted**: no region is being recovered, the search for resync work resumes at the stored
   cursor.

An instance of an earlier boot is only a candidate for hand-over (its kernel is gone, its luid
may be reused by an unrelated log): its state is steps 1 and 2, as a :class:`StoredState`.

Who uses it: the engine's restore (:func:`rebuild`, :func:`handover_candidate`); the LMDB
backend, which writes an earlier boot's instance back with its journal folded in
(:func:`needs_recovery_checkpoint`, :func:`handover_candidate`) and migrates a layout-1/2 store's
per-instance journal files (:func:`replayed`); ``ulog-dump`` and ``ulog-recover``, which show the
state a restart would serve (:func:`replayed`). Which ops and which damage apply to an instance
is the store reader's part (``backends.lmdb_reader.plan_replay``); this module takes them as
given.

Pure: no clock, no files, no threads; the inputs are never changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .records import StoredInstance, StoredState
from .regionlog import RegionLog


@dataclass(slots=True)
class Rebuilt:
    """The state a restart serves for one instance."""

    #: The region log: the stored bitmaps with the journal replayed (and distrusted when the
    #: journal is damaged). Its changed chunks are marked dirty, so the next checkpoint writes
    #: exactly what the store does not hold yet.
    log: RegionLog
    #: Journal ops applied (ops for regions past the log are skipped and not counted).
    replayed: int
    #: Why every region was taken as dirty and out of sync (the journal's damage), or None.
    distrusted: str | None


def replayed(region_count: int, clean: bytes, sync: bytes, ops: Iterable[tuple[int, int]],
             damaged: str | None) -> Rebuilt:
    """Steps 1 and 2 of the rule: ``ops`` replayed over the bitmaps, then, when ``damaged``
    says why the journal cannot be trusted, every region dirty and out of sync."""
    log = RegionLog.from_bitmaps(region_count, clean, sync)
    count = log.replay(ops)
    if damaged is not None:
        log.distrust_all()
    return Rebuilt(log, count, damaged)


def rebuild(stored: StoredInstance) -> Rebuilt:
    """The log a restart serves for an instance of the current boot: replayed, distrusted if the
    journal is damaged, recovery restarted at the stored cursor."""
    rec = stored.record
    out = replayed(rec.region_count, stored.clean, stored.sync, stored.journal, stored.journal_damaged)
    out.log.restart_recovery()
    out.log.cursor = rec.cursor
    return out


def handover_candidate(stored: StoredInstance) -> StoredState:
    """The state of an instance of an earlier boot, as the hand-over rule sees it (a gone state,
    :mod:`ulog_disk.log.lifecycle`): replayed, distrusted if the journal is damaged."""
    rec = stored.record
    log = replayed(rec.region_count, stored.clean, stored.sync, stored.journal, stored.journal_damaged).log
    return StoredState(uuid=rec.uuid, generation=rec.generation, region_count=rec.region_count,
                       clean=log.clean.tobytes(), sync=log.sync.tobytes(), source_luid=rec.luid,
                       committed_at=rec.committed_at)


def of_earlier_boot(stored: StoredInstance, boot_id: str) -> bool:
    """Whether the instance's kernel is gone: it was recorded under another boot."""
    return stored.record.boot_id != boot_id


def needs_recovery_checkpoint(stored: StoredInstance, boot_id: str) -> bool:
    """Whether a restart writes the instance back at once (a *recovery checkpoint*): an instance
    of an earlier boot whose journal ops or journal damage its store does not hold yet. Its state
    can no longer change (its kernel is gone), so once its :func:`handover_candidate` is stored,
    no later start depends on those journal records and the journal may be cut past them; an
    instance of this boot keeps them until its next checkpoint."""
    return of_earlier_boot(stored, boot_id) and bool(stored.journal or stored.journal_damaged)


__all__ = ["Rebuilt", "handover_candidate", "needs_recovery_checkpoint", "of_earlier_boot", "rebuild",
           "replayed"]
