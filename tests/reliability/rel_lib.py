"""What the reliability tests share beyond :mod:`ulog_disk.testing`: their scale,
their figures, the daemon's defaults here, ``ulog-recover verify``.

A module the test files here (and ``tests/kernel/test_faults.py``, for :func:`figures`) import by
name; the daemon, clients and percentiles themselves are :mod:`ulog_disk.testing`'s.

Scale: every test reads its sizes through :func:`scale`, which gives the default-run value unless
``ULOG_REL_LONG=1`` (the long mode of ``tools/reliability/run.py``) or an explicit variable says
otherwise. Figures (counts, latencies, violations) go through :func:`figures`: printed, and appended
as JSON lines to ``$ULOG_REL_FIGURES`` when it is set, which is where the runner collects them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ulog_disk.testing import launcher
from ulog_disk.testing.launcher import Daemon

LONG = os.environ.get("ULOG_REL_LONG") == "1"
CHECKOUT = Path(__file__).resolve().parents[2]


def scale(name: str, default: float, long: float) -> float:
    """``$name`` if set, else ``long`` in the long mode, else ``default``."""
    raw = os.environ.get(name)
    if raw:
        return type(default)(raw)
    return long if LONG else default


def figures(test: str, **values: object) -> None:
    """Print one line of figures and keep it for the long-mode runner."""
    line = {"test": test, "long": LONG, **values}
    print("FIGURES " + json.dumps(line, sort_keys=False), flush=True)
    target = os.environ.get("ULOG_REL_FIGURES")
    if target:
        with open(target, "a") as f:
            f.write(json.dumps(line) + "\n")


def launch(tmp: Path, **kwargs: object) -> Daemon:
    """:func:`ulog_disk.testing.launcher.launch` with this suite's defaults: the LMDB backend,
    boot ``boot-1``, run from the checkout."""
    kwargs.setdefault("backend", "lmdb")
    kwargs.setdefault("boot_id", "boot-1")
    kwargs.setdefault("cwd", CHECKOUT)
    return launcher.launch(tmp, **kwargs)  # type: ignore[arg-type]


def recover_tool() -> list[str] | None:
    """``ulog-recover`` if the package has it (another part of the project provides it)."""
    try:
        import importlib.util

        if importlib.util.find_spec("ulog_disk.tools.recover") is None:
            return None
    except ImportError:
        return None
    return [sys.executable, "-m", "ulog_disk.tools.recover"]


def run_verify(state_dir: Path, boot_id: str) -> subprocess.CompletedProcess[str] | None:
    """``ulog-recover verify`` of a state directory, or None when the tool is not there."""
    tool = recover_tool()
    if tool is None:
        return None
    return subprocess.run([*tool, "verify", "--state-dir", str(state_dir), "--boot-id", boot_id],
                          capture_output=True, text=True, timeout=120, cwd=CHECKOUT)
