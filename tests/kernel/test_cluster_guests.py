"""The cluster mode on real kernels: two qemu guests sharing the legs of one mirror.

``tools/vm/cluster2.py run node-dies`` (through ``ulogvm.py run cluster:node-dies``, which is how
the real-kernel tests' guest pool runs every guest): two guests boot together, the legs are raw
images attached to both (``share-rw=on``, ``cache=none``, ``file.locking=off``), a network links
the two qemu processes only (``-netdev dgram`` over unix sockets), each guest runs corosync (2
nodes, ``two_node: 1``) and ``dm-ulogd --cluster corosync --backend lmdb`` on a state disk of its
own, and creates the same mirror (same uuid, same table: a ``userspace`` log of type
``clustered-core``, 64 regions). Both write with O_DIRECT (disjoint and shared regions, never a
shared block); the host SIGKILLs node 2's qemu while both write (a power cut and a perfect fence
at once). Node 1 must keep writing without a failed write, see node 2 depart, fence it (the fence
command waits for the host's kill), resync exactly the regions node 2 held marked, end in sync;
the host then compares the legs (the raw images) byte for byte.

What the real kernel adds to the contract tests of tests/cluster: dm-log-userspace caches the
in-sync hint the daemon returns with IS_REMOTE_RECOVERING and, once it saw the mirror in sync, asks
neither IS_REMOTE_RECOVERING nor GET_RESYNC_WORK again until its next resume. So the released
regions are resynced only after a suspend + resume of the survivor's mirror (the scenario does one
and records the sync count before it: the regions minus those released).

Also ``both-write`` (both nodes write, both in sync at the end, nothing resynced by the writes, legs
identical) and ``power-cut`` (the host kills both qemu processes while both write, both boot again
on the same disks: only regions marked at the cut resync, every region the cut left different among
them, legs identical); and ``power-cut`` with ``--backend memory``, the control (the cluster state
in memory only: every region resyncs).

Each takes 160-320 s of wall time and both cores of a 2-core machine (two guests, which the guest
pool counts as two): ``node-dies``, the shortest that shows a death and its resync, runs in the
default run; the others with the long real-kernel tests only (``ULOG_KERNEL_LONG=1``). Results
in ``results/pytest-cluster-<scenario>/``
(``summary.txt``: each number with its reason). ``ULOG_SKIP_KERNEL=1`` skips.
"""

from __future__ import annotations

import os
import re
import shutil

import guests
import pytest
from test_real_kernel import ScenarioRun, require_daemon, require_harness

pytestmark = pytest.mark.kernel

LONG = os.environ.get("ULOG_KERNEL_LONG") == "1"
REGIONS = 64
S = "n1.node-dies"  # the survivor's keys
NODE_DIES = guests.Guest("cluster-node-dies", "cluster:node-dies", estimate=230, timeout=720,
                         env=("BACKEND=lmdb",), backend=False, cores=2)
NODE_DIES_MEMORY = guests.Guest("cluster-node-dies-memory", "cluster:node-dies", estimate=230, timeout=720,
                                env=("BACKEND=memory",), backend=False, cores=2)
POWER_CUT = guests.Guest("cluster-power-cut", "cluster:power-cut", estimate=320, timeout=900,
                         env=("BACKEND=lmdb",), backend=False, cores=2)
#: The control: --backend memory keeps the cluster state in the members' memory only (as cmirrord):
#: nothing survives the whole cluster's power cut, so every region resyncs.
POWER_CUT_MEMORY = guests.Guest("cluster-power-cut-memory", "cluster:power-cut", estimate=320, timeout=900,
                                env=("BACKEND=memory",), backend=False, cores=2)
BOTH_WRITE = guests.Guest("cluster-both-write", "cluster:both-write", estimate=200, timeout=720,
                          env=("BACKEND=lmdb",), backend=False, cores=2)


def regions(text: str | None) -> set[int]:
    """A comma-separated list of regions ("none": empty)."""
    return set() if text in (None, "", "none") else {int(r) for r in text.split(",")}


def key(run: ScenarioRun, name: str) -> str:
    value = run.get(name)
    assert value is not None, f"{name} missing\n{run.explain()}"
    return value


def expect(run: ScenarioRun, wanted: dict[str, str], prefix: str = "") -> None:
    """Each key of ``wanted`` (under ``prefix``) has the value it maps to."""
    for name, want in wanted.items():
        got = run.get(f"{prefix}{name}")
        assert got == want, f"{prefix}{name}: got {got!r}, want {want!r}\n{run.explain()}"


