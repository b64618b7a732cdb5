"""kill -9 at random instants over a mixed workload of several mirrors.

Four mirrors, one driver thread each (its own connection: one kernel thread per log), run a mixed
workload against one dm-ulogd (LMDB): writes (MARK + FLUSH, or marks carried in FLUSH), clears,
recovery (GET_RESYNC_WORK + SET_REGION_SYNC), regions falling out of sync, suspend/resume, a table
reload with the same uuid (CTR of a new luid while the old one serves, then suspend old, resume
new, DTR old: a hand-over) and remove + create (DTR, then a new luid that takes the retained
state). Every driver keeps an oracle per instance: the region log as every *acknowledged* request
left it, plus the states the store may hold as the uuid's newest commit.

The daemon is SIGKILLed at a random instant (a few points kill it while it starts up and restores).
After each crash point:

* ``ulog-recover verify`` on the store as the crash left it: exit 0 (if the tool is installed);
* the daemon starts on the store;
* **the daemon died, the kernel did not** (same boot id): every instance answers at once, its bits
  equal the oracle's (or the oracle's with the unacknowledged request applied), ``GET_SYNC_COUNT``
  equals the number of regions in sync (``RegionLog.check()`` on what it reports), and the
  interrupted request is sent again, as the kernel would (a live log's region request after the
  kernel's reconnect: CTR with its NUL, RESUME);
* **the host rebooted** (every few points: new boot id, new luids): each mirror's new instance
  takes over the uuid's state: its bits are those of one of the states the store and the journal
  may hold (the last acknowledged commit, or a state after later acknowledged requests: a
  background checkpoint or the journal's records may carry them), taken over; every region dirty
  or out of sync in the last acknowledged commit and not made good by an acknowledged request
  since is out of sync.

Every other daemon run checkpoints almost at once (``--checkpoint-age 0.02``) with 64 KiB journal
segments, so kills also land during checkpoints, segment switches and journal cuts; the test
checks that the journal was cut during the run.

A violation is any of these failing: a region marked under an acknowledged FLUSH and not cleared
that is reported clean or in sync, or any other difference. Default ~30 crash points
(``ULOG_REL_CRASH_POINTS``); the long mode runs 1000.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from rel_lib import figures, launch, run_verify, scale

from ulog_disk.daemon.applier import Applier
from ulog_disk.log.regionlog import RegionLog
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import RequestType as T
from ulog_disk.storage.lmdb_store import LmdbBackend
from ulog_disk.testing.client import Client, DaemonGone, ctr_text
from ulog_disk.testing.kernel import acknowledged, bits_of, log_of
from ulog_disk.testing.launcher import Daemon

POINTS = int(scale("ULOG_REL_CRASH_POINTS", 30, 1000))
SEED = int(os.environ.get("ULOG_REL_SEED", "11"))
#: Every REBOOT_EVERY-th crash point is a host reboot (1 in 8 in the long mode: the figures in
#: docs/reliability.md were taken when each reboot still left its instances in the store, see
#: test_many_host_reboots_keep_the_state).
REBOOT_EVERY = int(scale("ULOG_REL_REBOOT_EVERY", 5, 8))
STARTUP_KILL_EVERY = 13
COMMITS = (T.FLUSH, T.RESUME, T.POSTSUSPEND)
#: Requests that change an instance's bits without being a commit point.
CHANGES = (T.MARK_REGION, T.CLEAR_REGION, T.SET_REGION_SYNC)
#: A live log's requests that the kernel, finding no daemon, sends again after its reconnect.
RECONNECTS_BEFORE = (T.MARK_REGION, T.CLEAR_REGION, T.SET_REGION_SYNC, T.FLUSH, T.GET_RESYNC_WORK)
#: Every other daemon run checkpoints almost at once and uses small journal segments, so that
#: kills land during checkpoints, segment switches and journal cuts too (not only between them).
BUSY_STORE = ["--checkpoint-age", "0.02", "--journal-segment-size", "65536"]

SPECS = [
    # uuid, regions, log type, integrated flush
    ("LVM-crash-core", 48, "clustered-core", False),
    ("LVM-crash-disk", 40, "clustered-disk", False),
    ("LVM-crash-iflush", 48, "clustered-core", True),
    ("LVM-crash-small", 20, "core", False),
]


@dataclass
class Step:
    luid: int
    rtype: T
    data: bytes = b""
    #: For a first RESUME: the state(s) it must take over (None: a brand-new log).
    adopt: list[RegionLog] | None = None


class Violation(AssertionError):
    pass


@dataclass
class Driver:
    uuid: str
    regions: int
    log_type: str
    iflush: bool
    rng: random.Random
    next_luid: int
    cur: int = 0
    oracles: dict[int, RegionLog] = field(default_factory=dict)
    resumed: set[int] = field(default_factory=set)
    candidates: list[RegionLog] = field(default_factory=list)
    steps: deque[Step] = field(default_factory=deque)
    in_flight: Step | None = None
    acked: Counter = field(default_factory=Counter)
    actions: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    #: Differences in the safe direction only (reported dirty / out of sync where the oracle is not).
    conservative: list[str] = field(default_factory=list)
    #: The state a DTR'd instance left as the uuid's retained state.
    retained: RegionLog | None = None
    #: Instances whose first RESUME was acknowledged but whose take-over is not checked yet.
    unverified: dict[int, list[RegionLog]] = field(default_factory=dict)

    @property
    def ctr(self) -> str:
        return ctr_text(self.regions, log_type=self.log_type)

    def new_luid(self) -> int:
        self.next_luid += 1
        return self.next_luid

    # --- workload --------------------------------------------------------------------------------

    def start(self, adopt: list[RegionLog] | None) -> None:
        """A new instance (first start, or after a host reboot): CTR + RESUME."""
        luid = self.new_luid()
        self.oracles = {luid: RegionLog.fresh(self.regions, False)}
        self.resumed = set()
        self.steps = deque([Step(luid, T.CTR, self.ctr.encode()), Step(luid, T.RESUME, adopt=adopt)])

    def plan(self) -> None:
        rng, cur, log = self.rng, self.cur, self.oracles[self.cur]
        pick = rng.random()
        if pick < 0.35:
            self.actions["write"] += 1
            regions = rng.sample(range(self.regions), rng.randint(1, 5))
            if self.iflush:
                self.steps.append(Step(cur, T.FLUSH, wire.build_regions(regions)))
            else:
                self.steps += [Step(cur, T.MARK_REGION, wire.build_regions(regions)), Step(cur, T.FLUSH)]
        elif pick < 0.55:
            self.actions["clear"] += 1
            dirty = log.dirty_regions() or [rng.randrange(self.regions)]
            regions = rng.sample(dirty, min(len(dirty), rng.randint(1, 4)))
            self.steps += [Step(cur, T.CLEAR_REGION, wire.build_regions(regions)), Step(cur, T.FLUSH)]
        elif pick < 0.75:
            self.actions["recover"] += 1
            self.steps.append(Step(cur, T.GET_RESYNC_WORK))
        elif pick < 0.79:
            self.actions["out_of_sync"] += 1
            region = rng.randrange(self.regions)
            self.steps += [Step(cur, T.SET_REGION_SYNC, wire.build_set_region_sync(region, 0)),
                           Step(cur, T.FLUSH)]
        elif pick < 0.87:
            self.actions["suspend_resume"] += 1
            self.steps += [Step(cur, T.PRESUSPEND), Step(cur, T.POSTSUSPEND), Step(cur, T.RESUME)]
        elif pick < 0.95:
            # table reload with the same uuid: the new luid serves after the old one suspends
            self.actions["handover"] += 1
            new = self.new_luid()
            self.steps += [Step(new, T.CTR, self.ctr.encode())]
            regions = rng.sample(range(self.regions), 2)
            self.steps += [Step(cur, T.MARK_REGION, wire.build_regions(regions)), Step(cur, T.FLUSH),
                           Step(cur, T.PRESUSPEND), Step(cur, T.POSTSUSPEND),
                           Step(new, T.RESUME, adopt=[]),  # adopt: filled in when it is sent
                           Step(cur, T.DTR)]
        else:
            # dmsetup remove + create: the new instance takes the retained state
            self.actions["remove_create"] += 1
            new = self.new_luid()
            self.steps += [Step(cur, T.PRESUSPEND), Step(cur, T.POSTSUSPEND), Step(cur, T.DTR),
                           Step(new, T.CTR, self.ctr.encode()), Step(new, T.RESUME, adopt=[])]

    def run(self, client: Client, stop: threading.Event) -> None:
        """Send steps until the daemon dies (or ``stop``); the interrupted one stays in_flight."""
        while not stop.is_set():
            if not self.steps:
                self.plan()
            step = self.steps[0]
            if step.rtype is T.RESUME and step.adopt == [] and step.luid not in self.resumed:
                # what a hand-over or re-create takes over: the state the old instance leaves
                step.adopt = [self.leaving_state(step.luid)]
            if step.rtype is T.CTR and step.luid not in self.oracles:
                self.oracles[step.luid] = RegionLog.fresh(self.regions, False)
            self.in_flight = step
            error, data = client.request(self.uuid, step.luid, step.rtype, step.data)
            self.steps.popleft()
            self.in_flight = None
            self.on_ack(client, step, error, data)

    def leaving_state(self, new: int) -> RegionLog:
        old = [luid for luid in self.oracles if luid != new and luid in self.resumed]
        if old:
            return self.oracles[old[0]].copy()
        return self.retained

    def on_ack(self, client: Client, step: Step, error: int, data: bytes) -> None:
        self.acked[step.rtype.name] += 1
        if step.rtype is T.DTR:
            # (an error: the DTR was sent again after a crash that had already done it)
            if step.luid in self.resumed and step.luid in self.oracles:
                self.retained = self.oracles[step.luid].copy()
            self.oracles.pop(step.luid, None)
            self.resumed.discard(step.luid)
            self.unverified.pop(step.luid, None)
            return
        if error:
            self.fail(f"{step.rtype.name} luid={step.luid:#x}: error {error}")
            return
        log = self.oracles.get(step.luid)
        assert log is not None, step
        if step.rtype is T.GET_RESYNC_WORK:
            have, region = wire.parse_resync_work(data)
            if have:
                if log.sync[region]:
                    self.fail(f"GET_RESYNC_WORK handed out region {region}, which is in sync")
                self.steps.appendleft(Step(step.luid, T.SET_REGION_SYNC,
                                           wire.build_set_region_sync(region, 1)))
            return
        if step.rtype is T.RESUME and step.luid not in self.resumed:
            self.first_resume(client, step)
            return
        acknowledged(log, step.rtype, step.data)
        if step.luid == self.cur:
            # The store may hold any state since the last acknowledged commit: a background
            # checkpoint may store later requests, and the journal keeps a prefix of them.
            if step.rtype in COMMITS:
                self.candidates = [log.copy()]
            elif step.rtype in CHANGES:
                self.candidates.append(log.copy())

    def first_resume(self, client: Client, step: Step) -> None:
        self.resumed.add(step.luid)
        self.cur = step.luid
        if step.adopt is None:  # a brand-new log: nothing to take over
            self.candidates = [self.oracles[step.luid].copy()]
            return
        options = [c.adopted(self.regions, False) for c in step.adopt]
        self.oracles[step.luid] = options[0]
        self.candidates = [o.copy() for o in options]
        self.unverified[step.luid] = options
        clean, sync = client.bits(self.uuid, step.luid, self.regions)
        self.settle(step.luid, options, clean, sync, "RESUME took over")
        self.unverified.pop(step.luid, None)
        self.candidates = [self.oracles[step.luid].copy()]

    def settle(self, luid: int, options: list[RegionLog], clean: list[int], sync: list[int],
               what: str) -> None:
        """Compare reported bits with the states allowed; the oracle becomes what was reported."""
        for option in options:
            if (clean, sync) == bits_of(option):
                self.oracles[luid] = option
                return
        reported = log_of(clean, sync)
        unsafe = []
        for option in options:
            lost = [r for r in range(self.regions) if clean[r] and not option.clean[r]]
            synced = [r for r in range(self.regions) if sync[r] and not option.sync[r]]
            unsafe.append((len(lost) + len(synced), lost, synced))
        best = min(unsafe)
        detail = (f"luid={luid:#x}: {what}: reported in sync {[r for r in range(self.regions) if sync[r]]}, "
                  f"dirty {[r for r in range(self.regions) if not clean[r]]}; allowed: "
                  + "; ".join(f"in sync {[r for r in range(self.regions) if o.sync[r]]} dirty "
                              f"{o.dirty_regions()}" for o in options))
        if best[0]:
            self.fail(f"{detail}; regions reported clean that were dirty: {best[1]}, in sync that were "
                      f"not: {best[2]}")
        else:
            self.conservative.append(f"{self.uuid}: {detail}")
        self.oracles[luid] = reported

    def fail(self, what: str) -> None:
        self.violations.append(f"{self.uuid}: {what}")

    # --- after a crash ----------------------------------------------------------------------------

    def maybe_committed(self) -> list[RegionLog]:
        """The states the store may hold as the uuid's newest commit."""
        out = list(self.candidates)
        step = self.in_flight
        if step is not None and step.luid == self.cur and (step.rtype in COMMITS or step.rtype in CHANGES):
            maybe = self.oracles[step.luid].copy()
            acknowledged(maybe, step.rtype, step.data)
            out.append(maybe)
        if step is not None and step.rtype is T.RESUME and step.adopt:
            out += [c.adopted(self.regions, False) for c in step.adopt]
        return [o.copy() for o in out]

    def check_survivors(self, client: Client) -> int:
        """Same boot: every instance answers with the oracle's bits (or with the interrupted
        request applied); sync counts add up. Returns the number of instances checked."""
        checked = 0
        step = self.in_flight
        for luid, log in list(self.oracles.items()):
            if step is not None and step.luid == luid and (
                    (step.rtype in (T.CTR, T.RESUME) and luid not in self.resumed) or step.rtype is T.DTR):
                continue  # its CTR, first RESUME or DTR was interrupted: it is sent again
            error, _ = client.request(self.uuid, luid, T.GET_REGION_SIZE)
            if error:
                self.fail(f"luid={luid:#x} is not served after the restart ({error})")
                continue
            clean, sync = client.bits(self.uuid, luid, self.regions)
            count = client.sync_count(self.uuid, luid)
            checked += 1
            # RegionLog.check() on what the daemon reports: its sync count against its bits
            reported = log_of(clean, sync)
            reported.sync_count = count
            for problem in reported.check():
                self.fail(f"luid={luid:#x}: reported state breaks an invariant: {problem}")
            if luid not in self.resumed:
                # never resumed: restored from its record alone (no bits committed): nothing in sync
                if any(sync):
                    self.fail(f"never-resumed luid={luid:#x} reports regions in sync")
                continue
            if luid in self.unverified:
                options = self.unverified.pop(luid)
            else:
                options = [log]
                if step is not None and step.luid == luid:
                    maybe = log.copy()
                    acknowledged(maybe, step.rtype, step.data)
                    options.append(maybe)
            self.settle(luid, options, clean, sync,
                        f"after the crash (in flight: {step and step.rtype.name})")
            if luid == self.cur and luid in self.resumed and not self.candidates:
                self.candidates = [self.oracles[luid].copy()]
        return checked

    def after_restart(self, committed: list[RegionLog]) -> None:
        """Same boot: the interrupted request goes again (the kernel resends it). A live log's
        region request failed with -ESRCH while no daemon listened, so before it the kernel
        reconnects: CTR with its NUL counted, then RESUME (journaled, not written to the store,
        for a log resumed before: kills land during those too)."""
        step = self.in_flight
        if step is not None:
            self.steps.appendleft(step)
            if step.luid == self.cur and step.luid in self.resumed and step.rtype in RECONNECTS_BEFORE:
                self.actions["reconnect"] += 1
                reconnect = [Step(step.luid, T.CTR, self.ctr.encode() + b"\0"), Step(step.luid, T.RESUME)]
                self.steps.extendleft(reversed(reconnect))
            self.in_flight = None
        self.candidates = committed

    def after_reboot(self, committed: list[RegionLog]) -> None:
        self.in_flight = None
        self.unverified.clear()
        self.start(adopt=committed or None)


