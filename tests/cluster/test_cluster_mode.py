"""Cluster mode's contract, on a real corosync: three nodes in network namespaces, one dm-ulogd
--cluster corosync per node, each node's kernel played by a client of its daemon's socket.

Each test names the contract item it shows (docs/cluster.md, "What is guaranteed"). After every
fault, :class:`Oracle` checks the three rules a cluster log must never break: no region clean on
any node while some node holds it marked; no region handed to two nodes at once; every region a
dead node held marked out of sync on every survivor until someone recovers it.
"""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import ROOT  # noqa: F401 - puts tools/cluster on sys.path
from nodes import (
    ClusterDaemons,
    flush_marks,
    in_sync,
    is_clean,
    open_log,
    remote_recovering,
    resync_work,
    set_region_sync,
    sync_count,
)
from rig import Rig

from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import RequestType as T
from ulog_disk.testing.client import Client

NAMES = ("n1", "n2", "n3")
_luids = itertools.count(0x1000)


def wait_for(check: Callable[[], bool], timeout: float = 30.0, what: str = "") -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def daemons(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterDaemons]:
    d = ClusterDaemons(rig, tmp_path_factory.mktemp("daemons"))
    d.start_all()
    try:
        yield d
    finally:
        d.stop_all()


@dataclass
class Log:
    """One clustered log as the test's kernels see it: each node's client and luid."""

    uuid: str
    regions: int
    clients: dict[str, Client]
    luids: dict[str, int] = field(default_factory=dict)
    log_type: str = "clustered-core"

    def open(self, name: str, sync: str | None = "nosync") -> None:
        self.luids[name] = next(_luids)
        open_log(self.clients[name], self.uuid, self.luids[name], self.regions, log_type=self.log_type,
                 sync=sync)

    def on(self, name: str) -> tuple[Client, str, int]:
        return self.clients[name], self.uuid, self.luids[name]


@pytest.fixture
def cluster(healthy: Rig, daemons: ClusterDaemons) -> ClusterDaemons:
    """Every daemon running, every node a member and current (a probe FLUSH seen everywhere)."""
    for name in NAMES:
        if not daemons.node(name).alive():
            daemons.start(name)
    probe = Log(f"probe-{next(_luids)}", 8, {n: daemons.client(n) for n in NAMES})
    for name in NAMES:
        probe.open(name)
    flush_marks(*probe.on("n1"), marks=[1])
    wait_for(
        lambda: all(not is_clean(*probe.on(n), 1) for n in NAMES), what="a probe mark seen by every node"
    )
    return daemons


def new_log(
    daemons: ClusterDaemons, regions: int = 64, sync: str | None = "nosync", names: tuple[str, ...] = NAMES,
    log_type: str = "clustered-core",
) -> Log:
    log = Log(f"log-{next(_luids)}", regions, {n: daemons.client(n) for n in names}, log_type=log_type)
    for name in names:
        log.open(name, sync)
    return log