def one_recoverer(run: ScenarioRun, first: set[int], second: set[int]) -> None:
    """The two kernels' first resync splits the regions between them: each region once."""
    assert not first & second, f"regions recovered by both nodes: {sorted(first & second)}\n{run.explain()}"
    assert first | second == set(range(REGIONS)), run.explain()


#: Both guests ended by themselves, the legs equal byte for byte (from the host).
BOTH_ENDED_LEGS_EQUAL = {"host.n1_end": "exit code 0", "host.n2_end": "exit code 0", "host.legs": "equal",
                         "host.legs_diff_regions": "0"}


#: Each node's keys in both-write: the mirror made, the first resync, every write, in sync and healthy
#: at the end with nothing resynced by the writes, removed cleanly.
BOTH_WRITE_EXPECT = {
    "create_rc": "0", "sync_initial": f"{REGIONS}/{REGIONS}", "writer_rc": "0", "writes_failed": "0",
    "sync_final": f"{REGIONS}/{REGIONS}", "health_final": "AA", "resynced_after_writes": "0",
    "remove_rc": "0", "stop_rc_1": "0", "rc": "0",
}


def cluster_run(guest: guests.Guest) -> ScenarioRun:
    """The guests' run of a scenario, which ended with exit status 0."""
    require_harness()
    require_daemon()
    if shutil.which("corosync") is None:
        pytest.fail("corosync is not installed on the host (the guests run the host's): bash tools/run.sh "
                    "setup installs it", pytrace=False)
    run = guests.result(guest)
    assert run.rc == 0, run.explain()
    return run


@pytest.mark.guest(BOTH_WRITE)
@pytest.mark.skipif(not LONG, reason="two guests for ~200 s: with ULOG_KERNEL_LONG=1")
def test_both_nodes_write_both_in_sync_legs_identical() -> None:
    run = cluster_run(BOTH_WRITE)
    expect(run, BOTH_ENDED_LEGS_EQUAL)
    first = {}
    for n in (1, 2):
        s = f"n{n}.both-write"
        expect(run, BOTH_WRITE_EXPECT, f"{s}.")
        assert int(key(run, f"{s}.writes_total")) > 0, run.explain()
        first[n] = regions(key(run, f"{s}.resynced_initial_regions"))
    one_recoverer(run, first[1], first[2])


@pytest.mark.guest(NODE_DIES)
def test_one_node_dies_the_survivor_resyncs_its_regions() -> None:
    check_node_dies(cluster_run(NODE_DIES))


@pytest.mark.guest(NODE_DIES_MEMORY)
@pytest.mark.skipif(not LONG, reason="two guests for ~230 s: with ULOG_KERNEL_LONG=1")
def test_one_node_dies_memory_control_resyncs_the_same() -> None:
    """The control, side by side with the lmdb run: --backend memory keeps the cluster state in the
    members' memory only (as cmirrord keeps its log): one node's death loses nothing of it (the
    survivor holds it), so it resyncs exactly what the dead node held, as lmdb does. What the
    durable store adds shows in the whole cluster's power cut (the memory control of power-cut)."""
    check_node_dies(cluster_run(NODE_DIES_MEMORY))


