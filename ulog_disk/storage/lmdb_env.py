"""LMDB environments of the store: opening one safely, the cache of open ones, write
transactions, and moving a damaged one aside. Nothing here knows a record's layout
(:mod:`ulog_disk.storage.store_format`) or what the backend stores.

Durability: every environment is opened with LMDB's durable settings (``sync=True``,
``metasync=True``, no ``writemap``), so a write transaction that returns is on stable storage,
and a crash leaves the previous or the new transaction, never a mix.

Cost per idle mirror: none. Environments are opened when a store call or the restore needs them
and at most ``max_open_envs`` stay open (least recently used closed first), so the descriptors do
not grow with the number of mirrors.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import lmdb

from . import journal as jn
from .base import BackendError
from .store_format import StoreFormatError, damaged_dir_name, encode_dir_name

log = logging.getLogger("ulog_disk.storage.lmdb")

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
class Env:
    """One open environment: a uuid's store."""

    uuid: str
    path: Path
    env: lmdb.Environment
    map_size: int
    #: Held around every transaction (store calls come one at a time; tools and tests may not).
    lock: threading.RLock = field(default_factory=threading.RLock)


def backend_error(what: str, exc: BaseException) -> BackendError:
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


def check_pages(path: Path, env: lmdb.Environment, data_bytes: int | None = None) -> dict[str, int]:
    """StoreFormatError unless ``data.mdb`` holds every page its meta page counts: reading a page
    past the end of a truncated file through the map is a SIGBUS, not an error. Returns the
    environment's ``info()``. ``data_bytes``: the file's size, stat'ed since the open (else here)."""
    if data_bytes is None:
        data_bytes = os.stat(os.path.join(path, "data.mdb")).st_size
    info = env.info()
    needed = (info["last_pgno"] + 1) * env.stat()["psize"]
    if data_bytes < needed:
        raise StoreFormatError(f"data.mdb has {data_bytes} bytes, its meta page needs {needed}: "
                               f"the file was truncated")
    return info


def open_readonly(path: Path) -> lmdb.Environment:
    """An environment opened read-only, as any LMDB reader (it registers in the reader table and
    never waits for the daemon's writes), checked against truncation before anything is read."""
    env = lmdb.open(str(path), readonly=True, lock=True, subdir=True, max_dbs=MAX_DBS, create=False,
                    mode=FILE_MODE)
    try:
        check_pages(path, env)
    except BaseException:
        env.close()
        raise
    return env


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def open_env(uuid: str, path: Path, state_dir: Path, map_size: int, max_dbs: int,
             create: bool = True) -> tuple[Env, bool] | None:
    """Open (making it if absent) the environment of ``uuid`` at ``path`` for reading and writing;
    (the environment, whether it was made now); None if absent and not ``create``. Raises
    lmdb.Error, OSError or StoreFormatError.

    A restart opens every store once: each file is stat'ed once before the open (and
    ``data.mdb`` once after it), by string paths."""
    where = os.fspath(path)
    found = _stat(where)
    created = found is None or not stat.S_ISDIR(found.st_mode)
    if created:
        if not create:
            return None
        state_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.mkdir(where, DIR_MODE)
    if created or stat.S_IMODE(found.st_mode) != DIR_MODE:  # type: ignore[union-attr]
        os.chmod(where, DIR_MODE)  # mkdir's mode is filtered by the umask; be exact
    data_file = os.path.join(where, "data.mdb")
    if not created and (data := _stat(data_file)) is not None and data.st_size == 0:
        # LMDB would start an empty environment over it. An environment's directory is made
        # together with its first transaction, so its data was there, and is lost.
        raise StoreFormatError("data.mdb is empty: the store's data was lost")
    lock_file = os.path.join(where, "lock.mdb")
    lock = None if created else _stat(lock_file)
    if lock is None:
        # LMDB sizes a new lock file with ftruncate and writes it through its map: on a full
        # filesystem that is a SIGBUS, not an error. Written with write(), a full disk is ENOSPC.
        fd = os.open(lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            os.write(fd, bytes(LOCK_FILE_BYTES))
        except OSError:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_file)
            raise
        os.close(fd)
    env = lmdb.open(
        where, map_size=map_size, subdir=True, max_dbs=max_dbs,
        sync=True, metasync=True, writemap=False, map_async=False, mode=FILE_MODE, create=True,
        lock=True,
    )
    try:
        data = os.stat(data_file)
        info = check_pages(path, env, data.st_size)
        # The umask filters the modes of files made now (LMDB's, or the lock file above).
        for name, mode in ((data_file, data.st_mode), (lock_file, lock.st_mode if lock else None)):
            if mode is None:
                mode = os.stat(name).st_mode
            if mode & 0o777 != FILE_MODE:
                os.chmod(name, FILE_MODE)
    except BaseException:
        env.close()
        raise
    return Env(uuid=uuid, path=path, env=env, map_size=info["map_size"]), created


