"""A journaled backend for the engine's and the daemon's tests: the memory backend with its
journal kept as a list (a record's position is its number), its durable point moved by ``sync``,
its store commits kept, and failures to inject. It keeps nothing across a restart. And a
transport that keeps every reply the daemon sends, decoded (:class:`CollectingTransport`)."""

from __future__ import annotations

import errno
import threading
from collections.abc import Sequence
from pathlib import Path

from ..protocol import wire
from ..storage.base import BackendError, Commit, InstanceRecord
from ..storage.memory import MemoryBackend


class RecordingJournal(MemoryBackend):
    journaled = True

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir)
        #: What was appended, in order: ("ops" or "flush", the ops) or ("event", the event code).
        self.records: list[tuple[str, object]] = []
        #: The durable point: the records up to it were synced.
        self.synced = 0
        self.commits: list[Commit] = []
        #: Failures to inject (BackendError EIO): every append, event appends only, sync, commit.
        self.fail_journal = False
        self.fail_event = False
        self.fail_sync = False
        self.fail_commit = False

    def _append(self, what: str, item: object) -> int:
        if self.fail_journal or (self.fail_event and what == "event"):
            raise BackendError(errno.EIO, "injected journal failure")
        self.records.append((what, item))
        return len(self.records)

    def log_ops(self, uuid: str, luid: int, ops: Sequence[tuple[int, int]]) -> int:
        return self._append("ops", list(ops))

    def log_flush(self, rec: InstanceRecord, ops: Sequence[tuple[int, int]]) -> int:
        return self._append("flush", list(ops))

    def log_event(self, rec: InstanceRecord, event: int) -> int:
        return self._append("event", event)

    def position(self) -> int:
        return len(self.records)

    def durable_position(self) -> int:
        return self.synced

    def sync(self) -> int:
        if self.fail_sync:
            raise BackendError(errno.EIO, "injected sync failure")
        self.synced = len(self.records)
        return self.synced

    def commit(self, commit: Commit) -> None:
        if self.fail_commit:
            raise BackendError(errno.EIO, "injected commit failure")
        self.commits.append(commit)


class CollectingTransport:
    """The daemon's transport in an in-process test: every reply kept, decoded, whichever thread
    sends it."""

    name = "test"

    def __init__(self) -> None:
        self.sent: list[wire.DecodedReply] = []
        self.lock = threading.Lock()

    def send(self, payload: bytes, address: object) -> None:
        with self.lock:
            self.sent.append(wire.decode_reply(payload))
