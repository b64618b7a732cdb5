"""The constructor string the kernel sends with CTR (protocol ref §3.2).

``"<ti_len> <type> [<dev>] <region_size> [sync|nosync] [block_on_error]"`` where ``ti_len`` is
the mirror target length in 512-byte sectors, printed by the kernel, and the rest is the table's
log arguments after the uuid (``integrated_flush`` already removed by the kernel).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from . import wire
from .geometry import MAX_REGION_COUNT

LOG_TYPES = ("core", "disk", "clustered-core", "clustered-disk")
DISK_TYPES = ("disk", "clustered-disk")
#: DM_NAME_LEN: the CTR reply buffer the kernel offers, NUL included.
MAX_DEVICE_REPLY = 128
#: The kernel keeps the GET_REGION_SIZE answer as a uint32_t (dm-log-userspace-base.c).
MAX_REGION_SIZE = 0xFFFFFFFF
#: ti->len is a sector_t (u64).
MAX_TARGET_SECTORS = 2**64 - 1


class CtrError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class CtrArgs:
    target_sectors: int
    log_type: str
    device: str | None
    region_size: int
    sync_mode: str  # "default", "sync" (force full resync) or "nosync" (start in sync)
    block_on_error: bool
    text: str

    @property
    def region_count(self) -> int:
        return -(-self.target_sectors // self.region_size)

    @property
    def is_disk(self) -> bool:
        return self.log_type in DISK_TYPES

    def device_reply(self) -> bytes:
        """The initial CTR's reply: the log device name, NUL counted (kernel registers it)."""
        if not self.device:
            return b""
        return self.device.encode() + b"\0"

    def device_number(self) -> str:
        """``maj:min`` of the log device for STATUS_INFO (libdm parses that form)."""
        dev = self.device or ""
        if ":" in dev and not dev.startswith("/"):
            return dev
        try:
            st = os.stat(dev)
        except OSError:
            return dev
        if stat.S_ISBLK(st.st_mode):
            return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        return dev


def _positive_int(word: str, what: str) -> int:
    if not word.isdigit():
        raise CtrError(f"{what} {word!r} is not a decimal number")
    value = int(word)
    if value <= 0:
        raise CtrError(f"{what} must be positive, got {value}")
    return value


def parse_ctr(payload: bytes | str) -> CtrArgs:
    """Parse a constructor string, or a CTR payload (read by :func:`wire.parse_ctr_string`)."""
    if isinstance(payload, str):
        text = payload
    else:
        try:
            text, _nul_counted = wire.parse_ctr_string(payload)
        except ValueError as exc:
            raise CtrError(str(exc)) from exc
    words = text.split()
    if len(words) < 3:
        raise CtrError(f"constructor string {text!r} has fewer than 3 words")
    target_sectors = _positive_int(words[0], "target length")
    if target_sectors > MAX_TARGET_SECTORS:
        raise CtrError(f"target length {target_sectors} does not fit 64 bits")
    log_type = words[1]
    if log_type not in LOG_TYPES:
        raise CtrError(f"unknown log type {log_type!r} (expected one of {', '.join(LOG_TYPES)})")
    rest = words[2:]
    device = None
    if log_type in DISK_TYPES:
        device = rest.pop(0)
        if len(device) + 1 > MAX_DEVICE_REPLY:
            raise CtrError(f"log device name longer than {MAX_DEVICE_REPLY - 1} bytes")
        if not rest:
            raise CtrError("disk log needs a region size after the device")
    region_size = _positive_int(rest.pop(0), "region size")
    if region_size < 2 or region_size & (region_size - 1):
        raise CtrError(f"region size {region_size} is not a power of two >= 2")
    if region_size > MAX_REGION_SIZE:
        raise CtrError(f"region size {region_size} does not fit the kernel's 32-bit region size")
    if region_size > target_sectors:
        raise CtrError(f"region size {region_size} exceeds the target length {target_sectors}")
    region_count = -(-target_sectors // region_size)
    if region_count > MAX_REGION_COUNT:
        raise CtrError(f"{region_count} regions is more than the supported {MAX_REGION_COUNT}; "
                       f"use a larger region size")
    sync_mode = "default"
    block_on_error = False
    for word in rest:
        if word in ("sync", "nosync"):
            if sync_mode != "default":
                raise CtrError("both sync and nosync given")
            sync_mode = word
        elif word == "block_on_error":
            block_on_error = True
        else:
            raise CtrError(f"unknown log argument {word!r}")
    return CtrArgs(
        target_sectors=target_sectors, log_type=log_type, device=device, region_size=region_size,
        sync_mode=sync_mode, block_on_error=block_on_error, text=text,
    )
