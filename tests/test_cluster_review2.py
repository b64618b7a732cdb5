"""Cluster mode, a second review of the session's changes (left-behind, message version 2,
IS_REMOTE_RECOVERING's policy, the exchange's fixes): the interleavings that show a defect
(xfail, strict, until fixed) and the ones checked and found right (pinned)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from test_cluster_review import UUID, Rig, _remote, _until, _work, opened

from ulog_disk.daemon import cluster as cluster_mod
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import RequestType as T
from ulog_disk.testing.client import ctr_text
from ulog_disk.testing.fakecorosync import step


def test_a_write_waiting_at_presuspend_is_let_through(base: Path) -> None:
    """cmirrord answers IS_REMOTE_RECOVERING 0 once recovery is halted (PRESUSPEND): the kernel
    asks no GET_RESYNC_WORK between PRESUSPEND and RESUME, and a write requeued for a region
    nobody recovers keeps the suspend (dm_wait_for_completion, the fs freeze) waiting for it."""
    with opened(base, nosync=False) as rig:   # a new mirror: every region out of sync
        # Only node 1 has the mirror active (exclusive activation): nobody else recovers.
        for n in (2, 3):
            assert rig.answer(n, rig.send(n, T.DTR)) is not None
        rig.settle()
        assert _remote(rig, 1, 5)[0] == 1     # before the suspend: held, node 1 recovers it itself
        assert rig.answer(1, rig.send(1, T.PRESUSPEND)) is not None
        # The kernel's recovery is stopped now; the write to region 5, requeued every 200 ms, asks again.
        assert _remote(rig, 1, 5)[0] == 0, "a write held after PRESUSPEND that nobody will ever recover"


def test_a_node_that_crashed_before_the_others_stopped_does_not_make_a_stale_copy_win(base: Path) -> None:
    """Node 3's host dies (no left-behind file can be written), nodes 1 and 2 go on; node 2 is
    stopped (left behind); node 1 serves alone and acknowledges a FLUSH; then node 1 loses power.
    Nodes 2 and 3 come back: node 3 is not marked, so the "every member left behind" rule does
    not hold, and they form from node 2's copy, which lacks node 1's mark."""
    with opened(base) as rig:
        rig.crash(3)
        rig.settle()
        assert rig.answer(2, rig.send(2, T.DTR)) is not None
        rig.settle()
        rig.nodes.pop(2).close()             # a clean stop: node 1 goes on
        rig.settle()
        assert rig.nodes_dir(2).joinpath("cluster", "left-behind").exists()
        assert rig.nodes[1].quorate          # corosync 2 still runs: 2 votes of 3
        flush = rig.mark(1, [7])
        rig.settle()
        assert rig.answer(1, flush) is not None and rig.read(1, T.IS_CLEAN, 7) == 0
        rig.crash(1)                         # the power goes
        rig.bus.crash(2)
        formed = _back_after_a_power_cut(rig, first=(2, 3), last=1)
        # Node 1's kernel was writing region 7 when the power went: it must be resynced.
        assert [rig.read(n, T.IN_SYNC, 7) for n in (1, 2, 3)] == [0, 0, 0], \
            f"node 1's acknowledged mark lost (nodes 2 and 3 formed without it: {formed})"


def _back_after_a_power_cut(rig: Rig, first: tuple[int, int], last: int) -> dict[int, bool]:
    """Every corosync back; the daemons ``first`` start and open the log, then ``last``. Whether
    each of ``first`` was current (had formed) before ``last`` came."""
    for n in (1, 2, 3):
        rig.bus.start(n)
    for n in first:
        rig.start(n)
        rig.open(n)
    rig.settle()
    formed = {n: rig.nodes[n].current for n in first}
    rig.start(last)
    rig.open(last)
    rig.settle()
    return formed


def test_a_stop_while_a_joiner_takes_the_state_marks_the_stopping_node(base: Path) -> None:
    """``current_nodes`` counts a member that takes the state only once its DURABLE is delivered:
    the donor stopping in between sees nobody going on and writes no left-behind file, though
    the joiner has the whole state and goes on alone."""
    with opened(base) as rig:
        assert rig.answer(3, rig.send(3, T.DTR)) is not None
        rig.settle()
        rig.nodes.pop(3).close()             # node 3 stops cleanly: left behind
        rig.settle()
        rig.crash(2)                         # node 2's host dies; node 1 goes on (votes of 1 and 3)
        rig.settle()
        rig.bus.start(2)
        rig.start(2)
        resume = rig.open(2)
        for node in rig.live():              # the join: HELLOs
            step(node)
        rig.bus.order_all()
        for node in rig.live():              # decided: node 1 sends its state to node 2
            step(node)
        rig.bus.order_all()
        step(rig.nodes[2])                   # node 2 has taken it (not synced yet: no DURABLE)
        assert rig.nodes[2].current and not rig.nodes[2].receiving
        rig.nodes.pop(1).close()             # node 1 stops now: node 2 goes on
        marked = rig.nodes_dir(1).joinpath("cluster", "left-behind").exists()
        rig.settle()
        assert rig.answer(2, resume) is not None
        flush = rig.mark(2, [7])
        rig.settle()
        assert rig.answer(2, flush) is not None
        rig.crash(2)                         # the power goes
        for n in (1, 3):
            rig.bus.crash(n)
        _back_after_a_power_cut(rig, first=(1, 3), last=2)
        assert [rig.read(n, T.IN_SYNC, 7) for n in (1, 2, 3)] == [0, 0, 0], \
            f"node 2's acknowledged mark lost (node 1 marked left behind at its stop: {marked})"


class _Fence:
    """A fence command that waits for a ``go`` file, then exits with the status file's number."""

    def __init__(self, base: Path) -> None:
        self.status, self.go = base / "fence-status", base / "fence-go"
        self.status.write_text("1")
        script = f"while [ ! -e {self.go} ]; do sleep 0.05; done; exit $(cat {self.status})"
        self.command = f"sh -c {shlex.quote(script)} fence"


