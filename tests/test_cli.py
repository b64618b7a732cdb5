"""The three programs' command lines: one vocabulary, errors found first and
said once in one line, the systemd unit and the manual pages.

The tools run in-process (``test_dump.run_tool``); the daemon as a process, since what matters
is what it leaves on disk and prints before it would start serving.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ulog_disk.daemon import service
from ulog_disk.storage import journal as jn
from ulog_disk.storage import store_format as sf
from ulog_disk.testing.launcher import launch
from ulog_disk.testing.tools import ulog_dump, ulog_recover
from ulog_disk.tools import dump, recover
from ulog_disk.tools.common import state_dir_problem

CHECKOUT = Path(__file__).resolve().parent.parent


def one_error_line(err: str, program: str) -> str:
    """The stderr of a refused command: exactly one line, ``PROGRAM: ...``; returns it."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{program}: "), err
    assert "Traceback" not in err and "[Errno" not in err and "usage:" not in err, err
    return lines[0]


# --- one vocabulary --------------------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def _kind(action: argparse.Action) -> tuple[str, object, object]:
    """What an option takes: a flag, or a value of some type and metavar."""
    if action.nargs == 0:
        return ("flag", None, None)
    return ("value", getattr(action.type, "__name__", action.type), action.metavar)


#: The commands that read a state directory.
READS_STATE = {("ulog-dump", "store"), ("ulog-dump", "journal"), ("ulog-dump", "cluster"),
               *(("ulog-recover", c) for c in (
    "list", "verify", "purge", "resync", "backup", "export", "import"))}


def test_one_meaning_per_option_name_and_state_dir_everywhere() -> None:
    kinds: dict[str, set] = {}
    seen = set()
    for tool, module in (("ulog-dump", dump), ("ulog-recover", recover)):
        for name, sub in _commands(module.build_parser()).items():
            seen.add((tool, name))
            options = {s for a in _visible(sub) for s in a.option_strings}
            assert ("--state-dir" in options) == ((tool, name) in READS_STATE), (tool, name)
            for a in _visible(sub):
                if not a.option_strings:
                    assert a.help, f"{tool} {name}: positional {a.metavar or a.dest} has no help"
                for s in a.option_strings:
                    kinds.setdefault(s, set()).add(_kind(a))
    assert seen >= READS_STATE
    assert {k: v for k, v in kinds.items() if len(v) > 1} == {}
    # --regions is a list of regions wherever it is shown.
    assert kinds["--regions"] == {("value", None, "RANGES")}


def test_old_spellings_still_work_hidden(tmp_path: Path) -> None:
    p = tmp_path / "log"
    from ulog_disk.storage import disklog

    p.write_bytes(disklog.encode(40, b"\xff" * 5))
    new = ulog_dump("disklog", str(p), "--region-count", "48", "--json")
    old = ulog_dump("disklog", str(p), "--regions", "48", "--json")
    assert new.rc == old.rc == 0 and new.json == old.json and new.json["region_count"] == 48
    assert "--regions" not in ulog_dump("disklog", "--help").out
    assert "--regions" not in ulog_dump("store", "--help").out


def test_help_says_things_once() -> None:
    for tool, run in (("ulog-dump", ulog_dump), ("ulog-recover", ulog_recover)):
        top = run("--help")
        assert top.rc == 0
        assert top.out.count("exit status:") == 1
        for name in _commands((dump if tool == "ulog-dump" else recover).build_parser()):
            assert top.out.count(f"\n    {name} ") == 1, (tool, name)  # listed once
            assert "exit status:" not in run(name, "--help").out, (tool, name)


def test_daemon_help_states_privileges_files_and_exit_codes() -> None:
    text = service.build_parser().format_help()
    for needle in ("CAP_SYS_ADMIN", "CAP_NET_ADMIN", "initial network namespace", "lock", "journal.",
                   "u.<uuid>", "SIGTERM", "exit status:", "\n  0 ", "\n  1 ", "\n  2 "):
        assert needle in text, needle


def test_store_takes_state_dir_as_option_or_positional(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "lock").touch()
    a = ulog_dump("store", str(state), "--json", "--boot-id", "b")
    b = ulog_dump("store", "--state-dir", str(state), "--json", "--boot-id", "b")
    assert a.rc == b.rc == 0 and a.json == b.json and a.json["state_dir"] == str(state)
    r = ulog_dump("store", str(state), "--state-dir", str(tmp_path))
    assert r.rc == 2 and "two state directories" in one_error_line(r.err, "ulog-dump")


def test_argument_errors_are_one_line() -> None:
    r = ulog_dump("store", "--bogus")
    assert r.rc == 2 and "--bogus" in one_error_line(r.err, "ulog-dump")
    assert "ulog-dump store --help" in r.err
    r = ulog_recover()
    assert r.rc == 2 and "COMMAND" in one_error_line(r.err, "ulog-recover")
    r = ulog_recover("import", "LVM-x", "--disklog", "f", "--region-count", "x")
    assert r.rc == 2 and "--region-count" in one_error_line(r.err, "ulog-recover")