def check_node_dies(run: ScenarioRun) -> None:
    wanted = {
        "host.n2_end": "killed by the host as intended",
        "host.n1_end": "exit code 0",
        "host.killed_node": "2",
        # the legs, byte for byte, from the host
        "host.legs": "equal",
        "host.legs_diff_regions": "0",
        # both nodes made the mirror and shared its first resync
        f"{S}.create_rc": "0",
        "n2.node-dies.create_rc": "0",
        f"{S}.sync_initial": f"{REGIONS}/{REGIONS}",
        "n2.node-dies.sync_initial": f"{REGIONS}/{REGIONS}",
        # the survivor: no write failed, in sync at the end, healthy, removed cleanly
        f"{S}.writes_failed": "0",
        f"{S}.writer_rc": "0",
        f"{S}.suspend_rc": "0",
        f"{S}.resume_rc": "0",
        f"{S}.sync_final": f"{REGIONS}/{REGIONS}",
        f"{S}.health_final": "AA",
        f"{S}.remove_rc": "0",
        f"{S}.stop_rc_1": "0",
        f"{S}.rc": "0",
    }
    expect(run, wanted)
    one_recoverer(run, regions(key(run, f"{S}.resynced_initial_regions")),
                  regions(key(run, "n2.node-dies.resynced_initial_regions")))
    # Both wrote before the death, the survivor after it too.
    at_kill = dict(item.split(":") for item in key(run, "host.writes_at_kill").split(","))
    assert int(at_kill["n1"]) > 0 and int(at_kill["n2"]) > 0, run.explain()
    assert int(key(run, f"{S}.writes_total")) > int(key(run, f"{S}.writes_at_notice")), run.explain()
    # What the survivor's log held of the dead node (its marks, out of sync at the departure and
    # released by the fence) is what it resynced, no more, no less; node 2 died with writes in
    # flight to a slow leg, so there was something to resync.
    resynced = regions(key(run, f"{S}.resynced_after_death_regions"))
    if key(run, f"{S}.held_regions") == "n/a":
        # --backend memory: no cluster state on disk for ulog-recover to read; the daemon's log
        # says how many regions the departure held.
        held = resynced
        assert len(held) == int(key(run, f"{S}.departed_regions_logged")), run.explain()
    else:
        held = regions(key(run, f"{S}.held_regions"))
        assert len(held) == int(key(run, f"{S}.held_count")) == int(key(run, f"{S}.departed_regions_logged"))
        assert resynced == held, f"resynced {sorted(resynced)}, held {sorted(held)}\n{run.explain()}"
    assert held, f"node 2 held no region marked at its death\n{run.explain()}"
    # The kernel asked for none of them before the resume (its in-sync hint), and all after it.
    assert key(run, f"{S}.sync_before_resume") == f"{REGIONS - len(held)}/{REGIONS}", run.explain()
    assert int(key(run, f"{S}.resynced_after_resume")) == len(held), run.explain()
    assert re.fullmatch(rf"0 \d+ mirror 2 \d+:\d+ \d+:\d+ {REGIONS}/{REGIONS} 1 AA 1 clustered-core",
                        key(run, f"{S}.status_final")), run.explain()


@pytest.mark.guest(POWER_CUT)
@pytest.mark.skipif(not LONG, reason="two guests booted twice, ~320 s: with ULOG_KERNEL_LONG=1")
def test_both_nodes_lose_power_only_the_marked_regions_resync() -> None:
    run = cluster_run(POWER_CUT)
    expect(run, BOTH_ENDED_LEGS_EQUAL)
    assert run.get("host.boots") is None, run.explain()
    resynced: set[int] = set()
    marked: set[int] = set()
    for n in (1, 2):
        s = f"n{n}.power-cut"
        expect(run, {"sync_initial": f"{REGIONS}/{REGIONS}", "sync_final": f"{REGIONS}/{REGIONS}",
                     "health_final": "AA", "remove_rc": "0", "stop_rc_1": "0", "rc": "0"}, f"{s}.")
        assert key(run, f"{s}.boot1_boot_id") != key(run, f"{s}.boot2_boot_id"), run.explain()
        mine = regions(key(run, f"{s}.resynced_boot2_regions"))
        assert not mine & resynced, f"resynced by both: {sorted(mine & resynced)}\n{run.explain()}"
        resynced |= mine
        marked |= regions(key(run, f"{s}.marked_at_cut"))
    # Only the regions marked at the cut resync (not all of them: the store kept the rest in sync),
    # and every region the cut left different is among them.
    different = regions(key(run, "n1.power-cut.legs_diff_at_cut"))
    assert resynced <= marked, f"resynced {sorted(resynced - marked)} not marked\n{run.explain()}"
    assert different <= resynced, f"different {sorted(different - resynced)} not resynced\n{run.explain()}"
    assert len(resynced) < REGIONS, run.explain()


@pytest.mark.guest(POWER_CUT_MEMORY)
@pytest.mark.skipif(not LONG, reason="two guests booted twice, ~320 s: with ULOG_KERNEL_LONG=1")
def test_both_nodes_lose_power_memory_control_resyncs_everything() -> None:
    run = cluster_run(POWER_CUT_MEMORY)
    assert run.get("host.legs") == "equal", run.explain()
    resynced: set[int] = set()
    for n in (1, 2):
        s = f"n{n}.power-cut"
        assert run.get(f"{s}.sync_final") == f"{REGIONS}/{REGIONS}", run.explain()
        # Nothing on the state disks: the volatile store kept the cluster state in memory only.
        assert run.get(f"{s}.marked_at_cut_count") == "0", run.explain()
        mine = regions(key(run, f"{s}.resynced_boot2_regions"))
        assert not mine & resynced, run.explain()
        resynced |= mine
    assert resynced == set(range(REGIONS)), f"resynced {len(resynced)} of {REGIONS}\n{run.explain()}"
