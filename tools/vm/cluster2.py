#!/usr/bin/env python3
"""Two-guest mode of the real-kernel harness: two qemu guests sharing the legs of one mirror.

Each guest boots Debian's kernel as ``ulogvm.py`` does (same kernel, same host root over 9p, same
checkout), with the network modules added to its initramfs. The guests share:

* the mirror legs: raw images on the host, attached to both guests with ``share-rw=on``,
  ``cache=none`` (no host page cache between the guests: a block one guest wrote with O_DIRECT is
  what the other reads) and ``file.locking=off`` (qemu would refuse a second writer otherwise);
* a network between the two qemu processes only: ``-netdev dgram`` over two unix sockets, one
  per guest, each the other's remote end: nothing reaches the host's network;

and each has its own state disk (a raw image, ``cache=writeback``: what the guest flushed
survives the guest, as on a real disk) for dm-ulogd's state directory. In each guest the
scenario ``tools/vm/cluster/<scenario>.sh`` runs with ``NODE`` = 1 or 2: it brings up the
network, corosync (2 nodes, ``two_node: 1``), ``dm-ulogd --cluster corosync`` and the same
mirror (same uuid, same table) with dmsetup.

What only the host can do (kill a guest's qemu: a power cut and a perfect fence at once) is the
scenario's *host driver* here, which watches the guests' result shares for the events it waits
on and answers through them.

    python3 tools/vm/cluster2.py run node-dies [--out DIR] [--timeout S] [--backend lmdb] [-v]

Results (``--out``, default ``results/cluster-<scenario>/``, emptied first): ``node1/`` and
``node2/`` (each guest's results share: ``console.log``, ``scenario.log``, ``result.txt``, the
daemon's and corosync's logs, ``dmesg.txt``), ``host.txt`` (the host's own keys: when it killed
what, the legs compared byte for byte), ``result.txt`` (all keys: ``host.*``, ``n1.*``,
``n2.*``), ``summary.txt``, ``wall-seconds``, ``cpu-seconds``; ``disks/`` (the images) is kept
after a failed run or with ``--keep-disks``.

While the guests run, both guests' steps stream to stderr with their own clocks, led by the node
(``ulogvm: [n1 guest  52.10s] node-dies: ...``), and the host's actions with the host's
(``ulogvm: [host wall  80.3s] SIGKILL n2's qemu``).

Stdlib only, as ulogvm.py.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ulogvm  # noqa: E402 - the single-guest harness, next to this file

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
SCENARIO_DIR = HERE / "cluster"
NODES = 2

#: The network device's modules (virtio_net needs net_failover, which needs failover).
NET_MODULES = ("failover", "net_failover", "virtio_net")

#: ulogvm's init, running the scenario from tools/vm/cluster/ instead of tools/vm/scenarios/.
_SCENARIO_PATH = "tools/vm/scenarios/$ULOG_SCENARIO.sh"
assert ulogvm.INIT_SCRIPT.count(_SCENARIO_PATH) == 1, "ulogvm's init no longer runs scenarios this way"
INIT_SCRIPT = ulogvm.INIT_SCRIPT.replace(_SCENARIO_PATH, "tools/vm/cluster/$ULOG_SCENARIO.sh")

#: Mirror geometry shared by both guests (the legs are made here, on the host).
LEG_MIB = 16
REGION_SECTORS = 512  # 256 KiB regions: 64 regions
STATE_DISK = "64M"
#: corosync's totem token: a guest under emulation on a loaded host can stall for a second or more,
#: and a short token makes the membership flap; a node's death is seen after about token + consensus.
DEFAULT_TOKEN_MS = 3000

EXIT_FAILED = 1
log = ulogvm.log


# ---------------------------------------------------------------------------------------------
# The initramfs: ulogvm's, plus the network modules, with the init above


def cluster_artifacts() -> ulogvm.Artifacts:
    """ulogvm's kernel (from its manifest) and an initramfs of our own: the network modules added
    and the init above. Named apart from ulogvm's (``cluster-initramfs-*``), which ulogvm's own
    clean-up of older builds (``initramfs-*``) leaves alone."""
    base = ulogvm.load_artifacts()
    kernel = base.kernel
    busybox_path = ulogvm.find_busybox()
    if busybox_path is None:
        raise ulogvm.HarnessError("no static busybox on the host; run: python3 tools/vm/ulogvm.py setup")
    busybox = busybox_path.read_bytes()
    modules = ulogvm.resolve_modules(kernel, (*ulogvm.WANTED_MODULES, *NET_MODULES))
    h = hashlib.sha256()
    h.update(INIT_SCRIPT.encode())
    h.update(hashlib.sha256(busybox).digest())
    for m in modules:
        h.update(m.name.encode() + b"\0" + hashlib.sha256(m.data).digest())
    out = ulogvm.cache_dir() / f"cluster-initramfs-{kernel.release}-{h.hexdigest()[:16]}.cpio.gz"
    if not out.is_file():
        log(f"building {out.name} ({len(modules)} modules)")
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        tmp.write_bytes(ulogvm.build_initramfs(busybox, modules, INIT_SCRIPT))
        tmp.replace(out)
        for old in ulogvm.cache_dir().glob("cluster-initramfs-*.cpio.gz"):
            if old != out and time.time() - old.stat().st_mtime > 60:
                old.unlink(missing_ok=True)
    return ulogvm.Artifacts(kernel, out, [m.name for m in modules])


# ---------------------------------------------------------------------------------------------
# The guests


@dataclass
class Guest:
    node: int  # corosync node id, 1 or 2
    share: Path  # its results share (the guest's /run/ulog-out)
    console_path: Path
    cmd: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    progress: ulogvm.Progress | None = None
    killed_at: float | None = None  # host monotonic time of a SIGKILL by the host driver
    rc: int | None = None  # qemu's exit status once ended

    @property
    def name(self) -> str:
        return f"n{self.node}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def read_share(self, rel: str) -> str | None:
        try:
            return (self.share / rel).read_text()
        except (FileNotFoundError, UnicodeDecodeError):
            return None


def qemu_command(a: ulogvm.Artifacts, g: Guest, memory: int, state: ulogvm.Disk, legs: Sequence[Path],
                 sockets: Sequence[Path]) -> list[str]:
    cmd = ulogvm.qemu_command(a, g.share, 1, memory, [state])
    # no_timer_check: two guests under emulation on a loaded host boot slowly enough for the kernel's
    # check of the IO-APIC timer to fail ("IO-APIC + timer doesn't work!", a panic: seen here).
    append = cmd.index("-append") + 1
    cmd[append] += " no_timer_check"
    for i, leg in enumerate(legs):
        # share-rw=on, cache=none, file.locking=off: two guests write one image; no host page cache
        # between them, so each reads what the other wrote with O_DIRECT at once.
        cmd += ["-drive", f"file={leg},format=raw,if=none,id=leg{i},cache=none,file.locking=off",
                "-device", f"virtio-blk-pci,drive=leg{i},serial=leg{i},share-rw=on"]
    local, remote = sockets[g.node - 1], sockets[2 - g.node]
    cmd += ["-netdev", f"dgram,id=n0,local.type=unix,local.path={local},"
                       f"remote.type=unix,remote.path={remote}",
            "-device", f"virtio-net-pci,netdev=n0,mac=52:54:00:75:6c:{g.node:02x}"]
    return cmd


def start_guest(g: Guest, lines: Queue[tuple[Guest, bytes | None]]) -> None:
    # qemu itself (no `timeout` in between): the host driver's SIGKILL must reach qemu at once.
    g.proc = subprocess.Popen(g.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, preexec_fn=ulogvm.die_with_parent)

    def read() -> None:
        assert g.proc is not None and g.proc.stdout is not None
        for line in g.proc.stdout:
            lines.put((g, line))
        lines.put((g, None))

    threading.Thread(target=read, name=f"console-{g.name}", daemon=True).start()


# ---------------------------------------------------------------------------------------------
# Host drivers: what a scenario needs the host to do while the guests run


class HostDriver:
    """Called about every half second while the guests run (and once more after they ended)."""

    #: How many times both guests boot (on the same disks); a boot before the last must end with the
    #: driver's kill of both guests (a power cut of the whole cluster).
    boots = 1
    #: Writes each node does, once both write, before the driver kills (see :meth:`kill_due`).
    KILL_AFTER = 0

    def __init__(self, guests: list[Guest], say: Callable[[str], None], keys: dict[str, str]) -> None:
        self.guests = guests
        self.say = say
        self.keys = keys  # host.* result keys
        self.boot = 1  # the boot running now
        #: Each node's writes when both were first seen writing.
        self.base: dict[int, int] | None = None
        #: The kill is due or done (:meth:`kill_due` said so once).
        self.due = False

    def tick(self, now: float) -> None:
        self.barriers()

    def barriers(self) -> None:
        """lib.sh ``barrier NAME``: a guest there writes ``barrier-NAME.reached`` to its share and
        waits for ``barrier-NAME.go``, written to every guest's share once all have reached it."""
        alive = [g for g in self.guests if g.node not in self.expected_dead()]
        names = {p.name.removesuffix(".reached") for g in alive for p in g.share.glob("barrier-*.reached")}
        for name in sorted(names):
            if all((g.share / f"{name}.reached").exists() for g in alive) and not all(
                    (g.share / f"{name}.go").exists() for g in alive):
                for g in alive:
                    (g.share / f"{name}.go").write_text("go\n")
                self.say(f"{name}: every node there, go")

    def expected_dead(self) -> set[int]:
        """Nodes whose qemu the driver killed: their end without an exit code is intended."""
        return {g.node for g in self.guests if g.killed_at is not None}

    def kill_due(self, scenario: str, then: str) -> dict[int, int] | None:
        """Each node's writes so far, once: the first time every node has done KILL_AFTER since
        all were writing (``then``: what the driver does then, said when they all start). None
        before, and after."""
        if self.due:
            return None
        counts = {g.node: writes_done(g, scenario) for g in self.guests}
        if self.base is None:
            if all(counts.values()):
                self.base = counts
                self.say(f"both nodes write (writes so far: {counts}); {then} after {self.KILL_AFTER} more "
                         "on each")
            return None
        if not all(counts[n] - self.base[n] >= self.KILL_AFTER for n in counts):
            return None
        self.due = True
        return counts


