"""Where dm-ulogd's time goes: py-spy on the daemon process while a load runs against it.

    .venv/bin/pip install py-spy            # bench-only tool, not a dependency of the package
    .venv/bin/python tools/bench/profile_daemon.py rate     # IN_SYNC, one request in flight
    .venv/bin/python tools/bench/profile_daemon.py flush    # one mirror: MARK_REGION + FLUSH
    .venv/bin/python tools/bench/profile_daemon.py mirrors  # 8 mirrors flushing at once
    (--gil: only samples holding the GIL; --nonblocking: do not pause the daemon; --pin: rate load
    on one CPU; --kmodel: flush loads through the kernel model)

Prints the load's rate, then the share of samples per thread, the functions with the most samples
at the top of the stack (self), and the most inclusive ones. ``--gil`` counts only samples that
hold the GIL (CPU spent in Python); without it, threads that are not idle count, so time spent
in ``fdatasync`` or ``select`` shows up under the Python function that called it. ``--out FILE``
keeps py-spy's raw collapsed stacks (feed them to a flamegraph tool).
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import ROOT, ctr_string  # noqa: E402

from ulog_disk.protocol import wire  # noqa: E402
from ulog_disk.protocol.wire import RequestType  # noqa: E402
from ulog_disk.testing.client import Client, LeanClient  # noqa: E402
from ulog_disk.testing.kernelmodel import KernelConnection, UserspaceLog  # noqa: E402
from ulog_disk.testing.launcher import launch  # noqa: E402

STRIDE = 104729
REGIONS = 1 << 20
SPACES = re.compile(r"\s+")


def rate_load(path: Path, seconds: float, stop: threading.Event, out: list[float]) -> None:
    c = Client(path)
    c.ok("prof", 1, RequestType.CTR, ctr_string(REGIONS).encode())
    c.ok("prof", 1, RequestType.RESUME)
    frame = c.frame("prof", 1, RequestType.IN_SYNC, wire.build_u64(7))
    n = 0
    t0 = time.perf_counter()
    while not stop.is_set():
        c.sock.send(frame)
        c.sock.recv(65536)
        n += 1
    out.append(n / (time.perf_counter() - t0))


def flush_worker(path: str, uuid: str, luid: int, seconds: float, q: object, kmodel: bool) -> None:
    """MARK_REGION + FLUSH of one region, repeated: through the kernel model, or from frame
    templates (the lean client of run.py, which costs the daemon's CPUs almost nothing)."""
    conn = KernelConnection(path)
    log = UserspaceLog(conn, uuid, luid, ctr_string(REGIONS))
    if log.ctr() or log.resume():
        raise RuntimeError("setup failed")
    lean = LeanClient(path, uuid, luid)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        region = (n * STRIDE) % REGIONS
        if kmodel:
            log.mark_region(region)
            if log.flush():
                raise RuntimeError("FLUSH failed")
        else:
            lean.mark_flush(region)
        n += 1
    q.put(n / (time.perf_counter() - t0))  # type: ignore[attr-defined]


def summarize(raw: Path, top: int) -> None:
    self_counts: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_s)
        frames = stack.split(";")
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else "?"
        if thread != "?":
            frames = frames[1:]
        frames = [f for f in frames if not f.startswith("process ")]
        threads[thread] += count
        total += count
        if frames:
            self_counts[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    if not total:
        print("no samples")
        return

    def show(title: str, counter: collections.Counter[str]) -> None:
        print(f"\n{title}")
        for name, count in counter.most_common(top):
            print(f"  {100 * count / total:5.1f}%  {SPACES.sub(' ', name)}")

    print(f"\n{total} samples")
    show("by thread", threads)
    show("self (top of stack)", self_counts)
    show("inclusive", incl)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("load", choices=("rate", "flush", "mirrors"))
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    p.add_argument("--lines", action="store_true", help="per line instead of per function")
    p.add_argument("--nonblocking", action="store_true",
                   help="do not pause the daemon while sampling (less distortion, rougher stacks)")
    p.add_argument("--pin", action="store_true",
                   help="rate load: pin the daemon and the client to one CPU (as run.py's target row), "
                        "leaving py-spy the others")
    p.add_argument("--kmodel", action="store_true",
                   help="flush/mirrors: clients through the kernel model instead of frame templates")
    p.add_argument("--native", action="store_true", help="include native (C) frames")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, help="keep the raw collapsed stacks here")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = p.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    work = Path(tempfile.mkdtemp(prefix="ulog-prof-", dir=args.dir))
    d = launch(work, name="prof", backend="lmdb", state_dir=work / "state", cwd=ROOT, ready_timeout=120.0)
    raw = args.out or work / "stacks.txt"
    cmd = [spy, "record", "-p", str(d.pid), "-d", str(int(args.seconds)), "-r", str(args.rate), "-f", "raw",
           "-o", str(raw), "-t"]
    if not args.lines:
        cmd.append("-F")
    if args.gil:
        cmd.append("-g")
    if args.nonblocking:
        cmd.append("--nonblocking")
    if args.native:
        cmd.append("-n")
    rates: list[float] = []
    try:
        if args.load == "rate":
            if args.pin:
                cpu = max(os.sched_getaffinity(0))
                os.sched_setaffinity(0, {cpu})
                for tid in os.listdir(f"/proc/{d.pid}/task"):
                    os.sched_setaffinity(int(tid), {cpu})
            stop = threading.Event()
            t = threading.Thread(target=rate_load, args=(d.socket_path, args.seconds, stop, rates))
            t.start()
            time.sleep(0.5)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            stop.set()
            t.join()
        else:
            n = 1 if args.load == "flush" else 8
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            procs = [ctx.Process(target=flush_worker,
                                 args=(str(d.socket_path), f"prof-{i}", 0x10 + i, args.seconds + 1.5, q,
                                       args.kmodel),
                                 daemon=True)
                     for i in range(n)]
            for proc in procs:
                proc.start()
            time.sleep(1.0)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            rates = [q.get() for _ in procs]
            for proc in procs:
                proc.join()
        print(f"load '{args.load}': {sum(rates):.0f} requests or flushes per second (while sampled)")
        summarize(raw, args.top)
        if args.out:
            print(f"\nraw stacks: {raw}")
    finally:
        d.kill9()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
