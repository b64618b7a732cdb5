"""The volatile backend: keeps nothing across a daemon restart.

Useful for tests and as the reference for what a backend is told. Within one daemon run the
engine still hands state over between instances and keeps a removed mirror's last state, so a
``dmsetup remove`` + ``create`` of the same uuid resyncs nothing while the daemon lives.
"""

from __future__ import annotations

from ..log.records import InstanceRecord, Restored, StoredState
from .base import Backend, Commit


class MemoryBackend(Backend):
    name = "memory"
    durable = False

    def restore(self, boot_id: str) -> Restored:
        return Restored()

    def record(self, rec: InstanceRecord, position: int | None = None,
               retain: StoredState | None = None) -> None:
        pass

    def commit(self, commit: Commit) -> None:
        pass

    def drop(self, uuid: str, luid: int, retain: StoredState | None, position: int | None = None) -> None:
        pass
