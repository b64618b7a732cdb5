"""The kernel's ``disk`` dirty log as it sits on its log device, defined once (``formats/disklog.md``).

This is the layout ``drivers/md/dm-log.c`` reads at every resume of a ``mirror ... disk`` table and
writes at every flush (protocol ref §6); LVM's plain (non-cluster) mirror logs and cmirrord's
``clustered-disk`` logs use the same bytes. It is written here once, as construct definitions;
``ulog-dump disklog`` and ``ulog-recover export/import`` read and write it only through this module.

Layout::

    offset 0     u32 LE  magic       0x4D695272 ("MiRr" read as a little-endian u32; bytes 72 52 69 4d)
    offset 4     u32 LE  version     2 (1 is accepted, as 2, by little-endian kernels)
    offset 8     u64 LE  nr_regions  region count at the last resume
    offset 16    1008 bytes          not used by the log (read and written back unchanged)
    offset 1024  bitset_bytes        clean bits: bit r % 8 of byte 1024 + r / 8 is region r

``bitset_bytes(n) = round_up(n, 32) / 8``. A bit of 1 means the region is clean *and* in sync: the
kernel keeps only clean bits on disk and rebuilds the sync bits from them at resume.

What the kernel does with it at resume (``disk_resume``/``read_header``, default sync mode): a bad
magic means "new log" (``nr_regions`` taken as 0); a version other than 2 (or 1 on little-endian
hosts) fails the read, marks the log device failed and also starts from ``nr_regions`` 0; regions
at and past ``nr_regions`` become dirty (a grown device); bits past the table's region count are
cleared; the header is written back with the table's region count.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

import construct as c
from bitarray import bitarray
from bitarray.util import zeros

from ..log.regionlog import exact_bits
from ..protocol.geometry import MAX_REGION_COUNT

#: ``MIRROR_MAGIC`` of dm-log.c.
MIRROR_MAGIC = 0x4D695272
#: ``MIRROR_DISK_VERSION``: what the kernel writes and what this module writes.
MIRROR_DISK_VERSION = 2
#: Versions the kernel accepts on a little-endian host (1 is read as 2).
ACCEPTED_VERSIONS = frozenset({1, 2})
#: ``LOG_OFFSET`` (2 sectors): where the clean bits start.
LOG_OFFSET = 1024
SECTOR_SIZE = 512
#: What ``lvcreate``/``lvconvert`` write as ``nr_regions`` into a freshly zeroed mirror log
#: (LVM2 ``_write_log_header``): a count no table can reach, so the kernel treats no region as
#: new and keeps the stored (zero) bits: every region is resynced at the first activation.
LVM_FRESH_NR_REGIONS = 2**64 - 1

#: ``struct log_header_disk``: packed, little-endian on every host (``cpu_to_le32/le64``).
DiskLogHeader = c.Struct(
    "magic" / c.Int32ul,       # 0
    "version" / c.Int32ul,     # 4
    "nr_regions" / c.Int64ul,  # 8
)
HEADER_SIZE = DiskLogHeader.sizeof()

#: The part of the log device the kernel reads and writes: header, unused area, clean bits.
#: ``bitset_bytes`` is passed at parse/build time (``DiskLog.parse(data, bitset_bytes=n)``).
DiskLog = c.Struct(
    "header" / DiskLogHeader,                          # 0
    "unused" / c.Bytes(LOG_OFFSET - HEADER_SIZE),      # 16
    "clean_bits" / c.Bytes(c.this._params.bitset_bytes),  # 1024
)

assert HEADER_SIZE == 16


class DiskLogError(ValueError):
    """A disk log that cannot be read as one, or a request that cannot be written as one."""


def bitset_bytes(region_count: int) -> int:
    """Bytes of clean bits the kernel reads and writes: the region count rounded up to 32 bits."""
    return ((region_count + 31) // 32) * 4


def log_bytes(region_count: int, block_size: int = SECTOR_SIZE) -> int:
    """The kernel's I/O size for the log: ``1024 + bitset_bytes`` rounded up to the device's
    logical block size. The log device must be at least this large or the mirror's constructor
    fails ("log device too small")."""
    return -(-(LOG_OFFSET + bitset_bytes(region_count)) // block_size) * block_size


def encode(region_count: int, clean: bytes | bitarray, block_size: int = SECTOR_SIZE) -> bytes:
    """A whole disk log for ``region_count`` regions whose clean bits are ``clean``.

    ``clean`` is a bitmap in the engine's layout (little-endian bit order, at least
    ``ceil(region_count / 8)`` bytes); bits at and past ``region_count`` are written as 0. The
    result is ``log_bytes(region_count, block_size)`` long: header, zeroed unused area, bits,
    zero padding.
    """
    if not 1 <= region_count <= MAX_REGION_COUNT:
        raise DiskLogError(f"region count {region_count} out of range (1..{MAX_REGION_COUNT})")
    bits = clean.copy() if isinstance(clean, bitarray) else exact_bits(clean, region_count)
    if len(bits) < region_count:
        raise DiskLogError(f"{len(bits)} clean bits for {region_count} regions")
    del bits[region_count:]
    size = bitset_bytes(region_count)
    raw = bits.tobytes().ljust(size, b"\0")
    data = DiskLog.build(
        dict(header=dict(magic=MIRROR_MAGIC, version=MIRROR_DISK_VERSION, nr_regions=region_count),
             unused=bytes(LOG_OFFSET - HEADER_SIZE), clean_bits=raw),
        bitset_bytes=size,
    )
    return data.ljust(log_bytes(region_count, block_size), b"\0")


# --- reading -------------------------------------------------------------------------------------

#: Verdict kinds of :func:`inspect`, stable (they are JSON values of ``ulog-dump disklog``).
VALID = "valid"
LVM_FRESH = "lvm-fresh"
NO_REGIONS = "no-regions"
EMPTY = "empty"
TOO_SHORT = "too-short"
BAD_MAGIC = "bad-magic"
BAD_VERSION = "bad-version"
TOO_SMALL = "too-small"
TOO_MANY = "too-many-regions"


@dataclass
class DiskLogInfo:
    """What a disk log holds and what the kernel would make of it."""

    size: int
    magic: int | None = None
    version: int | None = None
    nr_regions: int | None = None
    #: One of the verdict kinds above; ``valid`` and ``lvm-fresh`` are headers the kernel accepts.
    kind: str = EMPTY
    #: The verdict in words: why the header is (in)valid and what the kernel does with it.
    reason: str = ""
    #: Region count the bits were read for (``nr_regions``, or the caller's count), else None.
    region_count: int | None = None
    #: Clean bits (``region_count`` of them) when they could be read.
    clean: bitarray | None = None
    #: Things worth knowing that do not make the log invalid.
    notes: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.kind in (VALID, LVM_FRESH, NO_REGIONS)

    @property
    def magic_ok(self) -> bool:
        return self.magic == MIRROR_MAGIC


def inspect(data: bytes, size: int | None = None, region_count: int | None = None) -> DiskLogInfo:
    """Decode a disk log from its first bytes.

    ``data`` holds the start of the file or device (at least the header and the bits wanted;
    :func:`read` reads just that), ``size`` the whole file or device size (default
    ``len(data)``). ``region_count`` reads the bits for that many regions instead of the header's
    ``nr_regions`` (needed for LVM's fresh-log marker, which names no count).
    """
    size = len(data) if size is None else size
    info = DiskLogInfo(size=size)
    if size == 0:
        info.kind, info.reason = EMPTY, "empty: no header at all"
        return info
    if len(data) < HEADER_SIZE:
        info.kind = TOO_SHORT
        info.reason = f"only {size} bytes: too short for the 16-byte header"
        return info
    header = DiskLogHeader.parse(data[:HEADER_SIZE])
    info.magic, info.version, info.nr_regions = header.magic, header.version, header.nr_regions
    if header.magic != MIRROR_MAGIC:
        info.kind = BAD_MAGIC
        what = "all zeros (a wiped or never used log device)" if not any(data[:LOG_OFFSET]) else \
            f"bad magic {header.magic:#010x} (expected {MIRROR_MAGIC:#010x}, 'MiRr')"
        info.reason = (f"{what}: not a disk log header. The kernel treats it as a new log and "
                       "resyncs every region at the next resume")
        return info
    if header.version not in ACCEPTED_VERSIONS:
        info.kind = BAD_VERSION
        info.reason = (f"unknown version {header.version} (the kernel writes {MIRROR_DISK_VERSION} and "
                       "reads 1 as 2 on little-endian hosts): the kernel logs 'incompatible disk log "
                       "version', marks the log device failed and resyncs every region")
        return info
    if header.version == 1:
        info.notes.append("version 1: read as version 2 by little-endian kernels only "
                          "(a big-endian kernel refuses it)")
    count = region_count
    if header.nr_regions == LVM_FRESH_NR_REGIONS:
        info.kind = LVM_FRESH
        info.reason = ("LVM's fresh-log marker (nr_regions = 2^64-1, written by lvcreate/lvconvert over "
                       "a zeroed log): a valid header that names no region count; the kernel keeps the "
                       "stored bits (all zero when LVM wrote it), so every region whose bit is 0 is "
                       "resynced at the first activation")
    elif header.nr_regions == 0:
        info.kind = NO_REGIONS
        info.reason = ("valid header with nr_regions 0: the kernel treats every region as new "
                       "(dirty, resynced; clean only with 'nosync')")
    elif header.nr_regions > MAX_REGION_COUNT:
        info.kind = TOO_MANY
        info.reason = (f"nr_regions {header.nr_regions} is beyond any real mirror ({MAX_REGION_COUNT} "
                       "regions max here): a damaged header")
        return info
    else:
        info.kind = VALID
        count = header.nr_regions if count is None else count
        need = LOG_OFFSET + -(-header.nr_regions // 8)
        if size < need:
            info.kind = TOO_SMALL
            info.reason = (f"the file holds {size} bytes, too small for nr_regions {header.nr_regions} "
                           f"(needs {need}: 1024 + {need - LOG_OFFSET} bytes of bits)")
            return info
        info.reason = (f"the kernel loads these clean bits at the next resume of a 'disk' log of "
                       f"{header.nr_regions} regions (regions past them, if the table has more, "
                       f"are resynced)")
        if size < log_bytes(header.nr_regions):
            info.notes.append(f"{size} bytes: a kernel disk log device needs at least "
                              f"{log_bytes(header.nr_regions)} (1024 + the bitset rounded up to 32 "
                              "bits, in whole 512-byte sectors)")
    if count is not None:
        if not 0 < count <= MAX_REGION_COUNT:
            raise DiskLogError(f"region count {count} out of range")
        need_bits = -(-count // 8)
        if size < LOG_OFFSET + need_bits or len(data) < LOG_OFFSET + need_bits:
            info.notes.append(f"only {max(0, min(size, len(data)) - LOG_OFFSET)} bytes of bits: too few "
                              f"for {count} regions, bits not shown")
        else:
            parsed = DiskLog.parse(data[: LOG_OFFSET + need_bits], bitset_bytes=need_bits)
            info.region_count = count
            info.clean = exact_bits(parsed.clean_bits, count)
            if any(parsed.unused):
                info.notes.append("bytes 16-1023 are not zero (the kernel keeps them as they are)")
            padding = exact_bits(data[LOG_OFFSET : LOG_OFFSET + bitset_bytes(count)], bitset_bytes(count) * 8)
            if padding[count:].any():
                info.notes.append(f"bits past region {count - 1} are set in the bitset's padding "
                                  "(the kernel clears them at resume)")
    return info


def kernel_resume_bits(info: DiskLogInfo, region_count: int) -> bitarray:
    """The clean (= in sync) bits a ``disk`` log of ``region_count`` regions starts from when it
    resumes on this log with the default sync mode (dm-log.c ``disk_resume``): the stored bits
    below ``nr_regions``, every region at and past ``nr_regions`` dirty, an invalid header as a
    new log (all dirty). ``info`` must have been read with ``region_count`` regions of bits."""
    out = zeros(region_count, endian="little")
    if info.kind not in (VALID, LVM_FRESH) or info.clean is None:
        return out
    keep = region_count if info.nr_regions is None else min(region_count, info.nr_regions)
    out[:keep] = info.clean[:keep]
    return out


@dataclass
class Target:
    """Where a disk log is read from or written to."""

    path: str
    is_block: bool
    size: int
    #: Logical block size of a block device (BLKSSZGET), 512 for files.
    block_size: int = SECTOR_SIZE


BLKSSZGET = 0x1268


def _block_size(fd: int) -> int:
    import fcntl
    import struct

    try:
        return struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0\0\0\0"))[0]
    except OSError:
        return SECTOR_SIZE


def read(path: str, region_count: int | None = None) -> tuple[DiskLogInfo, Target]:
    """Read and inspect the disk log on a file or block device (only the bytes it needs)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        is_block = stat.S_ISBLK(st.st_mode)
        if not (is_block or stat.S_ISREG(st.st_mode)):
            raise DiskLogError(f"{path} is neither a regular file nor a block device")
        size = os.lseek(fd, 0, os.SEEK_END) if is_block else st.st_size
        target = Target(path, is_block, size, _block_size(fd) if is_block else SECTOR_SIZE)
        head = os.pread(fd, min(size, LOG_OFFSET), 0)
        count = region_count
        if count is None and len(head) >= HEADER_SIZE:
            hdr = DiskLogHeader.parse(head[:HEADER_SIZE])
            if hdr.magic == MIRROR_MAGIC and 0 < hdr.nr_regions <= MAX_REGION_COUNT:
                count = hdr.nr_regions
        want = LOG_OFFSET + (bitset_bytes(count) if count and count <= MAX_REGION_COUNT else 0)
        data = head
        while len(data) < min(size, want):
            chunk = os.pread(fd, min(size, want) - len(data), len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return inspect(data, size, region_count), target


def write(path: str, region_count: int, clean: bytes | bitarray, overwrite: bool = False) -> Target:
    """Write a disk log to a file (created 0600; an existing non-empty file only with
    ``overwrite``) or to a block device (opened exclusively, so a device in use by a mapping or a
    mount is refused; it must be large enough). Synced before returning."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    is_block = st is not None and stat.S_ISBLK(st.st_mode)
    if st is not None and not is_block and not stat.S_ISREG(st.st_mode):
        raise DiskLogError(f"{path} is neither a regular file nor a block device")
    if is_block:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise DiskLogError(f"{path} is in use (mounted, or held by a device-mapper table): "
                                   "refusing to write a disk log onto it") from exc
            raise
    else:
        if st is not None and st.st_size and not overwrite:
            raise DiskLogError(f"{path} exists and is not empty: refusing to overwrite it "
                               "(--overwrite to replace it)")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        block = _block_size(fd) if is_block else SECTOR_SIZE
        data = encode(region_count, clean, block)
        size = os.lseek(fd, 0, os.SEEK_END) if is_block else len(data)
        if is_block and size < len(data):
            raise DiskLogError(f"{path} holds {size} bytes; a disk log of {region_count} regions needs "
                               f"{len(data)}")
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], done)
        os.fsync(fd)
    finally:
        os.close(fd)
    return Target(path, is_block, size, block)