def tool_broken(p) -> bool:
    return p.returncode not in (0, 1) or "Traceback (most recent call last)" in p.stderr


def run_drivers(daemon: Daemon, drivers: list[Driver], kill_after: float) -> list[str]:
    """Run every driver until the daemon is killed ``kill_after`` seconds from now."""
    stop = threading.Event()
    errors: list[str] = []
    clients = [Client(daemon.socket_path, timeout=30) for _ in drivers]  # type: ignore[arg-type]

    def body(driver: Driver, client: Client) -> None:
        try:
            driver.run(client, stop)
        except DaemonGone:
            pass
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(f"{driver.uuid}: {type(exc).__name__}: {exc}")
            stop.set()

    threads = [threading.Thread(target=body, args=(d, c), daemon=True)
               for d, c in zip(drivers, clients, strict=True)]
    for t in threads:
        t.start()
    time.sleep(kill_after)
    daemon.kill9()
    stop.set()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a driver hangs"
    for c in clients:
        c.close()
    return errors


def test_kill9_at_random_points_over_a_mixed_workload(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    state = tmp_path / "state"
    boot = 1
    drivers = [Driver(uuid, regions, log_type, iflush, random.Random(rng.random()), 0x1000 * (i + 1))
               for i, (uuid, regions, log_type, iflush) in enumerate(SPECS)]
    for drv in drivers:
        drv.start(adopt=None)
    daemon = launch(tmp_path, state_dir=state, boot_id=f"boot-{boot}", name="d0", extra_args=BUSY_STORE)
    violations: list[str] = []
    segments_seen: set[str] = set()
    verify_runs = verify_failures = reboots = restarts = startup_kills = survivors_checked = 0
    t0 = time.monotonic()
    in_flight: Counter = Counter()
    for point in range(1, POINTS + 1):
        errors = run_drivers(daemon, drivers, rng.uniform(0.02, 0.3))
        assert not errors, errors
        segments_seen.update(p.name for p in state.glob("journal.*"))
        in_flight.update(drv.in_flight.rtype.name if drv.in_flight else "none" for drv in drivers)
        committed = {drv.uuid: drv.maybe_committed() for drv in drivers}
        verify = run_verify(state, f"boot-{boot}")
        if verify is not None and tool_broken(verify):
            time.sleep(2)  # the tool itself failed (not the store): once more, then it counts
            verify = run_verify(state, f"boot-{boot}")
        if verify is not None:
            verify_runs += 1
            if verify.returncode != 0:
                verify_failures += 1
                violations.append(f"point {point}: ulog-recover verify exit {verify.returncode}:\n"
                                  f"{verify.stdout[-1500:]}{verify.stderr[-500:]}")
        reboot = point % REBOOT_EVERY == 0
        if reboot:
            boot += 1
        if point % STARTUP_KILL_EVERY == 0:
            # a crash while the daemon starts up and restores the store
            startup_kills += 1
            early = launch(tmp_path, state_dir=state, boot_id=f"boot-{boot}", name=f"e{point}",
                           wait_ready=False)
            time.sleep(rng.uniform(0.0, 0.25))
            early.kill9()
        daemon = launch(tmp_path, state_dir=state, boot_id=f"boot-{boot}", name=f"d{point}",
                        extra_args=BUSY_STORE if point % 2 == 0 else ())
        client = Client(daemon.socket_path)  # type: ignore[arg-type]
        if reboot:
            reboots += 1
            for drv in drivers:
                drv.after_reboot(committed[drv.uuid])
        else:
            restarts += 1
            for drv in drivers:
                survivors_checked += drv.check_survivors(client)
                drv.after_restart(committed[drv.uuid])
        client.close()
        for drv in drivers:
            violations += [f"point {point}: {v}" for v in drv.violations]
            drv.violations.clear()
        if violations:
            break
    errors = run_drivers(daemon, drivers, 0.2)  # the first-resume checks of the last reboot
    assert not errors, errors
    conservative = []
    for drv in drivers:
        violations += [f"end: {v}" for v in drv.violations]
        conservative += drv.conservative
    elapsed = time.monotonic() - t0
    acked = Counter()
    actions = Counter()
    for drv in drivers:
        acked.update(drv.acked)
        actions.update(drv.actions)
    segments_left = {p.name for p in state.glob("journal.*")}
    figures("crash.kill9_mixed", crash_points=point, restarts_same_boot=restarts, host_reboots=reboots,
            journal_segments_made=len(segments_seen | segments_left),
            journal_segments_cut=len(segments_seen - segments_left),
            kills_during_startup=startup_kills, mirrors=len(drivers), instances_checked=survivors_checked,
            requests_acknowledged=sum(acked.values()), actions=dict(actions),
            in_flight_at_crash=dict(in_flight.most_common()),
            verify_runs=verify_runs, verify_failures=verify_failures, seconds=round(elapsed, 1),
            conservative_deviations=len(conservative), violations=len(violations))
    for line in conservative[:5]:
        print("conservative:", line)
    assert not violations, "\n".join(violations[:10])
    assert restarts >= POINTS // 2 and reboots >= POINTS // (REBOOT_EVERY + 1)
    assert segments_seen - segments_left, "the journal was never cut: no kill could land around a cut"


def test_many_host_reboots_keep_the_state(tmp_path: Path) -> None:
    """One mirror through 360 host reboots (engine + LMDB store in this process, as the daemon runs
    them at start-up): each boot's new instance takes over the state; nothing is resynced.
    (Found by this test: each boot's instance stayed in the store, and at boot 343 the environment
    hit MAX_DBS, was taken for damaged and the mirror resynced in full; fixed in 94e3b18.)"""
    engine_log = logging.getLogger("ulog_disk")
    level = engine_log.level
    engine_log.setLevel(logging.CRITICAL + 1)
    regions, uuid = 64, "LVM-reboots"
    try:
        for boot in range(1, 361):
            backend = LmdbBackend(tmp_path / "state")
            engine = Applier.over(backend, boot_id=f"boot-{boot}")
            engine.restore()

            def call(rtype: T, data: bytes = b"", luid: int = boot, engine: Applier = engine) -> wire.Reply:
                return engine.handle_now(wire.Request(luid=luid, uuid=uuid, version=3, seq=1,
                                                      request_type=rtype, data=data))

            assert call(T.CTR, ctr_text(regions).encode()).error == 0
            assert call(T.RESUME).error == 0, f"boot {boot}: RESUME failed"
            if boot == 1:
                for r in range(regions):
                    assert call(T.SET_REGION_SYNC, wire.build_set_region_sync(r, 1)).error == 0
            assert call(T.FLUSH).error == 0, f"boot {boot}: FLUSH failed"
            in_sync = engine.table[(uuid, boot)].log.sync_count
            assert in_sync == regions, f"boot {boot}: {in_sync}/{regions} in sync: the state was lost"
            backend.close()
    finally:
        engine_log.setLevel(level)
    figures("crash.many_host_reboots", reboots=360, violations=0)
