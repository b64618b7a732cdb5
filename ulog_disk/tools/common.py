"""Shared pieces of the admin tools: errors and exit codes, output, the daemon's lock, prompts."""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from bitarray import bitarray

from ..daemon.statedir import DEFAULT_STATE_DIR, lock_holder
from ..log.regionlog import format_ranges
from ..storage import journal as jn
from ..storage.bootid import read_boot_id
from ..storage.store_format import decode_dir_name, parse_damaged_dir_name

#: Version of every ``--json`` document (``formats/tools-json.md``); bumped on an incompatible
#: change of the keys.
JSON_VERSION = 1

EXIT_OK = 0
#: verify: problems found; destructive commands: refused (daemon running, not confirmed, ...).
EXIT_PROBLEMS = 1
#: Could not run: bad arguments, no such store or file, I/O error.
EXIT_ERROR = 2


class ToolError(Exception):
    """Stops a command with a message on stderr and an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR):
        super().__init__(message)
        self.code = code


class Refused(ToolError):
    """A destructive command that refuses to act (nothing was changed)."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_PROBLEMS)


# --- formatting ----------------------------------------------------------------------------------


def luid_hex(luid: int | None) -> str:
    return "-" if luid is None else f"{luid:#018x}"


def when(ts: float | None) -> str:
    """Local time for people; '-' for never (0)."""
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def iso(ts: float | None) -> str | None:
    """UTC ISO 8601 for JSON; None for never (0)."""
    if not ts:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def ranges(bits_zero_or_one: Iterable[int]) -> str:
    """Sorted region numbers as ``0-17,42,100-199`` ('' for none)."""
    return format_ranges(sorted(bits_zero_or_one))


def bit_ranges(bits: bitarray, value: int = 1) -> str:
    """The regions whose bit is ``value``, as ranges, walking runs (not regions): cheap for a
    bitmap of millions of regions with few runs."""
    parts: list[str] = []
    n = len(bits)
    start = bits.find(value)
    while start >= 0:
        end = bits.find(1 - value, start)
        last = (n if end < 0 else end) - 1
        parts.append(f"{start}" if start == last else f"{start}-{last}")
        if end < 0:
            break
        start = bits.find(value, end)
    return ",".join(parts)


def parse_ranges(text: str, limit: int | None = None) -> list[int]:
    """``0-17,42,100-199`` → sorted distinct regions; ValueError with the reason."""
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo, 0)
            b = int(hi, 0) if sep else a
        except ValueError:
            raise ValueError(f"{part!r} is not a region or a range like 10-20") from None
        if a < 0 or b < a:
            raise ValueError(f"{part!r} is not a valid range")
        if limit is not None and b >= limit:
            raise ValueError(f"region {b} is past the last region ({limit - 1})")
        out.update(range(a, b + 1))
    if not out:
        raise ValueError("no regions given")
    return sorted(out)


def parse_luid(text: str) -> int:
    try:
        return int(text, 16) if not text.lower().startswith("0x") else int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a luid (hex, e.g. 0xffff88812a4bc000)") from None