# --- not a state directory -------------------------------------------------------------------------

#: Every tool command that reads a state directory, with what else it needs to get that far.
STATE_COMMANDS = [
    ("dump", ["store"]), ("dump", ["journal"]),
    ("recover", ["list"]), ("recover", ["verify"]), ("recover", ["purge", "--yes"]),
    ("recover", ["resync", "LVM-a", "--yes"]), ("recover", ["backup", "{tmp}/backup"]),
    ("recover", ["export", "LVM-a", "--disklog", "{tmp}/out.log"]),
]


@pytest.mark.parametrize("contents", ["empty", "unrelated"])
@pytest.mark.parametrize(("tool", "argv"), STATE_COMMANDS,
                         ids=lambda v: "-".join(v) if isinstance(v, list) else v)
def test_not_a_state_directory_is_exit_2(tmp_path: Path, tool: str, argv: list[str], contents: str) -> None:
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    if contents == "unrelated":
        (wrong / "notes.txt").write_text("x")
        (wrong / "sub").mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    run = ulog_dump if tool == "dump" else ulog_recover
    r = run(*[a.format(tmp=tmp_path) for a in argv], "--state-dir", str(wrong))
    program = "ulog-dump" if tool == "dump" else "ulog-recover"
    assert r.rc == 2, r
    assert one_error_line(r.err, program) == (
        f"{program}: {wrong}: not a ulog-disk state directory (no lock file, journal or store in it)"
        + ("; it is empty" if contents == "empty" else ""))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created (no lock, no backup)