def kill_alive(guests: list[Guest]) -> None:
    """SIGKILL the qemu of every guest still running (a run that cannot go on)."""
    for g in guests:
        if g.alive():
            assert g.proc is not None
            g.proc.kill()


def writes_done(g: Guest, scenario: str) -> int:
    """The writes node ``g``'s writer has finished so far (its counter file on the share)."""
    text = (g.read_share(f"{scenario}/writer.count") or "").strip()
    return int(text) if text.isdigit() else 0


class NodeDies(HostDriver):
    """Both nodes write; once each has done KILL_AFTER writes since both were writing, the host
    SIGKILLs node 2's qemu (a power cut and a fence at once) and tells node 1 through its share
    (``peer-killed``), which then goes on writing and checks its resync."""

    KILL_AFTER = 40  # 64 KiB writes per node, after both are writing
    VICTIM = 2

    def tick(self, now: float) -> None:
        super().tick(now)
        counts = self.kill_due("node-dies", f"node {self.VICTIM} dies")
        if counts is None:
            return
        victim = self.guests[self.VICTIM - 1]
        survivor = self.guests[0] if victim is self.guests[1] else self.guests[1]
        if not victim.alive():
            self.keys["kill"] = "victim-already-ended"
            return
        assert victim.proc is not None
        victim.proc.kill()
        victim.killed_at = now
        self.keys["killed_node"] = str(victim.node)
        self.keys["writes_at_kill"] = ",".join(f"n{n}:{c}" for n, c in sorted(counts.items()))
        self.say(f"SIGKILL {victim.name}'s qemu (pid {victim.proc.pid}) while both write ({counts})")
        # Told only after the kill: the survivor must not act on the death before it happened.
        (survivor.share / "peer-killed").write_text(f"{victim.node}\n")


