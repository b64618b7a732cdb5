from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ulog_disk.testing import launcher
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
