"""The dirty-log state of one log instance, without I/O.

Semantics follow the kernel's own logs (drivers/md/dm-log.c) as the mirror target expects them
(protocol ref §4, §4.8), with the deliberate differences the issue asks for:

* ``clean`` bit = 1: no write in flight (the kernel's "clean bits", what a disk log stores).
  ``sync`` bit = 1: the legs hold the same data for the region.
* MARK clears the clean bit; CLEAR sets it again only for a region that is in sync (a clear of a
  region that fell out of sync leaves it dirty, so a crash before its recovery cannot lose it).
* GET_RESYNC_WORK hands out one region at a time and hands the *same* region out again until
  SET_REGION_SYNC reports on it: the kernel re-sends a request after 15 s with a new seq, and the
  repeat must not skip a region.
* The cursor restarts at 0 on every RESUME; ``sync_count`` is kept incrementally, never recounted
  on the request path.

Bitmaps are ``bitarray`` objects in little-endian bit order, so their bytes are exactly the
kernel's ``disk`` log bitmap layout (bit r%8 of byte r/8). Changes are tracked per chunk of
:data:`CHUNK_BYTES` so a commit can write what changed and nothing else.

Invariants (checked by :meth:`RegionLog.check` and by the property tests):

* ``sync_count == sync.count(1)``
* bits at and past ``region_count`` (the padding of the last byte) are 0 in both maps
* ``recovering`` is None or a region that is not in sync
* ``first_unsynced_hint`` <= the lowest region whose sync bit is 0
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from bitarray import bitarray
from bitarray.util import zeros

from .records import OP_CLEAR, OP_MARK, OP_SET_NOSYNC, OP_SET_SYNC

#: Bitmap bytes per stored chunk: 4076 bytes = 32608 regions, which with the chunk's 4-byte
#: checksum (store layout 2) is exactly one LMDB overflow page (a 4 KiB page less its 16-byte
#: header). Any value above ~2 KiB is an overflow value on 4 KiB pages, so 2048 or 4096 bytes
#: would waste half a page or take two; measured against 1024..8192 (same commit latency and
#: page writes per changed chunk, half the file size and the fastest full write and restore):
#: formats/store.md, "Chunk size".
CHUNK_BYTES = 4076
CHUNK_BITS = CHUNK_BYTES * 8


def new_bitmap(region_count: int, value: bool) -> bitarray:
    """A bitmap padded to whole bytes, padding bits 0."""
    bits = zeros(padded_bits(region_count), endian="little")
    if value:
        bits[:region_count] = 1
    return bits


def bitmap_from_bytes(data: bytes, region_count: int) -> bitarray:
    """The engine's form: padded to whole bytes, padding bits 0."""
    bits = bitarray(endian="little")
    bits.frombytes(data)
    resize(bits, region_count)
    return bits


def exact_bits(data: bytes, count: int) -> bitarray:
    """Exactly ``count`` bits of little-endian bitmap bytes, zeros past the data's end: the form
    the tools and the disk-log codec read (no padding bits to mistake for regions)."""
    bits = bitarray(endian="little")
    bits.frombytes(bytes(data))
    if len(bits) < count:
        bits.extend(zeros(count - len(bits), endian="little"))
    del bits[count:]
    return bits


