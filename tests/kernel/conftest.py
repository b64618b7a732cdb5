"""Real-kernel tests: their guests start as soon as the session's tests are known and run side by
side, beside the tests that need no guest (tests/kernel/guests.py); the real-kernel tests
themselves run last and read the results."""

from __future__ import annotations

import os
import subprocess
import sys

import guests
import pytest

try:  # the static skip marks (skipif(condition)) of an item, as pytest itself evaluates them
    from _pytest.skipping import evaluate_skip_marks
except ImportError:  # pragma: no cover - a pytest without it: every planned guest boots
    evaluate_skip_marks = None


def guest_of(item: pytest.Item) -> guests.Guest | None:
    mark = item.get_closest_marker("guest")
    return mark.args[0] if mark is not None and mark.args else None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that read a guest go last, in the order their guests start (longest first): the
    others run meanwhile, and the first result waited for is the one that started first."""
    rank = {id(item): (1, not g.idle, -g.estimate) if (g := guest_of(item)) else (0, False, 0.0)
            for item in items}
    items.sort(key=lambda item: rank[id(item)])  # stable: the order within each rank stays


def will_run(item: pytest.Item) -> bool:
    if evaluate_skip_marks is None:
        return True
    try:
        return evaluate_skip_marks(item) is None
    except Exception:  # noqa: BLE001 - a condition pytest will report itself
        return True


def harness_ready() -> bool:
    p = subprocess.run([sys.executable, str(guests.ULOGVM), "check"], capture_output=True, text=True,
                       timeout=120)
    return p.returncode == 0


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    if config.option.collectonly or os.environ.get("ULOG_SKIP_KERNEL") == "1":
        return
    guests.TERMINAL = guests.Terminal(config)
    guests.TERMINAL.open()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker would boot every guest: run them in the tests
        return
    planned = {g.key: g for item in session.items if (g := guest_of(item)) is not None and will_run(item)}
    if not planned or not harness_ready():  # not ready: each test fails saying why (require_harness)
        return
    others = any(guest_of(item) is None for item in session.items)
    guests.POOL = guests.Pool(planned.values(), guests.default_jobs(), main_busy=others)
    guests.POOL.start()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """The first test that reads a guest: every other test has run, so pytest's core is free."""
    if guests.POOL is not None and guest_of(item) is not None:
        guests.POOL.main_idle()


def pytest_sessionfinish() -> None:
    stop()


def stop() -> None:
    """Never leave a guest behind: at the end of the session, after Ctrl-C, after -x."""
    if guests.POOL is not None:
        guests.POOL.close()
        guests.POOL = None
    guests.stop_all()
    guests.TERMINAL.close()
