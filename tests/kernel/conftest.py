"""Real-kernel tests: give ``test_real_kernel.show`` the running pytest, so that each scenario's
steps reach the terminal while the guest runs (issue #13)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import test_real_kernel


@pytest.fixture(autouse=True, scope="session")
def _live_progress(pytestconfig: pytest.Config) -> Iterator[None]:
    test_real_kernel.LIVE.config = pytestconfig
    yield
    test_real_kernel.LIVE.config = None
