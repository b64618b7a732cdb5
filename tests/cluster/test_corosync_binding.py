"""ulog_disk.cluster.corosync on a real corosync: three nodes in network namespaces (tools/cluster/rig.py),
one worker process per node using the binding the way the daemon will (tools/cluster/cpg_worker.py).

What cluster mode will stand on: one agreed order on every member under concurrent senders,
membership changes for a dead process, a dead corosync and a partition, quorum lost by the
isolated side only and back after the heal, the atomic size enforced, a payload far above it
carried in pieces. The figures (round trip, time to see a dead member) are printed (``-s``) and
quoted in docs/cluster.md.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import start_worker, wait_members
from cpg_worker import WorkerClient
from rig import Rig

from ulog_disk.cluster import corosync

pytestmark = pytest.mark.cluster

FIGURES: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    for key, value in FIGURES.items():
        print(f"\nFIGURE {key}: {value}", end="")
    print()


def left_event(w: WorkerClient, nodeid: int, pid: int | None, reason: str, since: int,
               timeout: float) -> dict:
    def match(e: dict) -> bool:
        return e["ev"] == "confchg" and any(
            a[0] == nodeid and (pid is None or a[1] == pid) and a[2] == reason for a in e["left"])
    return w.wait_event(match, timeout, since, what=f"{nodeid}:{pid} left ({reason})")


def quorum_event(w: WorkerClient, quorate: bool, since: int, timeout: float) -> dict:
    return w.wait_event(lambda e: e["ev"] == "quorum" and e["quorate"] is quorate, timeout, since,
                        what=f"quorate={quorate}")


def logs_agree(ws: dict[str, WorkerClient], count: int, timeout: float = 30.0) -> list[dict]:
    """Wait until every worker has delivered ``count`` entries; their logs."""
    deadline = time.monotonic() + timeout
    while True:
        logs = [w.call("log") for w in ws.values()]
        if all(log["count"] >= count for log in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(0.05)


def test_without_corosync_one_clear_line() -> None:
    """Outside the rig's namespaces no corosync runs (the root namespace has none): connecting
    fails with one line naming the cause, as the daemon will print it."""
    if os.path.exists("/run/corosync.pid"):
        pytest.skip("a corosync runs on this host")
    for make in (lambda: corosync.CpgGroup("x"), corosync.Quorum):
        with pytest.raises(corosync.CorosyncUnavailable) as info:
            make()
        text = str(info.value)
        assert "\n" not in text and "is corosync running" in text and "CS_ERR_LIBRARY" in text


def test_join_atomic_size_and_too_big(workers: dict[str, WorkerClient]) -> None:
    infos = [w.info for w in workers.values()]  # type: ignore[attr-defined]
    assert sorted(i["nodeid"] for i in infos) == [1, 2, 3]
    assert all(i["quorate"] and i["provider"] for i in infos)
    sizes = {i["max_atomic"] for i in infos}
    assert len(sizes) == 1 and sizes.pop() >= 64 * 1024
    FIGURES["atomic size"] = f"{infos[0]['max_atomic']} bytes"
    reply = workers["n1"].call("too_big")
    assert [r["refused"] for r in reply["results"]] == [True, True]
    for r in reply["results"]:
        assert r["error"] == "MessageTooLarge" and r["name"] == "CS_ERR_TOO_BIG"
        assert f"{reply['max_atomic'] + 1} bytes" in r["message"]


def test_agreed_order_under_concurrent_senders(workers: dict[str, WorkerClient]) -> None:
    per_sender = 2000
    t0 = time.monotonic()
    rids = {name: w.submit("blast", count=per_sender, size=200) for name, w in workers.items()}
    for name, w in workers.items():
        w.result(rids[name], timeout=60)
    total = per_sender * len(workers)
    logs = logs_agree(workers, total)
    seconds = time.monotonic() - t0
    for log in logs:
        assert log["count"] == total, log
        assert log["order_errors"] == []
        assert sorted(log["senders"].values()) == [per_sender] * len(workers)
    assert len({log["digest"] for log in logs}) == 1, "the members delivered different orders"
    FIGURES["agreed order"] = (f"3 senders x {per_sender} messages of 200 B, identical order on "
                               f"3 members, {total / seconds:.0f} deliveries/s per member")


def test_round_trip(workers: dict[str, WorkerClient]) -> None:
    one = workers["n1"].call("ping", count=400, size=256, timeout=60)
    FIGURES["round trip, one sender"] = (f"p50 {one['p50_ms']:.2f} ms, p99 {one['p99_ms']:.2f} ms, "
                                         f"max {one['max_ms']:.1f} ms (400 x 256 B)")
    rids = {name: w.submit("ping", count=200, size=256) for name, w in workers.items()}
    three = [w.result(rids[name], timeout=60) for name, w in workers.items()]
    FIGURES["round trip, three senders"] = ", ".join(
        f"p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f}" for r in three) + " ms"
    # A bound far above the figures, against a binding that waits for a poll timeout or a retry.
    assert one["p50_ms"] < 50


def test_large_payload_in_pieces(workers: dict[str, WorkerClient]) -> None:
    """8 MiB (the bitmaps of a 32 M-region log) split below the atomic size, sent while the two
    other members send small messages: every member reassembles it whole, at the same place of
    the agreed order."""
    size = 8 << 20
    marks = {name: w.mark() for name, w in workers.items()}
    rid = workers["n1"].submit("big", size=size, seed=7)
    others = {name: w.submit("blast", count=300, size=100) for name, w in workers.items()
              if name != "n1"}
    sent = workers["n1"].wait_event(lambda e: e["ev"] == "big_sent", 30, marks["n1"])
    took = workers["n1"].result(rid, timeout=60)["seconds"]
    for name, r in others.items():
        workers[name].result(r, timeout=60)
    got = {name: w.wait_event(lambda e: e["ev"] == "big", 60, marks[name], what="the payload")
           for name, w in workers.items()}
    for event in got.values():
        assert event["size"] == size and event["sha256"] == sent["sha256"]
    logs = logs_agree(workers, 600 + 1)
    assert len({log["digest"] for log in logs}) == 1
    assert len({e["position"] for e in got.values()}) == 1
    FIGURES["8 MiB in pieces"] = (f"{sent['pieces']} pieces, {took:.2f} s from the first send to "
                                  "its own delivery of the last, with 2 other senders")


def test_killed_member_process_is_seen_to_leave(healthy: Rig,
                                                workers: dict[str, WorkerClient]) -> None:
    victim = workers["n3"]
    marks = {name: w.mark() for name, w in workers.items()}
    t0 = time.monotonic()
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    pid = victim.info["pid"]  # type: ignore[attr-defined]
    seen = [left_event(workers[n], 3, pid, "PROCDOWN", marks[n], 10)["t"] - t0
            for n in ("n1", "n2")]
    FIGURES["kill -9 of a member process"] = f"PROCDOWN seen after {max(seen) * 1e3:.0f} ms"
    # The node's corosync lives on: a new process there joins again.
    w = start_worker(healthy, "n3", f"t-{test_killed_member_process_is_seen_to_leave.__name__}")
    try:
        for n in ("n1", "n2"):
            workers[n].wait_event(lambda e: e["ev"] == "confchg" and any(
                a[0] == 3 and a[2] == "JOIN" for a in e["joined"]), 10, marks[n], what="rejoin")
    finally:
        w.close()


def test_killed_corosync_is_seen_as_nodedown(healthy: Rig,
                                             workers: dict[str, WorkerClient]) -> None:
    marks = {name: w.mark() for name, w in workers.items()}
    pid = healthy.node("n3").pid
    t0 = time.monotonic()
    healthy.kill_corosync("n3")
    # What the dead corosync left in /dev/shm (its IPC rings, its flight recorder) is gone.
    assert not [f for f in Path("/dev/shm").iterdir()
                if f.name.startswith((f"qb-{pid}-", f"qb-corosync-{pid}-"))]
    lost = workers["n3"].wait_event(lambda e: e["ev"] == "lost", 10, marks["n3"], what="lost")
    assert "CS_ERR_LIBRARY" in lost["error"]
    seen = [left_event(workers[n], 3, None, "NODEDOWN", marks[n], 20)["t"] - t0
            for n in ("n1", "n2")]
    totem = healthy.totem_timeouts("n1")
    FIGURES["kill -9 of a corosync"] = (f"NODEDOWN seen after {min(seen):.2f}-{max(seen):.2f} s "
                                        f"(runtime token {totem['token']} ms + consensus "
                                        f"{totem['consensus']} ms); its own member lost the "
                                        f"connection after {(lost['t'] - t0) * 1e3:.0f} ms")
    # The bound cluster mode's survivors are held to: the membership change, plus a second.
    assert max(seen) < (totem["token"] + totem["consensus"]) / 1000 + 1.0
    for n in ("n1", "n2"):
        assert workers[n].call("quorum")["quorate"] is True
    # The node comes back: a fresh corosync, a fresh member, seen by the others.
    healthy.start_corosync("n3")
    healthy.wait_quorate(["n1", "n2", "n3"], True, members=3, timeout=30)
    w = start_worker(healthy, "n3", f"t-{test_killed_corosync_is_seen_as_nodedown.__name__}",
                     members=3)
    w.close()


def test_partition_and_heal(healthy: Rig, workers: dict[str, WorkerClient]) -> None:
    marks = {name: w.mark() for name, w in workers.items()}
    pid3 = workers["n3"].info["pid"]  # type: ignore[attr-defined]
    t0 = time.monotonic()
    healthy.partition("n3")
    # The isolated node loses quorum; the two others keep it and see n3's member go.
    alone = quorum_event(workers["n3"], False, marks["n3"], 20)
    for n in ("n1", "n2"):
        left_event(workers[n], 3, pid3, "NODEDOWN", marks[n], 20)
        assert workers[n].call("quorum")["quorate"] is True
    assert workers["n3"].call("quorum")["quorate"] is False
    FIGURES["partition"] = f"the isolated node not quorate after {alone['t'] - t0:.2f} s"
    # Without quorum the isolated member's CPG still delivers (its own messages, here): quorum,
    # not CPG, is what must hold state changes back there.
    workers["n3"].call("ping", count=5, timeout=20)
    marks = {name: w.mark() for name, w in workers.items()}
    t1 = time.monotonic()
    healthy.heal("n3")
    back = quorum_event(workers["n3"], True, marks["n3"], 30)
    for name, w in workers.items():
        wait_members(w, 3, 30, marks[name])
        assert w.call("quorum")["quorate"] is True
    FIGURES["heal"] = f"quorate again after {back['t'] - t1:.2f} s, membership of 3 back"
    # And the group works as one again.
    logs_before = [w.call("log")["count"] for w in workers.values()]
    rids = {name: w.submit("blast", count=100, size=64) for name, w in workers.items()}
    for name, w in workers.items():
        w.result(rids[name], timeout=30)
    logs = logs_agree(workers, max(logs_before) + 300)
    assert all(log["order_errors"] == [] for log in logs)
    assert len({log["count"] for log in logs}) == 1
    assert len({log["digest"] for log in logs}) == 1, "the healed group delivered different orders"