def padded_bits(region_count: int) -> int:
    return ((region_count + 7) // 8) * 8


def resize(bits: bitarray, region_count: int) -> None:
    """Grow with zeros or shrink to ``region_count``; padding bits end up 0."""
    want = padded_bits(region_count)
    if len(bits) < want:
        bits.extend(zeros(want - len(bits), endian="little"))
    del bits[want:]
    bits[region_count:] = 0


def chunk_count(region_count: int, chunk_bytes: int | None = None) -> int:
    """How many chunks (keys of a store's bitmap) ``region_count`` regions take, at least one;
    ``chunk_bytes`` defaults to :data:`CHUNK_BYTES` as it is at the call."""
    size = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(1, -(-((region_count + 7) // 8) // size))


def format_ranges(regions: list[int]) -> str:
    """[0,1,2,5,7,8] → '0-2,5,7-8' (sorted input)."""
    parts: list[str] = []
    start = prev = None
    for r in regions:
        if start is None:
            start = prev = r
        elif r == prev + 1:
            prev = r
        else:
            parts.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = prev = r
    if start is not None:
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
    return ",".join(parts)


@dataclass
class RegionLog:
    region_count: int
    clean: bitarray
    sync: bitarray
    sync_count: int
    #: Where the next search for resync work starts; reset to 0 at every RESUME.
    cursor: int = 0
    #: The region handed out by GET_RESYNC_WORK and not yet reported by SET_REGION_SYNC.
    recovering: int | None = None
    first_unsynced_hint: int = 0
    dirty_clean_chunks: set[int] = field(default_factory=set)
    dirty_sync_chunks: set[int] = field(default_factory=set)
    #: The kernel's traffic changed a bit since the last commit (a new generation of the state).
    modified: bool = False

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def fresh(cls, region_count: int, in_sync: bool) -> RegionLog:
        """State of a new log: everything clean; in sync only with ``nosync`` (dm-log.c)."""
        log = cls(
            region_count=region_count,
            clean=new_bitmap(region_count, True),
            sync=new_bitmap(region_count, in_sync),
            sync_count=region_count if in_sync else 0,
        )
        log.mark_all_chunks_dirty()
        return log

    @classmethod
    def from_bitmaps(cls, region_count: int, clean: bytes, sync: bytes, cursor: int = 0) -> RegionLog:
        sync_bits = bitmap_from_bytes(sync, region_count)
        return cls(
            region_count=region_count,
            clean=bitmap_from_bytes(clean, region_count),
            sync=sync_bits,
            sync_count=sync_bits.count(1),
            cursor=cursor,
        )

    def copy(self) -> RegionLog:
        return RegionLog(
            region_count=self.region_count, clean=self.clean.copy(), sync=self.sync.copy(),
            sync_count=self.sync_count, cursor=self.cursor, recovering=self.recovering,
            first_unsynced_hint=self.first_unsynced_hint,
        )

    def adopted(self, region_count: int, new_regions_in_sync: bool) -> RegionLog:
        """This state as taken over by a new kernel instance (new luid, or the kernel rebooted).

        The new instance's region hash knows nothing of this one's writes, so regions that are
        marked and not cleared are out of sync: they are resynced, never trusted. The region
        count may differ (resize): new regions are out of sync, or in sync with ``nosync``.
        """
        clean = self.clean.copy()
        sync = self.sync.copy()
        sync &= clean
        old = self.region_count
        for bits, fill in ((clean, True), (sync, new_regions_in_sync)):
            resize(bits, region_count)
            if region_count > old:
                bits[old:region_count] = fill
        log = RegionLog(region_count=region_count, clean=clean, sync=sync, sync_count=sync.count(1))
        log.mark_all_chunks_dirty()
        return log

    def mark_all_chunks_dirty(self) -> None:
        n = chunk_count(self.region_count)
        self.dirty_clean_chunks = set(range(n))
        self.dirty_sync_chunks = set(range(n))

    # --- requests --------------------------------------------------------------------------

    def check_region(self, region: int) -> None:
        if not 0 <= region < self.region_count:
            raise IndexError(f"region {region} out of range (region count {self.region_count})")

    # The region requests' path: the range test inline, check_region only to raise.

    def is_clean(self, region: int) -> bool:
        if not 0 <= region < self.region_count:
            self.check_region(region)
        return bool(self.clean[region])

    def in_sync(self, region: int) -> bool:
        if not 0 <= region < self.region_count:
            self.check_region(region)
        return bool(self.sync[region])

    def mark(self, regions: list[int]) -> None:
        count = self.region_count
        for r in regions:
            if not 0 <= r < count:
                self.check_region(r)
        for r in regions:
            if self.clean[r]:
                self.clean[r] = 0
                self.dirty_clean_chunks.add(r // CHUNK_BITS)
                self.modified = True

    def distrust_all(self) -> None:
        """Every region dirty and out of sync: what is left when the requests answered since the
        last commit are unknown (a damaged journal: a lost MARK or SET_REGION_SYNC(r, 0) must
        not read as clean or in sync). The next resume resyncs everything."""
        self.clean.setall(0)
        self.sync.setall(0)
        self.sync_count = 0
        self.first_unsynced_hint = 0
        self.mark_all_chunks_dirty()
        self.modified = True

    def clear(self, regions: list[int]) -> None:
        for r in regions:
            self.check_region(r)
        for r in regions:
            if not self.clean[r] and self.sync[r]:
                self.clean[r] = 1
                self.dirty_clean_chunks.add(r // CHUNK_BITS)
                self.modified = True

    def get_resync_work(self) -> int | None:
        if self.recovering is not None:
            return self.recovering
        if self.cursor >= self.region_count:
            return None
        r = self.sync.find(0, self.cursor, self.region_count)
        if r < 0:
            self.cursor = self.region_count
            return None
        self.cursor = r + 1
        self.recovering = r
        return r

    def replay(self, ops: Iterable[tuple[int, int]]) -> int:
        """Apply journaled requests (``OP_*`` codes of :mod:`ulog_disk.storage.base`) in order,
        by the same rules as when they were answered; ops for regions past the log are skipped.
        Returns how many were applied."""
        applied = 0
        for op, region in ops:
            if not 0 <= region < self.region_count:
                continue
            if op == OP_MARK:
                self.mark([region])
            elif op == OP_CLEAR:
                self.clear([region])
            elif op in (OP_SET_SYNC, OP_SET_NOSYNC):
                self.set_region_sync(region, op == OP_SET_SYNC)
            applied += 1
        return applied

    def set_region_sync(self, region: int, in_sync: bool) -> None:
        self.check_region(region)
        if self.recovering == region:
            self.recovering = None
        if in_sync:
            if not self.sync[region]:
                self.sync[region] = 1
                self.sync_count += 1
                self.dirty_sync_chunks.add(region // CHUNK_BITS)
                self.modified = True
        elif self.sync[region]:
            self.sync[region] = 0
            self.sync_count -= 1
            self.dirty_sync_chunks.add(region // CHUNK_BITS)
            self.modified = True
            self.first_unsynced_hint = min(self.first_unsynced_hint, region)

    def first_unsynced(self) -> int:
        """Lowest region not in sync, or region_count when every region is in sync."""
        if self.sync_count == self.region_count:
            self.first_unsynced_hint = self.region_count
            return self.region_count
        r = self.sync.find(0, self.first_unsynced_hint, self.region_count)
        if r < 0:  # pragma: no cover - only if sync_count were wrong
            r = self.region_count
        self.first_unsynced_hint = r
        return r

    def restart_recovery(self) -> None:
        """At RESUME: the cursor starts again from the first region (dm-log.c resume)."""
        self.cursor = 0
        self.recovering = None
        self.first_unsynced_hint = 0

    # --- commits ---------------------------------------------------------------------------

    def take_changes(self) -> tuple[dict[int, bytes], dict[int, bytes], bool]:
        """Copies of the chunks changed since the last call, and whether the kernel's traffic
        changed anything: what the next commit writes."""
        clean = {i: self.chunk_bytes(self.clean, i) for i in sorted(self.dirty_clean_chunks)}
        sync = {i: self.chunk_bytes(self.sync, i) for i in sorted(self.dirty_sync_chunks)}
        modified = self.modified
        self.dirty_clean_chunks = set()
        self.dirty_sync_chunks = set()
        self.modified = False
        return clean, sync, modified

    def take_chunks(self) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Copies of the chunks changed since the last call (what a checkpoint writes); the
        ``modified`` flag is left to the commit points (FLUSH, RESUME, POSTSUSPEND)."""
        clean = {i: self.chunk_bytes(self.clean, i) for i in sorted(self.dirty_clean_chunks)}
        sync = {i: self.chunk_bytes(self.sync, i) for i in sorted(self.dirty_sync_chunks)}
        self.dirty_clean_chunks = set()
        self.dirty_sync_chunks = set()
        return clean, sync

    def take_modified(self) -> bool:
        """Whether the kernel's traffic changed anything since the last call."""
        modified, self.modified = self.modified, False
        return modified

    def restore_changes(self, clean: dict[int, bytes], sync: dict[int, bytes], modified: bool) -> None:
        """A commit failed: its chunks must be written by the next one."""
        self.dirty_clean_chunks.update(clean)
        self.dirty_sync_chunks.update(sync)
        self.modified = self.modified or modified

    def chunk_bytes(self, bits: bitarray, index: int) -> bytes:
        start = index * CHUNK_BITS
        return bits[start : start + CHUNK_BITS].tobytes()

    # --- views -----------------------------------------------------------------------------

    def dirty_regions(self) -> list[int]:
        return list(self.clean[: self.region_count].search(0))

    def unsynced_regions(self) -> list[int]:
        return list(self.sync[: self.region_count].search(0))

    def check(self) -> list[str]:
        problems = []
        if self.sync_count != self.sync.count(1):
            problems.append(f"sync_count {self.sync_count} != popcount {self.sync.count(1)}")
        for name, bits in (("clean", self.clean), ("sync", self.sync)):
            if bits[self.region_count :].any():
                problems.append(f"{name} bitmap has bits set past region_count")
        if self.recovering is not None and self.sync[self.recovering]:
            problems.append(f"recovering region {self.recovering} is already in sync")
        return problems