def _coordinator_fencing_across_a_split(base: Path) -> tuple[Rig, _Fence]:
    """Five daemons; node 5 dies holding region 3 marked; node 1 (the coordinator) runs the fence
    command, which waits; node 1 is cut off, the majority (node 2 coordinating) fences node 5 too
    and goes on; the split heals and node 1 takes the majority's state (another history) while
    its command still runs."""
    fence = _Fence(base)
    rig = Rig(base, corosyncs=5, daemons=(1, 2, 3, 4, 5), fence=fence.command)
    resumes = {n: rig.open(n) for n in rig.nodes}
    rig.settle()
    assert all(rig.answer(n, seq) is not None for n, seq in resumes.items())
    flush = rig.mark(5, [3])
    rig.settle()
    assert rig.answer(5, flush) is not None
    rig.crash(5)
    rig.settle()
    assert 5 in rig.nodes[1].fencing
    rig.bus.partition([{1}])
    rig.settle()
    assert 5 in rig.nodes[2].fencing
    more = rig.mark(2, [9])
    rig.settle()
    assert rig.answer(2, more) is not None
    rig.bus.heal()
    rig.settle()
    assert rig.nodes[1].history == 1 and rig.nodes[1].current
    assert rig.nodes[1]._coordinator()
    return rig, fence