class Oracle:
    """What the test's kernels were told, and the rules every node's answers must keep."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.marked: dict[str, set[int]] = {n: set() for n in log.clients}
        self.recovering: dict[int, str] = {}
        self.dead_marks: set[int] = set()

    def flush(self, name: str, marks: list[int] = (), clears: list[int] = ()) -> None:  # type: ignore[assignment]
        flush_marks(*self.log.on(name), marks=list(marks), clears=list(clears))
        self.marked[name] |= set(marks)
        self.marked[name] -= set(clears) - set(marks)

    def work(self, name: str) -> int | None:
        region = resync_work(*self.log.on(name))
        if region is not None:
            owner = self.recovering.get(region)
            assert owner in (None, name), f"region {region} handed to {name} while {owner} recovers it"
            self.recovering[region] = name
        return region

    def synced(self, name: str, region: int) -> None:
        set_region_sync(*self.log.on(name), region)
        self.recovering.pop(region, None)
        self.dead_marks.discard(region)

    def hand_out(self, names: list[str], regions: set[int], what: str, timeout: float = 30.0) -> None:
        """Waits until exactly ``regions`` are handed out: each of ``names`` asks for resync work
        in turn and says in sync what it gets."""
        handed: set[int] = set()

        def recover_some() -> bool:
            for n in names:
                region = self.work(n)
                if region is not None:
                    handed.add(region)
                    self.synced(n, region)
            return handed == regions

        wait_for(recover_some, timeout=timeout, what=what)

    def died(self, name: str) -> None:
        self.dead_marks |= self.marked.pop(name)
        for region, owner in list(self.recovering.items()):
            if owner == name:
                del self.recovering[region]
                self.dead_marks.add(region)

    def check(self, alive: list[str]) -> None:
        held = set().union(*self.marked.values()) | self.dead_marks
        for name in alive:
            client, uuid, luid = self.log.on(name)
            for region in sorted(held):
                assert not is_clean(client, uuid, luid, region), f"{name}: region {region} clean while held"
            for region in sorted(self.dead_marks):
                assert not in_sync(client, uuid, luid, region), (
                    f"{name}: region {region} of a dead node's marks reads in sync"
                )


def counts(log: Log, names: tuple[str, ...] | list[str] = NAMES) -> dict[str, int]:
    return {n: sync_count(*log.on(n)) for n in names}


# --- a, c, i: one log, local reads, one recoverer per region ------------------------------------


# Both clustered log types take one path; only what STATUS_INFO and STATUS_TABLE print differs.
LOG_TYPES = pytest.mark.parametrize("log_type", ["clustered-core", "clustered-disk"])


@LOG_TYPES
def test_one_log_across_nodes_one_recoverer_per_region(cluster: ClusterDaemons, log_type: str) -> None:
    log = new_log(cluster, 64, sync=None, log_type=log_type)  # a fresh log: every region to recover
    oracle = Oracle(log)
    assert counts(log) == {n: 0 for n in NAMES}
    handed = {n: oracle.work(n) for n in NAMES}
    assert len(set(handed.values())) == 3 and None not in handed.values(), handed
    # The kernel's resend after its 15 s timeout (a new seq) gets the same region again.
    assert {n: oracle.work(n) for n in NAMES} == handed
    oracle.synced("n2", handed["n2"])
    wait_for(
        lambda: all(in_sync(*log.on(n), handed["n2"]) for n in NAMES), what="SET_REGION_SYNC seen everywhere"
    )
    assert counts(log) == {n: 1 for n in NAMES}
    # A region being recovered by one node is remote for the others, not for it.
    r1 = handed["n1"]
    assert remote_recovering(*log.on("n2"), r1) and remote_recovering(*log.on("n3"), r1)
    assert not remote_recovering(*log.on("n1"), r1)
    # The local answers (the table the kernel printed, the region size) need nobody.
    client, uuid, luid = log.on("n3")
    assert client.ok(uuid, luid, T.GET_REGION_SIZE) == (8).to_bytes(8, "little")
    table = client.ok(uuid, luid, T.STATUS_TABLE).rstrip(b"\0").decode()
    assert table.startswith(f"{log_type} "), table
    info = client.ok(uuid, luid, T.STATUS_INFO).rstrip(b"\0").decode()
    assert info == ("3 clustered-disk 7:3 A" if log_type == "clustered-disk" else "1 clustered-core"), info
    oracle.check(list(NAMES))


# --- b, i: marks are per node ------------------------------------------------------------------------


@LOG_TYPES
def test_marks_are_per_node(cluster: ClusterDaemons, log_type: str) -> None:
    log = new_log(cluster, 64, log_type=log_type)
    oracle = Oracle(log)
    oracle.flush("n1", marks=[5])
    assert all(not is_clean(*log.on(n), 5) for n in NAMES)
    oracle.flush("n2", marks=[5, 9])
    oracle.flush("n1", clears=[5])
    oracle.check(list(NAMES))
    assert all(not is_clean(*log.on(n), 5) for n in NAMES), "n2 still holds region 5"
    oracle.flush("n2", clears=[5, 9])
    # A CLEAR is answered once applied on its own node; the others apply it at the same place of
    # the agreed order, a moment later.
    wait_for(
        lambda: all(is_clean(*log.on(n), r) for n in NAMES for r in (5, 9)), what="clean again everywhere"
    )
    # A resent FLUSH (a new seq for the same marks) changes nothing: one CLEAR undoes both.
    oracle.flush("n3", marks=[7])
    oracle.flush("n3", marks=[7])
    oracle.flush("n3", clears=[7])
    wait_for(lambda: all(is_clean(*log.on(n), 7) for n in NAMES), what="region 7 clean everywhere")
    assert counts(log) == {n: 64 for n in NAMES}


# --- d: a node dies holding marks -----------------------------------------------------------------------


class Hammer:
    """A survivor's kernel asking IN_SYNC as fast as it can: every answer, its longest wait."""

    def __init__(self, log: Log, name: str, client: Client) -> None:
        self.client = client
        self.log, self.name = log, name
        self.errors: list[BaseException] = []
        self.longest = 0.0
        self.answers = 0
        self.stopping = False
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        uuid, luid = self.log.uuid, self.log.luids[self.name]
        while not self.stopping:
            start = time.monotonic()
            try:
                in_sync(self.client, uuid, luid, 0)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)
                return
            self.longest = max(self.longest, time.monotonic() - start)
            self.answers += 1

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(70)
        self.client.close()


