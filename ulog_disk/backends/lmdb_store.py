"""The durable backend: a daemon-wide journal plus one LMDB environment per uuid (layout:
``formats/journal.md`` and ``formats/store.md``, store layout 3).

What lives where (byte layouts are in :mod:`ulog_disk.journal` and :mod:`ulog_disk.store_format`,
nowhere else):

* ``<state dir>/journal.<start>`` — the journal's segments (:mod:`ulog_disk.journal`): every
  MARK, CLEAR, SET_REGION_SYNC, FLUSH and lifecycle request of every instance, in order. A FLUSH
  is answered once the journal is durable up to its record: one ``fdatasync``, shared by every
  FLUSH that arrived meanwhile (group commit);
* ``<state dir>/<encode_dir_name(uuid)>/`` — the uuid's environment (``data.mdb``, ``lock.mdb``):
  ``format``; per instance ``meta.<luid>`` (``record`` and ``checkpoint``), ``clean.<luid>``,
  ``sync.<luid>``; the uuid's retained state ``retained.meta/clean/sync``.

The environments are the home of the state; the journal is its durable front. A **checkpoint**
writes an instance's changed chunks and meta into its environment together with the journal
position they reach (``checkpoint`` record); at restore, the journal's records of the instance
from that position on are replayed over them. Checkpoints run on the store worker, off the
request path; so do the lifecycle writes (CTR, RESUME, POSTSUSPEND, DTR), which also carry
their position.

Durability: every LMDB write transaction runs with LMDB's durable settings (``sync=True``,
``metasync=True``, no ``writemap``), so when a store call returns it is on stable storage, and a
crash leaves the previous or the new transaction, never a mix.

Cost per idle mirror: none but its bitmaps. Environments are opened when a store call or the
restore needs them and at most :data:`MAX_OPEN_ENVS` stay open (least recently used closed
first), so the descriptors do not grow with the number of mirrors.

Threading: journal calls (``log_*``, ``position``) on the request loop, ``sync`` on one thread
at a time, store calls on the store worker, one at a time. The journal has its own locks; the
environment cache is touched by store calls only.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import lmdb

from .. import journal as jn
from .. import limits, regionlog
from ..bootid import read_boot_id
from ..store_format import (
    CHECKPOINT_KEY,
    CHECKSUM_SIZE,
    FORMAT_KEY,
    JOURNAL_HEADER_SIZE,
    LAYOUT_VERSION,
    RECORD_KEY,
    RETAINED_CLEAN,
    RETAINED_META,
    RETAINED_SYNC,
    CheckpointRecord,
    FormatRecord,
    JournalHeader,
    MetaRecord,
    RetainedRecord,
    StoreFormatError,
    assemble_chunks,
    checkpoint_value,
    chunk_length,
    damaged_dir_name,
    decode_chunk_key,
    decode_dir_name,
    decode_journal_ops,
    encode_chunk_key,
    encode_dir_name,
    format_value,
    instance_db_name,
    journal_file_name,
    parse_instance_db_name,
    read_checkpoint_value,
    read_format_value,
    record_bytes,
    record_value,
    seal,
    split_chunks,
    unseal_chunk,
)
from .base import Backend, BackendError, Commit, InstanceRecord, Restored, StoredInstance, StoredState

log = logging.getLogger("ulog_disk.backends.lmdb")

T = TypeVar("T")

#: First map size of a new environment. Address space only (LMDB grows the file as pages are
#: written), so being generous costs nothing; a MapFullError doubles it.
INITIAL_MAP_SIZE = 64 * 1024 * 1024
#: A map that would have to grow past this is treated as a full disk (ENOSPC).
MAX_MAP_SIZE = 1 << 40
#: Named databases per environment: 3 per instance + 3 retained. Instances of earlier boots stay
#: in the store until the recovery tool removes them, so leave room for many; LMDB allocates
#: per-transaction arrays of this size (a few dozen KiB), nothing per database that is unused.
MAX_DBS = 1024
DIR_MODE = 0o700
#: Enough for LMDB's lock table at its default 126 readers (about 8 KiB).
LOCK_FILE_BYTES = 16384
FILE_MODE = 0o600
#: Environments kept open between store calls (3 descriptors each: lock.mdb, and data.mdb twice,
#: once O_DSYNC for its meta page; and two maps): bounded whatever the number of mirrors.
MAX_OPEN_ENVS = 8
FDS_PER_ENV = 3


@dataclass(eq=False)
class _Env:
    uuid: str
    path: Path
    env: lmdb.Environment
    map_size: int
    lock: threading.RLock = field(default_factory=threading.RLock)


@dataclass
class _Found:
    """One instance as read from its environment, before the journal is replayed over it."""

    meta: MetaRecord
    clean: bytes
    sync: bytes
    checkpoint: CheckpointRecord | None


def _backend_error(what: str, exc: BaseException) -> BackendError:
    """An lmdb/OS/format failure as the BackendError the engine expects (errno when known)."""
    if isinstance(exc, BackendError):
        return exc
    code = getattr(exc, "errno", None)
    if code is None and isinstance(exc, lmdb.Error):
        raw = getattr(exc, "code", 0) or 0
        code = raw if raw > 0 else None
        if isinstance(exc, (lmdb.MapFullError, lmdb.DiskError)) and code is None:
            code = errno.ENOSPC
    if code is None:
        code = errno.EIO
    err = BackendError(code, f"{what}: {exc}")
    err.__cause__ = exc
    return err


#: A retained state's meta record and its chunks per bitmap name, ready to put.
_Retained = tuple[bytes, list[tuple[bytes, dict[int, bytes]]]]


class LmdbBackend(Backend):
    name = "lmdb"
    durable = True
    journaled = True

    def __init__(self, state_dir: Path, map_size: int = INITIAL_MAP_SIZE, max_dbs: int = MAX_DBS,
                 max_open_envs: int = MAX_OPEN_ENVS, segment_bytes: int = jn.SEGMENT_BYTES):
        super().__init__(state_dir)
        self.initial_map_size = map_size
        self.max_dbs = max_dbs
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
        #: Guards the environment cache (store calls come one at a time; tools and tests may not).
        self._lock = threading.RLock()
        self._envs: collections.OrderedDict[str, _Env] = collections.OrderedDict()
        self._closed = False
        self.journal = jn.Journal(self.state_dir, segment_bytes)
        #: The journal is open for appending (the daemon's restore opened it).
        self._journal_open = False
        #: Which journal, and up to where, a store write of a tool (no restore) follows.
        self._journal_ref: tuple[bytes, int] | None = None
        #: The boot this process runs in (restore() sets the daemon's): a store of layout 1-2
        #: migrated when a tool opens it folds the journal files of this boot's instances.
        self.boot_id = read_boot_id()

    # --- environments ----------------------------------------------------------------------

    def env_path(self, uuid: str) -> Path:
        return self.state_dir / encode_dir_name(uuid)

    def _env(self, uuid: str, create: bool) -> _Env | None:
        """The uuid's open environment (cached, the least recently used closed past
        :attr:`max_open_envs`); None if absent and not ``create``. Raises BackendError when it
        cannot be opened or verified."""
        with self._lock:
            found = self._envs.get(uuid)
            if found is not None:
                self._envs.move_to_end(uuid)
                return found
            if self._closed:
                raise BackendError(errno.EBADF, "the LMDB backend is closed")
            try:
                path = self.env_path(uuid)
            except ValueError as exc:
                raise BackendError(errno.EINVAL, f"uuid {uuid!r} cannot name a store: {exc}") from exc
            if not path.is_dir() and not create:
                return None
            while len(self._envs) >= self.max_open_envs:
                _, oldest = self._envs.popitem(last=False)
                with oldest.lock:
                    oldest.env.close()
            try:
                opened = self._open(uuid, path)
            except (lmdb.Error, OSError, StoreFormatError) as exc:
                raise _backend_error(f"store of uuid={uuid!r} at {path}", exc) from exc
            self._envs[uuid] = opened
            return opened

    def open_environments(self) -> int:
        return len(self._envs)

    def _open(self, uuid: str, path: Path) -> _Env:
        created = False
        if not path.is_dir():
            self.state_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            path.mkdir(mode=DIR_MODE)
            created = True
        os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask; be exact
        data_file = path / "data.mdb"
        if not created and data_file.exists() and data_file.stat().st_size == 0:
            # LMDB would start an empty environment over it. An environment's directory is made
            # together with its first transaction, so its data was there, and is lost.
            raise StoreFormatError("data.mdb is empty: the store's data was lost")
        lock_file = path / "lock.mdb"
        if not lock_file.exists():
            # LMDB sizes a new lock file with ftruncate and writes it through its map: on a full
            # filesystem that is a SIGBUS, not an error. Written with write(), a full disk is ENOSPC.
            fd = os.open(lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            try:
                os.write(fd, bytes(LOCK_FILE_BYTES))
            except OSError:
                os.close(fd)
                lock_file.unlink(missing_ok=True)
                raise
            os.close(fd)
        env = lmdb.open(
            str(path), map_size=self.initial_map_size, subdir=True, max_dbs=self.max_dbs,
            sync=True, metasync=True, writemap=False, map_async=False, mode=FILE_MODE, create=True,
            lock=True,
        )
        try:
            # Reading a page past the end of a truncated data.mdb through the map is a SIGBUS:
            # check the file holds every page its meta page counts before reading anything.
            data_bytes = (path / "data.mdb").stat().st_size
            needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
            if data_bytes < needed:
                raise StoreFormatError(f"data.mdb has {data_bytes} bytes, its meta page needs {needed}: "
                                       f"the file was truncated")
            for name in ("data.mdb", "lock.mdb"):
                if (path / name).stat().st_mode & 0o777 != FILE_MODE:
                    os.chmod(path / name, FILE_MODE)
            e = _Env(uuid=uuid, path=path, env=env, map_size=env.info()["map_size"])
            if self._check_format(e) or created:
                # The environment's directory entry and files must outlive a host crash as
                # much as its first commit does.
                jn.fsync_dir(path)
                jn.fsync_dir(self.state_dir)
        except BaseException:
            env.close()
            raise
        return e

    def _check_format(self, e: _Env) -> bool:
        """Verify the format record; write it into a new environment (and say so: True);
        migrate an environment of an older layout or another chunk size."""
        with e.env.begin() as txn:
            raw = txn.get(FORMAT_KEY)
            entries = e.env.stat()["entries"]
        want = regionlog.CHUNK_BYTES
        if raw is None:
            if entries:
                raise StoreFormatError("environment holds data but no format record")
            fmt = format_value(FormatRecord(chunk_bytes=want, uuid=e.uuid, created_at=time.time()))
            self._write(e, lambda txn: txn.put(FORMAT_KEY, fmt))
            return True
        fmt_rec = read_format_value(raw)
        if fmt_rec.uuid != e.uuid:
            raise StoreFormatError(f"environment belongs to uuid {fmt_rec.uuid!r}, not {e.uuid!r}")
        if fmt_rec.version != LAYOUT_VERSION or fmt_rec.chunk_bytes != want:
            log.info("store of uuid=%r: rewriting it from layout %d, %d bytes per chunk, to "
                     "layout %d, %d bytes per chunk", e.uuid, fmt_rec.version, fmt_rec.chunk_bytes,
                     LAYOUT_VERSION, want)
            self._migrate(e, fmt_rec, want)
        return False

    def _migrate(self, e: _Env, fmt: FormatRecord, new: int) -> None:
        """Rewrite every record and bitmap in the current layout with ``new`` bytes per chunk,
        and the format record, in one transaction: a crash leaves the old store or the new one.

        From layout 1 (no checksums) values are read as they are and written sealed. From
        layouts 1 and 2, each instance's own journal file (``journal.<luid>``) is folded in: its
        ops are replayed over the bitmaps (for an instance of this boot, by the rule the daemon
        of that layout used: only a journal that follows the meta's commit), a damaged one makes
        the instance all dirty and out of sync, and the instance gets a checkpoint record at the
        journal's current end. The files are removed once the transaction is durable.
        """
        old, old_sealed, old_layout = fmt.chunk_bytes, fmt.sealed, fmt.version
        fmt = FormatRecord(chunk_bytes=new, uuid=fmt.uuid, created_at=fmt.created_at)
        journal_id, position = self._journal_position()
        journal_files = sorted(e.path.glob("journal.*")) if old_layout < 3 else []

        def body(txn: lmdb.Transaction) -> None:
            groups: list[tuple[int, bytes, bytes, MetaRecord | None]] = []
            for name, _ in list(txn.cursor()):
                parsed = parse_instance_db_name(name)
                if parsed and parsed[0] == "meta":
                    raw = self._get_record(e, txn, name, sealed=old_sealed)
                    meta = MetaRecord.decode(raw)
                    self._put_record(e, txn, name, raw)
                    groups.append((meta.region_count, instance_db_name("clean", parsed[1]),
                                   instance_db_name("sync", parsed[1]), meta))
            raw = self._get_record(e, txn, RETAINED_META, missing_ok=True, sealed=old_sealed)
            if raw is not None:
                groups.append((RetainedRecord.decode(raw).region_count, RETAINED_CLEAN, RETAINED_SYNC, None))
                self._put_record(e, txn, RETAINED_META, raw)
            for region_count, clean_name, sync_name, meta in groups:
                bitmaps = []
                for name in (clean_name, sync_name):
                    db = self._db(e, txn, name, create=False)
                    chunks = {} if db is None else self._read_chunks(txn, db, name, old_sealed)
                    bitmaps.append(assemble_chunks(chunks, region_count, old))
                if meta is not None and old_layout < 3:
                    bitmaps = self._fold_old_journal(e, meta, bitmaps[0], bitmaps[1])
                for name, bitmap in zip((clean_name, sync_name), bitmaps, strict=True):
                    db = self._db(e, txn, name, create=True)
                    txn.drop(db, delete=False)
                    for index, bits in split_chunks(bitmap, region_count, new).items():
                        key = encode_chunk_key(index)
                        txn.put(key, seal(name, key, bits), db=db)
                if meta is not None and old_layout < 3:
                    meta_name = instance_db_name("meta", meta.luid)
                    ckpt = checkpoint_value(meta_name, CheckpointRecord(journal_id, position))
                    txn.put(CHECKPOINT_KEY, ckpt, db=self._db(e, txn, meta_name, create=True))
            txn.put(FORMAT_KEY, format_value(fmt))

        self._write(e, body)
        for path in journal_files:
            try:
                path.unlink()
            except OSError as exc:
                log.warning("store of uuid=%r: old journal %s not removed (%s); it is never read again",
                            e.uuid, path.name, exc)

    def _fold_old_journal(self, e: _Env, meta: MetaRecord, clean: bytes, sync: bytes) -> list[bytes]:
        """Layout 1-2: the instance's bitmaps with its own journal file replayed over them."""
        try:
            data = (e.path / journal_file_name(meta.luid)).read_bytes()
        except FileNotFoundError:
            return [clean, sync]
        if not data or meta.boot_id != self.boot_id:
            # After a reboot that layout never used the journal (the kernel's state is gone).
            return [clean, sync]
        state = regionlog.RegionLog.from_bitmaps(meta.region_count, clean, sync)
        why = None
        try:
            header = JournalHeader.decode(data)
        except StoreFormatError as exc:
            header, why = None, f"unreadable header ({exc})"
        if header is not None and header.luid != meta.luid:
            header, why = None, f"header names luid {header.luid:#x}"
        elif header is not None and header.commit_seq > meta.commit_seq:
            header, why = None, f"header follows commit {header.commit_seq}, ahead of {meta.commit_seq}"
        if why is not None:
            log.error("store of uuid=%r luid=%#x: its layout-2 journal is damaged (%s): every region "
                      "is taken as dirty and out of sync", e.uuid, meta.luid, why)
            state.distrust_all()
        elif header is not None and header.commit_seq == meta.commit_seq:
            ops, _, cut = decode_journal_ops(data[JOURNAL_HEADER_SIZE:])
            applied = state.replay(ops)
            log.info("store of uuid=%r luid=%#x: %d op(s) of its layout-2 journal folded in%s", e.uuid,
                     meta.luid, applied, f" ({cut})" if cut else "")
        return [state.clean.tobytes(), state.sync.tobytes()]

    def _db(self, e: _Env, txn: lmdb.Transaction, name: bytes, create: bool) -> lmdb._Database | None:
        try:
            return e.env.open_db(name, txn=txn, create=create)
        except lmdb.NotFoundError:
            return None

    def _get_record(self, e: _Env, txn: lmdb.Transaction, db_name: bytes,
                    missing_ok: bool = False, sealed: bool = True) -> bytes | None:
        """The record bytes of ``db_name``, checksum verified."""
        db = self._db(e, txn, db_name, create=False)
        raw = None if db is None else txn.get(RECORD_KEY, db=db)
        if raw is None:
            if not missing_ok:
                raise StoreFormatError(f"sub-database {db_name.decode()} has no record")
            return None
        return record_bytes(db_name, raw, sealed)

    def _put_record(self, e: _Env, txn: lmdb.Transaction, db_name: bytes, record: bytes) -> None:
        txn.put(RECORD_KEY, record_value(db_name, record), db=self._db(e, txn, db_name, create=True))

    def _read_bitmaps(self, e: _Env, txn: lmdb.Transaction, names: tuple[bytes, bytes], region_count: int,
                      chunk_bytes: int) -> list[bytes]:
        """The two bitmaps (clean, in sync) kept as chunks in the named sub-databases; a missing
        sub-database is a bitmap of zeros (StoreFormatError naming the sub-database if one is bad)."""
        bitmaps = []
        for name in names:
            db = self._db(e, txn, name, create=False)
            chunks = {} if db is None else self._read_chunks(txn, db, name)
            try:
                bitmaps.append(assemble_chunks(chunks, region_count, chunk_bytes))
            except StoreFormatError as exc:
                raise StoreFormatError(f"{name.decode()}: {exc}") from exc
        return bitmaps

    @staticmethod
    def _read_chunks(txn: lmdb.Transaction, db: lmdb._Database, name: bytes,
                     sealed: bool = True) -> dict[int, bytes]:
        """Chunk index → bitmap bytes, every checksum verified (StoreFormatError if one fails)."""
        return {decode_chunk_key(key): unseal_chunk(name, key, value, sealed)
                for key, value in txn.cursor(db=db)}

    def _write(self, e: _Env, body: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``body`` in one durable write transaction; grow the map and retry on MapFullError.

        A failed transaction is aborted whole: nothing of it reaches the store.
        """
        with e.lock:
            while True:
                txn = e.env.begin(write=True)
                try:
                    result = body(txn)
                    txn.commit()
                    return result
                except lmdb.MapFullError:
                    txn.abort()
                    self._grow(e)
                except BaseException:
                    txn.abort()
                    raise

    def _grow(self, e: _Env) -> None:
        new = max(e.map_size, e.env.info()["map_size"]) * 2
        if new > MAX_MAP_SIZE:
            raise BackendError(errno.ENOSPC, f"store of uuid={e.uuid!r} would outgrow {MAX_MAP_SIZE} bytes")
        # No transaction of this environment is open: calls for one uuid are serialized.
        e.env.set_mapsize(new)
        e.map_size = new
        log.info("store of uuid=%r: map grown to %d MiB", e.uuid, new >> 20)

    # --- the journal -------------------------------------------------------------------------

    def _journal_position(self) -> tuple[bytes, int]:
        """The journal a store write follows and its position: the open journal's (daemon), or
        the end of the journal on disk (a tool's write, or a migration during restore). A
        state directory without a journal gets an empty one first, so no store ever names a
        journal that is not on disk."""
        if self._journal_open:
            return self.journal.journal_id, self.journal.position
        with self._lock:
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
            raise _backend_error(f"journal append uuid={uuid!r} luid={luid:#x}", exc) from exc

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
            raise _backend_error("journal sync", exc) from exc

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
            raise _backend_error("journal maintenance", exc) from exc

    def maintenance_due(self) -> bool:
        return self._journal_open and self.journal.wants_spare()

    def writes_must_wait(self) -> bool:
        return self._journal_open and self.journal.short_of_room()

    # --- store calls -------------------------------------------------------------------------

    def _checkpoint_put(self, e: _Env, txn: lmdb.Transaction, meta_db: lmdb._Database, meta_name: bytes,
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
            meta_db = self._db(e, txn, meta_name, create=True)
            clean_db = self._db(e, txn, clean_name, create=True)
            sync_db = self._db(e, txn, sync_name, create=True)
            raw = txn.get(RECORD_KEY, db=meta_db)
            if raw is not None:
                # A CTR that replaces an instance with this luid (the engine only does that for
                # one that never resumed, or one of an earlier boot whose luid the kernel
                # happens to reuse: whether its state is kept, the engine decided in ``retain``).
                # Verified here (not by _get_record) so that an undecodable meta is replaced.
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
            raise _backend_error(f"record uuid={rec.uuid!r} luid={rec.luid:#x}", exc) from exc

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

    def _put_retained(self, e: _Env, txn: lmdb.Transaction,
                      retained: _Retained | None) -> None:
        """Replace the uuid's retained state (inside the caller's transaction)."""
        if retained is None:
            return
        meta, bitmaps = retained
        txn.put(RECORD_KEY, meta, db=self._db(e, txn, RETAINED_META, create=True))
        for name, chunks in bitmaps:
            db = self._db(e, txn, name, create=True)
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
            meta_db = self._db(e, txn, meta_name, create=True)
            at = self._checkpoint_put(e, txn, meta_db, meta_name, commit.position)
            # The meta's commit_seq (layout 3): the journal position of this write.
            meta = MetaRecord.from_instance(rec, at).encode()
            txn.put(RECORD_KEY, record_value(meta_name, meta), db=meta_db)
            for name, items in puts:
                db = self._db(e, txn, name, create=True)
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
            raise _backend_error(what, exc) from exc

    def drop(self, uuid: str, luid: int, retain: StoredState | None, position: int | None = None) -> None:
        what = f"drop uuid={uuid!r} luid={luid:#x}"
        e = self._env(uuid, create=retain is not None)
        if e is None:
            return
        retained = self._retained_puts(retain)

        def body(txn: lmdb.Transaction) -> None:
            self._put_retained(e, txn, retained)
            for kind in ("meta", "clean", "sync"):
                db = self._db(e, txn, instance_db_name(kind, luid), create=False)
                if db is not None:
                    txn.drop(db, delete=True)

        try:
            self._write(e, body)
        except (lmdb.Error, OSError, StoreFormatError) as exc:
            raise _backend_error(what, exc) from exc

    # --- restore -----------------------------------------------------------------------------

    def restore(self, boot_id: str) -> Restored:
        """Every instance of every store with the journal replayed over it; then the journal is
        open for appending. Instances of earlier boots get their replay written back at once (a
        recovery checkpoint), so only this boot's instances keep the journal from being cut."""
        self.boot_id = boot_id
        restored = Restored()
        try:
            found = jn.scan(self.state_dir)
        except OSError as exc:
            raise _backend_error(f"journal in {self.state_dir}", exc) from exc
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
                    e = self._env(uuid, create=False)
                    if e is None:  # removed while we looked
                        continue
                    instances, retained = self._read_env(e)
                except (BackendError, lmdb.Error, OSError, StoreFormatError) as exc:
                    reason = str(exc)
                    log.error("store of uuid=%r (%s) is damaged: %s", uuid, entry.path, reason)
                    aside = self._move_aside(uuid, Path(entry.path))
                    restored.damaged[uuid] = reason + (f" (moved to {aside.name})" if aside else "")
                    continue
                for f in instances:
                    stored = self._replayed(f, by_instance.get((uuid, f.meta.luid), ()), found, journal_id)
                    if f.checkpoint is not None and f.checkpoint.journal_id == journal_id:
                        floor = max(floor, f.checkpoint.position)
                    if f.meta.boot_id != boot_id and (stored.journal or stored.journal_damaged):
                        write_back.append(stored)
                    restored.instances.append(stored)
                if retained is not None:
                    restored.retained[uuid] = retained
                # Reading every chunk faulted the whole map in; closing drops those pages from the
                # daemon's RSS (the engine holds the bitmaps now) and frees the descriptors.
                self._forget_env(uuid)
        # The new segment's base: every record before it that a store needs is at or after it
        # (nothing needed: all of the old segments may go).
        needed = [s.replayed_from for s in restored.instances if s.replayed_from is not None]
        try:
            self.journal.open(found, base=min(needed, default=1 << 62), floor=floor, journal_id=journal_id)
        except OSError as exc:
            raise _backend_error(f"journal in {self.state_dir}", exc) from exc
        self._journal_open = True
        self._journal_ref = None
        for stored in write_back:
            self._recovery_checkpoint(stored)
        return restored

    def _replayed(self, f: _Found, records: Sequence[jn.Record], found: jn.Scan,
                  journal_id: bytes) -> StoredInstance:
        r = plan_replay(f.meta, f.checkpoint, records, found, journal_id, self.boot_id)
        if r.damaged is not None:
            log.error("store of uuid=%r luid=%#x: %s: answered requests may be missing", f.meta.uuid,
                      f.meta.luid, r.damaged)
        return StoredInstance(record=r.record, clean=f.clean, sync=f.sync, journal=r.ops,
                              journal_damaged=r.damaged, replayed_from=r.first)

    def _recovery_checkpoint(self, stored: StoredInstance) -> None:
        """Write an earlier boot's instance back with its journal replayed (and distrusted if its
        journal was damaged), so that no later start depends on those records."""
        rec = stored.record
        state = regionlog.RegionLog.from_bitmaps(rec.region_count, stored.clean, stored.sync)
        state.replay(stored.journal)
        if stored.journal_damaged:
            state.distrust_all()
        cb = regionlog.CHUNK_BYTES
        stored.clean, stored.sync = state.clean.tobytes(), state.sync.tobytes()
        commit = Commit(rec, split_chunks(stored.clean, rec.region_count, cb),
                        split_chunks(stored.sync, rec.region_count, cb), resized=True,
                        position=self.journal.position)
        try:
            self.commit(commit)
        except BackendError as exc:
            log.error("store of uuid=%r luid=%#x: replayed state of an earlier boot not written back (%s); "
                      "the journal keeps it", rec.uuid, rec.luid, exc)
            return
        stored.journal = []
        stored.replayed_from = None

    def release(self, uuid: str) -> None:
        """The uuid's last instance is gone: close its environment (descriptors, map)."""
        self._forget_env(uuid)

    def _forget_env(self, uuid: str) -> None:
        with self._lock:
            e = self._envs.pop(uuid, None)
        if e is not None:
            with e.lock:
                e.env.close()

    def _read_env(self, e: _Env) -> tuple[list[_Found], StoredState | None]:
        """Read and verify one environment; StoreFormatError on anything that does not add up."""
        cb = regionlog.CHUNK_BYTES
        found: list[_Found] = []
        retained: StoredState | None = None
        with e.lock, e.env.begin() as txn:
            names = [key for key, _ in txn.cursor()]
            present = set(names)
            for name in names:
                parsed = parse_instance_db_name(name)
                if name in (FORMAT_KEY, RETAINED_META, RETAINED_CLEAN, RETAINED_SYNC):
                    continue
                if parsed is None:
                    log.warning("store of uuid=%r: unknown key %r ignored", e.uuid, name)
                    continue
                kind, luid = parsed
                if kind != "meta":
                    if instance_db_name("meta", luid) not in present:
                        log.warning("store of uuid=%r: %s without its meta ignored", e.uuid, name.decode())
                    continue
                meta = MetaRecord.decode(self._get_record(e, txn, name))
                if meta.luid != luid or meta.uuid != e.uuid:
                    raise StoreFormatError(
                        f"{name.decode()} holds the record of uuid={meta.uuid!r} luid={meta.luid:#x}")
                meta_db = self._db(e, txn, name, create=False)
                raw = txn.get(CHECKPOINT_KEY, db=meta_db)
                ckpt = None if raw is None else read_checkpoint_value(name, raw)
                bitmaps = self._read_bitmaps(e, txn, (instance_db_name("clean", luid),
                                                      instance_db_name("sync", luid)), meta.region_count, cb)
                found.append(_Found(meta, bitmaps[0], bitmaps[1], ckpt))
            raw = self._get_record(e, txn, RETAINED_META, missing_ok=True)
            if raw is not None:
                rr = RetainedRecord.decode(raw)
                if rr.uuid != e.uuid:
                    raise StoreFormatError(f"retained state names uuid {rr.uuid!r}")
                bitmaps = self._read_bitmaps(e, txn, (RETAINED_CLEAN, RETAINED_SYNC), rr.region_count, cb)
                retained = StoredState(
                    uuid=e.uuid, generation=rr.generation, region_count=rr.region_count,
                    clean=bitmaps[0], sync=bitmaps[1], source_luid=rr.source_luid,
                    committed_at=rr.committed_at,
                )
        return found, retained

    def _move_aside(self, uuid: str, path: Path) -> Path | None:
        """Close the uuid's environment and rename its directory out of the way, so the uuid
        starts from nothing (a full resync) and the bad data stays for inspection."""
        self._forget_env(uuid)
        now = int(time.time())
        for attempt in range(1000):
            target = path.with_name(damaged_dir_name(path.name, now, attempt))
            if target.exists():
                continue
            try:
                os.rename(path, target)
                jn.fsync_dir(self.state_dir)
            except OSError as exc:
                log.error("could not move the damaged store %s aside: %s", path, exc)
                return None
            return target
        return None  # pragma: no cover - a thousand moved-aside stores in one second


    def close(self) -> None:
        with self._lock:
            self._closed = True
            envs = list(self._envs.values())
            self._envs.clear()
        for e in envs:
            with e.lock:
                e.env.close()
        self.journal.close()
        self._journal_open = False

    # --- inspection (tests, tools) ---------------------------------------------------------

    def contents(self, uuid: str) -> dict[bytes, dict[bytes, bytes]]:
        """Every record of the uuid's environment: sub-database name → {key: value}; the main
        database's own records (not sub-database descriptors) under ``b""``."""
        e = self._env(uuid, create=False)
        if e is None:
            return {}
        out: dict[bytes, dict[bytes, bytes]] = {b"": {}}
        with e.lock, e.env.begin() as txn:
            for name, value in list(txn.cursor()):
                try:
                    db = e.env.open_db(name, txn=txn, create=False)
                except lmdb.IncompatibleError:  # a plain record, not a sub-database
                    out[b""][name] = value
                    continue
                out[name] = dict(txn.cursor(db=db))
        return out



@dataclass
class Replay:
    """What a restore does with one stored instance and the journal (the daemon's restore and
    the tools' store view both get it from :func:`plan_replay`)."""

    #: The instance's meta with what its FLUSHes since the checkpoint changed.
    record: InstanceRecord
    #: The ops to replay over its stored bitmaps, in order.
    ops: list[tuple[int, int]]
    #: Why answered requests may be missing (the instance then comes back all dirty and out of
    #: sync), or None.
    damaged: str | None
    #: Journal position of the first record of the instance at or after its checkpoint (or of
    #: the checkpoint itself when damaged): the journal is needed from there until the next
    #: checkpoint. None when nothing is replayed.
    first: int | None
    #: Journal records of the instance at or after its checkpoint.
    records: int = 0


def journal_records_by_instance(found: jn.Scan) -> dict[tuple[str, int], list[jn.Record]]:
    """The OPS and FLUSH records of the journal, per (uuid, luid), in journal order."""
    by_instance: dict[tuple[str, int], list[jn.Record]] = collections.defaultdict(list)
    for r in found.records:
        if r.kind is jn.Kind.OPS or r.kind is jn.Kind.FLUSH:
            by_instance[(r.uuid, r.luid)].append(r)
    return by_instance


def plan_replay(meta: MetaRecord, ckpt: CheckpointRecord | None, records: Sequence[jn.Record],
                found: jn.Scan, journal_id: bytes | None, boot_id: str) -> Replay:
    """The journal records of one instance since its checkpoint, by the restore rules
    (formats/journal.md): the ops to replay and the meta its FLUSHes changed.

    Every record the scan found was written by the daemon after it applied and answered the
    request, and the scan ends at the first record missing (a host crash keeps a prefix of what
    was appended: at least everything synced). So the instance comes back as it was after a
    prefix of its answered requests that holds at least every FLUSH answered; the same rule for
    the same boot (the daemon died: the prefix is everything) and after a reboot, where the
    engine then turns every region that is dirty in it out of sync.
    """
    rec = meta.instance()
    start = ckpt.position if ckpt is not None else 0
    damaged = None
    if ckpt is None:
        damaged = "its store has no checkpoint record"
    elif ckpt.journal_id != journal_id:
        damaged = (f"its store follows journal {ckpt.journal_id.hex()} up to position {ckpt.position}, "
                   f"and that journal is not in the state directory")
    elif (d := found.damaged_after(start)) is not None:
        damaged = f"the journal is damaged at positions {d.start}-{d.end} ({d.reason})"
    ops: list[tuple[int, int]] = []
    first = None
    count = 0
    if ckpt is not None and ckpt.journal_id == journal_id:
        for r in records:
            if r.lsn < start:
                continue
            count += 1
            if first is None:
                first = r.lsn
            if r.kind is jn.Kind.FLUSH:
                rec.generation, rec.cursor, rec.committed_at = r.generation, r.cursor, r.committed_at
            ops.extend(r.ops)
    if damaged is not None:
        first = start if first is None else min(first, start)
    return Replay(rec, ops, damaged, first, count)


@functools.lru_cache(maxsize=4096)
def _uuid_bytes(uuid: str) -> bytes:
    return uuid.encode("latin-1")