class PowerCut(HostDriver):
    """Boot 1: both nodes write; once each has done KILL_AFTER writes since both were writing, the
    host SIGKILLs both qemu processes at once (a power cut of the whole cluster). Boot 2: both boot
    again on the same disks (the scenario's second half)."""

    KILL_AFTER = 40
    boots = 2

    def tick(self, now: float) -> None:
        super().tick(now)
        if self.boot != 1:
            return
        counts = self.kill_due("power-cut", "the power of both is cut")
        if counts is None:
            return
        if not all(g.alive() for g in self.guests):
            self.keys["cut"] = "a guest had ended already"
            return
        for g in self.guests:  # back to back: the two kills are microseconds apart
            assert g.proc is not None
            g.proc.kill()
            g.killed_at = now
        self.keys["writes_at_cut"] = ",".join(f"n{n}:{c}" for n, c in sorted(counts.items()))
        self.say(f"SIGKILL both qemu processes (power cut of the cluster) while both write ({counts})")


DRIVERS: dict[str, type[HostDriver]] = {"node-dies": NodeDies, "power-cut": PowerCut}


# ---------------------------------------------------------------------------------------------
# Legs compared on the host


def diff_regions(a: Path, b: Path, region_bytes: int) -> list[int]:
    diff = []
    with a.open("rb") as fa, b.open("rb") as fb:
        r = 0
        while True:
            x, y = fa.read(region_bytes), fb.read(region_bytes)
            if not x and not y:
                break
            if x != y:
                diff.append(r)
            r += 1
    return diff


