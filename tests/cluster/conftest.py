"""The corosync rig (tools/cluster/rig.py) as pytest fixtures: three nodes for a test module.

Skipped, with the reason, only where the rig cannot exist: not root (network and mount
namespaces), or no ``unshare``/``nsenter``/``ip``. A missing corosync is a failure, not a skip:
``bash tools/run.sh setup`` installs it, and a tier that silently skips tests nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "cluster"))

from cpg_worker import WorkerClient, worker_argv  # noqa: E402
from rig import Rig, RigError, rig_verdict  # noqa: E402

NODES = 3


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    skip, fail = rig_verdict()
    if skip:
        pytest.skip(skip)
    if fail:
        pytest.fail(fail)
    r = Rig(tmp_path_factory.mktemp("rig"))
    r.up(NODES)
    try:
        yield r
    finally:
        r.down()


@pytest.fixture
def healthy(rig: Rig) -> Rig:
    """The rig as a test expects to find it: every port up, every corosync running, all quorate
    with every node a member (a test that broke it and failed leaves it to be repaired here)."""
    for n in rig.nodes:
        rig.heal(n.name)
        if not rig.corosync_alive(n.name):
            rig.start_corosync(n.name)
    try:
        rig.wait_quorate([n.name for n in rig.nodes], True, members=len(rig.nodes), timeout=30)
    except RigError as e:
        pytest.fail(f"the rig did not come back: {e}")
    return rig


def start_worker(rig: Rig, node: str, group: str, members: int | None = None,
                 timeout: float = 20.0) -> WorkerClient:
    """A worker in ``node`` joined to ``group``; with ``members``, waits until it sees that many
    members in the group."""
    w = WorkerClient(worker_argv(), node, popen=lambda argv, **kw: rig.popen(node, argv, **kw))
    try:
        w.info = w.call("join", group=group, timeout=timeout)  # type: ignore[attr-defined]
        if members is not None:
            wait_members(w, members, timeout)
    except BaseException:
        w.kill()
        raise
    return w


def wait_members(w: WorkerClient, count: int, timeout: float = 20.0, since: int = 0) -> dict:
    return w.wait_event(lambda e: e["ev"] == "confchg" and len(e["members"]) == count,
                        timeout, since, what=f"membership of {count}")


@pytest.fixture
def workers(healthy: Rig, request: pytest.FixtureRequest) -> Iterator[dict[str, WorkerClient]]:
    """One worker per node, all joined to a group named after the test, each seeing all."""
    group = f"t-{request.node.name}"[:100]
    started: dict[str, WorkerClient] = {}
    try:
        # Started together: each is a Python start-up, a second on a loaded machine.
        for n in healthy.nodes:
            started[n.name] = WorkerClient(
                worker_argv(), n.name,
                popen=lambda argv, node=n.name, **kw: healthy.popen(node, argv, **kw))
        joins = {name: w.submit("join", group=group) for name, w in started.items()}
        for name, w in started.items():
            w.info = w.result(joins[name], timeout=30)  # type: ignore[attr-defined]
        for w in started.values():
            wait_members(w, len(healthy.nodes))
        yield started
    finally:
        for w in started.values():
            w.close()
