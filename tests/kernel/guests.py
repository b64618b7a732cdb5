"""The real-kernel tests' guests: run side by side, and beside the tests that need none.

A real-kernel test names the guest run it reads with ``@pytest.mark.guest(SPEC)`` (a :class:`Guest`)
and gets that run's result with :func:`result`. When the session's items are known,
tests/kernel/conftest.py starts a :class:`Pool` with every guest run the selected tests need,
longest first; each run is a ``tools/vm/ulogvm.py`` process in a thread of its own. At most
``jobs`` guests run at once (``ULOG_KERNEL_JOBS``, default: the number of cores, at most 4), one
fewer while pytest itself still runs the tests without a guest, which keep a core busy: on a 2-core
machine one guest runs beside the fast tests, then two at once. Every guest has one virtual CPU:
under software emulation a second one mostly spins waiting for the first whenever the host runs
something else (measured: a third more CPU time for the same scenario beside another guest).

The real-kernel tests are moved to the end of the run (conftest.py), so that pytest runs the fast
tests while the guests boot; a real-kernel test then waits for its run if it has not ended yet.
Several tests read one run (a suite boots once for several scenarios); each asserts on its own
scenario's keys and fails on its own.

While a guest runs, its steps (ulogvm's stderr) go to the terminal as they come, each line led by
the run's name (``[suite-core] ulogvm: [guest   25.60s] basic-core: …``), past pytest's output
capture, from whichever thread runs it; ``-q`` hides them.

Without a pool (pytest-xdist workers, a test whose run was not planned) :func:`result` runs the
guest in the test itself, as before.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ULOGVM = ROOT / "tools" / "vm" / "ulogvm.py"
SETUP_HINT = "run `python3 tools/vm/ulogvm.py setup` first (needs root and the Debian package mirror)"


@dataclass
class ScenarioRun:
    name: str
    rc: int
    out: Path
    results: dict[str, str]
    stderr: str
    stdout: str = ""

    def get(self, key: str) -> str | None:
        return self.results.get(key)

    def explain(self) -> str:
        failed = [f"{k}={v}" for k, v in self.results.items() if k.endswith(".failed")]
        log = self.out / "scenario.log"
        tail = log.read_text(errors="replace").splitlines()[-30:] if log.is_file() else []
        return (f"scenario {self.name}: exit code {self.rc}; results in {self.out}\n"
                f"failed checks: {failed or 'none'}\nulogvm: {self.stderr.strip()[-2000:]}\n"
                "scenario.log tail:\n" + "\n".join(tail))


def parse_results(path: Path) -> dict[str, str]:
    results: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                if key.endswith(".failed") and key in results:
                    value = f"{results[key]}; {value}"
                results[key] = value
    return results


# ---------------------------------------------------------------------------------------------
# The terminal


class Terminal:
    """Writes progress lines to the terminal from any thread, past pytest's output capture.

    A guest thread cannot suspend the capture (that is the main thread's, mid-test), so lines go
    to a copy of the file descriptor pytest reports on, taken while the capture was off."""

    def __init__(self, config: pytest.Config | None) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.fd: int | None = None
        self.reporter = config.pluginmanager.getplugin("terminalreporter") if config else None
        self._width_after = -1  # the reporter's line width just after our last line

    def open(self) -> None:
        """Take the copy; call it while pytest's capture is suspended (collection is over). A
        pytest-xdist worker has no terminal of its own, but its stderr is its controller's."""
        if self.fd is None:
            with contextlib.suppress(OSError, ValueError):
                self.fd = os.dup(2 if os.environ.get("PYTEST_XDIST_WORKER") else sys.stdout.fileno())

    def close(self) -> None:
        with self.lock:
            if self.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.fd)
                self.fd = None

    def quiet(self) -> bool:
        return self.config is not None and self.config.get_verbosity() < 0

    def line(self, text: str) -> None:
        if self.quiet():
            return
        with self.lock:
            if self.fd is None:
                print(text, file=sys.stderr, flush=True)
                return
            # The reporter may be in the middle of a line of dots: start ours on a line of its own
            # (only once, if the reporter wrote nothing since our last line).
            tw = getattr(self.reporter, "_tw", None)
            width = getattr(tw, "width_of_current_line", 0) if tw is not None else 0
            lead = "\n" if width and width != self._width_after else ""
            with contextlib.suppress(OSError):
                os.write(self.fd, f"{lead}{text}\n".encode(errors="replace"))
            self._width_after = width


TERMINAL = Terminal(None)