def ranges(regions: Sequence[int]) -> str:
    runs: list[list[int]] = []
    for r in regions:
        if runs and runs[-1][1] == r - 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ",".join(f"{s}" if s == e else f"{s}-{e}" for s, e in runs) or "none"


# ---------------------------------------------------------------------------------------------
# run


def scenarios() -> list[str]:
    # lib.sh and fence.sh live there too: a scenario is a script that runs main_scenario
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.sh") if "\nmain_scenario " in p.read_text())


def parse_keys(path: Path, prefix: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            k, sep, v = line.partition("=")
            if sep:
                key = f"{prefix}.{k}"
                out[key] = f"{out[key]}; {v}" if key in out and k.endswith(".failed") else v
    return out


def cmd_run(args: argparse.Namespace) -> int:
    name = args.scenario.removesuffix(".sh")
    script = SCENARIO_DIR / f"{name}.sh"
    if not script.is_file():
        raise ulogvm.HarnessError(f"no scenario {script}; available: {' '.join(scenarios())}")
    out = ulogvm.prepare_out(Path(args.out).resolve() if args.out
                             else CHECKOUT / "results" / f"cluster-{name}")
    python = Path(args.python) if args.python else ulogvm.default_python()
    a = cluster_artifacts()
    ulogvm.compile_checkout(python)
    disks = out / "disks"
    disks.mkdir()
    # The legs differ at the start (random contents, one per leg): the first resync must copy.
    legs = [disks / f"leg{i}.img" for i in range(2)]
    for leg in legs:
        with leg.open("wb") as f:
            for _ in range(LEG_MIB):
                f.write(os.urandom(1 << 20))
    states = {n: ulogvm.make_disks([f"state:{STATE_DISK}"], disks / f"n{n}")[0] for n in (1, 2)}
    # Unix socket paths hold 108 bytes: a short directory of their own, not the results directory.
    sockdir = Path(tempfile.mkdtemp(prefix="ulogvm2-"))
    sockets = [sockdir / f"n{n}.sock" for n in (1, 2)]
    t0 = time.monotonic()
    cpu0 = ulogvm.children_cpu()
    keys: dict[str, str] = {}

    def say(text: str) -> None:
        log(f"[host wall {time.monotonic() - t0:6.1f}s] {text}")

    guests: list[Guest] = []
    for n in (1, 2):
        share = out / f"node{n}"
        share.mkdir()
        share.chmod(0o755)
        env = {"NODE": str(n), "NODES": str(NODES), "BACKEND": args.backend,
               "REGION_SECTORS": str(REGION_SECTORS), "TOKEN_MS": str(args.token)}
        for item in args.env:
            key, sep, value = item.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ulogvm.HarnessError(f"--env wants KEY=VALUE, got {item!r}")
            env[key] = value
        (share / "scenario-env.sh").write_text("".join(f"export {k}={shlex.quote(v)}\n"
                                                       for k, v in env.items()))
        g = Guest(n, share, share / "console.log")
        g.cmd = qemu_command(a, g, args.memory, states[n], legs, sockets)
        guests.append(g)
    driver = DRIVERS.get(name, HostDriver)(guests, say, keys)
    boots = driver.boots
    consoles = {g.node: g.console_path.open("wb") for g in guests}
    deadline = t0 + args.timeout
    timed_out = False
    boot = 1
    previous = {sig: signal.signal(sig, _raise_exit) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def run_boot(boot: int) -> None:
        """Boot both guests (boot ``boot`` of ``boots``) and stream them until both have ended."""
        nonlocal timed_out
        lines: Queue[tuple[Guest, bytes | None]] = Queue()
        ended: set[int] = set()
        for g in guests:
            params = {"ULOG_SCENARIO": name, "ULOG_CHECKOUT": str(CHECKOUT), "ULOG_PY": str(python),
                      "ULOG_GUEST_TIMEOUT": str(max(int(deadline - time.monotonic()) - ulogvm.GUEST_MARGIN_S,
                                                    10)),
                      "ULOG_BOOT": str(boot), "ULOG_BOOTS": str(boots)}
            (g.share / "params.sh").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in params.items()))
            if boots > 1:
                consoles[g.node].write(f"==== ulogvm: boot {boot} of {boots} ====\n".encode())
            g.killed_at = None
            g.rc = None
            g.progress = ulogvm.Progress(boot, boots, steps=not args.verbose,
                                         write=lambda t, g=g: log(f"[{g.name} {t[1:]}" if t.startswith("[")
                                                                  else f"[{g.name}] {t}"))
            start_guest(g, lines)
        driver.boot = boot
        while len(ended) < len(guests):
            try:
                g, line = lines.get(timeout=0.5)
            except Empty:
                g, line = None, b""
            now = time.monotonic()
            if g is not None:
                assert g.progress is not None
                if line is None:
                    ended.add(g.node)
                    assert g.proc is not None
                    g.rc = g.proc.wait()
                    code = (g.read_share("exit-code") or "").strip()
                    if g.node not in driver.expected_dead() and code != "0":
                        # A guest that failed (or never booted) leaves the other waiting for it
                        # until its own limit: end the run now.
                        how = f"exit code {code}" if code else f"qemu {g.rc}, no exit code"
                        say(f"{g.name} ended ({how}): stopping the other guest")
                        kill_alive(guests)
                else:
                    consoles[g.node].write(line)
                    consoles[g.node].flush()
                    if args.verbose:
                        sys.stderr.buffer.write(f"{g.name}| ".encode() + line)
                        sys.stderr.flush()
                    g.progress.line(line.decode(errors="replace"))
            for other in guests:
                if other.node not in ended and other.progress is not None:
                    other.progress.tick()
            driver.tick(now)
            if now > deadline and not timed_out:
                timed_out = True
                say(f"host-side limit of {args.timeout}s reached: stopping the guests")
                kill_alive(guests)

    try:
        log(f"booting {a.kernel.release} in two guests for cluster scenario {name}"
            f"{f' ({boots} boots)' if boots > 1 else ''} (timeout {args.timeout}s, results in {out})")
        for boot in range(1, boots + 1):
            run_boot(boot)
            if boot == boots or timed_out or driver.expected_dead() != {g.node for g in guests}:
                break  # the last boot, or one that did not end in the intended power cut of both
            say(f"boot {boot} of {boots} ended as intended (both guests killed); booting both again")
            for g in guests:  # this boot's files apart from the next boot's
                for f in ulogvm.PER_BOOT_FILES:
                    if (g.share / f).exists():
                        (g.share / f).replace(g.share / f"boot{boot}.{f}")
    finally:
        for g in guests:
            if g.alive():
                assert g.proc is not None
                g.proc.kill()
                g.proc.wait()
        for f in consoles.values():
            f.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(sockdir, ignore_errors=True)
    elapsed = time.monotonic() - t0
    cpu = ulogvm.children_cpu() - cpu0

    # How each guest ended.
    rc = 0
    if boot < boots:
        keys["boots"] = f"{boot} of {boots}: boot {boot} did not end in the intended kill of both guests"
        rc = EXIT_FAILED
    for g in guests:
        code = g.read_share("exit-code")
        if g.node in driver.expected_dead():
            keys[f"{g.name}_end"] = "killed by the host as intended"
            continue
        if code is None or not code.strip().lstrip("-").isdigit():
            keys[f"{g.name}_end"] = f"no exit code (qemu {g.rc}{', host timeout' if timed_out else ''})"
            rc = ulogvm.EXIT_TIMEOUT if timed_out else ulogvm.EXIT_BOOT_FAILURE
            continue
        keys[f"{g.name}_end"] = f"exit code {code.strip()}"
        if int(code) != 0 and rc == 0:
            rc = int(code)

    # The legs, byte for byte, from the host: the raw images both guests wrote.
    diff = diff_regions(legs[0], legs[1], REGION_SECTORS * 512)
    keys["legs"] = "equal" if not diff else "differ"
    keys["legs_diff_regions"] = str(len(diff))
    keys["legs_diff_ranges"] = ranges(diff)
    if diff and rc == 0:
        rc = EXIT_FAILED
    keys["wall_seconds"] = f"{elapsed:.1f}"
    keys["cpu_seconds"] = f"{cpu:.1f}"
    keys["rc"] = str(rc)
    (out / "host.txt").write_text("".join(f"{k}={v}\n" for k, v in keys.items()))
    merged = {f"host.{k}": v for k, v in keys.items()}
    for g in guests:
        merged |= parse_keys(g.share / "result.txt", g.name)
    (out / "result.txt").write_text("".join(f"{k}={v}\n" for k, v in merged.items()))
    # Both guests' scenario logs in one, each line led by its node (what the tests show on a failure).
    with (out / "scenario.log").open("w") as f:
        for g in guests:
            log_file = g.share / "scenario.log"
            text = log_file.read_text(errors="replace") if log_file.is_file() else ""
            f.writelines(f"{g.name}| {line}\n" for line in text.splitlines())
    (out / "wall-seconds").write_text(f"{elapsed:.1f}\n")
    (out / "cpu-seconds").write_text(f"{cpu:.1f}\n")
    summary = SUMMARIES.get(name, lambda v: [])(merged)
    (out / "summary.txt").write_text("".join(f"{line}\n" for line in summary))
    if rc == 0 and not args.keep_disks:
        shutil.rmtree(disks, ignore_errors=True)
    failed = [f"{k}={v}" for k, v in merged.items() if k.endswith(".failed")]
    log(f"cluster scenario {name}: {'passed' if rc == 0 else f'FAILED (exit {rc})'}; legs {keys['legs']}; "
        f"{elapsed:.1f}s wall, {cpu:.1f}s CPU; results in {out}" + (f"; failed: {failed}" if failed else ""))
    for line in summary:
        log(line)
    return rc


