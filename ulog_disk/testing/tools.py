"""ulog-dump and ulog-recover run in-process, as a test sees them: exit status, stdout, stderr.

stdin is not a terminal (a command that would ask refuses unless ``--yes``), and argparse's exits
come back as the exit status.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..tools import dump, recover


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


def run_main(main: Callable[[list[str]], int], *argv: str, stdin: str = "") -> Result:
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)  # not a terminal
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(argv))
            except SystemExit as exc:  # argparse
                rc = int(exc.code or 0)
    finally:
        sys.stdin = old
    return Result(rc, out.getvalue(), err.getvalue())


def ulog_dump(*argv: str, stdin: str = "") -> Result:
    return run_main(dump.main, *argv, stdin=stdin)


def ulog_recover(*argv: str, stdin: str = "") -> Result:
    return run_main(recover.main, *argv, stdin=stdin)


def instances(doc: dict[str, Any], uuid: str) -> dict[str, dict[str, Any]]:
    """luid hex (or 'retained') → state JSON of one uuid in a `ulog-dump store --json` document."""
    for store in doc["stores"]:
        if store["uuid"] == uuid:
            out = {i["luid_hex"]: i for i in store["instances"]}
            if store["retained"]:
                out["retained"] = store["retained"]
            return out
    raise AssertionError(f"no store for {uuid}")


def hexluid(luid: int) -> str:
    return f"{luid:#018x}"