def test_a_fence_command_discarded_after_taking_a_state_is_run_again(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A coordinator's fence command that ends after it took another state is discarded
    (fence_history) with no retry scheduled, and nothing calls _coordinate again until the next
    membership change: the departed node stays unfenced, its regions held (IS_CLEAN 0,
    IS_REMOTE_RECOVERING 1 to every node, handed to nobody)."""
    monkeypatch.setattr(cluster_mod, "FENCE_RETRY", 0.0)
    rig, fence = _coordinator_fencing_across_a_split(base)
    with rig:
        first = rig.nodes[1].fencing[5]      # node 1's, started in the history it gave up
        fence.go.write_text("")              # both commands (node 1's and node 2's) fail
        _until(rig, lambda: first.poll() is not None and 5 not in rig.nodes[2].fencing, "the fences end")
        fence.status.write_text("0")         # a fence would succeed now
        try:
            _until(rig, lambda: not rig.nodes[1].state.unfenced, "node 5 fenced", limit=3.0)
        except AssertionError:
            held = rig.nodes[1].state.logs[UUID].held_regions()
            pytest.fail(f"node 5 never fenced again: held regions {held}")


def _reload(rig: Rig, n: int, regions: int, luid: int) -> None:
    """Node ``n``'s table reloaded with ``regions`` regions (lvextend, lvreduce): the new table's
    CTR with ``luid``, the old one suspended, the new one resumed, answered."""
    table = ctr_text(regions, log_type="clustered-core").encode()
    assert rig.answer(n, rig.send(n, T.CTR, table, luid=luid)).error == 0  # type: ignore[union-attr]
    for kind in (T.PRESUSPEND, T.POSTSUSPEND):
        rig.send(n, kind)
    resume = rig.send(n, T.RESUME, luid=luid)
    rig.settle()
    assert rig.answer(n, resume) is not None


def test_a_region_past_a_shrunk_log_does_not_tell_the_kernel_all_is_in_sync(base: Path) -> None:
    """Node 2 reloads a smaller table (lvreduce: the shared log shrinks to 8 regions) while node
    1's table still has 16. Node 1's kernel asks about region 12: the answer's hint, 16, is node
    1's region count, which its kernel reads as "all in sync" until its next resume: it asks
    IS_REMOTE_RECOVERING about no region below (regions 0..7 are out of sync: its writes go
    NOSYNC to the default leg, racing node 2's recovery, the race the policy closes) and sends
    no GET_RESYNC_WORK."""
    with opened(base, nosync=False) as rig:
        _reload(rig, 2, 8, 0x9202)
        assert rig.nodes[1].state.logs[UUID].region_count == 8
        assert _remote(rig, 1, 3) == (1, 0)
        recovering, hint = _remote(rig, 1, 12)
        assert hint <= 0, f"hint {hint}: node 1's kernel now takes regions 0..{hint - 1} as in sync"


def _left_behind(rig: Rig, n: int) -> bool:
    return rig.nodes_dir(n).joinpath("cluster", "left-behind").exists()


@pytest.mark.xfail(strict=True, reason="liveness: two daemons stopped at the same time both write "
                   "left-behind "
                   "(each decides before the other's leave is read); if either is then lost, the formation "
                   "waits for it forever though the other holds the same newest state")
def test_of_two_daemons_stopped_at_once_one_is_not_left_behind(base: Path) -> None:
    """Nodes 1 and 2 stop at the same instant (a cluster-wide stop), node 3 earlier. Corosync
    orders the two leaves: whichever leaves last saw nobody go on after it, and could tell by
    deciding after its own leave is delivered instead of from the members it last read."""
    with opened(base) as rig:
        assert rig.answer(3, rig.send(3, T.DTR)) is not None
        rig.settle()
        rig.nodes.pop(3).close()
        rig.settle()
        assert _left_behind(rig, 3)
        for n in (1, 2):
            assert rig.answer(n, rig.send(n, T.DTR)) is not None
        rig.settle()
        first, second = rig.nodes.pop(1), rig.nodes.pop(2)
        first.close()
        second.close()                       # it has not read node 1's leave yet
        assert not (_left_behind(rig, 1) and _left_behind(rig, 2)), \
            "both marked: with node 2 lost, nodes 1 and 3 never form, though node 1's copy is the newest"


# --- checked and found right (pinned) --------------------------------------------------------------


def test_version_1_messages_are_refused_live_and_replayed_from_a_journal() -> None:
    from ulog_disk.cluster import messages as msg

    flush2 = msg.encode(msg.Kind.FLUSH, token=7, uuid="u", marks=[5], clears=[])
    durable2 = msg.encode(msg.Kind.DURABLE, epoch=9)
    flush1, durable1 = b"UC\x01" + flush2[3:], b"UC\x01" + durable2[3:]
    for old in (flush1, durable1):          # the fast paths check the version
        with pytest.raises(msg.MessageError, match="version 2"):
            msg.decode(old)
    assert msg.decode_stored(flush1) == msg.decode(flush2)
    work2 = msg.encode(msg.Kind.RESYNC_WORK, token=3, uuid="u", prefer=[], limit=64)
    work1 = b"UC\x01" + work2[3:-10]         # version 1: no prefer list, no limit
    stored = msg.decode_stored(work1)
    assert stored.kind is msg.Kind.RESYNC_WORK
    assert list(stored.fields.prefer) == [] and stored.fields.token == 3
    assert stored.fields.limit == 2**64 - 1   # no limit: the log's own size
    hello1 = b"UC\x01" + msg.encode(msg.Kind.HELLO, round=1, epoch=2, digest=3, current=True, boot_id="b",
                                    left_behind=False, known=[])[3:-3]
    with pytest.raises(msg.MessageError):    # not a state kind: never journaled, never replayed
        msg.decode_stored(hello1)


def test_the_hello_and_resync_work_bytes_are_as_formats_cluster_md_says() -> None:
    import struct

    from ulog_disk.cluster import messages as msg

    boot = "boot-1"
    m = len(boot)                            # formats/cluster.md: m is a boot id's length
    data = msg.encode(msg.Kind.HELLO, round=0x11223344, epoch=5, digest=6, current=False, boot_id=boot,
                      left_behind=True, known=[1, 3, 7])
    assert len(data) == 25 + m + 4 * 3
    assert data[21] == m and data[22:22 + m] == boot.encode()
    assert data[22 + m] == 1                                      # left_behind
    assert struct.unpack_from("<H3I", data, 23 + m) == (3, 1, 3, 7)
    work = msg.encode(msg.Kind.RESYNC_WORK, token=1, uuid="abc", prefer=[4, 9], limit=96)
    assert len(work) == 23 + 3 + 8 * 2
    assert struct.unpack_from("<H2QQ", work, 13 + 3) == (2, 4, 9, 96)


def test_prefer_is_the_message_s_and_skips_what_may_not_be_handed_out(base: Path) -> None:
    """RESYNC_WORK's preferred regions are decided from the message alone: a preferred region
    marked by another node is passed over for the next one on every member alike."""
    with opened(base, nosync=False) as rig:
        flush = rig.mark(2, [4])             # region 4 marked by node 2: not for node 3
        rig.settle()
        assert rig.answer(2, flush) is not None
        assert [_remote(rig, 3, r)[0] for r in (4, 9)] == [1, 1]
        work = rig.send(3, T.GET_RESYNC_WORK)
        rig.settle()
        assert _work(rig, 3, work) == 9
        assert [rig.nodes[n].state.logs[UUID].recovering for n in (1, 2, 3)] == [{9: 3}] * 3


def test_a_node_is_never_handed_a_region_past_its_own_table(base: Path) -> None:
    """A rolling resize (lvextend): node 2's table grows to 32 regions first, the shared log with
    it, node 1's still has 16. Node 1's kernel must never get a region of 16..31 to recover (past
    the end of its mirror); node 2's does; a region handed to node 1 before its table shrank goes
    back to be handed out (RESYNC_WORK's limit)."""
    with opened(base, nosync=False) as rig:
        new = 0x9302
        _reload(rig, 2, 32, new)
        assert rig.nodes[1].state.logs[UUID].region_count == 32
        handed: dict[int, list[int]] = {1: [], 2: []}
        for _ in range(40):
            for n, luid in ((1, None), (2, new)):
                work = rig.send(n, T.GET_RESYNC_WORK, luid=luid)
                rig.settle()
                region = _work(rig, n, work)
                if region is not None:
                    handed[n].append(region)
                    done = rig.send(n, T.SET_REGION_SYNC, wire.build_set_region_sync(region, 1), luid=luid)
                    rig.settle()
                    assert rig.answer(n, done) is not None
        assert handed[1] and all(r < 16 for r in handed[1]), handed
        assert sorted(handed[1] + handed[2]) == list(range(32)), handed