def test_a_node_that_dies_holding_marks(cluster: ClusterDaemons) -> None:
    log = new_log(cluster, 128)
    oracle = Oracle(log)
    oracle.flush("n3", marks=[10, 11, 12])
    oracle.flush("n1", marks=[50])
    set_region_sync(*log.on("n1"), 40, False)
    wait_for(lambda: not any(in_sync(*log.on(n), 40) for n in NAMES), what="region 40 out of sync everywhere")
    assert oracle.work("n3") == 40
    before = counts(log)
    assert before == {n: 127 for n in NAMES}
    hammers = [Hammer(log, n, Client(cluster.node(n).socket, timeout=60)) for n in ("n1", "n2")]
    for h in hammers:
        h.thread.start()
    cluster.crash("n3")
    oracle.died("n3")
    survivors = ["n1", "n2"]
    # Each survivor applies the DEPARTED when its cluster thread reads it, not at one instant.
    took = wait_for(lambda: not any(in_sync(*log.on(n), 10) for n in survivors), timeout=30,
                    what="n3's marks out of sync on n1 and n2")
    for h in hammers:
        h.stop()
    assert counts(log, survivors) == {n: 124 for n in survivors}  # 10, 11, 12 and 40
    for n in survivors:
        for region in (10, 11, 12, 40):
            assert remote_recovering(*log.on(n), region), f"{n}: region {region} not remote recovering"
    oracle.check(survivors)
    assert not [e for h in hammers for e in h.errors], [e for h in hammers for e in h.errors]
    assert all(h.answers > 0 for h in hammers)
    print(
        f"n3's death seen in {took:.2f} s; survivors' longest IN_SYNC wait "
        f"{max(h.longest for h in hammers):.3f} s; {sum(h.answers for h in hammers)} answers meanwhile"
    )
    # Without --fence-command the departed node counts as fenced: its regions, and the region it
    # was recovering, are handed out again, each to one survivor.
    oracle.hand_out(survivors, {10, 11, 12, 40},
                    what="n3's regions handed out again once it counts as fenced")
    wait_for(lambda: counts(log, survivors) == {n: 128 for n in survivors}, what="every region in sync again")
    assert not any(remote_recovering(*log.on(n), r) for n in survivors for r in (10, 11, 12, 40))
    oracle.check(survivors)


# --- f: quorum ------------------------------------------------------------------------------------------


def test_a_node_without_quorum_acknowledges_no_change(cluster: ClusterDaemons) -> None:
    log = new_log(cluster, 64)
    oracle = Oracle(log)
    rig = cluster.rig
    rig.partition("n3")
    rig.wait_quorate(["n3"], False, timeout=30)
    rig.wait_quorate(["n1", "n2"], True, members=2, timeout=30)
    answered = threading.Event()
    failure: list[BaseException] = []

    def minority_flush() -> None:
        try:
            flush_marks(Client(cluster.node("n3").socket, timeout=120), log.uuid, log.luids["n3"], marks=[30])
            answered.set()
        except BaseException as exc:  # noqa: BLE001
            failure.append(exc)

    at = cluster.log_size("n3")
    thread = threading.Thread(target=minority_flush, daemon=True)
    thread.start()
    cluster.wait_log("n3", "this node is not quorate: agreed requests wait", after=at)
    # The majority goes on while the minority waits.
    oracle.flush("n1", marks=[31])
    assert not is_clean(*log.on("n2"), 31)
    assert not answered.is_set(), "a node without quorum acknowledged a FLUSH"
    # Reads are still answered on the minority.
    assert in_sync(*log.on("n3"), 0)
    rig.heal("n3")
    rig.wait_quorate(list(NAMES), True, members=3, timeout=60)
    assert answered.wait(60), f"n3's FLUSH not answered after the heal: {failure}"
    oracle.marked["n3"].add(30)
    wait_for(
        lambda: all(not is_clean(*log.on(n), r) for n in NAMES for r in (30, 31)),
        what="both marks everywhere",
    )
    oracle.check(list(NAMES))
    assert counts(log) == {n: 64 for n in NAMES}


# --- g: joining -----------------------------------------------------------------------------------------


