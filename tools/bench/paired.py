"""Paired A/B of several trees' daemons: all run at once, and every round times each of them, in a
shuffled order, on the same load. On a shared machine whose disk and load change from minute to
minute this tells trees apart where interleaved ``run.py`` runs (``interleave.py``) cannot: both
trees see the same moments.

    .venv/bin/python tools/bench/paired.py --kind mix --rounds 20 base=/path/to/worktree new=.
    .venv/bin/python tools/bench/paired.py --kind rate --rounds 20 base=... new=...

Each tree is ``name=path``: its daemon runs with ``PYTHONPATH=path`` (same package layout as this
one). Kinds:

* ``mix``: metric 1's pattern, from frame templates (the lean client): a FLUSH, at once a FLUSH
  carrying one mark (timed), then an IN_SYNC (timed), then a pause; 300 of each per tree and
  round, the p50 of each;
* ``rate``: metric 3's target row: IN_SYNC with one in flight, client and daemon pinned to one
  CPU, 3000 per tree and round: the round trip (µs).

Prints each tree's median [min-max] over the rounds and, for two trees, the median of the
per-round differences (second minus first).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import ctr_string  # noqa: E402

from ulog_disk.protocol import wire  # noqa: E402
from ulog_disk.protocol.wire import RequestType  # noqa: E402
from ulog_disk.testing.client import Client, LeanClient  # noqa: E402
from ulog_disk.testing.launcher import Daemon, launch  # noqa: E402

REGIONS = 1 << 20
STRIDE = 104729


def one_round(kind: str, d: Daemon, lean: LeanClient, frame: bytes, out: dict[str, list[float]],
              name: str) -> None:
    if kind == "rate":
        cpu = max(os.sched_getaffinity(0))
        with benchlib.pinned(os.getpid(), cpu), benchlib.pinned(d.pid, cpu):
            rate, _ = benchlib.request_rate(d.socket_path, frame, 3000, d.pid)
        out.setdefault(f"{name} IN_SYNC pinned", []).append(1e6 / rate)
        return
    flushes, in_syncs = [], []
    for i in range(300):
        lean.call("flush")  # as in run.py, the timed FLUSH follows another at once
        t0 = time.perf_counter()
        lean.call("flush1", (i * STRIDE) % REGIONS)
        t1 = time.perf_counter()
        lean.call("in_sync", 5)
        t2 = time.perf_counter()
        flushes.append(t1 - t0)
        in_syncs.append(t2 - t1)
        time.sleep(0.0002)  # the client does something else between two FLUSHes, as run.py's does
    out.setdefault(f"{name} FLUSH+mark", []).append(statistics.median(flushes) * 1e6)
    out.setdefault(f"{name} IN_SYNC after it", []).append(statistics.median(in_syncs) * 1e6)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("mix", "rate"), default="mix")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    p.add_argument("trees", nargs="+", metavar="name=path")
    args = p.parse_args()
    trees = dict(t.split("=", 1) for t in args.trees)
    work = Path(tempfile.mkdtemp(prefix="ulog-paired-", dir=args.dir))
    daemons: dict[str, Daemon] = {}
    out: dict[str, list[float]] = {}
    try:
        clients = {}
        for name, tree in trees.items():
            path = str(Path(tree).resolve())
            d = launch(work / name, name=name, backend="lmdb", state_dir=work / name / "state",
                       cwd=Path(path), env={"PYTHONPATH": path}, ready_timeout=120.0)
            daemons[name] = d
            c = Client(d.socket_path)
            c.ok("paired", 1, RequestType.CTR, ctr_string(REGIONS).encode())
            c.ok("paired", 1, RequestType.RESUME)
            clients[name] = (LeanClient(d.socket_path, "paired", 1),
                             c.frame("paired", 1, RequestType.IN_SYNC, wire.build_u64(7)))
        for _ in range(args.rounds):
            names = list(trees)
            random.shuffle(names)
            for name in names:
                lean, frame = clients[name]
                one_round(args.kind, daemons[name], lean, frame, out, name)
        for key, values in out.items():
            print(f"{key}: {statistics.median(values):.1f} us [{min(values):.1f}-{max(values):.1f}]")
        names = list(trees)
        if len(names) == 2:
            for key in out:
                if key.startswith(names[0] + " "):
                    figure = key[len(names[0]) + 1:]
                    diffs = [b - a for a, b in zip(out[key], out[f"{names[1]} {figure}"], strict=True)]
                    print(f"paired {names[1]} - {names[0]}, {figure}: median "
                          f"{statistics.median(diffs):+.1f} us [{min(diffs):+.1f} to {max(diffs):+.1f}]")
    finally:
        for d in daemons.values():
            d.kill9()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
