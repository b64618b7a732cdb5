"""The restore rule (``ulog_disk.log.restore``): replay, then distrust when the journal is damaged;
recovery restarted for the current boot; a hand-over candidate for an earlier boot.

The rule is checked against a model written here region by region (lists of booleans, no
bitarray), for any bitmaps and any ops."""

from __future__ import annotations

import ast
import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from ulog_disk.log import restore
from ulog_disk.log.records import (
    OP_CLEAR,
    OP_MARK,
    OP_SET_NOSYNC,
    OP_SET_SYNC,
    InstanceRecord,
    StoredInstance,
    StoredState,
)
from ulog_disk.log.regionlog import CHUNK_BITS, CHUNK_BYTES, chunk_count

T = TypeVar("T")

BOOT = "boot-now"
EARLIER = "boot-before"


def record(region_count: int, boot_id: str = BOOT, cursor: int = 0, generation: int = 3,
           luid: int = 7) -> InstanceRecord:
    return InstanceRecord(uuid="LVM-r", luid=luid, ctr=f"{region_count * 8} core 8", log_type="core",
                          region_size=8, region_count=region_count, state="live", generation=generation,
                          cursor=cursor, boot_id=boot_id, resumed=True, committed_at=12.5)


def bits_of(data: bytes, count: int) -> list[bool]:
    return [bool(data[r // 8] >> (r % 8) & 1) for r in range(count)]


def leaving_alone(rule: Callable[[StoredInstance], T], stored: StoredInstance) -> T:
    """``rule(stored)``, checking that the rule leaves its input alone: the backend's restore and
    the tools read the same stored instance after it."""
    before = copy.deepcopy(stored)
    out = rule(stored)
    assert stored == before, f"{rule.__name__} changed its input"
    return out


def model(count: int, clean: bytes, sync: bytes, ops: list[tuple[int, int]],
          damaged: bool) -> tuple[list[bool], list[bool], int]:
    """The rule, region by region: MARK makes a region dirty; CLEAR makes it clean only if it is in
    sync; SET_REGION_SYNC sets its sync bit; an op past the log is skipped; damage: all dirty, all
    out of sync."""
    c, s = bits_of(clean, count), bits_of(sync, count)
    applied = 0
    for op, r in ops:
        if not 0 <= r < count:
            continue
        applied += 1
        if op == OP_MARK:
            c[r] = False
        elif op == OP_CLEAR:
            c[r] = c[r] or s[r]
        elif op in (OP_SET_SYNC, OP_SET_NOSYNC):
            s[r] = op == OP_SET_SYNC
    if damaged:
        c, s = [False] * count, [False] * count
    return c, s, applied


@st.composite
def stored_instances(draw, boot_id: str | None = None) -> StoredInstance:
    count = draw(st.sampled_from([1, 7, 8, 9, 100, CHUNK_BITS + 3]))
    size = (count + 7) // 8
    pad = size * 8 - count

    def bitmap() -> bytes:
        kind = draw(st.sampled_from(["zeros", "ones", "random"]))
        data = bytearray(size) if kind == "zeros" else bytearray(b"\xff" * size) if kind == "ones" \
            else bytearray(draw(st.binary(min_size=size, max_size=size)))
        if pad:
            data[-1] &= 0xFF >> pad  # the engine's padding bits are 0
        return bytes(data)

    regions = st.one_of(st.integers(0, count - 1), st.integers(count, count + 5))
    ops = draw(st.lists(st.tuples(st.sampled_from([OP_MARK, OP_CLEAR, OP_SET_SYNC, OP_SET_NOSYNC]), regions),
                        max_size=40))
    damaged = draw(st.one_of(st.none(), st.just("the journal is damaged at positions 1-2 (test)")))
    rec = record(count, boot_id=boot_id or draw(st.sampled_from([BOOT, EARLIER])),
                 cursor=draw(st.integers(0, count)))
    return StoredInstance(record=rec, clean=bitmap(), sync=bitmap(), journal=ops, journal_damaged=damaged,
                          replayed_from=100 if ops or damaged else None)


@settings(max_examples=300, deadline=None)
@given(stored_instances(boot_id=BOOT))
def test_rebuild_replays_then_distrusts_and_restarts_recovery(stored: StoredInstance) -> None:
    rec = stored.record
    out = leaving_alone(restore.rebuild, stored)
    want_clean, want_sync, applied = model(rec.region_count, stored.clean, stored.sync, stored.journal,
                                           stored.journal_damaged is not None)
    log = out.log
    assert bits_of(log.clean.tobytes(), rec.region_count) == want_clean
    assert bits_of(log.sync.tobytes(), rec.region_count) == want_sync
    assert out.replayed == applied
    assert out.distrusted == stored.journal_damaged
    # Recovery restarted: nothing handed out, the stored cursor, a consistent log.
    assert (log.recovering, log.cursor, log.first_unsynced_hint) == (None, rec.cursor, 0)
    assert log.region_count == rec.region_count and log.check() == []


@settings(max_examples=200, deadline=None)
@given(stored_instances())
def test_every_chunk_the_rebuild_changed_is_written_by_the_next_checkpoint(stored: StoredInstance) -> None:
    """What the journal changed is in the journal only: the rebuilt log's dirty chunks cover every
    chunk that differs from the store."""
    rec = stored.record
    log = restore.rebuild(stored).log
    clean, sync = log.clean.tobytes(), log.sync.tobytes()
    for index in range(chunk_count(rec.region_count)):
        part = slice(index * CHUNK_BYTES, (index + 1) * CHUNK_BYTES)
        if clean[part] != stored.clean[part]:
            assert index in log.dirty_clean_chunks
        if sync[part] != stored.sync[part]:
            assert index in log.dirty_sync_chunks


@settings(max_examples=200, deadline=None)
@given(stored_instances(boot_id=EARLIER))
def test_an_earlier_boot_gives_a_handover_candidate_by_the_same_rule(stored: StoredInstance) -> None:
    rec = stored.record
    state = leaving_alone(restore.handover_candidate, stored)
    log = leaving_alone(restore.rebuild, stored).log
    assert (state.clean, state.sync) == (log.clean.tobytes(), log.sync.tobytes())
    assert state == StoredState(uuid=rec.uuid, generation=rec.generation, region_count=rec.region_count,
                                clean=state.clean, sync=state.sync, source_luid=rec.luid,
                                committed_at=rec.committed_at)
    # What the backend's recovery checkpoint relies on: the candidate written back, with its
    # journal gone and the damage still noted, is the same candidate again.
    written = dataclasses.replace(stored, clean=state.clean, sync=state.sync, journal=[], replayed_from=None)
    assert restore.handover_candidate(written) == state


@given(stored_instances())
def test_a_recovery_checkpoint_is_for_an_earlier_boot_with_something_to_fold(stored: StoredInstance) -> None:
    earlier = stored.record.boot_id != BOOT
    assert restore.of_earlier_boot(stored, BOOT) == earlier
    assert restore.needs_recovery_checkpoint(stored, BOOT) == (
        earlier and (bool(stored.journal) or stored.journal_damaged is not None))


def test_damage_distrusts_even_with_nothing_to_replay() -> None:
    count = 20
    stored = StoredInstance(record=record(count, cursor=5), clean=b"\xff\xff\x0f", sync=b"\xff\xff\x0f",
                            journal_damaged="its store has no checkpoint record")
    out = restore.rebuild(stored)
    assert (out.replayed, out.distrusted) == (0, "its store has no checkpoint record")
    assert out.log.clean.count(1) == 0 and out.log.sync_count == 0 and out.log.cursor == 5
    assert out.log.dirty_clean_chunks == {0} and out.log.dirty_sync_chunks == {0}


def test_replayed_is_the_rule_without_an_instance() -> None:
    """What the layout-1/2 migration and the tools call: bitmaps and ops, no record."""
    ops = [(OP_MARK, 2), (OP_MARK, 3), (OP_SET_NOSYNC, 3), (OP_CLEAR, 3), (OP_MARK, 99)]
    out = restore.replayed(10, b"\xff\x03", b"\xff\x03", ops, None)
    # Region 3 fell out of sync before its CLEAR: it stays dirty. The op past the log is skipped.
    assert out.replayed == 4 and out.distrusted is None
    assert bits_of(out.log.clean.tobytes(), 10) == [r not in (2, 3) for r in range(10)]
    assert bits_of(out.log.sync.tobytes(), 10) == [r != 3 for r in range(10)]


def test_the_module_does_no_io() -> None:
    """Pure: it imports no os, time, threading, lmdb or socket, and opens nothing."""
    tree = ast.parse(Path(restore.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "open"
    assert not imported & {"os", "time", "threading", "lmdb", "socket", "select", "io", "pathlib"}, imported