def _raise_exit(signo: int, _frame: object) -> None:
    raise SystemExit(128 + signo)


def node_dies_summary(v: dict[str, str]) -> list[str]:
    """The node-dies run in words: each number with where it comes from."""
    s = "n1.node-dies"
    rows = [
        ("initial resync", f"{v.get(f'{s}.resynced_initial', '?')} regions recovered by n1, "
                           f"{v.get('n2.node-dies.resynced_initial', '?')} by n2 "
                           f"(of {v.get(f'{s}.regions', '?')}: the legs start different)"),
        ("killed", f"n{v.get('host.killed_node', '?')}'s qemu (SIGKILL) after writes "
                   f"{v.get('host.writes_at_kill', '?')}"),
        ("seen by the survivor", f"member left after {v.get(f'{s}.left_seconds', '?')} s, departed after "
                                 f"{v.get(f'{s}.departed_seconds', '?')} s (guest clock, from the kill's "
                                 "notice)"),
        ("held at the death", f"{v.get(f'{s}.held_count', '?')} region(s) "
                              f"({v.get(f'{s}.held_regions', '?')}): the dead node's marks, held until "
                              "its fence, then released (the survivor's cluster state, ulog-recover list)"),
        ("departed said", f"{v.get(f'{s}.departed_regions_logged', '?')} region(s) (daemon log)"),
        ("before the resume", f"{v.get(f'{s}.sync_before_resume', '?')} in sync: the kernel asks for no "
                              "resync work by itself once it saw the mirror in sync (its in-sync hint), "
                              "until a resume"),
        ("resynced after", f"{v.get(f'{s}.resynced_after_death', '?')} region(s) "
                           f"({v.get(f'{s}.resynced_after_death_regions', '?')}) by the survivor, after its "
                           "suspend + resume"),
        ("writes failed", f"{v.get(f'{s}.writes_failed', '?')} on the survivor "
                          f"({v.get(f'{s}.writes_total', '?')} writes of 64 KiB, O_DIRECT)"),
        ("status", v.get(f"{s}.status_final", "?")),
        ("legs", f"{v.get('host.legs', '?')} (raw images compared on the host; "
                 f"{v.get('host.legs_diff_regions', '?')} region(s) differ)"),
        ("time", f"{v.get('host.wall_seconds', '?')} s wall, {v.get('host.cpu_seconds', '?')} s CPU"),
    ]
    return wrap_rows(rows)