def table(rows: Sequence[Sequence[str]], header: Sequence[str], right: set[int] | None = None,
          indent: str = "") -> list[str]:
    """Rows aligned in columns; ``right`` lists the columns aligned to the right (numbers)."""
    right = right or set()
    cols = len(header)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(cols)]
    out = []
    for r in [header, *rows]:
        cells = [str(r[i]).rjust(widths[i]) if i in right else str(r[i]).ljust(widths[i])
                 for i in range(cols)]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def emit_json(doc: dict[str, Any], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    json.dump(doc, out, indent=2, sort_keys=False)
    out.write("\n")


def json_doc(tool: str, command: str, **body: Any) -> dict[str, Any]:
    return {"tool": tool, "command": command, "json_version": JSON_VERSION, **body}


# --- the state directory and the daemon's lock --------------------------------------------------


def add_state_dir_option(p: argparse.ArgumentParser, positional: str | None = None,
                         positional_help: str = "the state directory, as with --state-dir") -> None:
    """``--state-dir DIR``, the one spelling every command that reads a state directory takes.
    ``positional`` names an older positional spelling kept as an alias (``ulog-dump store DIR``);
    :func:`state_dir_of` reconciles the two."""
    p.add_argument("--state-dir", type=Path, default=None, metavar="DIR",
                   help=f"the daemon's state directory (default {DEFAULT_STATE_DIR})")
    if positional is not None:
        p.add_argument("path", nargs="?", type=Path, default=None, metavar=positional,
                       help=positional_help)


def add_store_options(p: argparse.ArgumentParser, state_dir: bool = True) -> None:
    if state_dir:
        add_state_dir_option(p)
    p.add_argument("--boot-id", metavar="ID",
                   help="boot id taken as the current one when judging instances (default: "
                        "/proc/sys/kernel/random/boot_id); instances recorded under another boot id "
                        "are orphaned")


def add_region_count_option(p: argparse.ArgumentParser, help: str) -> None:
    """``--region-count N``, and its earlier spelling ``--regions N`` kept for scripts but hidden
    (--regions is now a list of regions: ``ulog-recover resync``)."""
    p.add_argument("--region-count", type=int, metavar="N", help=help)
    p.add_argument("--regions", dest="region_count", type=int, help=argparse.SUPPRESS)


def state_dir_of(args: argparse.Namespace) -> Path:
    """The state directory given with --state-dir or the positional alias (the same one if both),
    else the default."""
    given = getattr(args, "state_dir", None)
    pos = getattr(args, "path", None)
    if given is not None and pos is not None and given != pos:
        raise ToolError(f"two state directories given ({pos} and --state-dir {given}): give one")
    return given or pos or Path(DEFAULT_STATE_DIR)


def is_journal_file(name: str) -> bool:
    """A journal segment, or one being made (``journal.<start>.new``)."""
    return jn.parse_segment_name(name.removesuffix(".new")) is not None


def is_state_entry(name: str) -> bool:
    """True for a name only the daemon puts in a state directory: its lock file, a journal
    segment, a store directory or one moved aside."""
    return (name == "lock" or is_journal_file(name) or decode_dir_name(name) is not None
            or parse_damaged_dir_name(name) is not None)


def state_dir_problem(path: Path, fresh_ok: bool = False) -> str | None:
    """Why ``path`` is not a state directory a tool can work on, or None.

    A state directory holds the daemon's lock file, a journal segment or a store directory (a
    daemon that ever started there left its lock; a backup has the journal and the stores). An
    empty or unrelated directory is refused: a typo in --state-dir must not read as a healthy
    empty store. ``fresh_ok`` (import, which may start a state directory) also accepts a missing
    or empty directory.
    """
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return None if fresh_ok else f"{path}: no such state directory"
    except NotADirectoryError:
        return f"{path}: not a directory"
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if fresh_ok and not names:
        return None
    if any(is_state_entry(name) for name in names):
        return None
    return (f"{path}: not a ulog-disk state directory (no lock file, journal or store in it)"
            + ("" if names else "; it is empty"))


def check_state_dir(path: Path, fresh_ok: bool = False) -> None:
    problem = state_dir_problem(path, fresh_ok)
    if problem is not None:
        raise ToolError(problem)


def current_boot_id(given: str | None) -> str:
    return given or read_boot_id()


@dataclass
class DaemonStatus:
    """Whether a dm-ulogd holds the state directory's lock (``<state dir>/lock``)."""

    running: bool
    pid: int | None
    #: How it was found out: "/proc/locks" (without touching the lock) or "probe".
    how: str

    def describe(self) -> str:
        if not self.running:
            return "dm-ulogd not running (state directory not locked)"
        return f"dm-ulogd running (pid {self.pid if self.pid is not None else '?'})"

    def as_json(self) -> dict[str, Any]:
        return {"running": self.running, "pid": self.pid}


def daemon_status(state_dir: Path) -> DaemonStatus:
    """Find out whether the daemon holds the lock, without taking it: an flock shows in
    /proc/locks as ``FLOCK ... WRITE <pid> <maj>:<min>:<inode>``. Reading /proc/locks never
    disturbs the daemon (taking the lock, even briefly, could make a starting daemon fail)."""
    path = state_dir / "lock"
    try:
        st = os.stat(path)
    except OSError:
        return DaemonStatus(False, None, "no lock file")
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = None
    if lines is not None:
        for line in lines:
            parts = line.split()
            if len(parts) < 6 or parts[1] == "->":  # a waiter, not a holder
                continue
            if parts[1] == "FLOCK" and parts[5] == key:
                return DaemonStatus(True, lock_holder(path), "/proc/locks")
        return DaemonStatus(False, None, "/proc/locks")
    # No /proc/locks: probe with a shared lock, released at once.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return DaemonStatus(False, None, "probe")
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return DaemonStatus(True, lock_holder(path), "probe")
    finally:
        os.close(fd)
    return DaemonStatus(False, None, "probe")


def confirm(question: str, yes: bool, stream: TextIO | None = None) -> None:
    """Go on only with ``--yes`` or a 'y' typed on a terminal; raise :class:`Refused` otherwise.

    Without ``--yes`` and with stdin not a terminal (a script, a pipe) the answer is no: a
    destructive change is never made because nobody was there to say no.
    """
    if yes:
        return
    err = stream or sys.stderr
    if not sys.stdin.isatty():
        raise Refused("stdin is not a terminal and --yes was not given: nothing changed "
                      "(add --yes to confirm, or --dry-run to see the plan)")
    err.write(f"{question} [y/N] ")
    err.flush()
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise Refused("not confirmed: nothing changed")


def os_error_text(exc: OSError) -> str:
    """``PATH: No such file or directory`` rather than ``[Errno 2] No such file ...: 'PATH'``."""
    what = exc.strerror or str(exc)
    return f"{exc.filename}: {what}" if exc.filename is not None else what


def run_tool(tool: str, parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, run the subcommand, and turn failures into one line on stderr and an exit status."""
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ToolError as exc:
        print(f"{tool}: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:  # | head
        return EXIT_OK
    except OSError as exc:
        print(f"{tool}: {os_error_text(exc)}", file=sys.stderr)
        return EXIT_ERROR
