from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ulog_disk.testing import launcher
from ulog_disk.testing.handover import Stores, build_stores, private_copy
from ulog_disk.testing.launcher import Daemon


@pytest.fixture(autouse=True)
def _reap_daemons() -> Iterator[None]:
    """Kill every daemon a test started and left running, so a failing test leaves no process
    behind (those of module fixtures, started before, stay for the next tests)."""
    started = len(launcher.STARTED)
    yield
    launcher.reap(started)


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    return launcher.launch(tmp_path, capture=True)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    """The hand-over stores made by a real daemon (:mod:`ulog_disk.testing.handover`), once per
    test module."""
    return build_stores(tmp_path_factory.mktemp("stores"))


@pytest.fixture
def store_after(stores: Stores, tmp_path: Path) -> Path:
    return private_copy(stores, "after", tmp_path)


@pytest.fixture
def store_before(stores: Stores, tmp_path: Path) -> Path:
    return private_copy(stores, "before", tmp_path)


@pytest.fixture
def base() -> Iterator[Path]:
    """A fresh directory for the state directories of in-process cluster nodes: on tmpfs where
    there is one (the nodes fsync their journals at every agreed message)."""
    root = "/dev/shm" if Path("/dev/shm").is_dir() else None
    path = Path(tempfile.mkdtemp(prefix="ulog-fakecluster-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
