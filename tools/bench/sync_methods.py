"""Durable writes compared with metric 1's floor (a 4 KiB pwrite + fdatasync into a preallocated
file): could the journal's FLUSH sync cost less than the floor it is judged against?

    .venv/bin/python tools/bench/sync_methods.py [--dir DIR] [--samples N] [--rounds R]

Each method writes into its own preallocated 8 MiB file in DIR (default: a fresh directory under
/var/tmp, on the same filesystem as the benchmarks' state directories), at advancing offsets as the
journal does; the rounds alternate the methods so that a disk's slow minute falls on all of them.
Prints each method's p50 and p90 and its ratio to the floor's p50 of the same round.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

FILE_BYTES = 8 << 20
RECORD = 100  # about one journal record (a FLUSH with a few marks)


def _prepare(path: Path) -> None:
    with open(path, "wb") as f:
        f.write(b"\1" * FILE_BYTES)
        f.flush()
        os.fsync(f.fileno())


def _aligned(size: int) -> mmap.mmap:
    buf = mmap.mmap(-1, max(size, mmap.PAGESIZE))  # page-aligned, as O_DIRECT needs
    buf.write(b"z" * size)
    return buf


def methods(directory: Path) -> dict[str, tuple[int, Callable[[int, int], None]]]:
    """name -> (file descriptor, write(fd, i))."""
    out: dict[str, tuple[int, Callable[[int, int], None]]] = {}

    def add(name: str, flags: int, write: Callable[[int, int], None]) -> None:
        path = directory / f"{name}.dat"
        _prepare(path)
        out[name] = (os.open(path, os.O_RDWR | flags), write)

    block = b"x" * 4096
    record = b"y" * RECORD
    page = _aligned(4096)
    sector = memoryview(_aligned(512))[:512]

    def floor(fd: int, i: int) -> None:
        os.pwrite(fd, block, 0)
        os.fdatasync(fd)

    def append_fdatasync(fd: int, i: int) -> None:
        os.pwrite(fd, record, (i * RECORD) % (FILE_BYTES // 2))
        os.fdatasync(fd)

    def append_dsync(fd: int, i: int) -> None:
        os.pwrite(fd, record, (i * RECORD) % (FILE_BYTES // 2))

    def direct_4k(fd: int, i: int) -> None:
        os.pwrite(fd, page, ((i * RECORD) // 4096) * 4096 % (FILE_BYTES // 2))

    def direct_512(fd: int, i: int) -> None:
        os.pwrite(fd, sector, ((i * RECORD) // 512) * 512 % (FILE_BYTES // 2))

    add("floor: 4 KiB pwrite + fdatasync", 0, floor)
    add(f"{RECORD} B appended + fdatasync (the journal's way)", 0, append_fdatasync)
    add(f"{RECORD} B appended, O_DSYNC", os.O_DSYNC, append_dsync)
    add("4 KiB O_DIRECT | O_DSYNC", os.O_DIRECT | os.O_DSYNC, direct_4k)
    add("512 B O_DIRECT | O_DSYNC", os.O_DIRECT | os.O_DSYNC, direct_512)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, help="where the files go (default: a fresh one in /var/tmp)")
    p.add_argument("--samples", type=int, default=500, help="writes per method and round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="ulog-sync-methods-", dir=args.dir or "/var/tmp"))
    table = methods(directory)
    try:
        times: dict[str, list[float]] = {name: [] for name in table}
        floor_p50: list[float] = []
        ratios: dict[str, list[float]] = {name: [] for name in table}
        for _ in range(args.rounds):
            round_p50 = {}
            for name, (fd, write) in table.items():
                samples = []
                for i in range(args.samples):
                    t0 = time.perf_counter()
                    write(fd, i)
                    samples.append(time.perf_counter() - t0)
                samples.sort()
                times[name].extend(samples)
                round_p50[name] = samples[len(samples) // 2]
            floor = round_p50[next(iter(table))]
            floor_p50.append(floor)
            for name in table:
                ratios[name].append(round_p50[name] / floor)
        print(f"{args.rounds} rounds of {args.samples} writes per method, in {directory}")
        for name, samples in times.items():
            samples.sort()
            p50, p90 = samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.9)] * 1e6
            r = ratios[name]
            print(f"{name:50s} p50 {p50:7.1f} us  p90 {p90:7.1f} us  p50 / floor "
                  f"{statistics.median(r):.2f}x [{min(r):.2f}-{max(r):.2f}]")
    finally:
        for fd, _ in table.values():
            os.close(fd)
        for f in directory.iterdir():
            f.unlink()
        directory.rmdir()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
