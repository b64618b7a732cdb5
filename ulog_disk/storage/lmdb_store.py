"""The durable backend: a daemon-wide journal plus one LMDB environment per uuid (layout:
``formats/journal.md`` and ``formats/store.md``, store layout 3).

What lives where (byte layouts are in :mod:`ulog_disk.storage.journal` and
:mod:`ulog_disk.storage.store_format`, nowhere else):

* ``<state dir>/journal.<start>`` — the journal's segments (:mod:`ulog_disk.storage.journal`): every
  MARK, CLEAR, SET_REGION_SYNC, FLUSH and lifecycle request of every instance, in order. A FLUSH
  is answered once the journal is durable up to its record: one ``fdatasync``, shared by every
  FLUSH that arrived meanwhile (group commit);
* ``<state dir>/<encode_dir_name(uuid)>/`` — the uuid's environment (``data.mdb``, ``lock.mdb``):
  ``format``; per instance ``meta.<luid>`` (``record`` and ``checkpoint``), ``clean.<luid>``,
  ``sync.<luid>``; the uuid's retained state ``retained.meta/clean/sync``.

The environments are the home of the state; the journal is its durable front. A **checkpoint**
writes an instance's changed chunks and meta into its environment together with the journal
position they reach (``checkpoint`` record); at restore, the journal's records of the instance
from that position on are handed back with it, to be replayed over it. Checkpoints run on the
store worker, off the request path; so do the lifecycle writes (CTR, RESUME, POSTSUSPEND, DTR),
which also carry their position.

The backend stores and reads; it decides nothing. Its parts, one job each:

* :mod:`.lmdb_env` — opening an environment safely, the cache of open ones (descriptors bounded
  whatever the number of mirrors), durable write transactions, moving a damaged store aside;
* :mod:`.lmdb_migrate` — the format record, and the migration of layouts 1-2;
* :mod:`.lmdb_reader` — the one reader of a store (the tools use it too) and which journal
  records belong to each instance;
* this module — the ``Backend``: the journal calls, the store writes, the restore. What a restart
  rebuilds from what it reads is :mod:`ulog_disk.log.restore`'s rule, applied by the engine; the one
  write the restore makes (an earlier boot's instance written back with its journal folded in,
  so that the journal can be cut) writes what that module computes.

Threading: journal calls (``log_*``, ``position``) on the request loop, ``sync`` on one thread
at a time, store calls on the store worker, one at a time. The journal has its own locks; the
environment cache is touched by store calls only.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import lmdb

from ..log import regionlog, restore
from ..log.records import InstanceRecord, Restored, StoredInstance, StoredState
from . import journal as jn
from . import limits, lmdb_env
from .base import Backend, BackendError, Commit
from .bootid import read_boot_id
from .lmdb_env import (
    DIR_MODE,
    FDS_PER_ENV,
    FILE_MODE,
    INITIAL_MAP_SIZE,
    MAX_DBS,
    MAX_OPEN_ENVS,
    Env,
    EnvCache,
    backend_error,
    open_db,
)
from .lmdb_migrate import check_format
from .lmdb_reader import (
    InstanceContents,
    StoreContents,
    decode_store,
    journal_records_by_instance,
    plan_replay,
    read_snapshot,
    snapshot,
)
from .store_format import (
    CHECKPOINT_KEY,
    CHECKSUM_SIZE,
    LAYOUT_VERSION,
    RECORD_KEY,
    RETAINED_CLEAN,
    RETAINED_META,
    RETAINED_SYNC,
    CheckpointRecord,
    MetaRecord,
    RetainedRecord,
    StoreFormatError,
    checkpoint_value,
    chunk_length,
    decode_dir_name,
    encode_chunk_key,
    instance_db_name,
    record_bytes,
    record_value,
    seal,
    split_chunks,
)

log = logging.getLogger("ulog_disk.storage.lmdb")

T = TypeVar("T")

#: A retained state's meta record and its chunks per bitmap name, ready to put.
_Retained = tuple[bytes, list[tuple[bytes, dict[int, bytes]]]]


class LmdbBackend(Backend):
    name = "lmdb"
    durable = True
    journaled = True

    def __init__(self, state_dir: Path, map_size: int = INITIAL_MAP_SIZE, max_dbs: int = MAX_DBS,
                 max_open_envs: int = MAX_OPEN_ENVS, segment_bytes: int = jn.SEGMENT_BYTES):
        super().__init__(state_dir)
        # Sized to the descriptor limit, so that opening a store never fails with EMFILE however
        # many mirrors there are (a limit too small for even one is refused here, at start).
        fit = limits.spare_descriptors() // FDS_PER_ENV
        if fit < 1:
            raise BackendError(
                errno.EMFILE,
                f"the descriptor limit (RLIMIT_NOFILE {limits.nofile_soft_limit()}) leaves no room for a "
                f"store: {limits.descriptors_in_use()} open, {limits.DESCRIPTOR_RESERVE} kept for the "
                f"sockets and the journal, {FDS_PER_ENV} per store; raise it (LimitNOFILE=, ulimit -n)")
        self.max_open_envs = min(max_open_envs, fit)
        self._cache = EnvCache(self.state_dir, map_size, max_dbs, self.max_open_envs,
                               lambda e: check_format(e, self._journal_position, self.boot_id))
        self.journal = jn.Journal(self.state_dir, segment_bytes)
        #: The journal is open for appending (the daemon's restore opened it).
        self._journal_open = False
        #: Which journal, and up to where, a store write of a tool (no restore) follows.
        self._journal_ref: tuple[bytes, int] | None = None
        self._ref_lock = threading.RLock()
        #: The boot this process runs in (restore() sets the daemon's): a store of layout 1-2
        #: migrated when a tool opens it folds the journal files of this boot's instances.
        self.boot_id = read_boot_id()

    # --- environments ----------------------------------------------------------------------

    def env_path(self, uuid: str) -> Path:
        return self._cache.path(uuid)

    def _env(self, uuid: str, create: bool) -> Env | None:
        """The uuid's open environment; None if absent and not ``create``. Raises BackendError
        when it cannot be opened or verified."""
        return self._cache.get(uuid, create)

    @property
    def _envs(self) -> dict[str, Env]:
        """The open environments by uuid (tests reach into them)."""
        return self._cache.envs

    def open_environments(self) -> int:
        return len(self._cache.envs)

    def _write(self, e: Env, body: Callable[[lmdb.Transaction], T]) -> T:
        """One durable write transaction (:func:`.lmdb_env.write`)."""
        return lmdb_env.write(e, body)

    # --- the journal -------------------------------------------------------------------------

    def _journal_position(self) -> tuple[bytes, int]:
        """The journal a store write follows and its position: the open journal's (daemon), or
        the end of the journal on disk (a tool's write, or a migration during restore). A
        state directory without a journal gets an empty one first, so no store ever names a
        journal that is not on disk."""
        if self._journal_open:
            return self.journal.journal_id, self.journal.position
        with self._ref_lock:
            return self._journal_ref_on_disk()

    def _journal_ref_on_disk(self) -> tuple[bytes, int]:
        if self._journal_ref is None:
            found = jn.scan(self.state_dir)
            if found.journal_id is not None:
                self._journal_ref = (found.journal_id, found.end)
            else:
                self.state_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                fresh = jn.Journal(self.state_dir, self.journal.capacity + jn.HEADER_BYTES)
                fresh.open(found, 0)
                self._journal_ref = (fresh.journal_id, fresh.position)
                fresh.close()
        return self._journal_ref

    def _append(self, kind: int, uuid: str, luid: int, body: bytes, count: int = 0) -> int:
        if not self._journal_open:
            raise BackendError(errno.EBADF, "the journal is not open (restore() opens it)")
        try:
            return self.journal.append(kind, _uuid_bytes(uuid), luid, body, count)
        except OSError as exc:
            raise backend_error(f"journal append uuid={uuid!r} luid={luid:#x}", exc) from exc

    def log_ops(self, uuid: str, luid: int, ops: Sequence[tuple[int, int]]) -> int:
        body, count = jn.ops_body(ops)
        return self._append(jn.Kind.OPS, uuid, luid, body, count)

    def log_flush(self, rec: InstanceRecord, ops: Sequence[tuple[int, int]]) -> int:
        body, count = jn.flush_body(rec.generation, rec.cursor, rec.committed_at, ops)
        return self._append(jn.Kind.FLUSH, rec.uuid, rec.luid, body, count)

    def log_event(self, rec: InstanceRecord, event: int) -> int:
        body = jn.event_body(event, rec.state, rec.resumed, rec.superseded, rec.generation, rec.region_count)
        return self._append(jn.Kind.EVENT, rec.uuid, rec.luid, body)

    def position(self) -> int:
        return self.journal.position

    def sync(self) -> int:
        try:
            return self.journal.sync()
        except OSError as exc:
            raise backend_error("journal sync", exc) from exc

    def durable_position(self) -> int:
        return self.journal.durable

    def maintain(self, needed: int) -> None:
        if not self._journal_open:
            return
        try:
            for path in self.journal.cut(needed):
                log.debug("journal segment %s removed: its records are all in the stores", path.name)
            if self.journal.wants_spare():
                self.journal.prepare()
        except OSError as exc:
            raise backend_error("journal maintenance", exc) from exc

    def maintenance_due(self) -> bool:
        return self._journal_open and self.journal.wants_spare()

    def writes_must_wait(self) -> bool:
        return self._journal_open and self.journal.short_of_room()

    # --- store calls -------------------------------------------------------------------------

    def _checkpoint_put(self, e: Env, txn: lmdb.Transaction, meta_db: lmdb._Database, meta_name: bytes,
                        position: int | None) -> int:
        journal_id, at = self._journal_position()
        if position is not None:
            at = position
        txn.put(CHECKPOINT_KEY, checkpoint_value(meta_name, CheckpointRecord(journal_id, at)), db=meta_db)
        return at

    def record(self, rec: InstanceRecord, position: int | None = None,
               retain: StoredState | None = None) -> None:
        e = self._env(rec.uuid, create=True)
        assert e is not None
        meta_name = instance_db_name("meta", rec.luid)
        clean_name = instance_db_name("clean", rec.luid)
        sync_name = instance_db_name("sync", rec.luid)
        retained = self._retained_puts(retain)

        def body(txn: lmdb.Transaction) -> None:
            self._put_retained(e, txn, retained)
            meta_db = open_db(e, txn, meta_name, create=True)
            clean_db = open_db(e, txn, clean_name, create=True)
            sync_db = open_db(e, txn, sync_name, create=True)
            raw = txn.get(RECORD_KEY, db=meta_db)
            if raw is not None:
                # A CTR that replaces an instance with this luid (the engine only does that for
                # one that never resumed, or one of an earlier boot whose luid the kernel
                # happens to reuse: whether its state is kept, the engine decided in ``retain``).
                # Verified here (not by the reader) so that an undecodable meta is replaced.
                try:
                    MetaRecord.decode(record_bytes(meta_name, raw))
                except StoreFormatError as exc:
                    log.warning("CTR uuid=%r luid=%#x replaces an undecodable meta record (%s)",
                                rec.uuid, rec.luid, exc)
                txn.drop(clean_db, delete=False)
                txn.drop(sync_db, delete=False)
            at = self._checkpoint_put(e, txn, meta_db, meta_name, position)
            meta = MetaRecord.from_instance(rec, at).encode()
            txn.put(RECORD_KEY, record_value(meta_name, meta), db=meta_db)

        try:
            self._write(e, body)
        except (lmdb.Error, OSError, StoreFormatError) as exc:
            raise backend_error(f"record uuid={rec.uuid!r} luid={rec.luid:#x}", exc) from exc

    @staticmethod
    def _retained_puts(retain: StoredState | None) -> _Retained | None:
        """The records of a retained state, prepared before the write transaction."""
        if retain is None:
            return None
        cb = regionlog.CHUNK_BYTES
        meta = record_value(RETAINED_META, RetainedRecord(
            uuid=retain.uuid, generation=retain.generation, region_count=retain.region_count,
            source_luid=retain.source_luid, committed_at=retain.committed_at,
        ).encode())
        return meta, [(RETAINED_CLEAN, split_chunks(retain.clean, retain.region_count, cb)),
                      (RETAINED_SYNC, split_chunks(retain.sync, retain.region_count, cb))]

    def _put_retained(self, e: Env, txn: lmdb.Transaction,
                      retained: _Retained | None) -> None:
        """Replace the uuid's retained state (inside the caller's transaction)."""
        if retained is None:
            return
        meta, bitmaps = retained
        txn.put(RECORD_KEY, meta, db=open_db(e, txn, RETAINED_META, create=True))
        for name, chunks in bitmaps:
            db = open_db(e, txn, name, create=True)
            txn.drop(db, delete=False)
            for index, bits in chunks.items():
                key = encode_chunk_key(index)
                txn.put(key, seal(name, key, bits), db=db)

    def commit(self, commit: Commit) -> None:
        rec = commit.record
        what = f"commit uuid={rec.uuid!r} luid={rec.luid:#x}"
        e = self._env(rec.uuid, create=True)
        assert e is not None
        count = regionlog.chunk_count(rec.region_count)
        cb = regionlog.CHUNK_BYTES
        # Everything Python can do before the write transaction is done here: the transaction
        # only puts prepared bytes.
        puts: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []
        for kind, chunks in (("clean", commit.clean_chunks), ("sync", commit.sync_chunks)):
            name = instance_db_name(kind, rec.luid)
            items = []
            for index, bits in sorted(chunks.items()):
                if not 0 <= index < count or len(bits) != chunk_length(index, rec.region_count, cb):
                    raise BackendError(errno.EINVAL, f"{what}: chunk {index} of {len(bits)} bytes does "
                                       f"not fit {rec.region_count} regions")
                key = encode_chunk_key(index)
                items.append((key, seal(name, key, bits)))
            puts.append((name, items))
        meta_name = instance_db_name("meta", rec.luid)
        tail_key = encode_chunk_key(count)
        last_key = encode_chunk_key(count - 1)
        last_length = chunk_length(count - 1, rec.region_count, cb) + CHECKSUM_SIZE

        def body(txn: lmdb.Transaction) -> None:
            meta_db = open_db(e, txn, meta_name, create=True)
            at = self._checkpoint_put(e, txn, meta_db, meta_name, commit.position)
            # The meta's commit_seq (layout 3): the journal position of this write.
            meta = MetaRecord.from_instance(rec, at).encode()
            txn.put(RECORD_KEY, record_value(meta_name, meta), db=meta_db)
            for name, items in puts:
                db = open_db(e, txn, name, create=True)
                for key, value in items:
                    txn.put(key, value, db=db)
                if commit.resized:
                    cursor = txn.cursor(db=db)
                    if cursor.set_range(tail_key):
                        while cursor.delete():
                            pass
                    # The engine rewrites every chunk on a resize; should a last chunk of the
                    # old length remain anyway, it is dropped (reads back as zeros: dirty, out
                    # of sync) rather than left to fail the geometry check at restore.
                    old = txn.get(last_key, db=db)
                    if old is not None and len(old) != last_length:
                        txn.delete(last_key, db=db)

        try:
            self._write(e, body)
        except (lmdb.Error, OSError, StoreFormatError) as exc:
            raise backend_error(what, exc) from exc

    def drop(self, uuid: str, luid: int, retain: StoredState | None, position: int | None = None) -> None:
        what = f"drop uuid={uuid!r} luid={luid:#x}"
        e = self._env(uuid, create=retain is not None)
        if e is None:
            return
        retained = self._retained_puts(retain)

        def body(txn: lmdb.Transaction) -> None:
            self._put_retained(e, txn, retained)
            for kind in ("meta", "clean", "sync"):
                db = open_db(e, txn, instance_db_name(kind, luid), create=False)
                if db is not None:
                    txn.drop(db, delete=True)

        try:
            self._write(e, body)
        except (lmdb.Error, OSError, StoreFormatError) as exc:
            raise backend_error(what, exc) from exc

    # --- restore -----------------------------------------------------------------------------

    def restore(self, boot_id: str) -> Restored:
        """Every instance of every store, with the journal ops recorded for it since its checkpoint;
        then the journal is open for appending. Instances of earlier boots with journal ops (or
        journal damage) get their hand-over state written back at once (a recovery checkpoint),
        so only this boot's instances keep the journal from being cut."""
        self.boot_id = boot_id
        restored = Restored()
        try:
            found = jn.scan(self.state_dir)
        except OSError as exc:
            raise backend_error(f"journal in {self.state_dir}", exc) from exc
        for problem in found.problems:
            log.warning("journal: %s: ignored", problem)
        for d in found.damage:
            log.error("journal damaged between positions %d and %d: %s", d.start, d.end, d.reason)
        journal_id = found.journal_id or os.urandom(16)
        self._journal_ref = (journal_id, found.end)
        by_instance = journal_records_by_instance(found)
        floor = found.end
        write_back: list[StoredInstance] = []
        if self.state_dir.is_dir():
            for entry in sorted(os.scandir(self.state_dir), key=lambda d: d.name):
                if not entry.is_dir(follow_symlinks=False):
                    continue  # the daemon's lock file, journal segments, stray files
                uuid = decode_dir_name(entry.name)
                if uuid is None:
                    if ".damaged-" not in entry.name:
                        log.warning("state dir entry %r is not a store name: ignored", entry.name)
                    continue
                try:
                    contents = self._read_current(uuid, entry.path)
                    if contents is None:
                        e = self._env(uuid, create=False)
                        if e is None:  # removed while we looked
                            continue
                        contents = decode_store(read_snapshot(e), uuid)
                    if (why := contents.damage()) is not None:
                        raise StoreFormatError(why)
                except (BackendError, lmdb.Error, OSError, StoreFormatError) as exc:
                    reason = str(exc)
                    log.error("store of uuid=%r (%s) is damaged: %s", uuid, entry.path, reason)
                    self._forget_env(uuid)
                    aside = lmdb_env.move_aside(self.state_dir, Path(entry.path))
                    restored.damaged[uuid] = reason + (f" (moved to {aside.name})" if aside else "")
                    continue
                for finding in contents.all_findings():
                    if finding.level == "warning":
                        log.warning("store of uuid=%r: %s", uuid, finding)
                for inst in contents.instances:
                    stored = self._stored(inst, by_instance.get((uuid, inst.luid), ()), found, journal_id)
                    if inst.checkpoint is not None and inst.checkpoint.journal_id == journal_id:
                        floor = max(floor, inst.checkpoint.position)
                    if restore.needs_recovery_checkpoint(stored, boot_id):
                        write_back.append(stored)
                    restored.instances.append(stored)
                if contents.retained is not None and contents.retained.record is not None:
                    restored.retained[uuid] = contents.retained.state(uuid)
                # Reading every chunk faulted the whole map in; closing drops those pages from the
                # daemon's RSS (the engine holds the bitmaps now) and frees the descriptors.
                self._forget_env(uuid)
        # The new segment's base: every record before it that a store needs is at or after it
        # (nothing needed: all of the old segments may go).
        needed = [s.replayed_from for s in restored.instances if s.replayed_from is not None]
        try:
            self.journal.open(found, base=min(needed, default=1 << 62), floor=floor, journal_id=journal_id)
        except OSError as exc:
            raise backend_error(f"journal in {self.state_dir}", exc) from exc
        self._journal_open = True
        self._journal_ref = None
        for stored in write_back:
            self._recovery_checkpoint(stored)
        return restored

    def _read_current(self, uuid: str, path: str) -> StoreContents | None:
        """A store read through a read-only open, when the read-write open would neither write
        nor change anything in it: its directory and files there with their exact modes, its
        format record of this layout and chunk size, nothing damaged. None otherwise (and on
        any error): the caller then opens it as before, which migrates, repairs or judges it.

        Why: a restart reads every store once, and LMDB opens an environment read-only in about
        half the time (one descriptor for ``data.mdb``, not two; no writer set-up); with 1000
        stores that is a tenth of a second of the start."""
        if uuid in self._cache.envs:
            return None  # open already (a tool's restore): LMDB forbids a second open
        try:
            if stat.S_IMODE(os.stat(path).st_mode) != DIR_MODE:
                return None
            for name in ("data.mdb", "lock.mdb"):
                found = os.stat(os.path.join(path, name))
                if found.st_size == 0 or found.st_mode & 0o777 != FILE_MODE:
                    return None
            env = lmdb_env.open_readonly(Path(path))
            try:
                with env.begin() as txn:
                    snap = snapshot(env, txn)
            finally:
                env.close()
            contents = decode_store(snap, uuid)
        except (lmdb.Error, OSError, StoreFormatError):
            return None
        fmt = contents.format
        if (fmt is None or fmt.version != LAYOUT_VERSION or fmt.chunk_bytes != regionlog.CHUNK_BYTES
                or contents.damage() is not None):
            return None
        return contents

    def _stored(self, inst: InstanceContents, records: Sequence[jn.Record], found: jn.Scan,
                journal_id: bytes) -> StoredInstance:
        """One instance as read, with the journal ops a restart replays over it."""
        assert inst.meta is not None
        r = plan_replay(inst.meta, inst.checkpoint, records, found, journal_id)
        if r.damaged is not None:
            log.error("store of uuid=%r luid=%#x: %s: answered requests may be missing", inst.meta.uuid,
                      inst.luid, r.damaged)
        return StoredInstance(record=r.record, clean=inst.clean, sync=inst.sync, journal=r.ops,
                              journal_damaged=r.damaged, replayed_from=r.first)

    def _recovery_checkpoint(self, stored: StoredInstance) -> None:
        """Write an earlier boot's instance back as the restart rebuilds it
        (:func:`ulog_disk.log.restore.handover_candidate`), so that no later start depends on its
        journal records. On success ``stored`` holds what was written and no journal ops (the
        engine's rebuild of it gives the same state); on failure it is left as read."""
        rec = stored.record
        state = restore.handover_candidate(stored)
        cb = regionlog.CHUNK_BYTES
        commit = Commit(rec, split_chunks(state.clean, rec.region_count, cb),
                        split_chunks(state.sync, rec.region_count, cb), resized=True,
                        position=self.journal.position)
        try:
            self.commit(commit)
        except BackendError as exc:
            log.error("store of uuid=%r luid=%#x: replayed state of an earlier boot not written back (%s); "
                      "the journal keeps it", rec.uuid, rec.luid, exc)
            return
        stored.clean, stored.sync = state.clean, state.sync
        stored.journal = []
        stored.replayed_from = None

    def release(self, uuid: str) -> None:
        """The uuid's last instance is gone: close its environment (descriptors, map)."""
        self._forget_env(uuid)

    def _forget_env(self, uuid: str) -> None:
        self._cache.forget(uuid)

    def close(self) -> None:
        self._cache.close()
        self.journal.close()
        self._journal_open = False

    # --- inspection (tests, tools) ---------------------------------------------------------

    def contents(self, uuid: str) -> dict[bytes, dict[bytes, bytes]]:
        """Every record of the uuid's environment: sub-database name → {key: value}; the main
        database's own records (not sub-database descriptors) under ``b""``."""
        e = self._env(uuid, create=False)
        if e is None:
            return {}
        return lmdb_env.contents(e)


@functools.lru_cache(maxsize=4096)
def _uuid_bytes(uuid: str) -> bytes:
    return uuid.encode("latin-1")