def wrap_rows(rows: list[tuple[str, str]]) -> list[str]:
    """Label and text per row, the text wrapped under its column (as the single-guest demo's)."""
    width = max(len(label) for label, _ in rows)
    lines = []
    for label, text in rows:
        wrapped = textwrap.wrap(text, ulogvm.SUMMARY_COLUMNS - width - 4, break_on_hyphens=False) or [""]
        lines.append(f"  {label:<{width}}  {wrapped[0]}")
        lines.extend(" " * (width + 4) + more for more in wrapped[1:])
    return lines


def both_write_summary(v: dict[str, str]) -> list[str]:
    rows = []
    for n in (1, 2):
        s = f"n{n}.both-write"
        rows.append((f"n{n}", f"recovered {v.get(f'{s}.resynced_initial', '?')} of the "
                              f"{v.get(f'{s}.regions', '?')} regions at first; wrote "
                              f"{v.get(f'{s}.writes_total', '?')} blocks of 64 KiB (O_DIRECT), "
                              f"{v.get(f'{s}.writes_failed', '?')} failed; "
                              f"{v.get(f'{s}.resynced_after_writes', '?')} regions resynced after; "
                              f"status at the end: {v.get(f'{s}.status_final', '?')}"))
    rows.append(("legs", f"{v.get('host.legs', '?')} (raw images compared on the host)"))
    rows.append(("time", f"{v.get('host.wall_seconds', '?')} s wall, {v.get('host.cpu_seconds', '?')} s CPU"))
    return wrap_rows(rows)


