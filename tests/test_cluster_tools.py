"""ulog-recover and ulog-dump on the cluster state of a state directory (``<dir>/cluster``), and
the cluster figures of ``--metrics-file``, without corosync.

The cluster directories are written as the daemon writes them (``ClusterNode``): each agreed
message applied to a :class:`ClusterState`, then appended to the :class:`ClusterStore` with the
epoch after it and its sender; snapshots with ``write_snapshot``. The tools must then show the
state the daemon's restart would load, which the tests know: it is the builder's own state.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ulog_disk.cluster import messages as msg
from ulog_disk.cluster.shared import ClusterState, SharedLog
from ulog_disk.daemon.applier import Applier
from ulog_disk.daemon.metrics import Metrics
from ulog_disk.storage.cluster_store import ClusterStore, read_cluster_dir
from ulog_disk.storage.memory import MemoryBackend
from ulog_disk.testing.tools import ulog_dump, ulog_recover
from ulog_disk.tools import clusterview as cv

BOOT = "0123456789abcdef0123456789abcdef"
LUIDS = {1: 0xFFFF888000001000, 2: 0xFFFF888000002000, 3: 0xFFFF888000003000}
BOOTS = {1: "1" * 32, 2: "2" * 32, 3: "3" * 32}
K = msg.Kind


class Builder:
    """A state directory with a cluster directory, written as the daemon writes it."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        state_dir.mkdir()
        (state_dir / "lock").touch()  # what makes it a state directory for the tools
        self.store = ClusterStore(state_dir / "cluster")
        self.store.load()
        self.state = ClusterState()

    def send(self, sender: int, kind: msg.Kind, **fields: object) -> object:
        data = msg.encode(kind, token=0, **fields)
        result = self.state.apply(msg.as_input(sender, msg.decode(data)))
        self.store.append(self.state.epoch, sender, data)
        return result

    def open(self, node: int, uuid: str, regions: int, in_sync: bool = True) -> None:
        self.send(node, K.OPEN, uuid=uuid, luid=LUIDS[node], boot_id=BOOTS[node], region_count=regions,
                  in_sync=in_sync)

    def flush(self, node: int, uuid: str, marks: list[int], clears: list[int] | None = None) -> None:
        self.send(node, K.FLUSH, uuid=uuid, marks=marks, clears=clears or [])

    def snapshot(self) -> None:
        self.store.write_snapshot(msg.encode_snapshot(self.state), self.store.snapshot_id, self.state.epoch,
                                  self.store.journal.position)

    def close(self) -> None:
        self.store.sync()
        self.store.close()

    @property
    def cluster_dir(self) -> Path:
        return self.state_dir / "cluster"


def scenario(state_dir: Path) -> Builder:
    """Three nodes; node 3 leaves without closing and is not fenced yet; node 1 recovers a
    region of a second log."""
    b = Builder(state_dir)
    for node in (1, 2, 3):
        b.open(node, "LVM-a", 64)
    b.open(1, "LVM-b", 16, in_sync=False)
    b.snapshot()
    b.flush(1, "LVM-a", [5, 6, 7])
    b.flush(3, "LVM-a", [10, 11])
    b.flush(2, "LVM-a", [20, 21])
    b.flush(2, "LVM-a", [], [21])
    b.send(1, K.DEPARTED, nodes=[3])
    assert b.send(1, K.RESYNC_WORK, uuid="LVM-b", prefer=[], limit=2**64 - 1) == 0
    b.send(1, K.SET_REGION_SYNC, uuid="LVM-b", region=0, in_sync=True)
    assert b.send(1, K.RESYNC_WORK, uuid="LVM-b", prefer=[], limit=2**64 - 1) == 1
    return b


@pytest.fixture
def built(tmp_path: Path) -> Builder:
    b = scenario(tmp_path / "state")
    b.close()
    return b


def logs_by_uuid(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["uuid"]: entry for entry in doc["logs"]}


