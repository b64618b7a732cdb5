"""Descriptor and memory limits: a mirror that cannot be served fails its CTR
with a clear error and one log line naming the limit; every other mirror keeps working."""

from __future__ import annotations

import errno
import logging
import resource
from pathlib import Path

import pytest

from ulog_disk.daemon.applier import Applier
from ulog_disk.protocol import wire
from ulog_disk.protocol.wire import Request, RequestType
from ulog_disk.storage import limits
from ulog_disk.storage.limits import MemoryBudget, MemoryLimit, cgroup_memory_limit, log_memory_bytes
from ulog_disk.storage.memory import MemoryBackend
from ulog_disk.testing.client import Client
from ulog_disk.testing.launcher import Daemon, fd_count, launch

T = RequestType
MiB = 1024 * 1024


def make_cgroup(root: Path, path: str, limits_by_level: dict[str, str]) -> Path:
    proc = root / "proc-self-cgroup"
    proc.write_text(f"0::{path}\n")
    for level, value in limits_by_level.items():
        d = root / "cg" / level.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.max").write_text(value + "\n")
    return proc


def test_the_tightest_memory_max_of_the_cgroup_and_its_ancestors(tmp_path):
    proc = make_cgroup(tmp_path, "/system.slice/dm-ulogd.service",
                       {"system.slice": str(64 * MiB), "system.slice/dm-ulogd.service": "max"})
    found = cgroup_memory_limit(proc, tmp_path / "cg")
    assert found is not None and found.limit == 64 * MiB
    assert "system.slice/memory.max" in found.source


@pytest.mark.parametrize("content", ["max", "garbage"])
def test_no_memory_limit_when_every_level_is_max(tmp_path, content):
    proc = make_cgroup(tmp_path, "/a/b", {"a": "max", "a/b": content})
    assert cgroup_memory_limit(proc, tmp_path / "cg") is None


def test_no_cgroup_v2_means_no_memory_limit(tmp_path):
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("1:memory:/foo\n")
    assert cgroup_memory_limit(proc, tmp_path / "cg") is None
    assert cgroup_memory_limit(tmp_path / "missing", tmp_path / "cg") is None


def test_a_log_costs_four_times_its_bitmaps():
    assert log_memory_bytes(2**26) == 4 * 2**23 + limits.LOG_OVERHEAD_BYTES


def budget(limit: int, used: int) -> MemoryBudget:
    return MemoryBudget(lambda: MemoryLimit(limit, "cgroup memory.max /test"), lambda: used)


def test_a_log_that_fits_is_admitted_one_that_does_not_is_refused_with_the_limit_named():
    b = budget(256 * MiB, 40 * MiB)
    assert b.refusal(2**20) is None  # 0.5 MiB
    why = b.refusal(2**30)  # 512 MiB
    assert why is not None
    assert "256.0 MiB" in why and "cgroup memory.max /test" in why and "40.0 MiB in use" in why


def test_no_limit_admits_anything():
    assert MemoryBudget(lambda: None, lambda: 10**12).refusal(2**34) is None


def request(engine: Applier, seq: int, type_: RequestType, uuid: str, data: bytes = b"") -> wire.Reply:
    return engine.handle_now(Request(luid=1, uuid=uuid, version=3, seq=seq, request_type=type_, data=data))


def test_a_ctr_over_the_memory_limit_fails_with_enomem_and_one_line_others_keep_working(tmp_path, caplog):
    engine = Applier.over(MemoryBackend(tmp_path), boot_id="x", admission=budget(128 * MiB, 30 * MiB))
    assert request(engine, 1, T.CTR, "small", b"32768 clustered-core 1024").error == 0
    assert request(engine, 2, T.RESUME, "small").error == 0
    with caplog.at_level(logging.ERROR, logger="ulog_disk.engine"):
        reply = request(engine, 3, T.CTR, "huge", f"{2**31} clustered-core 8".encode())
    assert reply.error == -errno.ENOMEM
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "huge" in lines[0] and "memory limit" in lines[0] and "-ENOMEM" in lines[0]
    assert ("huge", 1) not in engine.table
    assert request(engine, 4, T.FLUSH, "small", wire.build_regions([3])).error == 0
    assert wire.parse_s64(request(engine, 5, T.IS_CLEAN, "small", wire.build_u64(3)).data) == 0
    # A CTR of a log already known costs nothing new: accepted whatever the budget.
    engine.engine.admission = budget(128 * MiB, 10**12)
    assert request(engine, 6, T.CTR, "small", b"32768 clustered-core 1024").error == 0


# --- the real daemon under a descriptor limit ---------------------------------------------------------


def start_limited(tmp: Path, nofile: int, wait_ready: bool = True) -> Daemon:
    """dm-ulogd (LMDB) with a soft and hard RLIMIT_NOFILE of ``nofile``."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return launch(tmp, backend="lmdb", preexec=limit, wait_ready=wait_ready)


def test_a_hundred_mirrors_under_ulimit_n_64(tmp_path):
    """The stores kept open are sized to the limit: no mirror fails for want of a descriptor."""
    d = start_limited(tmp_path, 64)
    try:
        client = Client(d.socket_path)
        for i in range(100):
            client.ok(f"m{i}", 1, T.CTR, b"32768 clustered-core 1024")
            client.ok(f"m{i}", 1, T.RESUME)
            client.ok(f"m{i}", 1, T.FLUSH, wire.build_regions([i % 32]))
        assert fd_count(d.pid) <= 64
        for i in range(100):  # every log still answers with its own state
            assert wire.parse_s64(client.ok(f"m{i}", 1, T.IS_CLEAN, wire.build_u64(i % 32))) == 0
        client.close()
    finally:
        d.proc.terminate()
    assert d.proc.wait(30) == 0, d.log_text()
    assert "Too many open files" not in d.log_text()


def test_a_descriptor_limit_too_small_for_one_store_is_refused_at_start(tmp_path):
    d = start_limited(tmp_path, 20, wait_ready=False)
    assert d.proc.wait(30) == 2
    lines = d.log_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("dm-ulogd: ") and "RLIMIT_NOFILE 20" in lines[0]
