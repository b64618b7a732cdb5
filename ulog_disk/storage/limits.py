"""The daemon's resource limits: descriptors (RLIMIT_NOFILE) and memory (its cgroup's memory.max).

A daemon that every mirror write depends on must not find its limits by crashing into them: at the
descriptor limit an LMDB environment fails to open in the middle of a store write, and at the
memory limit the kernel's OOM killer stops every mirror's log at once (and again after each
restart, since the state that did not fit is still there). So the daemon sizes what it keeps open
to the descriptor limit at start, and refuses a new log whose bitmaps would not fit under the
memory limit: that one mirror fails its CTR with ENOMEM and one log line naming the limit; every
other mirror keeps working.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Descriptors the daemon opens after its backend (the kernel socket or the unix listener and its
#: clients, the wake-up pipe, the selector, a capture file, the journal's current and next
#: segment) and some slack for a tool run in-process; what is left goes to LMDB environments.
DESCRIPTOR_RESERVE = 16

#: Memory kept free under the limit for what is not the bitmaps: page cache the kernel charges to
#: the cgroup (journal and store pages being written), Python's own allocations. The larger of a
#: fixed floor and a share of the limit.
MEMORY_RESERVE_FLOOR = 8 * 1024 * 1024
MEMORY_RESERVE_SHARE = 8

#: What a log costs beyond its bitmaps (its instance, records, dict entries).
LOG_OVERHEAD_BYTES = 64 * 1024

CGROUP_ROOT = Path("/sys/fs/cgroup")


def descriptors_in_use() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def nofile_soft_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def spare_descriptors() -> int:
    """Descriptors left under the soft RLIMIT_NOFILE for stores, after the reserve."""
    return nofile_soft_limit() - descriptors_in_use() - DESCRIPTOR_RESERVE


@dataclass(frozen=True)
class MemoryLimit:
    limit: int
    source: str


def cgroup_memory_limit(proc_cgroup: Path = Path("/proc/self/cgroup"),
                        root: Path = CGROUP_ROOT) -> MemoryLimit | None:
    """The tightest ``memory.max`` of this process's cgroup v2 and its ancestors; None if there is
    none (no cgroup v2, or every level is "max")."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    path = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    if path is None:
        return None
    best: MemoryLimit | None = None
    here = root / path.strip("/")
    while True:
        try:
            text = (here / "memory.max").read_text().strip()
        except OSError:
            text = "max"
        if text != "max":
            try:
                value = int(text)
            except ValueError:
                value = None
            if value is not None and (best is None or value < best.limit):
                best = MemoryLimit(value, f"cgroup memory.max {here / 'memory.max'}")
        if here == root or root not in here.parents:
            return best
        here = here.parent


def anonymous_memory() -> int:
    """This process's resident anonymous memory (bytes): what the cgroup cannot reclaim."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def log_memory_bytes(region_count: int) -> int:
    """Memory a log of ``region_count`` regions takes at its peak: its two bitmaps (clean,
    in-sync) and, until they are written, their copies in the journal's unsynced buffer and in the
    record on its way to the store — four times the bitmaps (measured with the daemon's engine
    and the LMDB backend: 65 MiB of anonymous memory for 2**26 regions, 16 MiB of bitmaps)."""
    bitmaps = 2 * ((region_count + 7) // 8)
    return 2 * bitmaps + LOG_OVERHEAD_BYTES


def mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


class MemoryBudget:
    """Tells whether one more log fits under the memory limit (read at each call: an operator
    may change it while the daemon runs, e.g. ``systemctl set-property dm-ulogd MemoryMax=``)."""

    def __init__(self, read_limit: Callable[[], MemoryLimit | None] = cgroup_memory_limit,
                 read_usage: Callable[[], int] = anonymous_memory) -> None:
        self.read_limit = read_limit
        self.read_usage = read_usage

    def refusal(self, region_count: int) -> str | None:
        """None if a new log of ``region_count`` regions fits, else why not (one line)."""
        limit = self.read_limit()
        if limit is None:
            return None
        need = log_memory_bytes(region_count)
        reserve = max(MEMORY_RESERVE_FLOOR, limit.limit // MEMORY_RESERVE_SHARE)
        used = self.read_usage()
        room = limit.limit - reserve - used
        if need <= room:
            return None
        return (f"a log of {region_count} regions needs about {mib(need)} and the daemon's memory "
                f"limit ({mib(limit.limit)}, {limit.source}) leaves {mib(max(room, 0))} "
                f"({mib(used)} in use, {mib(reserve)} kept free)")
