"""Run the reliability tests (access control, hostile frames, disk faults, crash points, load) and
print their figures.

    .venv/bin/python tools/reliability/run.py                # the default (CI) sizes, ~2 minutes
    .venv/bin/python tools/reliability/run.py --long         # >= 100 k frames, 1000 crash points,
                                                             # 10 minutes of load, 200 damaged stores
    .venv/bin/python tools/reliability/run.py --long --only fuzz,crash
    .venv/bin/python tools/reliability/run.py --long --only cluster   # 220 cluster crash points
    .venv/bin/python tools/reliability/run.py --soak 600     # + the real-kernel soak under qemu

The tests live in ``tests/reliability/`` (and ``tests/kernel/test_soak.py`` for the soak); this
runs them through pytest with ``ULOG_REL_LONG=1`` in the long mode and collects the figures each
test reports (``ULOG_REL_FIGURES``): one line per test, then a summary of violations. Known bugs
are strict xfails there: they are listed as such. The figures also go to ``--json`` (default
``results/reliability/figures[-long].json``). Exit status: pytest's.

Sizes can be set one by one: ``ULOG_REL_FUZZ_EXAMPLES``, ``ULOG_REL_CRASH_POINTS``,
``ULOG_REL_LOAD_SECONDS``, ``ULOG_REL_DAMAGE_TRIALS``, ``ULOG_REL_CLUSTER_POINTS``, ``ULOG_REL_SEED``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GROUPS = {
    "access": "tests/reliability/test_access_control.py",
    "fuzz": "tests/reliability/test_transport_fuzz.py",
    "disk": "tests/reliability/test_disk_faults.py",
    "crash": "tests/reliability/test_crash_points.py",
    "load": "tests/reliability/test_load.py",
    # Faults on a 3-node corosync rig (root): 4 points by default, 220 in the long mode.
    "cluster": "tests/reliability/test_cluster_points.py",
    # Real kernel under qemu (long mode only): a stalled state disk, descriptor and memory limits.
    "faults": "tests/kernel/test_faults.py",
}
#: Figures worth a column, per test (the rest are in the JSON).
KEYS = {
    "fuzz.transport": ["frames", "examples", "unanswerable", "answered_error", "answered_ok", "max_reply_ms",
                       "seconds"],
    "crash.kill9_mixed": ["crash_points", "restarts_same_boot", "host_reboots", "kills_during_startup",
                          "journal_segments_made", "journal_segments_cut", "requests_acknowledged",
                          "verify_runs", "verify_failures", "seconds"],
    "load.64_mirrors": ["seconds", "requests", "flushes", "flush_p50_ms", "flush_p99_ms", "flush_max_ms",
                        "slowest_reply_ms", "replies_over_15s", "rss_first_quarter_mib",
                        "rss_last_quarter_mib"],
    "cluster.crash_points": ["points", "faults", "requests_acknowledged", "regions_handed",
                             "violations_by_rule", "points_with_violations", "seconds_per_point", "seconds"],
    "cluster.crash_points_fenced": ["points", "faults", "requests_acknowledged", "regions_handed", "fenced",
                                    "violations_by_rule", "points_with_violations", "seconds_per_point",
                                    "seconds"],
    "disk.random_damage": ["trials", "outcomes"],
    "disk.random_journal_damage": ["trials", "outcomes"],
}


SKIP = ("test", "long", "violations", "known_bug")


def wait_for_no_qemu(limit: float = 3600) -> None:
    """One qemu at a time on a small machine: wait for others to finish."""
    deadline = time.monotonic() + limit
    while subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True).returncode == 0:
        if time.monotonic() > deadline:
            raise SystemExit("another qemu is still running")
        print("waiting for another qemu run to finish ...", flush=True)
        time.sleep(20)


def show(lines: list[dict]) -> int:
    """Print the figures; the number of violations outside the known bugs (strict xfails)."""
    total = known = 0
    print()
    print(f"{'test':44} {'violations':>10}  figures")
    for line in lines:
        test = line["test"]
        violations = int(line.get("violations", 0) or 0)
        if line.get("known_bug"):
            known += violations
            test += " (known bug)"
        else:
            total += violations
        keys = KEYS.get(line["test"]) or [k for k in line if k not in SKIP]
        figs = ", ".join(f"{k}={line[k]}" for k in keys if k in line)
        print(f"{test:44} {violations:>10}  {figs}")
    print(f"\n{len(lines)} figure lines: {total} violation(s); {known} in tests of known bugs (strict xfail)")
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--long", action="store_true", help="the long mode (ULOG_REL_LONG=1)")
    p.add_argument("--only", default="", help=f"comma-separated groups: {', '.join(GROUPS)}")
    p.add_argument("--soak", type=int, metavar="SECONDS", help="also run the qemu soak for SECONDS")
    p.add_argument("--json", type=Path, help="where to write the figures")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = p.parse_args(argv)
    groups = [g for g in args.only.split(",") if g] or list(GROUPS)
    unknown = set(groups) - set(GROUPS)
    if unknown:
        p.error(f"unknown group(s): {', '.join(sorted(unknown))}")
    name = "figures-long.json" if args.long else "figures.json"
    out = args.json or ROOT / "results" / "reliability" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        figures_path = Path(f.name)
    env = dict(os.environ, ULOG_REL_FIGURES=str(figures_path))
    if args.long:
        env["ULOG_REL_LONG"] = "1"
        env["ULOG_KERNEL_LONG"] = "1"
    paths = [GROUPS[g] for g in groups]
    if args.soak:
        paths.append("tests/kernel/test_soak.py")
        env["ULOG_SOAK_SECONDS"] = str(args.soak)
        wait_for_no_qemu()
    cmd = [sys.executable, "-m", "pytest", "-q", "-rxXs", "--durations=0", *paths,
           *args.pytest_args]
    print("$", " ".join(cmd), flush=True)
    t0 = time.monotonic()
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    elapsed = time.monotonic() - t0
    lines = [json.loads(x) for x in figures_path.read_text().splitlines() if x.strip()]
    figures_path.unlink()
    violations = show(lines)
    doc = {"long": args.long, "groups": groups, "seconds": round(elapsed, 1), "pytest_exit": rc,
           "violations": violations, "figures": lines}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"pytest exit status {rc} after {elapsed:.0f} s; figures in {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
