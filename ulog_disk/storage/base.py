"""What a backend is: the persistence of log instances, like the kernel's ``dm_dirty_log_type``.

The engine keeps every instance's state in memory and decides everything (hand-over, retention,
lifecycle). A backend only stores what it is told and gives it back after a restart.

Two kinds of calls: the **journal** calls run on the request loop and never wait for the disk
(each returns the journal position after what it appended, a *ticket*), except ``sync``, which
runs on the group-commit thread; the **store** calls run on the store worker, one at a time, in
the order the engine made them. Each method says what it must guarantee; ``docs/backends.md``
says it at length, with a minimal backend and the conformance suite every backend must pass.

A backend raises :class:`BackendError` for any I/O failure; the engine answers -EIO, or marks
the log's health, and keeps whatever was not stored for the next attempt. The ``memory`` backend
keeps nothing; its tickets are always durable. A backend that sets ``journaled = False`` (the
default, for plugins written before the journal) implements the store calls only: every FLUSH
is then a ``commit`` on the store worker.
"""

from __future__ import annotations

import abc
import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

# A backend plugin needs this one module: the values it stores and returns are the log layer's.
from ..log.records import (
    OP_CLEAR,
    OP_MARK,
    OP_SET_NOSYNC,
    OP_SET_SYNC,
    InstanceRecord,
    Restored,
    StoredInstance,
    StoredState,
)

#: Plugins register under this group (its name predates the storage package and stays).
ENTRY_POINT_GROUP = "ulog_disk.backends"


class BackendError(OSError):
    """A backend failed to persist or load; ``errno`` says why when known."""


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
    #: The journal position of this state: every journal record of the instance before it is
    #: in it, every one at or after it is not. None: the journal's end (a tool's write).
    position: int | None = None


class Backend(abc.ABC):
    name: ClassVar[str]
    #: True when a synced ticket survives a host crash (the memory backend's do not).
    durable: ClassVar[bool] = True
    #: True when the backend implements the journal calls. A backend that does not (the
    #: interface before the journal) gets a ``commit`` for every FLUSH, as before.
    journaled: ClassVar[bool] = False

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)

    # --- journal calls (request loop; never wait for the disk) --------------------------------

    def log_ops(self, uuid: str, luid: int, ops: Sequence[tuple[int, int]]) -> int:
        """MARK/CLEAR/SET_REGION_SYNC just applied: kept so that a *daemon* crash loses nothing
        answered (a host crash may lose it, until a sync). Default: no journal (a daemon crash
        loses answered, uncommitted changes)."""
        return 0

    def log_flush(self, rec: InstanceRecord, ops: Sequence[tuple[int, int]]) -> int:
        """A FLUSH of ``rec``'s instance, with its integrated marks ``ops``: the commit point; the
        FLUSH is answered once ``sync()`` has reached the ticket."""
        return 0

    def log_event(self, rec: InstanceRecord, event: int) -> int:
        """A lifecycle request (CTR, RESUME, POSTSUSPEND, DTR…), for the record; its store write
        follows."""
        return 0

    def position(self) -> int:
        """The ticket of everything appended so far."""
        return 0

    def sync(self) -> int:
        """Make every ticket handed out so far durable, one sync for every FLUSH waiting (the
        group-commit thread); returns the position now durable. Raises BackendError; the next
        call tries again."""
        return self.position()

    def durable_position(self) -> int:
        """The position known durable (no waiting)."""
        return self.position()

    # --- store calls (store worker) --------------------------------------------------------------

    @abc.abstractmethod
    def restore(self, boot_id: str) -> Restored:
        """At start-up: every instance still held (any boot), its bitmaps and the journal ops to
        replay after them; each uuid's retained state; the uuids whose store is damaged."""

    @abc.abstractmethod
    def record(self, rec: InstanceRecord, position: int | None = None,
               retain: StoredState | None = None) -> None:
        """After CTR: the instance's identity, constructor and geometry, as of journal
        ``position``; with ``retain`` (the state of an earlier boot's instance whose luid the CTR
        reuses, decided by the engine), first keep that as the uuid's retained state, in the same
        transaction."""

    @abc.abstractmethod
    def commit(self, commit: Commit) -> None:
        """A durable write of one instance's changed chunks and meta (a checkpoint; RESUME,
        POSTSUSPEND and stop wait for theirs before answering)."""

    @abc.abstractmethod
    def drop(self, uuid: str, luid: int, retain: StoredState | None, position: int | None = None) -> None:
        """DTR: remove the instance; with ``retain``, first keep that state as the uuid's
        retained state (one transaction)."""

    def release(self, uuid: str) -> None:  # noqa: B027 - optional hook
        """The uuid has no instance left in the daemon: what is held for it may go. Default:
        nothing is held per uuid."""

    def maintain(self, needed: int) -> None:  # noqa: B027 - optional hook
        """Housekeeping off the request path: every journal record below ``needed`` is in the
        stores (the journal may be cut there); prepare what the next appends need. Default:
        nothing to tidy."""

    def maintenance_due(self) -> bool:
        """Whether :meth:`maintain` has work beyond cutting (asked on the loop, cheap)."""
        return False

    def writes_must_wait(self) -> bool:
        """Whether a request that writes must wait until :meth:`maintain` has run: the journal
        would otherwise need a segment made on the loop. Asked on the loop before each such
        request (cheap, no I/O); the daemon holds them meanwhile. Default: never."""
        return False

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


__all__ = [
    "ENTRY_POINT_GROUP", "OP_CLEAR", "OP_MARK", "OP_SET_NOSYNC", "OP_SET_SYNC", "Backend", "BackendError",
    "Commit", "InstanceRecord", "Restored", "StoredInstance", "StoredState", "available_backends",
    "load_backend",
]
