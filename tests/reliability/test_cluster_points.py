"""Cluster crash points on a 3-node corosync rig (tools/reliability/cluster_points.py): a workload
on every node's kernel, a fault at a random instant (a daemon SIGKILLed, a node crashed, a node
partitioned and healed, the whole cluster crashed, sometimes with one node's state directory lost),
recovery as the kernel and the hosts do it, then the oracle on every node: no region clean while a
node holds it marked, no region handed to two recoverers, a crashed node's marks out of sync until
recovered, every node's IN_SYNC, IS_CLEAN and GET_SYNC_COUNT alike, no acknowledged mark lost.
Violations named ``*_unfenced`` (see UNFENCED) are reported, not failed on.

Default 4 points (one of each fault), ``ULOG_REL_CLUSTER_POINTS`` sets the count; the long mode
(``tools/reliability/run.py --long --only cluster``) runs 220. ``ULOG_REL_SEED`` picks the
sequence; each violation names its point's seed (``cluster_points.py --replay SEED``).
``ULOG_REL_CLUSTER_FENCE=1`` runs the daemons with a fence command that cuts the fenced node's power.

Skipped, with the reason, only where the rig cannot exist (not root; no unshare, nsenter, ip or
mount). A missing corosync fails: ``bash tools/run.sh setup`` installs it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from rel_lib import figures, scale

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "reliability"))

import cluster_points  # noqa: E402
from rig import rig_verdict  # noqa: E402 - on sys.path through cluster_points

POINTS = int(scale("ULOG_REL_CLUSTER_POINTS", 4, 220))
#: Rules 1 and 2 broken only for the victim of a daemon kill or a partition: a living node that the
#: others, with no --fence-command, count as fenced as soon as its daemon leaves the group, so they
#: hand its marked regions out for recovery while its kernel still holds them. Reported (figures,
#: printed, docs/reliability.md), not failed on: what cluster mode guarantees today stops at this.
UNFENCED = ("held_unfenced", "two_recoverers_unfenced")
SEED = int(os.environ.get("ULOG_REL_SEED", "11"))
#: ``ULOG_REL_CLUSTER_FENCE=1``: the daemons run with a --fence-command that cuts the fenced node's
#: power (cluster_points.Runner), so a daemon kill or a seen partition ends in that node's reboot.
FENCE = os.environ.get("ULOG_REL_CLUSTER_FENCE") == "1"


def test_cluster_crash_points(tmp_path: Path) -> None:
    skip, fail = rig_verdict()
    if skip:
        pytest.skip(skip)
    if fail:
        pytest.fail(fail)
    summary, violations, runner = cluster_points.run(POINTS, SEED, tmp_path, fence=FENCE)
    figures("cluster.crash_points_fenced" if FENCE else "cluster.crash_points", **summary)
    for v in violations[:40]:
        print(v)
    assert summary["points"] == POINTS
    unfenced = [v for v in violations if v.rule in UNFENCED]
    if unfenced:
        print(f"{len(unfenced)} violation(s) of a living node counted as fenced (no --fence-command), in "
              f"{len({v.seed for v in unfenced})} point(s)")
    violations = [v for v in violations if v.rule not in UNFENCED]
    assert not violations, (
        f"{len(violations)} violation(s) in {summary['points_with_violations']} of {summary['points']} "
        "points "
        f"(replay: tools/reliability/cluster_points.py --replay SEED; daemons' logs: {runner.logs()}):\n"
        + "\n".join(str(v) for v in violations[:20]))
