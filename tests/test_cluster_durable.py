"""Who multicasts DURABLE, and how a large FLUSH is cut into messages.

A FLUSH with marks is answered once every other member says its cluster journal is durable past
it. Only what another member waits for is announced: the origin's own sync answers its own
FLUSH, so an origin alone in needing nothing sends no DURABLE (one agreed message fewer per FLUSH
for every corosync of the ring); the last message of a cut FLUSH carries marks whenever the FLUSH
does, since that is the one the members owe a DURABLE for.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ulog_disk.cluster import messages as msg
from ulog_disk.daemon.cluster import FLUSH_REGIONS, ClusterNode, _flush_pieces
from ulog_disk.protocol.wire import RequestType as T

sys.path.insert(0, str(Path(__file__).parent))

from test_cluster_node import settled  # noqa: E402


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return tmp_path


def _record_sends(node: ClusterNode, into: list[tuple[int, msg.Kind]]) -> None:
    send = node.group.send

    def recording(data: bytes) -> None:
        into.append((node.nodeid, msg.decode(data).kind))
        send(data)

    node.group.send = recording  # type: ignore[method-assign]


def _durables(sent: list[tuple[int, msg.Kind]]) -> list[int]:
    return sorted(n for n, kind in sent if kind is msg.Kind.DURABLE)


def test_only_the_members_that_owe_it_announce_durability(base: Path) -> None:
    with settled(base) as c:
        sent: list[tuple[int, msg.Kind]] = []
        for node in c.live():
            _record_sends(node, sent)
        c.mark(1, [3, 4])
        c.settle()
        # Answered: both others said DURABLE, and node 1 said none (nobody waits for it).
        assert c.kernels[1].marks == {3, 4}
        assert [k for n, k in sent if n == 1] == [msg.Kind.FLUSH]
        assert _durables(sent) == [2, 3]
        assert [c.read(n, T.IS_CLEAN, 3) for n in (1, 2, 3)] == [0, 0, 0]

        # A FLUSH with clears only is answered once applied: no member owes anything for it.
        sent.clear()
        c.clear(1, [3])
        c.settle(full=True)
        assert _durables(sent) == []
        assert [c.read(n, T.IS_CLEAN, 3) for n in (1, 2, 3)] == [1, 1, 1]

        # Two origins at once: each announces for the other's marks.
        sent.clear()
        c.mark(2, [7])
        c.mark(3, [9])
        c.settle()
        assert c.kernels[2].marks == {7} and c.kernels[3].marks == {9}
        assert set(_durables(sent)) == {1, 2, 3}


def test_a_member_that_joins_announces_the_state_it_took(base: Path) -> None:
    with settled(base) as c:
        c.mark(1, [5])
        c.settle()
        c.crash(3)
        c.settle()
        c.restart(3)
        c.settle(full=True)
        sent: list[tuple[int, msg.Kind]] = []
        for node in c.live():
            _record_sends(node, sent)
        # The FLUSH after the join waits for node 3's DURABLE as for node 2's.
        c.mark(1, [6])
        c.settle()
        assert c.kernels[1].marks >= {5, 6}
        assert _durables(sent) == [2, 3]
        assert [c.read(n, T.IS_CLEAN, 6) for n in (1, 2, 3)] == [0, 0, 0]


_lists = st.integers(0, 5 * FLUSH_REGIONS).map(lambda n: list(range(n)))


@given(_lists, _lists)
def test_a_flush_is_cut_with_its_marks_in_the_last_messages(marks: list[int], clears: list[int]) -> None:
    pieces = _flush_pieces(marks, clears)
    assert [r for m, _ in pieces for r in m] == marks
    assert [r for _, cl in pieces for r in cl] == clears
    assert all(len(m) <= FLUSH_REGIONS and len(cl) <= FLUSH_REGIONS for m, cl in pieces)
    # As few messages as the longer list needs, and the last carries marks if any.
    assert len(pieces) == max(1, -(-len(marks) // FLUSH_REGIONS), -(-len(clears) // FLUSH_REGIONS))
    assert bool(pieces[-1][0]) == bool(marks)
