"""O_DIRECT writer of the two-guest scenarios: random 64 KiB writes through a mirror, each node to
blocks no other node writes, so that the legs can be compared byte for byte at the end.

Two writes in flight to the same sectors from two nodes may land in a different order on each leg
(the mirror orders nothing across nodes), which would leave the legs different with no fault at
all. So the nodes never share a block; they do share regions. The regions are split in four
quarters: the first written by node 1 only, the second by node 2 only (disjoint regions), the
second half by both (overlapping regions), node N taking the blocks whose number is N-1 modulo 2.

    writer.py DEVICE --node N --region-bytes B --count-file F --stop-file S [--threads T]

Writes until the stop file exists; ``--count-file`` holds the writes finished so far (rewritten
after each, so that a scenario, or the host through the results share, waits for writes, not for
a time). Each failed write is a line ``write failed at block K: ...``; the last line says
``writer: N writes of 64 KiB, F failed``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import sys
import threading

BLOCK = 64 << 10


def eligible_blocks(node: int, blocks: int, per_region: int) -> list[int]:
    regions = blocks // per_region
    quarter = regions // 4
    out = []
    for b in range(blocks):
        r = b // per_region
        if r < quarter:
            mine = node == 1
        elif r < 2 * quarter:
            mine = node == 2
        else:
            mine = b % 2 == node - 1
        if mine:
            out.append(b)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("device")
    p.add_argument("--node", type=int, required=True)
    p.add_argument("--region-bytes", type=int, required=True)
    p.add_argument("--count-file", required=True)
    p.add_argument("--stop-file", required=True)
    p.add_argument("--threads", type=int, default=4)
    args = p.parse_args()
    fd = os.open(args.device, os.O_WRONLY | os.O_DIRECT)
    size = os.lseek(fd, 0, os.SEEK_END)
    blocks = eligible_blocks(args.node, size // BLOCK, args.region_bytes // BLOCK)
    lock = threading.Lock()
    done = [0, 0]  # writes, failures

    # A slice of one random pool per write, stamped with the node and a sequence number: fresh data
    # for every write without 64 KiB of os.urandom each time (costly under emulation, on the CPU
    # the daemon needs).
    pool = os.urandom(1 << 20)

    def run(seed: int) -> None:
        rng = random.Random(seed)
        buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
        seq = 0
        while not os.path.exists(args.stop_file):
            block = rng.choice(blocks)
            start = rng.randrange(0, len(pool) - BLOCK, 8)
            buf[:] = pool[start:start + BLOCK]
            seq += 1
            buf[:24] = f"n{args.node}t{seed}s{seq:016d}".encode()[:24].ljust(24, b"\0")
            try:
                os.pwrite(fd, buf, block * BLOCK)
                failed = 0
            except OSError as e:
                failed = 1
                print(f"write failed at block {block}: {e}", flush=True)
            with lock:
                done[0] += 1
                done[1] += failed
                n = done[0]
                with open(args.count_file, "w") as f:
                    f.write(f"{n}\n")

    threads = [threading.Thread(target=run, args=(args.node * 1000 + i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.close(fd)
    print(f"writer: {done[0]} writes of 64 KiB, {done[1]} failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
