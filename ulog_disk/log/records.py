"""What an instance's state is, as data: the values the engine hands to storage (a record of an
instance, a state left behind) and gets back from it at a restart, and the region operation
codes that the journal records and a restart replays.

The log layer's vocabulary, below storage: the engine and the restart rule use these without
knowing any backend, and every backend stores and reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Region operation codes: what a journal record carries and a restart replays (formats/store.md,
#: formats/journal.md).
OP_MARK = 1
OP_CLEAR = 2
OP_SET_SYNC = 3
OP_SET_NOSYNC = 4



@dataclass(slots=True)
class InstanceRecord:
    """Everything about an instance except its bitmaps."""

    uuid: str
    luid: int
    ctr: str
    log_type: str
    region_size: int
    region_count: int
    state: str
    generation: int
    cursor: int
    boot_id: str
    resumed: bool = False
    #: Another instance adopted this one's state; it must never become the uuid's newest again.
    superseded: bool = False
    #: Unix time of the last commit (0 before the first).
    committed_at: float = 0.0


@dataclass(slots=True)
class StoredInstance:
    """An instance as read back: its record, whole bitmaps, and journal ops since its commit."""

    record: InstanceRecord
    clean: bytes
    sync: bytes
    journal: list[tuple[int, int]] = field(default_factory=list)
    #: Why the journal could not be read (answered MARKs may be missing), or None.
    journal_damaged: str | None = None
    #: Journal position of the first record replayed (the instance has state that is not in
    #: its store yet until a checkpoint), or None when nothing was replayed.
    replayed_from: int | None = None


@dataclass(slots=True)
class StoredState:
    """The retained state of a uuid: what its last instance left behind at DTR."""

    uuid: str
    generation: int
    region_count: int
    clean: bytes
    sync: bytes
    source_luid: int
    committed_at: float = 0.0


@dataclass(slots=True)
class Restored:
    instances: list[StoredInstance] = field(default_factory=list)
    retained: dict[str, StoredState] = field(default_factory=dict)
    #: uuids whose store could not be opened or verified: their logs start from a full resync.
    damaged: dict[str, str] = field(default_factory=dict)
