"""The figures docs/cluster.md quotes, measured on a fresh rig of three nodes:

    python tools/cluster/measure.py [--pings 2000] [--runs 3] [--json results.json]

* one agreed multicast of 256 bytes back to its sender (a member alone sending, then all three at
  once): p50, p99, max;
* the time from SIGKILL to the others' membership change: of a member process (PROCDOWN), of
  a corosync (NODEDOWN), and the runtime totem timeouts that bound the latter.

Needs root and corosync (bash tools/run.sh setup); brings its own rig up in a temporary
directory and takes it down at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpg_worker import WorkerClient, worker_argv  # noqa: E402
from rig import Rig  # noqa: E402


def start(rig: Rig, node: str, group: str) -> WorkerClient:
    w = WorkerClient(worker_argv(), node, popen=lambda argv, **kw: rig.popen(node, argv, **kw))
    w.info = w.call("join", group=group)  # type: ignore[attr-defined]
    return w


def run_once(rig: Rig, pings: int, run: int) -> dict[str, object]:
    group = f"measure-{run}"
    ws = {n.name: start(rig, n.name, group) for n in rig.nodes}
    try:
        for w in ws.values():
            w.wait_event(lambda e: e["ev"] == "confchg" and len(e["members"]) == 3, 20)
        one = ws["n1"].call("ping", count=pings, size=256, timeout=120)
        rids = {n: w.submit("ping", count=pings // 2, size=256) for n, w in ws.items()}
        three = [ws[n].result(r, timeout=120) for n, r in rids.items()]
        marks = {n: w.mark() for n, w in ws.items()}
        t0 = time.monotonic()
        os.kill(ws["n3"].proc.pid, signal.SIGKILL)
        procdown = ws["n1"].wait_event(
            lambda e: e["ev"] == "confchg" and any(a[2] == "PROCDOWN" for a in e["left"]), 20,
            marks["n1"])["t"] - t0
        ws.pop("n3").kill()
        # A member on n3 again, so that its corosync's death is a member's NODEDOWN.
        marks = {n: w.mark() for n, w in ws.items()}
        ws["n3"] = start(rig, "n3", group)
        ws["n1"].wait_event(lambda e: e["ev"] == "confchg" and len(e["members"]) == 3, 20,
                            marks["n1"])
        marks = {n: w.mark() for n, w in ws.items()}
        t0 = time.monotonic()
        rig.kill_corosync("n3")
        nodedown = ws["n1"].wait_event(
            lambda e: e["ev"] == "confchg" and any(a[2] == "NODEDOWN" for a in e["left"]), 20,
            marks["n1"])["t"] - t0
        return {"one_sender": one, "three_senders": three, "procdown_s": procdown,
                "nodedown_s": nodedown}
    finally:
        for w in ws.values():
            w.close()
        if not rig.corosync_alive("n3"):
            rig.start_corosync("n3")
        rig.wait_quorate([n.name for n in rig.nodes], True, members=3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pings", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ulog-rig-measure-") as tmp:
        rig = Rig(Path(tmp) / "rig")
        rig.up(3)
        try:
            totem = rig.totem_timeouts("n1")
            runs = [run_once(rig, args.pings, i) for i in range(args.runs)]
        finally:
            rig.down()
    load = os.getloadavg()[0]
    print(f"runtime totem: token {totem['token']} ms, consensus {totem['consensus']} ms; "
          f"load average {load:.1f} at the end")
    for i, r in enumerate(runs):
        one = r["one_sender"]
        three = r["three_senders"]
        print(f"run {i + 1}: one sender p50 {one['p50_ms']:.2f} ms p99 {one['p99_ms']:.2f} ms "
              f"max {one['max_ms']:.1f} ms; three senders p50 "
              f"{statistics.median(t['p50_ms'] for t in three):.2f} ms p99 "
              f"{max(t['p99_ms'] for t in three):.2f} ms; PROCDOWN after "
              f"{r['procdown_s'] * 1e3:.0f} ms; NODEDOWN after {r['nodedown_s']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"totem": totem, "runs": runs, "load": load}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