def test_a_restarted_node_takes_the_whole_state(cluster: ClusterDaemons) -> None:
    log = new_log(cluster, 256, sync=None)
    oracle = Oracle(log)
    cluster.stop("n3")
    for region in range(0, 200, 3):
        set_region_sync(*log.on("n1"), region)
    oracle.flush("n2", marks=[201, 202])
    region = oracle.work("n1")
    cluster.start("n3")
    log.clients["n3"] = cluster.client("n3")
    log.open("n3", sync=None)
    expected = counts(log, ["n1", "n2"])
    assert counts(log) == {n: expected["n1"] for n in NAMES}
    assert [in_sync(*log.on("n3"), r) for r in range(0, 256, 7)] == [
        in_sync(*log.on("n1"), r) for r in range(0, 256, 7)
    ]
    assert remote_recovering(*log.on("n3"), region)  # the recovery assignment came with it
    oracle.check(list(NAMES))


def test_a_large_log_joins(cluster: ClusterDaemons) -> None:
    regions = 32 * 1024 * 1024  # 4 MiB per bitmap
    log = new_log(cluster, regions, sync=None, names=("n1", "n2"))
    set_region_sync(*log.on("n1"), regions - 1)
    cluster.stop("n3")
    at = cluster.log_size("n3")
    cluster.start("n3")
    cluster.wait_log("n3", "cluster: ", timeout=60, after=at)
    log.clients["n3"] = cluster.client("n3", timeout=120)
    log.open("n3", sync=None)
    assert counts(log) == {n: 1 for n in NAMES}
    assert in_sync(*log.on("n3"), regions - 1)
    for name in NAMES:  # gone from the cluster state: the later tests' exchanges stay small
        log.clients[name].ok(log.uuid, log.luids[name], T.DTR)


# --- h: durability ---------------------------------------------------------------------------------------


def _crash_all_and_restart(cluster: ClusterDaemons, lose_state_of: str | None = None) -> None:
    for name in NAMES:
        cluster.kill(name)
    for name in NAMES:
        cluster.rig.kill_corosync(name)
    if lose_state_of:
        shutil.rmtree(cluster.node(lose_state_of).state_dir)
    for name in NAMES:
        cluster.reboot_id(name)
        cluster.rig.start_corosync(name, wait=False)
    cluster.rig.wait_quorate(list(NAMES), True, members=3, timeout=60)
    cluster.start_all()


@pytest.mark.parametrize("lose_state_of", [None, "n1"], ids=["whole-cluster-crash", "and-n1-state-lost"])
def test_a_whole_cluster_crash_loses_no_flushed_mark(
    cluster: ClusterDaemons, lose_state_of: str | None
) -> None:
    log = new_log(cluster, 64)
    oracle = Oracle(log)
    oracle.flush("n1", marks=[1, 2])
    oracle.flush("n2", marks=[3])
    oracle.flush("n1", clears=[2])
    _crash_all_and_restart(cluster, lose_state_of)
    for name in NAMES:
        log.clients[name] = cluster.client(name)
    # Every node booted again: the regions its kernel had marked are dirty, and out of sync at
    # once; the rest stays in sync.
    for name in NAMES:
        log.open(name)
    wait_for(lambda: all(sync_count(*log.on(n)) == 62 for n in NAMES), timeout=60,
             what="regions 1 and 3 out of sync")
    for name in NAMES:
        assert [r for r in range(64) if not in_sync(*log.on(name), r)] == [1, 3]


# --- e: fencing -------------------------------------------------------------------------------------------


def test_without_a_fence_command_the_daemon_says_once_it_is_unsafe(cluster: ClusterDaemons) -> None:
    for name in NAMES:
        text = cluster.node(name).log_text().rsplit("--- start", 1)[-1]
        assert text.count("no --fence-command") == 1, text[-2000:]


def test_a_departed_node_is_recovered_only_once_fenced(cluster: ClusterDaemons, tmp_path: Path) -> None:
    calls, code = tmp_path / "fenced", tmp_path / "exit-code"
    code.write_text("1")
    script = tmp_path / "fence"
    script.write_text(f'#!/bin/sh\necho "$1" >> {calls}\nexit "$(cat {code})"\n')
    script.chmod(0o755)
    cluster.stop_all()
    try:
        for name in NAMES:
            cluster.node(name).extra = ["--fence-command", str(script)]
        cluster.start_all()
        log = new_log(cluster, 64)
        oracle = Oracle(log)
        wait_for(lambda: True)
        oracle.flush("n3", marks=[20, 21])
        cluster.crash("n3")
        oracle.died("n3")
        survivors = ["n1", "n2"]
        wait_for(lambda: not any(in_sync(*log.on(n), 20) for n in survivors), what="n3's marks out of sync")
        # The fence command ran, with the node id, and failed: the regions stay held.
        wait_for(lambda: calls.exists() and calls.read_text().split() == ["3"], what="a first fence attempt")
        for n in survivors:
            assert oracle.work(n) is None, "a region of an unfenced node was handed out"
            assert remote_recovering(*log.on(n), 20) and remote_recovering(*log.on(n), 21)
        oracle.check(survivors)
        code.write_text("0")  # the next attempt succeeds
        oracle.hand_out(survivors, {20, 21}, timeout=60, what="n3's regions handed out once fenced")
        assert calls.read_text().split()[-1] == "3" and len(calls.read_text().split()) >= 2
        oracle.check(survivors)
    finally:
        cluster.stop_all()
        for name in NAMES:
            cluster.node(name).extra = []
        cluster.rig.start_corosync("n3") if not cluster.rig.corosync_alive("n3") else None
        cluster.rig.wait_quorate(list(NAMES), True, members=3, timeout=60)
        cluster.start_all()