# ---------------------------------------------------------------------------------------------
# One guest run

#: ulogvm processes running now, so that the end of the session (or Ctrl-C) can stop them: qemu
#: dies with its ulogvm (PR_SET_PDEATHSIG).
_PROCS: set[subprocess.Popen[str]] = set()
_PROCS_LOCK = threading.Lock()


def run_ulogvm(args: list[str], timeout: float, label: str = "") -> subprocess.CompletedProcess[str]:
    """``tools/vm/ulogvm.py ARGS``, its stderr (a line per scenario step, see ``ulogvm.Progress``)
    shown as it comes, led by ``label``, and returned with its stdout. Raises
    subprocess.TimeoutExpired after ``timeout`` seconds."""
    cmd = [sys.executable, str(ULOGVM), *args]
    # ulogvm ends (and stops its qemu) when the thread that started it does, even if pytest is killed
    # (SIGTERM, SIGKILL: no session end runs then).
    env = dict(os.environ, ULOGVM_PARENT_PID=str(os.getpid()))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, errors="replace", env=env)
    with _PROCS_LOCK:
        _PROCS.add(proc)
    out_pipe, err_pipe = proc.stdout, proc.stderr
    assert out_pipe is not None and err_pipe is not None
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.append(out_pipe.read()), daemon=True)
    reader.start()
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    stderr: list[str] = []
    lead = f"  [{label}] " if label else "    "
    try:
        for line in err_pipe:
            stderr.append(line)
            TERMINAL.line(lead + line.rstrip("\n"))
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # an exception here (Ctrl-C): never leave ulogvm (and qemu) behind
            proc.kill()
            proc.wait()
        with _PROCS_LOCK:
            _PROCS.discard(proc)
    reader.join()
    if killed.is_set():
        raise subprocess.TimeoutExpired(cmd, timeout, "".join(stdout), "".join(stderr))
    return subprocess.CompletedProcess(cmd, rc, "".join(stdout), "".join(stderr))


def stop_all() -> None:
    """Kill every ulogvm still running (the session ends, or was interrupted)."""
    with _PROCS_LOCK:
        procs = list(_PROCS)
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.kill()


_RUN_DIR_LOCK = threading.Lock()


def run_dir(name: str) -> Path:
    """A results directory of its own for this run: ``results/pytest-<name>/<UTC time>-<pid>``.

    Earlier runs of the scenario that passed (exit code 0, no failed check) are removed; a run
    that failed keeps its evidence (console, dmesg, daemon logs, captures) until removed by hand,
    whatever runs after it (a failure whose directory the next run emptied is a failure lost)."""
    base = ROOT / "results" / f"pytest-{name}"
    with _RUN_DIR_LOCK:
        if base.is_dir():
            for old in base.iterdir():
                rc = old / "rc.txt"
                if old.is_dir() and rc.is_file() and rc.read_text().strip() == "0" and not any(
                        k.endswith(".failed") for k in parse_results(old / "result.txt")):
                    shutil.rmtree(old, ignore_errors=True)
        stamp = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}"
        out, n = base / stamp, 1
        while out.exists():  # the same run twice in one second (a test that runs it again)
            n += 1
            out = base / f"{stamp}-{n}"
        out.mkdir(parents=True)
        latest = base / "latest"
        with contextlib.suppress(FileNotFoundError):
            latest.unlink()
        latest.symlink_to(out.name)
    return out


def finished(out: Path, rc: int) -> None:
    """Record the run's exit code (what run_dir reads to tell a passed run from a failed one)."""
    with contextlib.suppress(OSError):
        (out / "rc.txt").write_text(f"{rc}\n")


@dataclass(frozen=True)
class Guest:
    """One boot (or one ``--boots N`` run) of a scenario, read by one test or several.

    ``key`` names the run (results in ``results/pytest-<key>/``); ``estimate`` is its wall time
    in seconds alone on a quiet 2-core machine, to start the longest first; ``env`` are ``--env``
    values, ``prepare`` gives more of them when the run starts (it may take time or fail);
    ``backend``: whether ``ULOG_KERNEL_BACKEND`` applies (not to a run that names its backend);
    ``idle``: the guest mostly sleeps (the harness's timeout self-test), so it takes no core's
    share of the pool; ``cores``: how many qemu processes it runs at once (two for the cluster's
    two-guest runs), each a core's share."""

    key: str
    scenario: str
    estimate: float
    timeout: int = 600
    command: str = "run"
    env: tuple[str, ...] = ()
    prepare: Callable[[], tuple[str, ...]] | None = field(default=None, compare=False)
    backend: bool = True
    idle: bool = False
    cores: int = 1