def open_db(e: Env, txn: lmdb.Transaction, name: bytes, create: bool) -> lmdb._Database | None:
    """The named sub-database, or None if it does not exist and not ``create``."""
    try:
        return e.env.open_db(name, txn=txn, create=create)
    except lmdb.NotFoundError:
        return None


def write(e: Env, body: Callable[[lmdb.Transaction], T]) -> T:
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
                _grow(e)
            except BaseException:
                txn.abort()
                raise


def _grow(e: Env) -> None:
    new = max(e.map_size, e.env.info()["map_size"]) * 2
    if new > MAX_MAP_SIZE:
        raise BackendError(errno.ENOSPC, f"store of uuid={e.uuid!r} would outgrow {MAX_MAP_SIZE} bytes")
    # No transaction of this environment is open: calls for one uuid are serialized.
    e.env.set_mapsize(new)
    e.map_size = new
    log.info("store of uuid=%r: map grown to %d MiB", e.uuid, new >> 20)


class EnvCache:
    """The open environments of a state directory, at most ``max_open`` of them (least recently
    used closed first). ``prepare`` runs on every environment just opened (the format check and
    migration); it returns whether it wrote the environment's first record."""

    def __init__(self, state_dir: Path, map_size: int, max_dbs: int, max_open: int,
                 prepare: Callable[[Env], bool]):
        self.state_dir = state_dir
        self.map_size = map_size
        self.max_dbs = max_dbs
        self.max_open = max_open
        self.prepare = prepare
        self.lock = threading.RLock()
        self.envs: collections.OrderedDict[str, Env] = collections.OrderedDict()
        self.closed = False

    def path(self, uuid: str) -> Path:
        return self.state_dir / encode_dir_name(uuid)

    def get(self, uuid: str, create: bool) -> Env | None:
        """The uuid's open environment; None if absent and not ``create``. Raises BackendError
        when it cannot be opened or verified."""
        with self.lock:
            found = self.envs.get(uuid)
            if found is not None:
                self.envs.move_to_end(uuid)
                return found
            if self.closed:
                raise BackendError(errno.EBADF, "the LMDB backend is closed")
            try:
                path = self.path(uuid)
            except ValueError as exc:
                raise BackendError(errno.EINVAL, f"uuid {uuid!r} cannot name a store: {exc}") from exc
            if not create and not os.path.isdir(path):
                return None
            while len(self.envs) >= self.max_open:
                _, oldest = self.envs.popitem(last=False)
                with oldest.lock:
                    oldest.env.close()
            try:
                opened = self._open(uuid, path, create)
            except (lmdb.Error, OSError, StoreFormatError) as exc:
                raise backend_error(f"store of uuid={uuid!r} at {path}", exc) from exc
            if opened is not None:
                self.envs[uuid] = opened
            return opened

    def _open(self, uuid: str, path: Path, create: bool) -> Env | None:
        found = open_env(uuid, path, self.state_dir, self.map_size, self.max_dbs, create)
        if found is None:
            return None
        e, created = found
        try:
            if self.prepare(e) or created:
                # The environment's directory entry and files must outlive a host crash as
                # much as its first commit does.
                jn.fsync_dir(path)
                jn.fsync_dir(self.state_dir)
        except BaseException:
            e.env.close()
            raise
        return e

    def forget(self, uuid: str) -> None:
        """Close the uuid's environment if it is open (descriptors, map)."""
        with self.lock:
            e = self.envs.pop(uuid, None)
        if e is not None:
            with e.lock:
                e.env.close()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            envs = list(self.envs.values())
            self.envs.clear()
        for e in envs:
            with e.lock:
                e.env.close()


def move_aside(state_dir: Path, path: Path) -> Path | None:
    """Rename a damaged environment's directory out of the way (``<name>.damaged-<time>``), so its
    uuid starts from nothing (a full resync) and the bad data stays for inspection; None if it
    could not be moved. The caller closes it first."""
    now = int(time.time())
    for attempt in range(1000):
        target = path.with_name(damaged_dir_name(path.name, now, attempt))
        if target.exists():
            continue
        try:
            os.rename(path, target)
            jn.fsync_dir(state_dir)
        except OSError as exc:
            log.error("could not move the damaged store %s aside: %s", path, exc)
            return None
        return target
    return None  # pragma: no cover - a thousand moved-aside stores in one second


def contents(e: Env) -> dict[bytes, dict[bytes, bytes]]:
    """Every record of an environment, raw: sub-database name → {key: value}; the main
    database's own records (not sub-database descriptors) under ``b""`` (tests, inspection)."""
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