# --- d, g: a daemon killed alone, a join under load -----------------------------------------------------


def test_a_killed_daemon_restarts_and_its_kernel_reconnects(cluster: ClusterDaemons) -> None:
    log = new_log(cluster, 64)
    oracle = Oracle(log)
    oracle.flush("n2", marks=[4])
    oracle.flush("n1", marks=[6])
    cluster.kill("n2")  # corosync goes on: the others see the process leave
    oracle.died("n2")
    wait_for(lambda: not any(in_sync(*log.on(n), 4) for n in ("n1", "n3")), what="n2's marks out of sync")
    oracle.check(["n1", "n3"])
    cluster.start("n2")
    log.clients["n2"] = cluster.client("n2")
    # The kernel's reconnect: CTR and RESUME of the same luid.
    client, uuid, luid = log.on("n2")
    from nodes import ctr_text  # noqa: PLC0415

    client.ok(uuid, luid, T.CTR, ctr_text(64, extra="nosync").encode() + b"\0")
    client.ok(uuid, luid, T.RESUME)
    assert counts(log) == {n: 63 for n in NAMES}
    assert not in_sync(client, uuid, luid, 4) and not is_clean(client, uuid, luid, 6)
    oracle.check(list(NAMES))


def test_a_node_joins_while_the_others_flush(cluster: ClusterDaemons) -> None:
    log = new_log(cluster, 4096, names=("n1", "n2"))
    cluster.stop("n3")
    stop = threading.Event()
    done: dict[str, int] = {"n1": 0, "n2": 0}
    errors: list[BaseException] = []

    def writer(name: str, base: int) -> None:
        client = Client(cluster.node(name).socket, timeout=60)
        region = base
        try:
            while not stop.is_set():
                flush_marks(
                    client,
                    log.uuid,
                    log.luids[name],
                    marks=[region],
                    clears=[region - 1] if region > base else [],
                )
                region += 1
                done[name] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            client.close()

    threads = [
        threading.Thread(target=writer, args=(n, b), daemon=True) for n, b in (("n1", 1), ("n2", 2001))
    ]
    for t in threads:
        t.start()
    wait_for(lambda: min(done.values()) > 20, what="both nodes flushing")
    before = dict(done)
    cluster.start("n3")
    log.clients["n3"] = cluster.client("n3")
    log.open("n3")
    wait_for(lambda: min(done[n] - before[n] for n in done) > 20, what="flushing went on after the join")
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    # The joiner's copy equals the others': every node's last mark not clean, the same counts.
    last = {n: (1 if n == "n1" else 2001) + done[n] - 1 for n in done}
    wait_for(
        lambda: all(not is_clean(*log.on(m), last[n]) for n in done for m in NAMES),
        what="last marks everywhere",
    )
    assert counts(log) == {n: 4096 for n in NAMES}
    for region in (1, 2001, last["n1"] - 1, last["n2"] - 1):
        assert len({is_clean(*log.on(m), region) for m in NAMES}) == 1, region


def test_a_flush_of_thousands_of_marks(cluster: ClusterDaemons) -> None:
    """MARK_REGION requests gathered until the FLUSH: more regions than one message carries."""
    log = new_log(cluster, 8192)
    client, uuid, luid = log.on("n2")
    regions = list(range(0, 7000, 2))
    for start in range(0, len(regions), 32):
        client.ok(uuid, luid, T.MARK_REGION, wire.build_regions(regions[start : start + 32]))
    client.ok(uuid, luid, T.FLUSH)
    for name in NAMES:
        assert not any(is_clean(*log.on(name), r) for r in regions[::97] + [regions[-1]])
        assert is_clean(*log.on(name), 1)
    flush_marks(client, uuid, luid, clears=regions)
    wait_for(lambda: all(is_clean(*log.on(n), regions[-1]) for n in NAMES), what="cleared everywhere")
