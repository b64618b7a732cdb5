"""An environment's format record, checked when the backend opens it, and the migration of a
store of an older layout (1 or 2) or another chunk size to the current one.

The migration reads the store with the one reader (:mod:`.lmdb_reader`), folds each instance's
layout-1/2 journal file in by :func:`.lmdb_reader.old_journal`'s judgement and the restart's rule
(:func:`ulog_disk.log.restore.replayed`), and rewrites everything in one transaction: a crash leaves
the old store or the new one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import lmdb

from ..log import regionlog, restore
from . import store_format as sf
from .lmdb_env import Env, open_db, write
from .lmdb_reader import decode_store, format_mismatch, old_journal, read_format, snapshot

log = logging.getLogger("ulog_disk.storage.lmdb")

#: Where the journal a store follows is, and up to where: (journal id, position).
JournalRef = Callable[[], tuple[bytes, int]]


def check_format(e: Env, journal_ref: JournalRef, boot_id: str) -> bool:
    """Verify the environment's format record; write it into a new environment (and say so:
    True); migrate an environment of an older layout or another chunk size (``journal_ref``: the
    journal its instances follow from now on; ``boot_id``: the boot whose instances' journal files
    are folded in). Raises StoreFormatError when the environment is not a store of its uuid."""
    with e.env.begin() as txn:
        raw = txn.get(sf.FORMAT_KEY)
        entries = e.env.stat()["entries"]
    if raw is None:
        if entries:
            raise sf.StoreFormatError("the environment holds data but no format record")
        new = sf.FormatRecord(chunk_bytes=regionlog.CHUNK_BYTES, uuid=e.uuid, created_at=time.time())
        fmt = sf.format_value(new)
        write(e, lambda txn: txn.put(sf.FORMAT_KEY, fmt))
        return True
    found = read_format(raw)
    if (why := format_mismatch(found, e.uuid)) is not None:
        raise sf.StoreFormatError(why)
    # regionlog.CHUNK_BYTES read at each call: the tests write stores with other chunk sizes.
    want = regionlog.CHUNK_BYTES
    if found.version != sf.LAYOUT_VERSION or found.chunk_bytes != want:
        log.info("store of uuid=%r: rewriting it from layout %d, %d bytes per chunk, to layout %d, %d bytes "
                 "per chunk", e.uuid, found.version, found.chunk_bytes, sf.LAYOUT_VERSION, want)
        migrate(e, found, journal_ref, boot_id)
    return False


def migrate(e: Env, fmt: sf.FormatRecord, journal_ref: JournalRef, boot_id: str) -> None:
    """Rewrite every record and bitmap in the current layout with ``regionlog.CHUNK_BYTES`` bytes
    per chunk, and the format record, in one transaction.

    From layout 1 (no checksums) values are read as they are and written sealed. From layouts 1
    and 2, each instance's own journal file (``journal.<luid>``) is folded in and the instance
    gets a checkpoint record at the journal's current end; the files are removed once the
    transaction is durable. Anything the reader finds damaged fails the migration
    (StoreFormatError): the store is then refused as a whole, as it would be at restore.
    """
    old_layout = fmt.version
    new_fmt = sf.FormatRecord(chunk_bytes=regionlog.CHUNK_BYTES, uuid=fmt.uuid, created_at=fmt.created_at)
    journal_id, position = journal_ref()
    journal_files = sorted(e.path.glob("journal.*")) if old_layout < 3 else []

    def body(txn: lmdb.Transaction) -> None:
        snap = snapshot(e.env, txn)
        contents = decode_store(snap, e.uuid)
        if (why := contents.damage()) is not None:
            raise sf.StoreFormatError(why)
        groups: list[tuple[bytes, bytes, bytes, int, bytes, bytes]] = []
        for inst in contents.instances:
            meta = inst.meta
            assert meta is not None
            meta_name = sf.instance_db_name("meta", inst.luid)
            clean, sync = inst.clean, inst.sync
            if old_layout < 3:
                clean, sync = _fold(e, meta, clean, sync, boot_id)
                ckpt = sf.checkpoint_value(meta_name, sf.CheckpointRecord(journal_id, position))
                txn.put(sf.CHECKPOINT_KEY, ckpt, db=open_db(e, txn, meta_name, create=True))
            luid = inst.luid
            groups.append((meta_name, sf.instance_db_name("clean", luid), sf.instance_db_name("sync", luid),
                           meta.region_count, clean, sync))
        r = contents.retained
        if r is not None and r.record is not None:
            count = r.record.region_count
            groups.append((sf.RETAINED_META, sf.RETAINED_CLEAN, sf.RETAINED_SYNC, count, r.clean, r.sync))
        for meta_name, clean_name, sync_name, region_count, clean, sync in groups:
            # The record's own bytes, sealed in the current layout.
            raw = sf.record_bytes(meta_name, snap.subs[meta_name][sf.RECORD_KEY], fmt.sealed)
            txn.put(sf.RECORD_KEY, sf.record_value(meta_name, raw),
                    db=open_db(e, txn, meta_name, create=True))
            for name, bitmap in ((clean_name, clean), (sync_name, sync)):
                db = open_db(e, txn, name, create=True)
                txn.drop(db, delete=False)
                for index, bits in sf.split_chunks(bitmap, region_count, regionlog.CHUNK_BYTES).items():
                    key = sf.encode_chunk_key(index)
                    txn.put(key, sf.seal(name, key, bits), db=db)
        txn.put(sf.FORMAT_KEY, sf.format_value(new_fmt))

    write(e, body)
    for path in journal_files:
        try:
            path.unlink()
        except OSError as exc:
            log.warning("store of uuid=%r: old journal %s not removed (%s); it is never read again",
                        e.uuid, path.name, exc)


def _fold(e: Env, meta: sf.MetaRecord, clean: bytes, sync: bytes, boot_id: str) -> tuple[bytes, bytes]:
    """Layouts 1-2: the instance's bitmaps with its own journal file folded in."""
    try:
        data: bytes | None = (e.path / sf.journal_file_name(meta.luid)).read_bytes()
    except FileNotFoundError:
        data = None
    j = old_journal(meta, data, boot_id)
    if j.damaged is not None:
        log.error("store of uuid=%r luid=%#x: %s: every region is taken as dirty and out of sync",
                  e.uuid, meta.luid, j.damaged)
    elif not j.folded:
        return clean, sync
    rebuilt = restore.replayed(meta.region_count, clean, sync, j.ops if j.folded else [], j.damaged)
    if j.folded:
        log.info("store of uuid=%r luid=%#x: %d op(s) of its layout-2 journal folded in%s", e.uuid, meta.luid,
                 rebuilt.replayed, f" ({j.cut})" if j.cut else "")
    return rebuilt.log.clean.tobytes(), rebuilt.log.sync.tobytes()
