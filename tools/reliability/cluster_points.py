"""Cluster crash points: faults at random instants over a workload on a 3-node corosync rig, and an
oracle checked on every node after each.

    .venv/bin/python tools/reliability/cluster_points.py --points 20 --seed 7
    .venv/bin/python tools/reliability/cluster_points.py --replay 3141592653   # one point's seed

Each node runs ``dm-ulogd --cluster corosync`` (tools/cluster/nodes.py) and each node's kernel is a
thread with its own connection, working on several clustered logs at once: FLUSH with fresh marks
and clears of its own earlier marks, GET_RESYNC_WORK + SET_REGION_SYNC on the log that starts
with every region out of sync, regions thrown out of sync (SET_REGION_SYNC 0), local reads. A point:

1. every node opens a fresh set of logs (CTR + RESUME with its own luid);
2. the three kernels run; after a random number of requests (or a random delay) the fault:
   ``kill`` (SIGKILL of one daemon), ``crash`` (SIGKILL of one daemon and its corosync: the node
   is gone), ``partition`` (one node's switch port down for a while, then up), ``all`` (every
   daemon and corosync SIGKILLed at once); ``crash`` and ``all`` sometimes lose one node's state
   directory for good (``rm -rf`` before its restart). The other kernels go on for a moment;
3. recovery as the kernel and the host do it: a killed daemon is started again on the same boot and
   its kernel reconnects (CTR + RESUME with the same luid) and sends its interrupted request again;
   a crashed node boots again (new boot id, corosync started, quorum awaited) and its kernel opens
   its logs with new luids; a partition heals;
4. each node's kernel sends an agreed request (a FLUSH) so its answers after it are current, then
   the oracle reads every region of every log on every node (IS_CLEAN, IN_SYNC, GET_SYNC_COUNT).

The oracle (what the kernels were told, nothing else) and its rules:

1. ``held``: no region clean on any node while some node holds it marked (its FLUSH acknowledged,
   no CLEAR sent since, and the node not crashed or rebooted since);
2. ``two_recoverers``: GET_RESYNC_WORK never hands a region to a node while another node's kernel
   recovers it (handed and acknowledged, no SET_REGION_SYNC sent since, that node not rebooted);
   checked at every answer;
3. ``crashed_in_sync``: every region a crashed or rebooted node held marked is out of sync on every
   node until some node sends SET_REGION_SYNC 1 for it;
4. ``disagree``: every node answers the same GET_SYNC_COUNT, IN_SYNC and IS_CLEAN for every region
   (marks are shared state too), and the count is the number of regions in sync;
5. ``mark_lost``: a crashed node's acknowledged mark (never cleared) is never clean, until recovered.

A request the kernel sent and did not get answered (in flight at the fault) guarantees nothing: its
marks are not counted, its clears are counted as done, a SET_REGION_SYNC in flight exempts its region.

``--fence`` (``ULOG_REL_CLUSTER_FENCE=1`` in the test) runs the daemons with a ``--fence-command``
that is a power switch: the fenced node's daemon and corosync SIGKILLed. A daemon kill or a
partition the others see then ends in that node's fence and reboot, and the oracle counts it
crashed as of its fence. Without it (the daemon's default), a violation of rule 1 or 2 that
protected only the victim of a kill or a partition is named ``*_unfenced``: the others counted a
living node as fenced.

Every decision of a point comes from its seed (printed with each violation); ``--replay SEED``
runs that point alone on a fresh rig. Timing (which request a fault lands on) is not replayed.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "cluster"))
sys.path.insert(0, str(ROOT))

from nodes import ClusterDaemons  # noqa: E402
from rig import Rig, RigError  # noqa: E402

from ulog_disk.protocol import wire  # noqa: E402
from ulog_disk.protocol.wire import RequestType as T  # noqa: E402
from ulog_disk.testing.client import Client, DaemonGone, NoReply, ctr_text  # noqa: E402

NAMES = ("n1", "n2", "n3")
FAULTS = ("kill", "crash", "partition", "all")
#: How often each fault is chosen (a node crash and a whole-cluster crash cost the most time).
WEIGHTS = (3, 3, 2, 2)
#: Of the crashes (one node or all), how many lose one node's state directory for good.
LOSE_STATE = 0.25
#: A request is answered within this, or the kernel gives up (a partitioned node's requests wait
#: for the heal, which the harness bounds well below it).
REQUEST_TIMEOUT = 30.0
#: The logs of a point: (name, regions, CTR sync argument). "fresh" starts with every region out
#: of sync: the recovery log.
LOGS = (("a", 64, "nosync"), ("b", 48, "nosync"), ("fresh", 32, None))
#: The region each log keeps for the barrier FLUSH (never used by the workload).
BARRIER_REGION = -1

_luids = itertools.count(0x10000)


@dataclass
class Violation:
    rule: str
    seed: int
    fault: str
    text: str

    def __str__(self) -> str:
        return f"[seed {self.seed}, fault {self.fault}] {self.rule}: {self.text}"


@dataclass
class Oracle:
    """What every kernel was told, for one point's logs. Guarded by ``lock`` (four threads)."""

    uuids: list[str]
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: uuid → node → regions its kernel holds marked (acknowledged, no CLEAR sent since).
    held: dict[str, dict[str, set[int]]] = field(default_factory=dict)
    #: uuid → regions a crashed/rebooted node held marked, no SET_REGION_SYNC 1 sent since.
    crashed: dict[str, set[int]] = field(default_factory=dict)
    #: uuid → region → the node whose kernel recovers it.
    recovering: dict[str, dict[int, str]] = field(default_factory=dict)
    #: uuid → regions with a SET_REGION_SYNC 1 sent and not answered (it may apply any time).
    syncing: dict[str, Counter[int]] = field(default_factory=dict)
    #: uuid → region → when its last SET_REGION_SYNC 1 was sent (wall clock, as a fence records).
    synced_at: dict[str, dict[int, float]] = field(default_factory=dict)
    #: node → how many times it crashed: an answer to a request sent before counts for nothing.
    life: Counter[str] = field(default_factory=Counter)
    #: (rule, the node whose kernel the rule protected, text, when)
    violations: list[tuple[str, str, str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for u in self.uuids:
            self.held[u] = {n: set() for n in NAMES}
            self.crashed[u] = set()
            self.recovering[u] = {}
            self.syncing[u] = Counter()
            self.synced_at[u] = {}

    def flushed(self, node: str, life: int, uuid: str, marks: list[int]) -> None:
        with self.lock:
            if self.life[node] == life:
                self.held[uuid][node] |= set(marks)

    def clearing(self, node: str, uuid: str, clears: list[int]) -> None:
        with self.lock:
            self.held[uuid][node] -= set(clears)

    def handed(self, node: str, life: int, uuid: str, region: int) -> None:
        with self.lock:
            if self.life[node] != life:
                return
            owner = self.recovering[uuid].get(region)
            if owner not in (None, node):
                text = f"{uuid}: region {region} handed to {node} while {owner}'s kernel recovers it"
                self.violations.append(("two_recoverers", owner, text, time.time()))
            self.recovering[uuid][region] = node

    def set_sync_sent(self, node: str, uuid: str, region: int, in_sync: bool) -> None:
        with self.lock:
            if self.recovering[uuid].get(region) == node:
                del self.recovering[uuid][region]
            if in_sync:
                self.syncing[uuid][region] += 1
                self.synced_at[uuid][region] = time.time()
                self.crashed[uuid].discard(region)

    def set_sync_answered(self, uuid: str, region: int, in_sync: bool) -> None:
        if in_sync:
            with self.lock:
                self.syncing[uuid][region] -= 1

    def node_crashed(self, node: str, at: float | None = None) -> None:
        """The node's host is gone (or its daemon and corosync were killed together, which the
        others cannot tell from a power cut): its writes ended; its marks must turn out of sync.
        ``at``: when it happened, if before now (a fence the harness learns of afterwards); a
        SET_REGION_SYNC sent since then may have put a region back in sync."""
        with self.lock:
            self.life[node] += 1
            for uuid in self.uuids:
                in_flight = {r for r, k in self.syncing[uuid].items() if k > 0}
                if at is not None:
                    in_flight |= {r for r, t in self.synced_at[uuid].items() if t >= at}
                self.crashed[uuid] |= self.held[uuid][node] - in_flight
                self.held[uuid][node] = set()
                self.recovering[uuid] = {r: n for r, n in self.recovering[uuid].items() if n != node}

    def is_recovering(self, node: str, uuid: str) -> list[int]:
        with self.lock:
            return [r for r, n in self.recovering[uuid].items() if n == node]


@dataclass
class Kernel:
    """One node's kernel: its connection, its luid per log, its interrupted request."""

    name: str
    client: Client | None = None
    luids: dict[str, int] = field(default_factory=dict)
    #: The operation the fault interrupted (sent again after a daemon-only restart).
    in_flight: tuple | None = None
    requests: int = 0
    answered_late: int = 0

    def c(self) -> Client:
        assert self.client is not None
        return self.client


class Point:
    """One crash point: its decisions (from its seed), its run, its oracle."""

    def __init__(self, runner: Runner, seed: int) -> None:
        self.runner = runner
        self.daemons = runner.daemons
        self.rig = runner.daemons.rig
        self.seed = seed
        rng = random.Random(seed)
        self.rng = rng
        self.fault = rng.choices(FAULTS, WEIGHTS)[0]
        self.victim = rng.choice(NAMES)
        self.lose_state = self.fault in ("crash", "all") and rng.random() < LOSE_STATE
        self.lost = self.victim if self.lose_state else None
        self.lost_done = False
        self.trigger = rng.choice(("requests", "delay"))
        self.after_requests = rng.randint(0, 80)
        self.after_delay = rng.uniform(0.0, 1.0)
        self.tail = rng.uniform(0.0, 0.5)
        self.partition_for = rng.uniform(0.3, 6.0)
        self.crash_down_for = rng.choice((0.0, rng.uniform(0.0, 5.0)))
        self.worker_seeds = {n: rng.getrandbits(32) for n in NAMES}
        tag = f"{seed:08x}"
        self.uuids = {name: f"cp-{tag}-{name}-{next(_luids):x}" for name, _, _ in LOGS}
        self.regions = {self.uuids[name]: regions for name, regions, _ in LOGS}
        self.sync_arg = {self.uuids[name]: sync for name, _, sync in LOGS}
        self.oracle = Oracle(list(self.uuids.values()))
        self.kernels = {n: Kernel(n) for n in NAMES}
        self.total = 0
        self.total_lock = threading.Condition()
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.figures: Counter[str] = Counter()
        #: When the point began (UTC, as the daemons' logs say): where to look in them.
        self.began = time.strftime("%H:%M:%S", time.gmtime())
        #: Nodes the daemons fenced during this point (``--fence``), and when.
        self.fenced: dict[str, float] = {}

    def describe(self) -> str:
        what = {"kill": f"SIGKILL of {self.victim}'s daemon",
                "crash": f"{self.victim} crashed (daemon + corosync), down {self.crash_down_for:.1f} s",
                "partition": f"{self.victim} partitioned for {self.partition_for:.1f} s",
                "all": "every daemon and corosync SIGKILLed"}[self.fault]
        if self.lose_state:
            what += f", {self.lost}'s state directory lost"
        when = (f"after {self.after_requests} requests" if self.trigger == "requests"
                else f"after {self.after_delay:.2f} s")
        return f"{what}, {when}; began {self.began} UTC"

    # --- the kernels --------------------------------------------------------------------------

    def connect(self, name: str) -> None:
        k = self.kernels[name]
        if k.client is not None:
            k.client.close()
        k.client = Client(self.daemons.node(name).socket, timeout=REQUEST_TIMEOUT)
        self.daemons.clients.append(k.client)

    def open_all(self, name: str, reconnect: bool) -> None:
        """CTR + RESUME of every log: with the same luids when ``reconnect`` (the kernel
        reconnecting to a restarted daemon), else with new ones (a new boot, or the first open)."""
        k = self.kernels[name]
        for uuid, regions in self.regions.items():
            if not reconnect:
                k.luids[uuid] = next(_luids)
            text = ctr_text(regions, extra=self.sync_arg[uuid] or "")
            data = text.encode() + (b"\0" if reconnect else b"")
            k.c().ok(uuid, k.luids[uuid], T.CTR, data)
            k.c().ok(uuid, k.luids[uuid], T.RESUME)

    def count(self, k: Kernel, n: int = 1) -> None:
        k.requests += n
        with self.total_lock:
            self.total += n
            self.total_lock.notify_all()

    def run_op(self, k: Kernel, op: tuple) -> None:
        """One operation of a kernel; ``k.in_flight`` while it is unanswered."""
        kind, uuid = op[0], op[1]
        c, luid, life = k.c(), k.luids[uuid], self.oracle.life[k.name]
        k.in_flight = op
        if kind == "flush":
            marks, clears = op[2], op[3]
            self.oracle.clearing(k.name, uuid, clears)
            for start in range(0, len(clears), 32):
                c.ok(uuid, luid, T.CLEAR_REGION, wire.build_regions(list(clears[start:start + 32])))
                self.count(k)
            c.ok(uuid, luid, T.FLUSH, wire.build_regions(list(marks)) if marks else b"")
            self.count(k)
            self.oracle.flushed(k.name, life, uuid, marks)
            self.figures["flush"] += 1
        elif kind == "work":
            data = c.ok(uuid, luid, T.GET_RESYNC_WORK)
            self.count(k)
            if int.from_bytes(data[:8], "little", signed=True):
                region = int.from_bytes(data[8:16], "little")
                self.oracle.handed(k.name, life, uuid, region)
                self.figures["handed"] += 1
        elif kind == "sync":
            region, in_sync = op[2], op[3]
            self.oracle.set_sync_sent(k.name, uuid, region, in_sync)
            try:
                c.ok(uuid, luid, T.SET_REGION_SYNC,
                     region.to_bytes(8, "little") + int(in_sync).to_bytes(8, "little", signed=True))
            except (DaemonGone, NoReply):
                raise  # stays counted as in flight: it may still apply
            self.oracle.set_sync_answered(uuid, region, in_sync)
            self.count(k)
            self.figures["synced" if in_sync else "desynced"] += 1
        elif kind == "read":
            rtype = op[2]
            c.ok(uuid, luid, rtype, wire.build_u64(op[3]))
            self.count(k)
        k.in_flight = None

    def next_op(self, k: Kernel, rng: random.Random) -> tuple:
        uuid = rng.choice(list(self.regions))
        regions = self.regions[uuid] - 1  # the last is the barrier's
        held = sorted(self.oracle.held[uuid][k.name])
        recovering = self.oracle.is_recovering(k.name, uuid)
        roll = rng.random()
        if recovering and roll < 0.3:
            return ("sync", uuid, rng.choice(recovering), True)
        if roll < 0.45:
            marks = sorted(rng.sample(range(regions), rng.randint(1, 4)))
            clears = sorted(rng.sample(held, min(len(held), rng.randint(0, 3)))) if held else []
            clears = [r for r in clears if r not in marks]
            return ("flush", uuid, marks, clears)
        if roll < 0.7:
            fresh = next(u for u in self.regions if self.sync_arg[u] is None)
            return ("work", fresh if rng.random() < 0.8 else uuid)
        if roll < 0.75:
            return ("sync", uuid, rng.randrange(regions), False)
        return ("read", uuid, rng.choice((T.IS_CLEAN, T.IN_SYNC)), rng.randrange(regions))

    def kernel_thread(self, name: str) -> None:
        k = self.kernels[name]
        rng = random.Random(self.worker_seeds[name])
        try:
            while not self.stop.is_set():
                op = self.next_op(k, rng)
                self.run_op(k, op)
                if op[0] == "work" and rng.random() < 0.6:
                    for region in self.oracle.is_recovering(name, op[1]):
                        self.run_op(k, ("sync", op[1], region, True))
        except (DaemonGone, NoReply, ConnectionError):
            pass  # the fault: this kernel waits for its daemon
        except Exception as exc:  # noqa: BLE001 - reported with the point
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")

    # --- the point ----------------------------------------------------------------------------

    def run(self) -> dict:
        t0 = time.monotonic()
        for name in NAMES:
            self.connect(name)
            self.open_all(name, reconnect=False)
        threads = {n: threading.Thread(target=self.kernel_thread, args=(n,), daemon=True) for n in NAMES}
        for t in threads.values():
            t.start()
        if self.trigger == "requests":
            with self.total_lock:
                self.total_lock.wait_for(lambda: self.total >= self.after_requests
                                         or not any(t.is_alive() for t in threads.values()), timeout=30)
        else:
            time.sleep(self.after_delay)
        in_flight = {n: self.kernels[n].in_flight for n in NAMES}
        self.inject()
        # The other kernels go on while the node is away (a departure is seen after corosync's
        # token + consensus, 3.6 s here): what they are answered meanwhile is checked too.
        time.sleep({"partition": self.partition_for, "crash": self.crash_down_for}.get(self.fault, self.tail))
        self.stop.set()
        if self.fault == "partition":
            self.rig.heal(self.victim)
        self.absorb_fences()
        for name, t in threads.items():
            t.join(REQUEST_TIMEOUT + 10)
            if t.is_alive():
                self.errors.append(f"{name}: a request unanswered after {REQUEST_TIMEOUT} s")
        self.recover()
        self.barrier_fenced()
        self.check()
        self.close_logs()
        in_flight_kinds = Counter(op[0] if op else "none" for op in in_flight.values())
        return {"seed": self.seed, "fault": self.fault, "lose_state": self.lose_state,
                "trigger": self.trigger, "describe": self.describe(),
                "requests": sum(k.requests for k in self.kernels.values()),
                "in_flight": dict(in_flight_kinds), "seconds": round(time.monotonic() - t0, 2),
                **self.figures}

    def inject(self) -> None:
        d, v = self.daemons, self.victim
        if self.fault == "kill":
            d.kill(v)
        elif self.fault == "crash":
            self.power_cut([v])
        elif self.fault == "partition":
            self.rig.partition(v)
        elif self.fault == "all":
            self.power_cut(list(NAMES))

    def power_cut(self, names: list[str]) -> None:
        """Every process of these nodes SIGKILLed at once, before any is reaped: a daemon killed
        a few milliseconds before another node's would be a daemon-only kill to the others (they
        see it leave, release its marks and recover them), not the power cut this is."""
        d, rig = self.daemons, self.rig
        for name in names:
            proc = d.node(name).proc
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            pid = rig.node(name).pid
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for name in names:
            self.oracle.node_crashed(name)
        for name in names:
            d.kill(name)  # reaps it
            rig.kill_corosync(name)  # reaps it, removes its /dev/shm files

    def recover(self) -> None:
        d, v = self.daemons, self.victim
        fencing = self.runner.fence
        if fencing and self.fault in ("kill", "crash"):
            # Its daemon left the group: the others fence it (a real host takes longer to boot
            # than they take to see it gone, so it comes back after its fence, not before).
            self.wait_fence(v, 20.0)
        if self.fault == "kill":
            if v in self.fenced:
                self.reboot([v])
            else:
                d.start(v)
                self.runner.write_pids()
                self.reconnect(v)
        elif self.fault == "crash":
            self.reboot([v])
        elif self.fault == "partition":
            self.wait_whole(v)
        elif self.fault == "all":
            self.reboot(list(NAMES))

    def wait_whole(self, name: str, timeout: float = 60.0) -> None:
        """After a heal: every node quorate among all; with fencing, ``name`` may be fenced on the
        way (its fence is issued once the others see it gone, which can be right at the heal):
        then it boots again."""
        deadline = time.monotonic() + timeout
        while True:
            if self.runner.fence:
                self.absorb_fences()
                if name in self.fenced and not self.rig.corosync_alive(name):
                    self.reboot([name])
                    return
            left = deadline - time.monotonic()
            try:
                self.rig.wait_quorate(list(NAMES), True, members=len(NAMES),
                                      timeout=min(left, 5.0) if self.runner.fence else left)
                return
            except RigError:
                if not self.runner.fence or time.monotonic() > deadline:
                    raise

    def absorb_fences(self) -> list[str]:
        """Nodes fenced since the last look: crashed as of their fence (the fence agent SIGKILLs
        the node's daemon and corosync: a power cut), reaped; returns their names."""
        names = []
        for name, at in self.runner.new_fences():
            self.fenced[name] = at
            self.figures["fenced"] += 1
            self.oracle.node_crashed(name, at=at)
            self.kernels[name].in_flight = None
            self.daemons.kill(name)
            self.rig.kill_corosync(name)
            names.append(name)
        return names

    def wait_fence(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while name not in self.fenced and time.monotonic() < deadline:
            self.absorb_fences()
            time.sleep(0.05)

    def barrier_fenced(self) -> None:
        """The barrier; with fencing, a node fenced meanwhile (a fence of a node that came back)
        boots again and the barrier starts over."""
        for _ in range(3):
            try:
                self.barrier()
                return
            except (DaemonGone, NoReply):
                if not self.runner.fence:
                    raise
                time.sleep(0.5)
                fenced = self.absorb_fences()
                if not fenced:
                    raise
                self.reboot(fenced)
        self.barrier()

    def reconnect(self, name: str) -> None:
        """The kernel of a node whose daemon restarted: CTR + RESUME with the same luids, then
        its interrupted request again (a live log's request is resent after the reconnect)."""
        k = self.kernels[name]
        self.connect(name)
        self.open_all(name, reconnect=True)
        if k.in_flight is not None:
            op, k.in_flight = k.in_flight, None
            self.run_op(k, op)
            k.answered_late += 1

    def reboot(self, names: list[str]) -> None:
        d, rig = self.daemons, self.rig
        if self.lost is not None and self.lost in names and not self.lost_done:
            shutil.rmtree(d.node(self.lost).state_dir, ignore_errors=True)
            self.lost_done = True
        for name in names:
            d.reboot_id(name)
            if not rig.corosync_alive(name):
                rig.start_corosync(name, wait=False)
        rig.wait_quorate(list(NAMES), True, members=len(NAMES), timeout=60)
        d.start_all(names)
        self.runner.write_pids()
        for name in names:
            self.kernels[name].in_flight = None
            self.connect(name)
            self.open_all(name, reconnect=False)

    def barrier(self) -> None:
        """Each node's kernel sends an agreed request and waits for its answer: the node is then
        current (it has applied everything answered anywhere before)."""
        for name in NAMES:
            k = self.kernels[name]
            for uuid, regions in self.regions.items():
                k.c().ok(uuid, k.luids[uuid], T.FLUSH, wire.build_regions([regions - 1]))
                k.c().ok(uuid, k.luids[uuid], T.CLEAR_REGION, wire.build_regions([regions - 1]))
                k.c().ok(uuid, k.luids[uuid], T.FLUSH)

    def read_all(self, name: str, uuid: str) -> tuple[list[int], list[int], int]:
        k = self.kernels[name]
        c, luid, n = k.c(), k.luids[uuid], self.regions[uuid]
        clean = [wire.parse_s64(c.ok(uuid, luid, T.IS_CLEAN, wire.build_u64(r))) for r in range(n)]
        sync = [wire.parse_s64(c.ok(uuid, luid, T.IN_SYNC, wire.build_u64(r))) for r in range(n)]
        return clean, sync, c.sync_count(uuid, luid)

    def check(self) -> None:
        o = self.oracle
        for rule, owner, text, when in o.violations:
            if owner in self.fenced and self.fenced[owner] <= when:
                continue  # its kernel's recovery ended with its fence
            self.violation(self.unfenced(rule, {owner}), text)
        for uuid in self.regions:
            answers = {n: self.read_all(n, uuid) for n in NAMES}
            held = {r: n for n, regions in o.held[uuid].items() for r in regions}
            in_flight = {r for r, k in o.syncing[uuid].items() if k > 0}
            crashed = o.crashed[uuid] - in_flight
            for name, (clean, sync, count) in answers.items():
                bad = [f"{r} (held by {held[r]})" for r in sorted(held) if clean[r]]
                if bad:
                    holders = {held[r] for r in held if clean[r]}
                    self.violation(self.unfenced("held", holders),
                                   f"{name}: {uuid}: clean while a node holds them marked: "
                                   f"regions {', '.join(bad)}")
                bad = [str(r) for r in sorted(crashed) if sync[r]]
                if bad:
                    self.violation("crashed_in_sync", f"{name}: {uuid}: marked by a crashed node, in sync "
                                                      f"without a SET_REGION_SYNC: regions {', '.join(bad)}")
                bad = [str(r) for r in sorted(crashed) if clean[r]]
                if bad:
                    self.violation("mark_lost", f"{name}: {uuid}: marked by a crashed node, never recovered, "
                                                f"clean: regions {', '.join(bad)}")
                if count != sum(sync):
                    self.violation("disagree", f"{name}: {uuid}: GET_SYNC_COUNT {count} but {sum(sync)} "
                                               "regions in sync")
            first = answers[NAMES[0]]
            for name in NAMES[1:]:
                other = answers[name]
                # The barrier's own region: the last CLEAR of it is answered once applied on its
                # node, and reaches the others a moment later.
                barrier = self.regions[uuid] - 1
                sync_diff = [r for r in range(len(first[1])) if first[1][r] != other[1][r]]
                clean_diff = [f"{r} ({first[0][r]}/{other[0][r]})" for r in range(len(first[0]))
                              if first[0][r] != other[0][r] and r != barrier]
                if sync_diff or clean_diff or first[2] != other[2]:
                    clean = ", ".join(clean_diff[:10])
                    pair = f"{NAMES[0]}/{name}"
                    text = (f"{uuid}: {pair} differ: GET_SYNC_COUNT {first[2]}/{other[2]}, "
                            f"IN_SYNC of regions {sync_diff[:10]}, IS_CLEAN ({pair}) of regions {clean}")
                    self.violation("disagree", text)
        for e in self.errors:
            self.violation("error", e)

    def unfenced(self, rule: str, holders: set[str]) -> str:
        """``rule``, or ``rule_unfenced`` when every node it protected is this point's victim of a
        daemon kill or a partition: a living node the others saw leave and, with no
        ``--fence-command``, counted as fenced at once (docs/cluster.md says this is unsafe for a
        partition). Still a violation; named apart so the two kinds can be told from each other."""
        if not self.runner.fence and self.fault in ("kill", "partition") and holders == {self.victim}:
            return f"{rule}_unfenced"
        return rule

    def violation(self, rule: str, text: str) -> None:
        self.runner.violations.append(Violation(rule, self.seed, self.describe(), text))

    def close_logs(self) -> None:
        for name in NAMES:
            k = self.kernels[name]
            for uuid in self.regions:
                k.c().ok(uuid, k.luids[uuid], T.DTR)


class Runner:
    """Points one after the other on one rig and one set of daemons.

    ``fence``: the daemons run with a ``--fence-command`` that is a power switch: it SIGKILLs the
    fenced node's daemon and corosync (their pids in ``fence/pids-<node id>``, kept current by the
    harness) and records when (``fence/fenced``); the harness then counts that node as crashed as
    of then, and boots it again."""

    def __init__(self, rig: Rig, base: Path, fence: bool = False) -> None:
        self.fence = fence
        self.fence_dir = base / "fence"
        self.fence_dir.mkdir(parents=True, exist_ok=True)
        self.fences_seen = 0
        extra: list[str] = []
        if fence:
            script = (f"kill -9 $(cat {self.fence_dir}/pids-$1 2>/dev/null) 2>/dev/null; "
                      f"echo \"$1 $(date +%s.%N)\" >> {self.fence_dir}/fenced")
            extra = ["--fence-command", f"sh -c '{script}' fence"]
        self.daemons = ClusterDaemons(rig, base, extra=extra)
        self.violations: list[Violation] = []
        self.results: list[dict] = []
        #: Points after which the cluster was started again from empty state directories (a point
        #: that could not finish leaves a cluster that may not answer: the next points need one that does).
        self.resets = 0

    def start(self) -> None:
        self.daemons.start_all()
        self.write_pids()

    def write_pids(self) -> None:
        """What the fence agent kills for each node: its daemon and its corosync as they are now."""
        rig = self.daemons.rig
        for n in rig.nodes:
            d = self.daemons.node(n.name)
            pids = [str(p) for p in (d.proc.pid if d.alive() else None,
                                     n.pid if rig.corosync_alive(n.name) else None) if p]
            tmp = self.fence_dir / f"pids-{n.nodeid}.tmp"
            tmp.write_text(" ".join(pids) + "\n")
            tmp.replace(self.fence_dir / f"pids-{n.nodeid}")

    def new_fences(self) -> list[tuple[str, float]]:
        """(node, when) of the fences done since the last call."""
        try:
            lines = (self.fence_dir / "fenced").read_text().splitlines()
        except FileNotFoundError:
            return []
        names = {n.nodeid: n.name for n in self.daemons.rig.nodes}
        new = [line.split() for line in lines[self.fences_seen:] if line.strip()]
        self.fences_seen = len(lines)
        return [(names[int(node)], float(at)) for node, at in new]

    def healthy(self) -> None:
        """Every port up, every corosync and daemon running, all quorate (after a point that
        failed half-way)."""
        rig, d = self.daemons.rig, self.daemons
        for n in rig.nodes:
            rig.heal(n.name)
            if not rig.corosync_alive(n.name):
                d.kill(n.name)
                d.reboot_id(n.name)  # fenced after the last look: its host booted again
                rig.start_corosync(n.name, wait=False)
        rig.wait_quorate(list(NAMES), True, members=len(NAMES), timeout=60)
        for name in NAMES:
            if not d.node(name).alive():
                d.start(name)
        self.write_pids()
        self.fences_seen = len(self._fence_lines())

    def _fence_lines(self) -> list[str]:
        try:
            return (self.fence_dir / "fenced").read_text().splitlines()
        except FileNotFoundError:
            return []

    def reset(self) -> None:
        """Every daemon killed, every state directory emptied, the cluster started again."""
        self.resets += 1
        d = self.daemons
        for name in NAMES:  # all at once: one seen leaving before the others die would be fenced
            proc = d.node(name).proc
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for name in NAMES:
            d.kill(name)
            shutil.rmtree(d.node(name).state_dir, ignore_errors=True)
            d.reboot_id(name)
        self.healthy()

    def run_point(self, seed: int) -> dict:
        self.healthy()
        point = Point(self, seed)
        before = len(self.violations)
        try:
            result = point.run()
        except (RigError, DaemonGone, NoReply, AssertionError, OSError) as exc:
            # The harness could not finish the point (a daemon that did not come back is itself a
            # finding): reported as a violation of the point, with its seed.
            point.violation("error", f"{type(exc).__name__}: {exc}")
            result = {"seed": seed, "fault": point.fault, "lose_state": point.lose_state,
                      "describe": point.describe(), "error": str(exc)[:500]}
        finally:
            for k in point.kernels.values():
                if k.client is not None:
                    k.client.close()
            self.daemons.clients = []
        if "error" in result:
            self.reset()
        result["violations"] = len(self.violations) - before
        self.results.append(result)
        return result

    def logs(self) -> dict[str, str]:
        return {n: str(self.daemons.node(n).log_path) for n in NAMES}


def summary(results: list[dict], violations: list[Violation], seconds: float, resets: int = 0) -> dict:
    faults = Counter(r["fault"] + ("+lost_state" if r.get("lose_state") else "") for r in results)
    rules = Counter(v.rule for v in violations)
    per_point = [r["seconds"] for r in results if "seconds" in r]
    out = {
        "points": len(results),
        "faults": dict(sorted(faults.items())),
        "requests_acknowledged": sum(r.get("requests", 0) for r in results),
        "flushes": sum(r.get("flush", 0) for r in results),
        "regions_handed": sum(r.get("handed", 0) for r in results),
        "regions_synced": sum(r.get("synced", 0) for r in results),
        "fenced": sum(r.get("fenced", 0) for r in results),
        "in_flight_at_fault": dict(sum((Counter(r.get("in_flight", {})) for r in results), Counter())),
        "violations_by_rule": dict(rules),
        "points_with_violations": sum(1 for r in results if r.get("violations")),
        "points_not_finished": sum(1 for r in results if "error" in r),
        "cluster_resets": resets,
        "seconds": round(seconds, 1),
        "seconds_per_point": round(sum(per_point) / len(per_point), 2) if per_point else None,
        "seconds_per_point_by_fault": {
            f: round(sum(t) / len(t), 2) for f in FAULTS
            if (t := [r["seconds"] for r in results if r["fault"] == f and "seconds" in r])},
        "violations": len(violations),
    }
    return out


def point_seeds(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(32) for _ in range(count)]


def seeds_covering(seed: int, count: int) -> list[int]:
    """``count`` point seeds from ``seed``'s sequence, the first ones each of a fault not chosen
    yet (a short run sees every fault)."""
    chosen: list[int] = []
    faults: set[str] = set()
    for s in point_seeds(seed, 10_000):
        fault = random.Random(s).choices(FAULTS, WEIGHTS)[0]
        if fault not in faults or len(faults) == len(FAULTS):
            faults.add(fault)
            chosen.append(s)
        if len(chosen) == count:
            break
    return chosen


def run(points: int, seed: int, base: Path, replay: int | None = None,
        echo: bool = True, fence: bool = False) -> tuple[dict, list[Violation], Runner]:
    """A fresh rig under ``base``, ``points`` points (or the one point ``replay``); the summary,
    the violations and the runner (its daemons' logs stay under ``base``)."""
    if threading.current_thread() is threading.main_thread():
        # SIGTERM ends the run through the ``finally`` below (daemons stopped, rig down); a
        # background shell's SIGINT is ignored, so this is how such a run is stopped.
        signal.signal(signal.SIGTERM, _terminate)
    rig = Rig(base / "rig")
    rig.up(len(NAMES))
    runner = Runner(rig, base / "daemons", fence=fence)
    t0 = time.monotonic()
    try:
        runner.start()
        seeds = [replay] if replay is not None else seeds_covering(seed, points)
        for i, s in enumerate(seeds, 1):
            result = runner.run_point(s)
            if echo:
                print(f"point {i}/{len(seeds)} seed {s}: {result['describe']}: "
                      f"{result.get('seconds', '-')} s, {result['violations']} violation(s)", flush=True)
                for v in runner.violations[-result["violations"]:] if result["violations"] else []:
                    print(f"  {v}", flush=True)
    finally:
        with contextlib.suppress(Exception):
            runner.daemons.stop_all()
        rig.down()
    return (summary(runner.results, runner.violations, time.monotonic() - t0, runner.resets),
            runner.violations, runner)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--replay", type=int, metavar="POINT_SEED", help="run the one point of this seed")
    p.add_argument("--dir", type=Path, help="where the rig and the daemons' logs go (kept)")
    p.add_argument("--json", type=Path, help="write the summary and the violations here")
    p.add_argument("--fence", action="store_true",
                   help="daemons with a --fence-command that SIGKILLs the fenced node (a power switch)")
    args = p.parse_args(argv)
    base = args.dir or Path(tempfile.mkdtemp(prefix="ulog-cluster-points-"))
    base.mkdir(parents=True, exist_ok=True)
    summary_, violations, runner = run(args.points, args.seed, base, args.replay, fence=args.fence)
    print(json.dumps(summary_, indent=1))
    for v in violations:
        print(v)
    print(f"daemons' logs under {base / 'daemons'}")
    if args.json:
        args.json.write_text(json.dumps({**summary_, "violation_list": [str(v) for v in violations]},
                                        indent=1) + "\n")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
