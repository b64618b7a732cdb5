"""What a backend is: the persistence of log instances, like the kernel's ``dm_dirty_log_type``.

The engine keeps every instance's state in memory and decides everything (hand-over, retention,
lifecycle). A backend only stores what it is told and gives it back after a restart. Its calls:

=====================  ==========================================================================
``restore()``          at start-up: every instance this backend still holds (any boot), so the
                       engine can rebuild its table; plus, per uuid, the retained state.
``record(rec)``        after CTR: the instance's identity, constructor and geometry (no bitmaps).
                       Need not be durable by itself; the next commit makes it so.
``journal(key, ops)``  MARK/CLEAR/SET_REGION_SYNC just applied: keep them so that a *daemon*
                       crash (kernel alive) loses nothing that was answered. Not durable against
                       a host crash (need not be, the kernel's state dies with the host).
``commit(c)``          the durable point (FLUSH, RESUME, POSTSUSPEND, stop): when it returns, the
                       changed chunks and meta of the commit are on stable storage.
``drop(key, retain)``  DTR: remove the instance; with ``retain``, first keep its state as the
                       uuid's retained state (one transaction).
``release(uuid)``      the uuid has no instance left in the daemon: resources held for it
                       (open files, maps) may go; a later call for the uuid reopens them.
``close()``            stop.
=====================  ==========================================================================

A backend raises :class:`BackendError` for any I/O failure; the engine answers -EIO and keeps
the uncommitted changes for the next commit.

Calls for one uuid come from one thread at a time, in order; calls for different uuids may come
from different threads at once.
"""

from __future__ import annotations

import abc
import importlib.metadata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

ENTRY_POINT_GROUP = "ulog_disk.backends"

# Journal operation codes (see formats/store.md).
OP_MARK = 1
OP_CLEAR = 2
OP_SET_SYNC = 3
OP_SET_NOSYNC = 4


class BackendError(OSError):
    """A backend failed to persist or load; ``errno`` says why when known."""


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
class Commit:
    """One durable write of an instance: meta plus the bitmap chunks that changed.

    ``resized`` means the region count changed (hand-over or first commit): chunks at and past
    ``chunk_count(record.region_count)`` must be deleted.
    """

    record: InstanceRecord
    clean_chunks: dict[int, bytes]
    sync_chunks: dict[int, bytes]
    resized: bool = False


@dataclass(slots=True)
class StoredInstance:
    """An instance as read back: its record, whole bitmaps, and journal ops since its commit."""

    record: InstanceRecord
    clean: bytes
    sync: bytes
    journal: list[tuple[int, int]] = field(default_factory=list)
    #: Why the journal could not be read (answered MARKs may be missing), or None.
    journal_damaged: str | None = None


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


class Backend(abc.ABC):
    name: ClassVar[str]
    #: True when ``commit`` survives a host crash (the memory backend's does not).
    durable: ClassVar[bool] = True

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)

    @abc.abstractmethod
    def restore(self) -> Restored: ...

    @abc.abstractmethod
    def record(self, rec: InstanceRecord) -> None: ...

    def journal(self, uuid: str, luid: int, ops: Iterable[tuple[int, int]]) -> None:  # noqa: B027
        """Default: no journal (a daemon crash loses answered, uncommitted changes)."""

    @abc.abstractmethod
    def commit(self, commit: Commit) -> None: ...

    @abc.abstractmethod
    def drop(self, uuid: str, luid: int, retain: StoredState | None) -> None: ...

    def after_commit(self, uuid: str, luid: int) -> None:  # noqa: B027 - optional hook
        """Called after a successful :meth:`commit` once its reply is on its way (tidying that
        need not delay the FLUSH), before any other call for the uuid."""

    def release(self, uuid: str) -> None:  # noqa: B027 - optional hook
        """Default: nothing is held per uuid."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything; called once at stop."""


def available_backends() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_backend(name: str) -> type[Backend]:
    """Find a backend class by its entry point name; unknown names list what is installed."""
    found = available_backends()
    if name not in found:
        names = ", ".join(sorted(found)) or "none"
        raise LookupError(f"no backend named {name!r}; installed backends: {names}")
    cls = found[name].load()
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise LookupError(f"entry point {name!r} ({found[name].value}) is not a Backend subclass")
    return cls