def test_import_may_start_a_state_directory_but_not_in_an_unrelated_one(tmp_path: Path) -> None:
    from ulog_disk.storage import disklog

    log = tmp_path / "in.log"
    log.write_bytes(disklog.encode(8, b"\xff"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ulog_recover("import", "LVM-a", "--disklog", str(log), "--state-dir", str(empty), "--yes").rc == 0
    assert (empty / "lock").exists()
    home = tmp_path / "home"
    home.mkdir()
    (home / ".profile").write_text("")
    r = ulog_recover("import", "LVM-a", "--disklog", str(log), "--state-dir", str(home), "--yes")
    assert r.rc == 2 and "not a ulog-disk state directory" in one_error_line(r.err, "ulog-recover")
    assert sorted(os.listdir(home)) == [".profile"]


#: Names the daemon leaves in a state directory, and names it never does.
DAEMON_NAMES = {"lock", jn.segment_name(0), jn.segment_name(1 << 22) + ".new", sf.encode_dir_name("LVM-a"),
                sf.encode_dir_name("LVM a/b"), sf.encode_dir_name("LVM-a") + ".damaged-1700000000"}
OTHER_NAMES = {"notes", "u.", "x.", "journal.x", "data.mdb", "lockfile", "backup.json", ".u.LVM-a",
               "x.not-base32"}


@settings(max_examples=40, deadline=None)
@given(st.sets(st.sampled_from(sorted(DAEMON_NAMES | OTHER_NAMES)), max_size=5))
def test_a_state_directory_is_one_the_daemon_left_something_in(names: set[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        for n in names:
            (Path(d) / n).mkdir()
        problem = state_dir_problem(Path(d))
        assert (problem is None) == bool(names & DAEMON_NAMES), (names, problem)
        if not names:  # import may start a state directory in an empty one, nothing else may
            assert problem is not None and state_dir_problem(Path(d), fresh_ok=True) is None


# --- cheap checks first ----------------------------------------------------------------------------


def test_resync_regions_syntax_is_checked_before_the_store(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "lock").touch()
    # No store for the uuid, and (below) a daemon holding the lock: the --regions error comes first.
    for bad, why in (("5-1", "not a valid range"), ("x", "not a region"), ("", "no regions given")):
        r = ulog_recover("resync", "LVM-none", "--regions", bad, "--state-dir", str(state), "--yes")
        assert r.rc == 2 and why in one_error_line(r.err, "ulog-recover"), r
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('ok', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(state / "lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        r = ulog_recover("resync", "LVM-none", "--regions", "5-1", "--state-dir", str(state), "--yes")
        assert r.rc == 2 and "--regions" in one_error_line(r.err, "ulog-recover")
    finally:
        holder.kill()
        holder.wait()


def test_missing_files_are_named_plainly(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    for command in ("disklog", "wire"):
        r = ulog_dump(command, str(missing))
        assert r.rc == 2
        assert one_error_line(r.err, "ulog-dump") == f"ulog-dump: {missing}: No such file or directory"
    r = ulog_recover("verify", "--state-dir", str(missing))
    assert r.rc == 2
    assert one_error_line(r.err, "ulog-recover") == f"ulog-recover: {missing}: no such state directory"


# --- the daemon: refused arguments create nothing --------------------------------------------------


def _daemon(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ulog_disk", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=CHECKOUT)


@pytest.mark.parametrize(("argv", "why"), [
    (["--listen", "bogus"], "must be 'netlink' or 'unix:PATH', not 'bogus'"),
    (["--listen", "unix:{tmp}/no/such/dir/s.sock"], "no such directory"),
    (["--capture", "{tmp}/no/such/dir/c.cap"], "no such directory"),
    (["--ready-file", "{tmp}/no/such/dir/ready"], "no such directory"),
    (["--backend", "nope"], "no backend named 'nope'"),
    (["--checkpoint-age", "-1"], "--checkpoint-age must not be negative"),
    (["--journal-segment-size", "1000"], "--journal-segment-size must be"),
])
def test_daemon_refuses_arguments_before_creating_anything(tmp_path: Path, argv: list[str], why: str) -> None:
    state = tmp_path / "state" / "not-yet"
    args = [a.format(tmp=tmp_path) for a in argv]
    listen = [] if "--listen" in args else ["--listen", f"unix:{tmp_path}/d.sock"]
    p = _daemon(*listen, *args, "--state-dir", str(state))
    assert p.returncode == 2, p
    assert why in one_error_line(p.stderr, "dm-ulogd")
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "d.sock").exists()


def test_daemon_start_up_error_is_one_plain_line(tmp_path: Path) -> None:
    first = launch(tmp_path, capture=True, backend="memory")
    p = _daemon("--listen", f"unix:{tmp_path}/other.sock", "--backend", "memory", "--state-dir",
                str(first.state_dir))
    assert p.returncode == 2
    line = one_error_line(p.stderr, "dm-ulogd")
    assert f"cannot start: state directory {first.state_dir} is in use by another dm-ulogd (pid " \
           f"{first.proc.pid})" in line
    assert first.stop() == 0


# --- the systemd unit and the manual pages ---------------------------------------------------------


def _build_man(out: Path) -> list[Path]:
    p = subprocess.run([sys.executable, str(CHECKOUT / "tools" / "make_man.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return [Path(line) for line in p.stdout.split()]


def test_man_pages_render_without_warnings(tmp_path: Path) -> None:
    if shutil.which("man") is None:
        pytest.fail("man is not installed (tools/run.sh setup installs man-db)")
    pages = _build_man(tmp_path)
    assert sorted(p.name for p in pages) == ["dm-ulogd.8", "ulog-dump.8", "ulog-recover.8"]
    for page in pages:
        r = subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "MANWIDTH": "80", "MAN_DISABLE_SECCOMP": "1"})
        assert r.returncode == 0 and r.stderr == "", (page.name, r.stderr)
        text = r.stdout
        # Generated from the parser (every option is there) and written by hand (the sections).
        assert "--state-dir" in text.replace("\u2010", "-")
        for section in ("EXIT STATUS", "FILES", "SEE ALSO"):
            assert section in text, (page.name, section)
        if page.name == "dm-ulogd.8":
            for section in ("PROTOCOL", "SIGNALS", "CAP_SYS_ADMIN", "--listen", "--checkpoint-age"):
                assert section in text.replace("\u2010", "-"), section
        if page.name == "ulog-recover.8":
            assert "COMMAND 'ulog-recover resync'" in text and "examples:" in text


def test_installed_unit_verifies(tmp_path: Path) -> None:
    """The unit as installed by 'pip install .' as root: dm-ulogd in /usr/local/bin (found by the
    bare ExecStart=), the pages of Documentation= where man finds them. A copy of this venv's
    console script stands in for the installed one, in a root of its own."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    script = Path(sys.executable).parent / "dm-ulogd"
    assert script.exists(), "the package's console scripts are not installed"
    root = tmp_path / "root"
    (root / "usr/local/bin").mkdir(parents=True)
    shutil.copy2(script, root / "usr/local/bin/dm-ulogd")
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(CHECKOUT / "contrib/dm-ulogd.service", root / "etc/systemd/system/dm-ulogd.service")
    _build_man(root / "usr/local/share/man/man8")
    env = {**os.environ, "MANPATH": f"{root}/usr/local/share/man:", "SYSTEMD_LOG_COLOR": "0"}
    r = subprocess.run([analyze, "verify", f"--root={root}", "/etc/systemd/system/dm-ulogd.service"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    # and it does check: without the executable the same unit fails
    (root / "usr/local/bin/dm-ulogd").unlink()
    r = subprocess.run([analyze, "verify", f"--root={root}", "/etc/systemd/system/dm-ulogd.service"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode != 0 and "dm-ulogd" in r.stderr
    unit = (CHECKOUT / "contrib/dm-ulogd.service").read_text()
    assert "LimitNOFILE=65536" in unit and "Documentation=man:dm-ulogd(8)" in unit