def listing(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


# --- the read-only loader -------------------------------------------------------------------------


def test_the_read_only_loader_loads_what_the_daemon_loads_and_changes_nothing(built: Builder,
                                                                               tmp_path: Path) -> None:
    before = listing(built.cluster_dir)
    loaded = read_cluster_dir(built.cluster_dir)
    assert listing(built.cluster_dir) == before  # no new segment, nothing touched
    copy = tmp_path / "copy"
    shutil.copytree(built.cluster_dir, copy)
    store = ClusterStore(copy)
    reference = store.load()
    store.close()
    assert loaded == reference
    assert [a.epoch for a in loaded.records] == list(range(loaded.epoch + 1, built.state.epoch + 1))


def test_the_view_is_the_state_a_restart_loads(built: Builder) -> None:
    view = cv.read_cluster(built.cluster_dir)
    assert view.error is None and view.problems == []
    assert view.state is not None
    assert msg.encode_snapshot(view.state) == msg.encode_snapshot(built.state)
    assert view.has_snapshot and view.snapshot_epoch == 4 and view.replayed == built.state.epoch - 4


# --- ulog-recover list / verify ----------------------------------------------------------------------


def test_list_shows_members_marks_held_regions_and_recoverers(built: Builder) -> None:
    r = ulog_recover("list", "--state-dir", str(built.state_dir), "--boot-id", BOOT, "--json")
    assert r.rc == 0, r.err
    cluster = r.json["cluster"]
    assert cluster["epoch"] == built.state.epoch
    assert cluster["snapshot"] == {"id": 0, "id_hex": "0" * 16, "epoch": 4}
    assert cluster["unfenced"] == [3]
    logs = logs_by_uuid(cluster)
    a = logs["LVM-a"]
    assert (a["region_count"], a["in_sync"], a["out_of_sync"]) == (64, 62, "10-11")
    assert [(o["node"], o["luid"], o["boot_id"]) for o in a["opened"]] == [
        (1, LUIDS[1], BOOTS[1]), (2, LUIDS[2], BOOTS[2])]
    assert [(m["node"], m["count"], m["regions"]) for m in a["marks"]] == [(1, 3, "5-7"), (2, 1, "20")]
    assert [(h["node"], h["count"], h["regions"]) for h in a["held"]] == [(3, 2, "10-11")]
    assert a["released"] == {"count": 0, "regions": ""}
    b = logs["LVM-b"]
    assert (b["in_sync"], b["recovering"]) == (1, [{"region": 1, "node": 1}])

    text = ulog_recover("list", "--state-dir", str(built.state_dir), "--boot-id", BOOT)
    assert text.rc == 0, text.err
    assert f"epoch {built.state.epoch} (snapshot {0:016x} at epoch 4" in text.out
    assert "departed nodes waiting for a fence: 3" in text.out
    assert "clustered log 'LVM-a': 64 regions, 62 in sync (out of sync: 10-11)" in text.out
    assert "node 1 (luid 0xffff888000001000, boot 11111111); node 2 (luid 0xffff888000002000" in text.out
    assert "node 1: 3 (5-7); node 2: 1 (20)" in text.out
    assert "node 3: 2 (10-11), waiting for the fence" in text.out
    assert "1 by node 1" in text.out


def test_list_selects_clustered_logs_by_uuid_and_luid(built: Builder) -> None:
    r = ulog_recover("list", "--state-dir", str(built.state_dir), "--boot-id", BOOT, "--uuid", "LVM-b",
                     "--json")
    assert list(logs_by_uuid(r.json["cluster"])) == ["LVM-b"]
    r = ulog_recover("list", "--state-dir", str(built.state_dir), "--boot-id", BOOT, "--luid",
                     hex(LUIDS[2]), "--json")
    assert list(logs_by_uuid(r.json["cluster"])) == ["LVM-a"]


def test_a_state_directory_without_a_cluster_directory_has_no_cluster_section(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "lock").touch()
    r = ulog_recover("list", "--state-dir", str(state), "--boot-id", BOOT, "--json")
    assert r.rc == 0 and r.json["cluster"] is None
    r = ulog_recover("verify", "--state-dir", str(state), "--boot-id", BOOT)
    assert r.rc == 0 and "cluster" not in r.out
    r = ulog_dump("cluster", str(state))
    assert r.rc == 2 and "no cluster state in it" in r.err


def test_verify_passes_a_consistent_state_and_reads_only(built: Builder) -> None:
    before = listing(built.cluster_dir)
    r = ulog_recover("verify", "--state-dir", str(built.state_dir), "--boot-id", BOOT)
    assert r.rc == 0, r.out + r.err
    assert "cluster: OK" in r.out and "healthy: 0 store(s) and the cluster state checked" in r.out
    j = ulog_recover("verify", "--state-dir", str(built.state_dir), "--boot-id", BOOT, "--json")
    assert j.rc == 0 and j.json["healthy"] and j.json["cluster"]["healthy"]
    assert listing(built.cluster_dir) == before


def test_verify_of_one_clustered_log_that_has_no_store(built: Builder) -> None:
    r = ulog_recover("verify", "LVM-a", "--state-dir", str(built.state_dir), "--boot-id", BOOT, "--json")
    assert r.rc == 0, r.err
    assert list(logs_by_uuid(r.json["cluster"])) == ["LVM-a"]
    r = ulog_recover("verify", "LVM-nope", "--state-dir", str(built.state_dir), "--boot-id", BOOT)
    assert r.rc == 2 and "no store (and no clustered log) for uuid 'LVM-nope'" in r.err


def write_state(b: Builder, state: ClusterState) -> None:
    """A snapshot of ``state`` as the newest thing in the directory (its records before it)."""
    store = ClusterStore(b.cluster_dir)
    store.load()
    store.write_snapshot(msg.encode_snapshot(state), store.snapshot_id, state.epoch, store.journal.position)
    store.close()


def test_verify_finds_held_regions_of_a_node_not_waiting_for_a_fence(built: Builder) -> None:
    state = msg.decode_snapshot(msg.encode_snapshot(built.state))
    state.unfenced.clear()
    write_state(built, state)
    r = ulog_recover("verify", "--state-dir", str(built.state_dir), "--boot-id", BOOT)
    assert r.rc == 1
    assert ("error    cluster log 'LVM-a': regions are held for node 3, which is not among the departed "
            "nodes waiting for a fence") in r.out
    assert "PROBLEMS FOUND" in r.out


def test_verify_finds_released_regions_in_sync(built: Builder) -> None:
    state = msg.decode_snapshot(msg.encode_snapshot(built.state))
    state.logs["LVM-a"].released[40] = 1
    write_state(built, state)
    r = ulog_recover("verify", "--state-dir", str(built.state_dir), "--boot-id", BOOT, "--json")
    assert r.rc == 1 and not r.json["healthy"]
    messages = [f["message"] for f in r.json["cluster"]["findings"]]
    assert messages == ["released region(s) 40 are in sync"]


def test_the_invariant_checks_see_a_marked_or_held_region_counted_clean(
        built: Builder, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cv.check_state(built.state) == []
    # Counted clean by a broken rule: the checks do not trust is_clean's own reasoning.
    monkeypatch.setattr(SharedLog, "is_clean", lambda self, region: True)
    found = [f.message for f in cv.check_state(built.state)]
    assert "region(s) 5-7 marked by node 1 are counted clean" in found
    assert "region(s) 20 marked by node 2 are counted clean" in found
    assert "a region held for node 3's fence is counted clean" in found


def test_a_held_region_in_sync_makes_the_snapshot_unreadable(built: Builder) -> None:
    state = msg.decode_snapshot(msg.encode_snapshot(built.state))
    state.logs["LVM-a"].sync[10] = 1  # held for node 3, yet in sync
    state.logs["LVM-a"].sync_count += 1
    write_state(built, state)
    r = ulog_recover("verify", "--state-dir", str(built.state_dir), "--boot-id", BOOT)
    assert r.rc == 1
    assert "region 10 held for node 3's fence is in sync" in r.out
    assert "dm-ulogd --cluster refuses to start on it" in r.out


def test_a_damaged_snapshot_is_one_clear_line_and_a_failure(built: Builder) -> None:
    path = built.cluster_dir / "snapshot"
    data = bytearray(path.read_bytes())
    data[30] ^= 0xFF
    path.write_bytes(bytes(data))
    r = ulog_recover("list", "--state-dir", str(built.state_dir), "--boot-id", BOOT)
    assert r.rc == 2
    err = r.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ulog-recover: the cluster state cannot be read: ")
    assert "snapshot: not a cluster snapshot file of version 1 (or damaged)" in err[0]
    assert "CANNOT BE READ" in r.out
    r = ulog_recover("verify", "--state-dir", str(built.state_dir), "--boot-id", BOOT, "--json")
    assert r.rc == 1 and r.json["cluster"]["readable"] is False
    r = ulog_dump("cluster", str(built.state_dir))
    assert r.rc == 2 and len(r.err.strip().splitlines()) == 1


def test_records_of_a_transfer_whose_snapshot_never_landed_are_not_used(tmp_path: Path) -> None:
    b = scenario(tmp_path / "state")
    kept = msg.encode_snapshot(b.state)
    # A state transfer: records from now on name a new snapshot, which a crash kept from landing.
    b.store.new_snapshot_id()
    b.flush(2, "LVM-a", [30])
    b.close()
    r = ulog_recover("verify", "--state-dir", str(b.state_dir), "--boot-id", BOOT, "--json")
    assert r.rc == 0, r.out
    cluster = r.json["cluster"]
    assert cluster["records_skipped"] == 1
    assert any("build on another snapshot" in f["message"] and f["level"] == "note"
               for f in cluster["findings"])
    view = cv.read_cluster(b.cluster_dir)
    assert view.state is not None and msg.encode_snapshot(view.state) == kept


def test_missing_epochs_in_the_journal_are_a_warning(tmp_path: Path) -> None:
    b = scenario(tmp_path / "state")
    data = msg.encode(K.FLUSH, token=0, uuid="LVM-a", marks=[40], clears=[])
    b.store.append(b.state.epoch + 5, 1, data)  # as if five agreed messages were lost before it
    b.close()
    r = ulog_recover("verify", "--state-dir", str(b.state_dir), "--boot-id", BOOT)
    assert r.rc == 1
    assert f"records jump from epoch {b.state.epoch} to {b.state.epoch + 5}" in r.out


# --- ulog-dump cluster / store / journal -------------------------------------------------------------


def test_dump_cluster_text_and_json(built: Builder) -> None:
    for arg in (str(built.state_dir), str(built.cluster_dir)):
        r = ulog_dump("cluster", arg)
        assert r.rc == 0, r.err
        assert "resync cursor  node 1: 2" in r.out
        assert "node 3: 2 (10-11), waiting for the fence" in r.out
    j = ulog_dump("cluster", "--state-dir", str(built.state_dir), "--uuid", "LVM-a", "--json")
    assert j.rc == 0, j.err
    doc = j.json
    assert doc["command"] == "cluster" and doc["epoch"] == built.state.epoch and doc["healthy"]
    assert list(logs_by_uuid(doc)) == ["LVM-a"]
    assert logs_by_uuid(doc)["LVM-a"]["cursors"] == [{"node": 1, "cursor": 0}, {"node": 2, "cursor": 0}]
    r = ulog_dump("cluster", str(built.state_dir), "--uuid", "LVM-x")
    assert r.rc == 2 and "no clustered log 'LVM-x'" in r.err


def test_dump_store_says_where_the_cluster_state_is(built: Builder) -> None:
    r = ulog_dump("store", str(built.state_dir), "--boot-id", BOOT)
    assert r.rc == 0, r.err
    assert f"cluster state: epoch {built.state.epoch} (snapshot" in r.out
    assert "2 clustered log(s) (shown by 'ulog-dump cluster')" in r.out
    assert "ignored" not in r.out
    j = ulog_dump("store", str(built.state_dir), "--boot-id", BOOT, "--json")
    assert j.json["cluster"]["epoch"] == built.state.epoch and "cluster" not in j.json["ignored"]


def test_dump_journal_decodes_the_agreed_records(built: Builder) -> None:
    r = ulog_dump("journal", str(built.cluster_dir), "--all", "--boot-id", BOOT)
    assert r.rc == 0, r.err
    lines = [line for line in r.out.splitlines() if "AGREED" in line]
    assert len(lines) == built.state.epoch
    assert lines[0].endswith("epoch 1, node 1: OPEN uuid LVM-a, luid 0xffff888000001000, boot_id " + BOOTS[1]
                             + ", region_count 64, in_sync yes  [in the snapshot]")
    assert lines[4].endswith("epoch 5, node 1: FLUSH uuid LVM-a, marks 5-7, clears none")
    assert lines[7].endswith("epoch 8, node 2: FLUSH uuid LVM-a, marks none, clears 21")
    assert lines[8].endswith("epoch 9, node 1: DEPARTED nodes 3")
    assert lines[10].endswith("epoch 11, node 1: SET_REGION_SYNC uuid LVM-b, region 0, in_sync yes")
    assert f"cluster snapshot {0:016x} at epoch 4" in r.out
    j = ulog_dump("journal", str(built.cluster_dir), "--records", "3", "--json")
    assert j.rc == 0, j.err
    doc = j.json
    assert doc["cluster"] is True and doc["cluster_snapshot"]["epoch"] == 4
    agreed = [rec["agreed"] for rec in doc["records"]]
    assert [(a["epoch"], a["sender"], a["message_kind"]) for a in agreed] == [
        (10, 1, "RESYNC_WORK"), (11, 1, "SET_REGION_SYNC"), (12, 1, "RESYNC_WORK")]
    assert agreed[1]["fields"] == {"token": 0, "uuid": "LVM-b", "region": 0, "in_sync": True}


def test_dump_journal_of_a_state_directory_is_unchanged_by_a_cluster_directory(built: Builder) -> None:
    r = ulog_dump("journal", str(built.state_dir), "--boot-id", BOOT)
    assert r.rc == 0, r.err
    assert "AGREED" not in r.out and "none in the state directory" in r.out


# --- metrics ------------------------------------------------------------------------------------------


class FakeCluster:
    def __init__(self) -> None:
        self.calls = 0
        self.values: dict[str, object] = {
            "node": 2, "members": [1, 2, 3], "quorate": True, "current": True, "epoch": 41, "logs": 2,
            "pending": 1, "waiting": 0, "unfenced": [4], "agreed": 30, "applied": 120, "transfers_sent": 1,
            "transfers_taken": 2, "held": 5, "rule_errors": 0, "fenced": 1, "departed": 2,
            "latency_sum": 0.25, "latency_count": 30,
        }

    def status(self) -> dict[str, object]:
        self.calls += 1
        return dict(self.values)


def samples(path: Path) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def take(metrics: Metrics) -> None:
    applier = Applier.over(MemoryBackend(metrics.path.parent), boot_id=BOOT)
    metrics.write(metrics.snapshot(applier, (0, 0), 0, threading.Lock()))


def test_metrics_of_the_cluster_node(tmp_path: Path) -> None:
    metrics = Metrics(tmp_path / "m.prom")
    fake = FakeCluster()
    metrics.cluster = fake
    take(metrics)
    assert fake.calls == 1
    s = samples(metrics.path)
    one = {name: values[()] for name, values in s.items()
           if name.startswith("dm_ulogd_cluster") and () in values}
    assert one == {
        "dm_ulogd_cluster_node_id": 2, "dm_ulogd_cluster_members": 3, "dm_ulogd_cluster_quorate": 1,
        "dm_ulogd_cluster_current": 1, "dm_ulogd_cluster_epoch": 41, "dm_ulogd_cluster_logs": 2,
        "dm_ulogd_cluster_pending_requests": 1, "dm_ulogd_cluster_waiting_requests": 0,
        "dm_ulogd_cluster_unfenced_nodes": 1, "dm_ulogd_cluster_agreed_requests_total": 30,
        "dm_ulogd_cluster_applied_total": 120, "dm_ulogd_cluster_requests_held_total": 5,
        "dm_ulogd_cluster_rule_errors_total": 0, "dm_ulogd_cluster_departed_nodes_total": 2,
        "dm_ulogd_cluster_fenced_nodes_total": 1, "dm_ulogd_cluster_agreed_latency_seconds_count": 30,
        "dm_ulogd_cluster_agreed_latency_seconds_sum": 0.25,
    }
    transfers = {dict(k)["direction"]: v for k, v in s["dm_ulogd_cluster_state_transfers_total"].items()}
    assert transfers == {"sent": 1, "taken": 2}
    # Each write reads the node again.
    fake.values.update(quorate=False, members=[2], epoch=42)
    take(metrics)
    s = samples(metrics.path)
    assert s["dm_ulogd_cluster_quorate"][()] == 0 and s["dm_ulogd_cluster_members"][()] == 1
    assert s["dm_ulogd_cluster_epoch"][()] == 42 and fake.calls == 2


def test_no_cluster_metrics_outside_cluster_mode(tmp_path: Path) -> None:
    metrics = Metrics(tmp_path / "m.prom")
    take(metrics)
    names = samples(metrics.path)
    assert "dm_ulogd_mirrors" in names
    assert not [n for n in names if n.startswith("dm_ulogd_cluster")]