def run_guest(guest: Guest) -> ScenarioRun:
    """Boot ``guest`` now, in this thread; its lines go to the terminal as they come."""
    out = run_dir(guest.key)
    args = [guest.command]
    if guest.command == "run":
        args.append(guest.scenario)
    args += ["--out", str(out), "--timeout", str(guest.timeout), "--smp", "1"]
    env = list(guest.env)
    if guest.prepare is not None:
        env += guest.prepare()
    backend = os.environ.get("ULOG_KERNEL_BACKEND")
    if backend and guest.backend:
        env.append(f"BACKEND={backend}")
    for item in env:
        args += ["--env", item]
    p = run_ulogvm(args, timeout=guest.timeout + 90, label=guest.key)
    finished(out, p.returncode)
    return ScenarioRun(guest.key, p.returncode, out, parse_results(out / "result.txt"), p.stderr, p.stdout)


# ---------------------------------------------------------------------------------------------
# The pool


def default_jobs() -> int:
    env = os.environ.get("ULOG_KERNEL_JOBS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(os.cpu_count() or 1, 4))


class _Slot:
    """One planned run: its result, or what it raised (given to every test that reads it)."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.done = threading.Event()
        self.run: ScenarioRun | None = None
        self.error: BaseException | None = None
        self.started = False


class Pool:
    """Runs the planned guests, longest first, at most ``jobs`` at once (one fewer while pytest
    still runs tests without a guest: see :meth:`main_idle`)."""

    def __init__(self, guests: Iterable[Guest], jobs: int, main_busy: bool) -> None:
        # The idle ones first (they take no share), then the longest first.
        self.slots = {g.key: _Slot(g) for g in sorted(guests, key=lambda g: (not g.idle, -g.estimate))}
        self.jobs = jobs
        self.main_busy = main_busy
        self.running = 0
        self.closed = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._schedule, name="guest-pool", daemon=True)

    def start(self) -> None:
        if self.slots:
            TERMINAL.line(f"real-kernel guests: {', '.join(self.slots)} "
                          f"(up to {self.jobs} at once, {self.capacity()} while other tests run)")
            self.thread.start()

    def capacity(self) -> int:
        return max(1, self.jobs - 1) if self.main_busy else self.jobs

    def main_idle(self) -> None:
        """pytest has run every test without a guest: its core is free for one more guest."""
        with self.cond:
            self.main_busy = False
            self.cond.notify_all()

    def _schedule(self) -> None:
        for slot in self.slots.values():
            with self.cond:
                share = 0 if slot.guest.idle else slot.guest.cores
                # A run wider than the pool starts alone.
                while not self.closed and share and self.running and self.running + share > self.capacity():
                    self.cond.wait()
                while not self.closed and share and self.running >= self.capacity():
                    self.cond.wait()
                if self.closed:
                    break
                self.running += share
                slot.started = True
            threading.Thread(target=self._run, args=(slot,), name=f"guest-{slot.guest.key}",
                             daemon=True).start()
        with self.cond:  # what never started: say so to whoever waits for it
            for slot in self.slots.values():
                if not slot.started:
                    slot.error = RuntimeError(f"guest {slot.guest.key} not started: the session ended")
                    slot.done.set()

    def _run(self, slot: _Slot) -> None:
        try:
            slot.run = run_guest(slot.guest)
        except BaseException as e:  # noqa: BLE001 - pytest.fail/skip too: raised again in the test
            slot.error = e
        finally:
            slot.done.set()
            with self.cond:
                self.running -= 0 if slot.guest.idle else slot.guest.cores
                self.cond.notify_all()

    def result(self, guest: Guest) -> ScenarioRun | None:
        """The run's result (waiting for it), or None if the pool has no such run."""
        slot = self.slots.get(guest.key)
        if slot is None:
            return None
        slot.done.wait()
        if slot.error is not None:
            raise slot.error
        assert slot.run is not None
        return slot.run

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        stop_all()


POOL: Pool | None = None


def result(guest: Guest) -> ScenarioRun:
    """The result of ``guest``'s run: from the pool (waiting for it), else booted here and now."""
    run = POOL.result(guest) if POOL is not None else None
    if run is None:
        run = run_guest(guest)
    if run.rc == 2 and "setup" in run.stderr:
        pytest.fail(f"{run.stderr.strip()}\n{SETUP_HINT}", pytrace=False)
    return run