def power_cut_summary(v: dict[str, str]) -> list[str]:
    s1, s2 = "n1.power-cut", "n2.power-cut"
    rows = [
        ("power cut", "both qemu processes killed (SIGKILL) after writes "
                      f"{v.get('host.writes_at_cut', '?')}"),
        ("marked at the cut", f"{v.get(f'{s1}.marked_at_cut_count', '?')} region(s) "
                              f"({v.get(f'{s1}.marked_at_cut', '?')}) in n1's state directory, "
                              f"{v.get(f'{s2}.marked_at_cut_count', '?')} "
                              f"({v.get(f'{s2}.marked_at_cut', '?')}) in n2's: the marks durable when the "
                              "power went"),
        ("legs different", f"{v.get(f'{s1}.legs_diff_at_cut_count', '?')} region(s) "
                           f"({v.get(f'{s1}.legs_diff_at_cut', '?')}) after the cut: writes in flight"),
        ("resynced in boot 2", f"{v.get(f'{s1}.resynced_boot2', '?')} by n1 "
                               f"({v.get(f'{s1}.resynced_boot2_regions', '?')}), "
                               f"{v.get(f'{s2}.resynced_boot2', '?')} by n2 "
                               f"({v.get(f'{s2}.resynced_boot2_regions', '?')}), of "
                               f"{v.get(f'{s1}.regions', '?')}"),
        ("status", v.get(f"{s1}.status_final", "?")),
        ("legs", f"{v.get('host.legs', '?')} (raw images compared on the host)"),
        ("time", f"{v.get('host.wall_seconds', '?')} s wall, {v.get('host.cpu_seconds', '?')} s CPU"),
    ]
    return wrap_rows(rows)


