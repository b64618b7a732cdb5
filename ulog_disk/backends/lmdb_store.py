"""The durable backend: one LMDB environment per uuid (layout: ``formats/store.md``, version 2).

What lives where (byte layouts are in :mod:`ulog_disk.store_format`, nowhere else):

* ``<state dir>/<encode_dir_name(uuid)>/`` — the uuid's environment (``data.mdb``, ``lock.mdb``)
  and one ``journal.<luid>`` file per instance;
* in the environment: ``format``; per instance ``meta.<luid>``, ``clean.<luid>``,
  ``sync.<luid>``; the uuid's retained state ``retained.meta/clean/sync``.

Durability: every write transaction runs with LMDB's durable settings (``sync=True``,
``metasync=True``, no ``writemap``), so when :meth:`LmdbBackend.commit` returns the commit is on
stable storage, and a crash at any instant leaves the previous or the new commit, never a mix.
The journal is written with ``pwrite`` and never fsynced: it only has to survive the daemon's
death (the kernel keeps the page cache), not the host's.

Threading (the :mod:`ulog_disk.backends.base` contract): calls for one uuid come one at a time,
in order; calls for different uuids may run at once on different threads. Each uuid has its own
environment, so they never share an LMDB write lock; the only shared structures are the caches
of environments and journals, guarded by one lock. A per-environment lock also serializes the
calls of one uuid, which the contract already does; it costs nothing and keeps a misbehaving
caller from corrupting LMDB's single-writer rules.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import lmdb

from .. import regionlog
from ..store_format import (
    CHECKSUM_SIZE,
    FORMAT_KEY,
    JOURNAL_HEADER_SIZE,
    LAYOUT_VERSION,
    RECORD_KEY,
    RETAINED_CLEAN,
    RETAINED_META,
    RETAINED_SYNC,
    FormatRecord,
    JournalHeader,
    MetaRecord,
    RetainedRecord,
    StoreFormatError,
    assemble_chunks,
    chunk_length,
    damaged_dir_name,
    decode_chunk_key,
    decode_dir_name,
    decode_journal_ops,
    encode_chunk_key,
    encode_dir_name,
    encode_journal_ops,
    format_value,
    instance_db_name,
    journal_file_name,
    parse_instance_db_name,
    read_format_value,
    record_bytes,
    record_value,
    seal_chunk,
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


@dataclass(eq=False)
class _Env:
    uuid: str
    path: Path
    env: lmdb.Environment
    map_size: int
    lock: threading.RLock = field(default_factory=threading.RLock)


@dataclass(eq=False)
class _Journal:
    """The journal file of one instance.

    ``seq`` is the meta's commit sequence the file must carry in its header; ``stale`` means the
    file does not (yet) start with that header, so it must be rewritten before the next append.
    ``length`` is where the next record goes: only whole, written records count.
    """

    path: Path
    luid: int
    seq: int
    fd: int | None = None
    length: int = 0
    stale: bool = True
    #: ``seq`` is known to be the stored meta's (false after a failed commit).
    seq_trusted: bool = True


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


def _fsync_dir(path: Path) -> None:
    """Make a directory entry change (mkdir, rename) durable: a host crash must not lose it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LmdbBackend(Backend):
    name = "lmdb"
    durable = True

    def __init__(self, state_dir: Path, map_size: int = INITIAL_MAP_SIZE, max_dbs: int = MAX_DBS):
        super().__init__(state_dir)
        self.initial_map_size = map_size
        self.max_dbs = max_dbs
        #: Guards the two caches below; held for dictionary updates only.
        self._lock = threading.Lock()
        #: Serializes opening environments (which may create, fsync or re-chunk one), so that
        #: work never holds up the cache lock that every commit's journal reset takes.
        self._open_lock = threading.Lock()
        self._envs: dict[str, _Env] = {}
        self._journals: dict[tuple[str, int], _Journal] = {}
        self._closed = False

    # --- environments ----------------------------------------------------------------------

    def env_path(self, uuid: str) -> Path:
        return self.state_dir / encode_dir_name(uuid)

    def _env(self, uuid: str, create: bool) -> _Env | None:
        """The uuid's open environment (opened once, then cached); None if absent and not
        ``create``. Raises BackendError when it cannot be opened or verified."""
        found = self._envs.get(uuid)  # dict reads are atomic: no lock on the hot path
        if found is not None:
            return found
        with self._open_lock:
            if self._closed:
                raise BackendError(errno.EBADF, "the LMDB backend is closed")
            found = self._envs.get(uuid)
            if found is not None:
                return found
            try:
                path = self.env_path(uuid)
            except ValueError as exc:
                raise BackendError(errno.EINVAL, f"uuid {uuid!r} cannot name a store: {exc}") from exc
            if not path.is_dir() and not create:
                return None
            try:
                opened = self._open(uuid, path)
            except (lmdb.Error, OSError, StoreFormatError) as exc:
                raise _backend_error(f"store of uuid={uuid!r} at {path}", exc) from exc
            with self._lock:
                self._envs[uuid] = opened
            return opened

    def _open(self, uuid: str, path: Path) -> _Env:
        created = False
        if not path.is_dir():
            self.state_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            path.mkdir(mode=DIR_MODE)
            created = True
        os.chmod(path, DIR_MODE)  # mkdir's mode is filtered by the umask; be exact
        data_file = path / "data.mdb"
        if not created and data_file.exists() and data_file.stat().st_size == 0:
            journals = sorted(p.name for p in path.glob("journal.*"))
            if journals:
                # LMDB would start an empty environment over it. The journals are written only
                # after the first commit, so their instances' data was there, and is lost.
                raise StoreFormatError(f"data.mdb is empty but {journals[0]} and {len(journals) - 1} "
                                       f"other journal(s) are there: the store's data was lost")
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
                _fsync_dir(path)
                _fsync_dir(self.state_dir)
        except BaseException:
            env.close()
            raise
        return e

    def _check_format(self, e: _Env) -> bool:
        """Verify the format record; write it into a new environment (and say so: True);
        re-chunk an environment written with another CHUNK_BYTES."""
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
            self._rechunk(e, fmt_rec, want)
        return False

    def _rechunk(self, e: _Env, fmt: FormatRecord, new: int) -> None:
        """Rewrite every record and bitmap in the current layout with ``new`` bytes per chunk,
        and the format record, in one transaction: a crash leaves the old store or the new one.

        This is also the migration from layout 1, whose values carry no checksum: they are
        read as they are (nothing to verify them against) and written sealed.
        """
        old, old_sealed = fmt.chunk_bytes, fmt.sealed
        fmt = FormatRecord(chunk_bytes=new, uuid=fmt.uuid, created_at=fmt.created_at)

        def body(txn: lmdb.Transaction) -> None:
            groups: list[tuple[int, bytes, bytes]] = []
            for name, _ in list(txn.cursor()):
                parsed = parse_instance_db_name(name)
                if parsed and parsed[0] == "meta":
                    raw = self._get_record(e, txn, name, sealed=old_sealed)
                    meta = MetaRecord.decode(raw)
                    self._put_record(e, txn, name, raw)
                    groups.append((meta.region_count, instance_db_name("clean", parsed[1]),
                                   instance_db_name("sync", parsed[1])))
            raw = self._get_record(e, txn, RETAINED_META, missing_ok=True, sealed=old_sealed)
            if raw is not None:
                groups.append((RetainedRecord.decode(raw).region_count, RETAINED_CLEAN, RETAINED_SYNC))
                self._put_record(e, txn, RETAINED_META, raw)
            for region_count, *names in groups:
                for name in names:
                    db = self._db(e, txn, name, create=False)
                    if db is None:
                        continue
                    bitmap = assemble_chunks(self._read_chunks(txn, db, name, old_sealed),
                                             region_count, old)
                    txn.drop(db, delete=False)
                    for index, bits in split_chunks(bitmap, region_count, new).items():
                        key = encode_chunk_key(index)
                        txn.put(key, seal_chunk(name, key, bits), db=db)
            txn.put(FORMAT_KEY, format_value(fmt))

        self._write(e, body)

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

    # --- journal files ---------------------------------------------------------------------

    def _journal_state(self, e: _Env, luid: int, seq: int) -> _Journal:
        key = (e.uuid, luid)
        with self._lock:
            j = self._journals.get(key)
            if j is None:
                j = _Journal(path=e.path / journal_file_name(luid), luid=luid, seq=seq)
                self._journals[key] = j
            return j

    @staticmethod
    def _journal_rewrite(j: _Journal) -> None:
        """Truncate the journal and give it the header of ``j.seq``.

        Truncation comes first: killed in between, the file is empty, which replays nothing,
        and that is right because every op in it was already in the commit.
        """
        j.stale = True
        if j.fd is None:
            j.fd = os.open(j.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        os.ftruncate(j.fd, 0)
        header = JournalHeader(luid=j.luid, commit_seq=j.seq).encode()
        if os.pwrite(j.fd, header, 0) != len(header):
            raise OSError(errno.ENOSPC, "short write of the journal header")
        j.length = len(header)
        j.stale = False

    def _journal_after_commit(self, e: _Env, luid: int, seq: int) -> None:
        """The commit of ``seq`` is durable: the journal's ops are all in it.

        The file is not rewritten here but in :meth:`after_commit`, after the FLUSH reply has
        gone: until then it keeps the previous commit's header, and a restore ignores the ops
        of a journal that follows an older commit (formats/store.md), so a crash in between
        replays nothing twice. ``stale`` makes the next journal write reset the file first
        should ``after_commit`` not have run.
        """
        j = self._journal_state(e, luid, seq)
        j.seq = seq
        j.seq_trusted = True
        j.stale = True

    def after_commit(self, uuid: str, luid: int) -> None:
        j = self._journals.get((uuid, luid))
        if j is None or not j.stale:
            return
        try:
            self._journal_rewrite(j)
        except OSError as exc:
            log.warning("journal of uuid=%r luid=%#x not reset after a commit (%s); retried at "
                        "the next journal write", uuid, luid, exc)

    def _journal_close(self, uuid: str, luid: int) -> _Journal | None:
        with self._lock:
            j = self._journals.pop((uuid, luid), None)
        if j is not None and j.fd is not None:
            os.close(j.fd)
            j.fd = None
        return j

    def _read_journal(self, e: _Env, meta: MetaRecord) -> tuple[list[tuple[int, int]], str | None]:
        """The ops of an instance's journal, by the rule of formats/store.md: only when its
        header follows the meta's commit sequence. Leaves the file ready for appending.

        The second value says why the journal is damaged (a non-empty file whose header does
        not decode, names another luid, or is ahead of the meta): answered ops may be lost."""
        j = self._journal_state(e, meta.luid, meta.commit_seq)
        j.seq, j.seq_trusted = meta.commit_seq, True
        try:
            data = j.path.read_bytes()
        except FileNotFoundError:
            data = b""
        ops: list[tuple[int, int]] = []
        why = None
        try:
            header = JournalHeader.decode(data)
        except StoreFormatError as exc:
            header = None
            if data:
                why = f"unreadable header ({exc})"
        if header is not None and header.luid != meta.luid:
            why, header = f"header names luid {header.luid:#x}", None
        if header is not None and header.commit_seq > meta.commit_seq:
            why, header = (f"header follows commit {header.commit_seq}, ahead of the store's "
                           f"{meta.commit_seq}"), None
        if header is not None and header.commit_seq != meta.commit_seq:
            # The crash came between the LMDB commit and the journal's truncation: every op
            # in the file is already in that commit.
            log.info("journal of uuid=%r luid=%#x follows commit %d, the store holds commit %d: "
                     "its ops are all in the store", e.uuid, meta.luid, header.commit_seq,
                     meta.commit_seq)
            header = None
        if why is not None:
            log.error("journal of uuid=%r luid=%#x is damaged: %s", e.uuid, meta.luid, why)
        if header is None:
            self._journal_rewrite(j)
            return ops, why
        ops, valid, cut = decode_journal_ops(data[JOURNAL_HEADER_SIZE:])
        if j.fd is None:
            j.fd = os.open(j.path, os.O_RDWR | os.O_CLOEXEC)
        j.length = JOURNAL_HEADER_SIZE + valid
        j.stale = False
        if cut is not None:
            log.warning("journal of uuid=%r luid=%#x: %s; %d op(s) before it kept", e.uuid,
                        meta.luid, cut, len(ops))
            os.ftruncate(j.fd, j.length)
        return ops, None

    # --- Backend interface -----------------------------------------------------------------

    def record(self, rec: InstanceRecord) -> None:
        e = self._env(rec.uuid, create=True)
        assert e is not None
        meta_name = instance_db_name("meta", rec.luid)
        clean_name = instance_db_name("clean", rec.luid)
        sync_name = instance_db_name("sync", rec.luid)
        fallback_seq = self._journal_seq_on_disk(e, rec.luid)

        def body(txn: lmdb.Transaction) -> int:
            meta_db = self._db(e, txn, meta_name, create=True)
            clean_db = self._db(e, txn, clean_name, create=True)
            sync_db = self._db(e, txn, sync_name, create=True)
            seq = 0
            raw = txn.get(RECORD_KEY, db=meta_db)
            if raw is not None:
                # Verified here (not by _get_record) so that an undecodable meta is replaced.
                # A CTR that replaces an instance with this luid (the engine only does that for
                # one that never resumed, or one of an earlier boot whose luid the kernel
                # happens to reuse). The new sequence must differ from the old journal's.
                try:
                    old = MetaRecord.decode(record_bytes(meta_name, raw))
                except StoreFormatError as exc:
                    log.warning("CTR uuid=%r luid=%#x replaces an undecodable meta record (%s)",
                                rec.uuid, rec.luid, exc)
                    seq = (fallback_seq or 0) + 1
                else:
                    seq = old.commit_seq + 1
                    if old.resumed and old.boot_id != rec.boot_id:
                        self._keep_as_retained(e, txn, old, clean_db, sync_db)
                txn.drop(clean_db, delete=False)
                txn.drop(sync_db, delete=False)
            new_meta = MetaRecord.from_instance(rec, seq).encode()
            txn.put(RECORD_KEY, record_value(meta_name, new_meta), db=meta_db)
            return seq

        try:
            seq = self._write(e, body)
        except (lmdb.Error, OSError, StoreFormatError) as exc:
            raise _backend_error(f"record uuid={rec.uuid!r} luid={rec.luid:#x}", exc) from exc
        self._journal_after_commit(e, rec.luid, seq)
        # At once, not after the reply: a journal left from an earlier instance of this luid
        # may carry a later sequence than the new meta's.
        self.after_commit(rec.uuid, rec.luid)

    def _journal_seq_on_disk(self, e: _Env, luid: int) -> int | None:
        try:
            with open(e.path / journal_file_name(luid), "rb") as f:
                return JournalHeader.decode(f.read(JOURNAL_HEADER_SIZE)).commit_seq
        except (OSError, StoreFormatError):
            return None

    def _keep_as_retained(self, e: _Env, txn: lmdb.Transaction, old: MetaRecord,
                          clean_db: lmdb._Database, sync_db: lmdb._Database) -> None:
        """Before a CTR overwrites an instance of an earlier boot (the kernel reused its luid),
        keep its state as the uuid's retained state if it is newer than what is retained.

        The engine holds that state in memory as a hand-over candidate; this keeps it in the
        store too, so a crash before the new instance's RESUME commit does not lose it.
        """
        raw = self._get_record(e, txn, RETAINED_META, missing_ok=True)
        if raw is not None:
            try:
                if RetainedRecord.decode(raw).generation >= old.generation:
                    return
            except StoreFormatError:
                pass
        # Verified before anything is written: a damaged chunk must not be sealed again under
        # the retained name as if it were good. The state is then not kept (the engine still
        # offers it from memory, where it was verified at restore).
        copies: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []
        try:
            for src, src_name, name in ((clean_db, instance_db_name("clean", old.luid), RETAINED_CLEAN),
                                        (sync_db, instance_db_name("sync", old.luid), RETAINED_SYNC)):
                copies.append((name, [(key, unseal_chunk(src_name, key, value))
                                      for key, value in txn.cursor(db=src)]))
        except StoreFormatError as exc:
            log.error("CTR uuid=%r reuses luid=%#x of boot %s: its stored state is damaged (%s); "
                      "not kept as the retained state", e.uuid, old.luid, old.boot_id, exc)
            return
        retained = RetainedRecord(uuid=e.uuid, generation=old.generation, region_count=old.region_count,
                                  source_luid=old.luid, committed_at=old.committed_at)
        self._put_record(e, txn, RETAINED_META, retained.encode())
        for name, chunks in copies:
            dst = self._db(e, txn, name, create=True)
            txn.drop(dst, delete=False)
            for key, bits in chunks:
                txn.put(key, seal_chunk(name, key, bits), db=dst)
        log.info("CTR uuid=%r reuses luid=%#x of boot %s: its state (generation %d) kept as the "
                 "retained state", e.uuid, old.luid, old.boot_id, old.generation)

    def journal(self, uuid: str, luid: int, ops: Iterable[tuple[int, int]]) -> None:
        data = encode_journal_ops(ops)
        if not data:
            return
        j = self._journals.get((uuid, luid))
        try:
            if j is None:
                j = self._journal_for_unknown(uuid, luid)
            if j.stale:
                self._journal_rewrite(j)
            assert j.fd is not None
            written = os.pwrite(j.fd, data, j.length)
            if written != len(data):
                # A short write (disk full): the next append overwrites it at the same offset.
                raise OSError(errno.ENOSPC, f"short journal write ({written} of {len(data)} bytes)")
            j.length += written
        except OSError as exc:
            raise _backend_error(f"journal uuid={uuid!r} luid={luid:#x}", exc) from exc

    def _journal_for_unknown(self, uuid: str, luid: int) -> _Journal:
        """A journal write for an instance this process has not recorded or restored: only
        possible if its meta exists (its record() failed, or a caller skipped restore())."""
        e = self._env(uuid, create=False)
        if e is None:
            raise BackendError(errno.ENOENT, "no store for this uuid: the instance was never recorded")
        with e.env.begin() as txn:
            raw = self._get_record(e, txn, instance_db_name("meta", luid), missing_ok=True)
        if raw is None:
            raise BackendError(errno.ENOENT, "instance was never recorded")
        meta = MetaRecord.decode(raw)
        j = self._journal_state(e, luid, meta.commit_seq)
        j.seq, j.seq_trusted = meta.commit_seq, True
        return j

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
                items.append((key, seal_chunk(name, key, bits)))
            puts.append((name, items))
        meta_name = instance_db_name("meta", rec.luid)
        tail_key = encode_chunk_key(count)
        last_key = encode_chunk_key(count - 1)
        last_length = chunk_length(count - 1, rec.region_count, cb) + CHECKSUM_SIZE
        # The commit sequence: from memory when the last write of this meta is known to have
        # landed (record, restore, a successful commit), else read back from the store.
        j = self._journals.get((e.uuid, rec.luid))
        known = j is not None and j.seq_trusted
        seq = j.seq + 1 if known else 0
        meta_raw = record_value(meta_name, MetaRecord.from_instance(rec, seq).encode()) if known else b""
        fallback_seq = None if known else self._journal_seq_on_disk(e, rec.luid)

        def body(txn: lmdb.Transaction) -> int:
            meta_db = self._db(e, txn, meta_name, create=True)
            new_seq, raw = seq, meta_raw
            if not known:
                old = txn.get(RECORD_KEY, db=meta_db)
                # No meta: the CTR's record() failed, and this commit creates the instance.
                new_seq = ((fallback_seq or 0) + 1 if old is None
                           else MetaRecord.decode(record_bytes(meta_name, old)).commit_seq + 1)
                raw = record_value(meta_name, MetaRecord.from_instance(rec, new_seq).encode())
            txn.put(RECORD_KEY, raw, db=meta_db)
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
            return new_seq

        try:
            done_seq = self._write(e, body)
        except (lmdb.Error, OSError, StoreFormatError) as exc:
            if j is not None:
                # A commit that failed late (an fsync error) may have landed all the same: read
                # the sequence back next time rather than trust memory.
                j.seq_trusted = False
            raise _backend_error(what, exc) from exc
        self._journal_after_commit(e, rec.luid, done_seq)

    def drop(self, uuid: str, luid: int, retain: StoredState | None) -> None:
        what = f"drop uuid={uuid!r} luid={luid:#x}"
        try:
            e = self._env(uuid, create=retain is not None)
        except BackendError:
            self._journal_close(uuid, luid)
            raise
        if e is None:
            self._journal_close(uuid, luid)
            return
        cb = regionlog.CHUNK_BYTES
        retained_puts: list[tuple[bytes, dict[int, bytes]]] = []
        retained_raw = b""
        if retain is not None:
            retained_raw = record_value(RETAINED_META, RetainedRecord(
                uuid=uuid, generation=retain.generation, region_count=retain.region_count,
                source_luid=retain.source_luid, committed_at=retain.committed_at,
            ).encode())
            retained_puts = [
                (RETAINED_CLEAN, split_chunks(retain.clean, retain.region_count, cb)),
                (RETAINED_SYNC, split_chunks(retain.sync, retain.region_count, cb)),
            ]

        def body(txn: lmdb.Transaction) -> None:
            if retain is not None:
                txn.put(RECORD_KEY, retained_raw, db=self._db(e, txn, RETAINED_META, create=True))
                for name, chunks in retained_puts:
                    db = self._db(e, txn, name, create=True)
                    txn.drop(db, delete=False)
                    for index, bits in chunks.items():
                        key = encode_chunk_key(index)
                        txn.put(key, seal_chunk(name, key, bits), db=db)
            for kind in ("meta", "clean", "sync"):
                db = self._db(e, txn, instance_db_name(kind, luid), create=False)
                if db is not None:
                    txn.drop(db, delete=True)

        try:
            self._write(e, body)
        except (lmdb.Error, OSError, StoreFormatError) as exc:
            raise _backend_error(what, exc) from exc
        j = self._journal_close(uuid, luid)
        path = j.path if j is not None else e.path / journal_file_name(luid)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            # The instance is gone from the store; a leftover journal has no meta to follow
            # and is never read (a later CTR of this luid rewrites it).
            log.warning("%s: journal file not removed (%s)", what, exc)

    def restore(self) -> Restored:
        restored = Restored()
        if not self.state_dir.is_dir():
            return restored
        for entry in sorted(os.scandir(self.state_dir), key=lambda d: d.name):
            if not entry.is_dir(follow_symlinks=False):
                continue  # the daemon's lock file, stray files
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
            restored.instances.extend(instances)
            if retained is not None:
                restored.retained[uuid] = retained
            # Reading every chunk faulted the whole map in; unmapping drops those pages from the
            # daemon's RSS (the engine holds the bitmaps now). The next commit reopens the env.
            self._forget_env(uuid)
        return restored

    def release(self, uuid: str) -> None:
        """The uuid's last instance is gone: close its environment (descriptors, map), so that
        short-lived mirrors (pvmove) do not pile up open environments for the daemon's life."""
        self._forget_env(uuid)

    def _forget_env(self, uuid: str) -> None:
        with self._open_lock, self._lock:
            e = self._envs.pop(uuid, None)
        if e is not None:
            with e.lock:
                e.env.close()

    def _read_env(self, e: _Env) -> tuple[list[StoredInstance], StoredState | None]:
        """Read and verify one environment; StoreFormatError on anything that does not add up."""
        cb = regionlog.CHUNK_BYTES
        found: list[tuple[MetaRecord, bytes, bytes]] = []
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
                bitmaps = []
                for bitmap_kind in ("clean", "sync"):
                    db_name = instance_db_name(bitmap_kind, luid)
                    db = self._db(e, txn, db_name, create=False)
                    chunks = {} if db is None else self._read_chunks(txn, db, db_name)
                    try:
                        bitmaps.append(assemble_chunks(chunks, meta.region_count, cb))
                    except StoreFormatError as exc:
                        raise StoreFormatError(f"{bitmap_kind}.{luid:016x}: {exc}") from exc
                found.append((meta, bitmaps[0], bitmaps[1]))
            raw = self._get_record(e, txn, RETAINED_META, missing_ok=True)
            if raw is not None:
                rr = RetainedRecord.decode(raw)
                if rr.uuid != e.uuid:
                    raise StoreFormatError(f"retained state names uuid {rr.uuid!r}")
                bitmaps = []
                for name in (RETAINED_CLEAN, RETAINED_SYNC):
                    db = self._db(e, txn, name, create=False)
                    chunks = {} if db is None else self._read_chunks(txn, db, name)
                    try:
                        bitmaps.append(assemble_chunks(chunks, rr.region_count, cb))
                    except StoreFormatError as exc:
                        raise StoreFormatError(f"{name.decode()}: {exc}") from exc
                retained = StoredState(
                    uuid=e.uuid, generation=rr.generation, region_count=rr.region_count,
                    clean=bitmaps[0], sync=bitmaps[1], source_luid=rr.source_luid,
                    committed_at=rr.committed_at,
                )
        # Journals are read after the transaction: they are plain files, and the LMDB reader
        # slot should not be held while reading them.
        instances = []
        for meta, clean, sync in found:
            ops, damaged = self._read_journal(e, meta)
            instances.append(StoredInstance(record=meta.instance(), clean=clean, sync=sync,
                                            journal=ops, journal_damaged=damaged))
        return instances, retained

    def _move_aside(self, uuid: str, path: Path) -> Path | None:
        """Close the uuid's environment and rename its directory out of the way, so the uuid
        starts from nothing (a full resync) and the bad data stays for inspection."""
        with self._lock:
            e = self._envs.pop(uuid, None)
            keys = [k for k in self._journals if k[0] == uuid]
        for key in keys:
            self._journal_close(*key)
        if e is not None:
            e.env.close()
        now = int(time.time())
        for attempt in range(1000):
            target = path.with_name(damaged_dir_name(path.name, now, attempt))
            if target.exists():
                continue
            try:
                os.rename(path, target)
                _fsync_dir(self.state_dir)
            except OSError as exc:
                log.error("could not move the damaged store %s aside: %s", path, exc)
                return None
            return target
        return None  # pragma: no cover - a thousand moved-aside stores in one second

    def close(self) -> None:
        with self._open_lock, self._lock:
            self._closed = True
            envs = list(self._envs.values())
            self._envs.clear()
            journals = list(self._journals.values())
            self._journals.clear()
        for j in journals:
            if j.fd is not None:
                os.close(j.fd)
                j.fd = None
        for e in envs:
            with e.lock:
                e.env.close()

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

