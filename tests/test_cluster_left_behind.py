"""A daemon that stops while other members go on marks its state as left behind
(``cluster/left-behind``); a cluster forming anew from its state directories waits for a member
that was not left behind, or for every node (docs/cluster.md, Formation)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cluster_review import UUID, Rig, opened

from ulog_disk.protocol.wire import RequestType as T
from ulog_disk.storage.cluster_store import ClusterStore


def _flag(rig: Rig, n: int) -> Path:
    return rig.nodes_dir(n) / "cluster" / "left-behind"


def _whole_cluster_down(rig: Rig) -> None:
    for n in list(rig.nodes):
        rig.crash(n)
    for n in rig.bus.nodeids:
        rig.bus.crash(n)
    for n in rig.bus.nodeids:
        rig.bus.start(n)


def test_only_the_daemons_that_stop_while_others_stay_are_marked(base: Path) -> None:
    with opened(base) as rig:
        epoch = rig.nodes[3].state.epoch
        rig.nodes.pop(3).close()
        rig.settle()
        assert ClusterStore(rig.nodes_dir(3) / "cluster").left_behind() == epoch
        rig.nodes.pop(2).close()
        rig.settle()
        assert _flag(rig, 2).exists()
        rig.nodes.pop(1).close()   # the last one: nobody goes on without it
        assert not _flag(rig, 1).exists()


def test_a_node_left_behind_is_not_once_it_has_the_agreed_state_on_disk(base: Path) -> None:
    with opened(base) as rig:
        rig.nodes.pop(3).close()
        rig.settle()
        flush = rig.mark(1, [9])
        rig.settle()
        assert rig.answer(1, flush) is not None
        assert _flag(rig, 3).exists()
        node = rig.start(3)
        assert node.left_behind
        rig.settle()
        assert node.current and node.state.logs[UUID].marks[1][9]
        assert not node.left_behind and not _flag(rig, 3).exists()


def test_stopped_one_by_one_the_cluster_forms_again_around_the_last(base: Path) -> None:
    with opened(base) as rig:
        for n in (3, 2):
            rig.nodes.pop(n).close()
            rig.settle()
        flush = rig.mark(1, [4])   # acknowledged by node 1 alone
        rig.settle()
        assert rig.answer(1, flush) is not None
        rig.nodes.pop(1).close()
        _whole_cluster_down(rig)
        resumes = {n: rig.open(n) for n in (2, 3) if rig.start(n)}
        rig.settle()
        assert not any(rig.nodes[n].current for n in (2, 3))
        assert all(rig.answer(n, seq) is None for n, seq in resumes.items())
        rig.start(1)
        resumes[1] = rig.open(1)
        rig.settle()
        for n, seq in resumes.items():
            reply = rig.answer(n, seq)
            assert reply is not None and reply.error == 0, f"node {n}: RESUME not answered"
        # Node 1's acknowledged mark is in the state every node took (its writes ended with
        # its boot: out of sync, to be recovered).
        assert [rig.read(n, T.IN_SYNC, 4) for n in (1, 2, 3)] == [0, 0, 0]
        assert not any(_flag(rig, n).exists() for n in (1, 2, 3))


def test_every_node_back_forms_even_if_each_was_left_behind(base: Path) -> None:
    """Two daemons stopped at the same time each saw the other go on: both are marked. With
    every node back, the newest copy among all of them is the cluster's."""
    with opened(base, corosyncs=2, daemons=(1, 2)) as rig:
        for n in (1, 2):
            rig.nodes.pop(n).close()
        assert _flag(rig, 1).exists() and _flag(rig, 2).exists()
        _whole_cluster_down(rig)
        resumes = {}
        for n in (1, 2):
            rig.start(n)
            resumes[n] = rig.open(n)
        rig.settle()
        assert all(rig.nodes[n].current for n in (1, 2))
        assert all(rig.answer(n, seq) is not None for n, seq in resumes.items())


@pytest.mark.parametrize("text", ["", "not a number\n", "\x00\x00"])
def test_a_damaged_marker_still_says_left_behind(tmp_path: Path, text: str) -> None:
    store = ClusterStore(tmp_path)
    store.load()
    store.left_behind_path.write_text(text)
    assert store.left_behind() == 0
    store.clear_left_behind()
    assert store.left_behind() is None
    store.close()


def test_ulog_dump_cluster_says_a_node_is_left_behind(base: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    from ulog_disk.tools import dump

    with opened(base) as rig:
        epoch = rig.nodes[3].state.epoch
        rig.nodes.pop(3).close()
        for n, expected in ((3, epoch), (2, None)):
            assert dump.main(["cluster", str(rig.nodes_dir(n) / "cluster"), "--json"]) == 0
            doc = json.loads(capsys.readouterr().out)
            assert doc["left_behind"] == expected
        assert dump.main(["cluster", str(rig.nodes_dir(3) / "cluster")]) == 0
        assert f"left behind at epoch {epoch}" in capsys.readouterr().out