SUMMARIES: dict[str, Callable[[dict[str, str]], list[str]]] = {"node-dies": node_dies_summary,
                                                                "both-write": both_write_summary,
                                                                "power-cut": power_cut_summary}


def run_for_ulogvm(scenario: str, args: argparse.Namespace) -> int:
    """``ulogvm.py run cluster:SCENARIO ...``: the real-kernel tests' guest pool runs every guest
    through ulogvm's ``run``; its options map onto ours (``--smp``, ``--disk`` and ``--boots`` do
    not apply: each guest has one CPU, its disks are this mode's own)."""
    try:
        return cmd_run(argparse.Namespace(
            scenario=scenario, timeout=args.timeout, out=args.out, python=args.python, memory=args.memory,
            backend="lmdb", token=DEFAULT_TOKEN_MS, env=list(args.env), keep_disks=args.keep_disks,
            verbose=args.verbose))
    except ulogvm.HarnessError as e:  # ulogvm's __main__ has a HarnessError class of its own
        log(f"error: {e}")
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cluster2.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the two-guest scenarios")
    r = sub.add_parser("run", help="boot two guests and run one scenario in both")
    r.add_argument("scenario")
    r.add_argument("--timeout", type=int, default=600, help="hard limit for the whole run (seconds)")
    r.add_argument("--out", help="results directory (default <checkout>/results/cluster-<scenario>)")
    r.add_argument("--python", help="python inside the guests (default <checkout>/.venv/bin/python)")
    r.add_argument("--memory", type=int, default=768, help="memory of each guest in MiB")
    r.add_argument("--backend", default="lmdb", help="dm-ulogd's --backend in both guests")
    r.add_argument("--token", type=int, default=DEFAULT_TOKEN_MS,
                   help="corosync's totem token in ms")
    r.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="variable for the scenario in both guests; repeatable")
    r.add_argument("--keep-disks", action="store_true", help="keep the images after a passing run")
    r.add_argument("-v", "--verbose", action="store_true", help="echo both consoles")
    args = p.parse_args(argv)
    parent = os.environ.get("ULOGVM_PARENT_PID", "")
    if parent.isdigit():
        ulogvm.die_with_parent()
        if os.getppid() != int(parent):
            log("error: the process that started cluster2 is gone")
            return 2
    try:
        if args.cmd == "list":
            print("\n".join(scenarios()))
            return 0
        return cmd_run(args)
    except ulogvm.HarnessError as e:
        log(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
